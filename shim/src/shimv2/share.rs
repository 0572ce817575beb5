//! The pod share: what virtiofsd exports to the guest, laid out so that the host never
//! works on a path the guest could have touched.
//!
//! Two directories per pod, both 0700:
//! - `<run>/shares/<vm>.host`, host-private. The shim creates every mount point and
//!   mounts every container rootfs and volume here. virtiofsd never exports it.
//! - `<run>/shares/<vm>`, what virtiofsd exports: a recursive bind of the host
//!   directory whose own mount is read-only. The guest sees the structure but cannot
//!   create, rename, remove or plant a symlink in it; only the mounts inside that were
//!   made writable (a container's rootfs, an rw volume) take writes, each through its
//!   own bind. The two are shared-propagation peers, so a mount made under the host
//!   directory appears in the export, and in virtiofsd's namespace (a slave of it).
//!
//! Both are mounted in the pod's own mount namespace (`podns`), never the node's: the
//! node sees the two directories and nothing mounted in them.
//!
//! This is the remedy Kata Containers adopted for CVE-2020-2026 (a guest swapping a
//! share path for a symlink while the host mounted on it). On top, mount points are
//! created and mounted on through file descriptors resolved beneath the host directory
//! without following any link (`openat2`), and removal never crosses into a mount, so
//! a mount that did not go away cannot lose its data to a recursive delete.

use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::Mode;

use super::mounts::MountError;
use super::podns::{attach_in, in_ns, PodNs};
use crate::hypervisor::userns::{set_attr, PodUserns};

/// A pod's share: the exported directory, the user namespace its mounts are
/// idmapped with when virtiofsd runs in one, and the pod's mount namespace they live
/// in (`podns`).
#[derive(Debug, Clone)]
pub struct PodShare {
    pub path: PathBuf,
    pub userns: Option<Arc<PodUserns>>,
    pub mount_ns: Option<Arc<PodNs>>,
}

/// The host-private directory behind the exported `share`.
pub fn host_dir(share: &Path) -> PathBuf {
    let mut name = share.file_name().unwrap_or_default().to_os_string();
    name.push(".host");
    share.with_file_name(name)
}

fn mkdir_0700(dir: &Path) -> Result<(), MountError> {
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => Ok(()),
        Err(e) => Err(MountError::Mkdir(dir.into(), e)),
    }
}

/// Creates the host directory and its read-only export at `share`, mounted in the
/// pod's namespace `ns` (in the caller's without one); with `userns`, the export is
/// idmapped through the pod's user namespace (see `hypervisor::userns`), so that
/// virtiofsd, root of that namespace only, can walk the structure.
pub fn create(
    share: &Path,
    userns: Option<&PodUserns>,
    ns: Option<&PodNs>,
) -> Result<(), MountError> {
    let host = host_dir(share);
    mkdir_0700(&host)?;
    mkdir_0700(share)?;
    let fail = |path: &Path| {
        let path = path.to_path_buf();
        move |e: std::io::Error| MountError::Share(path, e)
    };
    // The host directory becomes a mount of its own, with shared propagation, and a
    // detached clone of it is taken (a clone of a shared mount joins its peer group).
    let h = host.clone();
    let tree = in_ns(ns, move || {
        mount(Some(&h), &h, None::<&str>, MsFlags::MS_BIND, None::<&str>)?;
        mount(
            None::<&str>,
            &h,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )?;
        open_tree(&h, false)
    })
    .map_err(fail(&host))?;
    // The clone is the export: read-only at its own level only (the mounts that
    // arrive in it keep their own flags and their own idmapping).
    let export = || -> std::io::Result<()> {
        set_attr(tree.as_fd(), libc::MOUNT_ATTR_RDONLY, -1, false)?;
        if let Some(ns) = userns {
            ns.idmap(tree.as_fd(), false)?;
        }
        let s = share.to_path_buf();
        in_ns(ns, move || {
            let target = nix::fcntl::open(
                &s,
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )?;
            attach(&tree, &target)
        })
    };
    export().map_err(fail(share))?;
    Ok(())
}

