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
//! host's mount is opened beneath a descriptor of the volume's source without links and
//! must be that very mount (its id, its root), and the place in the share is opened
//! beneath a descriptor of the volume's root there, which a guest with an rw volume can
//! change but never leave. Mounts under Cocoon's own run directory (every pod's share)
//! are never mirrored, so two pods with `/` as such a volume cannot feed each other.
//!
//! Not possible: a mount made in the guest reaching the host (`rshared`'s other half).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::mount::{umount2, MntFlags};
use nix::sys::stat::Mode;

use super::share;
use crate::hypervisor::userns::{set_attr, PodUserns};

/// The most host mounts followed per volume; beyond, new ones are not mirrored (logged).
const MAX_PER_VOLUME: usize = 256;

/// The host mounts reflected in a volume, by id: where (relative to the source), and the
/// O_PATH descriptor of the copy's root in the share (None where it could not be made or
/// found).
type Copies = BTreeMap<u64, (PathBuf, Option<OwnedFd>)>;

struct Volume {
    /// The container's directory in the share's host side (what `forget` names).
    dir: PathBuf,
    source: PathBuf,
    source_fd: OwnedFd,
    root_fd: OwnedFd,
    readonly: bool,
    userns: Option<Arc<PodUserns>>,
    /// Host mount id → our copy, for every mount beneath the source we know of.
    copies: Copies,
    warned_full: bool,
}

#[derive(Default)]
struct State {
    volumes: Vec<Volume>,
    /// Mount points under these are never mirrored (Cocoon's run directory).
    excluded: BTreeSet<PathBuf>,
}

struct Watcher {
    state: Arc<Mutex<State>>,
}

static WATCHER: OnceLock<Result<Watcher, String>> = OnceLock::new();

fn watcher() -> Result<&'static Watcher, String> {
    WATCHER
        .get_or_init(|| {
            let state = Arc::new(Mutex::new(State::default()));
            let file = std::fs::File::open("/proc/self/mountinfo")
                .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
            let s = state.clone();
            std::thread::Builder::new()
                .name("mount-propagation".into())
                .spawn(move || run(&s, file))
                .map_err(|e| format!("cannot start the propagation watcher: {e}"))?;
            Ok(Watcher { state })
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Whether a volume's options ask for host mounts to reach the container.
pub fn wants(options: &[String]) -> bool {
    options
        .iter()
        .any(|o| matches!(o.as_str(), "rslave" | "slave" | "rshared" | "shared"))
}

/// Starts mirroring the host's mounts beneath `source` into the volume whose root is
/// `rel` in `pod`'s host directory (`dir` is the container's directory there). What is
/// mounted beneath `source` now was cloned with the volume; it is followed from here on,
/// and goes from the volume when the host unmounts it. `run_dir`'s mounts are never
/// mirrored.
pub fn watch(
    pod: &share::Beneath,
    dir: &Path,
    source: &Path,
    rel: &Path,
    readonly: bool,
    run_dir: &Path,
) -> Result<(), String> {
    let w = watcher()?;
    let source_fd = nix::fcntl::open(
        source,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("{}: {e}", source.display()))?;
    let root_fd = pod
        .open_dir(rel)
        .map_err(|e| format!("{}: {e}", pod.path_of(rel).display()))?;
    let mut state = w.state.lock().unwrap_or_else(|p| p.into_inner());
    state.excluded.insert(run_dir.to_path_buf());
    let mut v = Volume {
        dir: dir.to_path_buf(),
        source: source.to_path_buf(),
        source_fd,
        root_fd,
        readonly,
        userns: pod.userns_arc(),
        copies: Copies::new(),
        warned_full: false,
    };
    // Those already there came with the volume's recursive clone: find their copies.
    for (id, rel) in beneath(&read_mountinfo()?, &v.source, &state.excluded) {
        let copy = open_mount_root(&v.root_fd, &rel).ok();
        v.copies.insert(id, (rel, copy));
    }
    tracing::debug!(
        source = %v.source.display(),
        known = v.copies.len(),
        "following host mounts into a volume"
    );
    state.volumes.push(v);
    Ok(())
}

/// Stops following the volumes of the container whose share directory is `dir` (before
/// they are unmounted with it).
pub fn forget(dir: &Path) {
    if let Some(Ok(w)) = WATCHER.get() {
        let mut state = w.state.lock().unwrap_or_else(|p| p.into_inner());
        state.volumes.retain(|v| v.dir != dir);
    }
}

fn run(state: &Mutex<State>, mut file: std::fs::File) {
    loop {
        let mut text = String::new();
        let read = file.rewind().and_then(|()| file.read_to_string(&mut text));
        match read {
            Ok(_) => {
                let table = parse_mountinfo(&text);
                let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                let State { volumes, excluded } = &mut *s;
                for v in volumes.iter_mut() {
                    reconcile(v, &table, excluded);
                }
            }
            Err(e) => tracing::warn!("cannot read /proc/self/mountinfo: {e}"),
        }
        let mut fds = [nix::poll::PollFd::new(
            file.as_fd(),
            nix::poll::PollFlags::POLLPRI,
        )];
        if let Err(e) = nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
            if e != nix::Error::EINTR {
                tracing::warn!("the propagation watcher stops: poll: {e}");
                return;
            }
        }
    }
}

/// One line of the mount table: the mount's id and where it is mounted.
#[derive(Debug, PartialEq)]
struct Entry {
    id: u64,
    point: PathBuf,
}

fn read_mountinfo() -> Result<Vec<Entry>, String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse_mountinfo(&t))
        .map_err(|e| format!("/proc/self/mountinfo: {e}"))
}

