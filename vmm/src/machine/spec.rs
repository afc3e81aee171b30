//! The machine spec: what a migration destination must build before it can receive a VM
//! (memory size, vCPUs, backing, and the payload with what its verification needs), carried as
//! JSON in the migration stream's header, and checked against the flags the destination was
//! given.

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use crate::cli::{flag_name, Cli, GuestArgs, Hugepages, MemoryBackendArg, ModeArg, GUEST_FLAGS};
use crate::memory::{human, BackingKind};

/// A VM as the migration source describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineSpec {
    /// Guest RAM bytes.
    pub mem: u64,
    /// vCPUs.
    pub cpus: u8,
    /// `--hugepages` as the command line spells it (`auto`, `2M`, `1G`, `thp`, `none`).
    pub hugepages: String,
    /// `--memory-backend` as the command line spells it (`private`, `shared`).
    pub memory_backend: String,
    /// What runs in the VM.
    pub payload: Payload,
    /// The virtio devices, in slot order (a booted kernel's `--disk`s, then its balloon).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceSpec>,
}

/// A virtio device of a migrating VM: the destination builds the same ones, in the same
/// slots, and takes their state from the stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum DeviceSpec {
    /// A virtio-blk disk. The destination opens the same path: the image is on storage both
    /// hosts see (or both ends are on one host); its size must match.
    Disk {
        /// The image.
        path: std::path::PathBuf,
        /// `readonly=on`.
        readonly: bool,
        /// `direct=on`.
        direct: bool,
    },
    /// A virtio-net device. The destination opens a tap of the same name on its host.
    Net {
        /// The tap's name.
        tap: String,
        /// `mac=`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mac: Option<crate::virtio::net::Mac>,
    },
    /// The virtio-balloon.
    Balloon,
}

/// The virtio devices of a kernel VM as its flags give them: `--disk`, `--net`, `--balloon`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceConfigs {
    /// `--disk`, in order.
    pub disks: Vec<crate::virtio::block::DiskConfig>,
    /// `--net`, in order.
    pub nets: Vec<crate::virtio::net::NetConfig>,
    /// `--balloon`.
    pub balloon: bool,
}

impl DeviceConfigs {
    /// The devices of `cli`'s flags.
    pub fn of(cli: &Cli) -> DeviceConfigs {
        DeviceConfigs {
            disks: cli.disk.clone(),
            nets: cli.net.clone(),
            balloon: cli.balloon,
        }
    }

    /// How many virtio slots they take.
    pub fn count(&self) -> usize {
        self.disks.len() + self.nets.len() + usize::from(self.balloon)
    }
}

impl DeviceSpec {
    /// The devices of `configs`, in the slot order the VMM gives them (disks, network
    /// devices, the balloon); a disk's path made absolute (the destination may run elsewhere).
    pub fn of(configs: &DeviceConfigs) -> Vec<DeviceSpec> {
        let disks = configs.disks.iter().map(|d| DeviceSpec::Disk {
            path: absolute(&d.path),
            readonly: d.readonly,
            direct: d.direct,
        });
        let nets = configs.nets.iter().map(|n| DeviceSpec::Net {
            tap: n.tap.clone(),
            mac: n.mac,
        });
        disks
            .chain(nets)
            .chain(configs.balloon.then_some(DeviceSpec::Balloon))
            .collect()
    }

    /// The flags' devices, from a list [`DeviceSpec::of`] made.
    pub fn split(devices: &[DeviceSpec]) -> DeviceConfigs {
        let mut c = DeviceConfigs::default();
        for d in devices {
            match d {
                DeviceSpec::Disk {
                    path,
                    readonly,
                    direct,
                } => c.disks.push(crate::virtio::block::DiskConfig {
                    path: path.clone(),
                    readonly: *readonly,
                    direct: *direct,
                }),
                DeviceSpec::Net { tap, mac } => c.nets.push(crate::virtio::net::NetConfig {
                    tap: tap.clone(),
                    mac: *mac,
                }),
                DeviceSpec::Balloon => c.balloon = true,
            }
        }
        c
    }
}