/// Detaches the export and the host directory with everything mounted in them (in
/// the pod's namespace `ns`, or the caller's), then removes both (never crossing into
/// a mount that is still there). Without the pod's namespace (its shim is gone), the
/// directories' removal detaches what another namespace still has mounted on them.
pub fn remove(share: &Path, ns: Option<&PodNs>) {
    let share = share.to_path_buf();
    let undo = move || -> std::io::Result<()> {
        let host = host_dir(&share);
        for dir in [share.as_path(), host.as_path()] {
            let _ = umount2(dir, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW);
            if let Err(e) = remove_tree_same_fs(dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("cannot remove {}: {e}", dir.display());
                }
            }
        }
        Ok(())
    };
    if let Err(e) = in_ns(ns, undo) {
        tracing::warn!("cannot undo the share: {e}");
    }
}

/// The mount id and file type of `name` under `dir` (or of `dir` itself for an empty
/// name), not following a last link. A bind mount of a directory of the same filesystem
/// has the same device number, so only the mount id tells it.
fn mount_and_type(
    dir: std::os::fd::BorrowedFd<'_>,
    name: &std::ffi::CStr,
) -> std::io::Result<(u64, u32)> {
    let flags = libc::AT_SYMLINK_NOFOLLOW
        | if name.is_empty() {
            libc::AT_EMPTY_PATH
        } else {
            0
        };
    // SAFETY: zeroed statx is a valid value for the kernel to fill.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor, C string and statx buffer that outlive the call.
    let r = unsafe {
        libc::statx(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags,
            libc::STATX_TYPE | libc::STATX_MNT_ID,
            &mut stx,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if stx.stx_mask & libc::STATX_MNT_ID == 0 {
        return Err(std::io::Error::other(
            "the kernel gives no mount id (Linux < 5.8)",
        ));
    }
    Ok((stx.stx_mnt_id, u32::from(stx.stx_mode) & libc::S_IFMT))
}

/// Opens directory `name` under `dir` (relative to the cwd for `AT_FDCWD`), never
/// through a link.
fn open_dir_at<P: ?Sized + nix::NixPath>(
    dir: std::os::fd::BorrowedFd<'_>,
    name: &P,
) -> std::io::Result<OwnedFd> {
    Ok(nix::fcntl::openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?)
}

/// Removes `dir` and what is under it on `dir`'s own mount, without following links
/// or descending into another mount: what is mounted below stays, and so does `dir`
/// (the removal then fails with the reason). For the share's mount points, which must
/// never be the way to a recursive delete of a volume's data.
///
/// The walk works on directory descriptors, opened without following links, and
/// removes each entry relative to its parent's descriptor: a directory swapped for a
/// link or another mount mid-walk is refused, never followed out of the tree.
///
/// An entry that vanishes during the walk counts as removed: a pod's teardown and the
/// deletion of one of its containers can remove the same container directory at once
/// (containerd deletes both tasks when the VM is lost), and the slower of the two must
/// not give up on the rest of the tree.
pub fn remove_tree_same_fs(dir: &Path) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return std::fs::remove_file(dir);
    }
    let fd = open_dir_at(nix::fcntl::AT_FDCWD, dir)?;
    let (mnt, _) = mount_and_type(fd.as_fd(), c"")?;
    if let Some(p) = empty_same_fs(&fd, mnt, dir)? {
        return Err(std::io::Error::other(format!(
            "{} is still mounted; it and its parents are kept",
            p.display()
        )));
    }
    drop(fd);
    std::fs::remove_dir(dir)
}

/// Removes every entry of the open directory `dir` (on mount `mnt`; shown as `shown`
/// in messages) that is on that mount. Returns the first entry kept (a mount, or a
/// directory with one below it).
fn empty_same_fs(dir: &OwnedFd, mnt: u64, shown: &Path) -> std::io::Result<Option<PathBuf>> {
    let mut names = Vec::new();
    let mut listing = nix::dir::Dir::from_fd(dir.try_clone()?)?;
    for entry in listing.iter() {
        let name = entry?.file_name().to_owned();
        if name.as_bytes() != b"." && name.as_bytes() != b".." {
            names.push(name);
        }
    }
    drop(listing);
    let mut busy = None;
    for name in names {
        let path = shown.join(OsStr::from_bytes(name.as_bytes()));
        match remove_entry_at(dir, &name, mnt, &path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::debug!("kept {}: {e}", path.display());
                busy.get_or_insert(path);
            }
        }
    }
    Ok(busy)
}

