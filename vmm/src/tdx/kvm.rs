//! The TDX module through KVM (Linux 6.16+ UAPI, `Documentation/virt/kvm/x86/
//! intel-tdx.rst`): a `KVM_X86_TDX_VM`, and the `KVM_MEMORY_ENCRYPT_OP` sub-commands on
//! the VM and on vCPU 0. `kvm-bindings` 0.14 has no TDX structures; they are declared
//! here from the UAPI header. No TDX hardware exists where this was written: beyond the
//! refusal it is untested (`docs/confidential.md`).

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::VolatileSlice;
use vmm_sys_util::ioctl::ioctl_with_mut_ref;

use super::{TdParams, TdxError, TdxModule};

/// `KVM_X86_TDX_VM`.
pub const TDX_VM_TYPE: u64 = 5;
const INIT_VM: u32 = 1;
const INIT_VCPU: u32 = 2;
const INIT_MEM_REGION: u32 = 3;
const FINALIZE_VM: u32 = 4;
/// `KVM_TDX_MEASURE_MEMORY_REGION`.
const MEASURE: u32 = 1;

vmm_sys_util::ioctl_iowr_nr!(KVM_MEMORY_ENCRYPT_OP, 0xAE, 0xba, std::os::raw::c_ulong);

/// `struct kvm_tdx_cmd`.
#[repr(C)]
#[derive(Default)]
struct TdxCmd {
    id: u32,
    flags: u32,
    data: u64,
    hw_error: u64,
}

/// `struct kvm_tdx_init_mem_region`.
#[repr(C)]
struct MemRegion {
    source_addr: u64,
    gpa: u64,
    nr_pages: u64,
}

/// `struct kvm_tdx_init_vm`'s fixed part: attributes, xfam, mrconfigid, mrowner,
/// mrownerconfig (6 u64 each), 12 reserved u64; `struct kvm_cpuid2` follows.
const INIT_VM_WORDS: usize = 2 + 6 * 3 + 12;

fn os(e: impl Into<i32>) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.into())
}

/// A TD, or a refusal saying what this host lacks. Its interrupt controller is split
/// (the local APIC in KVM, the rest in the VMM), as a TD's vCPUs require.
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, TdxError> {
    let vm = kvm.create_vm_with_type(TDX_VM_TYPE).map_err(|e| {
        TdxError::Host(format!(
            "this KVM cannot make a TD (KVM_X86_TDX_VM): {} (needs an Intel host with TDX \
             enabled, Linux 6.16 or later, kvm_intel.tdx=1)",
            os(e.errno())
        ))
    })?;
    let split = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_SPLIT_IRQCHIP,
        args: [24, 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&split)
        .map_err(|e| TdxError::Host(format!("a split irqchip for the TD: {}", os(e.errno()))))?;
    Ok(vm)
}

/// The launch through KVM, on a TD with no vCPU yet: it makes them after INIT_VM
/// (`TdxModule::create_vcpus`) and hands them over when the launch is done.
pub struct KvmTdx<'a> {
    vm: &'a VmFd,
    vcpus: Vec<VcpuFd>,
}

