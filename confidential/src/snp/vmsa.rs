//! The initial VMSA (the SEV-ES save area, AMD APM vol. 2 table B-4) of each vCPU: its
//! register state at reset, which SNP measures. The values are those KVM sets for a
//! vCPU at reset (with EFER.SVME and CR4.MCE on), and differ a little by VMM: QEMU
//! passes the CPU signature in RDX and sets the FPU's reset MXCSR and FCW; GCE and EC2
//! do not, and set other segment attributes and PAT.

use super::PAGE_SIZE;

/// Which hypervisor launches the guest (its reset state differs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmmType {
    Qemu,
    Ec2,
    Gce,
}

/// The bootstrap processor starts at the reset vector.
pub const BSP_EIP: u32 = 0xffff_fff0;

/// One vCPU's initial state.
#[derive(Clone, Copy, Debug)]
pub struct Reset {
    pub eip: u32,
    pub vcpu_sig: u64,
    pub sev_features: u64,
    pub vmm: VmmType,
}

/// A segment register in the save area: selector, attributes, limit, base.
fn segment(page: &mut [u8], at: usize, selector: u16, attrib: u16, limit: u32, base: u64) {
    page[at..at + 2].copy_from_slice(&selector.to_le_bytes());
    page[at + 2..at + 4].copy_from_slice(&attrib.to_le_bytes());
    page[at + 4..at + 8].copy_from_slice(&limit.to_le_bytes());
    page[at + 8..at + 16].copy_from_slice(&base.to_le_bytes());
}

fn put(page: &mut [u8], at: usize, bytes: &[u8]) {
    page[at..at + bytes.len()].copy_from_slice(bytes);
}

/// The 4 KiB VMSA page for `r`.
pub fn page(r: &Reset) -> Vec<u8> {
    let (cs_attrib, ss_attrib, tr_attrib, rdx, mxcsr, fcw, g_pat) = match r.vmm {
        VmmType::Qemu => (0x9b, 0x93, 0x8b, r.vcpu_sig, 0x1f80u32, 0x37fu16, PAT),
        VmmType::Ec2 => {
            let cs = if r.eip == BSP_EIP { 0x9a } else { 0x9b };
            (cs, 0x92, 0x83, 0x600, 0, 0, PAT)
        }
        VmmType::Gce => (0x9b, 0x93, 0x8b, 0x600, 0, 0, 0x0007_0106),
    };
    let mut p = vec![0u8; PAGE_SIZE];
    // Segments at 0x00-0x9f: es, cs, ss, ds, fs, gs, gdtr, ldtr, idtr, tr.
    segment(&mut p, 0x00, 0, 0x93, 0xffff, 0);
    segment(
        &mut p,
        0x10,
        0xf000,
        cs_attrib,
        0xffff,
        u64::from(r.eip & 0xffff_0000),
    );
    segment(&mut p, 0x20, 0, ss_attrib, 0xffff, 0);
    segment(&mut p, 0x30, 0, 0x93, 0xffff, 0);
    segment(&mut p, 0x40, 0, 0x93, 0xffff, 0);
    segment(&mut p, 0x50, 0, 0x93, 0xffff, 0);
    segment(&mut p, 0x60, 0, 0, 0xffff, 0);
    segment(&mut p, 0x70, 0, 0x82, 0xffff, 0);
    segment(&mut p, 0x80, 0, 0, 0xffff, 0);
    segment(&mut p, 0x90, 0, tr_attrib, 0xffff, 0);
    put(&mut p, 0xd0, &0x1000u64.to_le_bytes()); // EFER.SVME
    put(&mut p, 0x148, &0x40u64.to_le_bytes()); // CR4.MCE
    put(&mut p, 0x158, &0x10u64.to_le_bytes()); // CR0.ET
    put(&mut p, 0x160, &0x400u64.to_le_bytes()); // DR7
    put(&mut p, 0x168, &0xffff_0ff0u64.to_le_bytes()); // DR6
    put(&mut p, 0x170, &0x2u64.to_le_bytes()); // RFLAGS
    put(&mut p, 0x178, &u64::from(r.eip & 0xffff).to_le_bytes()); // RIP
    put(&mut p, 0x268, &g_pat.to_le_bytes());
    put(&mut p, 0x310, &rdx.to_le_bytes());
    put(&mut p, 0x3b0, &r.sev_features.to_le_bytes());
    put(&mut p, 0x3e8, &0x1u64.to_le_bytes()); // XCR0: x87
    put(&mut p, 0x408, &mxcsr.to_le_bytes());
    put(&mut p, 0x410, &fcw.to_le_bytes());
    p
}

