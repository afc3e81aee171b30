//! Minimal ACPI tables (RSDP, XSDT, FADT, DSDT, MADT) so a kernel built without MP-table support
//! (Debian's cloud kernel has CONFIG_X86_MPPARSE off) still finds every vCPU and the I/O APIC,
//! and can power off, reboot and hear the power button on a hardware-reduced platform: the
//! FADT's sleep control/status and reset registers, and a DSDT with `\_S5`, a Generic Event
//! Device and a power button. Layouts from the ACPI Specification 6.5, chapter 5.2.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::aml::{self, Trigger};
use super::error::ArchError;
use super::mptable::{APIC_DEFAULT_BASE, IOAPIC_DEFAULT_BASE};
use crate::devices::acpi::{
    GED_GSI, POWER_BUTTON_NOTIFY, RESET_PORT, RESET_VALUE, S5_SLP_TYP, SLEEP_CONTROL_PORT,
    SLEEP_STATUS_PORT,
};

/// Where the RSDP goes: the BIOS read-only area Linux scans (ACPI 6.5 §5.2.5.1), inside the
/// range the e820 map marks reserved.
pub const RSDP_GPA: u64 = 0xe_0000;
/// The first system description table follows the RSDP.
const TABLES_GPA: u64 = RSDP_GPA + 0x40;

const OEM_ID: &[u8; 6] = b"RVMM  ";
const OEM_TABLE_ID: &[u8; 8] = b"HUGEVMM ";
const OEM_REVISION: u32 = 1;
const CREATOR_ID: &[u8; 4] = b"RVMM";
const CREATOR_REVISION: u32 = 1;
/// Length of the common table header (§5.2.6).
const SDT_HEADER_LEN: usize = 36;
/// Offset of the checksum byte in the table header.
const SDT_CHECKSUM_OFFSET: usize = 9;

/// FADT revision and minor version of ACPI 6.5 (§5.2.9).
const FADT_REVISION: u8 = 6;
const FADT_MINOR_VERSION: u8 = 5;
/// Total FADT length for revision 6.
const FADT_LEN: usize = 276;
const FADT_OFF_DSDT: usize = 40;
const FADT_OFF_IAPC_BOOT_ARCH: usize = 109;
const FADT_OFF_FLAGS: usize = 112;
const FADT_OFF_RESET_REG: usize = 116;
const FADT_OFF_RESET_VALUE: usize = 128;
const FADT_OFF_MINOR_VERSION: usize = 131;
const FADT_OFF_X_DSDT: usize = 140;
const FADT_OFF_SLEEP_CONTROL_REG: usize = 244;
const FADT_OFF_SLEEP_STATUS_REG: usize = 256;
/// Generic Address Structure (§5.2.3.2): 12 bytes; address space 1 is system I/O; access
/// size 1 is byte access.
const GAS_LEN: usize = 12;
const GAS_SPACE_SYSTEM_IO: u8 = 1;
const GAS_ACCESS_BYTE: u8 = 1;
/// IA-PC boot architecture flags (§5.2.9.3): 8042 present, no VGA, no MSI, no CMOS RTC.
const IAPC_8042: u16 = 1 << 1;
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
/// FADT flags (§5.2.9, Table 5.10). PWR_BUTTON: the power button is a control-method device
/// (`\_SB.PWRB`), not the fixed feature; SLP_BUTTON: no fixed sleep button; RESET_REG_SUP:
/// RESET_REG and RESET_VALUE are valid; HW_REDUCED_ACPI: no PM1 blocks, GPEs or SCI to emulate
/// (the MADT/IOAPIC set-up relies on it).
const FADT_F_PWR_BUTTON: u32 = 1 << 4;
const FADT_F_SLP_BUTTON: u32 = 1 << 5;
const FADT_F_RESET_REG_SUP: u32 = 1 << 10;
const FADT_F_HW_REDUCED_ACPI: u32 = 1 << 20;

/// MADT (§5.2.12): flags PCAT_COMPAT (dual 8259 present), entry types and their flags.
const MADT_REVISION: u8 = 5;
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_TYPE_LOCAL_APIC: u8 = 0;
const MADT_TYPE_IO_APIC: u8 = 1;
const MADT_TYPE_LOCAL_APIC_NMI: u8 = 4;
const MADT_LAPIC_ENABLED: u32 = 1;
/// ACPI processor UID 0xff: all processors.
const MADT_ALL_PROCESSORS: u8 = 0xff;

