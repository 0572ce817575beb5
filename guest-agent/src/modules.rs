//! Kernel module loading. The image ships the modules the guest needs with a
//! list in dependency order (there is no modprobe nor modules.dep in the
//! guest); parameters given on the kernel command line as `mod.param=value`
//! are passed on, as modprobe would.

use std::ffi::CString;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use nix::kmod::{finit_module, ModuleInitFlags};
use thiserror::Error;

use crate::cmdline;

#[derive(Debug, Error)]
pub enum ModuleError {
    #[error("cannot read the module list {0}")]
    List(PathBuf, #[source] std::io::Error),
    #[error("malformed line {line} in the module list: {text:?}")]
    Malformed { line: usize, text: String },
    #[error("cannot open module {0}")]
    Open(PathBuf, #[source] std::io::Error),
    #[error("parameters for module {0} contain a NUL byte")]
    Params(String),
    #[error("cannot load module {name} from {path}")]
    Load {
        name: String,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// One entry of the module list: `<name> <path>`.
#[derive(Debug, PartialEq, Eq)]
pub struct ModuleEntry {
    pub name: String,
    pub path: PathBuf,
}

pub fn parse_list(text: &str) -> Result<Vec<ModuleEntry>, ModuleError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next(), parts.next()) {
            (Some(name), Some(path), None) => out.push(ModuleEntry {
                name: name.to_string(),
                path: PathBuf::from(path),
            }),
            _ => {
                return Err(ModuleError::Malformed {
                    line: i + 1,
                    text: raw.to_string(),
                })
            }
        }
    }
    Ok(out)
}

/// Loads every listed module in order; returns the names loaded. A module that
/// is already present (built in or loaded) is not an error.
pub fn load_listed(list: &Path, cmdline: &str) -> Result<Vec<String>, ModuleError> {
    let text = fs::read_to_string(list).map_err(|e| ModuleError::List(list.into(), e))?;
    let mut loaded = Vec::new();
    for entry in parse_list(&text)? {
        let file = File::open(&entry.path).map_err(|e| ModuleError::Open(entry.path.clone(), e))?;
        let params = cmdline::module_params(cmdline, &entry.name);
        let params = CString::new(params).map_err(|_| ModuleError::Params(entry.name.clone()))?;
        match finit_module(&file, &params, ModuleInitFlags::empty()) {
            Ok(()) | Err(nix::Error::EEXIST) => loaded.push(entry.name),
            Err(source) => {
                return Err(ModuleError::Load {
                    name: entry.name,
                    path: entry.path,
                    source,
                })
            }
        }
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_parses_and_rejects_garbage() {
        let l = parse_list("# order\nvirtio_ring /lib/modules/x/virtio_ring.ko\n\nvsock /v.ko\n")
            .unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(
            l[1],
            ModuleEntry {
                name: "vsock".into(),
                path: "/v.ko".into()
            }
        );
        let err = parse_list("a b c\n").unwrap_err();
        assert!(
            matches!(err, ModuleError::Malformed { line: 1, .. }),
            "{err}"
        );
    }

    #[test]
    fn missing_module_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("modules");
        fs::write(&list, "nope /nonexistent/nope.ko\n").unwrap();
        let err = load_listed(&list, "").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/nope.ko"), "{err}");
    }
}