/// Removes entry `name` of `dir` (on mount `mnt`) and, for a directory, what is under
/// it on that mount; a mount on it, or below it, is an error.
fn remove_entry_at(
    dir: &OwnedFd,
    name: &std::ffi::CStr,
    mnt: u64,
    path: &Path,
) -> std::io::Result<()> {
    use nix::unistd::{unlinkat, UnlinkatFlags};
    let (on, kind) = mount_and_type(dir.as_fd(), name)?;
    if on != mnt {
        return Err(std::io::Error::other("a mount"));
    }
    if kind != libc::S_IFDIR {
        return Ok(unlinkat(dir, name, UnlinkatFlags::NoRemoveDir)?);
    }
    let sub = open_dir_at(dir.as_fd(), name)?;
    // What was opened is what was looked at: not a mount placed on it since.
    if mount_and_type(sub.as_fd(), c"")?.0 != mnt {
        return Err(std::io::Error::other("a mount"));
    }
    if let Some(p) = empty_same_fs(&sub, mnt, path)? {
        return Err(std::io::Error::other(format!(
            "{} is still mounted",
            p.display()
        )));
    }
    drop(sub);
    Ok(unlinkat(dir, name, UnlinkatFlags::RemoveDir)?)
}

/// A directory the host trusts (a pod's host directory), and paths beneath it opened
/// without following any link and without leaving it.
pub struct Beneath {
    root: OwnedFd,
    path: PathBuf,
    /// The pod's namespace every mount made here is idmapped with, if any.
    userns: Option<Arc<PodUserns>>,
    /// The pod's mount namespace, where `root` is and mounts are attached (the
    /// caller's without one).
    ns: Option<Arc<PodNs>>,
}

fn how(flags: OFlag) -> OpenHow {
    OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS)
}

/// `rel` as a relative path of plain names (no `..`, no root), or an error naming it.
fn plain(rel: &Path) -> std::io::Result<&Path> {
    if rel.as_os_str().is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a plain relative path", rel.display()),
        ));
    }
    Ok(rel)
}

impl Beneath {
    /// Opens `path` (in the pod's mount namespace `ns`, where the mounts made here go).
    pub fn open(
        path: &Path,
        userns: Option<Arc<PodUserns>>,
        ns: Option<Arc<PodNs>>,
    ) -> std::io::Result<Self> {
        let p = path.to_path_buf();
        let root = in_ns(ns.as_deref(), move || {
            Ok(nix::fcntl::open(
                &p,
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )?)
        })?;
        Ok(Self {
            root,
            path: path.to_path_buf(),
            userns,
            ns,
        })
    }

    /// The host path of `rel` (for messages and for what is recorded).
    pub fn path_of(&self, rel: &Path) -> PathBuf {
        self.path.join(rel)
    }

    fn open_at(&self, rel: &Path, flags: OFlag) -> std::io::Result<OwnedFd> {
        Ok(openat2(&self.root, plain(rel)?, how(flags))?)
    }

