//! TDVF (OVMF built for TDX) as a TD's launch sees it, and MRTD: the measurement the TDX
//! module builds while the VMM adds the firmware's pages (`KVM_TDX_INIT_MEM_REGION`).
//!
//! The firmware's GUIDed table (the same footer table SEV uses) has an entry
//! e47a6535-984a-4798-865e-4685a7bf8ec2 whose last 4 bytes are the distance from the
//! image's end to the TDVF descriptor: "TDVF", length, version 1, a section count, then
//! sections of 32 bytes (data offset and raw size in the image, guest address and size
//! in memory, type, attributes: bit 0 MR.EXTEND, bit 1 PAGE.AUG).
//!
//! MRTD is SHA-384 over, for each section in order and each of its pages: unless the
//! section is PAGE.AUG (accepted by the guest later, never added), the 128-byte record of
//! TDH.MEM.PAGE.ADD ("MEM.PAGE.ADD", the page's GPA at byte 16); if it is MR.EXTEND,
//! for each 256-byte chunk the record of TDH.MR.EXTEND ("MR.EXTEND", the chunk's GPA at
//! byte 16) followed by the chunk (Intel TDX Module ABI, TDH.MEM.PAGE.ADD and
//! TDH.MR.EXTEND).
//!
//! Unverified: no reference tool was at hand to compare with (virtee's `tdx-measure` is
//! on neither crates.io nor PyPI); the RTMRs (which depend on QEMU's ACPI tables, the
//! TD HOB and the boot variables) are not computed.

use sha2::{Digest, Sha384};

use crate::snp::ovmf::{footer_table, guid, Guid};

pub const TDX_METADATA_GUID: Guid = guid("e47a6535-984a-4798-865e-4685a7bf8ec2");
const PAGE: u64 = 4096;
const CHUNK: usize = 256;
const MR_EXTEND: u32 = 1;
const PAGE_AUG: u32 = 2;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TdvfError {
    #[error("the firmware's GUIDed table is malformed: {0}")]
    Table(String),
    #[error(
        "the firmware has no TDX metadata (its table has no e47a6535-… entry): it is not TDVF"
    )]
    NoMetadata,
    #[error("the firmware's TDX metadata is malformed: {0}")]
    Metadata(String),
}

/// The kinds of TDVF sections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SectionType {
    /// The boot firmware volume (code).
    Bfv,
    /// The configuration firmware volume (variables).
    Cfv,
    TdHob,
    TempMem,
    PermMem,
    Payload,
    PayloadParam,
}

/// One section of the TDVF descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    pub data_offset: u32,
    pub raw_size: u32,
    pub gpa: u64,
    pub memory_size: u64,
    pub kind: SectionType,
    pub attributes: u32,
}

impl Section {
    /// Whether the TDX module extends MRTD with this section's contents.
    pub fn measured(&self) -> bool {
        self.attributes & MR_EXTEND != 0
    }
    /// Whether the VMM adds its pages at launch (else the guest accepts them later).
    pub fn added(&self) -> bool {
        self.attributes & PAGE_AUG == 0
    }
}

/// A TDVF image and its sections.
pub struct Tdvf {
    data: Vec<u8>,
    sections: Vec<Section>,
}

