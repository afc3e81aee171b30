//! The stream's header: the guest layout both ends must agree on, and the machine spec.

use super::chunk::Cursor;
use super::error::StreamError;
use super::format::{LANE_TOKEN, MAX_CONNECTIONS, MAX_REGIONS, MAX_SPEC, PAGE_SIZE};

/// What both ends must agree on before any page moves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Page size of page chunks (always [`PAGE_SIZE`] for this version).
    pub page_size: u32,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM regions as (gpa, len), in guest-physical order.
    pub regions: Vec<(u64, u64)>,
    /// What the destination builds before it receives: the machine spec as JSON
    /// (`crate::machine::spec`), empty when the sender has none. Not compared by
    /// [`accept`](Layout::accept).
    pub spec: Vec<u8>,
    /// Connections the migration uses (1 to [`MAX_CONNECTIONS`]): this one and
    /// `connections - 1` lanes, which open after the header.
    pub connections: u32,
    /// What each lane sends first, so that the destination knows it for this migration's.
    pub lane_token: [u8; LANE_TOKEN],
}

impl Layout {
    /// The layout of a VM with `vcpus` vCPUs over `regions`.
    pub fn new(vcpus: u32, regions: impl IntoIterator<Item = (u64, u64)>) -> Layout {
        Layout {
            page_size: PAGE_SIZE as u32,
            vcpus,
            regions: regions.into_iter().collect(),
            spec: Vec::new(),
            connections: 1,
            lane_token: [0; LANE_TOKEN],
        }
    }

    /// This layout for a migration over `connections` connections whose lanes send `token`.
    pub fn with_lanes(mut self, connections: u32, token: [u8; LANE_TOKEN]) -> Layout {
        self.connections = connections;
        self.lane_token = token;
        self
    }

    /// This layout with `spec` as its machine spec.
    pub fn with_spec(mut self, spec: Vec<u8>) -> Layout {
        self.spec = spec;
        self
    }

    /// Total RAM bytes (saturating: a corrupt header's lengths may add up past 2^64).
    pub fn ram_bytes(&self) -> u64 {
        self.regions
            .iter()
            .fold(0u64, |sum, r| sum.saturating_add(r.1))
    }

    /// Checks that a stream from `source` can be received by a VM with this layout.
    pub fn accept(&self, source: &Layout) -> Result<(), StreamError> {
        if source.page_size != self.page_size {
            return Err(StreamError::PageSizeMismatch {
                source_page: source.page_size,
                here: self.page_size,
            });
        }
        if source.regions != self.regions {
            let regions = |l: &Layout| {
                l.regions
                    .iter()
                    .map(|(g, n)| format!("{g:#x}+{n:#x}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(StreamError::RamMismatch {
                source_ram: crate::memory::human(source.ram_bytes()),
                source_regions: regions(source),
                here_ram: crate::memory::human(self.ram_bytes()),
                here_regions: regions(self),
            });
        }
        if source.vcpus != self.vcpus {
            return Err(StreamError::VcpuMismatch {
                source_vcpus: source.vcpus,
                here: self.vcpus,
            });
        }
        Ok(())
    }

    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(12 + 16 * self.regions.len());
        out.extend_from_slice(&self.page_size.to_le_bytes());
        out.extend_from_slice(&self.vcpus.to_le_bytes());
        out.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        for (gpa, len) in &self.regions {
            out.extend_from_slice(&gpa.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
        }
        out.extend_from_slice(&(self.spec.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.spec);
        out.extend_from_slice(&self.connections.to_le_bytes());
        out.extend_from_slice(&self.lane_token);
        out
    }

    pub(super) fn decode(p: &[u8]) -> Result<Layout, String> {
        let mut c = Cursor(p);
        let page_size = c.u32()?;
        let vcpus = c.u32()?;
        let n = c.u32()? as usize;
        if n > MAX_REGIONS {
            return Err(format!(
                "header lists {n} RAM regions (at most {MAX_REGIONS})"
            ));
        }
        let mut regions = Vec::with_capacity(n);
        for _ in 0..n {
            regions.push((c.u64()?, c.u64()?));
        }
        let spec_len = c.u32()? as usize;
        if spec_len > MAX_SPEC {
            return Err(format!(
                "header carries a {spec_len}-byte machine spec (at most {MAX_SPEC})"
            ));
        }
        let spec = c.take(spec_len)?.to_vec();
        let connections = c.u32()?;
        if !(1..=MAX_CONNECTIONS).contains(&connections) {
            return Err(format!(
                "header asks for {connections} connections (1 to {MAX_CONNECTIONS})"
            ));
        }
        let lane_token = c.take(LANE_TOKEN)?.try_into().expect("LANE_TOKEN bytes");
        c.finish()?;
        Ok(Layout {
            page_size,
            vcpus,
            regions,
            spec,
            connections,
            lane_token,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Region lengths from a corrupt header that add up past 2^64 (found by the
    /// `migration_stream` fuzz target: the mismatch message overflowed summing them).
    #[test]
    fn ram_bytes_saturates() {
        let source = Layout::new(1, [(0, u64::MAX), (1 << 40, 2)]);
        assert_eq!(source.ram_bytes(), u64::MAX);
        let here = Layout::new(1, [(0, 64 << 20)]);
        let e = here.accept(&source).unwrap_err();
        assert!(matches!(e, StreamError::RamMismatch { .. }), "{e}");
        let _ = e.to_string();
    }
}