/// The PAT MSR's reset value (APM vol. 2, A.3).
const PAT: u64 = 0x0007_0406_0007_0406;

/// The CPUID signature (Fn0000_0001 EAX) of a family, model and stepping, as the AMD
/// CPUID specification composes it (families above 0xf use the extended field).
pub fn cpu_sig(family: u32, model: u32, stepping: u32) -> u64 {
    let (family_low, family_high) = if family > 0xf {
        (0xf, (family - 0xf) & 0xff)
    } else {
        (family, 0)
    };
    let sig = (family_high << 20)
        | (((model >> 4) & 0xf) << 16)
        | (family_low << 8)
        | ((model & 0xf) << 4)
        | (stepping & 0xf);
    u64::from(sig)
}

/// QEMU's AMD EPYC CPU models and their signatures (the names `-cpu` takes).
pub const CPU_TYPES: &[(&str, (u32, u32, u32))] = &[
    ("EPYC", (23, 1, 2)),
    ("EPYC-v1", (23, 1, 2)),
    ("EPYC-v2", (23, 1, 2)),
    ("EPYC-IBPB", (23, 1, 2)),
    ("EPYC-v3", (23, 1, 2)),
    ("EPYC-v4", (23, 1, 2)),
    ("EPYC-Rome", (23, 49, 0)),
    ("EPYC-Rome-v1", (23, 49, 0)),
    ("EPYC-Rome-v2", (23, 49, 0)),
    ("EPYC-Rome-v3", (23, 49, 0)),
    ("EPYC-Milan", (25, 1, 1)),
    ("EPYC-Milan-v1", (25, 1, 1)),
    ("EPYC-Milan-v2", (25, 1, 1)),
    ("EPYC-Genoa", (25, 17, 0)),
    ("EPYC-Genoa-v1", (25, 17, 0)),
    ("EPYC-Turin", (26, 0, 0)),
];

/// The signature of a named CPU type.
pub fn cpu_type_sig(name: &str) -> Option<u64> {
    CPU_TYPES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, (f, m, s))| cpu_sig(*f, *m, *s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures() {
        // Milan: family 0x19 = 0xf + 0xa, model 1, stepping 1.
        assert_eq!(cpu_type_sig("EPYC-Milan"), Some(0x00a0_0f11));
        assert_eq!(cpu_type_sig("EPYC-Genoa"), Some(0x00a1_0f10));
        assert_eq!(cpu_type_sig("EPYC-Rome"), Some(0x0083_0f10));
        assert_eq!(cpu_sig(6, 0x55, 7), 0x0005_0657);
        assert_eq!(cpu_type_sig("Skylake"), None);
    }

    #[test]
    fn qemu_reset_state() {
        let p = page(&Reset {
            eip: BSP_EIP,
            vcpu_sig: 0x00a0_0f11,
            sev_features: 1,
            vmm: VmmType::Qemu,
        });
        assert_eq!(
            &p[0x10..0x20],
            &[0x00, 0xf0, 0x9b, 0, 0xff, 0xff, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0]
        );
        assert_eq!(&p[0x178..0x180], &0xfff0u64.to_le_bytes());
        assert_eq!(&p[0x310..0x318], &0x00a0_0f11u64.to_le_bytes());
        assert_eq!(&p[0x3b0..0x3b8], &1u64.to_le_bytes());
        assert_eq!(&p[0x408..0x40c], &0x1f80u32.to_le_bytes());
    }
}
