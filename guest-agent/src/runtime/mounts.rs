//! The container's filesystem view, built in its new mount namespace: the
//! spec's mounts under the rootfs, device nodes, pivot_root, then masked and
//! read-only paths and a read-only root.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::sys::statvfs::{statvfs, FsFlags};
use oci_spec::runtime::{LinuxDevice, LinuxDeviceType, Mount, Spec};

use super::mount_attrs::RecursiveAttrs;
use super::{lexists, Context, RuntimeError};

/// Parsed mount options: flags for the mount itself, propagation changes
/// applied afterwards, and filesystem-specific data.
#[derive(Debug, PartialEq, Eq)]
pub struct MountOptions {
    pub flags: MsFlags,
    /// Flags the options clear (`rw`, `suid`, ...), for remounts.
    pub cleared: MsFlags,
    pub propagation: Vec<MsFlags>,
    pub bind: bool,
    pub data: Vec<String>,
    /// `rro`, `rnoexec` and the like, for the mount and everything below it.
    pub recursive: RecursiveAttrs,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            flags: MsFlags::empty(),
            cleared: MsFlags::empty(),
            propagation: Vec::new(),
            bind: false,
            data: Vec::new(),
            recursive: RecursiveAttrs::default(),
        }
    }
}

pub fn parse_options(opts: &[String]) -> MountOptions {
    let mut o = MountOptions::default();
    for opt in opts {
        if o.recursive.take(opt) {
            continue;
        }
        let (set, clear) = match opt.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "remount" => (MsFlags::MS_REMOUNT, MsFlags::empty()),
            "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty()),
            "nomand" => (MsFlags::empty(), MsFlags::MS_MANDLOCK),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "nostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME),
            "nosymfollow" => (MS_NOSYMFOLLOW, MsFlags::empty()),
            "symfollow" => (MsFlags::empty(), MS_NOSYMFOLLOW),
            "lazytime" => (MsFlags::MS_LAZYTIME, MsFlags::empty()),
            "nolazytime" => (MsFlags::empty(), MsFlags::MS_LAZYTIME),
            "iversion" => (MsFlags::MS_I_VERSION, MsFlags::empty()),
            "noiversion" => (MsFlags::empty(), MsFlags::MS_I_VERSION),
            "silent" => (MsFlags::MS_SILENT, MsFlags::empty()),
            "loud" => (MsFlags::empty(), MsFlags::MS_SILENT),
            "bind" => {
                o.bind = true;
                (MsFlags::MS_BIND, MsFlags::empty())
            }
            "rbind" => {
                o.bind = true;
                (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty())
            }
            p @ ("private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave"
            | "unbindable" | "runbindable") => {
                o.propagation
                    .push(propagation_flags(p).unwrap_or(MsFlags::MS_PRIVATE));
                continue;
            }
            // Handled by higher-level tools, meaningless here.
            "tmpcopyup" | "defaults" => continue,
            data => {
                o.data.push(data.to_string());
                continue;
            }
        };
        // In bits: `!` on the flags type would drop the bits nix does not name.
        o.flags = MsFlags::from_bits_retain((o.flags.bits() | set.bits()) & !clear.bits());
        o.cleared |= clear;
    }
    o
}

pub fn propagation_flags(p: &str) -> Option<MsFlags> {
    Some(match p {
        "private" => MsFlags::MS_PRIVATE,
        "rprivate" => MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        "shared" => MsFlags::MS_SHARED,
        "rshared" => MsFlags::MS_SHARED | MsFlags::MS_REC,
        "slave" => MsFlags::MS_SLAVE,
        "rslave" => MsFlags::MS_SLAVE | MsFlags::MS_REC,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        "runbindable" => MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
        _ => return None,
    })
}

