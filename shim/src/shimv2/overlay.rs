//! A container's overlay rootfs with idmapped layers, for a pod whose virtiofsd runs in
//! a user namespace of its own (`hypervisor::userns`).
//!
//! overlayfs cannot itself be idmapped, but its layers can: each layer is cloned
//! detached (`open_tree`), idmapped there, and handed to a new overlay by descriptor
//! (`fsopen`/`fsconfig` with `lowerdir+`, `upperdir`, `workdir`: Linux ≥ 6.13, and
//! detached mounts as layers: ≥ 6.15), so no layer is ever attached where anything
//! could reach it. The overlay then shows
//! the owners the layers show, and writes it makes (as the shim's root, through the
//! idmapped upper layer) land on disk with the ids the guest gave.
//!
//! An older kernel (idmapped layers: ≥ 5.19) refuses a layer by descriptor (6.1:
//! `EOPNOTSUPP`; 6.12: `EBADF`, for an O_PATH descriptor) or a detached one (6.13-6.14:
//! `EINVAL`).
//! There the same clones are attached in a throwaway mount namespace of their own
//! (`podns::in_scratch_ns`, on a tmpfs only that namespace has), the overlay is mounted
//! from their paths, and only a detached clone of it leaves; the namespace, with the
//! layers' attachments, ends when the clone is made. overlayfs keeps private clones of
//! its layers, so the result is the same mount, reachable from nowhere, as on a newer
//! kernel. This is how containerd idmaps layers for runc, minus the node's namespace.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};

use super::idmaps::MountMaps;
use crate::hypervisor::userns::{idmap_with, jail_hint, set_attr, PodUserns};

/// What containerd's overlay options ask for, layers apart.
#[derive(Debug, Default, PartialEq)]
pub struct OverlayOptions {
    /// Topmost first, as `lowerdir=` lists them.
    pub lower: Vec<String>,
    pub upper: Option<String>,
    pub work: Option<String>,
    /// Other overlay options (`index=off`, `userxattr`, ...), as key and value.
    pub other: Vec<(String, Option<String>)>,
    /// `MOUNT_ATTR_*` bits from `ro`, `nosuid`, `nodev`, `noexec`.
    pub attrs: u64,
    /// The lower layers' mapping, from containerd's `uidmap=` and `gidmap=` (its
    /// overlay snapshotter adds them for a `hostUsers: false` pod's container where
    /// the kernel idmaps overlay layers, instead of chowning the snapshot).
    pub idmap: Option<MountMaps>,
}

/// Splits containerd's options for an overlay mount; an option this code does not
/// know is passed to overlayfs, which names it if it does not know it either.
pub fn parse(options: &[String]) -> Result<OverlayOptions, String> {
    let mut o = OverlayOptions::default();
    let (mut uidmap, mut gidmap) = (None, None);
    for opt in options {
        match opt.split_once('=') {
            Some(("uidmap", v)) => uidmap = Some(super::idmaps::parse_option("uid", v)?),
            Some(("gidmap", v)) => gidmap = Some(super::idmaps::parse_option("gid", v)?),
            Some(("lowerdir", v)) => o.lower = v.split(':').map(String::from).collect(),
            Some(("upperdir", v)) => o.upper = Some(v.to_string()),
            Some(("workdir", v)) => o.work = Some(v.to_string()),
            Some((k, v)) => o.other.push((k.to_string(), Some(v.to_string()))),
            None => match opt.as_str() {
                "ro" => o.attrs |= libc::MOUNT_ATTR_RDONLY,
                "nosuid" => o.attrs |= libc::MOUNT_ATTR_NOSUID,
                "nodev" => o.attrs |= libc::MOUNT_ATTR_NODEV,
                "noexec" => o.attrs |= libc::MOUNT_ATTR_NOEXEC,
                "rw" | "defaults" => {}
                flag => o.other.push((flag.to_string(), None)),
            },
        }
    }
    if o.lower.is_empty() || o.lower.iter().any(|l| l.is_empty()) {
        return Err(format!("no usable lowerdir in {options:?}"));
    }
    if o.upper.is_some() != o.work.is_some() {
        return Err("upperdir and workdir come together".into());
    }
    o.idmap = match (uidmap, gidmap) {
        (None, None) => None,
        (Some(uids), Some(gids)) => Some(MountMaps { uids, gids }),
        _ => return Err("uidmap and gidmap come together".into()),
    };
    Ok(o)
}

