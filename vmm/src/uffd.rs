//! A small userfaultfd layer over the kernel ioctls (placeholder).
