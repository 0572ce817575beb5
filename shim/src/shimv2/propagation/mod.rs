//! Host-to-container mount propagation for volumes shared into a pod's VM.
//!
//! Under runc, a volume with `rslave` or `rshared` propagation (CRI's
//! `HostToContainer`, `Bidirectional`) receives what the host mounts beneath its source
//! after the container started: the kernel propagates the mount into the container's
//! namespace. A Cocoon volume is a clone of the source in the pod's share, which
//! virtiofsd exports; kernel propagation into it would bring the host's mount as it is,
//! not read-only when the volume is, and not idmapped for a virtiofsd in a user namespace
//! (which could then not read a root-owned directory). So every volume's clone is made
//! private (`share::Beneath::bind`), and this watcher mirrors the host's mounts beneath
//! the sources of the propagating ones instead: each new mount is cloned alone, given the
//! volume's attributes, and attached at the same place in the share; a mount the host
//! takes away goes from the share too. The guest sees the change at its next lookup
//! (virtio-fs keeps an entry up to one second, `--cache auto`).
//!
//! The watcher wakes when the mount table changes (`poll` on `/proc/self/mountinfo`,
//! `POLLPRI`), never on a timer. A path from the mount table is never followed: the
//! host's mount is opened beneath the volume's source without links and must be that
//! very mount (its id, its root), and the place in the share is opened beneath a
//! descriptor of the volume's root there, which a guest with an rw volume can change but
//! never leave. Mounts under Cocoon's own run directory (every pod's share) are never
//! mirrored, so two pods with `/` as such a volume cannot feed each other.
//!
//! Every host mount beneath such a source gets something mounted on its place in the
//! share, its copy or, where the copy cannot be made, an empty read-only directory: a
//! directory that is a mount point only in another namespace can be removed or renamed
//! over (Linux ≥ 3.18 then detaches the mount everywhere), so a guest could otherwise
//! take the host's mount away through virtiofsd. Under runc the same call gets EBUSY.
//!
//! Not possible: a mount made in the guest reaching the host (`rshared`'s other half).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::mount::{umount2, MntFlags};
use nix::sys::stat::Mode;

use super::podns::{attach_in, in_ns, PodNs};
use super::share;
use crate::hypervisor::userns::{set_attr, PodUserns};

pub(crate) mod table;

use table::{beneath, show, Mount};

/// The most host mounts followed per volume; beyond, new ones are not mirrored (logged).
const MAX_PER_VOLUME: usize = 256;
/// The pod's empty directory in its share's host side (see `hold`).
const PLACEHOLDER: &str = ".empty";

/// The host mounts reflected in a volume: where (relative to the source), and the
/// O_PATH descriptor of what was attached on that place in the share (the copy, or the
/// placeholder), None where nothing could be.
type Copies = BTreeMap<Mount, (PathBuf, Option<OwnedFd>)>;

struct Volume {
    /// The container's directory in the share's host side (what `forget` names).
    dir: PathBuf,
    /// The source, canonical (as the mount table spells mount points).
    source: PathBuf,
    root_fd: OwnedFd,
    readonly: bool,
    userns: Option<Arc<PodUserns>>,
    /// The volume's own idmap (its mapping composed with the pod's share's), which
    /// mirrored mounts take instead of the share's.
    idmap: Option<Arc<OwnedFd>>,
    /// The pod's mount namespace, where the volume is (`podns`).
    ns: Option<Arc<PodNs>>,
    /// The pod's empty directory, cloned onto the place of a host mount that could not
    /// be mirrored.
    placeholder: PathBuf,
    copies: Copies,
    warned_full: bool,
}

/// What `watch` and `forget` hand the thread, in order.
enum Change {
    Add(Volume),
    /// The volumes of the container whose share directory this is.
    Forget(PathBuf),
}

#[derive(Default)]
struct Queue {
    changes: Vec<Change>,
    /// Mount points under these are never mirrored (Cocoon's run directory).
    excluded: BTreeSet<PathBuf>,
}

/// The watcher thread owns the volumes it follows; others only queue changes for it.
/// The queue's lock is never held across a system call: the thread opens host mounts,
/// which a hung network filesystem could block, and a container's create or delete must
/// not wait on that.
struct Watcher {
    queue: Arc<Mutex<Queue>>,
    /// Wakes the thread for a queued change (one byte per change, never read for data).
    wake: std::os::unix::net::UnixDatagram,
    /// Set when the thread stopped: nothing is mirrored any more.
    dead: Arc<AtomicBool>,
}

