//! Cocoon's configuration: `/etc/cocoon/config.toml`, or the file named by
//! `COCOON_CONFIG`. Parsed strictly (an unknown key is an error naming it),
//! defaults filled in, then `validate()`d before anything is allocated.
//! Every key is documented in `docs/config.toml`.

use std::path::{Path, PathBuf};

pub use cocoon_vmm::vstate::ram_file::HugePages;
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/cocoon/config.toml";
pub const CONFIG_ENV: &str = "COCOON_CONFIG";

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("invalid config file {0}")]
    Parse(PathBuf, #[source] toml::de::Error),
    #[error("invalid config value for `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// Which VMM runs the pod VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum HypervisorKind {
    /// cocoon-vmm when the host has hardware virtualization, QEMU otherwise; the choice
    /// and its reason are logged.
    #[default]
    Auto,
    Qemu,
    CocoonVmm,
}

/// How QEMU executes guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when the host has hardware virtualization, TCG otherwise.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// QEMU machine type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Machine {
    #[default]
    Microvm,
    Pc,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub hypervisor: HypervisorKind,
    pub vm: VmConfig,
    pub qemu: QemuConfig,
    pub paths: PathsConfig,
    pub debug: DebugConfig,
    pub jail: JailConfig,
    pub logs: LogsConfig,
}

/// Where containers' output is written on the host by the shim itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogsConfig {
    /// A `file://` log URI's file (`ctr run --log-uri`) is rotated to `<file>.1` when it
    /// would grow past this many KiB, so one process's log holds at most twice it on
    /// disk. runc's grows without bound; here the guest writes it.
    pub file_max_kib: u64,
}

impl Default for LogsConfig {
    fn default() -> Self {
        Self {
            file_max_kib: 64 * 1024,
        }
    }
}

impl LogsConfig {
    /// The limit in bytes.
    pub fn file_limit(&self) -> u64 {
        self.file_max_kib * 1024
    }
}

/// Jails for a pod's host processes. QEMU and its vsock backend run through
/// `cocoon-vmm jail-exec`: own mount, network, IPC and UTS namespaces, a read-only root
/// holding only what they need, resource limits, and a uid of the pod's own from this
/// range (the gid of the same number, no other group but the owner group of `/dev/kvm`
/// under KVM). cocoon-vmm jails itself (`--jail on`). A jail that cannot be set up fails
/// the pod. Nothing in the range may be a real user's.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JailConfig {
    pub enabled: bool,
    pub uid_base: u32,
    pub uid_count: u32,
    /// One byte per uid, locked by the pod holding it (see `hypervisor::identity`).
    pub lock_file: PathBuf,
    /// virtiofsd as root of a user namespace of the pod's own instead of host root
    /// (`hypervisor::userns`): the pod's share is idmapped into it, so a filesystem
    /// shared into a pod must support idmapped mounts (ext4, xfs, btrfs, tmpfs from
    /// Linux 6.3), and overlay layers must (Linux ≥ 5.19).
    /// Only with `enabled`.
    pub virtiofsd: bool,
    /// The host ids of those namespaces: `share_ranges` ranges of 65 536 from here,
    /// one per live pod. Nothing in them may be a real user's or overlap `uid_base`.
    pub share_id_base: u32,
    pub share_ranges: u32,
    /// One byte per range, as `lock_file`.
    pub share_lock_file: PathBuf,
}

/// The longest path a unix socket may have (`sun_path`, less its NUL).
const SOCKET_PATH_MAX: usize = 107;

/// The longest `paths.run_dir`: the deepest socket below it is a VM template's while it
/// is made, `/+templates/<32 hex>.making/` and a socket name of up to 15 bytes
/// (`vsock.sock_<port>`), 67 bytes.
pub const MAX_RUN_DIR: usize = SOCKET_PATH_MAX - 67;

impl Default for JailConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            uid_base: 2_000_000_000,
            uid_count: 65_536,
            lock_file: PathBuf::from("/run/cocoon/uids.lock"),
            virtiofsd: true,
            share_id_base: 1_000_000_000,
            share_ranges: 4096,
            share_lock_file: PathBuf::from("/run/cocoon/share-ids.lock"),
        }
    }
}

