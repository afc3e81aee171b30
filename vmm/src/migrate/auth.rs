//! Mutual authentication of a migration's two ends with a shared secret
//! (`--migrate-secret FILE` on both): a challenge and response with HMAC-SHA256 before the
//! stream's first byte, so that a destination never writes guest memory for a peer that does
//! not hold the secret, and a source never sends guest memory to one.
//!
//! ```text
//! source -> destination: AUTH_MAGIC, source nonce (32 bytes)
//! destination -> source: destination nonce (32), HMAC(secret, "destination" | source nonce | destination nonce)
//! source -> destination: HMAC(secret, "source" | destination nonce | source nonce)
//! ```
//!
//! The source checks the destination's proof before it proves itself; the labels keep one
//! side's proof from serving as the other's. The stream that follows is not encrypted or
//! signed: its chunks carry checksums against damage, not against a man in the middle (run
//! migrations over a network you trust, or a tunnel).

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub use super::stream::AUTH_MAGIC;
const NONCE: usize = 32;
const MAC: usize = 32;
/// The shortest secret accepted (bytes).
pub const MIN_SECRET: usize = 16;
/// The longest secret file read (bytes).
pub const MAX_SECRET: usize = 4096;

type HmacSha256 = Hmac<Sha256>;

/// Why a secret could not be read, or a peer was not authenticated.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The secret file cannot be read.
    #[error("--migrate-secret {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not fit to hold a secret.
    #[error("--migrate-secret {path}: {why}")]
    Unfit {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        why: String,
    },
    /// The peer did not prove the secret.
    #[error("{0}")]
    Refused(String),
    /// The connection failed during the exchange.
    #[error("authenticating the migration peer: {0}")]
    Io(#[from] std::io::Error),
}

/// A migration secret (never printed).
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

impl Secret {
    /// The secret in `path`: a regular file that only its owner may read (mode 0600 or
    /// stricter), of [`MIN_SECRET`] to [`MAX_SECRET`] bytes; one trailing newline is not
    /// part of it (`head -c 32 /dev/urandom | base64 > FILE` makes one).
    pub fn from_file(path: &Path) -> Result<Secret, AuthError> {
        let unfit = |why: String| AuthError::Unfit {
            path: path.to_path_buf(),
            why,
        };
        let meta = std::fs::metadata(path).map_err(|source| AuthError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if !meta.is_file() {
            return Err(unfit("not a regular file".into()));
        }
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(unfit(format!(
                "readable by others (mode {:o}): `chmod 600` it",
                meta.permissions().mode() & 0o777
            )));
        }
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        if meta.uid() != euid && euid != 0 {
            return Err(unfit(format!(
                "owned by uid {}, not by this user (uid {euid})",
                meta.uid()
            )));
        }
        if meta.len() > MAX_SECRET as u64 {
            return Err(unfit(format!("over {MAX_SECRET} bytes")));
        }
        let mut bytes = std::fs::read(path).map_err(|source| AuthError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
        }
        if bytes.len() < MIN_SECRET {
            return Err(unfit(format!(
                "{} bytes; a secret has at least {MIN_SECRET} (e.g. `head -c 32 /dev/urandom \
                 | base64 > FILE`)",
                bytes.len()
            )));
        }
        Ok(Secret(bytes))
    }

    /// A secret from bytes (tests).
    pub fn from_bytes(bytes: &[u8]) -> Secret {
        Secret(bytes.to_vec())
    }

    fn mac(&self, label: &[u8], a: &[u8], b: &[u8]) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        m.update(label);
        m.update(a);
        m.update(b);
        m
    }
}

fn nonce() -> std::io::Result<[u8; NONCE]> {
    random()
}