/// Joins `path` under `root`, resolving symlinks as if `root` were `/`, so
/// that a symlink in the image cannot point a mount outside the rootfs.
pub fn secure_join(root: &Path, path: &Path) -> Result<PathBuf, RuntimeError> {
    let mut todo: VecDeque<OsString> = components(path);
    let mut resolved = PathBuf::new();
    let mut links = 0;
    while let Some(c) = todo.pop_front() {
        match c.as_bytes() {
            b"" | b"." | b"/" => continue,
            b".." => {
                resolved.pop();
                continue;
            }
            _ => {}
        }
        let candidate = resolved.join(&c);
        let full = root.join(&candidate);
        match fs::symlink_metadata(&full) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    return Err(RuntimeError::Invalid(format!(
                        "too many symlinks resolving {path:?}"
                    )));
                }
                let target = fs::read_link(&full).ctx(|| format!("readlink {full:?}"))?;
                if target.is_absolute() {
                    resolved = PathBuf::new();
                }
                let mut rest = components(&target);
                rest.extend(todo);
                todo = rest;
            }
            _ => resolved = candidate,
        }
    }
    Ok(root.join(resolved))
}

fn components(p: &Path) -> VecDeque<OsString> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect()
}

pub(super) fn do_mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), RuntimeError> {
    mount(source, target, fstype, flags, data).ctx(|| {
        format!(
            "cannot mount {} on {target:?} (type {}, flags {flags:?})",
            source.map(|s| s.display().to_string()).unwrap_or_default(),
            fstype.unwrap_or("-"),
        )
    })
}

/// Creates the mount point: a directory, or an empty file when binding a file.
///
/// One that exists is left as it is, found with a stat first (as runc does): `mkdir`
/// on an existing directory of a virtio-fs rootfs is a round trip to virtiofsd just to
/// hear `EEXIST`, while the stat is answered from the entry the path's lookup cached.
pub(super) fn make_mount_point(dest: &Path, is_file: bool) -> Result<(), RuntimeError> {
    let exists = match is_file {
        true => lexists(dest),
        false => fs::metadata(dest).is_ok_and(|m| m.is_dir()),
    };
    if exists {
        return Ok(());
    }
    if is_file {
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).ctx(|| format!("cannot create {parent:?}"))?;
        }
        fs::File::create(dest)
            .map(drop)
            .ctx(|| format!("cannot create {dest:?}"))
    } else {
        fs::create_dir_all(dest).ctx(|| format!("cannot create {dest:?}"))
    }
}

/// `MS_NOSYMFOLLOW` (Linux 5.10), which nix does not name: symbolic links on the mount
/// are not followed, as runc's `nosymfollow`.
const MS_NOSYMFOLLOW: MsFlags = MsFlags::from_bits_retain(libc::MS_NOSYMFOLLOW);

const REMOUNT_FLAGS: MsFlags = MsFlags::MS_RDONLY
    .union(MS_NOSYMFOLLOW)
    .union(MsFlags::MS_NOSUID)
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC)
    .union(MsFlags::MS_NOATIME)
    .union(MsFlags::MS_NODIRATIME)
    .union(MsFlags::MS_RELATIME)
    .union(MsFlags::MS_STRICTATIME);