    /// The parent directory of `rel` (opened beneath) and `rel`'s last name.
    fn parent_of<'a>(&self, rel: &'a Path) -> std::io::Result<(OwnedFd, &'a OsStr)> {
        let rel = plain(rel)?;
        let name = rel.file_name().expect("a plain path has a last name");
        let parent = match rel.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(p) => self.open_at(p, OFlag::O_PATH | OFlag::O_DIRECTORY)?,
            None => self.root.try_clone()?,
        };
        Ok((parent, name))
    }

    /// Lets every guest uid pass through the share's root and directory `rel` (mode
    /// 0711, as runc's bundle directories): a container in a user namespace of its own
    /// is root of its own ids only, and must still walk to its rootfs. Nothing there
    /// can be listed or read by that.
    /// Directories of `rels` that do not exist are left out.
    pub fn traversable(&self, rels: &[&Path]) -> std::io::Result<()> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let mut dirs = vec![nix::fcntl::openat(&self.root, ".", flags, Mode::empty())?];
        for rel in rels {
            match self.open_at(rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY) {
                Ok(fd) => dirs.push(fd),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        for fd in dirs {
            nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(0o711))?;
        }
        Ok(())
    }

    /// Creates directory `rel` (0700) and its missing parents, beneath the root.
    pub fn mkdir_all(&self, rel: &Path) -> std::io::Result<()> {
        let rel = plain(rel)?;
        let mut sofar = PathBuf::new();
        for c in rel.components() {
            sofar.push(c);
            let (parent, name) = self.parent_of(&sofar)?;
            match nix::sys::stat::mkdirat(&parent, name, Mode::from_bits_truncate(0o700)) {
                Ok(()) | Err(nix::Error::EEXIST) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // What exists must be a directory reached without links.
        self.open_at(rel, OFlag::O_PATH | OFlag::O_DIRECTORY)
            .map(drop)
    }

    /// Creates an empty regular file `rel` (0600), failing if anything is there.
    pub fn create_file(&self, rel: &Path) -> std::io::Result<()> {
        let (parent, name) = self.parent_of(rel)?;
        let fd = nix::fcntl::openat(
            &parent,
            name,
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )?;
        drop(fd);
        Ok(())
    }

    /// Bind-mounts `src` (a host path from the trusted spec) on `rel`, with what is
    /// mounted below it when `recursive`, read-only all the way down when `readonly`,
    /// idmapped (all the way down) with the user namespace `idmap` where given (the
    /// mount's own mapping, composed with the pod's), else with the pod's namespace
    /// when there is one.
    ///
    /// With the new mount API: the tree is cloned detached (`open_tree`, in the
    /// caller's namespace, the node's, where `src` means what the spec meant), given
    /// its attributes there (`mount_setattr`), then attached through an fd of the mount
    /// point (`move_mount`, in the pod's namespace). So it is read-only and idmapped
    /// before any copy of it exists: the export and virtiofsd's namespace get their
    /// copies by propagation when it is attached, and attributes set afterwards would
    /// not reach those copies.
    pub fn bind(
        &self,
        src: &Path,
        rel: &Path,
        recursive: bool,
        readonly: bool,
        idmap: Option<BorrowedFd<'_>>,
    ) -> std::io::Result<()> {
        let target = self.open_at(rel, OFlag::O_PATH)?;
        let tree = open_tree(src, recursive)?;
        // A clone of a shared mount joins its peer group: the host's later mounts
        // beneath `src` would reach the share unasked (and not idmapped, not read-only).
        // The volumes that ask for them get them from `propagation`.
        set_private(tree.as_fd(), recursive)?;
        if readonly {
            set_attr(tree.as_fd(), libc::MOUNT_ATTR_RDONLY, -1, recursive)?;
        }
        match (idmap, &self.userns) {
            (Some(userns), pod) => {
                let done = crate::hypervisor::userns::idmap_with(userns, tree.as_fd(), recursive);
                match pod {
                    Some(_) => done.map_err(crate::hypervisor::userns::jail_hint)?,
                    None => done?,
                }
            }
            (None, Some(ns)) => ns.idmap(tree.as_fd(), recursive)?,
            (None, None) => {}
        }
        attach_in(self.ns.as_deref(), tree, target)
    }

    /// An `O_PATH` descriptor of directory `rel` (of what is mounted there, if anything).
    pub fn open_dir(&self, rel: &Path) -> std::io::Result<OwnedFd> {
        self.open_at(rel, OFlag::O_PATH | OFlag::O_DIRECTORY)
    }

    /// The pod's namespace, shared, when its mounts are idmapped.
    pub fn userns_arc(&self) -> Option<Arc<PodUserns>> {
        self.userns.clone()
    }

    /// The pod's namespace, when its mounts are idmapped.
    pub fn userns(&self) -> Option<&PodUserns> {
        self.userns.as_deref()
    }

    /// The pod's mount namespace, shared.
    pub fn ns_arc(&self) -> Option<Arc<PodNs>> {
        self.ns.clone()
    }

    /// Attaches the detached mount `tree` on the mount point `rel`.
    pub fn attach(&self, tree: OwnedFd, rel: &Path) -> std::io::Result<()> {
        let point = self.open_at(rel, OFlag::O_PATH | OFlag::O_DIRECTORY)?;
        attach_in(self.ns.as_deref(), tree, point)
    }
}

/// From `<linux/mount.h>` (not all in the libc crate).
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;

fn cpath(p: &Path) -> std::io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
}

