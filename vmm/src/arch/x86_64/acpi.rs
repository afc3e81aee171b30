//! Minimal ACPI tables (RSDP, XSDT, FADT, DSDT, MADT) so a kernel built without MP-table support
//! (Debian's cloud kernel has CONFIG_X86_MPPARSE off) still finds every vCPU and the I/O APIC.
//! Layouts from the ACPI Specification 6.5, chapter 5.2.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::mptable::{APIC_DEFAULT_BASE, IOAPIC_DEFAULT_BASE};
use super::ArchError;

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
const FADT_OFF_MINOR_VERSION: usize = 131;
const FADT_OFF_X_DSDT: usize = 140;
/// IA-PC boot architecture flags (§5.2.9.3): 8042 present, no VGA, no MSI, no CMOS RTC.
const IAPC_8042: u16 = 1 << 1;
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
/// FADT flags (§5.2.9, Table 5.10): hardware-reduced ACPI (no PM1 blocks to emulate).
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

fn fadt(dsdt_gpa: u64) -> Vec<u8> {
    let mut body = vec![0u8; FADT_LEN - SDT_HEADER_LEN];
    let at = |off: usize| off - SDT_HEADER_LEN;
    body[at(FADT_OFF_DSDT)..at(FADT_OFF_DSDT) + 4]
        .copy_from_slice(&(dsdt_gpa as u32).to_le_bytes());
    let iapc =
        IAPC_8042 | IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED | IAPC_CMOS_RTC_NOT_PRESENT;
    body[at(FADT_OFF_IAPC_BOOT_ARCH)..at(FADT_OFF_IAPC_BOOT_ARCH) + 2]
        .copy_from_slice(&iapc.to_le_bytes());
    body[at(FADT_OFF_FLAGS)..at(FADT_OFF_FLAGS) + 4]
        .copy_from_slice(&FADT_F_HW_REDUCED_ACPI.to_le_bytes());
    body[at(FADT_OFF_MINOR_VERSION)] = FADT_MINOR_VERSION;
    body[at(FADT_OFF_X_DSDT)..at(FADT_OFF_X_DSDT) + 8].copy_from_slice(&dsdt_gpa.to_le_bytes());
    sdt(b"FACP", FADT_REVISION, &body)
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
pub fn build(cpus: u8) -> Vec<(u64, Vec<u8>)> {
    let align = |x: u64| x.next_multiple_of(8);
    let dsdt_gpa = TABLES_GPA;
    let dsdt = sdt(b"DSDT", DSDT_REVISION, &[]);
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

/// Writes the tables for `cpus` vCPUs; returns the RSDP address for the zero page.
pub fn setup(mem: &GuestMemoryMmap, cpus: u8) -> Result<u64, ArchError> {
    if cpus == 0 || cpus > 254 {
        return Err(ArchError::TooManyCpus(cpus));
    }
    for (gpa, bytes) in build(cpus) {
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
        let t = build(3);
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
}
