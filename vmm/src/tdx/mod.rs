//! A TDX launch from cocoon-vmm: the TD initialized with its attributes, XFAM, CPUID and
//! MRCONFIGID (the init-data digest), each vCPU given the TD HOB's address, each TDVF
//! section added from the VMM's memory (`KVM_TDX_INIT_MEM_REGION`, measured into MRTD
//! where the firmware says MR.EXTEND), the TD finalized.
//!
//! Everything the TDX module sees crosses one seam, [`TdxModule`]: `kvm::KvmTdx` issues
//! the ioctls; a test's recorder folds each page it is handed, read from the VMM's
//! mapping, into MRTD as the module does and checks it against `cocoon measure tdx`
//! (`tests/tdx_launch.rs`). Like the SNP launch (`crate::snp`), not reachable from the
//! command line: TDVF takes the kernel through fw_cfg, which cocoon-vmm lacks, and the TD
//! HOB's contents (the memory map TDVF reads, unmeasured in MRTD) are not built yet.

pub mod kvm;

use cocoon_confidential::tdx::tdvf::Tdvf;
use kvm_bindings::kvm_cpuid_entry2;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

#[derive(Debug, thiserror::Error)]
pub enum TdxError {
    #[error("TDX: {what} failed: {source} (TDX module error {hw_error:#x})")]
    Command {
        what: &'static str,
        hw_error: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("TDX: {0}")]
    Host(String),
    #[error("TDX: the firmware section at {gpa:#x} (+{len:#x}) is not in guest memory")]
    Unmapped { gpa: u64, len: u64 },
}

/// What the TD is made with.
#[derive(Clone, Debug)]
pub struct TdParams {
    /// TD attributes (bit 0: debug, never for a confidential pod).
    pub attributes: u64,
    /// The extended features the TD may use (XCR0 | IA32_XSS bits).
    pub xfam: u64,
    /// The init-data digest, truncated or padded to 48 bytes.
    pub mrconfigid: [u8; 48],
    pub cpuid: Vec<kvm_cpuid_entry2>,
}

/// What the TDX module is asked to do, through KVM.
pub trait TdxModule {
    /// `KVM_TDX_INIT_VM`, before any vCPU exists.
    fn init_vm(&mut self, td: &TdParams) -> Result<(), TdxError>;
    /// Makes the TD's `n` vCPUs: only after INIT_VM (KVM refuses them before).
    fn create_vcpus(&mut self, n: usize) -> Result<(), TdxError>;
    /// `KVM_TDX_INIT_VCPU`: the vCPU starts with RCX = the TD HOB's address.
    fn init_vcpu(&mut self, index: usize, hob_gpa: u64) -> Result<(), TdxError>;
    /// `KVM_TDX_INIT_MEM_REGION`: the pages `[gpa, gpa + source.len())` are added with
    /// `source`'s bytes (TDH.MEM.PAGE.ADD), and extended into MRTD if `measure`.
    fn init_mem_region(
        &mut self,
        gpa: u64,
        source: VolatileSlice,
        measure: bool,
    ) -> Result<(), TdxError>;
    /// `KVM_TDX_FINALIZE_VM`: MRTD is final.
    fn finalize(&mut self) -> Result<(), TdxError>;
}

/// Runs the launch of `firmware` with `vcpus` vCPUs into `module`, from guest memory
/// `mem` (which must map every section the firmware adds).
pub fn launch(
    module: &mut dyn TdxModule,
    mem: &GuestMemoryMmap,
    firmware: &Tdvf,
    td: &TdParams,
    vcpus: usize,
) -> Result<(), TdxError> {
    use cocoon_confidential::tdx::tdvf::SectionType;
    // Place every section first: a launch never starts on memory the VMM cannot fill.
    let added: Vec<_> = firmware.sections().iter().filter(|s| s.added()).collect();
    for s in &added {
        let unmapped = || TdxError::Unmapped {
            gpa: s.gpa,
            len: s.memory_size,
        };
        let data = firmware.section_data(s);
        mem.write_slice(data, GuestAddress(s.gpa))
            .map_err(|_| unmapped())?;
        let rest = s.memory_size as usize - data.len();
        if rest > 0 {
            mem.write_slice(&vec![0u8; rest], GuestAddress(s.gpa + data.len() as u64))
                .map_err(|_| unmapped())?;
        }
    }
    let hob = firmware
        .sections()
        .iter()
        .find(|s| s.kind == SectionType::TdHob)
        .ok_or_else(|| TdxError::Host("the firmware has no TD HOB section".into()))?
        .gpa;

    module.init_vm(td)?;
    module.create_vcpus(vcpus)?;
    for index in 0..vcpus {
        module.init_vcpu(index, hob)?;
    }
    for s in &added {
        let source = mem
            .get_slice(GuestAddress(s.gpa), s.memory_size as usize)
            .map_err(|_| TdxError::Unmapped {
                gpa: s.gpa,
                len: s.memory_size,
            })?;
        module.init_mem_region(s.gpa, source, s.measured())?;
    }
    module.finalize()
}
