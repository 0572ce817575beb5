//! An SEV-SNP launch from cocoon-vmm: the firmware placed in guest memory, each page of
//! the launch plan handed to the SEV firmware with its type (`SNP_LAUNCH_UPDATE`), the
//! vCPUs put in their reset state (KVM measures each one's VMSA from it), the init-data
//! digest bound as HOST_DATA (`SNP_LAUNCH_FINISH`).
//!
//! The pages and their order come from `cocoon_confidential::snp::launch::LaunchPlan`,
//! the same list `cocoon measure snp` folds into the digest a relying party expects. What
//! this module adds is the VMM's part: where the bytes sit in guest memory, which host
//! mapping each update names, how runs of pages are handed over, the CPUID page's
//! contents, the vCPUs' reset registers. Everything the firmware sees crosses one seam,
//! [`SnpFirmware`]: `kvm::KvmSnp` issues the ioctls; a test's recorder keeps every page as
//! the firmware would read it from the VMM's mapping and checks the digest they make
//! against `cocoon measure` (`tests/snp_launch.rs`).
//!
//! Not reachable from the command line yet: cocoon-vmm boots Linux directly (PVH or
//! bzImage), and an SNP guest starts in OVMF, which takes the kernel through QEMU's
//! fw_cfg interface; cocoon-vmm has no fw_cfg device. See `docs/confidential.md`.

pub mod cpuid_page;
pub mod kvm;

use cocoon_confidential::snp::gctx::PageType;
use cocoon_confidential::snp::launch::LaunchPlan;
use cocoon_confidential::snp::ovmf::Ovmf;
use cocoon_confidential::snp::vmsa::{Reset, VmmType, BSP_EIP};
use cocoon_confidential::snp::PAGE_SIZE;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

/// Why a launch stopped.
#[derive(Debug, thiserror::Error)]
pub enum SnpError {
    #[error("SEV-SNP: {what} failed: {source} (firmware error {fw_error:#x})")]
    Command {
        what: &'static str,
        fw_error: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("SEV-SNP: {0}")]
    Host(String),
    #[error("SEV-SNP: the launch's pages at {gpa:#x} (+{len:#x}) are not in guest memory")]
    Unmapped { gpa: u64, len: u64 },
    #[error("SEV-SNP: {0} vCPUs, but the launch plan has {1} VMSAs")]
    Vcpus(usize, usize),
}

/// What the SEV firmware is asked to do, through KVM. One call per step of the launch.
pub trait SnpFirmware {
    /// `KVM_SEV_INIT2` with the VMSA features beyond SNP_ACTIVE (bit 0), which KVM sets
    /// itself and refuses to be given. Before any vCPU exists.
    fn init(&mut self, vmsa_features: u64) -> Result<(), SnpError>;
    /// Makes the VM's `n` vCPUs: only after INIT2 (KVM refuses INIT2 once a vCPU exists).
    fn create_vcpus(&mut self, n: usize) -> Result<(), SnpError>;
    /// `SNP_LAUNCH_START` with the guest policy.
    fn launch_start(&mut self, policy: u64) -> Result<(), SnpError>;
    /// `SNP_LAUNCH_UPDATE` of the guest pages `[gpa, gpa + host.len())`, which the VMM
    /// maps at `host`: made private, then measured (NORMAL) or set up by the firmware
    /// (ZERO, SECRETS, CPUID, UNMEASURED).
    fn launch_update(
        &mut self,
        gpa: u64,
        host: VolatileSlice,
        kind: PageType,
    ) -> Result<(), SnpError>;
    /// Puts vCPU `index` in the reset state KVM will build its VMSA from.
    fn reset_vcpu(&mut self, index: usize, reset: &Reset) -> Result<(), SnpError>;
    /// `SNP_LAUNCH_FINISH`: the VMSAs are measured, HOST_DATA bound, the launch sealed;
    /// with an owner's ID block, the firmware refuses a launch whose digest or policy
    /// differ from it.
    fn launch_finish(
        &mut self,
        host_data: [u8; 32],
        identity: Option<&SnpIdentity>,
    ) -> Result<(), SnpError>;
}

/// A guest owner's ID block and its authentication structure (`cocoon measure
/// snp-id-block`, signed where the owner's keys are, never on the host).
#[derive(Clone)]
pub struct SnpIdentity {
    pub block: [u8; 96],
    pub auth: Box<[u8; 4096]>,
    /// Whether `auth` carries an author key (`AUTH_KEY_EN`).
    pub author_key: bool,
}