/// `path` without symbolic links, `.` or `..`, when it exists; as given otherwise.
fn absolute(path: &std::path::Path) -> std::path::PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// `--disk` options as one comparable string (paths made absolute).
fn disks_text(disks: &[crate::virtio::block::DiskConfig]) -> String {
    let one = |d: &crate::virtio::block::DiskConfig| {
        format!(
            "path={}{}{}",
            absolute(&d.path).display(),
            if d.readonly { ",readonly=on" } else { "" },
            if d.direct { ",direct=on" } else { "" }
        )
    };
    if disks.is_empty() {
        "none".into()
    } else {
        disks.iter().map(one).collect::<Vec<_>>().join(" ")
    }
}

/// `--net` options as one comparable string.
fn nets_text(nets: &[crate::virtio::net::NetConfig]) -> String {
    if nets.is_empty() {
        return "none".into();
    }
    nets.iter()
        .map(|n| match n.mac {
            Some(m) => format!("tap={},mac={m}", n.tap),
            None => format!("tap={}", n.tap),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// What runs in a migrating VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Payload {
    /// A booted kernel: everything it needs is in RAM and device state.
    Kernel,
    /// A built-in test guest, with what the destination's verification needs.
    Guest(GuestSpec),
}

/// A built-in test guest's options, as the source ran it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestSpec {
    /// `--guest`.
    pub name: String,
    /// `--mode`.
    pub mode: String,
    /// `--generations` (none: the guest's default).
    pub generations: Option<u64>,
    /// `--writes-per-gen` (none: the default).
    pub writes_per_gen: Option<u64>,
    /// `--seed`.
    pub seed: u64,
    /// `--dirty-rate`.
    pub dirty_rate: u64,
    /// `--expect-reclaim` (or a `--reclaim-storm` on the source).
    pub expect_reclaim: bool,
}

impl GuestSpec {
    /// What a migration destination needs to run and verify this guest.
    pub fn of(args: &GuestArgs) -> GuestSpec {
        GuestSpec {
            name: args.guest.clone().unwrap_or_default(),
            mode: args.mode_name(),
            generations: args.generations,
            writes_per_gen: args.writes_per_gen,
            seed: args.seed,
            dirty_rate: args.dirty_rate,
            expect_reclaim: args.expect_reclaim || args.reclaim_storm.is_some(),
        }
    }

    /// The guest a migration source described, with this destination's own options
    /// (`--guest-timeout`, `--run-for`, `--reclaim-storm`, from `local`) kept. A storm
    /// needs a guest that expects reclaims (its parameter block came from the source).
    pub fn to_args(&self, local: &GuestArgs) -> anyhow::Result<GuestArgs> {
        if local.reclaim_storm.is_some() && !self.expect_reclaim {
            anyhow::bail!(
                "--reclaim-storm here, but the migrating guest does not expect reclaims (its \
                 source ran without --expect-reclaim or --reclaim-storm): it would fail on the \
                 first page a reclaim zeroes; drop --reclaim-storm, or start the source with \
                 --expect-reclaim"
            );
        }
        let mode = ModeArg::from_str(&self.mode, true).map_err(|_| {
            anyhow::anyhow!(
                "the source's guest mode {:?} is unknown here: run the same vmm build on both sides",
                self.mode
            )
        })?;
        Ok(GuestArgs {
            guest: Some(self.name.clone()),
            mode,
            generations: self.generations,
            writes_per_gen: self.writes_per_gen,
            seed: self.seed,
            dirty_rate: self.dirty_rate,
            expect_reclaim: self.expect_reclaim,
            reclaim_storm: local.reclaim_storm,
            guest_timeout: local.guest_timeout,
            run_for: local.run_for,
        })
    }
}

impl MachineSpec {
    /// The JSON the stream carries.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a machine spec is always serializable")
    }

    /// Parses a stream's spec; empty means the source sent none (an older or a test sender).
    pub fn from_bytes(bytes: &[u8]) -> anyhow::Result<Option<MachineSpec>> {
        if bytes.is_empty() {
            return Ok(None);
        }
        serde_json::from_slice(bytes)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("the source's machine spec is not valid: {e}"))
    }

    /// The payload's name as the command line spells it (`kernel`, or the guest's name).
    pub fn payload_name(&self) -> &str {
        match &self.payload {
            Payload::Kernel => "a kernel",
            Payload::Guest(g) => &g.name,
        }
    }
}