const XSDT_REVISION: u8 = 1;
const DSDT_REVISION: u8 = 2;
const RSDP_REVISION: u8 = 2;
const RSDP_LEN: usize = 36;
/// The ACPI 1.0 checksum covers the first 20 bytes of the RSDP.
const RSDP_V1_LEN: usize = 20;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// A table: the common header, then `body`, checksummed.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let len = SDT_HEADER_LEN + body.len();
    let mut t = Vec::with_capacity(len);
    t.extend_from_slice(signature);
    t.extend_from_slice(&(len as u32).to_le_bytes());
    t.push(revision);
    t.push(0);
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&OEM_REVISION.to_le_bytes());
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&CREATOR_REVISION.to_le_bytes());
    t.extend_from_slice(body);
    t[SDT_CHECKSUM_OFFSET] = checksum(&t);
    t
}

fn madt(cpus: u8) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&APIC_DEFAULT_BASE.to_le_bytes());
    b.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for cpu in 0..cpus {
        b.extend_from_slice(&[MADT_TYPE_LOCAL_APIC, 8, cpu, cpu]);
        b.extend_from_slice(&MADT_LAPIC_ENABLED.to_le_bytes());
    }
    // I/O APIC id follows the local APIC ids, as in the MP table; GSI base 0.
    b.extend_from_slice(&[MADT_TYPE_IO_APIC, 12, cpus, 0]);
    b.extend_from_slice(&IOAPIC_DEFAULT_BASE.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    // LINT1 of every local APIC is NMI (flags 0: conforming polarity and trigger).
    b.extend_from_slice(&[MADT_TYPE_LOCAL_APIC_NMI, 6, MADT_ALL_PROCESSORS, 0, 0, 1]);
    sdt(b"APIC", MADT_REVISION, &b)
}

