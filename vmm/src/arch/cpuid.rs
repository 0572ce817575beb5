//! The CPUID the guest sees: KVM's supported set, minus the entries [`dropped`] names,
//! filtered through [`TEMPLATE`], then the per-vCPU topology fields. Anything not named
//! here passes through as KVM reports it.
//!
//! | Leaf                | What the guest gets                                              |
//! |---------------------|------------------------------------------------------------------|
//! | 1, 6, 7, 0xa        | [`TEMPLATE`] rows: paravirt bits set, host-only features masked  |
//! | 7.0 EDX, 7.1, 0xd.0 | AMX masked: no AMX feature bits, XTILECFG/XTILEDATA not in XCR0  |
//! | 0xd.17, 0xd.18      | dropped: the AMX XSAVE components                                |
//! | 0x1d, 0x1e          | zeroed: AMX tile and TMUL descriptions                           |
//! | 0x8000_0001 ECX     | SVM and TOPOEXT masked                                           |
//! | 1 EBX, EDX          | APIC id, vCPU count, CLFLUSH size; HTT when more than one vCPU   |
//! | 4                   | one package of N cores: L1/L2 private, L3 shared by all N        |
//! | 0xb                 | replaced by [`ext_topology`]: SMT level of 1, core level of N    |
//! | 0x1f                | dropped, so the guest reads 0xb                                  |
//! | 0x8000_0008 ECX     | NC = N - 1 cores, ApicIdSize 0 (derived from NC)                 |
//!
//! The topology is one socket of N cores, one thread per core; vCPU `i` has APIC id `i`.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// A CPUID output register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// What the template does to some bits of one register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Clear these bits: a feature the VM does not offer.
    Mask(u32),
    /// Set these bits: a feature the VMM provides itself.
    Set(u32),
    /// Zero the whole register: a leaf that would describe host hardware.
    Zero,
}

/// One row of the template.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    pub leaf: u32,
    /// `None` applies to every subleaf.
    pub subleaf: Option<u32>,
    pub reg: Reg,
    pub op: Op,
}

const fn rule(leaf: u32, subleaf: Option<u32>, reg: Reg, op: Op) -> Rule {
    Rule {
        leaf,
        subleaf,
        reg,
        op,
    }
}

use Op::{Mask, Set, Zero};
use Reg::{Eax, Ebx, Ecx, Edx};

// Leaves handled outside the template.
const LEAF_CACHE_PARAMS: u32 = 4;
const LEAF_XSAVE: u32 = 0xd;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;

// Leaf 7.0 EDX / 7.1: AMX features.
const AMX_BF16: u32 = 1 << 22;
const AMX_TILE: u32 = 1 << 24;
const AMX_INT8: u32 = 1 << 25;
const AMX_FP16: u32 = 1 << 21; // 7.1 EAX
const AMX_COMPLEX: u32 = 1 << 8; // 7.1 EDX

// XSAVE state components (leaf 0xd.0 EAX bit, and the 0xd subleaf that sizes them).
const XFEATURE_XTILECFG: u32 = 17;
const XFEATURE_XTILEDATA: u32 = 18;

// Leaf 0x8000_0001 ECX.
const SVM: u32 = 1 << 2;
const TOPOEXT: u32 = 1 << 22;

