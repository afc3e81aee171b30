//! Loading a Linux kernel into guest RAM: bzImage (64-bit boot protocol) or vmlinux ELF,
//! initrd, command line and the zero page with the e820 map.

pub mod decompress;