/// `N` bytes from the kernel's random source (getrandom(2)).
pub(crate) fn random<const N: usize>() -> std::io::Result<[u8; N]> {
    let mut n = [0u8; N];
    let mut got = 0;
    while got < N {
        // SAFETY: writes at most N - got bytes into `n[got..]`.
        let r = unsafe { libc::getrandom(n[got..].as_mut_ptr().cast(), N - got, 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        got += r as usize;
    }
    Ok(n)
}

/// The source's side, on a fresh connection to `peer`: checks the destination's proof, then
/// proves itself. An error means nothing of the guest was sent.
pub fn prove_source<C: Read + Write>(
    conn: &mut C,
    secret: &Secret,
    peer: &str,
) -> Result<(), AuthError> {
    let ours = nonce()?;
    let mut hello = [0u8; 8 + NONCE];
    hello[..8].copy_from_slice(&AUTH_MAGIC);
    hello[8..].copy_from_slice(&ours);
    conn.write_all(&hello)?;
    conn.flush()?;
    let mut answer = [0u8; NONCE + MAC];
    if let Err(e) = conn.read_exact(&mut answer) {
        return Err(if e.kind() == std::io::ErrorKind::UnexpectedEof {
            AuthError::Refused(format!(
                "the destination {peer} closed the connection instead of proving the migration \
                 secret: it runs without --migrate-secret, or refused this source"
            ))
        } else {
            AuthError::Io(e)
        });
    }
    let (theirs, proof) = answer.split_at(NONCE);
    secret
        .mac(b"destination", &ours, theirs)
        .verify_slice(proof)
        .map_err(|_| {
            AuthError::Refused(format!(
                "the destination {peer} did not prove the migration secret (its \
                 --migrate-secret differs): nothing was sent"
            ))
        })?;
    let mine = secret.mac(b"source", theirs, &ours).finalize().into_bytes();
    conn.write_all(&mine)?;
    conn.flush()?;
    Ok(())
}

/// The destination's side, on a connection just accepted: the source must open with
/// [`AUTH_MAGIC`] and prove the secret. An error means nothing was received into the guest.
pub fn check_source<C: Read + Write>(conn: &mut C, secret: &Secret) -> Result<(), AuthError> {
    let eof = |what: &str| {
        AuthError::Refused(format!(
            "the migration source closed the connection {what}; refused before any guest \
             memory was written"
        ))
    };
    let mut hello = [0u8; 8 + NONCE];
    if let Err(e) = conn.read_exact(&mut hello[..8]) {
        return Err(match e.kind() {
            std::io::ErrorKind::UnexpectedEof => eof("before its first bytes"),
            _ => AuthError::Io(e),
        });
    }
    if hello[..8] != AUTH_MAGIC {
        return Err(AuthError::Refused(
            "the migration source did not authenticate (it runs without --migrate-secret, \
             which this destination requires); refused before any guest memory was written"
                .into(),
        ));
    }
    conn.read_exact(&mut hello[8..])
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => eof("during authentication"),
            _ => AuthError::Io(e),
        })?;
    let theirs = &hello[8..];
    let ours = nonce()?;
    let proof = secret
        .mac(b"destination", theirs, &ours)
        .finalize()
        .into_bytes();
    let mut answer = [0u8; NONCE + MAC];
    answer[..NONCE].copy_from_slice(&ours);
    answer[NONCE..].copy_from_slice(&proof);
    conn.write_all(&answer)?;
    conn.flush()?;
    let mut mac = [0u8; MAC];
    if let Err(e) = conn.read_exact(&mut mac) {
        return Err(match e.kind() {
            std::io::ErrorKind::UnexpectedEof => eof(
                "instead of proving the migration secret (its --migrate-secret differs, so it \
                 refused this destination's proof)",
            ),
            _ => AuthError::Io(e),
        });
    }
    secret
        .mac(b"source", &ours, theirs)
        .verify_slice(&mac)
        .map_err(|_| {
            AuthError::Refused(
                "the migration source's proof of the secret is wrong (its --migrate-secret \
                 differs); refused before any guest memory was written"
                    .into(),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn pair(src: Option<&[u8]>, dst: &[u8]) -> (Result<(), String>, Result<(), String>) {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        b.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let dst = Secret::from_bytes(dst);
        let d = std::thread::spawn(move || {
            let r = check_source(&mut b, &dst).map_err(|e| e.to_string());
            drop(b);
            r
        });
        let s = match src {
            Some(k) => {
                let r =
                    prove_source(&mut a, &Secret::from_bytes(k), "test").map_err(|e| e.to_string());
                drop(a);
                r
            }
            None => {
                // A source without a secret starts with the stream itself.
                a.write_all(b"VMMMIGR\0\x01\0\0\0").unwrap();
                drop(a);
                Ok(())
            }
        };
        (s, d.join().unwrap())
    }

    #[test]
    fn the_same_secret_passes_both_ways() {
        let (s, d) = pair(Some(b"0123456789abcdef"), b"0123456789abcdef");
        assert!(s.is_ok() && d.is_ok(), "{s:?} {d:?}");
    }

    #[test]
    fn a_wrong_secret_is_refused_by_both_ends() {
        let (s, d) = pair(Some(b"0123456789abcdeX"), b"0123456789abcdef");
        assert!(s.unwrap_err().contains("did not prove"));
        assert!(d.unwrap_err().contains("refused before any guest memory"));
    }

    #[test]
    fn a_source_without_a_secret_is_refused() {
        let (_, d) = pair(None, b"0123456789abcdef");
        let e = d.unwrap_err();
        assert!(e.contains("did not authenticate"), "{e}");
    }

    #[test]
    fn a_replayed_destination_proof_does_not_pass_as_a_source_proof() {
        // The destination's proof over (source nonce, destination nonce) never equals the
        // source's over (destination nonce, source nonce) with another label.
        let k = Secret::from_bytes(b"0123456789abcdef");
        let (n1, n2) = ([1u8; NONCE], [2u8; NONCE]);
        let d = k.mac(b"destination", &n1, &n2).finalize().into_bytes();
        let s = k.mac(b"source", &n1, &n2).finalize().into_bytes();
        assert_ne!(d, s);
    }

    #[test]
    fn secret_files_must_be_private_and_long_enough() {
        let dir = std::env::temp_dir().join(format!("vmm-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("k");
        std::fs::write(&p, "0123456789abcdef\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Secret::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(Secret::from_file(&p).unwrap().0, b"0123456789abcdef");
        std::fs::write(&p, "short\n").unwrap();
        let e = Secret::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("at least 16"), "{e}");
        let e = Secret::from_file(&dir.join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--migrate-secret"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