static WATCHER: OnceLock<Result<Watcher, String>> = OnceLock::new();

fn watcher() -> Result<&'static Watcher, String> {
    let w = WATCHER
        .get_or_init(|| {
            let queue = Arc::new(Mutex::new(Queue::default()));
            let dead = Arc::new(AtomicBool::new(false));
            let file = std::fs::File::open("/proc/self/mountinfo")
                .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
            let (wake, woken) = std::os::unix::net::UnixDatagram::pair()
                .map_err(|e| format!("cannot make the propagation watcher's wake-up: {e}"))?;
            for end in [&wake, &woken] {
                end.set_nonblocking(true)
                    .map_err(|e| format!("cannot make the propagation watcher's wake-up: {e}"))?;
            }
            let (q, d) = (queue.clone(), dead.clone());
            std::thread::Builder::new()
                .name("mount-propagation".into())
                .spawn(move || {
                    run(&q, file, woken);
                    d.store(true, Ordering::SeqCst);
                })
                .map_err(|e| format!("cannot start the propagation watcher: {e}"))?;
            Ok(Watcher { queue, wake, dead })
        })
        .as_ref()
        .map_err(Clone::clone)?;
    if w.dead.load(Ordering::SeqCst) {
        return Err("the propagation watcher stopped (see the shim's log)".into());
    }
    Ok(w)
}

impl Watcher {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, change: Change) {
        self.queue().changes.push(change);
        // A full socket already holds a wake-up the thread has not taken.
        let _ = self.wake.send(&[0]);
    }
}

/// Whether a volume's options ask for host mounts to reach the container.
pub fn wants(options: &[String]) -> bool {
    options
        .iter()
        .any(|o| matches!(o.as_str(), "rslave" | "slave" | "rshared" | "shared"))
}

/// Starts mirroring the host's mounts beneath `source` into the volume whose root is
/// `rel` in `pod`'s host directory (`dir` is the container's directory there), bound
/// with what was mounted below when `recursive`. What the bind's clone already holds is
/// followed from here on, and goes from the volume when the host unmounts it; a mount
/// that arrived between the clone and now is mirrored now. `run_dir`'s mounts are never
/// mirrored.
#[allow(clippy::too_many_arguments)]
pub fn watch(
    pod: &share::Beneath,
    dir: &Path,
    source: &Path,
    rel: &Path,
    readonly: bool,
    recursive: bool,
    run_dir: &Path,
    idmap: Option<Arc<OwnedFd>>,
) -> Result<(), String> {
    let w = watcher()?;
    // The table spells mount points canonically: so must the source (`/var/run` is a
    // link to `/run` on Debian).
    let source = std::fs::canonicalize(source).map_err(|e| format!("{}: {e}", source.display()))?;
    let root_fd = pod
        .open_dir(rel)
        .map_err(|e| format!("{}: {e}", pod.path_of(rel).display()))?;
    // Read-only in the export like the rest of the share's structure, and empty.
    pod.mkdir_all(Path::new(PLACEHOLDER))
        .map_err(|e| format!("{}: {e}", pod.path_of(Path::new(PLACEHOLDER)).display()))?;
    let excluded = {
        let mut q = w.queue();
        q.excluded.insert(run_dir.to_path_buf());
        q.excluded.clone()
    };
    let mut v = Volume {
        dir: dir.to_path_buf(),
        source,
        root_fd,
        readonly,
        userns: pod.userns_arc(),
        idmap,
        ns: pod.ns_arc(),
        placeholder: pod.path_of(Path::new(PLACEHOLDER)),
        copies: Copies::new(),
        warned_full: false,
    };
    // A mount made after this read is in the table the thread reads once it has taken
    // the volume (`run`).
    let table = read_mountinfo()?;
    for (m, rel) in beneath(&table, &v.source, &excluded) {
        match open_mount_root(&v.root_fd, &rel) {
            // In the clone: followed from now on.
            Ok(copy) => {
                v.copies.insert(m.clone(), (rel, Some(copy)));
            }
            // Not in it: made since (mirrored at once), or left out by a plain bind.
            Err(_) if recursive => {
                let copy = mirror_or_hold(&v, m, &rel);
                v.copies.insert(m.clone(), (rel, copy));
            }
            Err(_) => {
                v.copies.insert(m.clone(), (rel, None));
            }
        }
    }
    tracing::debug!(
        source = %v.source.display(),
        known = v.copies.len(),
        "following host mounts into a volume"
    );
    w.send(Change::Add(v));
    Ok(())
}

