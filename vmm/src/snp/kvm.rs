//! The SEV firmware through KVM: an SNP VM (`KVM_X86_SNP_VM`) whose RAM is backed by
//! guest_memfd (private pages the host cannot map), and the launch commands through
//! `KVM_MEMORY_ENCRYPT_OP` with `/dev/sev`'s descriptor. Written against the Linux 6.11+
//! UAPI (`Documentation/virt/kvm/x86/amd-memory-encryption.rst`); no SEV hardware exists
//! where this was written, so beyond the refusals it is untested (`docs/confidential.md`).

use std::fs::File;
use std::os::fd::AsRawFd;

use cocoon_confidential::snp::gctx::PageType;
use cocoon_confidential::snp::vmsa::Reset;
use kvm_bindings::{
    kvm_create_guest_memfd, kvm_memory_attributes, kvm_sev_cmd, kvm_sev_init,
    kvm_sev_snp_launch_finish, kvm_sev_snp_launch_start, kvm_sev_snp_launch_update,
    kvm_userspace_memory_region2, sev_cmd_id_KVM_SEV_INIT2, sev_cmd_id_KVM_SEV_SNP_LAUNCH_FINISH,
    sev_cmd_id_KVM_SEV_SNP_LAUNCH_START, sev_cmd_id_KVM_SEV_SNP_LAUNCH_UPDATE,
    KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_MEM_GUEST_MEMFD, KVM_X86_SNP_VM,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::VolatileSlice;

use super::{SnpError, SnpFirmware};

/// The SEV firmware's device.
pub const SEV_DEVICE: &str = "/dev/sev";
/// The GHCB protocol version the guest and KVM speak (2: SNP).
const GHCB_VERSION: u16 = 2;

fn os(e: kvm_ioctls::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.errno())
}

/// An SNP VM, or a refusal saying what this host lacks.
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, SnpError> {
    kvm.create_vm_with_type(u64::from(KVM_X86_SNP_VM))
        .map_err(|e| {
            SnpError::Host(format!(
                "this KVM cannot make an SNP VM (KVM_X86_SNP_VM): {} (needs an AMD host with \
             SEV-SNP enabled, Linux 6.11 or later, kvm_amd.sev_snp=1)",
                os(e)
            ))
        })
}

/// Backs the guest range `[gpa, gpa + host.len())` (mapped at `host` for shared
/// accesses) with a guest_memfd for its private pages, as memory slot `slot`.
pub fn add_private_memory(
    vm: &VmFd,
    slot: u32,
    gpa: u64,
    host: VolatileSlice,
) -> Result<File, SnpError> {
    let len = host.len() as u64;
    let gmem = vm
        .create_guest_memfd(kvm_create_guest_memfd {
            size: len,
            ..Default::default()
        })
        .map_err(|e| SnpError::Host(format!("guest_memfd of {len:#x} bytes: {}", os(e))))?;
    // SAFETY: the descriptor was just made and is ours alone.
    let gmem = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(gmem) };
    let region = kvm_userspace_memory_region2 {
        slot,
        flags: KVM_MEM_GUEST_MEMFD,
        guest_phys_addr: gpa,
        memory_size: len,
        userspace_addr: host.ptr_guard().as_ptr() as u64,
        guest_memfd: gmem.as_raw_fd() as u32,
        guest_memfd_offset: 0,
        ..Default::default()
    };
    // SAFETY: the host mapping outlives the VM (the VMM keeps guest memory for the VM's
    // life), and the guest_memfd is kept by the caller.
    unsafe { vm.set_user_memory_region2(region) }
        .map_err(|e| SnpError::Host(format!("memory slot {slot} at {gpa:#x}: {}", os(e))))?;
    Ok(gmem)
}

/// Converts guest pages to private (backed by guest_memfd), as both launches must before
/// the firmware or the TDX module takes them.
pub fn make_private(vm: &VmFd, gpa: u64, len: u64) -> Result<(), String> {
    vm.set_memory_attributes(kvm_memory_attributes {
        address: gpa,
        size: len,
        attributes: u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE),
        flags: 0,
    })
    .map_err(|e| format!("making {gpa:#x}+{len:#x} private: {}", os(e)))
}

/// The launch through KVM, on an SNP VM with no vCPU yet: it makes them after INIT2
/// (`SnpFirmware::create_vcpus`) and hands them over when the launch is done.
pub struct KvmSnp<'a> {
    vm: &'a VmFd,
    vcpus: Vec<VcpuFd>,
    sev: File,
}

