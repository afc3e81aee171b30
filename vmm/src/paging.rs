//! Demand paging of guest RAM through userfaultfd and the stage2 engine (placeholder).