fn mount_one(m: &Mount, rootfs: &Path, cgroup_v2: bool) -> Result<(), RuntimeError> {
    let dest = secure_join(rootfs, m.destination())?;
    let opts = parse_options(m.options().as_deref().unwrap_or_default());
    let typ = m.typ().as_deref().unwrap_or("");
    let data = (!opts.data.is_empty()).then(|| opts.data.join(","));
    if typ == "bind" || opts.bind {
        let src = m.source().as_ref().ok_or_else(|| {
            RuntimeError::Invalid(format!("bind mount {:?} has no source", m.destination()))
        })?;
        let src_is_dir = fs::metadata(src)
            .ctx(|| format!("bind mount source {src:?}"))?
            .is_dir();
        make_mount_point(&dest, !src_is_dir)?;
        let bind = MsFlags::MS_BIND | (opts.flags & MsFlags::MS_REC);
        do_mount(Some(src), &dest, None, bind, None)?;
        // Bind mounts ignore most flags; they take effect on a remount.
        let extra = opts.flags & REMOUNT_FLAGS;
        if !extra.is_empty() {
            do_mount(
                None,
                &dest,
                None,
                MsFlags::MS_REMOUNT | MsFlags::MS_BIND | extra,
                None,
            )?;
        }
    } else if typ == "cgroup" || typ == "cgroup2" {
        if !cgroup_v2 {
            // No v2 hierarchy to show (a v1 host in the dev mode).
            return Ok(());
        }
        make_mount_point(&dest, false)?;
        // Mounted from inside the container's cgroup namespace, whose root
        // is the container's own group: the files show its limits.
        let flags = cgroup_mount_flags(&opts);
        match do_mount(
            Some(Path::new("cgroup2")),
            &dest,
            Some("cgroup2"),
            flags,
            None,
        ) {
            // A user namespace without a cgroup namespace of its own may not
            // mount cgroup2: bind the container's own group, as runc does.
            Err(e @ RuntimeError::Sys(_, nix::Error::EPERM)) => match own_cgroup()? {
                // The root of a cgroup namespace: binding it would show the whole tree.
                None => return Err(e),
                Some(own) => rbind_with(&own, &dest, flags)?,
            },
            r => r?,
        }
    } else {
        make_mount_point(&dest, false)?;
        let src = m.source().clone().unwrap_or_else(|| PathBuf::from(typ));
        let r = do_mount(Some(&src), &dest, Some(typ), opts.flags, data.as_deref());
        match r {
            // sysfs needs a network namespace of its own: fall back to the
            // host's, read-only as runc does.
            Err(RuntimeError::Sys(_, nix::Error::EPERM)) if typ == "sysfs" => {
                rbind_with(Path::new("/sys"), &dest, opts.flags)?
            }
            r => r?,
        }
    }
    // After the mount's own flags, as runc applies them.
    opts.recursive.apply(&dest)?;
    for p in &opts.propagation {
        do_mount(None, &dest, None, *p, None)?;
    }
    Ok(())
}

/// Binds `src` with what is mounted below it on `dest`, then remounts it with those of
/// `flags` a bind ignores (read-only, nosuid, ...).
fn rbind_with(src: &Path, dest: &Path, flags: MsFlags) -> Result<(), RuntimeError> {
    do_mount(
        Some(src),
        dest,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    let remount = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | (flags & REMOUNT_FLAGS);
    do_mount(None, dest, None, remount, None)
}

/// This process's group in the v2 hierarchy, as a path under /sys/fs/cgroup (the
/// agent placed the helper there before its request); None at the root of the tree
/// or of a cgroup namespace.
fn own_cgroup() -> Result<Option<PathBuf>, RuntimeError> {
    let text = fs::read_to_string("/proc/self/cgroup").ctx(|| "/proc/self/cgroup".into())?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| {
            RuntimeError::Invalid(format!("no v2 group in /proc/self/cgroup: {text:?}"))
        })?;
    if rel == "/" {
        return Ok(None);
    }
    secure_join(Path::new("/sys/fs/cgroup"), Path::new(rel)).map(Some)
}

/// A cgroup mount is nosuid, nodev and noexec, and read-only unless the spec
/// asks for `rw` (containerd does for privileged containers), as with runc.
fn cgroup_mount_flags(opts: &MountOptions) -> MsFlags {
    let mut flags = opts.flags | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if !opts.cleared.contains(MsFlags::MS_RDONLY) {
        flags |= MsFlags::MS_RDONLY;
    }
    flags
}

