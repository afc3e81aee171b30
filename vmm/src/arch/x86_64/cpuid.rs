//! CPUID for one vCPU: KVM's supported table with the hypervisor bit and the topology (APIC id,
//! logical processor counts, leaves 0x4 / 0xB / 0x1F) made true for this VM's vCPU count.

use kvm_bindings::CpuId;

// Leaves and bits: Intel SDM Vol. 2A, CPUID instruction reference.
const LEAF_VENDOR: u32 = 0x0;
const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;
/// Leaf 1 ECX bit 31: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bit 28: HTT, EBX[23:16] is valid.
const EDX_HTT: u32 = 1 << 28;
/// Leaf 1 EBX: initial APIC id in bits 31:24, logical processor count in bits 23:16.
const EBX_APIC_ID_SHIFT: u32 = 24;
const EBX_LOGICAL_COUNT_SHIFT: u32 = 16;
const EBX_LOGICAL_COUNT_MASK: u32 = 0xff << EBX_LOGICAL_COUNT_SHIFT;
/// Leaf 4 EAX: cores per package - 1 in bits 31:26, threads sharing the cache - 1 in 25:14,
/// cache level in bits 7:5.
const EAX_CORES_SHIFT: u32 = 26;
const EAX_SHARING_SHIFT: u32 = 14;
const EAX_CORES_SHARING_MASK: u32 = !((1 << EAX_SHARING_SHIFT) - 1);
const EAX_CACHE_LEVEL_SHIFT: u32 = 5;
/// Leaf 0xB/0x1F ECX bits 15:8: level type (1 = SMT, 2 = core).
const LEVEL_TYPE_SHIFT: u32 = 8;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;
/// "AuthenticAMD" EBX.
const VENDOR_AMD_EBX: u32 = 0x6874_7541;

/// Number of APIC-id bits needed to number `cpus` cores.
fn core_bits(cpus: u8) -> u32 {
    u32::from(cpus.max(1)).next_power_of_two().trailing_zeros()
}

/// Returns the CPUID table for vCPU `id` of a VM with `cpus` vCPUs (one thread per core, one
/// package), derived from KVM's supported table.
pub fn filter(supported: &CpuId, id: u8, cpus: u8) -> Result<CpuId, String> {
    let mut out = supported.clone();
    let amd = out
        .as_slice()
        .iter()
        .any(|e| e.function == LEAF_VENDOR && e.ebx == VENDOR_AMD_EBX);
    let apic_id = u32::from(id);
    let n = u32::from(cpus);
    for e in out.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                e.ecx |= ECX_HYPERVISOR;
                e.ebx = (e.ebx & !(0xff << EBX_APIC_ID_SHIFT) & !EBX_LOGICAL_COUNT_MASK)
                    | (apic_id << EBX_APIC_ID_SHIFT)
                    | (n << EBX_LOGICAL_COUNT_SHIFT);
                if cpus > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS if e.eax != 0 => {
                let level = (e.eax >> EAX_CACHE_LEVEL_SHIFT) & 0x7;
                // L1 and L2 are per core; the last level is shared by the package.
                let sharing = if level >= 3 { n - 1 } else { 0 };
                e.eax = (e.eax & !EAX_CORES_SHARING_MASK)
                    | ((n - 1) << EAX_CORES_SHIFT)
                    | (sharing << EAX_SHARING_SHIFT);
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (LEVEL_TYPE_SMT << LEVEL_TYPE_SHIFT) | e.index;
                    }
                    1 => {
                        e.eax = core_bits(cpus);
                        e.ebx = n;
                        e.ecx = (LEVEL_TYPE_CORE << LEVEL_TYPE_SHIFT) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            LEAF_AMD_SIZE_IDS if amd => {
                // ECX[7:0] NC = cores - 1, ECX[15:12] ApicIdCoreIdSize (AMD APM Vol. 3, E.4.7).
                e.ecx = (e.ecx & !0xf0ff) | (n - 1) | (core_bits(cpus) << 12);
            }
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    #[test]
    fn topology_matches_vcpu_count() {
        let base = CpuId::from_entries(&[
            entry(LEAF_FEATURES, 0, 0x806f8, 0x0001_0800, 0, 0),
            entry(LEAF_CACHE_PARAMS, 0, 0x121, 0, 0, 0),
            entry(LEAF_CACHE_PARAMS, 3, 0x163, 0, 0, 0),
            entry(LEAF_EXT_TOPOLOGY, 0, 1, 1, 0x100, 0),
            entry(LEAF_EXT_TOPOLOGY, 1, 7, 64, 0x201, 0),
            entry(LEAF_EXT_TOPOLOGY, 2, 0, 0, 2, 0),
        ])
        .unwrap();
        let c = filter(&base, 3, 4).unwrap();
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 3);
        assert_eq!((s[0].ebx >> 16) & 0xff, 4);
        assert_eq!(s[0].ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(s[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(s[0].edx & EDX_HTT, 0);
        assert_eq!(s[1].eax >> 26, 3);
        assert_eq!((s[1].eax >> 14) & 0xfff, 0, "L1 not shared");
        assert_eq!((s[2].eax >> 14) & 0xfff, 3, "L3 shared by all");
        assert_eq!(s[1].eax & 0x3fff, 0x121, "cache type/level kept");
        assert_eq!((s[3].eax, s[3].ebx, s[3].ecx, s[3].edx), (0, 1, 0x100, 3));
        assert_eq!((s[4].eax, s[4].ebx, s[4].ecx, s[4].edx), (2, 4, 0x201, 3));
        assert_eq!((s[5].eax, s[5].ebx, s[5].ecx), (0, 0, 2));
        let one = filter(&base, 0, 1).unwrap();
        assert_eq!(one.as_slice()[0].edx & EDX_HTT, 0);
        assert_eq!(core_bits(1), 0);
        assert_eq!(core_bits(3), 2);
    }
}
