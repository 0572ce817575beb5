//! Where the guest kernel comes from. Every source ends as an unpacked tree holding
//! `boot/vmlinuz-<release>` and `lib/modules/<release>/`; a custom kernel built from
//! Debian's `linux-source` is meant to become another `KernelSource` variant.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tempfile::TempDir;
use thiserror::Error;

use crate::debian::{self, DebianError};
use crate::hash;

#[derive(Debug, Error)]
pub enum KernelError {
    #[error("Failed to fetch the kernel package")]
    Debian(#[from] DebianError),
    #[error("Failed to create scratch space in {}", path.display())]
    Scratch {
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
    #[error("Kernel package {} has no boot/vmlinuz-<release>", .0.display())]
    NoKernelImage(PathBuf),
    #[error("Kernel package {} has several kernels: {}", deb.display(), releases.join(", "))]
    SeveralKernels { deb: PathBuf, releases: Vec<String> },
    #[error("Kernel package {} has no lib/modules/{release}", deb.display())]
    NoModules { deb: PathBuf, release: String },
    #[error("Failed to build the guest kernel")]
    Build(#[from] crate::kbuild::KbuildError),
}

/// Where to take the kernel and its modules from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelSource {
    /// Debian's `linux-image-cloud-amd64`, resolved and downloaded with apt.
    DebianCloud,
    /// A `linux-image-*` `.deb` already on disk; used offline.
    DebFile(PathBuf),
    /// Cocoon's own kernel, built from Debian's `linux-source-6.12` with
    /// `rootfs/kernel/cocoon.config` (`kbuild`), everything built in; cached per source,
    /// fragment and recipe.
    Built,
}

/// Which package the kernel came from, as recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelPackage {
    pub package: String,
    pub version: String,
    pub deb_file: String,
    pub deb_sha256: String,
}

/// An unpacked kernel, deleted when dropped.
#[derive(Debug)]
pub struct PreparedKernel {
    _tree: TempDir,
    pub release: String,
    pub vmlinuz: PathBuf,
    /// The same kernel as a PVH-bootable ELF, where we built it (a distribution package
    /// ships only the bzImage).
    pub vmlinux: Option<PathBuf>,
    pub modules_dir: PathBuf,
    pub package: KernelPackage,
    /// The kernel's build configuration (`.config`), where the package ships it.
    pub config: PathBuf,
}

impl PreparedKernel {
    /// Whether the kernel takes virtio-mmio devices from its command line
    /// (`virtio_mmio.device=`, `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`), so that a VMM
    /// needs no ACPI tables to describe them. Unknown (no configuration) is no.
    pub fn virtio_mmio_cmdline(&self) -> bool {
        fs::read_to_string(&self.config).is_ok_and(|c| {
            c.lines()
                .any(|l| l == "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y")
        })
    }
}

/// Fetches (if needed) and unpacks the kernel into a temporary directory under `scratch`.
pub fn prepare(
    source: &KernelSource,
    downloads: &Path,
    scratch: &Path,
) -> Result<PreparedKernel, KernelError> {
    let (deb, deb_sha256, name, version) = match source {
        KernelSource::Built => return prepare_built(downloads, scratch),
        KernelSource::DebianCloud => {
            let pkg = debian::resolve_cloud_kernel()?;
            let (deb, sha256) = debian::fetch(&pkg, downloads)?;
            (deb, sha256, pkg.name, pkg.version)
        }
        KernelSource::DebFile(path) => {
            let pkg = debian::deb_package(path)?;
            let sha256 = hash::sha256_file(path).map_err(|source| KernelError::Read {
                path: path.clone(),
                source,
            })?;
            (path.clone(), sha256, pkg.name, pkg.version)
        }
    };

    fs::create_dir_all(scratch).map_err(|source| KernelError::Scratch {
        path: scratch.to_owned(),
        source,
    })?;
    let tree = tempfile::Builder::new()
        .prefix("kernel-")
        .tempdir_in(scratch)
        .map_err(|source| KernelError::Scratch {
            path: scratch.to_owned(),
            source,
        })?;
    log::info!("unpacking {}", deb.display());
    debian::unpack(&deb, tree.path())?;

    let release = find_release(tree.path(), &deb)?;
    let vmlinuz = tree.path().join("boot").join(format!("vmlinuz-{release}"));
    let modules_dir = tree.path().join("lib/modules").join(&release);
    if !modules_dir.is_dir() {
        return Err(KernelError::NoModules { deb, release });
    }
    let config = tree.path().join("boot").join(format!("config-{release}"));
    Ok(PreparedKernel {
        _tree: tree,
        release,
        vmlinuz,
        vmlinux: None,
        modules_dir,
        config,
        package: KernelPackage {
            package: name,
            version,
            deb_file: deb
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            deb_sha256,
        },
    })
}

/// Builds (or reuses) Cocoon's own kernel; its module tree is `modules.builtin` and the
/// few modules it builds (`kernel/`).
fn prepare_built(downloads: &Path, scratch: &Path) -> Result<PreparedKernel, KernelError> {
    let kernels = scratch
        .parent()
        .map_or_else(|| scratch.join("kernels"), |p| p.join("kernels"));
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let k = crate::kbuild::build(downloads, &kernels, scratch, jobs)?;
    let tree = tempfile::Builder::new()
        .prefix("kernel-")
        .tempdir_in(scratch)
        .map_err(|source| KernelError::Scratch {
            path: scratch.to_owned(),
            source,
        })?;
    let modules_dir = tree.path().join("lib/modules").join(&k.release);
    let loadable = modules_dir.join("kernel");
    fs::create_dir_all(&loadable)
        .and_then(|()| fs::copy(&k.modules_builtin, modules_dir.join("modules.builtin")))
        .and_then(|_| {
            for ko in fs::read_dir(&k.modules)? {
                let ko = ko?;
                fs::copy(ko.path(), loadable.join(ko.file_name()))?;
            }
            Ok(())
        })
        .map_err(|source| KernelError::Scratch {
            path: modules_dir.clone(),
            source,
        })?;
    Ok(PreparedKernel {
        _tree: tree,
        release: k.release,
        config: k.vmlinuz.with_file_name("config"),
        vmlinuz: k.vmlinuz,
        vmlinux: Some(k.vmlinux),
        modules_dir,
        package: KernelPackage {
            package: format!("{} (built, cocoon.config {})", k.source.name, k.key),
            version: k.source.version,
            deb_file: k
                .source_deb
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            deb_sha256: k.source_sha256,
        },
    })
}

fn find_release(root: &Path, deb: &Path) -> Result<String, KernelError> {
    let boot = root.join("boot");
    let entries = match fs::read_dir(&boot) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(KernelError::NoKernelImage(deb.to_owned()))
        }
        Err(source) => return Err(KernelError::Read { path: boot, source }),
    };
    let mut releases = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| KernelError::Read {
            path: boot.clone(),
            source,
        })?;
        if let Some(release) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("vmlinuz-"))
        {
            releases.push(release.to_owned());
        }
    }
    releases.sort();
    match releases.len() {
        0 => Err(KernelError::NoKernelImage(deb.to_owned())),
        1 => Ok(releases.remove(0)),
        _ => Err(KernelError::SeveralKernels {
            deb: deb.to_owned(),
            releases,
        }),
    }
}