/// runc's default device nodes, created in a spec-mounted /dev.
const DEFAULT_DEVICES: &[(&str, u64, u64)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

fn make_device(
    dest: &Path,
    kind: SFlag,
    major: u64,
    minor: u64,
    mode: u32,
    host: &Path,
) -> Result<(), RuntimeError> {
    if lexists(dest) {
        return Ok(());
    }
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).ctx(|| format!("cannot create {parent:?}"))?;
    }
    match mknod(
        dest,
        kind,
        Mode::from_bits_truncate(mode),
        makedev(major, minor),
    ) {
        // mknod's mode passes through the umask (0644 for a 0666 /dev/null, which a
        // non-root container could then not write): set it exactly, as runc does.
        Ok(()) => {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(dest, fs::Permissions::from_mode(mode & 0o7777))
                .ctx(|| format!("cannot set the mode of {dest:?}"))
        }
        // Some filesystems refuse device nodes: bind the host's instead.
        Err(_) => {
            make_mount_point(dest, true)?;
            do_mount(Some(host), dest, None, MsFlags::MS_BIND, None)
        }
    }
}

fn create_devices(
    rootfs: &Path,
    devices: &[LinuxDevice],
    dev_mounted: bool,
) -> Result<(), RuntimeError> {
    let dev = rootfs.join("dev");
    if dev_mounted {
        for (name, major, minor) in DEFAULT_DEVICES {
            let host = Path::new("/dev").join(name);
            make_device(
                &dev.join(name),
                SFlag::S_IFCHR,
                *major,
                *minor,
                0o666,
                &host,
            )?;
        }
        for (link, target) in [
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
            ("ptmx", "pts/ptmx"),
        ] {
            let p = dev.join(link);
            if !lexists(&p) {
                std::os::unix::fs::symlink(target, &p).ctx(|| format!("cannot create {p:?}"))?;
            }
        }
    }
    for d in devices {
        let kind = match d.typ() {
            LinuxDeviceType::C | LinuxDeviceType::U => SFlag::S_IFCHR,
            LinuxDeviceType::B => SFlag::S_IFBLK,
            LinuxDeviceType::P => SFlag::S_IFIFO,
            LinuxDeviceType::A => continue,
        };
        let dest = secure_join(rootfs, d.path())?;
        make_device(
            &dest,
            kind,
            d.major() as u64,
            d.minor() as u64,
            d.file_mode().unwrap_or(0o666),
            d.path(),
        )?;
        let uid = d.uid().map(nix::unistd::Uid::from_raw);
        let gid = d.gid().map(nix::unistd::Gid::from_raw);
        if uid.is_some() || gid.is_some() {
            nix::unistd::chown(&dest, uid, gid).ctx(|| format!("cannot chown {dest:?}"))?;
        }
    }
    Ok(())
}

fn detach_old_root() -> Result<(), RuntimeError> {
    // The old root is stacked under "."; detach it without propagating.
    do_mount(
        None,
        Path::new("."),
        None,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None,
    )?;
    umount2(".", MntFlags::MNT_DETACH).ctx(|| "cannot detach the old root".into())
}

/// runc's `--no-pivot`: move the rootfs mount over `/` and chroot into it.
/// The old root stays underneath, covered, and unreachable by path.
fn move_root(rootfs: &Path) -> Result<(), RuntimeError> {
    do_mount(Some(rootfs), Path::new("/"), None, MsFlags::MS_MOVE, None)?;
    nix::unistd::chroot(".").ctx(|| "chroot".into())?;
    Ok(())
}

