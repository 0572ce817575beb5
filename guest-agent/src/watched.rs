//! Kubernetes' ConfigMap, Secret, projected and downward-API volumes, mirrored into the
//! guest so that inotify works on them. kubelet updates such a volume in place with its
//! "atomic writer": the new files go into a fresh `..<timestamp>` directory, then the
//! `..data` symlink is swapped to it by a rename, which applications reloading their
//! configuration watch for with inotify. Under runc the container sees the host's
//! directory and its events; through virtio-fs the guest kernel learns of a host's
//! change only when it next looks, and never raises an event for it. So the agent keeps
//! a copy of each such volume on its own tmpfs (`DIR/<container>/<n>`), mounts that
//! into the container instead, and polls the shared source: a change is replayed in the
//! copy in the writer's order (new directories and files first, then `..data` and the
//! other links, each swapped in by a rename, then what is gone), so the container sees
//! the same events and never a half-written state. As Kata's agent does for the same
//! volumes.
//!
//! The source is the host's, which in a confidential pod is hostile: it is read only
//! through directory descriptors opened without following links, a file's bytes are
//! taken with the listing (so a swap between the two cannot point the copy elsewhere),
//! and everything is bounded (`MAX_*`). The copy is written the same way, beneath its
//! own descriptor, temporary files made exclusively, so no link the copy holds is ever
//! followed. The copy's files carry their source's modification time, so the copy's own
//! listing says what it holds: a replay that failed midway is finished by the next.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{openat, readlinkat, renameat, AtFlags, OFlag};
use nix::sys::stat::{fchmod, fstat, fstatat, futimens, mkdirat, Mode, SFlag};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};
use serde_json::Value;

/// Where the copies live: `<DIR>/<container id>/<n>`.
pub const DIR: &str = "/run/cocoon/watched";
/// How often a source is compared with its copy (nearly every pod has one such volume,
/// its service account token; kubelet itself refreshes them in minutes).
pub const POLL: Duration = Duration::from_secs(2);
/// The most entries, bytes and depth a mirrored volume may have (ConfigMaps and Secrets
/// are at most 1 MiB each), and the most volumes of one container mirrored.
const MAX_ENTRIES: usize = 1024;
const MAX_BYTES: u64 = 8 << 20;
const MAX_DEPTH: usize = 8;
const MAX_MIRRORS: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Dir,
    /// Size and modification time (s, ns).
    File(u64, i64, i64),
    Link(OsString),
}

/// An entry as `lstat` shows it (a link's mode and owners are not compared: zero).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Meta {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
}

/// A tree by path relative to its root, and the files' bytes when they were read.
type Tree = BTreeMap<PathBuf, Meta>;
type Contents = BTreeMap<PathBuf, Vec<u8>>;

/// An entry counted toward the bounds but not copied (dropped once the walk is done).
const OTHER: Meta = Meta {
    kind: Kind::Dir,
    mode: u32::MAX,
    uid: 0,
    gid: 0,
};

fn io(e: Errno) -> std::io::Error {
    std::io::Error::from(e)
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// `name` in `dir`, a directory and not a link.
fn open_dir(dir: impl AsFd, name: &OsStr) -> std::io::Result<OwnedFd> {
    openat(dir, name, DIR_FLAGS, Mode::empty()).map_err(io)
}

/// `rel` beneath `root`, each component a directory and none a link.
fn open_beneath(root: impl AsFd, rel: &Path) -> std::io::Result<OwnedFd> {
    let mut fd = nix::unistd::dup(root).map_err(io)?;
    for c in rel.components() {
        match c {
            Component::Normal(name) => fd = open_dir(&fd, name)?,
            Component::CurDir => {}
            _ => {
                return Err(std::io::Error::other(format!(
                    "{} leaves its root",
                    rel.display()
                )))
            }
        }
    }
    Ok(fd)
}

/// The names in an open directory but `.` and `..`, at most `limit` of them.
fn names(dir: impl AsFd, limit: usize) -> std::io::Result<Vec<OsString>> {
    // A description of its own: a dup would share (and leave at the end) the offset.
    let d = nix::dir::Dir::from_fd(open_dir(dir, OsStr::new("."))?).map_err(io)?;
    let mut out = Vec::new();
    for e in d {
        if out.len() >= limit {
            break;
        }
        let e = e.map_err(io)?;
        let name = OsStr::from_bytes(e.file_name().to_bytes());
        if name != "." && name != ".." {
            out.push(name.to_owned());
        }
    }
    Ok(out)
}

struct Walk<'a> {
    tree: Tree,
    bytes: u64,
    contents: Option<&'a mut Contents>,
    /// The bounds: entries and bytes (a copy is listed with room to spare).
    max_entries: usize,
    max_bytes: u64,
}

