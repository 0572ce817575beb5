//! Lays out the guest's initramfs: the agent as `/init`, the selected modules flat under
//! `/lib/modules/<release>/`, the load order in `/etc/cocoon/modules` and the directories
//! the agent mounts over. Optionally gzipped (without a timestamp, so still reproducible).

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use flate2::{Compression as GzLevel, GzBuilder};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::cpio::{Archive, CpioError};
use crate::elf::Elf;

/// Where the agent reads which modules to load, in order (see the guest-agent crate).
pub const MODULES_LIST_PATH: &str = "/etc/cocoon/modules";
/// Linux's console character device (Documentation/admin-guide/devices.txt: 5,1).
const CONSOLE_MAJOR: u32 = 5;
const CONSOLE_MINOR: u32 = 1;

#[derive(Debug, Error)]
pub enum InitramfsError {
    #[error("Agent binary {} does not exist", .0.display())]
    AgentNotFound(PathBuf),
    #[error("Agent binary {} is not a regular file", .0.display())]
    AgentNotFile(PathBuf),
    #[error("Agent binary {} is empty", .0.display())]
    AgentEmpty(PathBuf),
    #[error("Failed to read agent binary {}", path.display())]
    ReadAgent {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a statically linked executable: the guest has no loader for it", .0.display())]
    NotStatic(PathBuf),
    #[error("Failed to read {}", path.display())]
    ReadBinary {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Failed to lay out the initramfs")]
    Archive(#[from] CpioError),
    #[error("Failed to compress the initramfs")]
    Compress(#[source] io::Error),
}

/// How the cpio archive is stored. Uncompressed is the default: under software emulation
/// the guest spends longer inflating than the host saves copying.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    None,
    Gzip,
}

impl Compression {
    /// The image's file name for this encoding.
    pub fn file_name(self) -> &'static str {
        match self {
            Compression::None => "initramfs.cpio",
            Compression::Gzip => "initramfs.cpio.gz",
        }
    }
}

/// Reads the agent and checks it can plausibly be `/init`. A dynamically linked ELF only
/// warns: the builder does not execute it, but the guest has no loader to run it.
pub fn read_agent(path: &Path) -> Result<Vec<u8>, InitramfsError> {
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(InitramfsError::AgentNotFound(path.to_owned()))
        }
        Err(source) => {
            return Err(InitramfsError::ReadAgent {
                path: path.to_owned(),
                source,
            })
        }
    };
    if !meta.is_file() {
        return Err(InitramfsError::AgentNotFile(path.to_owned()));
    }
    let bytes = fs::read(path).map_err(|source| InitramfsError::ReadAgent {
        path: path.to_owned(),
        source,
    })?;
    if bytes.is_empty() {
        return Err(InitramfsError::AgentEmpty(path.to_owned()));
    }
    match Elf::parse(&bytes).and_then(|elf| elf.has_interpreter()) {
        Ok(true) => log::warn!(
            "agent {} is dynamically linked; the guest has no loader for it",
            path.display()
        ),
        Ok(false) => {}
        Err(_) => log::warn!("agent {} is not a 64-bit ELF executable", path.display()),
    }
    Ok(bytes)
}

/// Reads a tool for the guest (busybox), which must be a static ELF: unlike the agent,
/// a dynamic one is refused, since nothing in the image could ever run it.
pub fn read_static_binary(path: &Path) -> Result<Vec<u8>, InitramfsError> {
    let bytes = fs::read(path).map_err(|source| InitramfsError::ReadBinary {
        path: path.to_owned(),
        source,
    })?;
    match Elf::parse(&bytes).and_then(|elf| elf.has_interpreter()) {
        Ok(false) => Ok(bytes),
        _ => Err(InitramfsError::NotStatic(path.to_owned())),
    }
}

/// Adds busybox at `/bin/busybox` (the debug console makes its applet links at run time).
pub fn add_busybox(archive: &mut Archive, bytes: Vec<u8>) -> Result<(), InitramfsError> {
    archive.add_dir("bin", 0o755)?;
    archive.add_file("bin/busybox", 0o755, bytes)?;
    Ok(())
}

/// The text of `/etc/cocoon/modules`: `<name> <path>` per line, in load order.
pub fn modules_list(release: &str, load_order: &[String]) -> String {
    load_order
        .iter()
        .map(|name| format!("{name} {}\n", module_path(release, name)))
        .collect()
}