/// Everything from the mount namespace's propagation to the root switch.
/// Runs in the container init, before it reports ready. `no_pivot` moves
/// the rootfs over `/` instead of pivot_root (also the fallback when
/// pivot_root is refused, as from an initramfs).
pub fn prepare_rootfs(spec: &Spec, cgroup_v2: bool, no_pivot: bool) -> Result<(), RuntimeError> {
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| RuntimeError::Invalid("the spec has no root".into()))?;
    let rootfs = fs::canonicalize(root.path()).ctx(|| format!("rootfs {:?}", root.path()))?;
    let linux = spec.linux().clone().unwrap_or_default();
    // Nothing done here may propagate back to the agent's namespace.
    do_mount(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None,
    )?;
    // pivot_root needs the new root to be a mount point.
    do_mount(
        Some(&rootfs),
        &rootfs,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    let mounts = spec.mounts().clone().unwrap_or_default();
    for m in &mounts {
        mount_one(m, &rootfs, cgroup_v2)?;
    }
    let dev_mounted = mounts.iter().any(|m| m.destination() == Path::new("/dev"));
    create_devices(
        &rootfs,
        linux.devices().as_deref().unwrap_or_default(),
        dev_mounted,
    )?;

    nix::unistd::chdir(&rootfs).ctx(|| format!("cannot enter {rootfs:?}"))?;
    match no_pivot {
        false => match nix::unistd::pivot_root(".", ".") {
            Ok(()) => detach_old_root()?,
            // The agent's root is the initramfs, which pivot_root refuses
            // to move (it has no parent mount).
            Err(nix::Error::EINVAL) => move_root(&rootfs)?,
            Err(e) => return Err(RuntimeError::Sys("pivot_root".into(), e)),
        },
        true => move_root(&rootfs)?,
    }
    nix::unistd::chdir("/").ctx(|| "chdir /".into())?;
    if let Some(p) = linux.rootfs_propagation() {
        let flags = propagation_flags(p)
            .ok_or_else(|| RuntimeError::Invalid(format!("bad rootfsPropagation {p:?}")))?;
        do_mount(None, Path::new("/"), None, flags, None)?;
    }
    // A working directory the image lacks is made, as runc makes it (0755, as the
    // container's root, inside the new root and before it may turn read-only).
    if let Some(cwd) = spec.process().as_ref().map(|p| p.cwd()) {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(cwd)
            .ctx(|| format!("cannot make the working directory {cwd:?}"))?;
    }
    Ok(())
}

/// Read-only and masked paths and a read-only root, inside the new root.
pub fn finalize_rootfs(spec: &Spec) -> Result<(), RuntimeError> {
    let linux = spec.linux().clone().unwrap_or_default();
    for p in linux.readonly_paths().iter().flatten() {
        let p = Path::new(p);
        if !lexists(p) {
            continue;
        }
        do_mount(Some(p), p, None, MsFlags::MS_BIND | MsFlags::MS_REC, None)?;
        remount_readonly(p)?;
    }
    for p in linux.masked_paths().iter().flatten() {
        let p = Path::new(p);
        match fs::metadata(p) {
            Err(_) => continue,
            Ok(m) if m.is_dir() => do_mount(
                Some(Path::new("tmpfs")),
                p,
                Some("tmpfs"),
                MsFlags::MS_RDONLY,
                None,
            )?,
            Ok(_) => do_mount(
                Some(Path::new("/dev/null")),
                p,
                None,
                MsFlags::MS_BIND,
                None,
            )?,
        }
    }
    if spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false)
    {
        remount_readonly(Path::new("/"))?;
    }
    Ok(())
}

/// Remounts the mount at `p` read-only and keeps its other flags, as runc does.
///
/// A bind remount sets the mount's flags to exactly those it is given: without the old
/// ones, `/proc/sys` and the other read-only paths of a container's `/proc` lost the
/// `nosuid,nodev,noexec` of the proc mount they are part of (seen against runc in
/// mountinfo). And where a more privileged namespace set them, a user namespace may not
/// drop them: such a remount fails.
fn remount_readonly(p: &Path) -> Result<(), RuntimeError> {
    let kept = statvfs(p)
        .ctx(|| format!("cannot read the mount flags of {p:?}"))?
        .flags();
    let flags = mount_flags_of(kept) | MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    do_mount(None, p, None, flags, None)
}

