//! Whether pods with the node's config can start on this host: the verdict at the end
//! of `cocoon check` (and its exit status), which the node installer
//! (`deploy/install.sh`) reads before it labels a node for the RuntimeClass.
//!
//! Each reason is one a pod's creation would fail with, found without a pod: the same
//! backend choice (`hypervisor::from_config`), the same image check (`VmSpec::validate`),
//! the same binary lookup, and the jail's needs against what `check` found. Nothing is
//! booted: a node that passes can still fail a pod for a reason only a boot shows (a
//! broken kernel), which the pod's own error names.

use std::path::PathBuf;

use serde::Serialize;

use crate::chain;
use crate::check::{HostReport, KvmKind};
use crate::config::{Accel, Config, HugePages, HypervisorKind};
use crate::hypervisor::{self, find_binary, VmSpec};

/// `cocoon check`'s verdict on pods with the node's config.
#[derive(Debug, Clone, Serialize)]
pub struct PodsReady {
    /// The config file read; `None` for the built-in defaults.
    pub config: Option<PathBuf>,
    /// The backend pods would get, and why; `None` when there is no config to ask.
    pub backend: Option<String>,
    /// What stops a pod from starting here, one reason each; empty when pods can start.
    pub problems: Vec<String>,
}

impl PodsReady {
    pub fn ready(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The verdict for `config` (read from `path`, or the defaults) on the host `host`
/// describes. A config that cannot be read is itself the reason.
pub fn pods<E: std::error::Error>(
    path: Option<PathBuf>,
    config: &Result<Config, E>,
    host: &HostReport,
) -> PodsReady {
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            return PodsReady {
                config: path,
                backend: None,
                problems: vec![chain(e)],
            }
        }
    };
    let mut problems = Vec::new();
    let (kind, why) = hypervisor::resolve_hypervisor(config.hypervisor, host.kvm);
    let mut accel = None;
    let backend = match kind {
        HypervisorKind::CocoonVmm => format!("cocoon-vmm ({why})"),
        HypervisorKind::Qemu | HypervisorKind::Auto => {
            match hypervisor::resolve_accel(config.qemu.accel, host.kvm) {
                Ok((a, accel_why)) => {
                    accel = Some(a);
                    let name = if a == Accel::Kvm { "KVM" } else { "TCG" };
                    // Under `auto` both say the same of the host: once is enough.
                    if config.hypervisor == HypervisorKind::Auto && config.qemu.accel == Accel::Auto
                    {
                        format!("QEMU with {name} ({why})")
                    } else {
                        format!("QEMU with {name} ({why}; accelerator: {accel_why})")
                    }
                }
                Err(_) => "QEMU".to_string(),
            }
        }
    };
    // The backend as pod creation builds it: binaries found, choice possible here.
    if let Err(e) = hypervisor::from_config(config) {
        problems.push(chain(&e));
    }
    if accel == Some(Accel::Kvm) && host.kvm == KvmKind::Pvm {
        problems.push(
            "[qemu] accel = \"kvm\", but /dev/kvm is PVM (no vmx/svm), which cannot boot \
             stock Linux guests: set accel = \"auto\" or \"tcg\""
                .into(),
        );
    }
    if let Err(e) = VmSpec::from_config(config, "cocoon-check").validate() {
        problems.push(chain(&e));
    }
    problems.extend(virtiofsd_problem(config));
    if config.jail.enabled {
        if !host.root {
            problems.push(
                "[jail] enabled = true (the default) needs root: run containerd (and so \
                 the shim) as root, or set [jail] enabled = false"
                    .into(),
            );
        }
        if !host.seccomp {
            problems.push(
                "[jail] enabled = true (the default) needs the kernel's seccomp filters \
                 (CONFIG_SECCOMP_FILTER), which this kernel lacks"
                    .into(),
            );
        }
        if let (Some(Accel::Kvm), Some((mode, gid))) = (accel, host.dev_kvm) {
            if !crate::check::kvm_group_may_open(mode, gid) {
                problems.push(format!(
                    "a jailed QEMU opens /dev/kvm through its group, but /dev/kvm has mode \
                     {:o} and group {gid}: give it a kvm group with read-write access, or \
                     set [jail] enabled = false",
                    mode & 0o7777
                ));
            }
        }
        if config.jail.virtiofsd {
            if let Err(e) = &host.virtiofsd_jail {
                problems.push(format!(
                    "[jail] virtiofsd = true (the default) cannot work where pods' shares \
                     live ({}): {e}; it needs Linux >= 5.19 and a filesystem with idmapped \
                     mounts there (ext4, xfs, btrfs, tmpfs from 6.3); set paths.run_dir \
                     elsewhere, or [jail] virtiofsd = false to run virtiofsd as host root",
                    config.paths.run_dir.display()
                ));
            }
        }
    }
    if config.vm.huge_pages == HugePages::On {
        if let Err(e) = &host.huge_tmpfs {
            problems.push(format!(
                "vm.huge_pages = \"on\", but guest RAM's huge-page tmpfs cannot be made \
                 here: {e}; set it to \"auto\""
            ));
        }
    }
    PodsReady {
        config: path,
        backend: Some(backend),
        problems,
    }
}

/// Why pods could not run the virtiofsd `config` gives them: none found, or one whose
/// `--help` lacks an option pods pass it (or that cannot say).
fn virtiofsd_problem(config: &Config) -> Option<String> {
    let found = match find_binary("virtiofsd", &config.paths.virtiofsd) {
        Ok(found) => found,
        Err(e) => {
            return Some(format!(
                "{}: pods share container filesystems with virtiofsd: install it (Debian \
                 13's and Ubuntu's package puts it in /usr/libexec), put it beside the \
                 shim or on containerd's PATH, or set paths.virtiofsd",
                chain(&e)
            ))
        }
    };
    match hypervisor::virtiofsd_lacks(&found) {
        Ok(lacks) if lacks.is_empty() => None,
        Ok(lacks) => Some(format!(
            "{}: its --help lists none of {}, which pods pass it, so each pod would fail \
             at its start: install the Rust virtiofsd (Cocoon is tested with 1.14; QEMU's \
             old C virtiofsd takes other options), or set paths.virtiofsd to one",
            found.display(),
            lacks.join(", ")
        )),
        Err(e) => Some(format!(
            "{}: asked for the options pods pass it: {e}",
            found.display()
        )),
    }
}

impl std::fmt::Display for PodsReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let config = match &self.config {
            Some(p) => format!("the config {}", p.display()),
            None => "the built-in defaults (no config file)".to_string(),
        };
        if self.ready() {
            let backend = self.backend.as_deref().unwrap_or("?");
            return writeln!(f, "pods:           ready with {config}: {backend}");
        }
        writeln!(f, "pods:           NOT READY with {config}:")?;
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "ready_tests.rs"]
mod tests;
