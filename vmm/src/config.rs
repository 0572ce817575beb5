//! The VM configuration: parsed from JSON or TOML (or built from CLI flags), unknown keys
//! refused, defaults filled, then [`VmConfig::validate`]d before anything is allocated.
//! Every error names the key it is about.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::arch::{layout, mptable};
use crate::jail::JailMode;
use crate::vsock::VsockConfig;
use crate::vstate::ram_file::HugePages;

/// Errors in a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("Failed to read the config file {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("Invalid JSON config")]
    Json(#[source] serde_json::Error),
    #[error("Invalid TOML config")]
    Toml(#[source] toml::de::Error),
    #[error("Invalid value for `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// Smallest and largest guest memory accepted.
pub const MIN_MEM_MIB: u64 = 2;
pub const MAX_MEM_MIB: u64 = 256 << 10;
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";

fn default_mem_mib() -> u64 {
    128
}
fn default_vcpus() -> u8 {
    1
}
fn default_true() -> bool {
    true
}
fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}
fn default_cid() -> u64 {
    crate::vsock::defs::DEFAULT_GUEST_CID
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// PVH ELF or bzImage.
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line; the VMM appends its `virtio_mmio.device=` entries.
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    #[serde(default = "default_mem_mib")]
    pub mem_mib: u64,
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Where the serial console goes; none means discarded. A file is capped
    /// (`SERIAL_OUT_LIMIT`).
    #[serde(default)]
    pub serial_out: Option<PathBuf>,
    /// An inherited descriptor the serial console is written to instead, uncapped: a
    /// pipe whose reader bounds what it keeps (the shim's rotating copy), so that a VMM
    /// the guest took over holds no file it could grow.
    #[serde(default)]
    pub serial_out_fd: Option<i32>,
    #[serde(default)]
    pub vsock: Option<VsockDeviceConfig>,
    #[serde(default)]
    pub block: Vec<BlockDeviceConfig>,
    #[serde(default)]
    pub net: Vec<NetDeviceConfig>,
    /// virtio-fs devices served by virtiofsd over vhost-user.
    #[serde(default)]
    pub fs: Vec<FsDeviceConfig>,
    /// A vsock device served by an external vhost-user backend (e.g.
    /// `cocoon-vmm vhost-user-vsock`) instead of in-process.
    #[serde(default)]
    pub vhost_user_vsock: Option<VhostUserVsockConfig>,
    /// Seccomp filter and no_new_privs for the VMM process.
    #[serde(default = "default_true")]
    pub seccomp: bool,
    /// Own namespaces and an empty read-only root for the VMM process (`auto`, `on`,
    /// `off`); see [`crate::jail`].
    #[serde(default)]
    pub jail: JailMode,
    /// An inherited, open `/dev/kvm` to use instead of opening it: a VMM started as an
    /// unprivileged uid in a jail that holds no `/dev` (`cocoon-vmm jail-exec`).
    #[serde(default)]
    pub kvm_fd: Option<i32>,
    /// Guest RAM on a huge-page tmpfs of its own (`auto`, `on`, `off`); see
    /// [`crate::vstate::ram_file`].
    #[serde(default)]
    pub huge_pages: HugePages,
    /// An inherited file to use as guest RAM instead of making one (a jailed VMM cannot
    /// mount the huge-page tmpfs; the shim makes it). `huge_pages` then has no say.
    #[serde(default)]
    pub mem_fd: Option<i32>,
    /// ACPI tables (MADT for SMP, DSDT for the virtio devices, S5 power-off). Off: the
    /// MP table and `virtio_mmio.device=` on the command line only.
    #[serde(default = "default_true")]
    pub acpi: bool,
    /// A virtio balloon that takes free page reports: guest RAM the guest frees goes
    /// back to the host (`devices::virtio::balloon`).
    #[serde(default)]
    pub free_page_reporting: bool,
    /// MiB of guest-physical memory a virtio-mem device can plug in while the VM runs
    /// (`devices::virtio::mem`), above all RAM; 0 = no device. The guest gets none of
    /// it until the API asks (`resize_memory`). A multiple of [`HOTPLUG_STEP_MIB`].
    #[serde(default)]
    pub hotplug_mib: u64,
    /// Empty virtio-blk slots the API can put host disks in while the VM runs
    /// (`attach_disk`; [`crate::devices::virtio::block::DiskSlot`]): a microVM has no
    /// bus a device can join after boot.
    #[serde(default)]
    pub block_slots: u8,
}

/// `hotplug_mib` comes in steps of Linux's smallest x86_64 memory block (128 MiB): the
/// guest hot-adds whole blocks, so a region ending inside one could not use its tail.
pub const HOTPLUG_STEP_MIB: u64 = 128;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VsockDeviceConfig {
    #[serde(default = "default_cid")]
    pub guest_cid: u64,
    /// Hybrid vsock: host clients connect here, guest connections to port P go to
    /// `<uds_path>_P`.
    pub uds_path: PathBuf,
    /// An inherited socket already listening at `uds_path` (see `VsockConfig`).
    #[serde(default)]
    pub listener_fd: Option<i32>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BlockDeviceConfig {
    /// A raw disk image.
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// Serial reported to GET_ID (at most 20 bytes).
    #[serde(default)]
    pub id: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetDeviceConfig {
    /// Tap interface to attach to (created if missing; needs CAP_NET_ADMIN). Empty when
    /// `tap_fd` is given.
    #[serde(default)]
    pub tap: String,
    /// An open tap fd inherited from the caller (e.g. a tap in a pod's network namespace,
    /// which this process cannot reach by name), instead of `tap`.
    #[serde(default)]
    pub tap_fd: Option<i32>,
    /// Guest MAC, `aa:bb:cc:dd:ee:ff`; default 02:43:43:00:00:<index>.
    #[serde(default)]
    pub mac: Option<String>,
}

fn default_fs_queue_size() -> u16 {
    1024
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FsDeviceConfig {
    /// virtiofsd's vhost-user socket.
    pub socket: PathBuf,
    /// Mount tag the guest uses (`mount -t virtiofs <tag> ...`), at most 36 bytes.
    pub tag: String,
    #[serde(default = "default_fs_queue_size")]
    pub queue_size: u16,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VhostUserVsockConfig {
    /// The backend's vhost-user socket.
    pub socket: PathBuf,
    #[serde(default = "default_cid")]
    pub guest_cid: u64,
}

impl NetDeviceConfig {
    /// The MAC to use for the `index`-th interface.
    pub fn mac_or_default(&self, index: usize) -> [u8; 6] {
        self.mac
            .as_deref()
            .and_then(crate::devices::virtio::net::parse_mac)
            .unwrap_or([0x02, 0x43, 0x43, 0, 0, index as u8])
    }
}

impl VmConfig {
    /// A config with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: default_cmdline(),
            mem_mib: default_mem_mib(),
            vcpus: default_vcpus(),
            serial_out: None,
            vsock: None,
            block: Vec::new(),
            net: Vec::new(),
            fs: Vec::new(),
            vhost_user_vsock: None,
            seccomp: true,
            jail: JailMode::Auto,
            kvm_fd: None,
            serial_out_fd: None,
            huge_pages: HugePages::Auto,
            mem_fd: None,
            acpi: true,
            free_page_reporting: false,
            hotplug_mib: 0,
            block_slots: 0,
        }
    }

    /// Parses a file, TOML if it ends in `.toml`, JSON otherwise.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_owned(), e))?;
        if path.extension().is_some_and(|e| e == "toml") {
            Self::from_toml(&text)
        } else {
            Self::from_json(&text)
        }
    }

    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        serde_json::from_str(text).map_err(ConfigError::Json)
    }

    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(ConfigError::Toml)
    }

    pub fn mem_bytes(&self) -> u64 {
        self.mem_mib << 20
    }

    /// Bytes of the virtio-mem region (0: no device).
    pub fn hotplug_bytes(&self) -> u64 {
        self.hotplug_mib << 20
    }

    /// Number of virtio-mmio devices this config asks for.
    pub fn virtio_device_count(&self) -> usize {
        self.block.len()
            + self.net.len()
            + self.fs.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.vhost_user_vsock.is_some())
            + usize::from(self.free_page_reporting)
            + usize::from(self.hotplug_mib > 0)
            + usize::from(self.block_slots)
    }

    /// Checks everything that can be checked without creating the VM.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let must_be_file = |key: &str, p: &Path| {
            if p.is_file() {
                Ok(())
            } else {
                Err(invalid(
                    key,
                    format!("{} is not a readable file", p.display()),
                ))
            }
        };
        must_be_file("kernel", &self.kernel)?;
        if let Some(initrd) = &self.initrd {
            must_be_file("initrd", initrd)?;
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(invalid(
                "mem_mib",
                format!("{} is outside {MIN_MEM_MIB}..={MAX_MEM_MIB}", self.mem_mib),
            ));
        }
        if !self.hotplug_mib.is_multiple_of(HOTPLUG_STEP_MIB) || self.hotplug_mib > MAX_MEM_MIB {
            return Err(invalid(
                "hotplug_mib",
                format!(
                    "{} is not a multiple of {HOTPLUG_STEP_MIB} up to {MAX_MEM_MIB}",
                    self.hotplug_mib
                ),
            ));
        }
        if self.vcpus == 0 || self.vcpus > mptable::MAX_VCPUS {
            return Err(invalid(
                "vcpus",
                format!("{} is outside 1..={}", self.vcpus, mptable::MAX_VCPUS),
            ));
        }
        // The VMM adds one `virtio_mmio.device=4K@0x...:N` (~40 bytes) per device.
        let budget = (layout::CMDLINE_MAX_SIZE - 1).saturating_sub(48 * self.virtio_device_count());
        if self.cmdline.len() > budget {
            return Err(invalid("cmdline", format!("longer than {budget} bytes")));
        }
        if self.cmdline.contains('\0') {
            return Err(invalid("cmdline", "contains a NUL byte"));
        }
        if self.virtio_device_count() > layout::MAX_VIRTIO_DEVICES {
            return Err(invalid(
                "block",
                format!("at most {} virtio devices", layout::MAX_VIRTIO_DEVICES),
            ));
        }
        for (i, b) in self.block.iter().enumerate() {
            must_be_file(&format!("block[{i}].path"), &b.path)?;
            if b.id.len() > crate::devices::virtio::block::ID_BYTES {
                return Err(invalid(format!("block[{i}].id"), "longer than 20 bytes"));
            }
        }
        if self.kvm_fd.is_some_and(|fd| fd < 3) {
            return Err(invalid("kvm_fd", "needs an fd above 2"));
        }
        if let Some(fd) = self.serial_out_fd {
            if fd < 3 || self.serial_out.is_some() {
                return Err(invalid(
                    "serial_out_fd",
                    "needs an fd above 2 and no serial_out",
                ));
            }
        }
        if self.mem_fd.is_some_and(|fd| fd < 3) {
            return Err(invalid("mem_fd", "needs an fd above 2"));
        }
        if self
            .vsock
            .as_ref()
            .and_then(|v| v.listener_fd)
            .is_some_and(|fd| fd < 3)
        {
            return Err(invalid("vsock.listener_fd", "needs an fd above 2"));
        }
        for (i, n) in self.net.iter().enumerate() {
            if let Some(fd) = n.tap_fd {
                if !n.tap.is_empty() || fd < 3 {
                    return Err(invalid(
                        format!("net[{i}].tap_fd"),
                        "needs an fd above 2 and no tap name",
                    ));
                }
            } else if n.tap.is_empty() || n.tap.len() > 15 || n.tap.contains(['\0', '/']) {
                return Err(invalid(
                    format!("net[{i}].tap"),
                    "must be 1-15 bytes, no '/'",
                ));
            }
            if let Some(mac) = &n.mac {
                if crate::devices::virtio::net::parse_mac(mac).is_none() {
                    return Err(invalid(
                        format!("net[{i}].mac"),
                        format!("{mac:?} is not aa:bb:cc:dd:ee:ff"),
                    ));
                }
            }
        }
        for (i, f) in self.fs.iter().enumerate() {
            if f.tag.is_empty() || f.tag.len() > 36 {
                return Err(invalid(format!("fs[{i}].tag"), "must be 1-36 bytes"));
            }
            if !f.queue_size.is_power_of_two() {
                return Err(invalid(
                    format!("fs[{i}].queue_size"),
                    "must be a power of two",
                ));
            }
        }
        if self.vsock.is_some() && self.vhost_user_vsock.is_some() {
            return Err(invalid(
                "vhost_user_vsock",
                "only one of vsock and vhost_user_vsock",
            ));
        }
        if let Some(v) = &self.vhost_user_vsock {
            if !(crate::vsock::defs::MIN_GUEST_CID..=crate::vsock::defs::MAX_GUEST_CID)
                .contains(&v.guest_cid)
            {
                return Err(invalid(
                    "vhost_user_vsock.guest_cid",
                    format!("{} is reserved", v.guest_cid),
                ));
            }
        }
        if let Some(v) = &self.vsock {
            v.to_vsock_config()
                .validate()
                .map_err(|e| invalid("vsock", e.to_string()))?;
        }
        Ok(())
    }
}

