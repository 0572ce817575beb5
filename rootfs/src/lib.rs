//! Builds Cocoon's guest image: a kernel and an initramfs whose `/init` is the guest agent,
//! with the virtio, vsock and filesystem modules it loads. Images are content-addressed in a
//! cache and byte-for-byte reproducible from the same kernel package and agent binary.

pub mod cache;
pub mod cpio;
pub mod debian;
pub mod elf;
pub mod hash;
pub mod initramfs;
pub mod kbuild;
pub mod kernel;
pub mod manifest;
pub mod modinfo;
pub mod modules;
pub mod tsc;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use cache::{resolve_cache_dir, CacheError};
pub use initramfs::{Compression, InitramfsError};
pub use kernel::{KernelError, KernelSource};
pub use manifest::Manifest;
pub use modules::{ModulesError, DEFAULT_MODULES};

/// File names inside an image directory (and in `--out`).
pub const KERNEL_FILE: &str = "vmlinuz";
/// The PVH ELF of the same kernel, where the image has one.
pub const PVH_KERNEL_FILE: &str = "vmlinux";
pub const MANIFEST_FILE: &str = "manifest.json";

#[derive(Debug, Error)]
pub enum RootfsError {
    #[error("Failed to prepare the kernel")]
    Kernel(#[from] KernelError),
    #[error("Failed to select kernel modules")]
    Modules(#[from] ModulesError),
    #[error("Failed to build the initramfs")]
    Initramfs(#[from] InitramfsError),
    #[error("Failed to store the image")]
    Cache(#[from] CacheError),
    #[error("Failed to remove {}", path.display())]
    Remove {
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

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub kernel: KernelSource,
    /// The statically linked agent that becomes `/init`.
    pub agent: PathBuf,
    /// Cache root; `None` picks it as `cache::resolve_cache_dir` describes.
    pub cache_dir: Option<PathBuf>,
    /// Also copy the image files here (e.g. `target/image/`).
    pub out_dir: Option<PathBuf>,
    /// Modules to include with their dependencies; `DEFAULT_MODULES` by default.
    pub modules: Vec<String>,
    pub compression: Compression,
    /// A statically linked busybox, put at `/bin/busybox` for the debug console
    /// (`cocoon debug`); the agent never runs it otherwise.
    pub busybox: Option<PathBuf>,
}

impl BuildOptions {
    pub fn new(kernel: KernelSource, agent: impl Into<PathBuf>) -> Self {
        BuildOptions {
            kernel,
            agent: agent.into(),
            cache_dir: None,
            out_dir: None,
            modules: DEFAULT_MODULES.iter().map(|m| (*m).to_owned()).collect(),
            compression: Compression::None,
            busybox: None,
        }
    }
}

/// A built image in the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub kernel_release: String,
    pub manifest: PathBuf,
    /// SHA-256 over the kernel and initramfs bytes (`hash::image_id`).
    pub id: String,
}

/// Builds (or finds in the cache) the image described by `opts`.
pub fn build(opts: &BuildOptions) -> Result<Image, RootfsError> {
    // The agent is checked first: it is the cheapest input to get wrong.
    let agent = initramfs::read_agent(&opts.agent)?;
    let cache = cache::Cache::new(resolve_cache_dir(opts.cache_dir.as_deref())?);
    let kernel = kernel::prepare(&opts.kernel, &cache.downloads_dir(), &cache.scratch_dir())?;

    let tree = modules::ModuleTree::scan(&kernel.modules_dir, &kernel.release)?;
    let selection = tree.resolve(&opts.modules)?;
    if !selection.builtin.is_empty() {
        log::info!("built into the kernel: {}", selection.builtin.join(", "));
    }
    log::info!("module load order: {}", selection.load_order.join(" "));

    let mut module_files = Vec::with_capacity(selection.load_order.len());
    let mut module_manifest = Vec::with_capacity(selection.load_order.len());
    for name in &selection.load_order {
        let bytes = tree.read(name)?;
        module_manifest.push(manifest::ModuleManifest {
            name: name.clone(),
            sha256: hash::sha256_hex(&bytes),
        });
        module_files.push((name.clone(), bytes));
    }

    let kernel_bytes = read(&kernel.vmlinuz)?;
    let pvh_bytes = kernel.vmlinux.as_deref().map(read).transpose()?;
    let agent_sha256 = hash::sha256_hex(&agent);
    let mut archive = initramfs::layout(agent, &kernel.release, module_files)?;
    let busybox_sha256 = match &opts.busybox {
        Some(path) => {
            let bytes = initramfs::read_static_binary(path)?;
            let sha = hash::sha256_hex(&bytes);
            initramfs::add_busybox(&mut archive, bytes)?;
            Some(sha)
        }
        None => None,
    };
    let initrd_bytes = initramfs::encode(&archive, opts.compression)?;
    let id = hash::image_id(&kernel_bytes, &initrd_bytes);
    let initrd_name = opts.compression.file_name();

    let manifest = Manifest {
        format: manifest::MANIFEST_FORMAT,
        id: id.clone(),
        kernel: manifest::KernelManifest {
            file: KERNEL_FILE.to_owned(),
            sha256: hash::sha256_hex(&kernel_bytes),
            release: kernel.release.clone(),
            package: kernel.package.clone(),
            pvh_file: pvh_bytes.as_ref().map(|_| PVH_KERNEL_FILE.to_owned()),
            pvh_sha256: pvh_bytes.as_deref().map(hash::sha256_hex),
            virtio_mmio_cmdline: kernel.virtio_mmio_cmdline(),
        },
        initramfs: manifest::InitramfsManifest {
            file: initrd_name.to_owned(),
            sha256: hash::sha256_hex(&initrd_bytes),
            compression: opts.compression,
            agent_sha256,
            modules: module_manifest,
            builtin_modules: selection.builtin.clone(),
            busybox_sha256,
        },
    };
    let manifest_bytes = manifest.to_json();

    let mut files = vec![
        cache::ImageFile {
            name: KERNEL_FILE,
            bytes: &kernel_bytes,
        },
        cache::ImageFile {
            name: initrd_name,
            bytes: &initrd_bytes,
        },
        cache::ImageFile {
            name: MANIFEST_FILE,
            bytes: &manifest_bytes,
        },
    ];
    if let Some(bytes) = &pvh_bytes {
        files.push(cache::ImageFile {
            name: PVH_KERNEL_FILE,
            bytes,
        });
    }
    let (dir, reused) = cache.store_image(&id, &files)?;
    log::info!("{} image {id}", if reused { "reused" } else { "stored" });
    if let Some(out) = &opts.out_dir {
        let names: Vec<&str> = files.iter().map(|f| f.name).collect();
        cache::publish(&dir, &names, out)?;
        if pvh_bytes.is_none() {
            // A PVH kernel left by an earlier image in the same place is not this one's.
            let stale = out.join(PVH_KERNEL_FILE);
            match fs::remove_file(&stale) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(RootfsError::Remove {
                        path: stale,
                        source: e,
                    })
                }
                _ => {}
            }
        }
    }
    Ok(Image {
        kernel: dir.join(KERNEL_FILE),
        initrd: dir.join(initrd_name),
        kernel_release: kernel.release.clone(),
        manifest: dir.join(MANIFEST_FILE),
        id,
    })
}

fn read(path: &Path) -> Result<Vec<u8>, RootfsError> {
    fs::read(path).map_err(|source| RootfsError::Read {
        path: path.to_owned(),
        source,
    })
}