impl<'a> KvmTdx<'a> {
    pub fn new(vm: &'a VmFd) -> KvmTdx<'a> {
        KvmTdx {
            vm,
            vcpus: Vec::new(),
        }
    }

    /// The vCPUs, launched, for the VMM to run.
    pub fn into_vcpus(self) -> Vec<VcpuFd> {
        self.vcpus
    }

    fn vm_op(&self, what: &'static str, cmd: &mut TdxCmd) -> Result<(), TdxError> {
        // SAFETY: `cmd` is a live kvm_tdx_cmd whose data, where used, points at a live
        // structure of the layout the sub-command takes.
        unsafe { self.vm.encrypt_op(cmd as *mut TdxCmd) }.map_err(|e| TdxError::Command {
            what,
            hw_error: cmd.hw_error,
            source: os(e.errno()),
        })
    }

    fn vcpu_op(&self, index: usize, what: &'static str, cmd: &mut TdxCmd) -> Result<(), TdxError> {
        let vcpu = self
            .vcpus
            .get(index)
            .ok_or_else(|| TdxError::Host(format!("no vCPU {index}")))?;
        // SAFETY: as above, on a vCPU descriptor.
        let ret = unsafe { ioctl_with_mut_ref(vcpu, KVM_MEMORY_ENCRYPT_OP(), cmd) };
        if ret < 0 {
            return Err(TdxError::Command {
                what,
                hw_error: cmd.hw_error,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

impl TdxModule for KvmTdx<'_> {
    fn init_vm(&mut self, td: &TdParams) -> Result<(), TdxError> {
        // The fixed words, then kvm_cpuid2 (nent, padding) and its 40-byte entries.
        let entry_words = std::mem::size_of::<kvm_bindings::kvm_cpuid_entry2>() / 8;
        let mut buf = vec![0u64; INIT_VM_WORDS + 1 + td.cpuid.len() * entry_words];
        buf[0] = td.attributes;
        buf[1] = td.xfam;
        for (i, w) in td.mrconfigid.chunks(8).enumerate() {
            buf[2 + i] = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        }
        buf[INIT_VM_WORDS] = td.cpuid.len() as u64;
        for (i, e) in td.cpuid.iter().enumerate() {
            let at = INIT_VM_WORDS + 1 + i * entry_words;
            // SAFETY: kvm_cpuid_entry2 is plain old data of entry_words * 8 bytes.
            let bytes =
                unsafe { std::slice::from_raw_parts(e as *const _ as *const u8, entry_words * 8) };
            for (j, w) in bytes.chunks(8).enumerate() {
                buf[at + j] = u64::from_le_bytes(w.try_into().expect("8 bytes"));
            }
        }
        let mut cmd = TdxCmd {
            id: INIT_VM,
            data: buf.as_mut_ptr() as u64,
            ..Default::default()
        };
        self.vm_op("KVM_TDX_INIT_VM", &mut cmd)
    }

    fn create_vcpus(&mut self, n: usize) -> Result<(), TdxError> {
        for i in self.vcpus.len()..n {
            let vcpu = self
                .vm
                .create_vcpu(i as u64)
                .map_err(|e| TdxError::Host(format!("vCPU {i}: {}", os(e.errno()))))?;
            self.vcpus.push(vcpu);
        }
        Ok(())
    }

    fn init_vcpu(&mut self, index: usize, hob_gpa: u64) -> Result<(), TdxError> {
        let mut cmd = TdxCmd {
            id: INIT_VCPU,
            data: hob_gpa,
            ..Default::default()
        };
        self.vcpu_op(index, "KVM_TDX_INIT_VCPU", &mut cmd)
    }

    fn init_mem_region(
        &mut self,
        gpa: u64,
        source: VolatileSlice,
        measure: bool,
    ) -> Result<(), TdxError> {
        let len = source.len() as u64;
        crate::snp::kvm::make_private(self.vm, gpa, len).map_err(TdxError::Host)?;
        let mut region = MemRegion {
            source_addr: source.ptr_guard().as_ptr() as u64,
            gpa,
            nr_pages: len / 4096,
        };
        // KVM advances the region as it goes and returns EAGAIN or EINTR when interrupted.
        while region.nr_pages > 0 {
            let left = region.nr_pages;
            let mut cmd = TdxCmd {
                id: INIT_MEM_REGION,
                flags: if measure { MEASURE } else { 0 },
                data: &mut region as *mut MemRegion as u64,
                ..Default::default()
            };
            match self.vcpu_op(0, "KVM_TDX_INIT_MEM_REGION", &mut cmd) {
                Ok(()) if region.nr_pages < left || region.nr_pages == 0 => {}
                Ok(()) => {
                    return Err(TdxError::Host(format!(
                        "KVM_TDX_INIT_MEM_REGION made no progress at {:#x}",
                        region.gpa
                    )))
                }
                Err(TdxError::Command { source, .. })
                    if matches!(source.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn finalize(&mut self) -> Result<(), TdxError> {
        let mut cmd = TdxCmd {
            id: FINALIZE_VM,
            ..Default::default()
        };
        self.vm_op("KVM_TDX_FINALIZE_VM", &mut cmd)
    }
}
