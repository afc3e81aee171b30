//! The VMM's own stage-2 page-table engine (owned by the stage2 work; see issue 2).