fn cstr(s: &str) -> std::io::Result<std::ffi::CString> {
    std::ffi::CString::new(s).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
}

fn check(r: libc::c_long, what: &str) -> std::io::Result<libc::c_long> {
    if r < 0 {
        return Err(std::io::Error::last_os_error().with(what));
    }
    Ok(r)
}

/// A detached (idmapped with `userns`, if given, and, for a lower layer, read-only)
/// clone of the directory `path`, and a directory descriptor of its root to give
/// overlayfs.
fn layer(path: &str, userns: Option<BorrowedFd<'_>>, readonly: bool) -> std::io::Result<OwnedFd> {
    let tree = super::share::open_tree(Path::new(path), false).map_err(|e| e.with(path))?;
    if readonly {
        set_attr(tree.as_fd(), libc::MOUNT_ATTR_RDONLY, -1, false)?;
    }
    if let Some(userns) = userns {
        idmap_with(userns, tree.as_fd(), false).map_err(|e| e.with(format!("idmap {path}")))?;
    }
    Ok(tree)
}

/// The upper and work directories as one idmapped clone of their common parent
/// (overlayfs wants both on one mount): that clone, then the two directories in it.
/// The clone's descriptor must stay open until the overlay is made: closing it
/// dissolves the detached tree, and overlayfs takes only the root of a live one.
fn upper_and_work(
    upper: &str,
    work: &str,
    userns: Option<BorrowedFd<'_>>,
) -> std::io::Result<[OwnedFd; 3]> {
    let (up, wk) = (Path::new(upper), Path::new(work));
    let parent = up
        .parent()
        .filter(|p| Some(*p) == wk.parent())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("upperdir {upper} and workdir {work} are not siblings"),
            )
        })?;
    let tree = layer(&parent.to_string_lossy(), userns, false)?;
    let open = |name: &Path| -> std::io::Result<OwnedFd> {
        let name = name.file_name().unwrap_or_default();
        Ok(nix::fcntl::openat(
            &tree,
            name,
            nix::fcntl::OFlag::O_RDONLY
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_NOFOLLOW
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?)
    };
    let (u, w) = (open(up)?, open(wk)?);
    Ok([tree, u, w])
}

fn fsconfig(
    fs: BorrowedFd<'_>,
    cmd: libc::c_uint,
    key: Option<&str>,
    value: Option<&str>,
    aux: i32,
) -> std::io::Result<()> {
    let key_c = key.map(cstr).transpose()?;
    let value_c = value.map(cstr).transpose()?;
    let kp = key_c.as_ref().map_or(std::ptr::null(), |k| k.as_ptr());
    let vp = value_c.as_ref().map_or(std::ptr::null(), |v| v.as_ptr());
    // SAFETY: C strings (or null) that outlive the call, and a descriptor we hold.
    let r = unsafe { libc::syscall(libc::SYS_fsconfig, fs.as_raw_fd(), cmd, kp, vp, aux) };
    let what = format!("overlay option {}", key.unwrap_or("create"));
    if r < 0 && cmd == libc::FSCONFIG_SET_FD {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EBADF) {
            // Before 6.13 `FSCONFIG_SET_FD` takes no O_PATH descriptor, which is what a
            // layer's clone is (seen on 6.12): the kernel's refusal of layers by
            // descriptor, like the EINVAL of 6.13-6.14, not a descriptor we lost.
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                format!("{what}: {e} (this kernel takes no layer by descriptor)"),
            ));
        }
        return Err(e.with(what));
    }
    check(r, &what).map(drop)
}