// Leaf 0xb ECX[15:8]: level type.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// The CPUID template. Passed (absent here): vendor, family/model, the ISA extensions of
/// leaves 1, 7 and 0x8000_0001 that KVM supports (less the ones masked below), the KVM
/// paravirt leaves 0x4000_00xx (kvmclock, so the guest need not calibrate the TSC),
/// address sizes.
pub const TEMPLATE: &[Rule] = &[
    // Leaf 1 ECX.
    rule(1, None, Ecx, Set(1 << 31)), // hypervisor: makes the guest look for the KVM leaves
    rule(1, None, Ecx, Set(1 << 24)), // TSC-deadline: the in-kernel LAPIC emulates it
    rule(1, None, Ecx, Mask(1 << 2)), // DTES64: no debug store
    rule(1, None, Ecx, Mask(1 << 3)), // MONITOR/MWAIT: idle is HLT, not an exit storm
    rule(1, None, Ecx, Mask(1 << 4)), // DS-CPL: no debug store
    rule(1, None, Ecx, Mask(1 << 5)), // VMX: no nested virtualization
    rule(1, None, Ecx, Mask(1 << 7)), // EST: no host power management
    rule(1, None, Ecx, Mask(1 << 8)), // TM2: no thermal monitor
    rule(1, None, Ecx, Mask(1 << 15)), // PDCM: no perf capabilities MSR
    // Leaf 1 EDX.
    rule(1, None, Edx, Mask(1 << 21)), // DS: no debug store
    rule(1, None, Edx, Mask(1 << 22)), // ACPI thermal MSRs: none
    rule(1, None, Edx, Mask(1 << 27)), // SS: no self-snoop claim
    rule(1, None, Edx, Mask(1 << 29)), // TM: no thermal monitor
    // Leaf 6: thermal and power management describe the host; the guest has none.
    rule(6, None, Eax, Zero),
    // ...except ARAT: KVM's LAPIC timer (an hrtimer) never stops in idle. Without the bit
    // Linux wants a broadcast timer, and with hardware-reduced ACPI there is none (no PIT,
    // no HPET): it would stay on a periodic tick with jiffy-resolution timers.
    rule(6, None, Eax, Set(1 << 2)),
    rule(6, None, Ebx, Zero),
    rule(6, None, Ecx, Zero),
    rule(6, None, Edx, Zero),
    // Leaf 7.0 EBX/ECX.
    rule(7, Some(0), Ebx, Mask(1 << 4)), // HLE: TSX is a side-channel liability
    rule(7, Some(0), Ebx, Mask(1 << 11)), // RTM: same
    rule(7, Some(0), Ecx, Mask(1 << 5)), // WAITPKG: UMWAIT would idle outside our control
    // AMX: not needed in a microVM, and on host kernels 5.17-6.3 KVM can report XTILECFG
    // without XTILEDATA unless the VMM asked for guest AMX permission; a guest that sets
    // that XCR0 takes #GP in FPU init. So no AMX at all: features, XCR0 bits, leaves.
    rule(7, Some(0), Edx, Mask(AMX_BF16 | AMX_TILE | AMX_INT8)),
    rule(7, Some(1), Eax, Mask(AMX_FP16)),
    rule(7, Some(1), Edx, Mask(AMX_COMPLEX)),
    rule(
        LEAF_XSAVE,
        Some(0),
        Eax,
        Mask((1 << XFEATURE_XTILECFG) | (1 << XFEATURE_XTILEDATA)),
    ),
    rule(0x1d, None, Eax, Zero), // tile palettes
    rule(0x1d, None, Ebx, Zero),
    rule(0x1d, None, Ecx, Zero),
    rule(0x1d, None, Edx, Zero),
    rule(0x1e, None, Eax, Zero), // TMUL
    rule(0x1e, None, Ebx, Zero),
    rule(0x1e, None, Ecx, Zero),
    rule(0x1e, None, Edx, Zero),
    // Leaf 0xa: architectural PMU. No vPMU is configured.
    rule(0xa, None, Eax, Zero),
    rule(0xa, None, Ebx, Zero),
    rule(0xa, None, Ecx, Zero),
    rule(0xa, None, Edx, Zero),
    // Leaf 0x8000_0001 ECX (AMD).
    rule(0x8000_0001, None, Ecx, Mask(SVM)), // no nested virtualization, as VMX
    // TOPOEXT would make Linux read the core id from 0x8000_001e, which KVM zeroes: every
    // vCPU would be core 0. Without it Linux uses 0x8000_0008 and the APIC ids.
    rule(0x8000_0001, None, Ecx, Mask(TOPOEXT)),
];

/// The width of the guest-physical addresses a VM on this CPUID can use: leaf
/// 0x8000_0008 EAX bits 23:16 (GuestPhysBits, the most KVM can map under two-level
/// paging, set by newer KVMs) where non-zero, else bits 7:0 (the physical address
/// width the guest is told). Without the leaf the SDM's default, 36 bits.
pub fn guest_phys_bits(cpuid: &CpuId) -> u8 {
    const SDM_DEFAULT: u8 = 36;
    let Some(sizes) = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == LEAF_AMD_SIZES)
    else {
        return SDM_DEFAULT;
    };
    match ((sizes.eax >> 16) as u8, sizes.eax as u8) {
        (0, 0) => SDM_DEFAULT,
        (0, phys) => phys,
        (guest, _) => guest,
    }
}

