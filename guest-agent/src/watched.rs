//! Kubernetes' ConfigMap, Secret, projected and downward-API volumes, mirrored into the
//! guest so that inotify works on them. kubelet updates such a volume in place with its
//! "atomic writer": the new files go into a fresh `..<timestamp>` directory, then the
//! `..data` symlink is swapped to it by a rename, which applications reloading their
//! configuration watch for with inotify. Under runc the container sees the host's
//! directory and its events; through virtio-fs the guest kernel learns of a host's
//! change only when it next looks, and never raises an event for it. So the agent keeps
//! a copy of each such volume on its own tmpfs (`DIR/<container>/<n>`), mounts that
//! into the container instead, and polls the shared source: a change is replayed in the
//! copy in the writer's order (new directories and files first, then the links, swapped
//! by rename, then what is gone), so the container sees the same events and never a
//! half-written state. As Kata's agent does for the same volumes.
//!
//! The source is the host's: nothing in it is followed (files are opened `O_NOFOLLOW`,
//! links are copied as text), and a volume larger than the bounds below is left shared
//! as it was, logged.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

/// Where the copies live: `<DIR>/<container id>/<n>`.
pub const DIR: &str = "/run/cocoon/watched";
/// How often a source is compared with its copy.
pub const POLL: Duration = Duration::from_secs(1);
/// The most entries, bytes and depth a mirrored volume may have (ConfigMaps and Secrets
/// are at most 1 MiB each).
const MAX_ENTRIES: usize = 1024;
const MAX_BYTES: u64 = 8 << 20;
const MAX_DEPTH: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Dir(u32, u32, u32),
    /// Mode, owner, group, size, modification time (ns).
    File(u32, u32, u32, u64, i64),
    Link(OsString),
}

/// A tree as `lstat` shows it, by path relative to its root.
type Tree = BTreeMap<PathBuf, Entry>;

/// Reads `root`'s tree within the bounds; None when it is over them.
fn scan(root: &Path) -> std::io::Result<Option<Tree>> {
    let mut tree = Tree::new();
    let mut bytes = 0u64;
    let mut todo = vec![(PathBuf::new(), 0usize)];
    while let Some((rel, depth)) = todo.pop() {
        for e in std::fs::read_dir(root.join(&rel))? {
            let e = e?;
            let path = rel.join(e.file_name());
            let m = std::fs::symlink_metadata(e.path())?;
            let ft = m.file_type();
            let entry = if ft.is_symlink() {
                Entry::Link(std::fs::read_link(e.path())?.into_os_string())
            } else if ft.is_dir() {
                if depth + 1 >= MAX_DEPTH {
                    return Ok(None);
                }
                todo.push((path.clone(), depth + 1));
                Entry::Dir(m.mode() & 0o7777, m.uid(), m.gid())
            } else if ft.is_file() {
                bytes += m.size();
                Entry::File(
                    m.mode() & 0o7777,
                    m.uid(),
                    m.gid(),
                    m.size(),
                    m.mtime() * 1_000_000_000 + m.mtime_nsec(),
                )
            } else {
                // Nothing else belongs in such a volume.
                continue;
            };
            tree.insert(path, entry);
            if tree.len() > MAX_ENTRIES || bytes > MAX_BYTES {
                return Ok(None);
            }
        }
    }
    Ok(Some(tree))
}

/// A source file's bytes, not through a link.
fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let mut bytes = Vec::new();
    f.by_ref().take(MAX_BYTES + 1).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// A temporary name beside `path`, for a rename into place.
fn temp(path: &Path) -> PathBuf {
    let mut name = OsString::from(".cocoon-tmp-");
    name.push(path.file_name().unwrap_or_default());
    path.with_file_name(name)
}

fn own(path: &Path, mode: u32, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Makes `dst` hold what `src` holds (`now`, as scanned): directories and files first,
/// then links (each replaced by a rename, so `..data` swaps at once), then what `src`
/// no longer has, deepest first.
fn replay(src: &Path, dst: &Path, now: &Tree, was: &Tree) -> std::io::Result<()> {
    for (rel, e) in now {
        let to = dst.join(rel);
        match e {
            Entry::Dir(mode, uid, gid) => {
                if !matches!(was.get(rel), Some(Entry::Dir(..))) {
                    if was.contains_key(rel) {
                        remove_entry(&to)?;
                    }
                    std::fs::create_dir(&to)?;
                }
                own(&to, *mode, *uid, *gid)?;
            }
            Entry::File(mode, uid, gid, ..) => {
                if was.get(rel) == Some(e) {
                    continue;
                }
                let tmp = temp(&to);
                std::fs::write(&tmp, read_file(&src.join(rel))?)?;
                own(&tmp, *mode, *uid, *gid)?;
                if matches!(was.get(rel), Some(Entry::Dir(..))) {
                    remove_entry(&to)?;
                }
                std::fs::rename(&tmp, &to)?;
            }
            Entry::Link(_) => {}
        }
    }
    for (rel, e) in now {
        if let Entry::Link(target) = e {
            if was.get(rel) == Some(e) {
                continue;
            }
            let to = dst.join(rel);
            let tmp = temp(&to);
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink(target, &tmp)?;
            if matches!(was.get(rel), Some(Entry::Dir(..))) {
                remove_entry(&to)?;
            }
            std::fs::rename(&tmp, &to)?;
        }
    }
    for rel in was.keys().rev() {
        if !now.contains_key(rel) {
            let to = dst.join(rel);
            if std::fs::symlink_metadata(&to).is_ok() {
                remove_entry(&to)?;
            }
        }
    }
    Ok(())
}

fn remove_entry(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path)?.is_dir() {
        true => std::fs::remove_dir_all(path),
        false => std::fs::remove_file(path),
    }
}

