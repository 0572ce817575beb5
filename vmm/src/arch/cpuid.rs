//! The CPUID the guest sees: KVM's supported set filtered through [`TEMPLATE`], then the
//! per-vCPU topology fields. Anything not named in the template passes through as KVM
//! reports it.

use kvm_bindings::CpuId;

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

/// The CPUID template. Passed (absent here): vendor, family/model, the ISA extensions of
/// leaves 1, 7 and 0x8000_0001 that KVM supports, the KVM paravirt leaves 0x4000_00xx
/// (kvmclock, so the guest need not calibrate the TSC), address sizes.
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
    rule(6, None, Ebx, Zero),
    rule(6, None, Ecx, Zero),
    rule(6, None, Edx, Zero),
    // Leaf 7.0 EBX/ECX.
    rule(7, Some(0), Ebx, Mask(1 << 4)), // HLE: TSX is a side-channel liability
    rule(7, Some(0), Ebx, Mask(1 << 11)), // RTM: same
    rule(7, Some(0), Ecx, Mask(1 << 5)), // WAITPKG: UMWAIT would idle outside our control
    // Leaf 0xa: architectural PMU. No vPMU is configured.
    rule(0xa, None, Eax, Zero),
    rule(0xa, None, Ebx, Zero),
    rule(0xa, None, Ecx, Zero),
    rule(0xa, None, Edx, Zero),
];

/// Applies [`TEMPLATE`] and the topology of vCPU `index` of `count` to `cpuid`.
pub fn filter(cpuid: &mut CpuId, index: u8, count: u8) {
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
            4 => {
                // EAX 31:26: cores per package - 1; one package holds every vCPU.
                entry.eax = (entry.eax & 0x03ff_ffff) | ((u32::from(count) - 1) << 26);
                // EAX 25:14: logical processors sharing this cache - 1.
                entry.eax = (entry.eax & !(0xfff << 14)) | ((u32::from(count) - 1) << 14);
            }
            0xb => {
                // Extended topology: the x2APIC id of this vCPU.
                entry.edx = u32::from(index);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

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
        assert_eq!((e[1].eax, e[1].edx), (0, 0), "leaf 6 zeroed");
        assert_eq!(e[2].ebx & (1 << 11), 0, "RTM masked on 7.0");
        assert_eq!(e[3].ebx, !0, "7.1 untouched");
    }
}
