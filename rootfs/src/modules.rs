//! Chooses the kernel modules the guest needs: finds them in an unpacked
//! `lib/modules/<release>` tree, skips the ones built into the kernel (`modules.builtin`),
//! follows `depends=` to a closure and orders it dependencies first.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::modinfo::{self, normalize_name, ModinfoError};

/// What the guest agent needs: virtio transports, vsock to talk to the host, virtio-fs and
/// overlay for container root filesystems, block and net devices, erofs for image layers.
pub const DEFAULT_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_pci",
    "vmw_vsock_virtio_transport",
    "virtiofs",
    "overlay",
    "virtio_blk",
    "virtio_net",
    "erofs",
];

#[derive(Debug, Error)]
pub enum ModulesError {
    #[error("Failed to read module directory {}", path.display())]
    ReadDir {
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
    #[error("Module {name}{} is neither a .ko file nor built into kernel {release}", required_by_text(.required_by))]
    NotFound {
        name: String,
        required_by: Option<String>,
        release: String,
    },
    #[error("Module {name} is compressed ({}) and could not be unpacked: {why}", path.display())]
    Compressed {
        name: String,
        path: PathBuf,
        why: String,
    },
    #[error("Failed to read the modinfo of {}", path.display())]
    Modinfo {
        path: PathBuf,
        #[source]
        source: ModinfoError,
    },
    #[error("Module dependencies form a cycle among: {}", .0.join(", "))]
    Cycle(Vec<String>),
}

fn required_by_text(required_by: &Option<String>) -> String {
    required_by
        .as_ref()
        .map(|r| format!(" (required by {r})"))
        .unwrap_or_default()
}

/// How one module name is provided by a kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provided {
    BuiltIn,
    Loadable { depends: Vec<String> },
}

/// The modules to load, dependencies first, and the requested ones found built in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolution {
    pub load_order: Vec<String>,
    pub builtin: Vec<String>,
}

/// Computes the dependency closure of `roots` and a load order with each module after all
/// of its dependencies; among modules that are ready at the same time, the smaller name
/// goes first so the order does not depend on hash or directory order.
///
/// `lookup` answers how a module is provided, or `Ok(None)` when the kernel lacks it.
pub fn resolve<F>(
    roots: &[String],
    release: &str,
    mut lookup: F,
) -> Result<Resolution, ModulesError>
where
    F: FnMut(&str) -> Result<Option<Provided>, ModulesError>,
{
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut builtin = BTreeSet::new();
    let mut stack: Vec<(String, Option<String>)> = roots
        .iter()
        .rev()
        .map(|r| (normalize_name(r), None))
        .collect();
    while let Some((name, required_by)) = stack.pop() {
        if deps.contains_key(&name) || builtin.contains(&name) {
            continue;
        }
        match lookup(&name)? {
            None => {
                return Err(ModulesError::NotFound {
                    name,
                    required_by,
                    release: release.to_owned(),
                })
            }
            Some(Provided::BuiltIn) => {
                builtin.insert(name);
            }
            Some(Provided::Loadable { depends }) => {
                let set: BTreeSet<String> = depends.iter().map(|d| normalize_name(d)).collect();
                for dep in set.iter().rev() {
                    stack.push((dep.clone(), Some(name.clone())));
                }
                deps.insert(name, set);
            }
        }
    }
    // A dependency that is built in needs no ordering.
    for set in deps.values_mut() {
        set.retain(|d| !builtin.contains(d));
    }

    let mut pending: BTreeMap<&str, usize> =
        deps.iter().map(|(n, d)| (n.as_str(), d.len())).collect();
    let mut ready: BTreeSet<&str> = pending
        .iter()
        .filter(|(_, &n)| n == 0)
        .map(|(&m, _)| m)
        .collect();
    let mut load_order = Vec::with_capacity(deps.len());
    while let Some(next) = ready.pop_first() {
        pending.remove(next);
        load_order.push(next.to_owned());
        for (name, d) in &deps {
            if d.contains(next) {
                if let Some(count) = pending.get_mut(name.as_str()) {
                    *count -= 1;
                    if *count == 0 {
                        ready.insert(name.as_str());
                    }
                }
            }
        }
    }
    if !pending.is_empty() {
        return Err(ModulesError::Cycle(
            pending.keys().map(|s| (*s).to_owned()).collect(),
        ));
    }
    Ok(Resolution {
        load_order,
        builtin: builtin.into_iter().collect(),
    })
}