/// Stops following the volumes of the container whose share directory is `dir` (before
/// they are unmounted with it). Only queued: a mirror the thread attaches meanwhile into
/// a volume being unmounted goes with it (a detached volume takes no new mount).
pub fn forget(dir: &Path) {
    if let Some(Ok(w)) = WATCHER.get() {
        if !w.dead.load(Ordering::SeqCst) {
            w.send(Change::Forget(dir.to_path_buf()));
        }
    }
}

fn run(queue: &Mutex<Queue>, mut file: std::fs::File, woken: std::os::unix::net::UnixDatagram) {
    let mut volumes: Vec<Volume> = Vec::new();
    loop {
        // The changes first, then the table: a volume taken was scanned against an
        // older table, so what it holds is in this one unless the host unmounted it
        // since. A volume queued after this wakes the thread again.
        let (changes, excluded) = {
            let mut q = queue.lock().unwrap_or_else(|p| p.into_inner());
            (std::mem::take(&mut q.changes), q.excluded.clone())
        };
        for change in changes {
            match change {
                Change::Add(v) => volumes.push(v),
                Change::Forget(dir) => volumes.retain(|v| v.dir != dir),
            }
        }
        let mut text = Vec::new();
        let read = file.rewind().and_then(|()| file.read_to_end(&mut text));
        match read {
            Ok(_) => {
                let table = table::parse(&text);
                for v in volumes.iter_mut() {
                    reconcile(v, &table, &excluded);
                }
            }
            Err(e) => tracing::warn!("cannot read /proc/self/mountinfo: {e}"),
        }
        let mut fds = [
            nix::poll::PollFd::new(file.as_fd(), nix::poll::PollFlags::POLLPRI),
            nix::poll::PollFd::new(woken.as_fd(), nix::poll::PollFlags::POLLIN),
        ];
        if let Err(e) = nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
            if e != nix::Error::EINTR {
                tracing::error!("the propagation watcher stops: poll: {e}");
                return;
            }
        }
        while woken.recv(&mut [0u8; 16]).is_ok() {}
    }
}

fn read_mountinfo() -> Result<Vec<Mount>, String> {
    std::fs::read("/proc/self/mountinfo")
        .map(|t| table::parse(&t))
        .map_err(|e| format!("/proc/self/mountinfo: {e}"))
}

fn how(flags: OFlag) -> OpenHow {
    OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        )
}

/// The root of the mount at `rel` beneath `dir`, opened without links; an error unless
/// `rel` is a mount's root.
fn open_mount_root(dir: &OwnedFd, rel: &Path) -> std::io::Result<OwnedFd> {
    let fd = openat2(dir, rel, how(OFlag::O_PATH))?;
    let (_, root) = mount_of(&fd)?;
    if !root {
        return Err(std::io::Error::other("not a mount's root"));
    }
    Ok(fd)
}

/// The mount id of `fd`, and whether `fd` is that mount's root.
fn mount_of(fd: &OwnedFd) -> std::io::Result<(u64, bool)> {
    // SAFETY: zeroed statx is a valid value for the kernel to fill.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: a descriptor we hold, an empty C string and a statx buffer, all
    // outliving the call.
    let r = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_MNT_ID,
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
    let root = stx.stx_attributes & libc::STATX_ATTR_MOUNT_ROOT as u64 != 0;
    Ok((stx.stx_mnt_id, root))
}

