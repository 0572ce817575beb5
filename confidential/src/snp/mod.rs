//! AMD SEV-SNP: the guest context's launch digest, OVMF's SEV metadata, the kernel
//! hashes table, the initial VMSA, and the launch plan built from them.

pub mod certs;
pub mod gctx;
pub mod hashes;
#[cfg(feature = "verify")]
pub mod idblock;
pub mod launch;
pub mod ovmf;
#[cfg(feature = "verify")]
pub mod verify;
pub mod vmsa;

/// The size of a page the firmware measures.
pub const PAGE_SIZE: usize = 4096;