/// Operator aids, all off by default.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DebugConfig {
    /// A shell in each pod's guest, outside its containers, for `cocoon debug <pod>`
    /// (`cocoon.debug=1` on the guest's command line; it also arms the agent's
    /// fault-injection hook). Anyone who can reach the pod's vsock socket on the host
    /// (root) gets root in the guest. Confidential pods never get it.
    pub console: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmConfig {
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Guest kernel; empty means the image's (see `kernel_path`).
    pub kernel: PathBuf,
    /// Guest initramfs; empty means `<image_dir>/initramfs.cpio`.
    pub initrd: PathBuf,
    /// Appended to the kernel command line Cocoon builds.
    pub kernel_params: String,
    /// How long to wait for the agent to answer after launch.
    pub boot_timeout_ms: u64,
    /// Deadline for one agent call.
    pub call_timeout_ms: u64,
    /// Guest RAM on a huge-page tmpfs of its own (both VMMs), so the guest gets 2 MiB
    /// pages whatever the node's shmem THP policy (`auto`: where it can be made, logged;
    /// `on`: required; `off`: a memfd). The boot RAM: memory a `pc` VM grows into stays
    /// an unreserved memfd on QEMU.
    pub huge_pages: HugePages,
    /// A virtio balloon taking free page reports (both VMMs): guest RAM the guest frees
    /// goes back to the host instead of staying touched for the pod's life. The guest
    /// keeps its size: nothing is ever ballooned out of it.
    pub free_page_reporting: bool,
    /// VM templates (cocoon-vmm only): the first pod of a shape (kernel, initramfs,
    /// command line, memory, vCPUs, share tag) boots a template VM to its agent's ready
    /// line and saves it under `<run_dir>/templates/`; later pods of that shape start
    /// from the saved VM instead of booting (`hypervisor::template`).
    pub templates: bool,
    /// A Kubernetes pod's VM gets, beyond `vcpus` and `memory_mib`, the sum of its
    /// containers' CPU and memory limits (kubelet's sandbox resources, which containerd
    /// passes on), capped at the host's; as Kata's static sandbox sizing. Without it a
    /// container may be killed by the guest's OOM killer below its own limit.
    pub size_from_pod_limits: bool,
    /// The most vCPUs and memory (MiB) `size_from_pod_limits` may give a VM; 0: the
    /// host's online CPUs and its memory.
    pub max_vcpus: u32,
    pub max_memory_mib: u32,
    /// A pod's VM gets `max_vcpus` vCPUs, only those its size asks online at boot (the
    /// guest kernel's `maxcpus=`); CPU limits raised later (UpdateContainerResources)
    /// bring more online (`shimv2::sizing::CpuRoom`). Needs `size_from_pod_limits`; a
    /// VM sized by its `io.cocoon.vm.vcpus` annotation keeps that size.
    pub hotplug_vcpus: bool,
    /// A pod's VM gets a virtio-mem device with room up to `max_memory_mib`; memory
    /// limits raised later (UpdateContainerResources) have the guest plug more
    /// (`shimv2::sizing::MemRoom`). Needs `size_from_pod_limits` and `max_memory_mib`;
    /// a VM sized by its `io.cocoon.vm.memory_mib` annotation keeps that size.
    pub hotplug_memory: bool,
    /// Empty disk slots a pod's VM gets at boot (cocoon-vmm, QEMU's microvm), for the
    /// raw block devices its containers name later (`volumeDevices`, `ctr run
    /// --device`): a microVM has no bus a disk can join after boot. At most
    /// [`MAX_BLOCK_SLOTS`]; 0: such containers are refused. QEMU's `pc` plugs disks
    /// instead.
    pub block_slots: u8,
}