/// `open_tree(2)` with `OPEN_TREE_CLONE`: a detached clone of the mount at `path`
/// relative to `dirfd`, with `flags` added.
fn clone_tree(
    dirfd: std::os::fd::RawFd,
    path: &std::ffi::CStr,
    flags: libc::c_uint,
) -> std::io::Result<OwnedFd> {
    let flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | flags;
    // SAFETY: a C string that outlives the call and a descriptor the caller holds (or
    // AT_FDCWD); the returned fd is owned below.
    let r = unsafe { libc::syscall(libc::SYS_open_tree, dirfd, path.as_ptr(), flags) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: open_tree returned a new fd that nothing else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(r as i32) })
}

/// A detached clone of the mount `fd` is on (an `O_PATH` fd of its root).
pub(crate) fn open_tree_fd(fd: &OwnedFd) -> std::io::Result<OwnedFd> {
    clone_tree(fd.as_raw_fd(), c"", libc::AT_EMPTY_PATH as libc::c_uint)
}

/// A detached clone of the mount (tree) at `src`.
pub(crate) fn open_tree(src: &Path, recursive: bool) -> std::io::Result<OwnedFd> {
    let flags = if recursive {
        libc::AT_RECURSIVE as libc::c_uint
    } else {
        0
    };
    clone_tree(libc::AT_FDCWD, &cpath(src)?, flags)
}

/// Makes the detached mount `tree` (and, when `recursive`, what is below it) private:
/// in no peer group, a slave of none.
pub(crate) fn set_private(
    tree: std::os::fd::BorrowedFd<'_>,
    recursive: bool,
) -> std::io::Result<()> {
    crate::hypervisor::userns::mount_setattr(tree, 0, libc::MS_PRIVATE, -1, recursive)
}