/// Entries removed from KVM's set before the template runs.
pub fn dropped(entry: &kvm_cpuid_entry2) -> bool {
    match entry.function {
        // The AMX XSAVE components: their XCR0 bits are masked.
        LEAF_XSAVE => matches!(entry.index, XFEATURE_XTILECFG | XFEATURE_XTILEDATA),
        // V2 extended topology would describe the host (dies, modules); Linux prefers it
        // to 0xb when present, so without it the guest reads our 0xb.
        LEAF_V2_EXT_TOPOLOGY => true,
        // Rebuilt in full by `ext_topology`: KVM may report only some subleaves.
        LEAF_EXT_TOPOLOGY => true,
        _ => false,
    }
}

/// Bits needed to number `count` cores: ceil(log2(count)), 0 for one.
fn core_id_shift(count: u8) -> u32 {
    u32::from(count.max(1)).next_power_of_two().trailing_zeros()
}

/// Leaf 0xb for vCPU `index` of `count`: subleaf 0 is the SMT level (one thread per
/// core), subleaf 1 the core level (`count` cores), subleaf 2 the invalid level that ends
/// the enumeration. KVM answers higher subleaves like subleaf 2 from subleaf 1's EDX.
pub fn ext_topology(index: u8, count: u8) -> [kvm_cpuid_entry2; 3] {
    let level = |subleaf: u32, shift: u32, logical: u32, level_type: u32| kvm_cpuid_entry2 {
        function: LEAF_EXT_TOPOLOGY,
        index: subleaf,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax: shift,
        ebx: logical,
        ecx: (level_type << 8) | subleaf,
        edx: u32::from(index), // x2APIC id
        ..Default::default()
    };
    [
        level(0, 0, 1, LEVEL_TYPE_SMT),
        level(1, core_id_shift(count), u32::from(count), LEVEL_TYPE_CORE),
        level(2, 0, 0, 0),
    ]
}