/// A one-byte I/O-port register as a Generic Address Structure (§5.2.3.2).
fn gas_io_byte(port: u16) -> [u8; GAS_LEN] {
    let mut g = [0u8; GAS_LEN];
    g[0] = GAS_SPACE_SYSTEM_IO;
    g[1] = 8; // register bit width
    g[2] = 0; // bit offset
    g[3] = GAS_ACCESS_BYTE;
    g[4..].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

fn fadt(dsdt_gpa: u64) -> Vec<u8> {
    let mut body = vec![0u8; FADT_LEN - SDT_HEADER_LEN];
    let at = |off: usize| off - SDT_HEADER_LEN;
    body[at(FADT_OFF_DSDT)..at(FADT_OFF_DSDT) + 4]
        .copy_from_slice(&(dsdt_gpa as u32).to_le_bytes());
    let iapc =
        IAPC_8042 | IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED | IAPC_CMOS_RTC_NOT_PRESENT;
    body[at(FADT_OFF_IAPC_BOOT_ARCH)..at(FADT_OFF_IAPC_BOOT_ARCH) + 2]
        .copy_from_slice(&iapc.to_le_bytes());
    let flags =
        FADT_F_PWR_BUTTON | FADT_F_SLP_BUTTON | FADT_F_RESET_REG_SUP | FADT_F_HW_REDUCED_ACPI;
    body[at(FADT_OFF_FLAGS)..at(FADT_OFF_FLAGS) + 4].copy_from_slice(&flags.to_le_bytes());
    for (off, port) in [
        (FADT_OFF_RESET_REG, RESET_PORT),
        (FADT_OFF_SLEEP_CONTROL_REG, SLEEP_CONTROL_PORT),
        (FADT_OFF_SLEEP_STATUS_REG, SLEEP_STATUS_PORT),
    ] {
        body[at(off)..at(off) + GAS_LEN].copy_from_slice(&gas_io_byte(port));
    }
    body[at(FADT_OFF_RESET_VALUE)] = RESET_VALUE;
    body[at(FADT_OFF_MINOR_VERSION)] = FADT_MINOR_VERSION;
    body[at(FADT_OFF_X_DSDT)..at(FADT_OFF_X_DSDT) + 8].copy_from_slice(&dsdt_gpa.to_le_bytes());
    sdt(b"FACP", FADT_REVISION, &body)
}

/// The DSDT's definition block:
///
/// ```text
/// Scope (\_SB) {
///     Device (PWRB) { Name (_HID, EisaId ("PNP0C0C")) Name (_UID, Zero) }
///     Device (GED) {
///         Name (_HID, "ACPI0013")
///         Name (_UID, Zero)
///         Name (_CRS, ResourceTemplate () {
///             Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { GED_GSI } })
///         Method (_EVT, 1) { If (Arg0 == GED_GSI) { Notify (\_SB.PWRB, 0x80) } }
///     }
/// }
/// Name (\_S5, Package () { S5_SLP_TYP, S5_SLP_TYP, Zero, Zero })
/// Scope (\_SB) {
///     Device (COM1) { Name (_HID, EisaId ("PNP0501")) Name (_UID, One)
///         Name (_CRS, ResourceTemplate () { IO (Decode16, 0x3F8, 0x3F8, 1, 8)
///             Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { 4 } }) }
///     Device (PS2K) { Name (_HID, EisaId ("PNP0303")) Name (_CRS, ResourceTemplate () {
///         IO (Decode16, 0x60, 0x60, 1, 1) IO (Decode16, 0x64, 0x64, 1, 1) Interrupt (...) { 1 } }) }
///     Device (PS2M) { Name (_HID, EisaId ("PNP0F13"))
///         Name (_CRS, ResourceTemplate () { Interrupt (...) { 12 } }) }
/// }
/// ```
///
/// COM1 and the i8042 are described because with hardware-reduced ACPI Linux sets up no legacy
/// ISA interrupts: a driver that asks for IRQ 4 by number gets nothing, and the tty on ttyS0
/// (interrupt-driven, unlike printk's console) never transmits. Described here, the ports'
/// interrupts are mapped through the IOAPIC by the PNP drivers (8250_pnp, i8042's PNP probe),
/// as on other hardware-reduced VMMs.
///
/// Linux's GED driver (`drivers/acpi/evged.c`) requests the `_CRS` interrupt and runs `_EVT`
/// with the GSI when it fires; the button driver turns the notification into KEY_POWER. `\_S5`
/// gives `acpi_power_off` the SLP_TYP it writes to the sleep control register (both values:
/// SLP_TYPa and SLP_TYPb, the second unused without a PM1b block).
fn dsdt_body(virtio: &[VirtioMmio]) -> Vec<u8> {
    use aml::{
        arg, device, eisa_id, if_, integer, interrupt, lequal, method, name, notify, package,
        resource_template, scope, string,
    };
    let pwrb = [name("_HID", &eisa_id("PNP0C0C")), name("_UID", &integer(0))].concat();
    let ged = [
        name("_HID", &string("ACPI0013")),
        name("_UID", &integer(0)),
        name(
            "_CRS",
            &resource_template(&[interrupt(GED_GSI, Trigger::Edge)]),
        ),
        method(
            "_EVT",
            1,
            &if_(
                &lequal(&arg(0), &integer(GED_GSI.into())),
                &notify("\\_SB.PWRB", &integer(POWER_BUTTON_NOTIFY.into())),
            ),
        ),
    ]
    .concat();
    let sb = scope(
        "\\_SB",
        &[device("PWRB", &pwrb), device("GED", &ged)].concat(),
    );
    let s5 = u64::from(S5_SLP_TYP);
    let sleep_s5 = name(
        "\\_S5",
        &package(&[integer(s5), integer(s5), integer(0), integer(0)]),
    );
    [sb, sleep_s5, legacy_devices(), virtio_devices(virtio)].concat()
}

/// A virtio-mmio device for the DSDT: its window and its interrupt line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmio {
    /// Guest-physical base of its register window.
    pub base: u32,
    /// The window's length.
    pub len: u32,
    /// Its GSI (an I/O APIC pin; edge-triggered, an irqfd).
    pub gsi: u32,
}