/// Makes the overlay `o` with every layer idmapped through `ns`, detached; the caller
/// attaches it. The lower layers are idmapped with `lower` instead where given (the
/// layers' own mapping, `o.idmap`, followed by `ns`'s).
///
/// overlayfs does its own work in the upper layer (its work directory, copy-ups) with
/// the credentials that made it, and host root's uid 0 has no place in the layers'
/// mapping: such a write would fail (`EOVERFLOW`). So the overlay is made on a thread
/// of its own whose filesystem ids are the namespace's root (`ns.host_base`, which the
/// mapping takes to 0 on disk), with the capabilities a change of filesystem ids drops
/// raised again: the overlay's own writes land as root on disk, as they would without
/// the namespace.
pub fn mount_idmapped(
    o: &OverlayOptions,
    ns: &PodUserns,
    lower: Option<BorrowedFd<'_>>,
) -> std::io::Result<OwnedFd> {
    mount_idmapped_by(o, ns, lower, None)
}

/// `mount_idmapped` by `force`'s method where given (for tests: each is checked on
/// every kernel that has it), else as the kernel allows.
pub fn mount_idmapped_by(
    o: &OverlayOptions,
    ns: &PodUserns,
    lower: Option<BorrowedFd<'_>>,
    force: Option<Method>,
) -> std::io::Result<OwnedFd> {
    std::thread::scope(|s| {
        s.spawn(|| {
            as_filesystem_ids(ns.host_base)?;
            make(o, Some(lower.unwrap_or(ns.fd())), Some(ns.fd()), force)
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the overlay thread panicked")))
    })
    .map_err(jail_hint)
}

/// Makes the overlay `o` with its lower layers idmapped through `lower` (the user
/// namespace of their `uidmap=` and `gidmap=`), detached, as containerd's own mount
/// code makes it for runc: the upper layer as it is.
pub fn mount_lowers_idmapped(
    o: &OverlayOptions,
    lower: BorrowedFd<'_>,
) -> std::io::Result<OwnedFd> {
    make(o, Some(lower), None, None)
}

/// This thread's filesystem uid and gid become `id`; its effective capabilities are
/// its permitted ones again. Per thread: the kernel keeps credentials per task, and
/// `setfsuid` is not broadcast to other threads as `setuid` is by the C library.
fn as_filesystem_ids(id: u32) -> std::io::Result<()> {
    // SAFETY: plain syscalls on this thread's credentials.
    unsafe {
        libc::setfsuid(id);
        libc::setfsgid(id);
        // An invalid id changes nothing and returns the current one.
        if libc::setfsuid(u32::MAX) as u32 != id || libc::setfsgid(u32::MAX) as u32 != id {
            return Err(std::io::Error::other(format!(
                "cannot take filesystem ids {id} for the overlay"
            )));
        }
    }
    let permitted = caps::read(None, caps::CapSet::Permitted).map_err(std::io::Error::other)?;
    caps::set(None, caps::CapSet::Effective, &permitted).map_err(std::io::Error::other)
}

/// How an overlay's layers reach overlayfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Detached clones, by descriptor (Linux ≥ 6.15).
    Descriptors,
    /// The same clones attached in a scratch mount namespace, by path (older kernels).
    ScratchPaths,
}

/// The method the last overlay made by this process took (0: none yet).
static LAST: AtomicU8 = AtomicU8::new(0);

/// How the last overlay this process made got its layers, if it made one.
pub fn last_method() -> Option<Method> {
    match LAST.load(Ordering::Relaxed) {
        1 => Some(Method::Descriptors),
        2 => Some(Method::ScratchPaths),
        _ => None,
    }
}

/// Makes the overlay `o`, detached, by descriptor where the kernel takes detached
/// layers, else by path in a scratch namespace (`force` picks one, for tests).
fn make(
    o: &OverlayOptions,
    lower: Option<BorrowedFd<'_>>,
    upper: Option<BorrowedFd<'_>>,
    force: Option<Method>,
) -> std::io::Result<OwnedFd> {
    let by_path = |first: Option<std::io::Error>| {
        let m = by_scratch_paths(o, lower, upper).map_err(|e| match first {
            Some(first) => std::io::Error::new(e.kind(), format!("{e} (by descriptor: {first})")),
            None => e,
        })?;
        if LAST.swap(2, Ordering::Relaxed) != 2 {
            tracing::info!(
                "overlay layers attached in a scratch mount namespace: this kernel takes \
                 no detached layer (Linux < 6.15)"
            );
        }
        Ok(m)
    };
    match force {
        Some(Method::ScratchPaths) => by_path(None),
        Some(Method::Descriptors) => by_descriptor(o, lower, upper),
        None => match by_descriptor(o, lower, upper) {
            Ok(m) => {
                LAST.store(1, Ordering::Relaxed);
                Ok(m)
            }
            // Linux < 6.13 knows no layer by descriptor (before 6.5 overlayfs took no
            // descriptor at all: EOPNOTSUPP; 6.12 takes no O_PATH one: EBADF, made
            // Unsupported by `fsconfig`), < 6.15 no detached one (EINVAL). Any other
            // cause of these comes back from the second try, named.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::InvalidInput | std::io::ErrorKind::Unsupported
                ) =>
            {
                by_path(Some(e))
            }
            Err(e) => Err(e),
        },
    }
}