/// Lists `dir` (at `rel`) into `walk`; false when it is over the bounds.
fn scan_at(dir: &OwnedFd, rel: &Path, depth: usize, walk: &mut Walk) -> std::io::Result<bool> {
    for name in names(dir, walk.max_entries + 1)? {
        if walk.tree.len() >= walk.max_entries {
            return Ok(false);
        }
        let path = rel.join(&name);
        // Only a broken or hostile file server lists a name twice.
        if walk.tree.contains_key(&path) {
            return Err(std::io::Error::other(format!(
                "{} listed twice",
                path.display()
            )));
        }
        let st = fstatat(dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW).map_err(io)?;
        let (mode, uid, gid) = (st.st_mode & 0o7777, st.st_uid, st.st_gid);
        let kind = match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
            SFlag::S_IFLNK => match readlinkat(dir, name.as_os_str()).map_err(io)? {
                // No link can be made with an empty target: counted, not copied.
                t if t.is_empty() => {
                    walk.tree.insert(path, OTHER);
                    continue;
                }
                t => Kind::Link(t),
            },
            SFlag::S_IFDIR => {
                if depth + 1 >= MAX_DEPTH {
                    return Ok(false);
                }
                Kind::Dir
            }
            SFlag::S_IFREG => {
                let size = st.st_size as u64;
                walk.bytes += size;
                if walk.bytes > walk.max_bytes {
                    return Ok(false);
                }
                if let Some(contents) = walk.contents.as_deref_mut() {
                    contents.insert(path.clone(), read_file(dir, &name, size)?);
                }
                // As a timestamp can hold it (futimens refuses more), in source and copy.
                Kind::File(size, st.st_mtime, st.st_mtime_nsec.clamp(0, 999_999_999))
            }
            // Nothing else belongs in such a volume; counted, not copied.
            _ => {
                walk.tree.insert(path, OTHER);
                continue;
            }
        };
        let meta = match kind {
            Kind::Link(_) => Meta {
                kind,
                mode: 0,
                uid: 0,
                gid: 0,
            },
            kind => Meta {
                kind,
                mode,
                uid,
                gid,
            },
        };
        let is_dir = meta.kind == Kind::Dir;
        walk.tree.insert(path.clone(), meta);
        if is_dir && !scan_at(&open_dir(dir, &name)?, &path, depth + 1, walk)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// `dir`'s tree (with its files' bytes into `contents`); None when over the bounds.
/// Entries that are neither directory, file nor link are left out.
fn scan(dir: &OwnedFd, contents: Option<&mut Contents>) -> std::io::Result<Option<Tree>> {
    scan_within(dir, contents, 1)
}

/// As `scan`, with `room` times the bounds.
fn scan_within(
    dir: &OwnedFd,
    contents: Option<&mut Contents>,
    room: usize,
) -> std::io::Result<Option<Tree>> {
    let mut walk = Walk {
        tree: Tree::new(),
        bytes: 0,
        contents,
        max_entries: MAX_ENTRIES * room,
        max_bytes: MAX_BYTES * room as u64,
    };
    if !scan_at(dir, Path::new(""), 0, &mut walk)? {
        return Ok(None);
    }
    walk.tree.retain(|_, m| m.mode != u32::MAX);
    Ok(Some(walk.tree))
}

/// A file's bytes, exactly the `size` its listing said (else it changed under us: an
/// error, and the next poll tries again).
fn read_file(dir: &OwnedFd, name: &OsStr, size: u64) -> std::io::Result<Vec<u8>> {
    // Looked at before it is opened for reading: opening a device (which a hostile file
    // server could pass off as a file) would run its driver.
    let at = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let path = openat(dir, name, at, Mode::empty()).map_err(io)?;
    let st = fstat(&path).map_err(io)?;
    if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFREG {
        return Err(std::io::Error::other("changed while read"));
    }
    let reopen = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&path));
    let flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK;
    let fd = nix::fcntl::open(reopen.as_str(), flags, Mode::empty()).map_err(io)?;
    let mut bytes = Vec::with_capacity(size as usize);
    std::fs::File::from(fd)
        .take(size + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 != size {
        return Err(std::io::Error::other("changed while read"));
    }
    Ok(bytes)
}

