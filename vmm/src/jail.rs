//! Namespaces for the VMM process, in the spirit of Firecracker's jailer but done by the
//! VMM itself, so there is no second binary to install and no chroot directory to
//! prepare and clean up.
//!
//! Once the VM is built (kernel loaded, files, tap and vhost-user sockets open) and before
//! the guest runs a single instruction, the VMM moves into its own mount, network, IPC
//! and UTS namespaces, pivots into an empty, read-only tmpfs and drops every capability.
//! The only host path left is the directory it still needs by name, bind-mounted at its
//! own path: the hybrid vsock socket's (guest connections to host port P dial `<uds>_P`).
//! (The API socket is removed at exit through a directory fd held from before.) The new
//! network namespace has only a loopback device that is down; the tap already open keeps
//! working because a tap file descriptor is bound to its device, not to a namespace. The
//! seccomp filter goes on after this, so a compromised VMM can neither mount nor reach
//! the host's network.
//!
//! A kept directory must be one of its own: not `/`, not world-writable (a socket put
//! straight into `/tmp` would otherwise hand the jail every other socket there). It is
//! opened (`O_PATH`) when resolved and bound from that descriptor, so swapping a symlink
//! in afterwards changes nothing.
//!
//! The steps, all on the main thread while it is the only thread (namespaces are per
//! thread; the vCPU threads started later inherit them; checked):
//! 1. `unshare(NEWNS | NEWNET | NEWIPC | NEWUTS)`: if this fails nothing has changed, and
//!    `auto` carries on without a jail. Then every mount becomes private, so nothing done
//!    here propagates either way.
//! 2. A tmpfs on `/tmp` becomes the root (`pivot_root`), the old root staying reachable
//!    at `/oldroot`; the kept directories are bind-mounted from there into `/newroot`.
//!    (`/tmp` is only the place to stand while doing this: once the tmpfs is root,
//!    `/oldroot/tmp` is the host's own `/tmp` again, so kept directories may live there.)
//! 3. The old root is detached, `/newroot` becomes the root, and is remounted read-only.
//!    A failure from step 2 on leaves the process half-jailed: the caller must end it.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{open, OFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::stat::Mode;
use nix::sys::statvfs::{statvfs, FsFlags};

/// Whether the VMM jails itself: `auto` when it runs as root (it needs
/// CAP_SYS_ADMIN), `on` fails the boot without a jail, `off` never jails.
pub type JailMode = crate::choice::AutoOnOff;

