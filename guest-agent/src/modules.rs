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
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// Modules on the path to a ready agent: the virtio transports and vsock.
/// They load before the server starts; the rest (filesystems, net) load right
/// after, off the boot path, but for the block driver ([`ON_DEMAND`]).
pub const BOOT_CRITICAL: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
];

/// The virtio PCI transport: boot-critical only on machines with a PCI bus
/// (QEMU `-M pc`), where the vsock device sits on it. microvm has none.
pub const PCI_TRANSPORT: &[&str] = &[
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
];

/// Modules loaded only when first needed: `virtio_blk` probes every disk slot a VM
/// boots with (cocoon-vmm, QEMU's microvm), which most pods never use; it loads when a
/// container first names a block device ([`load_on_demand`]).
pub const ON_DEMAND: &[&str] = &["virtio_blk"];

pub fn is_boot_critical(name: &str, has_pci: bool) -> bool {
    BOOT_CRITICAL.contains(&name) || (has_pci && PCI_TRANSPORT.contains(&name))
}

/// Whether `list` has a module that is boot-critical only on a PCI bus: if not, the bus
/// need not be looked at (a sysfs directory read, first-run code under TCG).
pub fn needs_pci_check(list: &[ModuleEntry]) -> bool {
    list.iter()
        .any(|e| PCI_TRANSPORT.contains(&e.name.as_str()))
}

/// Whether the guest has any PCI device (after sysfs is mounted).
pub fn has_pci_devices() -> bool {
    fs::read_dir("/sys/bus/pci/devices").is_ok_and(|mut d| d.next().is_some())
}

/// Reads the module list.
pub fn read_list(list: &Path) -> Result<Vec<ModuleEntry>, ModuleError> {
    let text = fs::read_to_string(list).map_err(|e| ModuleError::List(list.into(), e))?;
    parse_list(&text)
}

/// Loads the given modules in order; returns the names loaded. A module that
/// is already present (built in or loaded) is not an error.
pub fn load(entries: Vec<ModuleEntry>, cmdline: &str) -> Result<Vec<String>, ModuleError> {
    let mut loaded = Vec::new();
    for entry in entries {
        let t = std::time::Instant::now();
        let file = File::open(&entry.path).map_err(|e| ModuleError::Open(entry.path.clone(), e))?;
        let params = cmdline::module_params(cmdline, &entry.name);
        let params = CString::new(params).map_err(|_| ModuleError::Params(entry.name.clone()))?;
        match finit_module(&file, &params, ModuleInitFlags::empty()) {
            Ok(()) | Err(nix::Error::EEXIST) => {
                tracing::debug!(module = %entry.name, us = t.elapsed().as_micros() as u64, "loaded");
                loaded.push(entry.name)
            }
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

/// Loads the on-demand modules still `pending`, once: callers at the same time wait for
/// the first; a failed load stays pending (the next caller tries again). The names
/// loaded join `loaded`.
pub fn load_on_demand(
    pending: &std::sync::Mutex<Vec<ModuleEntry>>,
    loaded: &std::sync::Mutex<Vec<String>>,
    cmdline: &str,
) -> Result<(), ModuleError> {
    let mut pending = pending.lock().unwrap_or_else(|e| e.into_inner());
    if pending.is_empty() {
        return Ok(());
    }
    let names = load(pending.clone(), cmdline)?;
    pending.clear();
    loaded
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(names);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pci_bus_is_looked_at_only_for_a_pci_transport() {
        let entry = |name: &str| ModuleEntry {
            name: name.into(),
            path: format!("/lib/modules/x/{name}.ko").into(),
        };
        // Cocoon's kernel: only the block driver is a module.
        assert!(!needs_pci_check(&[entry("virtio_blk")]));
        assert!(!needs_pci_check(&[]));
        // Debian's: the PCI transport is boot-critical on a machine with the bus.
        let debian = [entry("virtio_ring"), entry("virtio_pci_modern_dev")];
        assert!(needs_pci_check(&debian));
    }

    #[test]
    fn an_on_demand_module_that_fails_to_load_stays_pending() {
        let entry = ModuleEntry {
            name: "virtio_blk".into(),
            path: "/nonexistent/virtio_blk.ko".into(),
        };
        let pending = std::sync::Mutex::new(vec![entry]);
        let loaded = std::sync::Mutex::new(vec!["virtio_mmio".to_owned()]);
        let e = load_on_demand(&pending, &loaded, "").unwrap_err();
        assert!(e.to_string().contains("virtio_blk"), "{e}");
        assert_eq!(
            pending.lock().unwrap().len(),
            1,
            "tried again by the next caller"
        );
        assert_eq!(*loaded.lock().unwrap(), ["virtio_mmio"]);
        // Nothing pending: nothing to do.
        let none = std::sync::Mutex::new(Vec::new());
        load_on_demand(&none, &loaded, "").unwrap();
        assert_eq!(*loaded.lock().unwrap(), ["virtio_mmio"]);
    }

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
    fn pci_transport_is_critical_only_with_pci() {
        assert!(is_boot_critical("vsock", false));
        assert!(!is_boot_critical("virtio_pci", false));
        assert!(is_boot_critical("virtio_pci", true));
        assert!(!is_boot_critical("overlay", true));
    }

    #[test]
    fn missing_module_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("modules");
        fs::write(&list, "nope /nonexistent/nope.ko\n").unwrap();
        let err = load(read_list(&list).unwrap(), "").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/nope.ko"), "{err}");
    }
}