/// Where a scratch namespace attaches layers: a tmpfs of its own over the first of
/// these that is a directory (hidden only in that namespace).
const SCRATCH_DIRS: &[&str] = &["/tmp", "/mnt", "/run"];

/// A path of ours in overlay's options, which split on `,` and `:` and escape with `\`.
fn plain(s: &str) -> std::io::Result<&str> {
    if s.contains([',', ':', '\\', '\0']) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{s:?} cannot be given to overlayfs by path"),
        ));
    }
    Ok(s)
}

/// `make` for a kernel that takes no detached layer: on a thread in a throwaway mount
/// namespace, the layers are cloned (as by descriptor) and attached on a tmpfs that
/// only that namespace has, the overlay is mounted from their paths there, and a
/// detached clone of it is returned. The namespace, the tmpfs and every attachment go
/// with the thread; the overlay keeps its own private clones of its layers.
fn by_scratch_paths(
    o: &OverlayOptions,
    lower: Option<BorrowedFd<'_>>,
    upper: Option<BorrowedFd<'_>>,
) -> std::io::Result<OwnedFd> {
    use nix::mount::{mount, MsFlags};
    super::podns::in_scratch_ns(|| -> std::io::Result<OwnedFd> {
        // Cloned by containerd's paths before anything is mounted here.
        let lowers = o
            .lower
            .iter()
            .map(|l| layer(l, lower, true))
            .collect::<std::io::Result<Vec<_>>>()?;
        let upper = match (&o.upper, &o.work) {
            (Some(up), Some(wk)) => {
                let [tree, _, _] = upper_and_work(up, wk, upper)?;
                let name = |p: &str| {
                    let n = Path::new(p).file_name().unwrap_or_default();
                    plain(&n.to_string_lossy()).map(str::to_string)
                };
                Some((tree, name(up)?, name(wk)?))
            }
            _ => None,
        };
        let base = SCRATCH_DIRS
            .iter()
            .map(Path::new)
            .find(|p| p.is_dir())
            .ok_or_else(|| {
                std::io::Error::other(format!("none of {SCRATCH_DIRS:?} to attach layers on"))
            })?;
        let errno = |what: String| move |e: nix::Error| std::io::Error::from(e).with(what);
        mount(
            Some("tmpfs"),
            base,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("mode=700"),
        )
        .map_err(errno(format!("a scratch tmpfs on {}", base.display())))?;
        let point = |name: &str| -> std::io::Result<(String, OwnedFd)> {
            let path = base.join(name);
            std::fs::create_dir(&path)?;
            let fd = nix::fcntl::open(
                &path,
                nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY,
                nix::sys::stat::Mode::empty(),
            )?;
            Ok((plain(&path.to_string_lossy())?.to_string(), fd))
        };
        let mut data = Vec::new();
        let mut lowerdirs = Vec::new();
        for (i, tree) in lowers.iter().enumerate() {
            let (path, at) = point(&format!("l{i}"))?;
            super::share::attach(tree, &at).map_err(|e| e.with(format!("attach layer {i}")))?;
            lowerdirs.push(path);
        }
        data.push(format!("lowerdir={}", lowerdirs.join(":")));
        if let Some((tree, up, wk)) = &upper {
            let (path, at) = point("u")?;
            super::share::attach(tree, &at).map_err(|e| e.with("attach the upper layer"))?;
            data.push(format!("upperdir={path}/{up}"));
            data.push(format!("workdir={path}/{wk}"));
        }
        for (k, v) in &o.other {
            data.push(match v {
                Some(v) => format!("{}={}", plain(k)?, plain(v)?),
                None => plain(k)?.to_string(),
            });
        }
        let (target, _) = point("o")?;
        mount(
            Some("overlay"),
            target.as_str(),
            Some("overlay"),
            MsFlags::empty(),
            Some(data.join(",").as_str()),
        )
        .map_err(errno("mount overlay by path".into()))?;
        let tree = super::share::open_tree(Path::new(&target), false)?;
        if o.attrs != 0 {
            set_attr(tree.as_fd(), o.attrs, -1, false)?;
        }
        Ok(tree)
    })?
}