impl<'a> KvmSnp<'a> {
    pub fn new(vm: &'a VmFd) -> Result<KvmSnp<'a>, SnpError> {
        let sev = File::options()
            .read(true)
            .write(true)
            .open(SEV_DEVICE)
            .map_err(|e| {
                SnpError::Host(format!(
                    "cannot open {SEV_DEVICE}: {e} (no AMD SEV firmware on this host)"
                ))
            })?;
        Ok(KvmSnp {
            vm,
            vcpus: Vec::new(),
            sev,
        })
    }

    /// The vCPUs, launched, for the VMM to run.
    pub fn into_vcpus(self) -> Vec<VcpuFd> {
        self.vcpus
    }

    fn command<T>(&self, what: &'static str, id: u32, data: &mut T) -> Result<(), SnpError> {
        let mut cmd = kvm_sev_cmd {
            id,
            data: data as *mut T as u64,
            sev_fd: self.sev.as_raw_fd() as u32,
            ..Default::default()
        };
        self.vm
            .encrypt_op_sev(&mut cmd)
            .map_err(|e| SnpError::Command {
                what,
                fw_error: cmd.error,
                source: os(e),
            })
    }
}

impl SnpFirmware for KvmSnp<'_> {
    fn init(&mut self, vmsa_features: u64) -> Result<(), SnpError> {
        let mut init = kvm_sev_init {
            vmsa_features,
            ghcb_version: GHCB_VERSION,
            ..Default::default()
        };
        self.command("KVM_SEV_INIT2", sev_cmd_id_KVM_SEV_INIT2, &mut init)
    }

    fn create_vcpus(&mut self, n: usize) -> Result<(), SnpError> {
        for i in self.vcpus.len()..n {
            let vcpu = self
                .vm
                .create_vcpu(i as u64)
                .map_err(|e| SnpError::Host(format!("vCPU {i}: {}", os(e))))?;
            self.vcpus.push(vcpu);
        }
        Ok(())
    }

    fn launch_start(&mut self, policy: u64) -> Result<(), SnpError> {
        let mut start = kvm_sev_snp_launch_start {
            policy,
            ..Default::default()
        };
        self.command(
            "SNP_LAUNCH_START",
            sev_cmd_id_KVM_SEV_SNP_LAUNCH_START,
            &mut start,
        )
    }

    fn launch_update(
        &mut self,
        gpa: u64,
        host: VolatileSlice,
        kind: PageType,
    ) -> Result<(), SnpError> {
        let len = host.len() as u64;
        make_private(self.vm, gpa, len).map_err(SnpError::Host)?;
        let mut update = kvm_sev_snp_launch_update {
            gfn_start: gpa >> 12,
            uaddr: host.ptr_guard().as_ptr() as u64,
            len,
            type_: kind as u8,
            ..Default::default()
        };
        // KVM advances gfn_start, uaddr and len as it goes and may stop early (EAGAIN or EINTR,
        // or success with pages left): go on until nothing is left.
        loop {
            match self.command(
                "SNP_LAUNCH_UPDATE",
                sev_cmd_id_KVM_SEV_SNP_LAUNCH_UPDATE,
                &mut update,
            ) {
                Ok(()) if update.len == 0 => return Ok(()),
                Ok(()) => continue,
                Err(SnpError::Command { source, .. })
                    if matches!(source.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn reset_vcpu(&mut self, index: usize, reset: &Reset) -> Result<(), SnpError> {
        let vcpu = self
            .vcpus
            .get(index)
            .ok_or_else(|| SnpError::Host(format!("no vCPU {index}")))?;
        let fail = |what: &str, e: kvm_ioctls::Error| {
            SnpError::Host(format!("vCPU {index} {what}: {}", os(e)))
        };
        // The state QEMU gives an SEV-ES vCPU at reset, which the VMSA in the measurement
        // models (`snp::vmsa`): CS based at the reset vector's 64 KiB page, IP its low
        // half, RDX the CPUID signature; KVM's own reset state is the rest.
        let mut sregs = vcpu.get_sregs().map_err(|e| fail("get_sregs", e))?;
        sregs.cs.selector = 0xf000;
        sregs.cs.base = u64::from(reset.eip & 0xffff_0000);
        sregs.cs.limit = 0xffff;
        vcpu.set_sregs(&sregs).map_err(|e| fail("set_sregs", e))?;
        let mut regs = vcpu.get_regs().map_err(|e| fail("get_regs", e))?;
        regs.rip = u64::from(reset.eip & 0xffff);
        regs.rdx = reset.vcpu_sig;
        regs.rflags = 2;
        vcpu.set_regs(&regs).map_err(|e| fail("set_regs", e))
    }

    fn launch_finish(
        &mut self,
        host_data: [u8; 32],
        identity: Option<&super::SnpIdentity>,
    ) -> Result<(), SnpError> {
        let mut finish = kvm_sev_snp_launch_finish {
            host_data,
            ..Default::default()
        };
        // The firmware reads both structures from these addresses during the command.
        if let Some(id) = identity {
            finish.id_block_uaddr = id.block.as_ptr() as u64;
            finish.id_auth_uaddr = id.auth.as_ptr() as u64;
            finish.id_block_en = 1;
            finish.auth_key_en = u8::from(id.author_key);
        }
        self.command(
            "SNP_LAUNCH_FINISH",
            sev_cmd_id_KVM_SEV_SNP_LAUNCH_FINISH,
            &mut finish,
        )
    }
}
