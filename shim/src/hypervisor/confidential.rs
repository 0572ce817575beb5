//! Confidential VMs with QEMU: the machine and objects a SEV-SNP or TDX launch needs,
//! and whether this host and its QEMU can do one at all.
//!
//! SEV-SNP (QEMU 9.1 and later): `-machine q35,confidential-guest-support=cgs0` with a
//! `sev-snp-guest` object (C-bit position and reduced physical address bits from the
//! host's CPUID 0x8000001F, the guest policy, `kernel-hashes=on` so that OVMF checks the
//! kernel, initrd and command line against the measured hashes page, and HOST_DATA: the
//! pod's init-data digest). TDX (QEMU 10.1 and later): `kernel-irqchip=split` and a
//! `tdx-guest` object carrying MRCONFIGID. Both boot OVMF (`-bios`) and use the named
//! vCPU model whose signature `cocoon measure snp --vcpu-type` takes.
//!
//! No launch goes through yet: the shim refuses confidential pods, and says here
//! everything that stands in the way on this host.

use std::path::{Path, PathBuf};

use base64::Engine;

/// The trusted execution environment a pod asks for (`io.cocoon.confidential`). The same
/// name goes on the guest's measured command line (`cocoon.confidential=<tee>`), where it
/// makes the agent take init-data only if its own evidence binds it.
pub use cocoon_confidential::evidence::Tee;

/// The QEMU object that launches `tee`.
pub fn qemu_object(tee: Tee) -> &'static str {
    match tee {
        Tee::SevSnp => "sev-snp-guest",
        Tee::Tdx => "tdx-guest",
    }
}

/// The first QEMU release with that object.
fn qemu_since(tee: Tee) -> &'static str {
    match tee {
        Tee::SevSnp => "9.1",
        Tee::Tdx => "10.1",
    }
}

/// What a confidential launch is made of, beyond the plain VM.
#[derive(Clone, Debug)]
pub struct ConfidentialVm {
    pub tee: Tee,
    /// OVMF with SEV metadata and a kernel hashes section (SNP), or TDVF (TDX).
    pub firmware: PathBuf,
    /// The init-data digest (HOST_DATA, truncated to 32 bytes; MRCONFIGID, 48).
    pub init_data_digest: Option<Vec<u8>>,
    /// SEV-SNP guest policy: SMT allowed, bit 17 (must be one); no debug, no migration
    /// agent.
    pub snp_policy: u64,
    /// QEMU's vCPU model (its signature is part of the SNP measurement).
    pub vcpu_model: String,
    /// From the host's CPUID 0x8000001F (SEV-SNP only).
    pub cbitpos: u32,
    pub reduced_phys_bits: u32,
    /// The guest owner's ID block and authentication structure (`cocoon measure
    /// snp-id-block`), with whether an author key signed the ID key (SEV-SNP only).
    pub snp_identity: Option<(Vec<u8>, Vec<u8>, bool)>,
}

/// The default SNP guest policy.
pub const SNP_POLICY: u64 = 0x30000;

/// `bytes` fitted to `n` (truncated or zero-padded) in standard base64, as QEMU's
/// `host-data` and `mrconfigid` take them.
fn fitted_base64(bytes: &[u8], n: usize) -> String {
    let mut v = bytes.to_vec();
    v.resize(n, 0);
    base64::engine::general_purpose::STANDARD.encode(v)
}

