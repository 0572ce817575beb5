//! Applying one image layer (a tar, gzip-compressed or not) to a root filesystem, with
//! the OCI whiteouts: `.wh.NAME` removes NAME from the layers below, `.wh..wh..opq` hides
//! everything below in its directory. Entries are unpacked by the `tar` crate's
//! `unpack_in`, which refuses paths and links that would leave the root; removals walk
//! the path without following a symbolic link.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Component, Path, PathBuf};

use super::PullError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    None,
}

impl Compression {
    pub fn of(media_type: &str) -> Result<Compression, PullError> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Compression::Gzip),
            "application/vnd.oci.image.layer.v1.tar" => Ok(Compression::None),
            other => Err(PullError::Malformed(format!(
                "layer media type {other:?} is not supported (tar or tar+gzip)"
            ))),
        }
    }
}

fn bad(what: String) -> PullError {
    PullError::Malformed(what)
}

/// The entry's path as plain components under the root (`./` and a leading `/` dropped).
fn relative(path: &Path) -> Result<PathBuf, PullError> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(bad(format!("entry {} leaves the root", path.display())))
            }
        }
    }
    Ok(out)
}

/// `root/rel`'s parent directory, reached without following symbolic links; `None`
/// when a component is missing (nothing to remove).
fn parent_inside(root: &Path, rel: &Path) -> Result<Option<PathBuf>, PullError> {
    let mut at = root.to_owned();
    if let Some(parent) = rel.parent() {
        for c in parent.components() {
            at.push(c);
            match std::fs::symlink_metadata(&at) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(bad(format!(
                        "a whiteout under {} goes through a symbolic link",
                        at.display()
                    )))
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(source) => return Err(PullError::Io { path: at, source }),
            }
        }
    }
    Ok(Some(at))
}

fn remove(path: &Path) -> Result<(), PullError> {
    let r = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    r.map_err(|source| PullError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Applies the layer read from `file` to `root`.
pub fn layer(file: File, kind: Compression, root: &Path) -> Result<(), PullError> {
    let reader: Box<dyn Read> = match kind {
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(BufReader::new(file))),
        Compression::None => Box::new(BufReader::new(file)),
    };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    let read_err = |e: std::io::Error| bad(format!("the tar stream: {e}"));
    // What this layer itself put in place: an opaque whiteout hides only what is below.
    let mut ours: HashSet<PathBuf> = HashSet::new();
    for entry in archive.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        let rel = relative(&entry.path().map_err(read_err)?)?;
        let Some(name) = rel.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
            continue; // the root itself
        };
        if name == ".wh..wh..opq" {
            let Some(dir) = parent_inside(root, &rel)? else {
                continue;
            };
            let listing = std::fs::read_dir(&dir).map_err(|source| PullError::Io {
                path: dir.clone(),
                source,
            })?;
            for child in listing {
                let child = child.map_err(|source| PullError::Io {
                    path: dir.clone(),
                    source,
                })?;
                let child_rel = rel.with_file_name(child.file_name());
                if !ours.contains(&child_rel) {
                    remove(&child.path())?;
                }
            }
        } else if let Some(hidden) = name.strip_prefix(".wh.") {
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(bad(format!("whiteout {}", rel.display())));
            }
            if let Some(dir) = parent_inside(root, &rel)? {
                remove(&dir.join(hidden))?;
            }
        } else {
            // What a lower layer left at this path goes first, unless a directory meets a
            // directory: tar replaces a file by a file, not a directory by a file or a
            // link, nor anything by a hard link. A path through a link is left to
            // `unpack_in`, which follows it only if it stays inside the root.
            if let Ok(Some(dir)) = parent_inside(root, &rel) {
                let target = dir.join(&name);
                if let Ok(m) = std::fs::symlink_metadata(&target) {
                    let merge = m.is_dir() && entry.header().entry_type().is_dir();
                    if !merge {
                        remove(&target)?;
                    }
                }
            }
            let inside = entry.unpack_in(root).map_err(|e| {
                let cause = std::error::Error::source(&e)
                    .map(|c| format!(": {c}"))
                    .unwrap_or_default();
                bad(format!("entry {}: {e}{cause}", rel.display()))
            })?;
            if !inside {
                return Err(bad(format!("entry {} leaves the root", rel.display())));
            }
            // This layer made the entry and every directory above it.
            for a in rel.ancestors().filter(|a| !a.as_os_str().is_empty()) {
                ours.insert(a.to_owned());
            }
        }
    }
    Ok(())
}