/// The most disk slots a cocoon-vmm VM gets (each an IRQ of the IOAPIC's).
pub const MAX_BLOCK_SLOTS: u8 = 8;
/// The largest `[logs] file_max_kib`: 16 GiB.
pub const MAX_LOG_FILE_KIB: u64 = 16 * 1024 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QemuConfig {
    pub binary: PathBuf,
    pub machine: Machine,
    pub accel: Accel,
    /// Extra arguments appended verbatim (for debugging).
    pub extra_args: Vec<String>,
    /// Confine QEMU: its own seccomp filter (`-sandbox on` with every deny group),
    /// no capabilities (bounding set emptied), no_new_privs. A QEMU without seccomp
    /// support then fails to start, with its reason in the pod's error.
    pub confine: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PathsConfig {
    /// Per-VM runtime state (sockets, console log); one subdirectory per VM.
    pub run_dir: PathBuf,
    /// Where `cocoon image build` / `make install` put the guest image.
    pub image_dir: PathBuf,
    /// The `cocoon-vmm` binary (also the vhost-user vsock backend); empty
    /// means next to the running executable, then `$PATH`.
    pub vmm_binary: PathBuf,
    /// virtiofsd, which shares container filesystems into the guest; empty
    /// means next to the running executable, then `$PATH`.
    pub virtiofsd: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            hypervisor: HypervisorKind::Auto,
            vm: VmConfig::default(),
            qemu: QemuConfig::default(),
            paths: PathsConfig::default(),
            debug: DebugConfig::default(),
            jail: JailConfig::default(),
            logs: LogsConfig::default(),
        }
    }
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            vcpus: 1,
            memory_mib: 256,
            kernel: PathBuf::new(),
            initrd: PathBuf::new(),
            kernel_params: String::new(),
            boot_timeout_ms: 30_000,
            call_timeout_ms: 10_000,
            huge_pages: HugePages::Auto,
            free_page_reporting: true,
            templates: false,
            size_from_pod_limits: true,
            max_vcpus: 0,
            max_memory_mib: 0,
            hotplug_vcpus: false,
            hotplug_memory: false,
            block_slots: 4,
        }
    }
}

impl Default for QemuConfig {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("qemu-system-x86_64"),
            machine: Machine::Microvm,
            accel: Accel::Auto,
            extra_args: Vec::new(),
            confine: true,
        }
    }
}

impl Default for PathsConfig {
    fn default() -> Self {
        Self {
            run_dir: PathBuf::from("/run/cocoon"),
            image_dir: default_image_dir(),
            vmm_binary: PathBuf::new(),
            virtiofsd: PathBuf::new(),
        }
    }
}

/// `<prefix>/share/cocoon` for an executable installed as `<prefix>/bin/x`.
fn default_image_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("share/cocoon")))
        .unwrap_or_else(|| PathBuf::from("/usr/local/share/cocoon"))
}

impl Config {
    /// Loads the config named by `COCOON_CONFIG`, else the default path; a
    /// missing default file means all defaults, a missing named file is an error.
    pub fn load() -> Result<Self, ConfigError> {
        match Self::node_path() {
            Some(p) => Self::from_file(&p),
            None => {
                let c = Self::default();
                c.validate()?;
                Ok(c)
            }
        }
    }

