//! OVMF (or any SEV firmware image) as the launch sees it: mapped to end at 4 GiB, with
//! a GUIDed table in its last bytes that says where the SEV-ES reset vector, the kernel
//! hashes table and the SEV metadata (the pages SNP firmware must pre-validate) are.
//!
//! The table sits just before the image's last 32 bytes: a footer entry (size, GUID)
//! whose size covers the whole table, and before it entries laid out back to front,
//! each `data, size: u16, guid` with its data first.

use std::collections::HashMap;

/// The layout of the image does not hold what a launch needs.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OvmfError {
    #[error(
        "the firmware image is {0} bytes: it must be a non-empty multiple of 4096 up to 4 GiB"
    )]
    Size(usize),
    #[error("the firmware's GUIDed table is malformed: {0}")]
    Table(String),
    #[error("the firmware has no SEV metadata (OVMF_SEV_META_DATA_GUID): it cannot launch an SEV-SNP guest")]
    NoMetadata,
    #[error("the firmware's SEV metadata is malformed: {0}")]
    Metadata(String),
    #[error("the firmware's table has no {0} entry")]
    MissingEntry(&'static str),
}

/// A 16-byte GUID in the little-endian layout firmware tables store.
pub type Guid = [u8; 16];

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` in its stored (little-endian) layout: the
/// first three fields byte-swapped, the last two as written.
pub const fn guid(s: &str) -> Guid {
    let b = s.as_bytes();
    let mut raw = [0u8; 16];
    let (mut i, mut n) = (0, 0);
    while i < b.len() {
        if b[i] != b'-' {
            let hi = hex_digit(b[i]);
            let lo = hex_digit(b[i + 1]);
            raw[n] = hi << 4 | lo;
            n += 1;
            i += 1;
        }
        i += 1;
    }
    assert!(n == 16, "a GUID has 16 bytes");
    [
        raw[3], raw[2], raw[1], raw[0], raw[5], raw[4], raw[7], raw[6], raw[8], raw[9], raw[10],
        raw[11], raw[12], raw[13], raw[14], raw[15],
    ]
}

const fn hex_digit(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        b'A'..=b'F' => c - b'A' + 10,
        _ => panic!("not a hex digit"),
    }
}

pub const TABLE_FOOTER_GUID: Guid = guid("96b582de-1fb2-45f7-baea-a366c55a082d");
pub const SEV_HASH_TABLE_RV_GUID: Guid = guid("7255371f-3a3b-4b04-927b-1da6efa8d454");
pub const SEV_ES_RESET_BLOCK_GUID: Guid = guid("00f771de-1a7e-4fcb-890e-68c77e2fb44e");
pub const SEV_METADATA_GUID: Guid = guid("dc886566-984a-4798-a75e-5585a7bf67cc");

/// What an SEV metadata section asks the launch to do with its pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SectionType {
    /// Pre-validated zero pages (OVMF's early page tables, GHCB, stacks).
    SnpSecMemory,
    /// The secrets page the firmware fills.
    SnpSecrets,
    /// The CPUID page the firmware checks.
    Cpuid,
    /// SVSM's calling area: zero pages.
    SvsmCaa,
    /// The page holding the kernel, initrd and command line hashes.
    SnpKernelHashes,
}

impl SectionType {
    fn from_raw(v: u32) -> Option<Self> {
        Some(match v {
            1 => SectionType::SnpSecMemory,
            2 => SectionType::SnpSecrets,
            3 => SectionType::Cpuid,
            4 => SectionType::SvsmCaa,
            0x10 => SectionType::SnpKernelHashes,
            _ => return None,
        })
    }
}

/// One SEV metadata section: `size` bytes at `gpa`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Section {
    pub gpa: u32,
    pub size: u32,
    pub kind: SectionType,
}

/// A parsed firmware image.
#[derive(Debug)]
pub struct Ovmf {
    data: Vec<u8>,
    table: HashMap<Guid, Vec<u8>>,
    sections: Vec<Section>,
}

const ENTRY_HEADER: usize = 18;
const FOUR_GIB: u64 = 1 << 32;

impl Ovmf {
    /// Parses `data`, which must carry SEV metadata.
    pub fn parse(data: Vec<u8>) -> Result<Ovmf, OvmfError> {
        if data.is_empty()
            || !data.len().is_multiple_of(super::PAGE_SIZE)
            || data.len() as u64 > FOUR_GIB
        {
            return Err(OvmfError::Size(data.len()));
        }
        let table = footer_table(&data)?;
        let sections = metadata(&data, &table)?;
        Ok(Ovmf {
            data,
            table,
            sections,
        })
    }

    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Where the image is mapped: it ends at 4 GiB.
    pub fn gpa(&self) -> u64 {
        FOUR_GIB - self.data.len() as u64
    }

    pub fn sections(&self) -> &[Section] {
        &self.sections
    }

    pub fn has_section(&self, kind: SectionType) -> bool {
        self.sections.iter().any(|s| s.kind == kind)
    }

    /// The guest physical address of the kernel hashes table.
    pub fn hashes_table_gpa(&self) -> Result<u32, OvmfError> {
        self.entry_u32(SEV_HASH_TABLE_RV_GUID, "SEV_HASH_TABLE_RV_GUID")
    }

    /// Where application processors start (the SEV-ES reset block).
    pub fn sev_es_reset_eip(&self) -> Result<u32, OvmfError> {
        self.entry_u32(SEV_ES_RESET_BLOCK_GUID, "SEV_ES_RESET_BLOCK_GUID")
    }

    fn entry_u32(&self, guid: Guid, name: &'static str) -> Result<u32, OvmfError> {
        let data = self.table.get(&guid).ok_or(OvmfError::MissingEntry(name))?;
        Ok(le_u32_prefix(data))
    }
}

/// The first four bytes as a little-endian u32 (fewer bytes: those, zero-extended).
fn le_u32_prefix(b: &[u8]) -> u32 {
    let mut v = [0u8; 4];
    let n = b.len().min(4);
    v[..n].copy_from_slice(&b[..n]);
    u32::from_le_bytes(v)
}

/// The GUIDed table before the last 32 bytes; empty if the footer GUID is not there.
/// Where a GUID appears twice, the entry nearer the image's start wins (the table is
/// read back to front).
pub(crate) fn footer_table(data: &[u8]) -> Result<HashMap<Guid, Vec<u8>>, OvmfError> {
    let mut table = HashMap::new();
    let Some(footer_at) = data.len().checked_sub(32 + ENTRY_HEADER) else {
        return Ok(table);
    };
    let footer = &data[footer_at..footer_at + ENTRY_HEADER];
    if footer[2..] != TABLE_FOOTER_GUID {
        return Ok(table);
    }
    let footer_size = u16::from_le_bytes([footer[0], footer[1]]) as usize;
    let Some(table_size) = footer_size.checked_sub(ENTRY_HEADER) else {
        return Ok(table);
    };
    let start = footer_at.checked_sub(table_size).ok_or_else(|| {
        OvmfError::Table(format!(
            "the footer says {footer_size} bytes, more than precede it"
        ))
    })?;
    let mut rest = &data[start..footer_at];
    while rest.len() >= ENTRY_HEADER {
        let header = &rest[rest.len() - ENTRY_HEADER..];
        let size = u16::from_le_bytes([header[0], header[1]]) as usize;
        if size < ENTRY_HEADER || size > rest.len() {
            return Err(OvmfError::Table(format!(
                "an entry of {size} bytes where {} remain",
                rest.len()
            )));
        }
        let guid: Guid = header[2..].try_into().expect("16 bytes");
        table.insert(
            guid,
            rest[rest.len() - size..rest.len() - ENTRY_HEADER].to_vec(),
        );
        rest = &rest[..rest.len() - size];
    }
    Ok(table)
}

/// The SEV metadata: an `ASEV` header (signature, size, version 1, count) at the offset
/// from the image's end that the table gives, followed by (gpa, size, type) items.
fn metadata(data: &[u8], table: &HashMap<Guid, Vec<u8>>) -> Result<Vec<Section>, OvmfError> {
    let entry = table.get(&SEV_METADATA_GUID).ok_or(OvmfError::NoMetadata)?;
    let from_end = le_u32_prefix(entry) as usize;
    let bad = |why: String| OvmfError::Metadata(why);
    let start = data.len().checked_sub(from_end).ok_or_else(|| {
        bad(format!(
            "its offset {from_end} from the end is outside the image"
        ))
    })?;
    let header = data
        .get(start..start + 16)
        .ok_or_else(|| bad("its header runs past the image's end".into()))?;
    if &header[..4] != b"ASEV" {
        return Err(bad("the signature is not ASEV".into()));
    }
    let field = |i: usize| le_u32_prefix(&header[i..i + 4]) as usize;
    let (size, version, count) = (field(4), field(8), field(12));
    if version != 1 {
        return Err(bad(format!("version {version}, not 1")));
    }
    let items = data
        .get(start + 16..start.saturating_add(size).min(data.len()))
        .unwrap_or(&[]);
    if count.checked_mul(12).is_none_or(|n| n > items.len()) {
        return Err(bad(format!(
            "{count} sections do not fit in its {size} bytes"
        )));
    }
    items
        .chunks_exact(12)
        .take(count)
        .map(|item| {
            let raw = le_u32_prefix(&item[8..]);
            let kind = SectionType::from_raw(raw)
                .ok_or_else(|| bad(format!("unknown section type {raw:#x}")))?;
            Ok(Section {
                gpa: le_u32_prefix(item),
                size: le_u32_prefix(&item[4..]),
                kind,
            })
        })
        .collect()
}

#[cfg(test)]
/// A firmware image built by hand: metadata with two sections, a reset block and a
/// hashes table entry.
pub(crate) fn test_image(sections: &[(u32, u32, u32)]) -> Vec<u8> {
    let mut data = vec![0u8; 8 * 4096];
    let len = data.len();
    let meta_at = 4096;
    let mut meta = b"ASEV".to_vec();
    meta.extend_from_slice(&(16 + 12 * sections.len() as u32).to_le_bytes());
    meta.extend_from_slice(&1u32.to_le_bytes());
    meta.extend_from_slice(&(sections.len() as u32).to_le_bytes());
    for (gpa, size, kind) in sections {
        for v in [gpa, size, kind] {
            meta.extend_from_slice(&v.to_le_bytes());
        }
    }
    data[meta_at..meta_at + meta.len()].copy_from_slice(&meta);
    let mut table = Vec::new();
    let mut entry = |guid: Guid, payload: &[u8]| {
        table.extend_from_slice(payload);
        table.extend_from_slice(&((payload.len() + ENTRY_HEADER) as u16).to_le_bytes());
        table.extend_from_slice(&guid);
    };
    entry(SEV_METADATA_GUID, &((len - meta_at) as u32).to_le_bytes());
    entry(SEV_ES_RESET_BLOCK_GUID, &0xffff_f000u32.to_le_bytes());
    entry(
        SEV_HASH_TABLE_RV_GUID,
        &[0x00, 0x0c, 0x80, 0x00, 0, 4, 0, 0],
    );
    table.extend_from_slice(&((table.len() + ENTRY_HEADER) as u16).to_le_bytes());
    table.extend_from_slice(&TABLE_FOOTER_GUID);
    let end = len - 32;
    data[end - table.len()..end].copy_from_slice(&table);
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids_are_stored_little_endian() {
        assert_eq!(
            guid("96b582de-1fb2-45f7-baea-a366c55a082d"),
            [
                0xde, 0x82, 0xb5, 0x96, 0xb2, 0x1f, 0xf7, 0x45, 0xba, 0xea, 0xa3, 0x66, 0xc5, 0x5a,
                0x08, 0x2d
            ]
        );
    }

    #[test]
    fn parses_a_hand_built_image() {
        let o = Ovmf::parse(test_image(&[
            (0x80_0000, 0x2000, 1),
            (0x80_3000, 0x1000, 3),
        ]))
        .unwrap();
        assert_eq!(o.gpa(), (1 << 32) - 8 * 4096);
        assert_eq!(o.sev_es_reset_eip().unwrap(), 0xffff_f000);
        assert_eq!(o.hashes_table_gpa().unwrap(), 0x80_0c00);
        assert_eq!(
            o.sections(),
            &[
                Section {
                    gpa: 0x80_0000,
                    size: 0x2000,
                    kind: SectionType::SnpSecMemory
                },
                Section {
                    gpa: 0x80_3000,
                    size: 0x1000,
                    kind: SectionType::Cpuid
                }
            ]
        );
    }

    #[test]
    fn malformed_images_are_named_errors() {
        assert_eq!(Ovmf::parse(vec![0; 100]).unwrap_err(), OvmfError::Size(100));
        // No footer at all: no metadata.
        assert_eq!(
            Ovmf::parse(vec![0; 4096]).unwrap_err(),
            OvmfError::NoMetadata
        );
        // An unknown section type.
        let e = Ovmf::parse(test_image(&[(0, 0x1000, 9)])).unwrap_err();
        assert!(e.to_string().contains("unknown section type 0x9"), "{e}");
        // A count larger than the metadata holds.
        let mut bad = test_image(&[(0, 0x1000, 1)]);
        bad[4096 + 12] = 200;
        let e = Ovmf::parse(bad).unwrap_err();
        assert!(e.to_string().contains("200 sections"), "{e}");
        // A wrong signature.
        let mut bad = test_image(&[(0, 0x1000, 1)]);
        bad[4096] = b'X';
        assert!(matches!(Ovmf::parse(bad), Err(OvmfError::Metadata(_))));
        // An entry claiming more bytes than the table has.
        let mut bad = test_image(&[]);
        let footer_at = bad.len() - 32 - ENTRY_HEADER;
        bad[footer_at - ENTRY_HEADER] = 0xff;
        bad[footer_at - ENTRY_HEADER + 1] = 0x0f;
        assert!(matches!(Ovmf::parse(bad), Err(OvmfError::Table(_))));
    }
}