pub fn module_path(release: &str, name: &str) -> String {
    format!("/lib/modules/{release}/{name}.ko")
}

/// Builds the archive from the agent and `(name, bytes)` modules already in load order.
pub fn layout(
    agent: Vec<u8>,
    release: &str,
    modules: Vec<(String, Vec<u8>)>,
) -> Result<Archive, InitramfsError> {
    let mut archive = Archive::new();
    for (dir, perm) in [
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("run", 0o755),
        ("tmp", 0o1777),
        ("etc", 0o755),
        ("sbin", 0o755),
    ] {
        archive.add_dir(dir, perm)?;
    }
    archive.add_dir(&format!("lib/modules/{release}"), 0o755)?;
    // The kernel opens /dev/console for init's stdio before anything mounts devtmpfs.
    archive.add_char_device("dev/console", 0o600, CONSOLE_MAJOR, CONSOLE_MINOR)?;
    archive.add_file("init", 0o755, agent)?;
    let names: Vec<String> = modules.iter().map(|(n, _)| n.clone()).collect();
    archive.add_file(
        MODULES_LIST_PATH,
        0o644,
        modules_list(release, &names).into_bytes(),
    )?;
    for (name, bytes) in modules {
        archive.add_file(&module_path(release, &name), 0o644, bytes)?;
    }
    Ok(archive)
}

/// Serialises the archive with the chosen compression.
pub fn encode(archive: &Archive, compression: Compression) -> Result<Vec<u8>, InitramfsError> {
    let raw = archive.to_bytes();
    match compression {
        Compression::None => Ok(raw),
        Compression::Gzip => {
            // mtime 0 and no file name keep the gzip header constant.
            let mut gz = GzBuilder::new().mtime(0).write(Vec::new(), GzLevel::best());
            gz.write_all(&raw).map_err(InitramfsError::Compress)?;
            gz.finish().map_err(InitramfsError::Compress)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio;

    #[test]
    fn lays_out_agent_modules_and_list() {
        let modules = vec![
            ("virtio".to_string(), vec![1u8; 3]),
            ("virtio_mmio".to_string(), vec![2u8; 9]),
        ];
        let archive = layout(b"agent".to_vec(), "6.1.0-x", modules).unwrap();
        let entries = cpio::parse(&encode(&archive, Compression::None).unwrap()).unwrap();
        let get = |n: &str| {
            entries
                .iter()
                .find(|e| e.name == n)
                .unwrap_or_else(|| panic!("{n} missing"))
        };
        assert_eq!(get("init").data, b"agent");
        assert_eq!(get("init").perm(), 0o755);
        assert_eq!(get("lib/modules/6.1.0-x/virtio_mmio.ko").data, vec![2u8; 9]);
        assert_eq!(
            String::from_utf8(get("etc/cocoon/modules").data.clone()).unwrap(),
            "virtio /lib/modules/6.1.0-x/virtio.ko\nvirtio_mmio /lib/modules/6.1.0-x/virtio_mmio.ko\n"
        );
        assert_eq!(get("tmp").perm(), 0o1777);
        for d in [
            "proc",
            "sys",
            "dev",
            "run",
            "etc",
            "sbin",
            "lib/modules/6.1.0-x",
        ] {
            assert!(get(d).is_dir(), "{d}");
        }
        assert!(get("dev/console").is_char_device());
    }

    #[test]
    fn gzip_is_reproducible_and_inflates_to_the_archive() {
        use std::io::Read;
        let archive = layout(b"agent".to_vec(), "r", Vec::new()).unwrap();
        let one = encode(&archive, Compression::Gzip).unwrap();
        assert_eq!(one, encode(&archive, Compression::Gzip).unwrap());
        assert_eq!(&one[4..8], &[0, 0, 0, 0], "gzip mtime must be zero");
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(&one[..])
            .read_to_end(&mut raw)
            .unwrap();
        assert_eq!(raw, archive.to_bytes());
    }

    #[test]
    fn agent_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-agent");
        assert_eq!(
            read_agent(&missing).unwrap_err().to_string(),
            format!("Agent binary {} does not exist", missing.display())
        );
        assert!(matches!(
            read_agent(dir.path()),
            Err(InitramfsError::AgentNotFile(_))
        ));
        let empty = dir.path().join("empty");
        fs::write(&empty, b"").unwrap();
        assert!(matches!(
            read_agent(&empty),
            Err(InitramfsError::AgentEmpty(_))
        ));
    }
}
