//! The L1 image: the Debian kernel the guest image was built from, an initramfs holding a
//! static busybox, the modules L1 needs (KVM for AMD, virtio-pci and virtio-fs for the
//! shared root, overlayfs, tun/veth/bridge, tc and nftables for the network tests) and the two init
//! stages. Content-addressed in the same cache as the guest image, keyed by its inputs,
//! so a second build costs one hash of its inputs.

use std::path::{Path, PathBuf};

use cocoon_rootfs::cache::{Cache, ImageFile};
use cocoon_rootfs::cpio::Archive;
use cocoon_rootfs::elf::Elf;
use cocoon_rootfs::initramfs::module_path;
use cocoon_rootfs::kernel::{self, KernelSource};
use cocoon_rootfs::modules::ModuleTree;
use cocoon_rootfs::{hash, InitramfsError, Manifest, RootfsError, MANIFEST_FILE};

use crate::NestedError;

/// Modules L1 loads, with their dependencies, in order.
pub const L1_MODULES: &[&str] = &[
    "virtio_pci",
    "virtiofs",
    "overlay",
    "kvm_amd",
    "tun",
    "veth",
    "bridge",
    // Loop devices over files, for the raw block device tests on cocoon-vmm.
    "loop",
    // A pod's network carried into its VM (tc ingress + mirred redirect) and PortForward
    // (an nftables NAT redirect), for the CRI tests on cocoon-vmm.
    "sch_ingress",
    "cls_u32",
    "act_mirred",
    "nft_chain_nat",
    "nft_redir",
];

const INIT: &str = include_str!("../l1/init");
const STAGE2: &str = include_str!("../l1/stage2");
/// Bump when the layout changes in a way the inputs above do not show.
const FORMAT: &str = "cocoon-l1 v1";
pub const BUSYBOX: &str = "/bin/busybox";
const KERNEL_FILE: &str = "vmlinuz";
const INITRD_FILE: &str = "l1.cpio";

/// Which kernel L1 runs. Its pods (L2) boot the guest image's kernel either way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum L1Kernel {
    /// The guest image's own Debian kernel package where it was built from one, else
    /// Debian 12's cloud kernel (6.1): the older LTS kernels nodes still run. Its tmpfs
    /// has no idmapped mounts, so pods in such an L1 run virtiofsd unjailed.
    Image,
    /// Debian's 6.12 cloud kernel, of the same source version as the `linux-source-6.12`
    /// Cocoon's own kernel is built from: what Debian 13 and RHEL 10 nodes run, between
    /// 6.1 and the host's kernel here. The default, so that pods in L1 run with the
    /// default confinement (the virtiofsd jail needs idmapped tmpfs, from 6.3).
    #[default]
    Linux612,
}

/// A built L1 image in the cache.
#[derive(Debug, Clone)]
pub struct L1Image {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl L1Image {
    /// Finds or builds the L1 image with the default kernel ([`L1Kernel`]) for the guest
    /// image in `guest_image_dir` (its `manifest.json`).
    pub fn build(guest_image_dir: &Path, cache_dir: Option<&Path>) -> Result<L1Image, NestedError> {
        Self::build_with(guest_image_dir, cache_dir, L1Kernel::default())
    }

    /// `build`, with L1 running `kernel`.
    pub fn build_with(
        guest_image_dir: &Path,
        cache_dir: Option<&Path>,
        kernel: L1Kernel,
    ) -> Result<L1Image, NestedError> {
        let manifest_path = guest_image_dir.join(MANIFEST_FILE);
        let text = std::fs::read(&manifest_path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                return NestedError::Missing {
                    what: manifest_path.display().to_string(),
                    hint: "run `make image` first",
                };
            }
            NestedError::Manifest {
                path: manifest_path.clone(),
                source,
            }
        })?;
        let manifest: Manifest =
            serde_json::from_slice(&text).map_err(|source| NestedError::ManifestFormat {
                path: manifest_path.clone(),
                source,
            })?;
        let cache =
            Cache::new(cocoon_rootfs::resolve_cache_dir(cache_dir).map_err(RootfsError::from)?);
        // L1 needs KVM's modules: a guest image with Cocoon's own kernel (built from
        // linux-source, everything built in and no KVM host support) gets Debian's
        // cloud kernel for L1 instead; its pods (L2) still boot the image's kernel.
        let image_deb = manifest.kernel.package.deb_file.starts_with("linux-image");
        let (deb, deb_sha256) = if kernel == L1Kernel::Linux612 {
            cocoon_rootfs::debian::resolve_cloud_kernel_of_source(
                cocoon_rootfs::kbuild::SOURCE_PACKAGE,
            )
            .and_then(|pkg| cocoon_rootfs::debian::fetch(&pkg, &cache.downloads_dir()))
            .map_err(cocoon_rootfs::kernel::KernelError::from)
            .map_err(RootfsError::from)?
        } else if image_deb {
            let deb = cache
                .downloads_dir()
                .join(&manifest.kernel.package.deb_file);
            if !deb.is_file() {
                return Err(NestedError::Missing {
                    what: deb.display().to_string(),
                    hint: "the guest image's kernel package; run `make image`",
                });
            }
            (deb, manifest.kernel.package.deb_sha256.clone())
        } else {
            let fetched = cocoon_rootfs::debian::resolve_cloud_kernel()
                .and_then(|pkg| cocoon_rootfs::debian::fetch(&pkg, &cache.downloads_dir()));
            fetched
                .map_err(cocoon_rootfs::kernel::KernelError::from)
                .map_err(RootfsError::from)?
        };
        let busybox = static_busybox()?;