/// `\_SB.VR00`, `VR01`, ...: one virtio-mmio device each, `_HID "LNRO0005"` (the id Linux's
/// virtio_mmio driver matches, as Firecracker's and QEMU's ARM machines announce theirs), a
/// fixed memory window and an interrupt. On a hardware-reduced ACPI machine this is how the
/// kernel can take the interrupt: a line no table names has no mapping to request.
fn virtio_devices(virtio: &[VirtioMmio]) -> Vec<u8> {
    use aml::{device, integer, interrupt, memory32_fixed, name, resource_template, scope, string};
    if virtio.is_empty() {
        return Vec::new();
    }
    let devices: Vec<u8> = virtio
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let body = [
                name("_HID", &string("LNRO0005")),
                name("_UID", &integer(i as u64)),
                name(
                    "_CRS",
                    &resource_template(&[
                        memory32_fixed(v.base, v.len),
                        interrupt(v.gsi, Trigger::Edge),
                    ]),
                ),
            ]
            .concat();
            device(&format!("VR{i:02}"), &body)
        })
        .collect::<Vec<_>>()
        .concat();
    scope("\\_SB", &devices)
}

/// `\_SB.COM1`, `\_SB.PS2K` and `\_SB.PS2M` (see [`dsdt_body`]).
fn legacy_devices() -> Vec<u8> {
    use crate::devices::i8042::{I8042_COMMAND, I8042_DATA, KBD_IRQ, MOUSE_IRQ};
    use crate::devices::serial::{COM1_BASE, COM1_IRQ, COM1_LAST};
    use aml::{device, eisa_id, integer, interrupt, io_port, name, resource_template, scope};
    let com1 = [
        name("_HID", &eisa_id("PNP0501")),
        name("_UID", &integer(1)),
        name(
            "_CRS",
            &resource_template(&[
                io_port(COM1_BASE, (COM1_LAST - COM1_BASE + 1) as u8),
                interrupt(COM1_IRQ, Trigger::Edge),
            ]),
        ),
    ]
    .concat();
    let kbd = [
        name("_HID", &eisa_id("PNP0303")),
        name(
            "_CRS",
            &resource_template(&[
                io_port(I8042_DATA, 1),
                io_port(I8042_COMMAND, 1),
                interrupt(KBD_IRQ, Trigger::Edge),
            ]),
        ),
    ]
    .concat();
    let mouse = [
        name("_HID", &eisa_id("PNP0F13")),
        name(
            "_CRS",
            &resource_template(&[interrupt(MOUSE_IRQ, Trigger::Edge)]),
        ),
    ]
    .concat();
    scope(
        "\\_SB",
        &[
            device("COM1", &com1),
            device("PS2K", &kbd),
            device("PS2M", &mouse),
        ]
        .concat(),
    )
}

fn rsdp(xsdt_gpa: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(RSDP_LEN);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0); // checksum of the first 20 bytes
    r.extend_from_slice(OEM_ID);
    r.push(RSDP_REVISION);
    r.extend_from_slice(&0u32.to_le_bytes()); // no RSDT: XSDT only
    r.extend_from_slice(&(RSDP_LEN as u32).to_le_bytes());
    r.extend_from_slice(&xsdt_gpa.to_le_bytes());
    r.push(0); // extended checksum
    r.extend_from_slice(&[0; 3]);
    r[8] = checksum(&r[..RSDP_V1_LEN]);
    r[32] = checksum(&r);
    r
}

/// All tables laid out from [`RSDP_GPA`]: (gpa, bytes) pairs.
pub fn build(cpus: u8, virtio: &[VirtioMmio]) -> Vec<(u64, Vec<u8>)> {
    let align = |x: u64| x.next_multiple_of(8);
    let dsdt_gpa = TABLES_GPA;
    let dsdt = sdt(b"DSDT", DSDT_REVISION, &dsdt_body(virtio));
    let fadt_gpa = align(dsdt_gpa + dsdt.len() as u64);
    let fadt = fadt(dsdt_gpa);
    let madt_gpa = align(fadt_gpa + fadt.len() as u64);
    let madt = madt(cpus);
    let xsdt_gpa = align(madt_gpa + madt.len() as u64);
    let mut entries = Vec::new();
    for gpa in [fadt_gpa, madt_gpa] {
        entries.extend_from_slice(&gpa.to_le_bytes());
    }
    let xsdt = sdt(b"XSDT", XSDT_REVISION, &entries);
    vec![
        (RSDP_GPA, rsdp(xsdt_gpa)),
        (dsdt_gpa, dsdt),
        (fadt_gpa, fadt),
        (madt_gpa, madt),
        (xsdt_gpa, xsdt),
    ]
}