impl Tdvf {
    pub fn parse(data: Vec<u8>) -> Result<Tdvf, TdvfError> {
        let table = footer_table(&data).map_err(|e| TdvfError::Table(e.to_string()))?;
        let entry = table.get(&TDX_METADATA_GUID).ok_or(TdvfError::NoMetadata)?;
        let bad = |s: String| TdvfError::Metadata(s);
        let back = entry
            .len()
            .checked_sub(4)
            .map(|at| u32::from_le_bytes(entry[at..].try_into().expect("4 bytes")) as usize)
            .ok_or_else(|| bad("its table entry holds no offset".into()))?;
        let at = data.len().checked_sub(back).ok_or_else(|| {
            bad(format!(
                "the descriptor's offset {back} is past the image's start"
            ))
        })?;
        let header = data
            .get(at..at + 16)
            .ok_or_else(|| bad("the descriptor runs past the image".into()))?;
        let u32_at =
            |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at =
            |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        if &header[..4] != b"TDVF" {
            return Err(bad("no TDVF signature at the offset the table gives".into()));
        }
        if u32_at(header, 8) != 1 {
            return Err(bad(format!(
                "descriptor version {}, not 1",
                u32_at(header, 8)
            )));
        }
        let count = u32_at(header, 12) as usize;
        let table_end = count
            .checked_mul(32)
            .and_then(|n| n.checked_add(at + 16))
            .filter(|end| *end <= data.len())
            .ok_or_else(|| bad(format!("{count} sections run past the image")))?;
        let mut sections = Vec::with_capacity(count);
        for raw in data[at + 16..table_end].chunks(32) {
            let kind = match u32_at(raw, 24) {
                0 => SectionType::Bfv,
                1 => SectionType::Cfv,
                2 => SectionType::TdHob,
                3 => SectionType::TempMem,
                4 => SectionType::PermMem,
                5 => SectionType::Payload,
                6 => SectionType::PayloadParam,
                t => return Err(bad(format!("section type {t} is not one TDVF defines"))),
            };
            let s = Section {
                data_offset: u32_at(raw, 0),
                raw_size: u32_at(raw, 4),
                gpa: u64_at(raw, 8),
                memory_size: u64_at(raw, 16),
                kind,
                attributes: u32_at(raw, 28),
            };
            if !s.gpa.is_multiple_of(PAGE) || !s.memory_size.is_multiple_of(PAGE) {
                return Err(bad(format!(
                    "section at {:#x} (+{:#x}) is not page-aligned",
                    s.gpa, s.memory_size
                )));
            }
            // Firmware sections live below 4 GiB: anything larger is a malformed
            // descriptor, and would make MRTD's computation run for ages.
            if s.gpa
                .checked_add(s.memory_size)
                .is_none_or(|end| end > 1 << 32)
            {
                return Err(bad(format!(
                    "section at {:#x} (+{:#x}) ends above 4 GiB",
                    s.gpa, s.memory_size
                )));
            }
            if u64::from(s.raw_size) > s.memory_size {
                return Err(bad(format!(
                    "section at {:#x} has more data ({:#x}) than memory",
                    s.gpa, s.raw_size
                )));
            }
            let data_end = s.data_offset as usize + s.raw_size as usize;
            if data_end > data.len() {
                return Err(bad(format!(
                    "section at {:#x} takes bytes past the image",
                    s.gpa
                )));
            }
            // A measured section's pages are its data: data that stops short would
            // leave the measurement to whatever the VMM puts after it.
            if s.measured() && u64::from(s.raw_size) != s.memory_size {
                return Err(bad(format!(
                    "measured section at {:#x} holds {:#x} bytes of data for {:#x} of memory",
                    s.gpa, s.raw_size, s.memory_size
                )));
            }
            sections.push(s);
        }
        Ok(Tdvf { data, sections })
    }

    pub fn sections(&self) -> &[Section] {
        &self.sections
    }

    /// The bytes a section puts in memory (its raw data; the rest of its memory is zero).
    pub fn section_data(&self, s: &Section) -> &[u8] {
        &self.data[s.data_offset as usize..s.data_offset as usize + s.raw_size as usize]
    }

    /// MRTD after the VMM adds every section as the TDX module sees it.
    pub fn mrtd(&self) -> [u8; 48] {
        let mut m = Mrtd::default();
        for s in &self.sections {
            for page in 0..s.memory_size / PAGE {
                let gpa = s.gpa + page * PAGE;
                if s.added() {
                    m.page_add(gpa);
                }
                if s.measured() {
                    let at = (page * PAGE) as usize;
                    m.extend_page(gpa, &self.section_data(s)[at..at + PAGE as usize]);
                }
            }
        }
        m.finish()
    }
}

/// MRTD as the TDX module accumulates it, one operation at a time (what a VMM's recorded
/// launch folds too).
#[derive(Clone, Default)]
pub struct Mrtd(Sha384);

impl Mrtd {
    /// TDH.MEM.PAGE.ADD of the page at `gpa`.
    pub fn page_add(&mut self, gpa: u64) {
        self.0.update(record(b"MEM.PAGE.ADD", gpa));
    }

    /// TDH.MR.EXTEND of each 256-byte chunk of the page at `gpa`.
    pub fn extend_page(&mut self, gpa: u64, page: &[u8]) {
        for (i, chunk) in page.chunks(CHUNK).enumerate() {
            self.0
                .update(record(b"MR.EXTEND", gpa + (i * CHUNK) as u64));
            self.0.update(chunk);
        }
    }

    pub fn finish(self) -> [u8; 48] {
        self.0.finalize().into()
    }
}