/// Errors while entering the jail; each names the step.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// Before anything changed: the process is as it was.
    #[error("Failed to unshare the mount, network, IPC and UTS namespaces (no CAP_SYS_ADMIN?)")]
    Unshare(#[source] nix::Error),
    #[error("The process has {0} threads; namespaces are per thread, so it must have one")]
    Threads(usize),
    #[error("Failed to {step}")]
    Step {
        step: String,
        #[source]
        source: nix::Error,
    },
    #[error("Failed to resolve the kept directory {0}")]
    Resolve(PathBuf, #[source] std::io::Error),
    #[error("Refusing to keep {0} in the jail: {1}; put the sockets in a directory of their own")]
    Unsafe(PathBuf, &'static str),
    #[error("Failed to create {0} in the jail")]
    Mkdir(PathBuf, #[source] std::io::Error),
    #[error("The guest-RAM tmpfs at {0} would overlap {1}, which the jail keeps")]
    Overlap(PathBuf, PathBuf),
}

impl JailError {
    /// Whether the process is unchanged (the jail was not begun).
    pub fn nothing_changed(&self) -> bool {
        matches!(
            self,
            Self::Unshare(_)
                | Self::Threads(_)
                | Self::Resolve(..)
                | Self::Unsafe(..)
                | Self::Overlap(..)
        )
    }
}

/// How a kept path appears in the jail. The default (a socket directory) is writable,
/// with nothing in it that runs or opens a device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeepAs {
    pub read_only: bool,
    /// Programs and libraries in it may run (`/usr` for a program exec'd in the jail).
    pub exec: bool,
    /// Device nodes in it open (a bound `/dev/kvm`).
    pub devices: bool,
}

impl KeepAs {
    pub const SOCKETS: Self = Self {
        read_only: false,
        exec: false,
        devices: false,
    };
    pub const READ_ONLY: Self = Self {
        read_only: true,
        exec: false,
        devices: false,
    };
    pub const PROGRAMS: Self = Self {
        read_only: true,
        exec: true,
        devices: false,
    };
    pub const DEVICE: Self = Self {
        read_only: false,
        exec: false,
        devices: true,
    };
}

/// A directory (or a single file) the jail keeps: its resolved path and an `O_PATH`
/// descriptor to it.
#[derive(Debug)]
pub struct KeptDir {
    pub path: PathBuf,
    fd: OwnedFd,
    how: KeepAs,
    is_dir: bool,
}

impl KeptDir {
    /// Opens `dir` (resolved, absolute) after checking it is safe to keep writable.
    pub fn open(dir: &Path) -> Result<Self, JailError> {
        Self::open_as(dir, KeepAs::SOCKETS)
    }

    /// Opens `path` (resolved, absolute: a directory, a file or a device node) to keep
    /// it in the jail `how`. A writable directory must not be the root or
    /// world-writable; a path that is a symbolic link is refused (give its target).
    pub fn open_as(path: &Path, how: KeepAs) -> Result<Self, JailError> {
        if path == Path::new("/") {
            return Err(JailError::Unsafe(path.into(), "it is the root"));
        }
        if !path.is_absolute() {
            return Err(JailError::Unsafe(path.into(), "it is not an absolute path"));
        }
        let fd = open(
            path,
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| JailError::Resolve(path.into(), e.into()))?;
        let meta = std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map_err(|e| JailError::Resolve(path.into(), e))?;
        use std::os::unix::fs::FileTypeExt;
        let kind = meta.file_type();
        if kind.is_symlink() {
            return Err(JailError::Unsafe(path.into(), "it is a symbolic link"));
        }
        if (kind.is_char_device() || kind.is_block_device()) && !how.devices {
            return Err(JailError::Unsafe(path.into(), "it is a device node"));
        }
        if meta.is_dir() && !how.read_only && meta.mode() & 0o002 != 0 {
            return Err(JailError::Unsafe(path.into(), "it is world-writable"));
        }
        Ok(Self {
            path: path.into(),
            fd,
            how,
            is_dir: meta.is_dir(),
        })
    }
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

/// Checks and opens the directories of `sockets` for a jail in `mode`, rewriting each
/// path to its resolved form. `None`: no jail (off, not root, or `auto` and a directory
/// that cannot be kept, with a warning).
pub fn prepare(
    mode: JailMode,
    sockets: &mut [&mut PathBuf],
) -> Result<Option<Vec<KeptDir>>, JailError> {
    if !wanted(mode) {
        return Ok(None);
    }
    let mut keep: Vec<KeptDir> = Vec::new();
    for socket in sockets.iter_mut() {
        let kept = resolve_socket_dir(socket).and_then(|(dir, path)| {
            let known = keep.iter().any(|k| k.path == dir);
            Ok(((!known).then(|| KeptDir::open(&dir)).transpose()?, path))
        });
        match kept {
            Ok((dir, path)) => {
                **socket = path;
                keep.extend(dir);
            }
            Err(e) if mode == JailMode::Auto => {
                log::warn!("jail: off: {e}");
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Some(keep))
}

/// [`enter`] for a jail in `mode`: `auto` goes on unjailed (with a warning) where the
/// jail could not begin. Returns whether the process is jailed. An error from a failure
/// halfway (`!nothing_changed()`) leaves the process unfit to go on.
pub fn enter_as(mode: JailMode, keep: &[KeptDir]) -> Result<bool, JailError> {
    match enter(keep) {
        Ok(()) => Ok(true),
        Err(e) if e.nothing_changed() && mode == JailMode::Auto => {
            let cause = std::error::Error::source(&e)
                .map(|c| format!(": {c}"))
                .unwrap_or_default();
            log::warn!("jail: off: {e}{cause}");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// The mount flags a remount must repeat so as not to clear them.
fn kept_flags(path: &Path) -> MsFlags {
    let Ok(st) = statvfs(path) else {
        return MsFlags::empty();
    };
    let f = st.flags();
    let mut m = MsFlags::empty();
    for (fs, ms) in [
        (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if f.contains(fs) {
            m |= ms;
        }
    }
    m
}

/// Enters the jail, keeping `keep` at their own paths, and drops every capability. Must
/// run while the calling thread is the process's only thread.
pub fn enter(keep: &[KeptDir]) -> Result<(), JailError> {
    enter_root(keep, &[], None, CloneFlags::empty())?;
    drop_capabilities()?;
    let kept: Vec<_> = keep.iter().map(|d| d.path.display().to_string()).collect();
    log::info!(
        "jail: own mount, network, IPC and UTS namespaces; read-only empty root with [{}]; \
         no capabilities",
        kept.join(", ")
    );
    Ok(())
}

/// A tmpfs of the jail's own for guest RAM (`jail-exec --huge-tmpfs`), mounted
/// `huge=always` with room for `size` bytes ([`crate::vstate::ram_file::huge_tmpfs_options`])
/// and owned by the program's `uid`/`gid`: a program that needs a path to make its RAM
/// file in (QEMU's `memory-backend-file`) gets 2 MiB pages whatever the host's shmem THP
/// policy. It lives in the jail's mount namespace only, so nothing is left on the host
/// when the jail's last process ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamTmpfs {
    pub path: PathBuf,
    pub size: u64,
    pub uid: u32,
    pub gid: u32,
}

impl RamTmpfs {
    /// The mount's data string.
    pub fn data(&self) -> String {
        let mut o: Vec<String> = crate::vstate::ram_file::huge_tmpfs_options(self.size)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        o.push(format!("uid={}", self.uid));
        o.push(format!("gid={}", self.gid));
        o.join(",")
    }
}

/// The namespaces and the root of [`enter`], without touching capabilities: `keep` bound
/// at their own paths, each `links` entry (`link`, `target`) a symbolic link in the new
/// root, `ram` a tmpfs of its own; `extra` namespaces unshared too (`CLONE_NEWPID`: for
/// the children to come). Must run while the calling thread is the process's only thread.
pub fn enter_root(
    keep: &[KeptDir],
    links: &[(PathBuf, PathBuf)],
    ram: Option<&RamTmpfs>,
    extra: CloneFlags,
) -> Result<(), JailError> {
    if let Some(ram) = ram {
        let kept = keep
            .iter()
            .map(|k| &k.path)
            .chain(links.iter().map(|l| &l.0));
        for k in kept {
            if k.starts_with(&ram.path) || ram.path.starts_with(k) {
                return Err(JailError::Overlap(ram.path.clone(), k.clone()));
            }
        }
    }
    let threads = std::fs::read_dir("/proc/self/task").map_or(1, |d| d.count());
    if threads != 1 {
        return Err(JailError::Threads(threads));
    }
    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS
            | extra,
    )
    .map_err(JailError::Unshare)?;
    let none: Option<&str> = None;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(step("make the mounts private"))?;
    // A bind source must be a mount of this namespace, which the descriptors opened
    // before `unshare` are not: open each path again here and check it is the very
    // one checked then (same device and inode), so no swap in between goes unnoticed.
    let mut reopened = Vec::with_capacity(keep.len());
    for dir in keep {
        let fd = open(
            &dir.path,
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(step(format!("reopen {}", dir.path.display())))?;
        let id = |fd: &OwnedFd| nix::sys::stat::fstat(fd).map(|st| (st.st_dev, st.st_ino));
        if id(&fd).map_err(step("stat a kept directory"))?
            != id(&dir.fd).map_err(step("stat a kept directory"))?
        {
            return Err(JailError::Step {
                step: format!(
                    "keep {}: it changed since it was checked",
                    dir.path.display()
                ),
                source: nix::Error::ESTALE,
            });
        }
        reopened.push(fd);
    }
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
    for (dir, fd) in keep.iter().zip(&reopened) {
        let rel = dir.path.strip_prefix("/").unwrap_or(&dir.path);
        // Through the old root's /proc: the very path checked, whatever its name
        // points at by now.
        let src = format!("/oldroot/proc/self/fd/{}", fd.as_raw_fd());
        let dst = Path::new("/newroot").join(rel);
        let made = if dir.is_dir {
            std::fs::create_dir_all(&dst)
        } else {
            dst.parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| std::fs::File::create(&dst).map(drop))
        };
        made.map_err(|e| JailError::Mkdir(dir.path.clone(), e))?;
        mount(Some(src.as_str()), &dst, none, MsFlags::MS_BIND, none)
            .map_err(step(format!("bind {} into the jail", dir.path.display())))?;
        // The flags it already had (read-only, atime) are repeated, or the remount
        // clears them.
        let mut flags = MsFlags::MS_NOSUID | kept_flags(&dst);
        if !dir.how.exec {
            flags |= MsFlags::MS_NOEXEC;
        }
        if !dir.how.devices {
            flags |= MsFlags::MS_NODEV;
        }
        if dir.how.read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        mount(
            none,
            &dst,
            none,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | flags,
            none,
        )
        .map_err(step(format!("harden {} in the jail", dir.path.display())))?;
    }
    if let Some(ram) = ram {
        let rel = ram.path.strip_prefix("/").unwrap_or(&ram.path);
        let dst = Path::new("/newroot").join(rel);
        std::fs::create_dir_all(&dst).map_err(|e| JailError::Mkdir(ram.path.clone(), e))?;
        mount(
            Some("tmpfs"),
            &dst,
            Some("tmpfs"),
            hardening,
            Some(ram.data().as_str()),
        )
        .map_err(step(format!(
            "mount a huge-page tmpfs for guest RAM at {} ({})",
            ram.path.display(),
            ram.data()
        )))?;
    }
    for (link, target) in links {
        let rel = link.strip_prefix("/").unwrap_or(link);
        let dst = Path::new("/newroot").join(rel);
        dst.parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::os::unix::fs::symlink(target, &dst))
            .map_err(|e| JailError::Mkdir(link.clone(), e))?;
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
    Ok(())
}

/// Empties the bounding, ambient, inheritable, permitted and effective sets. Nothing the
/// running VMM does needs one: KVM, tap and socket descriptors are open, and the files it
/// still touches (sockets in its own directory) are its own.
pub fn drop_capabilities() -> Result<(), JailError> {
    use caps::CapSet::*;
    // The bounding set first: dropping from it needs CAP_SETPCAP, still effective here.
    for set in [Bounding, Ambient, Inheritable, Effective, Permitted] {
        caps::clear(None, set).map_err(|e| JailError::Step {
            step: format!("drop the {set:?} capabilities ({e})"),
            source: nix::Error::EPERM,
        })?;
    }
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

    #[test]
    fn only_directories_of_their_own_are_kept() {
        let err = KeptDir::open(Path::new("/")).unwrap_err();
        assert!(matches!(err, JailError::Unsafe(..)) && err.nothing_changed());
        let d = tempfile::tempdir().unwrap();
        let dir = std::fs::canonicalize(d.path()).unwrap();
        let kept = KeptDir::open(&dir).unwrap();
        assert_eq!(kept.path, dir);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let err = KeptDir::open(&dir).unwrap_err();
        assert!(err.to_string().contains("world-writable"), "{err}");
        // A symlink as the last component is not followed.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink("/etc", dir.join("link")).unwrap();
        assert!(KeptDir::open(&dir.join("link")).is_err());
    }
}