/// The id and mount point of each line of `/proc/<pid>/mountinfo`, in the table's order
/// (a mount after the one it is mounted on). Malformed lines are skipped.
fn parse_mountinfo(text: &str) -> Vec<Entry> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split(' ');
            let id = f.next()?.parse().ok()?;
            let point = f.nth(3)?;
            Some(Entry {
                id,
                point: PathBuf::from(unescape(point)),
            })
        })
        .collect()
}

/// The kernel's octal escapes of a mount point (`\040` for a space, and so on).
fn unescape(s: &str) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStringExt;
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    std::ffi::OsString::from_vec(out)
}

/// The mounts strictly beneath `source` and outside `excluded`, with their places
/// relative to `source`, parents before children.
fn beneath(table: &[Entry], source: &Path, excluded: &BTreeSet<PathBuf>) -> Vec<(u64, PathBuf)> {
    let mut found: Vec<(u64, PathBuf)> = table
        .iter()
        .filter(|e| !excluded.iter().any(|x| e.point.starts_with(x)))
        .filter_map(|e| {
            let rel = e.point.strip_prefix(source).ok()?;
            (!rel.as_os_str().is_empty()).then(|| (e.id, rel.to_path_buf()))
        })
        .collect();
    // Stable: mounts stacked on one point keep the table's order.
    found.sort_by_key(|(_, rel)| rel.components().count());
    found
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
    let root = stx.stx_attributes & libc::STATX_ATTR_MOUNT_ROOT as u64 != 0;
    Ok((stx.stx_mnt_id, root))
}