/// The QEMU arguments of the confidential part: the machine (instead of the plain
/// one), its guest-support object, the vCPU model and the firmware. Guest RAM stays the
/// `mem` backend of the plain command line (QEMU adds guest_memfd for the private part).
pub fn qemu_args(vm: &ConfidentialVm) -> Vec<String> {
    let (machine, object) = match vm.tee {
        Tee::SevSnp => {
            let mut o = format!(
                "sev-snp-guest,id=cgs0,cbitpos={},reduced-phys-bits={},policy={:#x},kernel-hashes=on",
                vm.cbitpos, vm.reduced_phys_bits, vm.snp_policy
            );
            if let Some(d) = &vm.init_data_digest {
                o.push_str(&format!(",host-data={}", fitted_base64(d, 32)));
            }
            if let Some((block, auth, author)) = &vm.snp_identity {
                let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
                let on = if *author { "on" } else { "off" };
                o.push_str(&format!(
                    ",id-block={},id-auth={},author-key-enabled={on}",
                    b64(block),
                    b64(auth)
                ));
            }
            (
                "q35,confidential-guest-support=cgs0,memory-backend=mem,vmport=off",
                o,
            )
        }
        Tee::Tdx => {
            let mut o = "tdx-guest,id=cgs0".to_string();
            if let Some(d) = &vm.init_data_digest {
                o.push_str(&format!(",mrconfigid={}", fitted_base64(d, 48)));
            }
            (
                "q35,kernel-irqchip=split,confidential-guest-support=cgs0,memory-backend=mem",
                o,
            )
        }
    };
    [
        "-machine",
        machine,
        "-object",
        &object,
        "-cpu",
        &vm.vcpu_model,
        "-bios",
        &vm.firmware.to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Whether QEMU's `-object help` lists the TEE's object.
pub fn qemu_has(object_help: &str, tee: Tee) -> bool {
    object_help
        .lines()
        .any(|l| l.split_whitespace().next() == Some(qemu_object(tee)))
}

/// Everything on this host that stands in the way of launching `tee` with the QEMU at
/// `qemu` (empty: nothing found, which still is not a launch).
pub fn obstacles(tee: Tee, qemu: &Path) -> Vec<String> {
    let mut why = Vec::new();
    match tee {
        Tee::SevSnp => {
            if !Path::new("/dev/sev").exists() {
                why.push("/dev/sev is missing (no AMD SEV firmware on this host)".into());
            } else if !sysfs_yes("/sys/module/kvm_amd/parameters/sev_snp") {
                why.push("kvm_amd has SEV-SNP off (parameter sev_snp)".into());
            }
        }
        Tee::Tdx => {
            if !sysfs_yes("/sys/module/kvm_intel/parameters/tdx") {
                why.push("KVM has no TDX here (kvm_intel parameter tdx is not Y)".into());
            }
        }
    }
    match std::process::Command::new(qemu)
        .args(["-machine", "none", "-object", "help"])
        .output()
    {
        Ok(out) if qemu_has(&String::from_utf8_lossy(&out.stdout), tee) => {}
        Ok(_) => why.push(format!(
            "{} has no {} object (QEMU {} or later has)",
            qemu.display(),
            qemu_object(tee),
            qemu_since(tee)
        )),
        Err(e) => why.push(format!("cannot run {}: {e}", qemu.display())),
    }
    why
}

fn sysfs_yes(path: &str) -> bool {
    std::fs::read_to_string(path).is_ok_and(|v| matches!(v.trim(), "Y" | "1"))
}

/// The C-bit position and reduced physical address bits (CPUID 0x8000001F EBX), where
/// the CPU has SEV.
pub fn sev_cpuid() -> Option<(u32, u32)> {
    let max = std::arch::x86_64::__cpuid(0x8000_0000).eax;
    if max < 0x8000_001f {
        return None;
    }
    let r = std::arch::x86_64::__cpuid(0x8000_001f);
    // EAX bit 1: SEV.
    (r.eax & 2 != 0).then_some((r.ebx & 0x3f, (r.ebx >> 6) & 0x3f))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(tee: Tee, digest: Option<Vec<u8>>) -> ConfidentialVm {
        ConfidentialVm {
            tee,
            firmware: "/usr/share/cocoon/OVMF.amdsev.fd".into(),
            init_data_digest: digest,
            snp_policy: SNP_POLICY,
            vcpu_model: "EPYC-v4".into(),
            cbitpos: 51,
            reduced_phys_bits: 1,
            snp_identity: None,
        }
    }

    #[test]
    fn snp_command_line() {
        let a = qemu_args(&vm(Tee::SevSnp, Some(vec![0xab; 48])));
        assert_eq!(
            a[..2],
            [
                "-machine",
                "q35,confidential-guest-support=cgs0,memory-backend=mem,vmport=off"
            ]
        );
        // HOST_DATA is 32 bytes: the sha384 digest truncated.
        let host_data = base64::engine::general_purpose::STANDARD.encode([0xab; 32]);
        assert_eq!(
            a[3],
            format!("sev-snp-guest,id=cgs0,cbitpos=51,reduced-phys-bits=1,policy=0x30000,kernel-hashes=on,host-data={host_data}")
        );
        assert_eq!(
            a[4..],
            [
                "-cpu",
                "EPYC-v4",
                "-bios",
                "/usr/share/cocoon/OVMF.amdsev.fd"
            ]
        );
        // An owner's ID block goes to QEMU's sev-snp-guest as base64, with its flag.
        let mut owned = vm(Tee::SevSnp, None);
        owned.snp_identity = Some((vec![1; 96], vec![2; 4096], true));
        let o = &qemu_args(&owned)[3];
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        assert!(
            o.ends_with(&format!(
                ",id-block={},id-auth={},author-key-enabled=on",
                b64(&[1; 96]),
                b64(&[2; 4096])
            )),
            "{o}"
        );
    }

    #[test]
    fn tdx_command_line() {
        let a = qemu_args(&vm(Tee::Tdx, Some(vec![7; 32])));
        assert!(a[1].contains("kernel-irqchip=split"), "{a:?}");
        // MRCONFIGID is 48 bytes: a sha256 digest zero-padded.
        let mut padded = vec![7u8; 32];
        padded.resize(48, 0);
        let id = base64::engine::general_purpose::STANDARD.encode(padded);
        assert_eq!(a[3], format!("tdx-guest,id=cgs0,mrconfigid={id}"));
        assert_eq!(qemu_args(&vm(Tee::Tdx, None))[3], "tdx-guest,id=cgs0");
    }

    #[test]
    fn qemus_object_list_is_read_by_name() {
        let help =
            "List of user creatable objects:\n  authz-list\n  sev-guest\n  memory-backend-memfd\n";
        assert!(
            !qemu_has(help, Tee::SevSnp),
            "sev-guest is not sev-snp-guest"
        );
        assert!(qemu_has(&format!("{help}  sev-snp-guest\n"), Tee::SevSnp));
        assert!(!qemu_has(help, Tee::Tdx));
    }

    /// This host's QEMU and hardware, as they are: every obstacle is named.
    #[test]
    fn obstacles_name_the_host_and_qemu() {
        let why = obstacles(Tee::SevSnp, Path::new("qemu-system-x86_64"));
        if !Path::new("/dev/sev").exists() {
            assert!(
                why.iter().any(|w| w.contains("/dev/sev is missing")),
                "{why:?}"
            );
        }
        let why = obstacles(Tee::Tdx, Path::new("/nonexistent/qemu"));
        assert!(
            why.iter()
                .any(|w| w.contains("cannot run /nonexistent/qemu")),
            "{why:?}"
        );
    }
}
