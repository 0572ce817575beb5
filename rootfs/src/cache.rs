//! The on-disk cache: `downloads/` keeps fetched `.deb` files, `images/<id>/` keeps built
//! images named by content, `tmp/` holds scratch trees. Images appear atomically (written
//! to a temp dir, then renamed) so a reader never sees half an image.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Environment variable that overrides the cache location.
pub const CACHE_DIR_ENV: &str = "COCOON_CACHE_DIR";
/// The cache location when running as root.
pub const SYSTEM_CACHE_DIR: &str = "/var/lib/cocoon";

#[derive(Debug, Error)]
pub enum CacheError {
    #[error(
        "No cache directory: set {CACHE_DIR_ENV}, HOME or XDG_CACHE_HOME, or pass --cache-dir"
    )]
    NoCacheDir,
    #[error("Failed to write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Failed to read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Picks the cache root: explicit, then `$COCOON_CACHE_DIR`, then `/var/lib/cocoon` for root,
/// then `$XDG_CACHE_HOME/cocoon`, then `~/.cache/cocoon`.
pub fn resolve_cache_dir(explicit: Option<&Path>) -> Result<PathBuf, CacheError> {
    resolve_cache_dir_with(explicit, |k| std::env::var_os(k), is_root())
}

pub fn resolve_cache_dir_with(
    explicit: Option<&Path>,
    env: impl Fn(&str) -> Option<OsString>,
    root: bool,
) -> Result<PathBuf, CacheError> {
    let non_empty = |k: &str| env(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = explicit {
        return Ok(dir.to_owned());
    }
    if let Some(dir) = non_empty(CACHE_DIR_ENV) {
        return Ok(dir);
    }
    if root {
        return Ok(PathBuf::from(SYSTEM_CACHE_DIR));
    }
    if let Some(dir) = non_empty("XDG_CACHE_HOME") {
        return Ok(dir.join("cocoon"));
    }
    non_empty("HOME")
        .map(|home| home.join(".cache/cocoon"))
        .ok_or(CacheError::NoCacheDir)
}

fn is_root() -> bool {
    // SAFETY: geteuid takes no arguments, touches no memory and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// One file of an image: its name inside the image directory and its bytes.
pub struct ImageFile<'a> {
    pub name: &'a str,
    pub bytes: &'a [u8],
}

#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    pub fn new(root: PathBuf) -> Self {
        Cache { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn downloads_dir(&self) -> PathBuf {
        self.root.join("downloads")
    }

    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    pub fn scratch_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Stores an image under `images/<id>/` unless an identical one is there already.
    /// Returns the image directory and whether it was reused.
    pub fn store_image(
        &self,
        id: &str,
        files: &[ImageFile<'_>],
    ) -> Result<(PathBuf, bool), CacheError> {
        let images = self.images_dir();
        let dest = images.join(id);
        if holds(&dest, files)? {
            return Ok((dest, true));
        }
        fs::create_dir_all(&images).map_err(|source| CacheError::Write {
            path: images.clone(),
            source,
        })?;
        let staging = tempfile::Builder::new()
            .prefix(".staging-")
            .tempdir_in(&images)
            .map_err(|source| CacheError::Write {
                path: images.clone(),
                source,
            })?;
        for file in files {
            write_synced(&staging.path().join(file.name), file.bytes)?;
        }
        if dest.exists() {
            // Same id, different bytes: a damaged or older-format image. Move it aside first.
            log::warn!("replacing damaged image {}", dest.display());
            let trash = tempfile::Builder::new()
                .prefix(".trash-")
                .tempdir_in(&images)
                .map_err(|source| CacheError::Write {
                    path: images.clone(),
                    source,
                })?;
            fs::rename(&dest, trash.path().join("old")).map_err(|source| CacheError::Write {
                path: dest.clone(),
                source,
            })?;
        }
        let staged = staging.keep();
        if let Err(source) = fs::rename(&staged, &dest) {
            let _ = fs::remove_dir_all(&staged);
            // Another builder may have stored the same image in the meantime.
            if holds(&dest, files)? {
                return Ok((dest, true));
            }
            return Err(CacheError::Write { path: dest, source });
        }
        Ok((dest, false))
    }
}

fn holds(dir: &Path, files: &[ImageFile<'_>]) -> Result<bool, CacheError> {
    for file in files {
        let path = dir.join(file.name);
        match fs::read(&path) {
            Ok(bytes) if bytes == file.bytes => {}
            Ok(_) => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(source) => return Err(CacheError::Read { path, source }),
        }
    }
    Ok(true)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    let write = || -> io::Result<()> {
        let mut f = fs::File::create(path)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    write().map_err(|source| CacheError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Copies the named files of `image_dir` into `out`, each replaced atomically.
pub fn publish(image_dir: &Path, names: &[&str], out: &Path) -> Result<Vec<PathBuf>, CacheError> {
    fs::create_dir_all(out).map_err(|source| CacheError::Write {
        path: out.to_owned(),
        source,
    })?;
    let mut published = Vec::new();
    for name in names {
        let from = image_dir.join(name);
        let to = out.join(name);
        let tmp = out.join(format!(".{name}.tmp"));
        fs::copy(&from, &tmp).map_err(|source| CacheError::Write {
            path: tmp.clone(),
            source,
        })?;
        fs::rename(&tmp, &to).map_err(|source| CacheError::Write {
            path: to.clone(),
            source,
        })?;
        published.push(to);
    }
    Ok(published)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| {
            vars.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn cache_dir_precedence() {
        let all = env(&[
            (CACHE_DIR_ENV, "/env"),
            ("XDG_CACHE_HOME", "/xdg"),
            ("HOME", "/home/u"),
        ]);
        assert_eq!(
            resolve_cache_dir_with(Some(Path::new("/x")), &all, true).unwrap(),
            Path::new("/x")
        );
        assert_eq!(
            resolve_cache_dir_with(None, &all, true).unwrap(),
            Path::new("/env")
        );
        let no_env = env(&[
            (CACHE_DIR_ENV, ""),
            ("XDG_CACHE_HOME", "/xdg"),
            ("HOME", "/home/u"),
        ]);
        assert_eq!(
            resolve_cache_dir_with(None, &no_env, true).unwrap(),
            Path::new(SYSTEM_CACHE_DIR)
        );
        assert_eq!(
            resolve_cache_dir_with(None, &no_env, false).unwrap(),
            Path::new("/xdg/cocoon")
        );
        let home = env(&[("HOME", "/home/u")]);
        assert_eq!(
            resolve_cache_dir_with(None, &home, false).unwrap(),
            Path::new("/home/u/.cache/cocoon")
        );
        assert!(matches!(
            resolve_cache_dir_with(None, env(&[]), false),
            Err(CacheError::NoCacheDir)
        ));
    }

    #[test]
    fn stores_reuses_and_repairs_images() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().to_owned());
        let files = [
            ImageFile {
                name: "a",
                bytes: b"one",
            },
            ImageFile {
                name: "b",
                bytes: b"two",
            },
        ];
        let (path, reused) = cache.store_image("id1", &files).unwrap();
        assert!(!reused);
        assert_eq!(fs::read(path.join("b")).unwrap(), b"two");
        assert!(cache.store_image("id1", &files).unwrap().1);
        fs::write(path.join("a"), b"corrupt").unwrap();
        let (_, reused) = cache.store_image("id1", &files).unwrap();
        assert!(!reused);
        assert_eq!(fs::read(path.join("a")).unwrap(), b"one");
        let leftovers: Vec<_> = fs::read_dir(cache.images_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, [OsString::from("id1")]);

        let out = dir.path().join("out");
        let published = publish(&path, &["a", "b"], &out).unwrap();
        assert_eq!(published, [out.join("a"), out.join("b")]);
        assert_eq!(fs::read(out.join("a")).unwrap(), b"one");
    }
}