/// A name for a temporary entry no source entry has, made with `O_EXCL`.
fn temp_name() -> OsString {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(".cocoon-{}-{n}-{nanos}", std::process::id()).into()
}

fn own(fd: impl AsFd + Copy, m: &Meta) -> std::io::Result<()> {
    // Owners first: a change of owner clears set-id bits.
    fchown(fd, Some(Uid::from_raw(m.uid)), Some(Gid::from_raw(m.gid))).map_err(io)?;
    fchmod(fd, Mode::from_bits_truncate(m.mode)).map_err(io)
}

/// Removes `name` in `dir`, a directory's contents first, never through a link.
fn remove_at(dir: impl AsFd + Copy, name: &OsStr) -> std::io::Result<()> {
    let st = match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Err(Errno::ENOENT) => return Ok(()),
        r => r.map_err(io)?,
    };
    if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFDIR {
        let sub = open_dir(dir, name)?;
        for child in names(&sub, usize::MAX)? {
            remove_at(&sub, &child)?;
        }
        unlinkat(dir, name, UnlinkatFlags::RemoveDir).map_err(io)
    } else {
        unlinkat(dir, name, UnlinkatFlags::NoRemoveDir).map_err(io)
    }
}

/// The parent directory of `rel` beneath `root`, and `rel`'s name.
fn parent_of<'a>(root: &OwnedFd, rel: &'a Path) -> std::io::Result<(OwnedFd, &'a OsStr)> {
    let name = rel
        .file_name()
        .ok_or_else(|| std::io::Error::other("an empty path"))?;
    Ok((
        open_beneath(root, rel.parent().unwrap_or(Path::new("")))?,
        name,
    ))
}

/// Makes the copy beneath `dst` hold `now` (with `contents`), against what it holds:
/// directories and files first, then links (`..data` first), each put in place by a
/// rename, then what `now` no longer has, deepest first.
fn replay(dst: &OwnedFd, now: &Tree, contents: &Contents) -> std::io::Result<()> {
    let held = match scan_within(dst, None, 4)? {
        Some(held) => held,
        None => {
            // Grown past all reason (replays that kept failing): start again.
            for name in names(dst, usize::MAX)? {
                remove_at(dst, &name)?;
            }
            Tree::new()
        }
    };
    let placed = place(dst, now, contents, &held);
    // What `now` no longer has goes even when placing failed, so that replays failing
    // again and again cannot pile up old files.
    for rel in held.keys().rev() {
        if now.contains_key(rel) {
            continue;
        }
        // An ancestor that is no longer a directory took its old contents with it.
        if let Ok((parent, name)) = parent_of(dst, rel) {
            remove_at(&parent, name)?;
        }
    }
    placed
}