/// The modules of one kernel release as unpacked from a package.
#[derive(Debug)]
pub struct ModuleTree {
    release: String,
    loadable: BTreeMap<String, PathBuf>,
    compressed: BTreeMap<String, PathBuf>,
    builtin: BTreeSet<String>,
}

impl ModuleTree {
    /// Indexes `dir` (a `lib/modules/<release>` directory).
    pub fn scan(dir: &Path, release: &str) -> Result<Self, ModulesError> {
        let mut tree = ModuleTree {
            release: release.to_owned(),
            loadable: BTreeMap::new(),
            compressed: BTreeMap::new(),
            builtin: BTreeSet::new(),
        };
        let kernel_dir = dir.join("kernel");
        if kernel_dir.is_dir() {
            tree.walk(&kernel_dir)?;
        }
        let builtin_path = dir.join("modules.builtin");
        match fs::read_to_string(&builtin_path) {
            Ok(text) => {
                tree.builtin = text
                    .lines()
                    .filter_map(|l| module_name_of(Path::new(l.trim())))
                    .map(|(name, _)| name)
                    .collect();
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ModulesError::Read {
                    path: builtin_path,
                    source,
                })
            }
        }
        Ok(tree)
    }

    fn walk(&mut self, dir: &Path) -> Result<(), ModulesError> {
        let read_dir = |path: &Path| {
            fs::read_dir(path).map_err(|source| ModulesError::ReadDir {
                path: path.to_owned(),
                source,
            })
        };
        let mut entries = Vec::new();
        for entry in read_dir(dir)? {
            let entry = entry.map_err(|source| ModulesError::ReadDir {
                path: dir.to_owned(),
                source,
            })?;
            entries.push(entry.path());
        }
        // Sorted so that a name appearing twice resolves the same way every time.
        entries.sort();
        for path in entries {
            if path.is_dir() {
                self.walk(&path)?;
            } else if let Some((name, compressed)) = module_name_of(&path) {
                let map = if compressed {
                    &mut self.compressed
                } else {
                    &mut self.loadable
                };
                map.entry(name).or_insert(path);
            }
        }
        Ok(())
    }

    /// Resolves `roots` against this tree, reading each candidate's modinfo.
    pub fn resolve(&self, roots: &[String]) -> Result<Resolution, ModulesError> {
        resolve(roots, &self.release, |name| {
            if let Some(path) = self.loadable.get(name).or_else(|| {
                // Built in wins over a compressed file of the same name, as before.
                (!self.builtin.contains(name))
                    .then(|| self.compressed.get(name))
                    .flatten()
            }) {
                let bytes = self.read(name)?;
                let info =
                    modinfo::parse_module(&bytes).map_err(|source| ModulesError::Modinfo {
                        path: path.clone(),
                        source,
                    })?;
                for softdep in &info.softdeps {
                    log::debug!("module {name} has softdep '{softdep}', not followed");
                }
                return Ok(Some(Provided::Loadable {
                    depends: info.depends,
                }));
            }
            if self.builtin.contains(name) {
                log::info!(
                    "module {name} is built into kernel {}, skipping",
                    self.release
                );
                return Ok(Some(Provided::BuiltIn));
            }
            Ok(None)
        })
    }

    /// The `.ko` file of a loadable module, where it is not compressed.
    pub fn path_of(&self, name: &str) -> Option<&Path> {
        self.loadable.get(name).map(PathBuf::as_path)
    }

    /// A loadable module's ELF bytes, unpacked where the package compressed it (Debian's
    /// kernels from 6.12 on ship `.ko.xz`): an initramfs's `insmod` takes plain ELF.
    pub fn read(&self, name: &str) -> Result<Vec<u8>, ModulesError> {
        if let Some(path) = self.loadable.get(name) {
            return fs::read(path).map_err(|source| ModulesError::Read {
                path: path.clone(),
                source,
            });
        }
        let Some(path) = self.compressed.get(name) else {
            return Err(ModulesError::NotFound {
                name: name.to_owned(),
                required_by: None,
                release: self.release.clone(),
            });
        };
        decompress(path).map_err(|why| ModulesError::Compressed {
            name: name.to_owned(),
            path: path.clone(),
            why,
        })
    }
}