/// Attaches the detached mount `tree` on the mount point `target`.
pub fn attach(tree: &OwnedFd, target: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: two fds we hold and empty C strings, all outliving the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            target.as_raw_fd(),
            c"".as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root_or_skip(what: &str) -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        cocoon_nested::testing::missing(what, "mounting needs root");
        false
    }

    /// A pod's teardown and a container's deletion racing over the same directory: both
    /// succeed and nothing is left, however their walks interleave.
    #[test]
    fn two_removals_racing_over_one_tree_leave_nothing() {
        for round in 0..200 {
            let t = tempfile::tempdir().unwrap();
            let host = t.path().join("pod.host");
            for c in 0..4 {
                for leaf in ["rootfs/a/b", "mounts/0", "mounts/1"] {
                    let d = host.join(format!("c{c}/{leaf}"));
                    std::fs::create_dir_all(&d).unwrap();
                    std::fs::write(d.join("f"), "x").unwrap();
                }
            }
            let container = host.join(format!("c{}", round % 4));
            let other = std::thread::spawn(move || remove_tree_same_fs(&container));
            let ours = remove_tree_same_fs(&host);
            let theirs = other.join().unwrap();
            for (who, r) in [("pod", ours), ("container", theirs)] {
                if let Err(e) = r {
                    assert_eq!(
                        e.kind(),
                        std::io::ErrorKind::NotFound,
                        "round {round}: {who}: {e}"
                    );
                }
            }
            assert!(!host.exists(), "round {round}: {} is left", host.display());
        }
    }

    #[test]
    fn the_export_is_read_only_and_follows_the_host_directory() {
        if !root_or_skip("share") {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let share = t.path().join("pod-x");
        create(&share, None, None).unwrap();
        let host = host_dir(&share);
        use std::os::unix::fs::PermissionsExt;
        for d in [&share, &host] {
            let mode = std::fs::metadata(d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
        // The guest's view takes no new names ...
        let planted = std::os::unix::fs::symlink("/etc", share.join("evil")).unwrap_err();
        assert_eq!(planted.raw_os_error(), Some(libc::EROFS));
        assert_eq!(
            std::fs::create_dir(share.join("d"))
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EROFS)
        );
        // ... but sees what the host makes, and a writable mount made there is writable.
        let b = Beneath::open(&host, None, None).unwrap();
        b.mkdir_all(Path::new("c1/mounts/0")).unwrap();
        let vol = t.path().join("vol");
        std::fs::create_dir(&vol).unwrap();
        b.bind(&vol, Path::new("c1/mounts/0"), false, false, None)
            .unwrap();
        std::fs::write(share.join("c1/mounts/0/f"), "through the export").unwrap();
        assert_eq!(
            std::fs::read_to_string(vol.join("f")).unwrap(),
            "through the export"
        );
        remove(&share, None);
        assert!(!share.exists() && !host.exists());
        // The volume's data outlives the pod.
        assert!(vol.join("f").exists());
    }

    #[test]
    fn nothing_beneath_follows_a_link_or_leaves_the_root() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        let b = Beneath::open(&root, None, None).unwrap();
        assert!(b.mkdir_all(Path::new("link/x")).is_err());
        assert!(b.create_file(Path::new("link/f")).is_err());
        assert!(b.mkdir_all(Path::new("../escape")).is_err());
        assert!(b.mkdir_all(Path::new("/abs")).is_err());
        assert!(std::fs::read_dir(&outside).unwrap().next().is_none());
        b.mkdir_all(Path::new("a/b")).unwrap();
        b.create_file(Path::new("a/b/f")).unwrap();
        assert!(b.create_file(Path::new("a/b/f")).is_err(), "not twice");
        assert!(root.join("a/b/f").is_file());
    }

    /// A link in the tree goes as a link: what it points to, a directory outside, stays.
    /// So does a directory the walk is handed through a link.
    #[test]
    fn removal_never_follows_a_link() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir_all(outside.join("sub")).unwrap();
        std::fs::write(outside.join("sub/data"), "precious").unwrap();
        let dir = t.path().join("c1");
        std::fs::create_dir_all(dir.join("rootfs")).unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("rootfs/link")).unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("top-link")).unwrap();

        let via_link = t.path().join("via-link");
        std::os::unix::fs::symlink(&outside, &via_link).unwrap();
        remove_tree_same_fs(&via_link).unwrap();
        assert!(!via_link.exists() && outside.join("sub/data").is_file());

        remove_tree_same_fs(&dir).unwrap();
        assert!(!dir.exists());
        assert_eq!(
            std::fs::read_to_string(outside.join("sub/data")).unwrap(),
            "precious"
        );
    }

    #[test]
    fn removal_never_crosses_into_a_mount() {
        if !root_or_skip("share") {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("c1");
        std::fs::create_dir_all(dir.join("mounts/0")).unwrap();
        std::fs::write(dir.join("plain"), "").unwrap();
        let vol = t.path().join("vol");
        std::fs::create_dir(&vol).unwrap();
        std::fs::write(vol.join("data"), "precious").unwrap();
        mount(
            Some(&vol),
            &dir.join("mounts/0"),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        assert!(remove_tree_same_fs(&dir).is_err());
        assert_eq!(
            std::fs::read_to_string(vol.join("data")).unwrap(),
            "precious"
        );
        umount2(&dir.join("mounts/0"), MntFlags::MNT_DETACH).unwrap();
        remove_tree_same_fs(&dir).unwrap();
        assert!(!dir.exists());
    }

    #[test]
    fn read_only_reaches_nested_mounts() {
        if !root_or_skip("share") {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        std::fs::create_dir_all(src.join("nested")).unwrap();
        mount(
            Some("tmpfs"),
            &src.join("nested"),
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        // In a pod's host directory, so the export's copy is checked too.
        let share = t.path().join("pod-ro");
        create(&share, None, None).unwrap();
        let b = Beneath::open(&host_dir(&share), None, None).unwrap();
        b.mkdir_all(Path::new("v")).unwrap();
        b.bind(&src, Path::new("v"), true, true, None).unwrap();
        for dir in [host_dir(&share), share.clone()] {
            for p in ["v/top", "v/nested/deep"] {
                let e = std::fs::write(dir.join(p), "x").unwrap_err();
                assert_eq!(
                    e.raw_os_error(),
                    Some(libc::EROFS),
                    "{}",
                    dir.join(p).display()
                );
            }
        }
        // The source stays writable.
        std::fs::write(src.join("nested/ok"), "x").unwrap();
        remove(&share, None);
        umount2(&src.join("nested"), MntFlags::MNT_DETACH).unwrap();
    }
}
