//! Reads a kernel module's `.modinfo` section: NUL-separated `key=value` strings written by
//! `MODULE_INFO()` (include/linux/moduleparam.h). We need `name` and `depends`; `softdep`
//! is kept for logging only because its targets are aliases, not module names.

use thiserror::Error;

use crate::elf::{Elf, ElfError};

#[derive(Debug, Error)]
pub enum ModinfoError {
    #[error("Module file is not a valid ELF object")]
    Elf(#[from] ElfError),
    #[error("Module file has no .modinfo section")]
    NoModinfo,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModInfo {
    /// `name=` as the kernel will register it; absent in very old modules.
    pub name: Option<String>,
    /// `depends=`: modules that must be loaded first, normalised to `_` spelling.
    pub depends: Vec<String>,
    /// Raw `softdep=` values such as `pre: crc32c`.
    pub softdeps: Vec<String>,
}

/// Module names are spelled with `-` or `_` interchangeably; the kernel uses `_`.
pub fn normalize_name(name: &str) -> String {
    name.replace('-', "_")
}

/// Parses the content of a `.modinfo` section.
pub fn parse_modinfo_section(section: &[u8]) -> ModInfo {
    let mut info = ModInfo::default();
    for field in section.split(|&b| b == 0) {
        let field = String::from_utf8_lossy(field);
        let Some((key, value)) = field.split_once('=') else {
            continue;
        };
        match key {
            "name" => info.name = Some(normalize_name(value)),
            "depends" => info.depends.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|d| !d.is_empty())
                    .map(normalize_name),
            ),
            "softdep" => info.softdeps.push(value.to_owned()),
            _ => {}
        }
    }
    info
}

/// Parses the `.modinfo` section of a module file's bytes.
pub fn parse_module(bytes: &[u8]) -> Result<ModInfo, ModinfoError> {
    let elf = Elf::parse(bytes)?;
    let section = elf.section(".modinfo")?.ok_or(ModinfoError::NoModinfo)?;
    Ok(parse_modinfo_section(section))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elf::test_utils::build_elf;

    #[test]
    fn parses_depends_name_and_softdep() {
        let section =
            b"license=GPL\0depends=virtio,vmw_vsock-virtio_transport_common,virtio_ring,vsock\0\
softdep=pre: crc32c\0name=vmw_vsock_virtio_transport\0vermagic=6.1.0 SMP mod_unload\0";
        let info = parse_modinfo_section(section);
        assert_eq!(info.name.as_deref(), Some("vmw_vsock_virtio_transport"));
        assert_eq!(
            info.depends,
            [
                "virtio",
                "vmw_vsock_virtio_transport_common",
                "virtio_ring",
                "vsock"
            ]
        );
        assert_eq!(info.softdeps, ["pre: crc32c"]);
    }

    #[test]
    fn empty_depends_means_none() {
        let info = parse_modinfo_section(b"depends=\0name=overlay\0\0\0junk-without-equals\0");
        assert!(info.depends.is_empty());
        assert_eq!(info.name.as_deref(), Some("overlay"));
    }

    #[test]
    fn reads_the_section_from_an_elf_module() {
        let ko = build_elf(&[
            (".text", b"\xc3"),
            (".modinfo", b"depends=fuse,virtio\0name=virtiofs\0"),
        ]);
        let info = parse_module(&ko).unwrap();
        assert_eq!(info.depends, ["fuse", "virtio"]);
        assert!(matches!(
            parse_module(&build_elf(&[(".text", b"")])),
            Err(ModinfoError::NoModinfo)
        ));
        assert!(matches!(
            parse_module(b"not a module"),
            Err(ModinfoError::Elf(ElfError::NotElf))
        ));
    }
}
