//! x86-64 test guest payloads and their host-side protocol (placeholder).
