//! The demand pager as migration sees it: [`RamPager`], and its implementation over [`Pager`]
//! (populated checks for the sender, whole-page places and drops for the receiver).

use crate::pager::Pager;

/// What migration needs from the demand pager (implemented by [`crate::pager::Pager`] in
/// this module; unit tests use a fake).
pub trait RamPager: Send + Sync {
    /// Host page size of guest RAM: places and drops work on whole host pages.
    fn host_page(&self) -> u64;
    /// Whether the host page holding `gpa` is populated (reading it would not fault).
    fn is_populated(&self, gpa: u64) -> bool;
    /// Places whole host pages at `gpa` if missing; `Ok(false)`: already present, unchanged.
    fn place(&self, gpa: u64, data: &[u8]) -> Result<bool, String>;
    /// Drops the host pages of `[gpa, gpa+len)` (whole host pages) so the next access faults.
    fn discard(&self, gpa: u64, len: u64) -> Result<(), String>;
    /// Drops every `(gpa, len)` run, with nothing else touching guest RAM meanwhile (a
    /// postcopy destination at its switch): [`crate::pager::Pager`] does it without a
    /// userfaultfd event per run. By default, run by run.
    fn discard_all(&self, runs: &[(u64, u64)]) -> Result<(), String> {
        runs.iter()
            .try_for_each(|&(gpa, len)| self.discard(gpa, len))
    }
}

impl RamPager for Pager {
    fn host_page(&self) -> u64 {
        self.page_size().bytes()
    }

    fn is_populated(&self, gpa: u64) -> bool {
        Pager::is_populated(self, gpa)
    }

    fn place(&self, gpa: u64, data: &[u8]) -> Result<bool, String> {
        Pager::place(self, gpa, data).map_err(|e| e.to_string())
    }

    fn discard(&self, gpa: u64, len: u64) -> Result<(), String> {
        self.reclaim(gpa, len)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn discard_all(&self, runs: &[(u64, u64)]) -> Result<(), String> {
        self.drop_runs_quiet(runs).map_err(|e| e.to_string())
    }
}