/// Writes the tables for `cpus` vCPUs and the `virtio` devices; returns the RSDP address for
/// the zero page.
pub fn setup(mem: &GuestMemoryMmap, cpus: u8, virtio: &[VirtioMmio]) -> Result<u64, ArchError> {
    if cpus == 0 || cpus > 254 {
        return Err(ArchError::TooManyCpus(cpus));
    }
    for (gpa, bytes) in build(cpus, virtio) {
        mem.write_slice(&bytes, GuestAddress(gpa))
            .map_err(|source| ArchError::GuestWrite {
                what: "ACPI table",
                gpa,
                source,
            })?;
    }
    Ok(RSDP_GPA)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_are_checksummed_and_linked() {
        let t = build(3, &[]);
        let (rsdp_gpa, rsdp) = &t[0];
        assert_eq!(*rsdp_gpa, RSDP_GPA);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(rsdp), 0);
        let xsdt_gpa = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let xsdt = &t.iter().find(|(g, _)| *g == xsdt_gpa).unwrap().1;
        assert_eq!(&xsdt[..4], b"XSDT");
        for (_, table) in &t[1..] {
            assert_eq!(sum(table), 0, "{:?}", std::str::from_utf8(&table[..4]));
            assert_eq!(
                u32::from_le_bytes(table[4..8].try_into().unwrap()) as usize,
                table.len()
            );
        }
        let pointed: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let sigs: Vec<&[u8]> = pointed
            .iter()
            .map(|g| &t.iter().find(|(x, _)| x == g).unwrap().1[..4])
            .collect();
        assert_eq!(sigs, vec![&b"FACP"[..], &b"APIC"[..]]);
        let madt = &t.iter().find(|(_, b)| &b[..4] == b"APIC").unwrap().1;
        let lapics = madt[44..]
            .chunks(8)
            .take_while(|e| e[0] == MADT_TYPE_LOCAL_APIC)
            .count();
        assert_eq!(lapics, 3);
        let fadt = &t.iter().find(|(_, b)| &b[..4] == b"FACP").unwrap().1;
        assert_eq!(fadt.len(), FADT_LEN);
        let dsdt = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        assert_eq!(&t.iter().find(|(g, _)| *g == dsdt).unwrap().1[..4], b"DSDT");
        assert!(
            t.iter().all(|(g, b)| g + b.len() as u64 <= 0x10_0000),
            "below 1 MiB"
        );
    }

    fn table(sig: &[u8; 4]) -> Vec<u8> {
        build(1, &[])
            .into_iter()
            .find(|(_, b)| &b[..4] == sig)
            .unwrap()
            .1
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    /// The FADT fields at the offsets of ACPI 6.5 Table 5.9, checked against literal offsets
    /// (not the constants) so that a wrong constant shows.
    #[test]
    fn fadt_has_the_reset_and_sleep_registers_of_a_hardware_reduced_platform() {
        let f = table(b"FACP");
        assert_eq!(f.len(), 276);
        assert_eq!(f[8], 6, "revision 6");
        assert_eq!(f[131], 5, "minor version 5");
        assert_eq!(sum(&f), 0);
        let flags = u32_at(&f, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        assert_ne!(flags & (1 << 4), 0, "PWR_BUTTON: a control-method button");
        assert_ne!(flags & (1 << 5), 0, "SLP_BUTTON: no fixed sleep button");
        let gas = |off: usize, port: u16| {
            let g = &f[off..off + 12];
            assert_eq!(g[0], 1, "system I/O at {off}");
            assert_eq!(g[1], 8, "8 bits wide at {off}");
            assert_eq!(g[2], 0, "bit offset 0 at {off}");
            assert_eq!(g[3], 1, "byte access at {off}");
            assert_eq!(
                u64::from_le_bytes(g[4..12].try_into().unwrap()),
                u64::from(port),
                "port at {off}"
            );
        };
        gas(116, RESET_PORT);
        assert_eq!(f[128], RESET_VALUE, "RESET_VALUE");
        gas(244, SLEEP_CONTROL_PORT);
        gas(256, SLEEP_STATUS_PORT);
        // No PM1/PM2/timer/GPE blocks, 32-bit or 64-bit: a hardware-reduced FADT has none.
        assert!(f[56..88].iter().all(|b| *b == 0), "PM1a..GPE1 blocks");
        assert!(f[148..244].iter().all(|b| *b == 0), "X_PM1a..X_GPE1 blocks");
        assert_eq!(u32_at(&f, 46) & 0xffff, 0, "no SCI");
    }

    fn hid_bytes(id: &[u8]) -> Vec<u8> {
        [b"\x08_HID".as_slice(), id].concat()
    }

    #[test]
    fn dsdt_has_s5_a_ged_a_power_button_com1_and_the_i8042() {
        let d = table(b"DSDT");
        assert_eq!(sum(&d), 0);
        assert_eq!(u32_at(&d, 4) as usize, d.len());
        let body = &d[36..];
        let find = |needle: &[u8]| body.windows(needle.len()).position(|w| w == needle);
        // Scope (\_SB) is first and its PkgLength ends exactly where Name (\_S5) starts.
        assert_eq!(&body[..1], &[0x10]);
        let (len, len_bytes) = match body[1] >> 6 {
            0 => (usize::from(body[1]), 1),
            1 => ((usize::from(body[2]) << 4) | usize::from(body[1] & 0xf), 2),
            n => panic!("unexpectedly large scope ({n} extra length bytes)"),
        };
        assert_eq!(&body[1 + len_bytes..1 + len_bytes + 5], b"\\_SB_");
        let s5 = &body[1 + len..];
        let s5_name = [
            0x08, b'\\', b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, S5_SLP_TYP, 0x0a,
            S5_SLP_TYP, 0x00, 0x00,
        ];
        assert_eq!(&s5[..s5_name.len()], &s5_name);
        // Then a second Scope (\_SB) with the legacy devices, to the end of the table.
        let legacy = &s5[s5_name.len()..];
        assert_eq!(legacy[0], 0x10, "ScopeOp");
        let legacy_len = (usize::from(legacy[2]) << 4) | usize::from(legacy[1] & 0xf);
        assert_eq!((legacy[1] >> 6, 1 + legacy_len), (1, legacy.len()));
        let com1 = [
            hid_bytes(&[0x0c, 0x41, 0xd0, 0x05, 0x01]).as_slice(), // EisaId ("PNP0501")
            b"\x08_UID\x01\x08_CRS\x11\x16\x0a\x13",
            &[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08], // IO 0x3f8, 8 ports
            &[0x89, 0x06, 0x00, 0x03, 0x01, 4, 0, 0, 0, 0x79, 0x00], // IRQ 4, edge, end
        ]
        .concat();
        assert!(find(&com1).is_some(), "COM1 with its ports and IRQ 4");
        assert!(
            find(&hid_bytes(&[0x0c, 0x41, 0xd0, 0x03, 0x03])).is_some(),
            "PNP0303"
        );
        assert!(
            find(&hid_bytes(&[0x0c, 0x41, 0xd0, 0x0f, 0x13])).is_some(),
            "PNP0F13"
        );
        assert!(
            find(&[0x89, 0x06, 0x00, 0x03, 0x01, 12, 0, 0, 0]).is_some(),
            "the mouse's IRQ 12"
        );
        let hid = hid_bytes;
        let pwrb = find(b"\x5b\x82").unwrap();
        assert_eq!(&body[pwrb + 3..pwrb + 7], b"PWRB");
        assert!(
            find(&hid(&[0x0c, 0x41, 0xd0, 0x0c, 0x0c])).unwrap() > pwrb,
            "PNP0C0C"
        );
        assert!(find(&hid(b"\x0dACPI0013\0")).is_some(), "GED _HID");
        let gsi = GED_GSI.to_le_bytes();
        let crs = [
            b"\x08_CRS\x11\x0e\x0a\x0b\x89\x06\x00\x03\x01".as_slice(),
            &gsi,
            b"\x79\x00",
        ]
        .concat();
        assert!(find(&crs).is_some(), "_CRS: one edge, active-high GSI");
        let evt = find(b"_EVT\x01").expect("_EVT with one argument");
        assert_eq!(body[evt - 2], 0x14, "MethodOp");
        let cmp = [0xa0, 18, 0x93, 0x68, 0x0a, GED_GSI as u8];
        assert_eq!(&body[evt + 5..evt + 11], &cmp, "If (Arg0 == GED_GSI)");
        assert_eq!(
            &body[evt + 11..evt + 24],
            b"\x86\\\x2e_SB_PWRB\x0a\x80",
            "Notify (\\_SB.PWRB, 0x80)"
        );
    }
}