/// The per-mount flags of a `statvfs` as `mount(2)` flags.
fn mount_flags_of(st: FsFlags) -> MsFlags {
    [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ]
    .into_iter()
    .filter(|(st_flag, _)| st.contains(*st_flag))
    .fold(MsFlags::empty(), |acc, (_, ms)| acc | ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(o: &[&str]) -> MountOptions {
        parse_options(&o.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn a_remount_keeps_the_per_mount_flags_statvfs_reports() {
        let proc_like = FsFlags::ST_RDONLY
            | FsFlags::ST_NOSUID
            | FsFlags::ST_NODEV
            | FsFlags::ST_NOEXEC
            | FsFlags::ST_RELATIME;
        // Read-only is the remount's own to add; the rest is kept.
        assert_eq!(
            mount_flags_of(proc_like),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RELATIME
        );
        assert_eq!(
            mount_flags_of(FsFlags::ST_NOATIME | FsFlags::ST_NODIRATIME),
            MsFlags::MS_NOATIME | MsFlags::MS_NODIRATIME
        );
        assert_eq!(mount_flags_of(FsFlags::empty()), MsFlags::empty());
    }

    #[test]
    fn options_split_into_flags_propagation_and_data() {
        let o = opts(&[
            "nosuid",
            "strictatime",
            "mode=755",
            "size=65536k",
            "rprivate",
        ]);
        assert_eq!(o.flags, MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME);
        assert_eq!(o.data, vec!["mode=755", "size=65536k"]);
        assert_eq!(o.propagation, vec![MsFlags::MS_PRIVATE | MsFlags::MS_REC]);
        assert!(!o.bind);

        let b = opts(&["rbind", "ro"]);
        assert!(b.bind);
        assert_eq!(
            b.flags,
            MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_RDONLY
        );
        // A later option wins.
        assert_eq!(opts(&["ro", "rw"]).flags, MsFlags::empty());

        // Options runc knows are flags, not mount data (a tmpfs would refuse them).
        let n = opts(&["rbind", "nosymfollow", "lazytime", "silent"]);
        assert!(n.data.is_empty(), "{n:?}");
        assert!(n.flags.contains(MS_NOSYMFOLLOW | MsFlags::MS_LAZYTIME));

        // Recursive attributes are neither flags nor data.
        let r = opts(&["rbind", "rprivate", "rro"]);
        assert_eq!(r.flags, MsFlags::MS_BIND | MsFlags::MS_REC);
        assert!(r.data.is_empty());
        assert_eq!(r.recursive.set, libc::MOUNT_ATTR_RDONLY);
    }

    #[test]
    fn every_option_the_shim_reports_is_known_here() {
        for name in cocoon_protocol::MOUNT_OPTIONS {
            let o = opts(&[name]);
            assert!(o.data.is_empty(), "{name} would be taken as mount data");
        }
    }

    #[test]
    fn cgroup_mounts_are_read_only_unless_rw() {
        let safe = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        let ro = safe | MsFlags::MS_RDONLY;
        assert_eq!(cgroup_mount_flags(&opts(&[])), ro);
        assert_eq!(
            cgroup_mount_flags(&opts(&["nosuid", "noexec", "nodev", "relatime", "ro"])),
            ro | MsFlags::MS_RELATIME
        );
        assert_eq!(cgroup_mount_flags(&opts(&["rw"])), safe);
        assert_eq!(cgroup_mount_flags(&opts(&["rw", "ro"])), ro);
    }

    #[test]
    fn mount_points_are_made_where_missing_and_checked_where_present() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("a/b");
        make_mount_point(&dir, false).unwrap();
        assert!(dir.is_dir());
        make_mount_point(&dir, false).unwrap();
        let file = d.path().join("c/d");
        make_mount_point(&file, true).unwrap();
        assert!(file.is_file());
        make_mount_point(&file, true).unwrap();
        // A file where a directory must go is still refused, not taken for one.
        let err = make_mount_point(&file, false).unwrap_err();
        assert!(err.to_string().contains("c/d"), "{err}");
    }

    #[test]
    fn secure_join_stays_inside_the_root() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        fs::create_dir_all(root.join("etc")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../../../etc", root.join("rel")).unwrap();
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        assert_eq!(
            secure_join(root, Path::new("/abs/passwd")).unwrap(),
            root.join("etc/passwd")
        );
        assert_eq!(
            secure_join(root, Path::new("/rel/x")).unwrap(),
            root.join("etc/x")
        );
        assert_eq!(
            secure_join(root, Path::new("/../../x")).unwrap(),
            root.join("x")
        );
        assert!(secure_join(root, Path::new("/loop")).is_err());
    }
}