/// Unpacks a `.ko.xz`, `.ko.zst` or `.ko.gz` with the system's tool (xz-utils is in every
/// Debian; the others are named when missing). Their formats are not worth a crate
/// each for a build step.
fn decompress(path: &Path) -> Result<Vec<u8>, String> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else {
        "gzip"
    };
    let out = std::process::Command::new(tool)
        .args(["-d", "-c", "--"])
        .arg(path)
        .output()
        .map_err(|e| format!("cannot run {tool}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{tool} -d failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out.stdout)
}

/// `kernel/fs/fuse/virtio-fs.ko` → (`virtio_fs`, compressed?).
fn module_name_of(path: &Path) -> Option<(String, bool)> {
    let file = path.file_name()?.to_str()?;
    if let Some(stem) = file.strip_suffix(".ko") {
        return Some((normalize_name(stem), false));
    }
    [".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))
        .map(|stem| (normalize_name(stem), true))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(
        edges: &[(&str, &[&str])],
        builtin: &[&str],
    ) -> impl FnMut(&str) -> Result<Option<Provided>, ModulesError> {
        let edges: BTreeMap<String, Vec<String>> = edges
            .iter()
            .map(|(n, d)| (n.to_string(), d.iter().map(|s| s.to_string()).collect()))
            .collect();
        let builtin: BTreeSet<String> = builtin.iter().map(|s| s.to_string()).collect();
        move |name| {
            if builtin.contains(name) {
                return Ok(Some(Provided::BuiltIn));
            }
            Ok(edges
                .get(name)
                .map(|d| Provided::Loadable { depends: d.clone() }))
        }
    }

    fn roots(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn orders_dependencies_first_with_name_tie_break() {
        let lookup = graph(
            &[
                ("virtio_ring", &[]),
                ("virtio", &[]),
                ("virtio_mmio", &["virtio", "virtio_ring"]),
                ("vsock", &[]),
                (
                    "vmw_vsock_virtio_transport_common",
                    &["virtio", "virtio_ring", "vsock"],
                ),
                (
                    "vmw_vsock_virtio_transport",
                    &[
                        "virtio",
                        "vmw_vsock_virtio_transport_common",
                        "virtio_ring",
                        "vsock",
                    ],
                ),
                ("fuse", &[]),
                ("virtiofs", &["fuse", "virtio", "virtio_ring"]),
            ],
            &[],
        );
        let res = resolve(
            &roots(&["virtiofs", "vmw_vsock_virtio_transport", "virtio_mmio"]),
            "r",
            lookup,
        )
        .unwrap();
        assert_eq!(
            res.load_order,
            [
                "fuse",
                "virtio",
                "virtio_ring",
                "virtio_mmio",
                "virtiofs",
                "vsock",
                "vmw_vsock_virtio_transport_common",
                "vmw_vsock_virtio_transport",
            ]
        );
        assert!(res.builtin.is_empty());
    }

    #[test]
    fn order_is_independent_of_root_order() {
        let edges: &[(&str, &[&str])] =
            &[("a", &["c"]), ("b", &["c"]), ("c", &[]), ("d", &["a", "b"])];
        let one = resolve(&roots(&["d", "a", "b"]), "r", graph(edges, &[])).unwrap();
        let two = resolve(&roots(&["b", "a", "d"]), "r", graph(edges, &[])).unwrap();
        assert_eq!(one, two);
        assert_eq!(one.load_order, ["c", "a", "b", "d"]);
    }

    #[test]
    fn skips_builtin_modules_and_edges_to_them() {
        let lookup = graph(
            &[
                ("virtio_blk", &["virtio", "virtio_ring"]),
                ("virtio_ring", &[]),
            ],
            &["virtio", "overlay"],
        );
        let res = resolve(&roots(&["overlay", "virtio-blk"]), "r", lookup).unwrap();
        assert_eq!(res.load_order, ["virtio_ring", "virtio_blk"]);
        assert_eq!(res.builtin, ["overlay", "virtio"]);
    }

    #[test]
    fn missing_module_names_itself_and_its_requirer() {
        let err = resolve(
            &roots(&["erofs"]),
            "6.1.0-test",
            graph(&[("erofs", &["libcrc32c"])], &[]),
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("libcrc32c")
                && text.contains("required by erofs")
                && text.contains("6.1.0-test"),
            "{text}"
        );
        let err = resolve(&roots(&["nope"]), "r", graph(&[], &[])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Module nope is neither a .ko file nor built into kernel r"
        );
    }

    #[test]
    fn cycle_is_an_error() {
        let err = resolve(
            &roots(&["a"]),
            "r",
            graph(&[("a", &["b"]), ("b", &["a"])], &[]),
        )
        .unwrap_err();
        assert!(
            matches!(err, ModulesError::Cycle(ref m) if m == &["a", "b"]),
            "{err}"
        );
    }

    #[test]
    fn scans_a_module_tree() {
        use crate::elf::test_utils::build_elf;
        let dir = tempfile::tempdir().unwrap();
        let kdir = dir.path().join("kernel/drivers/virtio");
        fs::create_dir_all(&kdir).unwrap();
        fs::write(
            kdir.join("virtio.ko"),
            build_elf(&[(".modinfo", b"depends=\0name=virtio\0")]),
        )
        .unwrap();
        fs::write(
            kdir.join("virtio-mmio.ko"),
            build_elf(&[(".modinfo", b"depends=virtio\0")]),
        )
        .unwrap();
        fs::write(kdir.join("zstd_thing.ko.zst"), b"").unwrap();
        fs::write(
            dir.path().join("modules.builtin"),
            "kernel/fs/overlayfs/overlay.ko\n",
        )
        .unwrap();
        let tree = ModuleTree::scan(dir.path(), "r").unwrap();
        let res = tree.resolve(&roots(&["virtio_mmio", "overlay"])).unwrap();
        assert_eq!(res.load_order, ["virtio", "virtio_mmio"]);
        assert_eq!(res.builtin, ["overlay"]);
        assert!(tree
            .path_of("virtio_mmio")
            .unwrap()
            .ends_with("virtio-mmio.ko"));
        let err = tree.resolve(&roots(&["zstd_thing"])).unwrap_err();
        assert!(matches!(err, ModulesError::Compressed { .. }), "{err}");
        assert!(err.to_string().contains("zstd_thing.ko.zst"), "{err}");
    }

    /// Debian's 6.12 packages compress every module with xz: resolved through its
    /// modinfo and read back as the plain ELF.
    #[test]
    fn an_xz_compressed_module_is_resolved_and_read_unpacked() {
        use crate::elf::test_utils::build_elf;
        let dir = tempfile::tempdir().unwrap();
        let kdir = dir.path().join("kernel/fs/overlayfs");
        fs::create_dir_all(&kdir).unwrap();
        let elf = build_elf(&[(".modinfo", b"depends=\0name=overlay\0")]);
        let plain = kdir.join("overlay.ko");
        fs::write(&plain, &elf).unwrap();
        let status = std::process::Command::new("xz")
            .arg(&plain)
            .status()
            .expect("xz (xz-utils) is installed");
        assert!(status.success() && !plain.exists());
        let tree = ModuleTree::scan(dir.path(), "r").unwrap();
        let res = tree.resolve(&roots(&["overlay"])).unwrap();
        assert_eq!(res.load_order, ["overlay"]);
        assert_eq!(tree.read("overlay").unwrap(), elf);
        assert!(tree.path_of("overlay").is_none());
    }
}
