//! The demand pager as migration sees it: [`RamPager`] over [`Pager`] (populated checks for
//! the sender, whole-page places and drops for the receiver).

use super::ram::RamPager;
use crate::pager::Pager;

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