/// `replay`'s first two steps: directories and files, then links.
fn place(dst: &OwnedFd, now: &Tree, contents: &Contents, held: &Tree) -> std::io::Result<()> {
    for (rel, m) in now {
        let held_here = held.get(rel);
        if held_here == Some(m) || matches!(m.kind, Kind::Link(_)) {
            continue;
        }
        let (parent, name) = parent_of(dst, rel)?;
        match &m.kind {
            Kind::Dir => {
                if !matches!(
                    held_here,
                    Some(Meta {
                        kind: Kind::Dir,
                        ..
                    })
                ) {
                    remove_at(&parent, name)?;
                    mkdirat(&parent, name, Mode::from_bits_truncate(0o700)).map_err(io)?;
                }
                own(&open_dir(&parent, name)?, m)?;
            }
            Kind::File(_, secs, nanos) => {
                let tmp = temp_name();
                let flags = OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC;
                let fd = openat(
                    &parent,
                    tmp.as_os_str(),
                    flags,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(io)?;
                let written = (|| {
                    let mut f = std::fs::File::from(fd);
                    f.write_all(contents.get(rel).map_or(&[][..], Vec::as_slice))?;
                    own(&f, m)?;
                    let at = TimeSpec::new(*secs, *nanos);
                    futimens(&f, &at, &at).map_err(io)?;
                    if matches!(
                        held_here,
                        Some(Meta {
                            kind: Kind::Dir,
                            ..
                        })
                    ) {
                        remove_at(&parent, name)?;
                    }
                    renameat(&parent, tmp.as_os_str(), &parent, name).map_err(io)
                })();
                if written.is_err() {
                    let _ = unlinkat(&parent, tmp.as_os_str(), UnlinkatFlags::NoRemoveDir);
                }
                written?;
            }
            Kind::Link(_) => {}
        }
    }
    let links = now
        .iter()
        .filter(|(rel, m)| matches!(m.kind, Kind::Link(_)) && held.get(*rel) != Some(m));
    let (data, rest): (Vec<_>, Vec<_>) = links.partition(|(rel, _)| rel.as_os_str() == "..data");
    for (rel, m) in data.into_iter().chain(rest) {
        let Kind::Link(target) = &m.kind else {
            continue;
        };
        let (parent, name) = parent_of(dst, rel)?;
        let tmp = temp_name();
        symlinkat(target.as_os_str(), &parent, tmp.as_os_str()).map_err(io)?;
        let placed = (|| {
            if matches!(
                held.get(rel),
                Some(Meta {
                    kind: Kind::Dir,
                    ..
                })
            ) {
                remove_at(&parent, name)?;
            }
            renameat(&parent, tmp.as_os_str(), &parent, name).map_err(io)
        })();
        if placed.is_err() {
            let _ = unlinkat(&parent, tmp.as_os_str(), UnlinkatFlags::NoRemoveDir);
        }
        placed?;
    }
    Ok(())
}

/// A volume mirrored from a shared source into a copy of the agent's.
pub struct Mirror {
    src: OwnedFd,
    dst: OwnedFd,
    dst_path: PathBuf,
    /// The source as last copied (the next poll compares against it).
    copied: Tree,
}

impl Mirror {
    /// Copies the directory `src` into the new directory `dst_path`; None (and nothing
    /// left at `dst_path`) when the source is over the bounds.
    pub fn start(src: OwnedFd, dst_path: &Path) -> std::io::Result<Option<Mirror>> {
        std::fs::create_dir(dst_path)?;
        let made = (|| {
            let dst = open_dir(nix::fcntl::AT_FDCWD, dst_path.as_os_str())?;
            let st = fstat(&src).map_err(io)?;
            let root = Meta {
                kind: Kind::Dir,
                mode: st.st_mode & 0o7777,
                uid: st.st_uid,
                gid: st.st_gid,
            };
            own(&dst, &root)?;
            let mut m = Mirror {
                src,
                dst,
                dst_path: dst_path.to_owned(),
                copied: Tree::new(),
            };
            Ok::<_, std::io::Error>(m.copy()?.map(|()| m))
        })();
        if !matches!(made, Ok(Some(_))) {
            let _ = std::fs::remove_dir_all(dst_path);
        }
        made
    }

    /// Reads the whole source and replays it; None when it is over the bounds.
    fn copy(&mut self) -> std::io::Result<Option<()>> {
        let mut contents = Contents::new();
        let Some(now) = scan(&self.src, Some(&mut contents))? else {
            return Ok(None);
        };
        replay(&self.dst, &now, &contents)?;
        self.copied = now;
        Ok(Some(()))
    }

    /// Replays what changed in the source since the last copy: true if anything did.
    /// Err when the source is gone, changing under the read, or over the bounds now:
    /// the copy keeps its state (or the part of a replay that went through), and the
    /// next call starts again from what the copy holds.
    pub fn refresh(&mut self) -> std::io::Result<bool> {
        let over = || {
            std::io::Error::other(format!(
                "over {MAX_ENTRIES} entries, {MAX_BYTES} bytes or {MAX_DEPTH} levels"
            ))
        };
        let now = scan(&self.src, None)?.ok_or_else(over)?;
        if now == self.copied {
            return Ok(false);
        }
        self.copy()?.ok_or_else(over)?;
        Ok(true)
    }

    pub fn dst(&self) -> &Path {
        &self.dst_path
    }
}

/// Mirrors the spec's read-only bind mounts at `destinations` whose sources are beneath
/// `shared` (the pod's share) into `dir` (made here, one directory per mount) and points
/// the spec at the copies. Returns the mirrors to keep fresh; a mount that cannot be
/// mirrored stays as it was, logged.
pub fn provide(
    shared: &Path,
    dir: &Path,
    destinations: &[String],
    spec: &mut Value,
) -> Vec<Mirror> {
    let mut mirrors = Vec::new();
    let Some(mounts) = spec.pointer_mut("/mounts").and_then(Value::as_array_mut) else {
        return mirrors;
    };
    for (n, m) in mounts.iter_mut().enumerate() {
        let dest = m.get("destination").and_then(Value::as_str).unwrap_or("");
        if !destinations.iter().any(|d| d == dest) {
            continue;
        }
        let options: Vec<&str> = m
            .get("options")
            .and_then(Value::as_array)
            .map(|o| o.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let bind = m.get("type").and_then(Value::as_str) == Some("bind")
            || options.iter().any(|o| *o == "bind" || *o == "rbind");
        let src = m.get("source").and_then(Value::as_str).map(Path::new);
        let rel = src.and_then(|s| s.strip_prefix(shared).ok());
        let read_only = cocoon_protocol::read_only(&options);
        let (true, true, Some(rel)) = (bind, read_only, rel) else {
            tracing::warn!("{dest}: not a read-only bind of the pod's share: not copied");
            continue;
        };
        if mirrors.len() == MAX_MIRRORS {
            tracing::warn!("{dest}: over {MAX_MIRRORS} copied volumes: shared as it is");
            continue;
        }
        if mirrors.is_empty() {
            let made = std::os::unix::fs::DirBuilderExt::mode(
                std::fs::DirBuilder::new().recursive(true),
                0o700,
            )
            .create(dir);
            if let Err(e) = made {
                tracing::warn!("cannot make {}: {e}", dir.display());
                return mirrors;
            }
        }
        let dst = dir.join(n.to_string());
        let started = open_dir(nix::fcntl::AT_FDCWD, shared.as_os_str())
            .and_then(|root| open_beneath(&root, rel))
            .and_then(|src| Mirror::start(src, &dst));
        match started {
            Ok(Some(mirror)) => {
                m["source"] = Value::String(dst.to_string_lossy().into_owned());
                mirrors.push(mirror);
            }
            Ok(None) => tracing::warn!(
                "{dest}: over {MAX_ENTRIES} entries, {MAX_BYTES} bytes or {MAX_DEPTH} levels: \
                 shared without a copy, so inotify sees no updates"
            ),
            Err(e) => tracing::warn!("{dest}: cannot copy it for inotify: {e}"),
        }
    }
    mirrors
}

/// What identifies a container's copies directory: a poller stops when it is gone or
/// another (a later container of the same id) took its name.
pub fn identity(container_dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(container_dir)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Keeps `mirrors` fresh while `container_dir` is the one `identity` named.
pub async fn keep_fresh(
    container_dir: PathBuf,
    ours: Option<(u64, u64)>,
    mut mirrors: Vec<Mirror>,
) {
    loop {
        tokio::time::sleep(POLL).await;
        if ours.is_none() || identity(&container_dir) != ours {
            return;
        }
        let result = tokio::task::spawn_blocking(move || {
            for m in &mut mirrors {
                match m.refresh() {
                    Ok(true) => tracing::debug!("{} updated", m.dst().display()),
                    Ok(false) => {}
                    Err(e) => tracing::info!("{}: not updated yet: {e}", m.dst().display()),
                }
            }
            mirrors
        })
        .await;
        match result {
            Ok(m) => mirrors = m,
            Err(_) => return,
        }
    }
}

/// Removes a container's copies; its poller stops at its next look. The directory is
/// renamed away first, so that a replay racing the removal cannot keep it in place.
pub fn remove(id: &str) {
    if id.is_empty() || id.contains('/') || id == "." || id == ".." {
        return;
    }
    let dir = Path::new(DIR).join(id);
    let gone = Path::new(DIR).join(format!(".removed{}", temp_name().to_string_lossy()));
    if std::fs::rename(&dir, &gone).is_err() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    // This one, and any a racing replay kept from going before.
    for e in std::fs::read_dir(DIR).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(".removed") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

#[cfg(test)]
mod tests;
