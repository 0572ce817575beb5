//! `manifest.json`: what an image is made of. It holds no paths, times or host names, so
//! the same inputs give the same manifest; the image id is computed from the image bytes
//! (see `hash::image_id`) and recorded here.

use serde::{Deserialize, Serialize};

use crate::initramfs::Compression;
use crate::kernel::KernelPackage;

pub const MANIFEST_FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub id: String,
    pub kernel: KernelManifest,
    pub initramfs: InitramfsManifest,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelManifest {
    pub file: String,
    pub sha256: String,
    pub release: String,
    pub package: KernelPackage,
    /// The same kernel as a PVH-bootable ELF (Cocoon's own kernel has one), which pods
    /// boot by default: no real-mode setup, no decompression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvh_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvh_sha256: Option<String>,
    /// The kernel takes virtio-mmio devices from its command line
    /// (`CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`; Cocoon's own kernel does, Debian's does
    /// not): QEMU's microvm can then boot it without ACPI, which is faster.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub virtio_mmio_cmdline: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitramfsManifest {
    pub file: String,
    pub sha256: String,
    pub compression: Compression,
    pub agent_sha256: String,
    /// In load order.
    pub modules: Vec<ModuleManifest>,
    /// Requested modules that the kernel has built in.
    pub builtin_modules: Vec<String>,
    /// The static busybox at `/bin/busybox` for the debug console, if the image has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub busybox_sha256: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleManifest {
    pub name: String,
    pub sha256: String,
}

impl Manifest {
    pub fn to_json(&self) -> Vec<u8> {
        let mut text = serde_json::to_vec_pretty(self).unwrap_or_default();
        text.push(b'\n');
        text
    }
}
