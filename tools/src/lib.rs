//! Shared helpers of the tools binaries (placeholder).