    /// The node's config file: `$COCOON_CONFIG`, else `/etc/cocoon/config.toml` where it
    /// exists; none means the defaults.
    pub fn node_path() -> Option<std::path::PathBuf> {
        match std::env::var_os(CONFIG_ENV) {
            Some(p) => Some(p.into()),
            None => Some(std::path::PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|p| p.exists()),
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.into(), e))?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse(_, src) => ConfigError::Parse(path.into(), src),
            other => other,
        })
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let c: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse(PathBuf::from("<string>"), e))?;
        c.validate()?;
        Ok(c)
    }

    /// The first word of `vm.kernel_params` that sets one of `names` (`name=...`).
    fn kernel_param(&self, names: &[&str]) -> Option<&str> {
        self.vm.kernel_params.split_whitespace().find(|w| {
            w.split_once('=')
                .is_some_and(|(name, _)| names.contains(&name))
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.into(),
            })
        };
        if !(4..=MAX_LOG_FILE_KIB).contains(&self.logs.file_max_kib) {
            return bad(
                "logs.file_max_kib",
                "must be between 4 and 16777216 (16 GiB)",
            );
        }
        if self.vm.vcpus == 0 || self.vm.vcpus > 64 {
            return bad("vm.vcpus", "must be between 1 and 64");
        }
        if self.vm.memory_mib < 64 || self.vm.memory_mib > 1024 * 1024 {
            return bad("vm.memory_mib", "must be between 64 and 1048576");
        }
        if self.vm.max_vcpus > 64 {
            return bad("vm.max_vcpus", "must be between 0 (the host's) and 64");
        }
        if self.vm.block_slots > MAX_BLOCK_SLOTS {
            return bad("vm.block_slots", "must be between 0 and 8");
        }
        if self.vm.max_memory_mib != 0 && !(64..=1024 * 1024).contains(&self.vm.max_memory_mib) {
            return bad(
                "vm.max_memory_mib",
                "must be 0 (the host's) or between 64 and 1048576",
            );
        }
        if self.vm.hotplug_vcpus && !self.vm.size_from_pod_limits {
            return bad(
                "vm.hotplug_vcpus",
                "needs vm.size_from_pod_limits: the pod's limits are what bring vCPUs online",
            );
        }
        if self.vm.hotplug_memory && !self.vm.size_from_pod_limits {
            return bad(
                "vm.hotplug_memory",
                "needs vm.size_from_pod_limits: the pod's limits are what plug memory",
            );
        }
        // "auto" picks QEMU on hosts without hardware virtualization: refused here, not
        // at every pod's start.
        if self.vm.hotplug_memory
            && self.hypervisor != HypervisorKind::CocoonVmm
            && self.qemu.machine == Machine::Microvm
        {
            return bad(
                "vm.hotplug_memory",
                "with QEMU (hypervisor = \"qemu\", or \"auto\" on a host without \
                 hardware virtualization) needs qemu.machine = \"pc\": QEMU 7.2's microvm has \
                 no region for hot-added memory; or set hypervisor = \"cocoon-vmm\"",
            );
        }
        if self.vm.hotplug_memory && self.vm.max_memory_mib == 0 {
            return bad(
                "vm.hotplug_memory",
                "needs vm.max_memory_mib set: the room to grow up to it is mapped from the \
                 start, and a hostile guest can make the host back all of it (its pod's \
                 memory cgroup is the bound), so it must be chosen, not the host's memory",
            );
        }
        if self.vm.hotplug_vcpus && self.kernel_param(&["maxcpus", "nr_cpus"]).is_some() {
            return bad(
                "vm.kernel_params",
                "must not set maxcpus= or nr_cpus= with vm.hotplug_vcpus, which sets the \
                 vCPUs online at boot itself",
            );
        }
        if self.vm.boot_timeout_ms == 0 {
            return bad("vm.boot_timeout_ms", "must be greater than 0");
        }
        if self.vm.call_timeout_ms == 0 {
            return bad("vm.call_timeout_ms", "must be greater than 0");
        }
        if self.vm.templates && self.hypervisor == HypervisorKind::Qemu {
            return bad(
                "vm.templates",
                "needs hypervisor = \"cocoon-vmm\": QEMU 7.2 cannot save a VM with \
                 vhost-user devices (vsock, virtio-fs)",
            );
        }
        if self.vm.kernel_params.contains('\n') {
            return bad("vm.kernel_params", "must be a single line");
        }
        if let Some(w) = self.kernel_param(&["init", "rdinit"]) {
            return bad(
                "vm.kernel_params",
                &format!(
                    "must not name the guest's init ({w}): it is Cocoon's agent, and a VM \
                     running another would never answer"
                ),
            );
        }
        if self.paths.run_dir.as_os_str().is_empty() || !self.paths.run_dir.is_absolute() {
            return bad("paths.run_dir", "must be an absolute path");
        }
        let len = self.paths.run_dir.as_os_str().len();
        if len > MAX_RUN_DIR {
            return bad(
                "paths.run_dir",
                &format!(
                    "is {len} bytes long, at most {MAX_RUN_DIR}: sockets are made up to \
                     {} bytes below it (a VM template's virtiofsd), and a unix socket's \
                     path holds {SOCKET_PATH_MAX}",
                    SOCKET_PATH_MAX - MAX_RUN_DIR
                ),
            );
        }
        let (base, count) = (self.jail.uid_base, self.jail.uid_count);
        if base == 0 || count == 0 || base.checked_add(count).is_none_or(|e| e == u32::MAX) {
            return bad(
                "jail.uid_base",
                "with jail.uid_count must be a non-empty range of non-root uids",
            );
        }
        if !self.jail.lock_file.is_absolute() {
            return bad("jail.lock_file", "must be an absolute path");
        }
        if !self.jail.share_lock_file.is_absolute() {
            return bad("jail.share_lock_file", "must be an absolute path");
        }
        let ids =
            u64::from(self.jail.share_ranges) * u64::from(crate::hypervisor::userns::IDS_PER_POD);
        let (sb, se) = (
            u64::from(self.jail.share_id_base),
            u64::from(self.jail.share_id_base) + ids,
        );
        let (ub, ue) = (u64::from(base), u64::from(base) + u64::from(count));
        if sb == 0 || ids == 0 || se >= u64::from(u32::MAX) || (sb < ue && ub < se) {
            return bad(
                "jail.share_id_base",
                "with jail.share_ranges ranges of 65536 must be non-root ids below 2^32 - 1 \
                 that do not overlap jail.uid_base + jail.uid_count",
            );
        }
        Ok(())
    }

    /// `vm.kernel`, or else the image's: its PVH ELF where its manifest names one
    /// (Cocoon's own kernel; booted without real-mode setup or decompression), its
    /// bzImage otherwise.
    pub fn kernel_path(&self) -> PathBuf {
        if !self.vm.kernel.as_os_str().is_empty() {
            return self.vm.kernel.clone();
        }
        let dir = &self.paths.image_dir;
        let pvh = self
            .image_manifest()
            .and_then(|m| m.kernel.pvh_file)
            // A plain name in the image directory, nothing else.
            .filter(|f| !f.is_empty() && !f.contains('/') && f != "..");
        dir.join(pvh.as_deref().unwrap_or(cocoon_rootfs::KERNEL_FILE))
    }

    /// The image's manifest, where `paths.image_dir` has one that parses.
    fn image_manifest(&self) -> Option<cocoon_rootfs::Manifest> {
        let bytes = std::fs::read(self.paths.image_dir.join(cocoon_rootfs::MANIFEST_FILE));
        serde_json::from_slice(&bytes.ok()?).ok()
    }

    /// Whether the kernel pods boot takes virtio-mmio devices from its command line, so
    /// that QEMU's microvm can leave ACPI out: the image's own kernel (either form),
    /// where its manifest says so (Cocoon's kernel; not Debian's). Any other kernel is
    /// not assumed to.
    pub fn kernel_takes_virtio_mmio_cmdline(&self) -> bool {
        let Some(m) = self.image_manifest() else {
            return false;
        };
        let (dir, kernel) = (&self.paths.image_dir, self.kernel_path());
        m.kernel.virtio_mmio_cmdline
            && (kernel == dir.join(&m.kernel.file)
                || m.kernel.pvh_file.is_some_and(|f| kernel == dir.join(f)))
    }

    pub fn initrd_path(&self) -> PathBuf {
        if self.vm.initrd.as_os_str().is_empty() {
            self.paths.image_dir.join("initramfs.cpio")
        } else {
            self.vm.initrd.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The image's PVH ELF when its manifest names one, its bzImage otherwise, and
    /// `vm.kernel` over both.
    #[test]
    fn the_kernel_is_the_images_pvh_elf_where_it_has_one() {
        let d = tempfile::tempdir().unwrap();
        let mut c = Config::default();
        c.paths.image_dir = d.path().to_owned();
        assert_eq!(c.kernel_path(), d.path().join("vmlinuz"), "no manifest");
        let manifest = |pvh: Option<&str>| {
            serde_json::json!({
                "format": 1, "id": "x",
                "kernel": {"file": "vmlinuz", "sha256": "", "release": "6.12",
                    "package": {"package": "p", "version": "1", "deb_file": "", "deb_sha256": ""},
                    "pvh_file": pvh, "pvh_sha256": pvh.map(|_| "")},
                "initramfs": {"file": "initramfs.cpio", "sha256": "", "compression": "none",
                    "agent_sha256": "", "modules": [], "builtin_modules": []}
            })
            .to_string()
        };
        let path = d.path().join("manifest.json");
        std::fs::write(&path, manifest(Some("vmlinux"))).unwrap();
        assert_eq!(c.kernel_path(), d.path().join("vmlinux"));
        std::fs::write(&path, manifest(None)).unwrap();
        assert_eq!(c.kernel_path(), d.path().join("vmlinuz"));
        // A manifest naming anything but a plain file of the image is not followed.
        std::fs::write(&path, manifest(Some("../etc/passwd"))).unwrap();
        assert_eq!(c.kernel_path(), d.path().join("vmlinuz"));
        c.vm.kernel = "/k".into();
        assert_eq!(c.kernel_path(), std::path::PathBuf::from("/k"));
    }

    /// A microvm leaves ACPI out only for the image's own kernel, either form, and only
    /// where the manifest says it takes virtio-mmio devices on its command line.
    #[test]
    fn only_the_images_kernel_is_known_to_take_virtio_mmio_devices_by_cmdline() {
        let d = tempfile::tempdir().unwrap();
        let mut c = Config::default();
        c.paths.image_dir = d.path().to_owned();
        assert!(!c.kernel_takes_virtio_mmio_cmdline(), "no manifest");
        let manifest = |cmdline: Option<bool>| {
            let mut kernel = serde_json::json!({"file": "vmlinuz", "sha256": "",
                "release": "6.12", "pvh_file": "vmlinux", "pvh_sha256": "",
                "package": {"package": "p", "version": "1", "deb_file": "", "deb_sha256": ""}});
            if let Some(b) = cmdline {
                kernel["virtio_mmio_cmdline"] = b.into();
            }
            serde_json::json!({"format": 1, "id": "x", "kernel": kernel,
                "initramfs": {"file": "initramfs.cpio", "sha256": "", "compression": "none",
                    "agent_sha256": "", "modules": [], "builtin_modules": []}})
            .to_string()
        };
        let path = d.path().join("manifest.json");
        std::fs::write(&path, manifest(Some(true))).unwrap();
        assert!(c.kernel_takes_virtio_mmio_cmdline());
        for k in ["vmlinuz", "vmlinux"] {
            c.vm.kernel = d.path().join(k);
            assert!(c.kernel_takes_virtio_mmio_cmdline(), "{k}");
        }
        c.vm.kernel = "/boot/vmlinuz".into();
        assert!(!c.kernel_takes_virtio_mmio_cmdline(), "a kernel of its own");
        c.vm.kernel = Default::default();
        // Debian's kernel, or a manifest from before the field.
        for cmdline in [Some(false), None] {
            std::fs::write(&path, manifest(cmdline)).unwrap();
            assert!(!c.kernel_takes_virtio_mmio_cmdline(), "{cmdline:?}");
        }
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.hypervisor, HypervisorKind::Auto);
        assert_eq!(c.vm.vcpus, 1);
        assert_eq!(c.qemu.accel, Accel::Auto);
    }

    #[test]
    fn values_are_read() {
        let c = Config::parse(
            "hypervisor = \"cocoon-vmm\"\n[vm]\nvcpus = 2\nmemory_mib = 512\n[qemu]\naccel = \"tcg\"\nmachine = \"pc\"\n",
        )
        .unwrap();
        assert_eq!(c.hypervisor, HypervisorKind::CocoonVmm);
        assert_eq!(c.vm.vcpus, 2);
        assert_eq!(c.vm.memory_mib, 512);
        assert_eq!(c.qemu.accel, Accel::Tcg);
        assert_eq!(c.qemu.machine, Machine::Pc);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse("[vm]\nvcpu = 2\n").unwrap_err();
        let msg = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(msg.contains("vcpu"), "{msg}");
        let err = Config::parse("colour = 1\n").unwrap_err();
        let msg = format!("{}", std::error::Error::source(&err).unwrap());
        assert!(msg.contains("colour"), "{msg}");
    }

    #[test]
    fn bad_values_are_named() {
        let err = Config::parse("[logs]\nfile_max_kib = 0\n").unwrap_err();
        assert!(err.to_string().contains("logs.file_max_kib"), "{err}");
        assert_eq!(Config::parse("").unwrap().logs.file_limit(), 64 << 20);
        let err = Config::parse("[vm]\nvcpus = 0\n").unwrap_err();
        assert!(err.to_string().contains("vm.vcpus"), "{err}");
        let err = Config::parse("[vm]\nmemory_mib = 1\n").unwrap_err();
        assert!(err.to_string().contains("vm.memory_mib"), "{err}");
        let err = Config::parse("[vm]\nblock_slots = 9\n").unwrap_err();
        assert!(err.to_string().contains("vm.block_slots"), "{err}");
        assert_eq!(Config::parse("").unwrap().vm.block_slots, 4);
        let err = Config::parse("[qemu]\naccel = \"hvf\"\n").unwrap_err();
        let msg = format!("{}", std::error::Error::source(&err).unwrap());
        assert!(msg.contains("hvf"), "{msg}");
        let err = Config::parse("[paths]\nrun_dir = \"relative\"\n").unwrap_err();
        assert!(err.to_string().contains("paths.run_dir"), "{err}");
        // Sockets below it must fit a socket's path.
        let at_most = format!("/{}", "r".repeat(MAX_RUN_DIR - 1));
        assert!(Config::parse(&format!("[paths]\nrun_dir = {at_most:?}\n")).is_ok());
        let err = Config::parse(&format!("[paths]\nrun_dir = \"{at_most}r\"\n")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("paths.run_dir") && msg.contains("at most 40"),
            "{msg}"
        );
        let err = Config::parse("hypervisor = \"qemu\"\n[vm]\ntemplates = true\n").unwrap_err();
        assert!(err.to_string().contains("vm.templates"), "{err}");
        assert!(err.to_string().contains("cocoon-vmm"), "{err}");
        let ok = Config::parse("hypervisor = \"cocoon-vmm\"\n[vm]\ntemplates = true\n");
        assert!(ok.is_ok_and(|c| c.vm.templates));
        let err = Config::parse("[vm]\nhotplug_vcpus = true\nsize_from_pod_limits = false\n")
            .unwrap_err();
        assert!(err.to_string().contains("vm.hotplug_vcpus"), "{err}");
        let err =
            Config::parse("[vm]\nhotplug_vcpus = true\nkernel_params = \"quiet maxcpus=4\"\n")
                .unwrap_err();
        assert!(err.to_string().contains("vm.kernel_params"), "{err}");
        for init in ["rdinit=/bin/sh", "init=/sbin/init"] {
            let err =
                Config::parse(&format!("[vm]\nkernel_params = \"quiet {init}\"\n")).unwrap_err();
            assert!(err.to_string().contains(init), "{err}");
        }
        assert!(Config::parse("[vm]\nkernel_params = \"quiet cocoon.log=debug\"\n").is_ok());
        assert!(Config::parse("[vm]\nhotplug_vcpus = true\n").is_ok_and(|c| c.vm.hotplug_vcpus));
        let grows = "[vm]\nhotplug_memory = true\nmax_memory_mib = 4096\n";
        let with = |extra: &str| Config::parse(&format!("{grows}{extra}"));
        let err = with("size_from_pod_limits = false\n").unwrap_err();
        assert!(err.to_string().contains("vm.hotplug_memory"), "{err}");
        // Templates are made before anything is plugged (cocoon-vmm; QEMU has none).
        let tpl = format!("hypervisor = \"cocoon-vmm\"\n{grows}templates = true\n");
        assert!(Config::parse(&tpl).is_ok_and(|c| c.vm.templates && c.vm.hotplug_memory));
        // A microvm cannot grow, whether QEMU is asked for or picked by "auto".
        for hv in ["qemu", "auto"] {
            let err = Config::parse(&format!("hypervisor = \"{hv}\"\n{grows}")).unwrap_err();
            assert!(err.to_string().contains("machine = \"pc\""), "{hv}: {err}");
        }
        let pc = "[qemu]\nmachine = \"pc\"\n";
        assert!(with(pc).is_ok_and(|c| c.vm.hotplug_memory));
        assert!(Config::parse(&format!("hypervisor = \"cocoon-vmm\"\n{grows}")).is_ok());
        // The room is chosen, never the host's whole memory.
        let err = Config::parse(&format!("[vm]\nhotplug_memory = true\n{pc}")).unwrap_err();
        assert!(err.to_string().contains("max_memory_mib"), "{err}");
        // The share's id ranges may not reach the pod uids nor pass 2^32.
        for bad in [
            "share_id_base = 1999999999",
            "share_id_base = 0",
            "share_id_base = 4100000000",
            "share_ranges = 0",
        ] {
            let err = Config::parse(&format!("[jail]\n{bad}\n")).unwrap_err();
            assert!(
                err.to_string().contains("jail.share_id_base"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn missing_named_file_is_an_error() {
        let err = Config::from_file(Path::new("/nonexistent/cocoon.toml")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/cocoon.toml"),
            "{err}"
        );
    }

    #[test]
    fn documented_default_file_parses() {
        let text = include_str!("../../docs/config.toml");
        Config::parse(text).unwrap();
    }
}