/// The `--hugepages` and `--memory-backend` tokens that ask for `kind`.
pub fn backing_tokens(kind: BackingKind) -> (&'static str, &'static str) {
    match kind {
        BackingKind::Auto => ("auto", "private"),
        BackingKind::Hugetlb2M => ("2M", "private"),
        BackingKind::Hugetlb1G => ("1G", "private"),
        BackingKind::Thp => ("thp", "private"),
        BackingKind::Small => ("none", "private"),
        BackingKind::SharedAuto => ("auto", "shared"),
        BackingKind::Shared4K => ("none", "shared"),
        BackingKind::Shared2M => ("2M", "shared"),
        BackingKind::Shared1G => ("1G", "shared"),
    }
}

impl MachineSpec {
    /// The spec of a VM of `mem` bytes and `cpus` vCPUs on `backing` running `payload`.
    pub fn new(mem: u64, cpus: u8, backing: BackingKind, payload: Payload) -> MachineSpec {
        let (hugepages, memory_backend) = backing_tokens(backing);
        MachineSpec {
            mem,
            cpus,
            hugepages: hugepages.into(),
            memory_backend: memory_backend.into(),
            payload,
            devices: Vec::new(),
        }
    }

    /// This spec with `devices`.
    pub fn with_devices(mut self, devices: Vec<DeviceSpec>) -> MachineSpec {
        self.devices = devices;
        self
    }
}

/// One value a destination flag gave, to compare with the source's.
#[derive(Debug)]
pub struct Given<'a> {
    /// The flag, e.g. `--mem`.
    pub flag: &'a str,
    /// The value given here, as the source's value is written.
    pub here: String,
    /// The source's value.
    pub source: String,
}