/// An error's kind, with what was being done put in front of it.
trait With {
    fn with(self, what: impl std::fmt::Display) -> std::io::Error;
}

impl With for std::io::Error {
    fn with(self, what: impl std::fmt::Display) -> std::io::Error {
        std::io::Error::new(self.kind(), format!("{what}: {self}"))
    }
}

fn by_descriptor(
    o: &OverlayOptions,
    lower: Option<BorrowedFd<'_>>,
    upper: Option<BorrowedFd<'_>>,
) -> std::io::Result<OwnedFd> {
    let name = cstr("overlay")?;
    // SAFETY: a valid C string that outlives the call.
    let fs = check(
        unsafe { libc::syscall(libc::SYS_fsopen, name.as_ptr(), libc::FSOPEN_CLOEXEC) },
        "fsopen overlay",
    )?;
    // SAFETY: fsopen returned a new fd that nothing else owns.
    let fs = unsafe { OwnedFd::from_raw_fd(fs as i32) };
    let fs = fs.as_fd();
    for (k, v) in &o.other {
        match v {
            Some(v) => fsconfig(fs, libc::FSCONFIG_SET_STRING, Some(k), Some(v), 0)?,
            None => fsconfig(fs, libc::FSCONFIG_SET_FLAG, Some(k), None, 0)?,
        }
    }
    // Held until the overlay is made: it keeps its own references then.
    let mut held = Vec::new();
    for l in &o.lower {
        let fd = layer(l, lower, true)?;
        fsconfig(
            fs,
            libc::FSCONFIG_SET_FD,
            Some("lowerdir+"),
            None,
            fd.as_raw_fd(),
        )?;
        held.push(fd);
    }
    if let (Some(up), Some(wk)) = (&o.upper, &o.work) {
        let fds = upper_and_work(up, wk, upper)?;
        fsconfig(
            fs,
            libc::FSCONFIG_SET_FD,
            Some("upperdir"),
            None,
            fds[1].as_raw_fd(),
        )?;
        fsconfig(
            fs,
            libc::FSCONFIG_SET_FD,
            Some("workdir"),
            None,
            fds[2].as_raw_fd(),
        )?;
        held.extend(fds);
    }
    fsconfig(fs, libc::FSCONFIG_CMD_CREATE, None, None, 0)?;
    // SAFETY: a descriptor we hold.
    let m = check(
        unsafe {
            libc::syscall(
                libc::SYS_fsmount,
                fs.as_raw_fd(),
                libc::FSMOUNT_CLOEXEC,
                o.attrs as libc::c_uint,
            )
        },
        "fsmount overlay",
    )?;
    // SAFETY: fsmount returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(m as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn containerd_options_split_into_layers_and_the_rest() {
        let o = parse(&opts(&[
            "index=off",
            "workdir=/s/2/work",
            "upperdir=/s/2/fs",
            "lowerdir=/s/1/fs:/s/0/fs",
            "userxattr",
            "ro",
        ]))
        .unwrap();
        assert_eq!(o.lower, ["/s/1/fs", "/s/0/fs"]);
        assert_eq!(o.upper.as_deref(), Some("/s/2/fs"));
        assert_eq!(o.work.as_deref(), Some("/s/2/work"));
        assert_eq!(
            o.other,
            [
                ("index".to_string(), Some("off".to_string())),
                ("userxattr".to_string(), None)
            ]
        );
        assert_eq!(o.attrs, libc::MOUNT_ATTR_RDONLY);
        // A read-only view: lower layers only.
        let o = parse(&opts(&["lowerdir=/a:/b"])).unwrap();
        assert!(o.upper.is_none() && o.work.is_none());
    }

    /// A lower layer with a file of root's and one of uid 1000's, an empty snapshot
    /// (upper and work) and a mount point, in a scratch directory.
    fn layers() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let p = |s: &str| t.path().join(s);
        for d in ["lower", "snap/fs", "snap/work", "target"] {
            std::fs::create_dir_all(p(d)).unwrap();
        }
        std::fs::write(p("lower/root-file"), "r").unwrap();
        std::fs::write(p("lower/user-file"), "u").unwrap();
        std::os::unix::fs::lchown(p("lower/user-file"), Some(1000), Some(1000)).unwrap();
        t
    }

    #[test]
    fn options_missing_a_layer_are_named() {
        assert!(parse(&opts(&["upperdir=/u", "workdir=/w"])).is_err());
        assert!(parse(&opts(&["lowerdir=/a::/b"])).is_err());
        let e = parse(&opts(&["lowerdir=/a", "upperdir=/u"])).unwrap_err();
        assert!(e.contains("workdir"), "{e}");
    }

    /// A file owned by 0 and one by 1000 in the image, seen through the overlay as the
    /// namespace's range shows them, and a file made through it landing as the
    /// namespace's root on disk: as 0.
    #[tokio::test]
    async fn an_idmapped_overlay_shows_and_writes_the_layers_owners() {
        shows_and_writes_the_layers_owners(Method::Descriptors).await;
    }

    /// The same overlay, made as on a kernel older than 6.15, and nothing of its making
    /// (the scratch tmpfs, the attached layers) left in this namespace.
    #[tokio::test]
    async fn an_overlay_by_scratch_paths_is_the_same_and_leaves_nothing() {
        let before = mount_count();
        shows_and_writes_the_layers_owners(Method::ScratchPaths).await;
        assert_eq!(
            mount_count(),
            before,
            "mounts left by the scratch namespace"
        );
    }

    /// The mounts the scratch method makes if it leaves any: on a scratch directory
    /// itself or on one of its names there. Other tests mount elsewhere meanwhile (the
    /// table is the node's), so a plain count would race with them.
    fn mount_count() -> usize {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(Path::new))
            .filter(|point| {
                SCRATCH_DIRS.iter().any(|d| {
                    *point == Path::new(d)
                        || point.parent() == Some(Path::new(d))
                            && point.file_name().is_some_and(|n| {
                                let n = n.to_string_lossy();
                                n == "u"
                                    || n == "o"
                                    || n.strip_prefix('l')
                                        .is_some_and(|i| i.parse::<u32>().is_ok())
                            })
                })
            })
            .count()
    }

    async fn shows_and_writes_the_layers_owners(method: Method) {
        if !nix::unistd::geteuid().is_root() {
            cocoon_nested::testing::missing("overlay", "mounting needs root");
            return;
        }
        use std::os::unix::fs::MetadataExt;
        let t = layers();
        let p = |s: &str| t.path().join(s);
        let base = 1_500_196_608;
        let ns = PodUserns::create(base, crate::hypervisor::userns::IDS_PER_POD).unwrap();
        let o = parse(&[
            format!("lowerdir={}", p("lower").display()),
            format!("upperdir={}", p("snap/fs").display()),
            format!("workdir={}", p("snap/work").display()),
        ])
        .unwrap();
        let m = mount_idmapped_by(&o, &ns, None, Some(method)).unwrap();
        let target = nix::fcntl::open(
            &p("target"),
            nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
        crate::shimv2::share::attach(&m, &target).unwrap();
        let uid = |f: &str| {
            std::fs::symlink_metadata(p("target").join(f))
                .unwrap()
                .uid()
        };
        assert_eq!(uid("root-file"), base);
        assert_eq!(uid("user-file"), base + 1000);
        // Root of the host is not in the range: through the overlay it makes nothing.
        let e = std::fs::write(p("target/new"), "x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EOVERFLOW), "{e}");
        // The namespace's root (virtiofsd's identity) writes as the guest would.
        let mut cmd = tokio::process::Command::new("/bin/sh");
        cmd.current_dir(p("target")).args([
            "-c",
            "echo x > new && chown 1000:1000 new && mkdir d && chmod 600 user-file",
        ]);
        ns.enter_as_root(&mut cmd, 1024);
        assert!(cmd.status().await.unwrap().success());
        nix::mount::umount2(&p("target"), nix::mount::MntFlags::MNT_DETACH).unwrap();
        // On disk, in the upper layer, with the ids it gave.
        let disk = |f: &str| std::fs::symlink_metadata(p(f)).unwrap();
        assert_eq!(disk("snap/fs/new").uid(), 1000);
        assert_eq!(disk("snap/fs/d").uid(), 0);
        assert_eq!(
            disk("snap/fs/user-file").uid(),
            1000,
            "copied up, owner kept"
        );
        // The lower layer is untouched.
        assert_eq!(disk("lower/user-file").mode() & 0o777, 0o644);
    }

    /// A `hostUsers: false` pod's snapshot (containerd's `uidmap=`/`gidmap=`) in a
    /// jailed pod: the layers' owners show as the host ids the pod's mapping names,
    /// as the pod's share maps them (`compose`), so that virtiofsd serves them as
    /// the mapping's ids and the container's root owns its rootfs.
    #[test]
    fn layers_with_containerds_idmap_show_the_pods_host_ids_through_the_jail() {
        containerds_idmap_through_the_jail(Method::Descriptors);
    }

    #[test]
    fn layers_with_containerds_idmap_by_scratch_paths() {
        containerds_idmap_through_the_jail(Method::ScratchPaths);
    }

    fn containerds_idmap_through_the_jail(method: Method) {
        if !nix::unistd::geteuid().is_root() {
            cocoon_nested::testing::missing("overlay", "mounting needs root");
            return;
        }
        use std::os::unix::fs::MetadataExt;
        let t = layers();
        let p = |s: &str| t.path().join(s);
        let (base, extra) = (1_500_262_144, 1_500_327_680);
        let ns = PodUserns::create_for_test(
            base,
            &[crate::hypervisor::userns::Extent {
                inside: 196_608,
                outside: extra,
                count: 65_536,
            }],
        )
        .unwrap();
        let o = parse(&[
            format!("lowerdir={}", p("lower").display()),
            format!("upperdir={}", p("snap/fs").display()),
            format!("workdir={}", p("snap/work").display()),
            "uidmap=0:196608:65536".into(),
            "gidmap=0:196608:65536".into(),
        ])
        .unwrap();
        let mut mappers = super::super::idmaps::Idmappers::new(Some(&ns));
        let lower = mappers.get(o.idmap.as_ref().unwrap()).unwrap();
        let m = mount_idmapped_by(&o, &ns, Some(lower.as_fd()), Some(method)).unwrap();
        let target = nix::fcntl::open(
            &p("target"),
            nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
        crate::shimv2::share::attach(&m, &target).unwrap();
        let meta = |f: &str| std::fs::symlink_metadata(p("target").join(f)).unwrap();
        assert_eq!(
            (meta("root-file").uid(), meta("root-file").gid()),
            (extra, extra)
        );
        assert_eq!(meta("user-file").uid(), extra + 1000);
        nix::mount::umount2(&p("target"), nix::mount::MntFlags::MNT_DETACH).unwrap();
        // An id the pod's share does not map is named, not shown as the overflow id.
        let o = parse(&[
            format!("lowerdir={}", p("lower").display()),
            "uidmap=0:400000:10".into(),
            "gidmap=0:400000:10".into(),
        ])
        .unwrap();
        let e = mappers.get(o.idmap.as_ref().unwrap()).unwrap_err();
        assert!(e.to_string().contains("host id 400000"), "{e}");
        // One without the other is refused.
        let e = parse(&opts(&["lowerdir=/a", "uidmap=0:1:1"])).unwrap_err();
        assert!(e.contains("gidmap"), "{e}");
    }
}