/// SEV_FEATURES bit 0: the guest runs SEV-SNP.
pub const SNP_ACTIVE: u64 = 1;

/// What a launch is made of, beyond the plan.
pub struct Launch<'a> {
    pub firmware: &'a Ovmf,
    pub plan: &'a LaunchPlan,
    pub policy: u64,
    /// The VMSA's SEV_FEATURES, as measured (`LaunchInputs::guest_features`).
    pub guest_features: u64,
    /// CPUID Fn0000_0001 EAX the vCPUs report (RDX at reset).
    pub vcpu_sig: u64,
    pub vcpus: usize,
    /// The init-data digest, truncated or padded to 32 bytes.
    pub host_data: [u8; 32],
    /// The owner's ID block, if any.
    pub identity: Option<&'a SnpIdentity>,
    /// The CPUID page's contents (`cpuid_page::table`).
    pub cpuid_page: [u8; PAGE_SIZE],
}

/// Runs the launch against `fw`, with guest memory `mem` (which must map the firmware's
/// range just below 4 GiB and its metadata sections).
pub fn launch(fw: &mut dyn SnpFirmware, mem: &GuestMemoryMmap, l: &Launch) -> Result<(), SnpError> {
    let vmsas = l
        .plan
        .updates
        .iter()
        .filter(|u| u.kind == PageType::Vmsa)
        .count();
    if vmsas != l.vcpus {
        return Err(SnpError::Vcpus(l.vcpus, vmsas));
    }
    // The firmware image first, where its reset vector expects it.
    let image = l.firmware.data();
    mem.write_slice(image, GuestAddress(l.firmware.gpa()))
        .map_err(|_| SnpError::Unmapped {
            gpa: l.firmware.gpa(),
            len: image.len() as u64,
        })?;
    let in_image =
        |gpa: u64| (l.firmware.gpa()..l.firmware.gpa() + image.len() as u64).contains(&gpa);
    // Then what the other measured pages hold (the kernel hashes page), and the CPUID
    // table the firmware checks.
    for u in &l.plan.updates {
        let bytes: Option<&[u8]> = match u.kind {
            PageType::Normal if !in_image(u.gpa) => u.data.as_deref(),
            PageType::Cpuid => Some(&l.cpuid_page),
            _ => None,
        };
        if let Some(bytes) = bytes {
            mem.write_slice(bytes, GuestAddress(u.gpa))
                .map_err(|_| SnpError::Unmapped {
                    gpa: u.gpa,
                    len: PAGE_SIZE as u64,
                })?;
        }
    }

    fw.init(l.guest_features & !SNP_ACTIVE)?;
    fw.create_vcpus(l.vcpus)?;
    fw.launch_start(l.policy)?;
    // Runs of adjacent pages of one type go over in one update, as QEMU hands over the
    // whole firmware image at once; the firmware measures them page by page.
    let pages: Vec<(u64, PageType)> = l
        .plan
        .updates
        .iter()
        .filter(|u| u.kind != PageType::Vmsa)
        .map(|u| (u.gpa, u.kind))
        .collect();
    let mut i = 0;
    while i < pages.len() {
        let (start, kind) = pages[i];
        let mut n = 1;
        while i + n < pages.len() && pages[i + n] == (start + (n * PAGE_SIZE) as u64, kind) {
            n += 1;
        }
        let len = n * PAGE_SIZE;
        let host = mem
            .get_slice(GuestAddress(start), len)
            .map_err(|_| SnpError::Unmapped {
                gpa: start,
                len: len as u64,
            })?;
        fw.launch_update(start, host, kind)?;
        i += n;
    }

    let ap_eip = l
        .firmware
        .sev_es_reset_eip()
        .map_err(|e| SnpError::Host(e.to_string()))?;
    for index in 0..l.vcpus {
        let eip = if index == 0 { BSP_EIP } else { ap_eip };
        let reset = Reset {
            eip,
            vcpu_sig: l.vcpu_sig,
            sev_features: l.guest_features,
            vmm: VmmType::Qemu,
        };
        fw.reset_vcpu(index, &reset)?;
    }
    fw.launch_finish(l.host_data, l.identity)
}