        let key = hash::sha256_hex(
            format!(
                "{FORMAT}\n{}\n{}\n{}\n{INIT}\n{STAGE2}\n",
                deb_sha256,
                hash::sha256_hex(&busybox),
                L1_MODULES.join(" ")
            )
            .as_bytes(),
        );
        let id = format!("l1-{key}");
        let dir = cache.images_dir().join(&id);
        let image = L1Image {
            kernel: dir.join(KERNEL_FILE),
            initrd: dir.join(INITRD_FILE),
        };
        if image.kernel.is_file() && image.initrd.is_file() {
            return Ok(image);
        }

        log::info!("building the L1 image {id}");
        let kernel = kernel::prepare(
            &KernelSource::DebFile(deb),
            &cache.downloads_dir(),
            &cache.scratch_dir(),
        )
        .map_err(RootfsError::from)?;
        let initrd = initramfs(&kernel.modules_dir, &kernel.release, busybox)?;
        let kernel_bytes = std::fs::read(&kernel.vmlinuz).map_err(NestedError::io(format!(
            "read {}",
            kernel.vmlinuz.display()
        )))?;
        cache
            .store_image(
                &id,
                &[
                    ImageFile {
                        name: KERNEL_FILE,
                        bytes: &kernel_bytes,
                    },
                    ImageFile {
                        name: INITRD_FILE,
                        bytes: &initrd,
                    },
                ],
            )
            .map_err(RootfsError::from)?;
        Ok(image)
    }
}

/// The host's busybox, which must be statically linked: L1's first stage runs before the
/// host's root (and its libraries) is mounted.
fn static_busybox() -> Result<Vec<u8>, NestedError> {
    let bytes = std::fs::read(BUSYBOX).map_err(|_| NestedError::Missing {
        what: BUSYBOX.into(),
        hint: "apt-get install busybox-static",
    })?;
    match Elf::parse(&bytes).and_then(|elf| elf.has_interpreter()) {
        Ok(false) => Ok(bytes),
        _ => Err(NestedError::Missing {
            what: format!("a statically linked {BUSYBOX}"),
            hint: "apt-get install busybox-static",
        }),
    }
}

fn initramfs(modules_dir: &Path, release: &str, busybox: Vec<u8>) -> Result<Vec<u8>, NestedError> {
    let tree = ModuleTree::scan(modules_dir, release).map_err(RootfsError::from)?;
    let roots: Vec<String> = L1_MODULES.iter().map(|m| (*m).to_owned()).collect();
    let selection = tree.resolve(&roots).map_err(RootfsError::from)?;
    let cpio = |e| RootfsError::from(InitramfsError::from(e));
    let mut archive = Archive::new();
    for dir in ["proc", "sys", "dev", "etc/cocoon-l1"] {
        archive.add_dir(dir, 0o755).map_err(cpio)?;
    }
    // The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
    archive
        .add_char_device("dev/console", 0o600, 5, 1)
        .map_err(cpio)?;
    archive
        .add_file("bin/busybox", 0o755, busybox)
        .map_err(cpio)?;
    archive
        .add_file("init", 0o755, INIT.as_bytes().to_vec())
        .map_err(cpio)?;
    archive
        .add_file("etc/cocoon-l1/stage2", 0o644, STAGE2.as_bytes().to_vec())
        .map_err(cpio)?;
    let mut list = String::new();
    for name in &selection.load_order {
        let bytes = tree.read(name).map_err(RootfsError::from)?;
        let dest = module_path(release, name);
        list.push_str(&format!("{name} {dest}\n"));
        archive
            .add_file(dest.trim_start_matches('/'), 0o644, bytes)
            .map_err(cpio)?;
    }
    archive
        .add_file("etc/cocoon-l1/modules", 0o644, list.into_bytes())
        .map_err(cpio)?;
    Ok(archive.to_bytes())
}

/// A small archive to append to the L1 initramfs (the kernel unpacks concatenated
/// archives in order): the command script for one run.
pub fn command_archive(script: &str) -> Result<Vec<u8>, NestedError> {
    let mut archive = Archive::new();
    archive
        .add_file("etc/cocoon-l1/cmd.sh", 0o644, script.as_bytes().to_vec())
        .map_err(|e| RootfsError::from(InitramfsError::from(e)))?;
    Ok(archive.to_bytes())
}