/// A volume mirrored from `src` into `dst`.
pub struct Mirror {
    src: PathBuf,
    dst: PathBuf,
    tree: Tree,
}

impl Mirror {
    /// Copies `src` into the new directory `dst`; None (and nothing left at `dst`) when
    /// `src` is over the bounds.
    pub fn start(src: &Path, dst: &Path) -> std::io::Result<Option<Mirror>> {
        let Some(tree) = scan(src)? else {
            return Ok(None);
        };
        std::fs::create_dir(dst)?;
        let meta = std::fs::metadata(src)?;
        let made = own(dst, meta.mode() & 0o7777, meta.uid(), meta.gid())
            .and_then(|()| replay(src, dst, &tree, &Tree::new()));
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(dst);
            return Err(e);
        }
        Ok(Some(Mirror {
            src: src.to_owned(),
            dst: dst.to_owned(),
            tree,
        }))
    }

    /// Replays what changed in the source since the last look. Err when the source is
    /// gone or over the bounds now: the copy keeps its last state.
    pub fn refresh(&mut self) -> std::io::Result<bool> {
        let now = scan(&self.src)?.ok_or_else(|| {
            std::io::Error::other(format!(
                "{} has grown past {MAX_ENTRIES} entries or {MAX_BYTES} bytes",
                self.src.display()
            ))
        })?;
        if now == self.tree {
            return Ok(false);
        }
        replay(&self.src, &self.dst, &now, &self.tree)?;
        self.tree = now;
        Ok(true)
    }

    pub fn dst(&self) -> &Path {
        &self.dst
    }
}

/// Mirrors the spec's mounts at `destinations` into `dir` (made here, one directory
/// per mount) and points the spec at the copies. Returns the mirrors to keep fresh; a
/// mount that cannot be mirrored stays as it was, logged.
pub fn provide(dir: &Path, destinations: &[String], spec: &mut Value) -> Vec<Mirror> {
    let mut mirrors = Vec::new();
    let Some(mounts) = spec.pointer_mut("/mounts").and_then(Value::as_array_mut) else {
        return mirrors;
    };
    for (n, m) in mounts.iter_mut().enumerate() {
        let dest = m.get("destination").and_then(Value::as_str).unwrap_or("");
        if !destinations.iter().any(|d| d == dest) {
            continue;
        }
        let Some(src) = m.get("source").and_then(Value::as_str).map(PathBuf::from) else {
            continue;
        };
        if mirrors.is_empty() {
            if let Err(e) = std::fs::create_dir_all(dir) {
                tracing::warn!("cannot make {}: {e}", dir.display());
                return mirrors;
            }
        }
        let dst = dir.join(n.to_string());
        match Mirror::start(&src, &dst) {
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

/// Keeps `mirrors` fresh until their container's directory is removed (or replaced,
/// by a later container of the same id).
pub async fn keep_fresh(container_dir: PathBuf, mut mirrors: Vec<Mirror>) {
    let inode = |d: &Path| {
        std::fs::symlink_metadata(d)
            .ok()
            .map(|m| (m.dev(), m.ino()))
    };
    let ours = inode(&container_dir);
    loop {
        tokio::time::sleep(POLL).await;
        if ours.is_none() || inode(&container_dir) != ours {
            return;
        }
        let result = tokio::task::spawn_blocking(move || {
            for m in &mut mirrors {
                match m.refresh() {
                    Ok(true) => tracing::debug!("{} updated", m.dst().display()),
                    Ok(false) => {}
                    Err(e) => tracing::debug!("{}: not updated: {e}", m.dst().display()),
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

/// Removes a container's copies (its poller then ends).
pub fn remove(id: &str) {
    if !id.is_empty() && !id.contains('/') && id != "." && id != ".." {
        let _ = std::fs::remove_dir_all(Path::new(DIR).join(id));
    }
}

#[cfg(test)]
mod tests;
