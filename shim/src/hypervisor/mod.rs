//! The seam between Cocoon and the VMM that runs a pod VM. A `Hypervisor`
//! turns a validated `VmSpec` into a running `Vm`: a set of host processes
//! (the VMM and its device backends) plus a per-VM run directory. `Vm` owns
//! them and takes them all down again, also on early return or drop.

pub mod cocoon_vmm;
pub mod confidential;
pub mod console;
pub mod disk_slots;
pub mod disks;
pub mod guest_ram;
mod host_sysctls;
pub mod identity;
mod launch;
pub mod memctl;
mod microvm;
mod pod_jail;
pub(crate) mod process;
pub mod qemu;
pub mod qemu_slots;
pub mod qmp;
pub mod slots;
pub mod template;
pub mod userns;
pub mod watch;

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use thiserror::Error;

pub use host_sysctls::{host_sysctl, HOST_SYSCTLS};
#[cfg(test)]
pub(crate) use launch::virtiofsd_lacks_within;
pub use launch::{virtiofsd_lacks, VIRTIOFSD_OPTIONS};
pub use process::{find_binary, VmProcesses};

use crate::check::{self, KvmKind};
use crate::config::{Accel, Config, HypervisorKind};

#[derive(Debug, Error)]
pub enum HypervisorError {
    #[error("invalid VM id {0:?}: use 1-64 characters from [A-Za-z0-9_.-]")]
    BadId(String),
    #[error("guest {what} {path} is not readable; build the image with `cocoon image build` or set vm.{what} in the config")]
    MissingImage {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot find the {name} executable (looked for {looked})")]
    MissingBinary { name: String, looked: String },
    #[error("cannot create the VM run directory {0}")]
    RunDir(PathBuf, #[source] std::io::Error),
    #[error(
        "VM run directory {0} already exists: a VM with this id is running or was not cleaned up"
    )]
    RunDirExists(PathBuf),
    #[error("cannot start {what}")]
    Spawn {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the vsock backend did not come up within {after:?}: {detail}")]
    BackendNotReady { after: Duration, detail: String },
    #[error("hypervisor cocoon-vmm needs hardware virtualization: {0}")]
    NeedsHardwareKvm(&'static str),
    #[error("accelerator kvm was asked for, but {0}")]
    NoKvm(String),
    #[error("cannot jail the VMM: {0}")]
    Jail(String),
    #[error("vm.huge_pages = \"on\", but guest RAM's huge-page tmpfs cannot be made: {0}")]
    HugePages(String),
    #[error("cannot give the pod a uid of its own")]
    Identity(#[from] identity::IdentityError),
    #[error("cannot make the pod's user namespace for virtiofsd")]
    Userns(#[source] std::io::Error),
    #[error("VM template: {0}")]
    Template(String),
    #[error("vm.hotplug_memory: {0}")]
    NoMemoryHotplug(&'static str),
}

/// Everything needed to launch one VM. Built from `Config` plus a VM id.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub id: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Appended after Cocoon's own kernel parameters (so it can override them).
    pub extra_kernel_params: String,
    /// Parent of the per-VM run directory `<run_root>/<id>`.
    pub run_root: PathBuf,
    /// A host directory shared into the guest with virtio-fs, if any.
    pub shared_dir: Option<SharedDir>,
    /// The pod's network interface, if any: a tap the VMM inherits.
    pub net: Option<NetAttach>,
    /// Memory (MiB, whole `memctl::BLOCK_MIB`s) the guest may grow into later through a
    /// virtio-mem device (`[vm] hotplug_memory`); 0: none, the guest keeps its size.
    pub hotplug_mib: u32,
    /// Empty disk slots for raw block devices put in later (`[vm] block_slots`;
    /// cocoon-vmm and QEMU's microvm).
    pub block_slots: u8,
}

/// Kernel parameters every pod VM boots with, on either VMM: no network device that a
/// container on runc would not see.
///
/// - `fb_tunnels=none`: our kernel has IPv6-in-IPv4 (SIT) built in, which would give
///   every network namespace of the guest, the pod's included, a `sit0@NONE` (a host
///   loads the module only when asked). As a boot parameter it acts before the built-in
///   module's init, which a sysctl could not.
/// - `dummy.numdummies=0`: the built-in dummy driver (for a privileged container's own
///   dummies) would add a `dummy0` to the pod's namespace.
pub const COMMON_KERNEL_PARAMS: &[&str] = &["fb_tunnels=none", "dummy.numdummies=0"];

impl VmSpec {
    /// Kernel parameters for a VM with room to grow (`hotplug_mib`), the same on both
    /// VMMs: each block virtio-mem adds comes online at once (Cocoon's kernel does so
    /// by itself; another kernel is told).
    pub fn growth_kernel_params(&self) -> Vec<String> {
        if self.hotplug_mib == 0 {
            return Vec::new();
        }
        vec!["memhp_default_state=online".into()]
    }
}

/// A tap (already open, in the pod's network namespace) for the guest's one virtio-net
/// interface. The fd stays the caller's; the VMM gets a copy across exec.
#[derive(Debug, Clone)]
pub struct NetAttach {
    pub tap_fd: std::os::fd::RawFd,
    /// The guest interface's MAC (the CNI interface's).
    pub mac: String,
}

impl NetAttach {
    /// Lets `cmd`'s process inherit the tap fd (at the same number).
    pub(crate) fn inherit(&self, cmd: &mut tokio::process::Command) {
        inherit_fd(cmd, self.tap_fd);
    }
}

/// Lets the child started by `cmd` inherit descriptor `fd` (at the same number).
pub(crate) fn inherit_fd(cmd: &mut tokio::process::Command, fd: std::os::fd::RawFd) {
    // SAFETY: between fork and exec, only fcntl on an fd number, which is
    // async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A directory exported to the guest by a per-VM virtiofsd.
#[derive(Debug, Clone)]
pub struct SharedDir {
    pub path: PathBuf,
    /// The virtio-fs tag the guest mounts (`mount -t virtiofs <tag> ...`).
    pub tag: String,
    /// The virtiofsd binary.
    pub virtiofsd: PathBuf,
    /// The pod's user namespace virtiofsd runs in as its root (`[jail] virtiofsd`); the
    /// share is idmapped with it. None: virtiofsd runs as host root.
    pub userns: Option<std::sync::Arc<userns::PodUserns>>,
    /// The pod's mount namespace, where the share's mounts live: virtiofsd starts in
    /// it. None: the caller's.
    pub mount_ns: Option<std::sync::Arc<crate::shimv2::podns::PodNs>>,
}

/// The operator's kernel parameters, after Cocoon's own switches (so an operator's
/// `cocoon.debug=0` still wins: the kernel's last word counts).
fn kernel_params(config: &Config) -> String {
    let mut p = Vec::new();
    if config.debug.console {
        p.push("cocoon.debug=1");
    }
    if !config.vm.kernel_params.is_empty() {
        p.push(&config.vm.kernel_params);
    }
    p.join(" ")
}

impl VmSpec {
    pub fn from_config(config: &Config, id: &str) -> Self {
        Self {
            id: id.to_string(),
            kernel: config.kernel_path(),
            initrd: config.initrd_path(),
            vcpus: config.vm.vcpus,
            memory_mib: config.vm.memory_mib,
            extra_kernel_params: kernel_params(config),
            run_root: config.paths.run_dir.clone(),
            shared_dir: None,
            net: None,
            hotplug_mib: 0,
            block_slots: config.vm.block_slots,
        }
    }

    /// Checks what can be checked before anything is created.
    pub fn validate(&self) -> Result<(), HypervisorError> {
        let ok_id = !self.id.is_empty()
            && self.id.len() <= 64
            && self
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
            && !self.id.starts_with('.');
        if !ok_id {
            return Err(HypervisorError::BadId(self.id.clone()));
        }
        for (what, path) in [("kernel", &self.kernel), ("initrd", &self.initrd)] {
            std::fs::File::open(path).map_err(|source| HypervisorError::MissingImage {
                what,
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }

    pub fn run_dir(&self) -> PathBuf {
        self.run_root.join(&self.id)
    }
}

/// Host-side timestamps of a launch, for the boot breakdown.
#[derive(Debug, Clone, Copy)]
pub struct LaunchTimes {
    pub started: Instant,
    /// The vsock backend is listening.
    pub backend_ready: Instant,
    /// The VMM process has been spawned.
    pub vmm_spawned: Instant,
}

/// A running VM. Dropping it kills its processes and removes its run
/// directory; `shutdown` does the same in order and reports what happened.
#[derive(Debug)]
pub struct Vm {
    pub id: String,
    pub run_dir: PathBuf,
    /// The hybrid vsock socket (see `crate::vsock`).
    pub vsock_uds: PathBuf,
    pub console_log: PathBuf,
    /// The VMM's own messages (its stderr): why it exited, when it did.
    pub vmm_log: PathBuf,
    /// The copies into `vmm_log` and `console_log`, which a report of the VM's exit
    /// lets catch up first.
    pub(crate) vmm_log_copy: Option<console::Copied>,
    pub(crate) console_copy: Option<console::Copied>,
    /// What runs guest code, for reports: "kvm", "tcg".
    pub accel: &'static str,
    pub times: LaunchTimes,
    pub(crate) procs: VmProcesses,
    /// The uid a jailed VMM runs as, held until the VM is gone.
    pub(crate) identity: Option<identity::PodIdentity>,
    /// Notified when the agent's ready line passes on the console, where the shim copies
    /// it (QEMU's; `None` elsewhere): `AgentClient::wait_ready` then connects at once.
    pub agent_ready: Option<std::sync::Arc<tokio::sync::Notify>>,
    /// The template the VM was restored from (`template`), if it was not booted.
    pub template: Option<PathBuf>,
    /// How to grow the guest's memory, when it was launched with room to grow.
    pub memory_control: Option<memctl::MemoryControl>,
    /// QEMU's QMP socket, on a machine that takes disks after boot (`pc`).
    pub qmp: Option<PathBuf>,
    /// The VM's disk slots, when it has some: the VMM that fills them, and how many.
    pub disk_slots: Option<(disk_slots::SlotVmm, u8)>,
}

impl Vm {
    /// The VMM's exit status if it has exited (without blocking).
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.procs.try_vmm_exit()
    }

    /// A device backend that has exited (`pid N: status`), if one has.
    pub fn try_backend_exit(&mut self) -> Option<String> {
        self.procs.backend_exit_report(5)
    }

    /// Waits up to `deadline` for the VMM to exit by itself.
    pub async fn wait_exit(&mut self, deadline: Duration) -> Option<ExitStatus> {
        self.procs.wait_vmm_exit(deadline).await
    }

    pub fn vmm_pid(&self) -> Option<u32> {
        self.procs.vmm_pid()
    }

    /// The VMM program's own pid (a jailed one's, not its waiter's), for OCI hooks.
    pub fn vmm_program_pid(&self) -> Option<u32> {
        self.procs.vmm_program_pid()
    }

    /// Ends the guest at once (SIGKILL to the VMM); `stop` still reaps and cleans up.
    pub fn kill(&self) {
        self.procs.kill_vmm();
    }

    pub fn pids(&self) -> Vec<u32> {
        self.procs.pids()
    }

    /// The last `max_lines` lines of the guest console, for error reports (after
    /// [`Self::settle_logs`] where the VM has exited).
    pub fn console_tail(&self, max_lines: usize) -> String {
        tail_lines(&self.console_log, max_lines)
    }

    /// The last `max_lines` lines of the VMM's own log, for error reports (after
    /// [`Self::settle_logs`] where the VM has exited).
    pub fn vmm_log_tail(&self, max_lines: usize) -> String {
        tail_lines(&self.vmm_log, max_lines)
    }

    /// The copies of the VMM's own pipes: its log and, where the shim copies it, the
    /// console.
    fn vmm_copies(&self) -> impl Iterator<Item = &console::Copied> {
        [&self.vmm_log_copy, &self.console_copy]
            .into_iter()
            .flatten()
    }

    /// Lets the copies of what exited processes wrote (the VMM's console and log, a
    /// backend's log) catch up, for at most [`console::COPY_SETTLE`]: their last words,
    /// often the reason, are then in the files.
    pub async fn settle_logs(&mut self) {
        let until = Instant::now() + console::COPY_SETTLE;
        if self.procs.try_vmm_exit().is_some() {
            for c in self.vmm_copies() {
                c.settled(until).await;
            }
        }
        self.procs.settle_exited_backends(until).await;
    }

    /// Stops the VM: waits up to `grace` for the VMM to exit by itself (after
    /// an agent Shutdown), then kills every process, reaps them and removes
    /// the run directory. Returns how the VMM ended.
    pub async fn stop(mut self, grace: Duration) -> Option<ExitStatus> {
        let status = self.procs.stop(grace).await;
        // Every writer is gone: the copies end at once, and none may rotate a file back
        // into the directory while it is removed.
        let until = Instant::now() + console::COPY_SETTLE;
        for c in self.vmm_copies().chain(self.procs.backend_copies()) {
            c.settled(until).await;
        }
        remove_run_dir(&self.run_dir);
        status
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.procs.kill_now();
        remove_run_dir(&self.run_dir);
    }
}

fn remove_run_dir(dir: &Path) {
    // A log copy that has not yet seen its pipe close (a `Vm` dropped, not stopped) may
    // rotate a file back in while the directory is emptied: the removal is tried again.
    let mut tries = 0;
    while let Err(e) = std::fs::remove_dir_all(dir) {
        tries += 1;
        if e.kind() == std::io::ErrorKind::NotFound {
            return;
        }
        if e.kind() != std::io::ErrorKind::DirectoryNotEmpty || tries == 3 {
            tracing::warn!("cannot remove VM run directory {}: {e}", dir.display());
            return;
        }
    }
}

/// Reads at most the last 64 KiB of `path` and returns its last lines.
pub fn tail_lines(path: &Path, max_lines: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.take(64 * 1024).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    // What the guest or a VMM it took over wrote reaches errors and logs: each line is
    // cut and its control characters (a terminal's escapes, a carriage return that
    // would hide what comes before it) written out.
    lines[lines.len().saturating_sub(max_lines)..]
        .iter()
        .map(|l| {
            let kept = crate::agent_reply::cut(l, TAIL_LINE_MAX);
            let mut shown = crate::agent_reply::escape_controls(kept);
            if kept.len() < l.len() {
                shown.push('…');
            }
            shown
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The most of one log line an error report shows.
const TAIL_LINE_MAX: usize = 512;

/// Launches VMs.
#[async_trait]
pub trait Hypervisor: Send + Sync {
    fn name(&self) -> &'static str;
    /// Starts the VM; returns once its processes run (not when the guest is up).
    async fn launch(&self, spec: &VmSpec) -> Result<Vm, HypervisorError>;
}

/// Which accelerator to use, and why (logged by the caller).
pub fn resolve_accel(wanted: Accel, kvm: KvmKind) -> Result<(Accel, String), HypervisorError> {
    match (wanted, kvm) {
        (Accel::Tcg, _) => Ok((Accel::Tcg, "set in config (qemu.accel = \"tcg\")".into())),
        (Accel::Kvm, KvmKind::Hardware) => Ok((Accel::Kvm, "set in config".into())),
        (Accel::Kvm, KvmKind::Pvm) => Ok((
            Accel::Kvm,
            "set in config, but /dev/kvm is PVM, which cannot boot stock Linux guests".into(),
        )),
        (Accel::Kvm, KvmKind::None) => {
            Err(HypervisorError::NoKvm("this host has no /dev/kvm".into()))
        }
        (Accel::Auto, KvmKind::Hardware) => {
            Ok((Accel::Kvm, "host has hardware virtualization".into()))
        }
        (Accel::Auto, KvmKind::Pvm) => Ok((
            Accel::Tcg,
            "host /dev/kvm is PVM (no vmx/svm), which cannot boot stock Linux guests".into(),
        )),
        (Accel::Auto, KvmKind::None) => Ok((Accel::Tcg, "host has no /dev/kvm".into())),
    }
}

/// The backend `kind` means on a host with `kvm`, and why.
pub fn resolve_hypervisor(kind: HypervisorKind, kvm: KvmKind) -> (HypervisorKind, &'static str) {
    match (kind, kvm) {
        (HypervisorKind::Auto, KvmKind::Hardware) => (
            HypervisorKind::CocoonVmm,
            "auto: host has hardware virtualization",
        ),
        (HypervisorKind::Auto, KvmKind::Pvm) => (
            HypervisorKind::Qemu,
            "auto: /dev/kvm is PVM (no vmx/svm), which cocoon-vmm cannot boot Linux on",
        ),
        (HypervisorKind::Auto, KvmKind::None) => {
            (HypervisorKind::Qemu, "auto: this host has no /dev/kvm")
        }
        (k, _) => (k, "set in config"),
    }
}

/// The hypervisor the config asks for.
pub fn from_config(config: &Config) -> Result<Box<dyn Hypervisor>, HypervisorError> {
    let (kind, why) = resolve_hypervisor(config.hypervisor, check::kvm_kind());
    tracing::info!(hypervisor = ?kind, "hypervisor: {why}");
    match kind {
        HypervisorKind::Qemu | HypervisorKind::Auto => {
            let (accel, why) = resolve_accel(config.qemu.accel, check::kvm_kind())?;
            tracing::info!(accel = ?accel, "QEMU accelerator: {why}");
            Ok(Box::new(qemu::Qemu::new(config, accel)?))
        }
        HypervisorKind::CocoonVmm => match check::kvm_kind() {
            KvmKind::Hardware => Ok(Box::new(cocoon_vmm::CocoonVmm::new(config)?)),
            KvmKind::Pvm => Err(HypervisorError::NeedsHardwareKvm(
                "this host's /dev/kvm is PVM (no vmx/svm), which cannot boot Linux guests; use hypervisor = \"qemu\"",
            )),
            KvmKind::None => Err(HypervisorError::NeedsHardwareKvm(
                "this host has no /dev/kvm; use hypervisor = \"qemu\"",
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_cocoon_vmm_only_on_hardware_kvm() {
        use HypervisorKind::*;
        assert_eq!(resolve_hypervisor(Auto, KvmKind::Hardware).0, CocoonVmm);
        assert_eq!(resolve_hypervisor(Auto, KvmKind::Pvm).0, Qemu);
        assert!(resolve_hypervisor(Auto, KvmKind::Pvm).1.contains("PVM"));
        assert_eq!(resolve_hypervisor(Auto, KvmKind::None).0, Qemu);
        // An explicit choice is kept, whatever the host (and refused later if need be).
        assert_eq!(resolve_hypervisor(CocoonVmm, KvmKind::Pvm).0, CocoonVmm);
        assert_eq!(resolve_hypervisor(Qemu, KvmKind::Hardware).0, Qemu);
    }

    #[test]
    fn accel_follows_the_host() {
        assert_eq!(
            resolve_accel(Accel::Auto, KvmKind::Hardware).unwrap().0,
            Accel::Kvm
        );
        assert_eq!(
            resolve_accel(Accel::Auto, KvmKind::Pvm).unwrap().0,
            Accel::Tcg
        );
        assert_eq!(
            resolve_accel(Accel::Auto, KvmKind::None).unwrap().0,
            Accel::Tcg
        );
        assert_eq!(
            resolve_accel(Accel::Tcg, KvmKind::Hardware).unwrap().0,
            Accel::Tcg
        );
        assert!(resolve_accel(Accel::Kvm, KvmKind::None).is_err());
        let (a, why) = resolve_accel(Accel::Kvm, KvmKind::Pvm).unwrap();
        assert_eq!(a, Accel::Kvm);
        assert!(why.contains("PVM"));
    }

    /// A spec with nothing attached.
    pub(super) fn bare_spec(id: &str, kernel: &str, initrd: &str, memory_mib: u32) -> VmSpec {
        VmSpec {
            id: id.into(),
            kernel: kernel.into(),
            initrd: initrd.into(),
            vcpus: 1,
            memory_mib,
            extra_kernel_params: String::new(),
            run_root: "/tmp".into(),
            shared_dir: None,
            net: None,
            hotplug_mib: 0,
            block_slots: 0,
        }
    }

    #[test]
    fn vm_ids_are_checked() {
        let mut spec = bare_spec("ok-id_1.2", "/nonexistent/k", "/nonexistent/i", 128);
        let err = spec.validate().unwrap_err();
        assert!(err.to_string().contains("/nonexistent/k"), "{err}");
        for bad in ["", "../x", "a/b", ".hidden", &"x".repeat(65)] {
            spec.id = bad.into();
            assert!(
                matches!(spec.validate(), Err(HypervisorError::BadId(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn tail_keeps_last_lines() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        std::fs::write(&p, "a\nb\nc\nd\n").unwrap();
        assert_eq!(tail_lines(&p, 2), "c\nd");
        // Written by the guest or its VMM: cut per line, control characters escaped.
        std::fs::write(&p, format!("x\r\x1b[31mred\n{}\n", "z".repeat(5000))).unwrap();
        let t = tail_lines(&p, 2);
        assert!(t.starts_with("x\\r\\u{1b}[31mred\n"), "{t:?}");
        assert_eq!(
            t.lines().nth(1).unwrap(),
            format!("{}…", "z".repeat(TAIL_LINE_MAX))
        );
        assert_eq!(tail_lines(&d.path().join("none"), 2), "");
    }
}