fn record(op: &[u8], gpa: u64) -> [u8; 128] {
    let mut r = [0u8; 128];
    r[..op.len()].copy_from_slice(op);
    r[16..24].copy_from_slice(&gpa.to_le_bytes());
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A section as the descriptor stores it: data offset, raw size, GPA, memory size,
    /// type, attributes.
    type Raw = (u32, u32, u64, u64, u32, u32);

    /// A firmware image of `pages` pages whose TDVF descriptor lists `sections`.
    fn image(pages: usize, sections: &[Raw]) -> Vec<u8> {
        let len = pages * 4096;
        let mut d: Vec<u8> = (0..len).map(|i| (i * 31 % 253) as u8).collect();
        // The descriptor at 0x100 from the start.
        let desc = 0x100;
        d[desc..desc + 4].copy_from_slice(b"TDVF");
        d[desc + 4..desc + 8].copy_from_slice(&(16 + 32 * sections.len() as u32).to_le_bytes());
        d[desc + 8..desc + 12].copy_from_slice(&1u32.to_le_bytes());
        d[desc + 12..desc + 16].copy_from_slice(&(sections.len() as u32).to_le_bytes());
        for (i, s) in sections.iter().enumerate() {
            let at = desc + 16 + 32 * i;
            d[at..at + 4].copy_from_slice(&s.0.to_le_bytes());
            d[at + 4..at + 8].copy_from_slice(&s.1.to_le_bytes());
            d[at + 8..at + 16].copy_from_slice(&s.2.to_le_bytes());
            d[at + 16..at + 24].copy_from_slice(&s.3.to_le_bytes());
            d[at + 24..at + 28].copy_from_slice(&s.4.to_le_bytes());
            d[at + 28..at + 32].copy_from_slice(&s.5.to_le_bytes());
        }
        // The GUIDed table: the metadata entry (offset from the end), then the footer.
        let footer = len - 32 - 18;
        let entry = footer - 22;
        d[entry..entry + 4].copy_from_slice(&((len - desc) as u32).to_le_bytes());
        d[entry + 4..entry + 6].copy_from_slice(&22u16.to_le_bytes());
        d[entry + 6..entry + 22].copy_from_slice(&TDX_METADATA_GUID);
        d[footer..footer + 2].copy_from_slice(&(22u16 + 18).to_le_bytes());
        d[footer + 2..footer + 18].copy_from_slice(&crate::snp::ovmf::TABLE_FOOTER_GUID);
        d
    }

    #[test]
    fn mrtd_by_hand() {
        // A measured code section (page 1 of the image, at 0xfffff000), a two-page
        // unmeasured HOB, and a PAGE.AUG section that is never added.
        let fw = image(
            2,
            &[
                (0x1000, 0x1000, 0xffff_f000, 0x1000, 0, 1),
                (0, 0, 0x80_0000, 0x2000, 2, 0),
                (0, 0, 0x90_0000, 0x1000, 3, 2),
            ],
        );
        let t = Tdvf::parse(fw.clone()).unwrap();
        let mut h = Sha384::new();
        let rec = |op: &[u8], gpa: u64| {
            let mut r = vec![0u8; 128];
            r[..op.len()].copy_from_slice(op);
            r[16..24].copy_from_slice(&gpa.to_le_bytes());
            r
        };
        h.update(rec(b"MEM.PAGE.ADD", 0xffff_f000));
        for i in 0..16u64 {
            h.update(rec(b"MR.EXTEND", 0xffff_f000 + i * 256));
            h.update(&fw[0x1000 + i as usize * 256..0x1000 + (i as usize + 1) * 256]);
        }
        h.update(rec(b"MEM.PAGE.ADD", 0x80_0000));
        h.update(rec(b"MEM.PAGE.ADD", 0x80_1000));
        assert_eq!(t.mrtd()[..], h.finalize()[..]);
    }

    #[test]
    fn malformed_descriptors_are_named() {
        let cases: [(&[Raw], &str); 6] = [
            (&[(0, 0, 0xffff_f000, 0x2000, 2, 0)], "ends above 4 GiB"),
            (&[(0, 0, 0x1001, 0x1000, 2, 0)], "not page-aligned"),
            (&[(0, 0x2000, 0x1000, 0x1000, 0, 1)], "more data"),
            (
                &[(0x1000, 0x1000, 0x1000, 0x2000, 0, 1)],
                "holds 0x1000 bytes of data for 0x2000",
            ),
            (&[(0x1800, 0x1000, 0x1000, 0x1000, 0, 0)], "past the image"),
            (&[(0, 0, 0x1000, 0x1000, 9, 0)], "section type 9"),
        ];
        for (sections, want) in cases {
            let e = Tdvf::parse(image(2, sections)).err().unwrap().to_string();
            assert!(e.contains(want), "{e} lacks {want}");
        }
        assert_eq!(
            Tdvf::parse(vec![0; 8192]).err(),
            Some(TdvfError::NoMetadata)
        );
        let mut fw = image(2, &[]);
        fw[0x100] = b'X';
        assert!(Tdvf::parse(fw)
            .err()
            .unwrap()
            .to_string()
            .contains("no TDVF signature"));
    }

    #[test]
    fn debians_ovmf_is_tdvf() {
        let path = "/usr/share/ovmf/OVMF.fd";
        let Ok(fw) = std::fs::read(path) else {
            panic!("{path} is missing: install Debian's ovmf package (scripts/setup-host.sh does)");
        };
        let t = Tdvf::parse(fw).unwrap();
        let kinds: Vec<_> = t
            .sections()
            .iter()
            .map(|s| (s.kind, s.measured()))
            .collect();
        assert_eq!(
            kinds[..2],
            [(SectionType::Bfv, true), (SectionType::Cfv, false)]
        );
        assert!(kinds[2..]
            .iter()
            .all(|(k, m)| matches!(k, SectionType::TdHob | SectionType::TempMem) && !m));
    }
}