fn reconcile(v: &mut Volume, table: &[Entry], excluded: &BTreeSet<PathBuf>) {
    let now = beneath(table, &v.source, excluded);
    let ids: BTreeSet<u64> = now.iter().map(|(id, _)| *id).collect();
    // Gone from the host: gone from the share, innermost first.
    let mut gone: Vec<(u64, usize)> = v
        .copies
        .iter()
        .filter(|(id, _)| !ids.contains(id))
        .map(|(id, (rel, _))| (*id, rel.components().count()))
        .collect();
    gone.sort_by_key(|(_, depth)| std::cmp::Reverse(*depth));
    for (id, _) in gone {
        if let Some((rel, Some(copy))) = v.copies.remove(&id) {
            let path = format!("/proc/self/fd/{}", copy.as_raw_fd());
            // EINVAL: already detached with a copy it was mounted on.
            match umount2(path.as_str(), MntFlags::MNT_DETACH) {
                Ok(()) | Err(nix::Error::EINVAL) => {}
                Err(e) => tracing::warn!(
                    "cannot unmount the copy of a host mount at {}: {e}",
                    v.source.join(rel).display()
                ),
            }
        }
    }
    for (id, rel) in now {
        if v.copies.contains_key(&id) {
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
        let copy = match mirror(v, id, &rel) {
            Ok(fd) => {
                tracing::debug!(source = %v.source.display(), rel = %rel.display(), "mirrored a host mount");
                Some(fd)
            }
            Err(e) => {
                tracing::warn!(
                    "cannot mirror host mount {id} at {}: {e}",
                    v.source.join(&rel).display()
                );
                None
            }
        };
        v.copies.insert(id, (rel, copy));
    }
}

/// Clones host mount `id` (at `rel` beneath the volume's source) alone, with the
/// volume's attributes, onto the same place in the volume; returns the copy's root.
fn mirror(v: &Volume, id: u64, rel: &Path) -> std::io::Result<OwnedFd> {
    let host = open_mount_root(&v.source_fd, rel)?;
    if mount_of(&host)?.0 != id {
        // Another mount was stacked on it meanwhile; that one comes in its turn.
        return Err(std::io::Error::other("covered by a later mount"));
    }
    let tree = share::open_tree_fd(&host)?;
    share::set_private(tree.as_fd(), false)?;
    if v.readonly {
        set_attr(tree.as_fd(), libc::MOUNT_ATTR_RDONLY, -1, false)?;
    }
    if let Some(ns) = &v.userns {
        ns.idmap(tree.as_fd(), false)?;
    }
    let target = openat2(&v.root_fd, rel, how(OFlag::O_PATH))?;
    share::attach(&tree, &target)?;
    open_mount_root(&v.root_fd, rel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mount_table_is_read_with_its_escapes() {
        let t = "22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
                 40 22 0:5 / /a\\040b\\134c rw - tmpfs t rw\n\
                 garbage\n";
        assert_eq!(
            parse_mountinfo(t),
            vec![
                Entry {
                    id: 22,
                    point: "/proc".into()
                },
                Entry {
                    id: 40,
                    point: "/a b\\c".into()
                },
            ]
        );
        assert_eq!(unescape("\\04"), std::ffi::OsString::from("\\04"));
    }

    #[test]
    fn only_mounts_strictly_beneath_and_outside_the_run_dir_count() {
        let e = |id, p: &str| Entry {
            id,
            point: p.into(),
        };
        let table = [
            e(1, "/"),
            e(2, "/vol"),
            e(3, "/vol/a/b"),
            e(4, "/vol/a"),
            e(5, "/volume"),
            e(6, "/run/cocoon/shares/x"),
            e(7, "/vol/a"),
        ];
        let none = BTreeSet::new();
        assert_eq!(
            beneath(&table, Path::new("/vol"), &none),
            vec![(4, "a".into()), (7, "a".into()), (3, "a/b".into())]
        );
        let run: BTreeSet<PathBuf> = [PathBuf::from("/run/cocoon")].into();
        let all = beneath(&table, Path::new("/"), &run);
        assert!(all.iter().all(|(id, _)| *id != 6 && *id != 1), "{all:?}");
        assert_eq!(all.len(), 5);
    }

    #[test]
    fn propagation_options_are_recognised() {
        let o = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(wants(&o(&["rbind", "rslave"])));
        assert!(wants(&o(&["rbind", "rshared", "ro"])));
        assert!(!wants(&o(&["rbind", "rprivate"])));
        assert!(!wants(&o(&["rbind"])));
    }
}