/// Applies [`dropped`], [`TEMPLATE`] and the topology of vCPU `index` of `count` to
/// `cpuid`.
pub fn filter(cpuid: &mut CpuId, index: u8, count: u8) {
    // Leaf 0xb is rebuilt only where KVM reports it: its absence means the max basic
    // leaf is below 0xb (older AMD hosts), and an entry past the max is never read.
    let has_ext_topology = cpuid
        .as_slice()
        .iter()
        .any(|e| e.function == LEAF_EXT_TOPOLOGY);
    cpuid.retain(|e| !dropped(e));
    let others = u32::from(count.max(1)) - 1; // vCPUs besides this one
    for entry in cpuid.as_mut_slice() {
        for r in TEMPLATE {
            if r.leaf != entry.function || r.subleaf.is_some_and(|s| s != entry.index) {
                continue;
            }
            let reg = match r.reg {
                Eax => &mut entry.eax,
                Ebx => &mut entry.ebx,
                Ecx => &mut entry.ecx,
                Edx => &mut entry.edx,
            };
            match r.op {
                Mask(bits) => *reg &= !bits,
                Set(bits) => *reg |= bits,
                Zero => *reg = 0,
            }
        }
        // Computed per vCPU, not template rows: they depend on the VM's shape.
        match entry.function {
            1 => {
                // EBX: APIC id (31:24), logical processors (23:16), CLFLUSH line in
                // 8-byte units (15:8).
                entry.ebx = (u32::from(index) << 24) | (u32::from(count) << 16) | (8 << 8);
                if count > 1 {
                    entry.edx |= 1 << 28; // HTT: more than one logical processor
                }
            }
            // A null descriptor (cache type EAX[4:0] == 0) ends the list; leave it zero.
            LEAF_CACHE_PARAMS if entry.eax & 0x1f != 0 => {
                // EAX 31:26: cores per package - 1; one package holds every vCPU.
                entry.eax = (entry.eax & 0x03ff_ffff) | (others << 26);
                // EAX 25:14: logical processors sharing this cache - 1. With one thread
                // per core, L1 and L2 (level EAX[7:5]) are private; L3 is package-wide.
                let sharing = match (entry.eax >> 5) & 0x7 {
                    1 | 2 => 0,
                    _ => others,
                };
                entry.eax = (entry.eax & !(0xfff << 14)) | (sharing << 14);
            }
            LEAF_AMD_SIZES => {
                // ECX 7:0 NC: cores per package - 1; 15:12 ApicIdSize: 0 means "derive the
                // core id width from NC", which matches our dense APIC ids.
                entry.ecx = (entry.ecx & !0xf0ff) | others;
            }
            _ => {}
        }
    }
    if has_ext_topology {
        for e in ext_topology(index, count) {
            // Only fails at KVM_MAX_CPUID_ENTRIES; the entries dropped above make room.
            if cpuid.push(e).is_err() {
                log::warn!("CPUID table full: leaf 0xb.{} left out", e.index);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: !0,
            ebx: !0,
            ecx: !0,
            edx: !0,
            ..Default::default()
        }
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> Option<kvm_cpuid_entry2> {
        cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .copied()
    }

    #[test]
    fn template_masks_sets_and_computes_topology() {
        let mut cpuid =
            CpuId::from_entries(&[entry(1, 0), entry(6, 0), entry(7, 0), entry(7, 1)]).unwrap();
        filter(&mut cpuid, 2, 4);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ecx & (1 << 5), 0, "VMX masked");
        assert_ne!(e[0].ecx & (1 << 31), 0, "hypervisor bit set");
        assert_eq!(e[0].ebx >> 24, 2, "APIC id");
        assert_eq!((e[0].ebx >> 16) & 0xff, 4, "logical count");
        assert_eq!((e[1].eax, e[1].edx), (1 << 2, 0), "leaf 6 zeroed but ARAT");
        assert_eq!(e[2].ebx & (1 << 11), 0, "RTM masked on 7.0");
        assert_eq!(e[3].ebx, !0, "7.1 untouched");
    }

    #[test]
    fn leaf_6_keeps_only_arat() {
        let mut cpuid = CpuId::from_entries(&[entry(6, 0)]).unwrap();
        filter(&mut cpuid, 0, 1);
        let e = find(&cpuid, 6, 0).unwrap();
        assert_eq!((e.eax, e.ebx, e.ecx, e.edx), (1 << 2, 0, 0, 0));
    }

    #[test]
    fn amx_is_masked_and_its_leaves_gone() {
        let mut cpuid = CpuId::from_entries(&[
            entry(7, 0),
            entry(7, 1),
            entry(0xd, 0),
            entry(0xd, 1),
            entry(0xd, 2),
            entry(0xd, 17),
            entry(0xd, 18),
            entry(0x1d, 0),
            entry(0x1d, 1),
            entry(0x1e, 0),
        ])
        .unwrap();
        filter(&mut cpuid, 0, 1);
        let l7 = find(&cpuid, 7, 0).unwrap();
        assert_eq!(l7.edx & (AMX_BF16 | AMX_TILE | AMX_INT8), 0);
        assert_eq!(
            l7.edx | AMX_BF16 | AMX_TILE | AMX_INT8,
            !0,
            "other 7.0 EDX bits kept"
        );
        let l7_1 = find(&cpuid, 7, 1).unwrap();
        assert_eq!((l7_1.eax & AMX_FP16, l7_1.edx & AMX_COMPLEX), (0, 0));
        let xsave = find(&cpuid, 0xd, 0).unwrap();
        assert_eq!(
            xsave.eax & (0b11 << 17),
            0,
            "XTILECFG/XTILEDATA not in XCR0"
        );
        assert_eq!(xsave.eax | (0b11 << 17), !0, "other XCR0 bits kept");
        assert!(find(&cpuid, 0xd, 17).is_none() && find(&cpuid, 0xd, 18).is_none());
        assert_eq!(find(&cpuid, 0xd, 2).unwrap().eax, !0, "AVX component kept");
        for (leaf, sub) in [(0x1d, 0), (0x1d, 1), (0x1e, 0)] {
            let e = find(&cpuid, leaf, sub).unwrap();
            assert_eq!(
                (e.eax, e.ebx, e.ecx, e.edx),
                (0, 0, 0, 0),
                "{leaf:#x}.{sub}"
            );
        }
    }

    #[test]
    fn leaf_0xb_is_rebuilt_and_0x1f_dropped() {
        // KVM reported only subleaf 0 of 0xb, with host values, and a 0x1f.
        let mut kvm_0xb = entry(0xb, 0);
        kvm_0xb.flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        let mut cpuid =
            CpuId::from_entries(&[entry(1, 0), kvm_0xb, entry(0x1f, 0), entry(0x1f, 1)]).unwrap();
        filter(&mut cpuid, 3, 6);
        assert!(find(&cpuid, 0x1f, 0).is_none() && find(&cpuid, 0x1f, 1).is_none());
        let subleaves: Vec<_> = cpuid
            .as_slice()
            .iter()
            .filter(|e| e.function == 0xb)
            .collect();
        assert_eq!(subleaves.len(), 3, "one entry per subleaf");
        let regs = |s| {
            let e = find(&cpuid, 0xb, s).unwrap();
            assert_eq!(e.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
            (e.eax, e.ebx, e.ecx, e.edx)
        };
        assert_eq!(regs(0), (0, 1, 1 << 8, 3), "SMT level");
        assert_eq!(
            regs(1),
            (3, 6, (2 << 8) | 1, 3),
            "core level: 6 cores need 3 bits"
        );
        assert_eq!(regs(2), (0, 0, 2, 3), "invalid level");
    }

    #[test]
    fn leaf_0xb_absent_stays_absent() {
        let mut cpuid = CpuId::from_entries(&[entry(1, 0)]).unwrap();
        filter(&mut cpuid, 0, 2);
        assert!(find(&cpuid, 0xb, 0).is_none());
    }

    #[test]
    fn core_id_shift_is_ceil_log2() {
        let shifts: Vec<_> = [1, 2, 3, 4, 5, 8, 9, 255].map(core_id_shift).to_vec();
        assert_eq!(shifts, [0, 1, 2, 2, 3, 3, 4, 8]);
        assert_eq!(ext_topology(0, 1)[1].eax, 0);
    }

    #[test]
    fn leaf_4_cache_sharing() {
        // EAX: cache type 1/2/3 in 4:0, level in 7:5, host sharing/core fields set.
        let cache = |index, level: u32, ty: u32| kvm_cpuid_entry2 {
            function: 4,
            index,
            eax: (0x3f << 26) | (0xfff << 14) | (level << 5) | ty,
            ..Default::default()
        };
        let mut cpuid = CpuId::from_entries(&[
            cache(0, 1, 1),
            cache(1, 1, 2),
            cache(2, 2, 3),
            cache(3, 3, 3),
            kvm_cpuid_entry2 {
                function: 4,
                index: 4,
                ..Default::default()
            },
        ])
        .unwrap();
        filter(&mut cpuid, 1, 4);
        let e = cpuid.as_slice();
        let sharing = |i: usize| (e[i].eax >> 14) & 0xfff;
        let cores = |i: usize| e[i].eax >> 26;
        assert_eq!(
            [sharing(0), sharing(1), sharing(2)],
            [0, 0, 0],
            "L1/L2 private"
        );
        assert_eq!(sharing(3), 3, "L3 shared by all 4");
        assert!((0..4).all(|i| cores(i) == 3), "4 cores per package");
        assert_eq!(e[3].eax & 0x3fff, (3 << 5) | 3, "type and level kept");
        assert_eq!(e[4].eax, 0, "null descriptor untouched");
    }

    #[test]
    fn amd_svm_topoext_and_core_count() {
        let mut cpuid =
            CpuId::from_entries(&[entry(0x8000_0001, 0), entry(0x8000_0008, 0)]).unwrap();
        filter(&mut cpuid, 0, 8);
        let ext = find(&cpuid, 0x8000_0001, 0).unwrap();
        assert_eq!(ext.ecx & (SVM | TOPOEXT), 0);
        assert_eq!(ext.ecx | SVM | TOPOEXT, !0, "other bits kept");
        let sizes = find(&cpuid, 0x8000_0008, 0).unwrap();
        assert_eq!(sizes.ecx & 0xff, 7, "NC = 8 cores - 1");
        assert_eq!((sizes.ecx >> 12) & 0xf, 0, "ApicIdSize derived from NC");
        assert_eq!(sizes.ecx | 0xf0ff, !0, "other bits kept");
        assert_eq!((sizes.eax, sizes.edx), (!0, !0), "address sizes untouched");
    }

    #[test]
    fn guest_phys_bits_prefer_what_kvm_can_map() {
        let with_eax = |eax| {
            let sizes = kvm_cpuid_entry2 {
                function: LEAF_AMD_SIZES,
                eax,
                ..Default::default()
            };
            CpuId::from_entries(&[entry(1, 0), sizes]).unwrap()
        };
        // A 46-bit host (this development machine), 57-bit virtual.
        assert_eq!(guest_phys_bits(&with_eax(0x392e)), 46);
        // A 52-bit CPU whose KVM can map only 48 bits with 4-level EPT/NPT.
        assert_eq!(guest_phys_bits(&with_eax(0x30_3934)), 48);
        assert_eq!(
            guest_phys_bits(&with_eax(0)),
            36,
            "an empty leaf: the default"
        );
        let without = CpuId::from_entries(&[entry(1, 0)]).unwrap();
        assert_eq!(guest_phys_bits(&without), 36, "no leaf: the SDM's default");
    }
}