/// Refuses the first flag given on the destination whose value disagrees with the source's,
/// with both values.
pub fn check_agree(given: &[Given<'_>]) -> anyhow::Result<()> {
    for g in given {
        if g.here != g.source {
            anyhow::bail!(
                "{} {} here, but the migrating VM has {} {}: drop {} (an --incoming \
                 destination takes it from the source) or give the source's value",
                g.flag,
                g.here,
                g.flag,
                g.source,
                g.flag
            );
        }
    }
    Ok(())
}

/// Checks the flags an `--incoming` destination was given against the source's `spec` (a
/// flag given here must agree with the source's value) and returns the backing to build.
pub fn reconcile(cli: &Cli, spec: &MachineSpec) -> anyhow::Result<BackingKind> {
    let mut given = Vec::new();
    let mut add = |id: &'static str, here: String, source: String| {
        if cli.was_given(id) {
            given.push((flag_name(id), here, source));
        }
    };
    add("mem", human(cli.mem), human(spec.mem));
    add("cpus", cli.cpus.to_string(), spec.cpus.to_string());
    add("hugepages", cli.hugepages_name(), spec.hugepages.clone());
    add(
        "memory_backend",
        cli.memory_backend_name(),
        spec.memory_backend.clone(),
    );
    let source = DeviceSpec::split(&spec.devices);
    add("disk", disks_text(&cli.disk), disks_text(&source.disks));
    add("net", nets_text(&cli.net), nets_text(&source.nets));
    add(
        "balloon",
        cli.balloon.to_string(),
        source.balloon.to_string(),
    );
    match &spec.payload {
        Payload::Kernel => {
            let guest_flag = std::iter::once("guest")
                .chain(GUEST_FLAGS.iter().copied())
                .find(|id| cli.was_given(id));
            if let Some(id) = guest_flag {
                anyhow::bail!(
                    "{} here, but the migrating VM is a booted kernel, not a built-in test \
                     guest: drop {}",
                    flag_name(id),
                    flag_name(id)
                );
            }
        }
        Payload::Guest(g) => {
            let a = &cli.guest_args;
            let opt = |v: Option<u64>| v.map_or("default".to_string(), |n| n.to_string());
            add("guest", a.guest.clone().unwrap_or_default(), g.name.clone());
            add("mode", a.mode_name(), g.mode.clone());
            add("generations", opt(a.generations), opt(g.generations));
            add(
                "writes_per_gen",
                opt(a.writes_per_gen),
                opt(g.writes_per_gen),
            );
            add("seed", a.seed.to_string(), g.seed.to_string());
            add(
                "dirty_rate",
                a.dirty_rate.to_string(),
                g.dirty_rate.to_string(),
            );
        }
    }
    let given: Vec<Given<'_>> = given
        .iter()
        .map(|(flag, here, source)| Given {
            flag,
            here: here.clone(),
            source: source.clone(),
        })
        .collect();
    check_agree(&given)?;
    let hugepages = Hugepages::from_str(&spec.hugepages, true).map_err(|_| {
        anyhow::anyhow!(
            "the source's backing {:?} is unknown here: run the same vmm build on both sides",
            spec.hugepages
        )
    })?;
    let backend = MemoryBackendArg::from_str(&spec.memory_backend, true).map_err(|_| {
        anyhow::anyhow!(
            "the source's memory backend {:?} is unknown here: run the same vmm build on both \
             sides",
            spec.memory_backend
        )
    })?;
    Ok(BackingKind::from(hugepages).on_backend(backend.into())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest_spec() -> MachineSpec {
        MachineSpec {
            mem: 1 << 30,
            cpus: 2,
            hugepages: "2M".into(),
            memory_backend: "private".into(),
            payload: Payload::Guest(GuestSpec {
                name: "dirty".into(),
                mode: "sequential".into(),
                generations: Some(0),
                writes_per_gen: None,
                seed: 7,
                dirty_rate: 40,
                expect_reclaim: true,
            }),
            devices: Vec::new(),
        }
    }

    #[test]
    fn spec_round_trips_through_its_bytes() {
        let s = guest_spec();
        assert_eq!(MachineSpec::from_bytes(&s.to_bytes()).unwrap(), Some(s));
        let k = MachineSpec {
            payload: Payload::Kernel,
            ..guest_spec()
        };
        let text = String::from_utf8(k.to_bytes()).unwrap();
        assert!(text.contains(r#""payload":{"kind":"kernel"}"#), "{text}");
        assert!(!text.contains("devices"), "no devices, no field: {text}");
        assert_eq!(
            MachineSpec::from_bytes(text.as_bytes()).unwrap(),
            Some(k.clone())
        );
        // A kernel with two disks and a balloon: the slots' order survives, and splits back
        // into the flags that made it.
        let disks: Vec<crate::virtio::block::DiskConfig> =
            ["path=/a.img", "path=/b.img,readonly=on,direct=on"]
                .iter()
                .map(|d| d.parse().unwrap())
                .collect();
        let nets: Vec<crate::virtio::net::NetConfig> = ["tap=t0,mac=52:54:00:00:00:01", "tap=t1"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        let configs = DeviceConfigs {
            disks: disks.clone(),
            nets: nets.clone(),
            balloon: true,
        };
        let with = k.with_devices(DeviceSpec::of(&configs));
        let text = String::from_utf8(with.to_bytes()).unwrap();
        assert!(
            text.contains(r#"{"kind":"net","tap":"t0","mac":"52:54:00:00:00:01"}"#),
            "{text}"
        );
        let back = MachineSpec::from_bytes(&with.to_bytes()).unwrap().unwrap();
        assert_eq!(back, with);
        assert_eq!(back.devices.len(), 5);
        assert_eq!(back.devices.last(), Some(&DeviceSpec::Balloon));
        assert_eq!(DeviceSpec::split(&back.devices), configs);
        assert_eq!(nets_text(&nets), "tap=t0,mac=52:54:00:00:00:01 tap=t1");
        assert_eq!(
            disks_text(&disks),
            "path=/a.img path=/b.img,readonly=on,direct=on"
        );
    }

    /// A destination's own --reclaim-storm is kept for a guest that expects reclaims, and
    /// refused for one that does not (it would fail on the first zeroed page).
    #[test]
    fn a_local_storm_needs_a_guest_that_expects_reclaims() {
        let Payload::Guest(g) = guest_spec().payload else {
            unreachable!()
        };
        let local = GuestArgs {
            reclaim_storm: Some(5),
            run_for: Some(3),
            ..GuestArgs::default()
        };
        let a = g.to_args(&local).unwrap();
        assert_eq!((a.reclaim_storm, a.run_for, a.seed), (Some(5), Some(3), 7));
        let calm = GuestSpec {
            expect_reclaim: false,
            ..g
        };
        let e = calm.to_args(&local).unwrap_err().to_string();
        assert!(e.contains("does not expect reclaims"), "{e}");
        assert_eq!(
            calm.to_args(&GuestArgs::default()).unwrap().reclaim_storm,
            None
        );
    }

    #[test]
    fn backing_tokens_parse_back_to_the_same_backing() {
        use crate::memory::MemoryBackend;
        for kind in [
            BackingKind::Auto,
            BackingKind::Hugetlb2M,
            BackingKind::Hugetlb1G,
            BackingKind::Thp,
            BackingKind::Small,
            BackingKind::SharedAuto,
            BackingKind::Shared4K,
            BackingKind::Shared2M,
            BackingKind::Shared1G,
        ] {
            let (h, b) = backing_tokens(kind);
            let h = Hugepages::from_str(h, true).unwrap();
            let b: MemoryBackend = MemoryBackendArg::from_str(b, true).unwrap().into();
            assert_eq!(BackingKind::from(h).on_backend(b).unwrap(), kind, "{kind}");
        }
    }

    /// A destination's `--net` must name the source's taps and addresses; left out, the
    /// source's are taken.
    #[test]
    fn a_destinations_net_flags_must_agree_with_the_sources_devices() {
        let spec = MachineSpec {
            payload: Payload::Kernel,
            ..guest_spec()
        }
        .with_devices(DeviceSpec::of(&DeviceConfigs {
            nets: vec!["tap=t0,mac=52:54:00:00:00:01".parse().unwrap()],
            ..DeviceConfigs::default()
        }));
        let cli = |extra: &[&str]| {
            let mut args = vec!["vmm", "--incoming", "tcp:127.0.0.1:1"];
            args.extend_from_slice(extra);
            crate::cli::parse_from(args).unwrap()
        };
        assert!(reconcile(&cli(&[]), &spec).is_ok());
        assert!(reconcile(&cli(&["--net", "tap=t0,mac=52:54:00:00:00:01"]), &spec).is_ok());
        for other in [
            "tap=t1,mac=52:54:00:00:00:01",
            "tap=t0",
            "tap=t0,mac=52:54:00:00:00:02",
        ] {
            let e = reconcile(&cli(&["--net", other]), &spec)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("--net") && e.contains("tap=t0,mac=52:54:00:00:00:01"),
                "{other}: {e}"
            );
        }
    }

    #[test]
    fn empty_spec_is_none_and_garbage_is_an_error() {
        assert_eq!(MachineSpec::from_bytes(b"").unwrap(), None);
        let e = MachineSpec::from_bytes(b"{\"mem\":")
            .unwrap_err()
            .to_string();
        assert!(e.contains("machine spec is not valid"), "{e}");
    }

    #[test]
    fn disagreeing_flag_names_both_values() {
        let ok = [Given {
            flag: "--cpus",
            here: "2".into(),
            source: "2".into(),
        }];
        check_agree(&ok).unwrap();
        let bad = [
            Given {
                flag: "--cpus",
                here: "2".into(),
                source: "2".into(),
            },
            Given {
                flag: "--mem",
                here: "512M".into(),
                source: "1G".into(),
            },
        ];
        let e = check_agree(&bad).unwrap_err().to_string();
        assert!(
            e.starts_with("--mem 512M here, but the migrating VM has --mem 1G"),
            "{e}"
        );
    }
}
