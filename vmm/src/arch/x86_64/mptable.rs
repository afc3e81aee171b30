//! The Intel MultiProcessor Specification 1.4 table: how a guest kernel without ACPI finds its N
//! CPUs, the I/O APIC and the ISA interrupt wiring.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::error::ArchError;

/// Where the MP floating pointer goes: the start of the EBDA, which Linux scans (MP spec §4).
pub const MPTABLE_START: u64 = 0x9_fc00;
/// Local APIC MMIO base (Intel SDM Vol. 3A §11.4.1).
pub const APIC_DEFAULT_BASE: u32 = 0xfee0_0000;
/// I/O APIC MMIO base (82093AA datasheet; KVM's in-kernel IOAPIC sits here).
pub const IOAPIC_DEFAULT_BASE: u32 = 0xfec0_0000;
/// Pins of KVM's in-kernel I/O APIC.
const IOAPIC_PINS: u8 = 24;
/// ISA IRQs routed through the I/O APIC pins of the same number.
const ISA_IRQS: u8 = 16;

// MP spec 1.4 §4.1 / §4.2 / §4.3 structure constants.
const MPC_SPEC_REV: u8 = 4;
const MP_ENTRY_PROCESSOR: u8 = 0;
const MP_ENTRY_BUS: u8 = 1;
const MP_ENTRY_IOAPIC: u8 = 2;
const MP_ENTRY_IOINT: u8 = 3;
const MP_ENTRY_LINTSRC: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// Local APIC version of an integrated APIC (Intel SDM Vol. 3A §11.4.8).
const APIC_VERSION: u8 = 0x14;
/// I/O APIC version reported by KVM's IOAPIC.
const IOAPIC_VERSION: u8 = 0x11;
const MPC_APIC_USABLE: u8 = 1;
/// CPU signature: family 6 (MP spec Table 4-5).
const CPU_SIGNATURE_FAMILY6: u32 = 6 << 8;
/// Feature flags: FPU (bit 0) and on-chip APIC (bit 9), as CPUID.1:EDX.
const CPU_FEATURE_FPU_APIC: u32 = (1 << 0) | (1 << 9);
const MP_IRQ_TYPE_INT: u8 = 0;
const MP_IRQ_TYPE_NMI: u8 = 1;
const MP_IRQ_TYPE_EXTINT: u8 = 3;
/// Destination "all local APICs".
const MP_APIC_ALL: u8 = 0xff;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the MP floating pointer and configuration table for `cpus` CPUs to live at `start`.
pub fn build(cpus: u8, start: u64) -> Result<Vec<u8>, ArchError> {
    if cpus == 0 || cpus > 254 {
        return Err(ArchError::TooManyCpus(cpus));
    }
    let ioapic_id = cpus; // after the local APIC ids 0..cpus
    let table_addr = start + 16;
    let mut t: Vec<u8> = Vec::new();
    // Configuration table header (44 bytes), fields patched below.
    t.extend_from_slice(b"PCMP");
    t.extend_from_slice(&[0, 0]); // base table length
    t.push(MPC_SPEC_REV);
    t.push(0); // checksum
    t.extend_from_slice(b"RUSTVMM ");
    t.extend_from_slice(b"KVM-HUGEVMM ");
    t.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    t.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    t.extend_from_slice(&[0, 0]); // entry count
    t.extend_from_slice(&APIC_DEFAULT_BASE.to_le_bytes());
    t.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    t.push(0); // extended table checksum
    t.push(0);
    let mut entries: u16 = 0;
    for cpu in 0..cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        t.extend_from_slice(&[MP_ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        t.extend_from_slice(&CPU_SIGNATURE_FAMILY6.to_le_bytes());
        t.extend_from_slice(&CPU_FEATURE_FPU_APIC.to_le_bytes());
        t.extend_from_slice(&[0; 8]);
        entries += 1;
    }
    t.extend_from_slice(&[MP_ENTRY_BUS, 0]);
    t.extend_from_slice(b"ISA   ");
    entries += 1;
    t.extend_from_slice(&[MP_ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, MPC_APIC_USABLE]);
    t.extend_from_slice(&IOAPIC_DEFAULT_BASE.to_le_bytes());
    entries += 1;
    for irq in 0..ISA_IRQS.min(IOAPIC_PINS) {
        // type, irq type, flags (conforming polarity/trigger), source bus, source IRQ,
        // destination I/O APIC, destination pin.
        t.extend_from_slice(&[
            MP_ENTRY_IOINT,
            MP_IRQ_TYPE_INT,
            0,
            0,
            0,
            irq,
            ioapic_id,
            irq,
        ]);
        entries += 1;
    }
    t.extend_from_slice(&[
        MP_ENTRY_LINTSRC,
        MP_IRQ_TYPE_EXTINT,
        0,
        0,
        0,
        0,
        MP_APIC_ALL,
        0,
    ]);
    t.extend_from_slice(&[
        MP_ENTRY_LINTSRC,
        MP_IRQ_TYPE_NMI,
        0,
        0,
        0,
        0,
        MP_APIC_ALL,
        1,
    ]);
    entries += 2;
    let len = t.len() as u16;
    t[4..6].copy_from_slice(&len.to_le_bytes());
    t[34..36].copy_from_slice(&entries.to_le_bytes());
    t[7] = checksum(&t);

    let mut fp = Vec::with_capacity(16 + t.len());
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.push(1); // length in 16-byte paragraphs
    fp.push(MPC_SPEC_REV);
    fp.push(0); // checksum
    fp.extend_from_slice(&[0; 5]); // feature bytes: 0 = configuration table present
    fp[10] = checksum(&fp[..16]);
    fp.extend_from_slice(&t);
    Ok(fp)
}

/// Writes the MP table for `cpus` CPUs at [`MPTABLE_START`].
pub fn setup(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), ArchError> {
    let bytes = build(cpus, MPTABLE_START)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(|source| ArchError::GuestWrite {
            what: "MP table",
            gpa: MPTABLE_START,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_checksummed_and_lists_every_cpu() {
        let b = build(4, MPTABLE_START).unwrap();
        assert_eq!(&b[0..4], b"_MP_");
        assert_eq!(checksum(&b[..16]), 0, "floating pointer sums to 0");
        assert_eq!(
            u32::from_le_bytes(b[4..8].try_into().unwrap()) as u64,
            MPTABLE_START + 16
        );
        let t = &b[16..];
        assert_eq!(&t[0..4], b"PCMP");
        let len = u16::from_le_bytes([t[4], t[5]]) as usize;
        assert_eq!(len, t.len());
        assert_eq!(
            t.iter().fold(0u8, |a, x| a.wrapping_add(*x)),
            0,
            "table sums to 0"
        );
        let count = u16::from_le_bytes([t[34], t[35]]);
        assert_eq!(count, 4 + 1 + 1 + 16 + 2);
        // Processor entries: APIC ids 0..4, BSP flag only on the first.
        for cpu in 0..4usize {
            let e = &t[44 + cpu * 20..];
            assert_eq!((e[0], e[1]), (MP_ENTRY_PROCESSOR, cpu as u8));
            assert_eq!(e[3] & CPU_BOOTPROCESSOR != 0, cpu == 0);
        }
        assert!(build(0, MPTABLE_START).is_err());
        assert!(build(255, MPTABLE_START).is_err());
    }
}