fn reconcile(v: &mut Volume, table: &[Mount], excluded: &BTreeSet<PathBuf>) {
    let now = beneath(table, &v.source, excluded);
    let present: BTreeSet<&Mount> = now.iter().map(|(m, _)| *m).collect();
    // Gone from the host: gone from the share, innermost first.
    let mut gone: Vec<(Mount, usize)> = v
        .copies
        .iter()
        .filter(|(m, _)| !present.contains(m))
        .map(|(m, (rel, _))| (m.clone(), rel.components().count()))
        .collect();
    gone.sort_by_key(|(_, depth)| std::cmp::Reverse(*depth));
    for (m, _) in gone {
        if let Some((rel, Some(copy))) = v.copies.remove(&m) {
            let path = format!("/proc/self/fd/{}", copy.as_raw_fd());
            // EINVAL: already detached with a copy it was mounted on. In the pod's
            // namespace, where the copy is; `copy` stays open until this returns.
            let unmounted = in_ns(v.ns.as_deref(), move || {
                Ok(umount2(path.as_str(), MntFlags::MNT_DETACH))
            })
            .unwrap_or_else(|e| Err(nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO))));
            drop(copy);
            match unmounted {
                Ok(()) | Err(nix::Error::EINVAL) => {}
                Err(e) => tracing::warn!(
                    "cannot unmount the copy of a host mount at {}: {e}",
                    show(&v.source.join(rel))
                ),
            }
        }
    }
    for (m, rel) in now {
        if v.copies.contains_key(m) {
            continue;
        }
        if v.copies.len() >= MAX_PER_VOLUME {
            if !v.warned_full {
                tracing::warn!(
                    "{}: more than {MAX_PER_VOLUME} host mounts beneath; later ones are not mirrored",
                    v.source.display()
                );
                v.warned_full = true;
            }
            break;
        }
        let copy = mirror_or_hold(v, m, &rel);
        v.copies.insert(m.clone(), (rel, copy));
    }
}

/// Mirrors host mount `m` (at `rel` beneath the volume's source) into the volume, or
/// where that fails, holds its place with the empty read-only directory. Returns what
/// was attached.
fn mirror_or_hold(v: &Volume, m: &Mount, rel: &Path) -> Option<OwnedFd> {
    let place = show(&v.source.join(rel));
    match mirror(v, m, rel) {
        Ok(fd) => {
            tracing::debug!(at = %place, "mirrored a host mount");
            return Some(fd);
        }
        Err(e) => tracing::warn!("cannot mirror the host mount at {place}: {e}"),
    }
    match hold(v, rel) {
        Ok(fd) => Some(fd),
        Err(e) => {
            tracing::warn!("cannot hold the place of the host mount at {place}: {e}");
            None
        }
    }
}

/// Clones host mount `m` (at `rel` beneath the volume's source) alone, with the
/// volume's attributes, onto the same place in the volume; returns the copy's root.
fn mirror(v: &Volume, m: &Mount, rel: &Path) -> std::io::Result<OwnedFd> {
    // Opened for this mirror only: a descriptor kept would keep the host from
    // unmounting the source's own mount.
    let source = nix::fcntl::open(
        &v.source,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let host = open_mount_root(&source, rel)?;
    if mount_of(&host)?.0 != m.id {
        // Another mount was stacked on it meanwhile; that one comes in its turn.
        return Err(std::io::Error::other("covered by a later mount"));
    }
    let tree = share::open_tree_fd(&host)?;
    attach_like_the_volume(v, tree, rel, false)
}

/// Attaches the pod's empty directory, read-only, on `rel` in the volume.
fn hold(v: &Volume, rel: &Path) -> std::io::Result<OwnedFd> {
    let empty = share::open_tree(&v.placeholder, false)?;
    attach_like_the_volume(v, empty, rel, true)
}

/// Makes `tree` private, read-only (when the volume is, or `always_ro`) and idmapped
/// for the pod, and attaches it on `rel` in the volume; returns its root.
fn attach_like_the_volume(
    v: &Volume,
    tree: OwnedFd,
    rel: &Path,
    always_ro: bool,
) -> std::io::Result<OwnedFd> {
    share::set_private(tree.as_fd(), false)?;
    if v.readonly || always_ro {
        set_attr(tree.as_fd(), libc::MOUNT_ATTR_RDONLY, -1, false)?;
    }
    match (&v.idmap, &v.userns) {
        (Some(userns), _) => {
            crate::hypervisor::userns::idmap_with(userns.as_fd(), tree.as_fd(), false)?
        }
        (None, Some(ns)) => ns.idmap(tree.as_fd(), false)?,
        (None, None) => {}
    }
    let target = openat2(&v.root_fd, rel, how(OFlag::O_PATH))?;
    attach_in(v.ns.as_deref(), tree, target)?;
    open_mount_root(&v.root_fd, rel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn propagation_options_are_recognised() {
        let o = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(wants(&o(&["rbind", "rslave"])));
        assert!(wants(&o(&["rbind", "rshared", "ro"])));
        assert!(!wants(&o(&["rbind", "rprivate"])));
        assert!(!wants(&o(&["rbind"])));
    }
}