impl VsockDeviceConfig {
    pub fn to_vsock_config(&self) -> VsockConfig {
        VsockConfig {
            guest_cid: self.guest_cid,
            uds_path: self.uds_path.clone(),
            connect_timeout: Duration::from_secs(2),
            max_connections: crate::vsock::defs::DEFAULT_MAX_CONNECTIONS,
            listener_fd: self.listener_fd,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel() -> tempfile::NamedTempFile {
        tempfile::NamedTempFile::new().unwrap()
    }

    #[test]
    fn json_and_toml_fill_defaults() {
        let k = kernel();
        let json = format!(r#"{{"kernel": "{}"}}"#, k.path().display());
        let c = VmConfig::from_json(&json).unwrap();
        assert_eq!((c.mem_mib, c.vcpus, c.seccomp), (128, 1, true));
        c.validate().unwrap();
        let toml = format!(
            "kernel = \"{}\"\nmem_mib = 64\n[vsock]\nuds_path = \"/tmp/v\"\n",
            k.path().display()
        );
        let c = VmConfig::from_toml(&toml).unwrap();
        assert_eq!(c.mem_mib, 64);
        assert_eq!(c.vsock.as_ref().unwrap().guest_cid, 3);
        c.validate().unwrap();
    }

    #[test]
    fn hotplug_mib_defaults_to_no_device_and_takes_whole_steps() {
        let k = kernel();
        let json = format!(r#"{{"kernel": "{}"}}"#, k.path().display());
        let c = VmConfig::from_json(&json).unwrap();
        assert_eq!((c.hotplug_mib, c.hotplug_bytes()), (0, 0));
        let before = c.virtio_device_count();
        let json = format!(
            r#"{{"kernel": "{}", "hotplug_mib": 512}}"#,
            k.path().display()
        );
        let c = VmConfig::from_json(&json).unwrap();
        c.validate().unwrap();
        assert_eq!(c.hotplug_bytes(), 512 << 20);
        assert_eq!(c.virtio_device_count(), before + 1);
        let mut c = c;
        c.hotplug_mib = MAX_MEM_MIB;
        c.validate().unwrap();
        for bad in [1, 127, 129, 1000, MAX_MEM_MIB + HOTPLUG_STEP_MIB] {
            c.hotplug_mib = bad;
            match c.validate() {
                Err(e @ ConfigError::Invalid { .. }) => {
                    assert!(e.to_string().contains("`hotplug_mib`"), "{e}")
                }
                other => panic!("hotplug_mib = {bad}: {other:?}"),
            }
        }
        let e = VmConfig::from_json(r#"{"kernel": "/k", "hotplug": 5}"#).unwrap_err();
        assert!(format!("{e:?}").contains("hotplug"), "{e:?}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = VmConfig::from_json(r#"{"kernel": "/k", "memory": 5}"#).unwrap_err();
        assert!(format!("{:?}", e).contains("memory"), "{e:?}");
        let e = VmConfig::from_toml("kernel = \"/k\"\n[vsock]\nuds = \"x\"\n").unwrap_err();
        assert!(format!("{:?}", e).contains("uds"), "{e:?}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let k = kernel();
        let check = |f: &dyn Fn(&mut VmConfig), key: &str| {
            let mut c = VmConfig::new(k.path());
            f(&mut c);
            match c.validate() {
                Err(ConfigError::Invalid { key: got, .. }) => assert_eq!(got, key),
                other => panic!("expected error on {key}, got {other:?}"),
            }
        };
        check(&|c| c.kernel = "/nonexistent".into(), "kernel");
        check(&|c| c.initrd = Some("/nonexistent".into()), "initrd");
        check(&|c| c.mem_mib = 0, "mem_mib");
        check(&|c| c.hotplug_mib = 100, "hotplug_mib");
        check(&|c| c.hotplug_mib = MAX_MEM_MIB + 128, "hotplug_mib");
        check(&|c| c.vcpus = 0, "vcpus");
        check(&|c| c.vcpus = 200, "vcpus");
        check(&|c| c.cmdline = "x".repeat(4096), "cmdline");
        check(
            &|c| {
                c.block.push(BlockDeviceConfig {
                    path: "/nonexistent".into(),
                    read_only: false,
                    id: String::new(),
                })
            },
            "block[0].path",
        );
        check(
            &|c| {
                c.vsock = Some(VsockDeviceConfig {
                    guest_cid: 2,
                    uds_path: "/tmp/x".into(),
                    listener_fd: None,
                })
            },
            "vsock",
        );
        check(
            &|c| {
                c.net.push(NetDeviceConfig {
                    tap: "tap0".into(),
                    tap_fd: None,
                    mac: Some("nope".into()),
                })
            },
            "net[0].mac",
        );
        check(
            &|c| {
                c.net.push(NetDeviceConfig {
                    tap: "tap0".into(),
                    tap_fd: Some(5),
                    mac: None,
                })
            },
            "net[0].tap_fd",
        );
    }
}
