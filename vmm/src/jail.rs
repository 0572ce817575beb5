//! Namespaces for the VMM process, in the spirit of Firecracker's jailer but done by the
//! VMM itself, so there is no second binary to install and no chroot directory to
//! prepare and clean up.
//!
//! Once the VM is built (kernel loaded, files, tap and vhost-user sockets open) and before
//! the guest runs a single instruction, the VMM moves into its own mount, network, IPC
//! and UTS namespaces and pivots into an empty, read-only tmpfs. The only host paths left
//! are the directories it still needs by name, bind-mounted at their own paths: the hybrid
//! vsock socket's directory (guest connections to host port P dial `<uds>_P`) and the API
//! socket's directory (to remove the socket at exit). The new network namespace has only
//! a loopback device that is down; the tap already open keeps working because a tap file
//! descriptor is bound to its device, not to a namespace. The seccomp filter goes on
//! after this, so a compromised VMM can neither mount nor reach the host's network.
//!
//! The steps, all on the main thread while it is the only thread (namespaces are
//! per thread; the vCPU threads started later inherit them):
//! 1. `unshare(NEWNS | NEWNET | NEWIPC | NEWUTS)`, then every mount becomes a slave so
//!    nothing done here propagates back to the host.
//! 2. A tmpfs on `/tmp` becomes the root (`pivot_root`), the old root staying reachable
//!    at `/oldroot`; the kept directories are bind-mounted from there into `/newroot`.
//!    (`/tmp` is only the place to stand while doing this: once the tmpfs is root,
//!    `/oldroot/tmp` is the host's own `/tmp` again, so kept directories may live there.)
//! 3. The old root is detached, `/newroot` becomes the root, and is remounted read-only.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use serde::{Deserialize, Serialize};

/// Whether the VMM jails itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JailMode {
    /// On when the VMM runs as root (it needs CAP_SYS_ADMIN), off otherwise; the choice
    /// is logged either way.
    #[default]
    Auto,
    /// Required: failing to set it up fails the boot.
    On,
    Off,
}

impl std::str::FromStr for JailMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            _ => Err(format!("{s:?} is not one of auto, on, off")),
        }
    }
}

/// Errors while entering the jail; each names the step.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("Failed to {step}")]
    Step {
        step: String,
        #[source]
        source: nix::Error,
    },
    #[error("Failed to resolve the kept directory {0}")]
    Resolve(PathBuf, #[source] std::io::Error),
    #[error("Failed to create {0} in the jail")]
    Mkdir(PathBuf, #[source] std::io::Error),
}

fn step(what: impl Into<String>) -> impl FnOnce(nix::Error) -> JailError {
    let step = what.into();
    move |source| JailError::Step { step, source }
}

/// Whether `mode` asks for a jail in this process; logs the reason when it does not.
pub fn wanted(mode: JailMode) -> bool {
    match mode {
        JailMode::On => true,
        JailMode::Off => {
            log::info!("jail: off by configuration");
            false
        }
        JailMode::Auto => {
            let root = nix::unistd::geteuid().is_root();
            if !root {
                log::warn!(
                    "jail: off (not root: namespaces need CAP_SYS_ADMIN); set jail = \"on\" \
                     to make this an error"
                );
            }
            root
        }
    }
}

/// The absolute, symlink-free form of the directory that holds `socket` (which itself
/// need not exist yet), and the socket's path inside it.
pub fn resolve_socket_dir(socket: &Path) -> Result<(PathBuf, PathBuf), JailError> {
    let dir = match socket.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = std::fs::canonicalize(dir).map_err(|e| JailError::Resolve(dir.to_owned(), e))?;
    let name = socket.file_name().ok_or_else(|| {
        JailError::Resolve(socket.to_owned(), std::io::ErrorKind::InvalidInput.into())
    })?;
    let path = dir.join(name);
    Ok((dir, path))
}

/// Enters the jail, keeping `keep` (absolute, resolved directories) at their own paths.
/// Must run while the calling thread is the process's only thread.
pub fn enter(keep: &[PathBuf]) -> Result<(), JailError> {
    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS,
    )
    .map_err(step("unshare the mount, network, IPC and UTS namespaces"))?;
    let none: Option<&str> = None;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_SLAVE, none)
        .map_err(step("make the mounts slaves"))?;
    let hardening = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some("tmpfs"),
        "/tmp",
        Some("tmpfs"),
        hardening,
        Some("mode=0755,size=64k"),
    )
    .map_err(step("mount a tmpfs on /tmp to build the jail in"))?;
    nix::unistd::chdir("/tmp").map_err(step("enter the jail tmpfs"))?;
    for d in ["newroot", "oldroot"] {
        std::fs::create_dir(d).map_err(|e| JailError::Mkdir(d.into(), e))?;
    }
    nix::unistd::pivot_root(".", "oldroot").map_err(step("pivot into the jail tmpfs"))?;
    nix::unistd::chdir("/").map_err(step("enter the jail tmpfs"))?;
    mount(
        Some("/newroot"),
        "/newroot",
        none,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        none,
    )
    .map_err(step("make /newroot a mount point"))?;
    for dir in keep {
        let rel = dir.strip_prefix("/").unwrap_or(dir);
        let src = Path::new("/oldroot").join(rel);
        let dst = Path::new("/newroot").join(rel);
        std::fs::create_dir_all(&dst).map_err(|e| JailError::Mkdir(dir.clone(), e))?;
        mount(
            Some(&src),
            &dst,
            none,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            none,
        )
        .map_err(step(format!("bind {} into the jail", dir.display())))?;
        // Writable (sockets come and go) but nothing in it runs or opens a device.
        mount(
            none,
            &dst,
            none,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | hardening,
            none,
        )
        .map_err(step(format!("harden {} in the jail", dir.display())))?;
    }
    umount2("/oldroot", MntFlags::MNT_DETACH).map_err(step("detach the host's root"))?;
    std::fs::remove_dir("/oldroot").map_err(|e| JailError::Mkdir("/oldroot".into(), e))?;
    nix::unistd::chdir("/newroot").map_err(step("enter the new root"))?;
    // pivot_root(".", ".") stacks the tmpfs over the new root; detaching "." drops it.
    nix::unistd::pivot_root(".", ".").map_err(step("pivot into the new root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(step("detach the jail tmpfs"))?;
    nix::unistd::chdir("/").map_err(step("enter the new root"))?;
    mount(
        none,
        "/",
        none,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | hardening,
        none,
    )
    .map_err(step("make the jail root read-only"))?;
    let kept: Vec<_> = keep.iter().map(|d| d.display().to_string()).collect();
    log::info!(
        "jail: own mount, network, IPC and UTS namespaces; read-only empty root with [{}]",
        kept.join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_reject_unknown_words() {
        assert_eq!("auto".parse::<JailMode>(), Ok(JailMode::Auto));
        assert_eq!("on".parse::<JailMode>(), Ok(JailMode::On));
        assert_eq!("off".parse::<JailMode>(), Ok(JailMode::Off));
        assert!("yes".parse::<JailMode>().unwrap_err().contains("yes"));
    }

    #[test]
    fn socket_dirs_resolve_to_absolute_real_paths() {
        let d = tempfile::tempdir().unwrap();
        let real = std::fs::canonicalize(d.path()).unwrap();
        std::os::unix::fs::symlink(&real, real.join("link")).unwrap();
        let (dir, path) = resolve_socket_dir(&real.join("link/api.sock")).unwrap();
        assert_eq!(dir, real);
        assert_eq!(path, real.join("api.sock"));
        let err = resolve_socket_dir(&real.join("missing/api.sock")).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
