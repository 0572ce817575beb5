//! A minimal ELF64 little-endian reader: just enough to find a section by name (a kernel
//! module's `.modinfo`) and to tell whether an executable asks for a dynamic loader.
//! Bounds are checked everywhere; malformed input is an error, never a panic.

use thiserror::Error;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
/// Program header type of the dynamic loader path (System V gABI, "Program Header").
const PT_INTERP: u32 = 3;
const ELF64_EHDR_SIZE: usize = 64;
const ELF64_SHDR_SIZE: usize = 64;
const ELF64_PHDR_SIZE: usize = 56;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ElfError {
    #[error("Not an ELF file")]
    NotElf,
    #[error("Only 64-bit little-endian ELF is supported")]
    Unsupported,
    #[error("ELF {what} lies outside the file")]
    OutOfBounds { what: &'static str },
    #[error("ELF section name table index {0} is invalid")]
    BadStringTable(u16),
}

/// A borrowed view of an ELF64 LE image.
pub struct Elf<'a> {
    data: &'a [u8],
}

struct SectionHeader {
    name: u32,
    offset: u64,
    size: u64,
}

impl<'a> Elf<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Self, ElfError> {
        if data.len() < 4 || &data[..4] != ELF_MAGIC {
            return Err(ElfError::NotElf);
        }
        if data.len() < ELF64_EHDR_SIZE {
            return Err(ElfError::OutOfBounds { what: "header" });
        }
        if data[4] != ELFCLASS64 || data[5] != ELFDATA2LSB {
            return Err(ElfError::Unsupported);
        }
        Ok(Elf { data })
    }

    fn u16_at(&self, off: usize, what: &'static str) -> Result<u16, ElfError> {
        slice(self.data, off as u64, 2, what).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32_at(&self, off: usize, what: &'static str) -> Result<u32, ElfError> {
        slice(self.data, off as u64, 4, what)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or([0; 4])))
    }

    fn u64_at(&self, off: usize, what: &'static str) -> Result<u64, ElfError> {
        slice(self.data, off as u64, 8, what)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    }

    fn section_header(&self, index: u16) -> Result<SectionHeader, ElfError> {
        let shoff = self.u64_at(0x28, "header")?;
        let entsize = u64::from(self.u16_at(0x3a, "header")?).max(ELF64_SHDR_SIZE as u64);
        let base = shoff
            .checked_add(u64::from(index) * entsize)
            .ok_or(ElfError::OutOfBounds {
                what: "section header",
            })?;
        let hdr = slice(self.data, base, ELF64_SHDR_SIZE as u64, "section header")?;
        let hdr = Elf { data: hdr };
        Ok(SectionHeader {
            name: hdr.u32_at(0, "section header")?,
            offset: hdr.u64_at(0x18, "section header")?,
            size: hdr.u64_at(0x20, "section header")?,
        })
    }

    /// The contents of the first section called `name`, if any.
    pub fn section(&self, name: &str) -> Result<Option<&'a [u8]>, ElfError> {
        let shnum = self.u16_at(0x3c, "header")?;
        let shstrndx = self.u16_at(0x3e, "header")?;
        if shnum == 0 {
            return Ok(None);
        }
        if shstrndx >= shnum {
            return Err(ElfError::BadStringTable(shstrndx));
        }
        let strtab = self.section_header(shstrndx)?;
        let strtab = slice(self.data, strtab.offset, strtab.size, "section name table")?;
        for i in 0..shnum {
            let sh = self.section_header(i)?;
            let start = sh.name as usize;
            let Some(rest) = strtab.get(start..) else {
                return Err(ElfError::OutOfBounds {
                    what: "section name",
                });
            };
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            if &rest[..end] == name.as_bytes() {
                return slice(self.data, sh.offset, sh.size, "section").map(Some);
            }
        }
        Ok(None)
    }

    /// Whether the file names a dynamic loader (`PT_INTERP`), i.e. is not static.
    pub fn has_interpreter(&self) -> Result<bool, ElfError> {
        let phoff = self.u64_at(0x20, "header")?;
        let entsize = u64::from(self.u16_at(0x36, "header")?).max(ELF64_PHDR_SIZE as u64);
        let phnum = self.u16_at(0x38, "header")?;
        for i in 0..u64::from(phnum) {
            let base = phoff
                .checked_add(i * entsize)
                .ok_or(ElfError::OutOfBounds {
                    what: "program header",
                })?;
            let ph = slice(self.data, base, 4, "program header")?;
            if u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == PT_INTERP {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

fn slice<'a>(data: &'a [u8], off: u64, len: u64, what: &'static str) -> Result<&'a [u8], ElfError> {
    let end = off.checked_add(len).ok_or(ElfError::OutOfBounds { what })?;
    let (Ok(off), Ok(end)) = (usize::try_from(off), usize::try_from(end)) else {
        return Err(ElfError::OutOfBounds { what });
    };
    data.get(off..end).ok_or(ElfError::OutOfBounds { what })
}

#[cfg(test)]
pub(crate) mod test_utils {
    /// Builds a tiny relocatable ELF64 LE file with the given named sections.
    pub fn build_elf(sections: &[(&str, &[u8])]) -> Vec<u8> {
        let mut shstrtab = vec![0u8];
        let mut names = Vec::new();
        for (name, _) in sections {
            names.push(shstrtab.len() as u32);
            shstrtab.extend_from_slice(name.as_bytes());
            shstrtab.push(0);
        }
        let shstrtab_name = shstrtab.len() as u32;
        shstrtab.extend_from_slice(b".shstrtab\0");

        let mut out = vec![0u8; 64];
        let mut offsets = Vec::new();
        for (_, data) in sections {
            offsets.push(out.len() as u64);
            out.extend_from_slice(data);
        }
        let strtab_off = out.len() as u64;
        out.extend_from_slice(&shstrtab);
        out.resize(out.len().next_multiple_of(8), 0);
        let shoff = out.len() as u64;
        // Null section, then ours, then .shstrtab.
        out.extend_from_slice(&[0u8; 64]);
        let mut push_sh = |name: u32, off: u64, size: u64| {
            let mut sh = [0u8; 64];
            sh[0..4].copy_from_slice(&name.to_le_bytes());
            sh[4..8].copy_from_slice(&1u32.to_le_bytes());
            sh[0x18..0x20].copy_from_slice(&off.to_le_bytes());
            sh[0x20..0x28].copy_from_slice(&size.to_le_bytes());
            out.extend_from_slice(&sh);
        };
        for (i, (_, data)) in sections.iter().enumerate() {
            push_sh(names[i], offsets[i], data.len() as u64);
        }
        push_sh(shstrtab_name, strtab_off, shstrtab.len() as u64);
        let shnum = sections.len() as u16 + 2;
        out[0..4].copy_from_slice(b"\x7fELF");
        out[4] = 2;
        out[5] = 1;
        out[6] = 1;
        out[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        out[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        out[0x3c..0x3e].copy_from_slice(&shnum.to_le_bytes());
        out[0x3e..0x40].copy_from_slice(&(shnum - 1).to_le_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::test_utils::build_elf;
    use super::*;

    #[test]
    fn finds_section_by_name() {
        let elf = build_elf(&[(".text", b"\x90\x90"), (".modinfo", b"name=x\0")]);
        let elf = Elf::parse(&elf).unwrap();
        assert_eq!(elf.section(".modinfo").unwrap(), Some(&b"name=x\0"[..]));
        assert_eq!(elf.section(".missing").unwrap(), None);
        assert!(!elf.has_interpreter().unwrap());
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        assert_eq!(Elf::parse(b"#!/bin/sh\n").err(), Some(ElfError::NotElf));
        let mut elf = build_elf(&[(".modinfo", b"a=b\0")]);
        // Point the section header table past the end of the file.
        elf[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        let parsed = Elf::parse(&elf).unwrap();
        assert!(matches!(
            parsed.section(".modinfo"),
            Err(ElfError::OutOfBounds { .. })
        ));
        for len in 0..elf.len().min(200) {
            if let Ok(e) = Elf::parse(&elf[..len]) {
                let _ = e.section(".modinfo");
                let _ = e.has_interpreter();
            }
        }
        let mut elf32 = build_elf(&[]);
        elf32[4] = 1;
        assert_eq!(Elf::parse(&elf32).err(), Some(ElfError::Unsupported));
    }
}
