//! The SNP guest context's launch digest (SEV-SNP firmware ABI, `SNP_LAUNCH_UPDATE` and
//! the PAGE_INFO structure): each page the launch adds is folded in as
//! `ld = SHA-384(PAGE_INFO)`, where PAGE_INFO holds the previous digest, the page's
//! contents digest, its type and its guest physical address.

use sha2::{Digest, Sha384};

/// A launch digest: SHA-384.
pub const LD_SIZE: usize = 48;

/// The page types of `SNP_LAUNCH_UPDATE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PageType {
    Normal = 1,
    Vmsa = 2,
    Zero = 3,
    Unmeasured = 4,
    Secrets = 5,
    Cpuid = 6,
}

/// The guest physical address the firmware measures every VMSA page at.
pub const VMSA_GPA: u64 = 0xFFFF_FFFF_F000;

/// The running launch digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gctx {
    ld: [u8; LD_SIZE],
}

impl Default for Gctx {
    fn default() -> Self {
        Gctx { ld: [0; LD_SIZE] }
    }
}

impl Gctx {
    /// A digest that starts from `seed` (a precomputed firmware digest).
    pub fn with_seed(seed: [u8; LD_SIZE]) -> Self {
        Gctx { ld: seed }
    }

    pub fn ld(&self) -> [u8; LD_SIZE] {
        self.ld
    }

    /// Folds in one page: `contents` is the SHA-384 of a NORMAL or VMSA page's bytes,
    /// zeros for the other types.
    pub fn update(&mut self, page_type: PageType, gpa: u64, contents: &[u8; LD_SIZE]) {
        const PAGE_INFO_LEN: u16 = 0x70;
        let mut info = [0u8; PAGE_INFO_LEN as usize];
        info[..48].copy_from_slice(&self.ld);
        info[48..96].copy_from_slice(contents);
        info[96..98].copy_from_slice(&PAGE_INFO_LEN.to_le_bytes());
        info[98] = page_type as u8;
        // 99: IMI_PAGE, 100-102: VMPL3..1 permissions, 103: reserved; all zero.
        info[104..112].copy_from_slice(&gpa.to_le_bytes());
        self.ld = Sha384::digest(info).into();
    }
}

/// SHA-384 of a page's bytes.
pub fn page_digest(page: &[u8]) -> [u8; LD_SIZE] {
    Sha384::digest(page).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The PAGE_INFO layout, rebuilt field by field from the ABI's table: a change of
    /// offset or width in `update` changes the digest.
    #[test]
    fn page_info_is_the_abi_layout() {
        let contents = [7u8; LD_SIZE];
        let mut g = Gctx::default();
        g.update(PageType::Cpuid, 0x1234_5000, &contents);
        let mut info = Vec::new();
        info.extend_from_slice(&[0u8; 48]);
        info.extend_from_slice(&contents);
        info.extend_from_slice(&[0x70, 0x00, 6, 0, 0, 0, 0, 0]);
        info.extend_from_slice(&0x1234_5000u64.to_le_bytes());
        assert_eq!(info.len(), 0x70);
        assert_eq!(g.ld(), page_digest(&info));
    }
}
