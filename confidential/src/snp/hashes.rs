//! The kernel hashes table (OVMF's `SevHashTable`): SHA-256 of the command line, the
//! initrd and the kernel, each under its GUID, which OVMF checks before it boots them.
//! For SNP the page holding it is measured, so the digest binds all three.

use sha2::{Digest, Sha256};

use super::ovmf::{guid, Guid};

const HEADER_GUID: Guid = guid("9438d606-4f22-4cc9-b479-a793d411fd21");
const KERNEL_GUID: Guid = guid("4de79437-abd2-427f-b835-d5b172d2045b");
const INITRD_GUID: Guid = guid("44baf731-3a2f-4bd7-9af1-41e29169781d");
const CMDLINE_GUID: Guid = guid("97d02dd8-bd20-4c94-aa78-e7714d36ab2a");

/// One entry: GUID, length (u16), SHA-256.
const ENTRY_LEN: usize = 16 + 2 + 32;
/// The header (GUID, length) and three entries.
const TABLE_LEN: usize = 16 + 2 + 3 * ENTRY_LEN;
/// Padded to 16 bytes, as OVMF's reserved area holds it.
pub const PADDED_LEN: usize = (TABLE_LEN + 15) & !15;

/// The three hashes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SevHashes {
    kernel: [u8; 32],
    initrd: [u8; 32],
    cmdline: [u8; 32],
}

impl SevHashes {
    /// `initrd` absent hashes as empty; the command line is hashed with its NUL (an
    /// absent or empty one as a lone NUL), as QEMU passes it.
    pub fn new(kernel: &[u8], initrd: Option<&[u8]>, cmdline: Option<&[u8]>) -> Self {
        let mut line = cmdline.unwrap_or_default().to_vec();
        line.push(0);
        SevHashes {
            kernel: Sha256::digest(kernel).into(),
            initrd: Sha256::digest(initrd.unwrap_or_default()).into(),
            cmdline: Sha256::digest(&line).into(),
        }
    }

    /// The padded table.
    pub fn table(&self) -> [u8; PADDED_LEN] {
        let mut t = [0u8; PADDED_LEN];
        t[..16].copy_from_slice(&HEADER_GUID);
        t[16..18].copy_from_slice(&(TABLE_LEN as u16).to_le_bytes());
        let entries = [
            (CMDLINE_GUID, &self.cmdline),
            (INITRD_GUID, &self.initrd),
            (KERNEL_GUID, &self.kernel),
        ];
        for (i, (g, hash)) in entries.into_iter().enumerate() {
            let at = 18 + i * ENTRY_LEN;
            t[at..at + 16].copy_from_slice(&g);
            t[at + 16..at + 18].copy_from_slice(&(ENTRY_LEN as u16).to_le_bytes());
            t[at + 18..at + ENTRY_LEN].copy_from_slice(hash);
        }
        t
    }

    /// The page that holds the table at `offset`; None if it does not fit there.
    pub fn page(&self, offset: usize) -> Option<Vec<u8>> {
        let end = offset.checked_add(PADDED_LEN)?;
        if end > super::PAGE_SIZE {
            return None;
        }
        let mut page = vec![0u8; super::PAGE_SIZE];
        page[offset..end].copy_from_slice(&self.table());
        Some(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_layout() {
        assert_eq!(TABLE_LEN, 168);
        assert_eq!(PADDED_LEN, 176);
        let h = SevHashes::new(b"kernel", None, None);
        let t = h.table();
        assert_eq!(&t[16..18], &[168, 0]);
        // The command line entry first: SHA-256 of a lone NUL.
        assert_eq!(&t[18..34], &CMDLINE_GUID);
        assert_eq!(&t[36..68], Sha256::digest([0u8]).as_slice());
        // The initrd: SHA-256 of nothing. The kernel last.
        assert_eq!(&t[86..118], Sha256::digest(b"").as_slice());
        assert_eq!(&t[136..168], Sha256::digest(b"kernel").as_slice());
        assert_eq!(&t[168..], &[0u8; 8]);
        // An empty command line is the same as none.
        assert_eq!(SevHashes::new(b"kernel", None, Some(b"")), h);
        assert!(h.page(4096 - 176).is_some());
        assert!(h.page(4096 - 175).is_none());
    }
}
