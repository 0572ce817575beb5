//! Confidential pods. For now: the SEV-SNP launch measurement a relying party can
//! compute in advance (`cocoon measure snp`), built as the list of pages a launch hands
//! to the firmware, so that the VMM's launch and the prediction share one source.
//!
//! Why our own code and not the `sev` crate's `measurement` module: a launch has to be
//! a list of page updates that a VMM executes (`SNP_LAUNCH_UPDATE`) and a test records,
//! which that module keeps internal; and it lacks the GCE VMM type and differs from the
//! reference tool (`sev-snp-measure`) in EC2's initial registers. The reference is what
//! relying parties run, so ours is tested against it, byte for byte.

pub mod evidence;
#[cfg(feature = "kbs")]
pub mod fuzz;
#[cfg(feature = "genpolicy")]
pub mod genpolicy;
pub mod image_ref;
pub mod initdata;
#[cfg(feature = "kbs")]
pub mod kbs;
#[cfg(feature = "cli")]
pub mod measure;
pub mod sev_guest;
pub mod snp;
pub mod tdx;
