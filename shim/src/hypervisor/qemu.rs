//! QEMU as the VMM: the general-purpose backend, and the only one that boots
//! Linux on hosts without hardware virtualization (TCG). One QEMU process per
//! VM, plus our vhost-user vsock backend (`cocoon-vmm vhost-user-vsock`),
//! because in-kernel vhost-vsock is not available everywhere and the hybrid
//! Unix-socket convention must be the same on every backend.

use std::path::{Path, PathBuf};
use std::time::Instant;

use async_trait::async_trait;
use tokio::process::Command;

use super::guest_ram::QemuRam;
pub use super::microvm::{
    microvm_kernel_params, microvm_machine, virtio_mmio_devices, MICROVM_LEGACY_TRANSPORTS,
};
use super::process::{configure, find_binary};
use super::{identity, launch, pod_jail};
use super::{HypervisorError, Vm, VmSpec};
use crate::config::{Accel, Config, Machine};

/// QEMU's stderr, in the VM's run dir.
const QEMU_LOG: &str = "qemu.log";

pub struct Qemu {
    binary: PathBuf,
    vmm_binary: PathBuf,
    machine: Machine,
    accel: Accel,
    extra_args: Vec<String>,
    confine: bool,
    free_page_reporting: bool,
    huge_pages: crate::config::HugePages,
    /// The kernel takes virtio-mmio devices on its command line, so a microvm may leave
    /// ACPI out (`microvm_acpi`).
    kernel_mmio_cmdline: bool,
    /// `Some`: QEMU runs jailed, as a uid of its own from this range.
    jail: Option<crate::config::JailConfig>,
}

/// Kernel parameters for every TCG guest. `noreplace-smp`: a kernel that finds one CPU
/// rewrites each of its thousands of LOCK prefixes into the uniprocessor form, one code
/// patch at a time, and under TCG each patch throws away translated code: 70-130 ms of
/// the boot here (measured between the kernel's FPU and pid_max messages). Keeping the
/// SMP forms costs a locked instruction its lock, which is cheap under TCG. Not under
/// KVM: the patching is quick there, and the unlocked forms are the faster ones.
/// `lapic_timer_hz` (Cocoon's kernel, `rootfs/kernel/patches`): QEMU's emulated local
/// APIC timer counts at 1 GHz; told so, the kernel skips 100 ms of calibrating it. (Under
/// KVM the TSC-deadline timer needs no calibration; another kernel ignores the word.)
pub const TCG_KERNEL_PARAMS: &[&str] = &["noreplace-smp", "lapic_timer_hz=1000000000"];

/// QEMU's own seccomp filter with every group of syscalls it can deny: obsolete ones,
/// privilege changes, fork/exec, and scheduling/resource controls.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// Why a microvm cannot grow its memory.
pub const MICROVM_NO_HOTPLUG: &str = "needs qemu.machine = \"pc\": QEMU 7.2's microvm \
    has no region for hot-added memory (a virtio-mem device there lands on the guest's RAM \
    at address 0, and the guest refuses it)";

/// Paths inside one VM's run directory. The vhost-user sockets QEMU connects to have a
/// directory of their own, the only one of the run directory a jailed QEMU sees.
struct RunPaths {
    socket_dir: PathBuf,
    vhost_socket: PathBuf,
    vsock_uds: PathBuf,
    console_log: PathBuf,
    qemu_log: PathBuf,
    backend_log: PathBuf,
    virtiofs_socket: PathBuf,
}

impl RunPaths {
    fn new(dir: &Path) -> Self {
        let socket_dir = dir.join("vhost");
        Self {
            vhost_socket: socket_dir.join("vhost-vsock.sock"),
            virtiofs_socket: socket_dir.join("virtiofs.sock"),
            socket_dir,
            vsock_uds: dir.join("vsock.sock"),
            console_log: dir.join("console.log"),
            qemu_log: dir.join(QEMU_LOG),
            backend_log: dir.join("vsock-backend.log"),
        }
    }
}

impl Qemu {
    pub fn new(config: &Config, accel: Accel) -> Result<Self, HypervisorError> {
        let binary = if config.qemu.binary.is_absolute() {
            config.qemu.binary.clone()
        } else {
            find_binary(&config.qemu.binary.to_string_lossy(), Path::new(""))?
        };
        if config.vm.hotplug_memory && config.qemu.machine == Machine::Microvm {
            return Err(HypervisorError::NoMemoryHotplug(MICROVM_NO_HOTPLUG));
        }
        Ok(Self {
            binary,
            vmm_binary: find_binary("cocoon-vmm", &config.paths.vmm_binary)?,
            machine: config.qemu.machine,
            accel,
            extra_args: config.qemu.extra_args.clone(),
            confine: config.qemu.confine,
            free_page_reporting: config.vm.free_page_reporting,
            huge_pages: config.vm.huge_pages,
            kernel_mmio_cmdline: config.kernel_takes_virtio_mmio_cmdline(),
            jail: config.jail.enabled.then(|| config.jail.clone()),
        })
    }

    /// Whether this VM's microvm keeps ACPI: for a kernel that needs it to find its
    /// devices, or for more virtio-mmio devices than a microvm without ACPI has
    /// transports for.
    fn microvm_acpi(&self, spec: &VmSpec) -> bool {
        let devices = virtio_mmio_devices(spec, self.free_page_reporting, &self.extra_args);
        !self.kernel_mmio_cmdline || devices > MICROVM_LEGACY_TRANSPORTS
    }

    fn accel_name(&self) -> &'static str {
        match self.accel {
            Accel::Kvm => "kvm",
            _ => "tcg",
        }
    }

    /// The kernel command line: ours first, the user's last so it can override.
    fn kernel_cmdline(&self, spec: &VmSpec) -> String {
        // panic=-1: a dead agent (PID 1) resets the VM at once, and QEMU runs
        // with -no-reboot, so the VM ends instead of hanging.
        let mut p = vec!["console=ttyS0", "quiet", "panic=-1", "reboot=t"];
        p.extend(super::COMMON_KERNEL_PARAMS);
        // Under TCG the TSC calibration against the PIT hangs about half of the boots
        // (seen on microvm); give the rate outright: the host's own, which the guest's
        // TSC counts at (measured once per host boot, kept beside the VMs' run dirs).
        let tsc = (self.accel != Accel::Kvm)
            .then(|| cocoon_rootfs::tsc::tcg_kernel_param(Some(&spec.run_root)));
        p.extend(tsc.as_deref());
        if self.accel != Accel::Kvm {
            p.extend(TCG_KERNEL_PARAMS);
        }
        if self.machine == Machine::Microvm {
            p.extend(microvm_kernel_params(self.microvm_acpi(spec)));
        }
        let growth = spec.growth_kernel_params();
        p.extend(growth.iter().map(String::as_str));
        let limits = spec.limit_kernel_params();
        p.extend(limits.iter().map(String::as_str));
        let mut s = p.join(" ");
        if !spec.extra_kernel_params.is_empty() {
            s.push(' ');
            s.push_str(&spec.extra_kernel_params);
        }
        s
    }

    /// QEMU's arguments; `memctl_fd` is the listener of QMP's socket, which QEMU
    /// inherits, for a VM with room to grow (`spec.hotplug_mib`), a `pc` (disks plugged
    /// after boot) or a microvm with disk slots (`placeholders`).
    fn args(
        &self,
        spec: &VmSpec,
        paths: &RunPaths,
        ram: &QemuRam,
        memctl_fd: Option<i32>,
        slots: &[std::os::fd::OwnedFd],
    ) -> Vec<String> {
        let mem = format!("{}M", spec.memory_mib);
        let hotplug = spec.hotplug_mib > 0;
        let accel = self.accel_name();
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        push(&["-name", &format!("cocoon-{}", spec.id)]);
        push(&[
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-display",
            "none",
        ]);
        // Guest RAM is shared so vhost-user backends can map it; on a huge-page tmpfs
        // where it can be (`guest_ram`).
        push(&["-object", &ram.backend(&mem)]);
        match self.machine {
            Machine::Microvm => push(&[
                "-machine",
                &format!(
                    "{},memory-backend=mem",
                    microvm_machine(self.microvm_acpi(spec))
                ),
            ]),
            Machine::Pc => {
                push(&["-machine", "pc"]);
                push(&["-numa", "node,memdev=mem"]);
            }
        }
        // TCG's translation cache defaults to 1 GiB and grows toward it;
        // 64 MiB keeps a pod's QEMU small at no measurable cost for our guests.
        push(&[
            "-accel",
            if accel == "kvm" {
                "kvm"
            } else {
                "tcg,tb-size=64"
            },
        ]);
        push(&[
            "-cpu",
            if self.accel == Accel::Kvm {
                "host"
            } else {
                "max"
            },
        ]);
        let m = if hotplug {
            format!("{mem},maxmem={}M", spec.memory_mib + spec.hotplug_mib)
        } else {
            mem.clone()
        };
        push(&["-smp", &spec.vcpus.to_string(), "-m", &m]);
        if hotplug {
            // The region the guest grows into: a shared memfd like its RAM (vhost-user
            // backends map it too), none of it reserved or touched until plugged.
            push(&[
                "-object",
                &format!(
                    "memory-backend-memfd,id=hotmem,size={}M,share=on,reserve=off",
                    spec.hotplug_mib
                ),
                "-device",
                &format!(
                    "virtio-mem-pci,id={},memdev=hotmem,block-size=2M,requested-size=0",
                    super::memctl::QEMU_DEVICE_ID
                ),
            ]);
        }
        if let Some(fd) = memctl_fd {
            push(&[
                "-chardev",
                &format!("socket,id=memctl,fd={fd},server=on,wait=off"),
                "-mon",
                "chardev=memctl,mode=control",
            ]);
        }
        push(&[
            "-kernel",
            &spec.kernel.to_string_lossy(),
            "-initrd",
            &spec.initrd.to_string_lossy(),
        ]);
        push(&["-append", &self.kernel_cmdline(spec)]);
        // QEMU's stdout, a pipe the shim copies into a rotated console.log on a thread
        // of its own (`console`): a guest must not fill the host's disk.
        push(&["-serial", "stdio"]);
        if self.confine {
            push(&["-sandbox", SANDBOX]);
        }
        push(&[
            "-chardev",
            &format!("socket,id=vsock0,path={}", paths.vhost_socket.display()),
        ]);
        let dev = match self.machine {
            Machine::Microvm => "vhost-user-vsock-device",
            Machine::Pc => "vhost-user-vsock-pci",
        };
        push(&["-device", &format!("{dev},chardev=vsock0")]);
        if let Some(shared) = &spec.shared_dir {
            push(&[
                "-chardev",
                &format!("socket,id=fs0,path={}", paths.virtiofs_socket.display()),
            ]);
            let dev = match self.machine {
                Machine::Microvm => "vhost-user-fs-device",
                Machine::Pc => "vhost-user-fs-pci",
            };
            push(&["-device", &format!("{dev},chardev=fs0,tag={}", shared.tag)]);
        }
        if let Some(net) = &spec.net {
            // vhost=off: the frames go through QEMU, which the tap fd is handed to; no
            // /dev/vhost-net needed.
            push(&[
                "-netdev",
                &format!("tap,id=net0,fd={},vhost=off", net.tap_fd),
            ]);
            let dev = match self.machine {
                Machine::Microvm => "virtio-net-device",
                Machine::Pc => "virtio-net-pci",
            };
            push(&["-device", &format!("{dev},netdev=net0,mac={}", net.mac)]);
        }
        if self.free_page_reporting {
            // Freed guest pages go back to the host (punched out of guest RAM's file) instead
            // of staying touched for the pod's life.
            let dev = match self.machine {
                Machine::Microvm => "virtio-balloon-device",
                Machine::Pc => "virtio-balloon-pci",
            };
            push(&["-device", &format!("{dev},free-page-reporting=on")]);
        }
        // microvm's disk slots (`qemu_slots`), last: the devices before them keep
        // their places.
        a.extend(super::qemu_slots::args(slots));
        a.extend(self.extra_args.iter().cloned());
        a
    }

    /// Whether this VM boots with disk slots: microvm's way of taking disks later.
    fn slots(&self, spec: &VmSpec) -> u8 {
        match self.machine {
            Machine::Microvm => spec.block_slots,
            Machine::Pc => 0,
        }
    }
}

impl Qemu {
    /// Starts the vsock backend (`cocoon-vmm vhost-user-vsock`) for `vm`. Jailed, it runs
    /// as the pod's uid (`jail-exec`) with nothing of the host writable: the shim makes
    /// both its listeners and hands them over, the vhost-user one QEMU connects to (in
    /// the socket directory, given to the pod's uid) and the one at `vsock.sock` in the
    /// root-owned run directory it accepts the shim's connections on, so the shim never
    /// connects through a path the pod's processes can change and an escaped backend
    /// cannot make files. Unjailed, it jails itself as root (namespaces, no
    /// capabilities) and binds its own listeners.
    fn spawn_backend(&self, vm: &mut Vm, paths: &RunPaths) -> Result<(), HypervisorError> {
        let spawn_err = |source| HypervisorError::Spawn {
            what: "the vsock backend",
            source,
        };
        let mut backend = Command::new(&self.vmm_binary);
        // Both listeners are made here, listening before the backend starts: a socket
        // the backend bound itself exists a moment before it listens, and QEMU,
        // started once the file shows, would be refused in that moment.
        let vhost = pod_jail::unix_listener(&paths.vhost_socket)?;
        let uds = pod_jail::unix_listener(&paths.vsock_uds)?;
        if let Some(identity) = &vm.identity {
            let jail = pod_jail::PodJail {
                program: &self.vmm_binary,
                read_only: vec![],
                writable: vec![],
                identity,
                kvm: false,
                huge_tmpfs: None,
            };
            // Ends with the program: its arguments follow.
            backend.args(jail.command_prefix()?);
            // QEMU, as the pod's uid, connects to it.
            pod_jail::give_socket(&paths.vhost_socket, identity)?;
        }
        backend
            .args(["vhost-user-vsock", "--socket"])
            .arg(&paths.vhost_socket);
        let (vhost_fd, uds_fd) = (
            std::os::fd::AsRawFd::as_raw_fd(&vhost),
            std::os::fd::AsRawFd::as_raw_fd(&uds),
        );
        backend.args(["--socket-fd", &vhost_fd.to_string()]);
        backend.args(["--uds-fd", &uds_fd.to_string()]);
        if vm.identity.is_some() {
            // The pod's jail confines it.
            backend.args(["--jail", "off"]);
        }
        super::inherit_fd(&mut backend, vhost_fd);
        super::inherit_fd(&mut backend, uds_fd);
        let listeners = (vhost, uds);
        backend.arg("--uds-path").arg(&paths.vsock_uds);
        backend.args(["--guest-cid", &cocoon_protocol::GUEST_CID.to_string()]);
        let copied = configure(&mut backend, &paths.backend_log).map_err(spawn_err)?;
        let child = backend.spawn().map_err(spawn_err)?;
        // The backend holds the listeners now.
        drop(listeners);
        vm.procs
            .push_backend(child, "the vsock backend", &paths.backend_log, copied);
        Ok(())
    }
}

#[async_trait]
impl super::Hypervisor for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    async fn launch(&self, spec: &VmSpec) -> Result<Vm, HypervisorError> {
        spec.validate()?;
        let started = Instant::now();
        let run_dir = launch::create_run_dir(spec)?;
        let paths = RunPaths::new(&run_dir);
        let mut vm = launch::new_vm(spec, &run_dir, QEMU_LOG, self.accel_name(), started);
        // The jail binds the kernel and initrd themselves: no link left in their names.
        let mut spec = spec.clone();
        if let Some(j) = &self.jail {
            spec.kernel = pod_jail::canonical("kernel", &spec.kernel)?;
            spec.initrd = pod_jail::canonical("initrd", &spec.initrd)?;
            let identity = identity::allocate(&j.lock_file, j.uid_base, j.uid_count, &spec.id)?;
            pod_jail::make_socket_dir(&paths.socket_dir, &identity)?;
            vm.identity = Some(identity);
        } else {
            std::fs::create_dir(&paths.socket_dir)
                .map_err(|e| HypervisorError::RunDir(paths.socket_dir.clone(), e))?;
        }
        let spec = &spec;
        // Before anything starts: `huge_pages = "on"` without a huge-page tmpfs fails here.
        let ram_bytes = u64::from(spec.memory_mib) << 20;
        let ram = QemuRam::choose(self.huge_pages, ram_bytes, vm.identity.is_some(), &spec.id)?;
        tracing::debug!(id = %spec.id, "guest RAM: {}", ram.describe());

        self.spawn_backend(&mut vm, &paths)?;
        launch::wait_for_socket(&mut vm.procs, &paths.vhost_socket, &paths.backend_log).await?;
        if let Some(shared) = &spec.shared_dir {
            launch::spawn_virtiofsd(&mut vm, shared, &paths.virtiofs_socket).await?;
        }
        vm.times.backend_ready = Instant::now();

        // QMP's listener, for growing the guest's memory and plugging disks (`pc`) or
        // filling slots (microvm).
        let slot_count = self.slots(spec);
        let controlled = spec.hotplug_mib > 0 || self.machine == Machine::Pc || slot_count > 0;
        let memctl = super::memctl::Listener::for_vm(&run_dir, controlled)?;
        let memctl_fd = memctl.as_ref().map(super::memctl::Listener::fd);
        let placeholders = super::qemu_slots::placeholders(slot_count).map_err(|source| {
            HypervisorError::Spawn {
                what: "the disk slots' placeholders",
                source,
            }
        })?;
        let args = self.args(spec, &paths, &ram, memctl_fd, &placeholders);
        tracing::debug!(binary = %self.binary.display(), ?args, jail = self.jail.is_some(), "starting QEMU");
        let mut qemu = match &vm.identity {
            Some(identity) => {
                if spec.shared_dir.is_some() {
                    pod_jail::give_socket(&paths.virtiofs_socket, identity)?;
                }
                pod_jail::readable_by_others("kernel", &spec.kernel, identity.uid)?;
                pod_jail::readable_by_others("initrd", &spec.initrd, identity.uid)?;
                let jail = pod_jail::PodJail {
                    program: &self.binary,
                    read_only: vec![&spec.kernel, &spec.initrd, &paths.socket_dir],
                    writable: vec![],
                    identity,
                    kvm: self.accel == Accel::Kvm,
                    huge_tmpfs: ram.jail_tmpfs(ram_bytes),
                };
                let mut c = Command::new(&self.vmm_binary);
                c.args(jail.command_prefix()?);
                c
            }
            None => Command::new(&self.binary),
        };
        qemu.args(&args);
        vm.vmm_log_copy = Some(configure(&mut qemu, &paths.qemu_log).map_err(|source| {
            HypervisorError::Spawn {
                what: "QEMU",
                source,
            }
        })?);
        if let Some(net) = &spec.net {
            net.inherit(&mut qemu);
        }
        if let Some(fd) = memctl_fd {
            super::inherit_fd(&mut qemu, fd);
        }
        if let Some(fd) = ram.inherited_fd() {
            super::inherit_fd(&mut qemu, fd);
        }
        for p in &placeholders {
            super::inherit_fd(&mut qemu, std::os::fd::AsRawFd::as_raw_fd(p));
        }
        // In a jail, `jail-exec` drops them itself after it is done with them.
        if self.confine && vm.identity.is_none() {
            super::process::drop_capabilities(&mut qemu);
        }
        // The console is its stdout, copied here; its stderr stays `configure`'s pipe.
        qemu.stdout(std::process::Stdio::piped());
        let mut child = qemu.spawn().map_err(|source| HypervisorError::Spawn {
            what: "QEMU",
            source,
        })?;
        use super::console::{spawn_copier, ConsoleWatch, CONSOLE_LIMIT};
        if let Some(out) = child.stdout.take() {
            let seen = std::sync::Arc::new(tokio::sync::Notify::new());
            vm.agent_ready = Some(seen.clone());
            let watch = ConsoleWatch {
                marker: cocoon_protocol::READY_LINE.as_bytes(),
                seen,
            };
            vm.console_copy = Some(spawn_copier(
                out.into_owned_fd(),
                paths.console_log.clone(),
                CONSOLE_LIMIT,
                Some(watch),
            ));
        }
        vm.procs.vmm = Some(child);
        // QEMU holds QMP's listener now.
        if let Some(qmp) = memctl.map(super::memctl::Listener::into_path) {
            if spec.hotplug_mib > 0 {
                vm.memory_control = Some(super::memctl::MemoryControl::Qmp(qmp.clone()));
            }
            if slot_count > 0 {
                vm.disk_slots = Some((super::disk_slots::SlotVmm::Qemu(qmp.clone()), slot_count));
            }
            if self.machine == Machine::Pc {
                vm.qmp = Some(qmp);
            }
        }
        vm.times.vmm_spawned = Instant::now();
        tracing::info!(id = %spec.id, pid = ?vm.vmm_pid(), accel = vm.accel, "VM launched");
        Ok(vm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu(machine: Machine, accel: Accel) -> Qemu {
        Qemu {
            binary: "/usr/bin/qemu-system-x86_64".into(),
            vmm_binary: "/usr/bin/cocoon-vmm".into(),
            machine,
            accel,
            extra_args: vec![],
            confine: true,
            free_page_reporting: true,
            huge_pages: crate::config::HugePages::Auto,
            kernel_mmio_cmdline: true,
            jail: None,
        }
    }

    fn spec() -> VmSpec {
        VmSpec {
            id: "t1".into(),
            kernel: "/k".into(),
            initrd: "/i".into(),
            vcpus: 2,
            memory_mib: 300,
            extra_kernel_params: "panic=0 cocoon.log=debug".into(),
            run_root: "/run/cocoon".into(),
            shared_dir: None,
            net: None,
            hotplug_mib: 0,
            block_slots: 0,
        }
    }

    /// The `sysctl.kernel.threads-max` a command line sets (0: none).
    fn threads_max(cmdline: &str) -> u64 {
        cmdline
            .split(' ')
            .find_map(|p| p.strip_prefix("sysctl.kernel.threads-max="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// `q`'s arguments for the test spec, a memfd for RAM, no QMP and no slots.
    fn plain_args(q: &Qemu) -> Vec<String> {
        q.args(
            &spec(),
            &RunPaths::new(Path::new("/r")),
            &QemuRam::Memfd,
            None,
            &[],
        )
    }

    fn value_after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn a_pod_tap_becomes_a_virtio_net_device() {
        let q = qemu(Machine::Microvm, Accel::Tcg);
        let mut s = spec();
        s.net = Some(crate::hypervisor::NetAttach {
            tap_fd: 9,
            mac: "c2:11:22:33:44:55".into(),
        });
        let a = q.args(
            &s,
            &RunPaths::new(Path::new("/run/cocoon/t1")),
            &QemuRam::Memfd,
            None,
            &[],
        );
        assert_eq!(value_after(&a, "-netdev"), ["tap,id=net0,fd=9,vhost=off"]);
        assert!(value_after(&a, "-device")
            .contains(&"virtio-net-device,netdev=net0,mac=c2:11:22:33:44:55"));
    }

    #[test]
    fn a_microvm_keeps_acpi_for_a_kernel_that_needs_it() {
        let mut q = qemu(Machine::Microvm, Accel::Tcg);
        q.kernel_mmio_cmdline = false;
        let a = plain_args(&q);
        assert_eq!(
            value_after(&a, "-machine"),
            ["microvm,rtc=on,memory-backend=mem"]
        );
        let cmdline = value_after(&a, "-append")[0].to_string();
        assert!(
            cmdline.contains(" pci=off") && !cmdline.contains("acpi=off"),
            "{cmdline}"
        );
        // A kernel that could do without, but more devices than a microvm without
        // ACPI has transports for: vsock, the balloon and eight disk slots.
        q.kernel_mmio_cmdline = true;
        let mut many = spec();
        many.block_slots = 8;
        assert!(virtio_mmio_devices(&many, true, &[]) > MICROVM_LEGACY_TRANSPORTS);
        let a = q.args(
            &many,
            &RunPaths::new(Path::new("/r")),
            &QemuRam::Memfd,
            None,
            &[],
        );
        assert_eq!(
            value_after(&a, "-machine"),
            ["microvm,rtc=on,memory-backend=mem"]
        );
        assert!(!q.kernel_cmdline(&many).contains("acpi=off"));
        // Four slots fit: vsock, a share, a network, the balloon and the slots are 8.
        let mut pod = spec();
        pod.block_slots = 4;
        pod.shared_dir = Some(crate::hypervisor::SharedDir {
            path: "/s".into(),
            tag: "rootfs".into(),
            virtiofsd: "/usr/bin/virtiofsd".into(),
            userns: None,
            mount_ns: None,
        });
        pod.net = Some(crate::hypervisor::NetAttach {
            tap_fd: 9,
            mac: "c2:11:22:33:44:55".into(),
        });
        assert_eq!(virtio_mmio_devices(&pod, true, &[]), 8);
        assert!(q.kernel_cmdline(&pod).contains(" acpi=off"));
        // A device of the operator's own is counted as one more.
        let extra = ["-device".to_string(), "virtio-rng-device".to_string()];
        assert_eq!(virtio_mmio_devices(&pod, true, &extra), 9);
    }

    #[test]
    fn microvm_tcg_command_line() {
        let q = qemu(Machine::Microvm, Accel::Tcg);
        let paths = RunPaths::new(Path::new("/run/cocoon/t1"));
        let a = q.args(&spec(), &paths, &QemuRam::Memfd, None, &[]);
        assert!(a.contains(&"-nodefaults".to_string()) && a.contains(&"-no-reboot".to_string()));
        assert_eq!(
            value_after(&a, "-machine"),
            ["microvm,rtc=on,acpi=off,memory-backend=mem"]
        );
        assert_eq!(value_after(&a, "-accel"), ["tcg,tb-size=64"]);
        assert_eq!(
            value_after(&a, "-object"),
            ["memory-backend-memfd,id=mem,size=300M,share=on"]
        );
        assert_eq!(value_after(&a, "-smp"), ["2"]);
        assert_eq!(value_after(&a, "-cpu"), ["max"]);
        assert_eq!(value_after(&a, "-serial"), ["stdio"]);
        assert_eq!(value_after(&a, "-sandbox"), [SANDBOX]);
        assert_eq!(
            value_after(&a, "-device"),
            [
                "vhost-user-vsock-device,chardev=vsock0",
                "virtio-balloon-device,free-page-reporting=on"
            ]
        );
        let cmdline = value_after(&a, "-append")[0];
        assert!(
            cmdline.split(' ').any(|p| p == "noreplace-smp"),
            "{cmdline}"
        );
        // The host's own TSC rate, which the TCG guest's TSC counts at.
        let khz: u64 = cmdline
            .split(' ')
            .find_map(|p| p.strip_prefix("tsc_early_khz="))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no tsc_early_khz in {cmdline}"));
        let host = cocoon_rootfs::tsc::measure_khz(std::time::Duration::from_millis(25)).unwrap();
        assert!(
            khz.abs_diff(host) * 200 < host,
            "told {khz} kHz, the host's runs at {host}"
        );
        // And it stays on the TSC whatever the jiffies say on a loaded host.
        assert!(cmdline.split(' ').any(|p| p == "tsc=reliable"), "{cmdline}");
        // The user's parameters come last so they win.
        assert!(cmdline.ends_with("panic=0 cocoon.log=debug"), "{cmdline}");
    }

    #[test]
    fn room_to_grow_is_a_virtio_mem_device_with_qmp_on_an_inherited_listener() {
        let mut s = spec();
        s.hotplug_mib = 1024;
        {
            let a = qemu(Machine::Pc, Accel::Tcg).args(
                &s,
                &RunPaths::new(Path::new("/r")),
                &QemuRam::JailTmpfs,
                Some(11),
                &[],
            );
            assert_eq!(value_after(&a, "-m"), ["300M,maxmem=1324M"]);
            // Guest RAM on the jail's huge-page tmpfs; the region it grows into stays
            // an unreserved memfd, touched only as it is plugged.
            assert_eq!(
                value_after(&a, "-object"),
                [
                    "memory-backend-file,id=mem,size=300M,share=on,mem-path=/guest-ram,align=2M",
                    "memory-backend-memfd,id=hotmem,size=1024M,share=on,reserve=off"
                ]
            );
            assert!(value_after(&a, "-device").contains(
                &"virtio-mem-pci,id=hotmem0,memdev=hotmem,block-size=2M,requested-size=0"
            ));
            assert!(
                value_after(&a, "-chardev").contains(&"socket,id=memctl,fd=11,server=on,wait=off")
            );
            assert_eq!(value_after(&a, "-mon"), ["chardev=memctl,mode=control"]);
            let cmdline = value_after(&a, "-append")[0];
            assert!(cmdline.contains("memhp_default_state=online"), "{cmdline}");
            // Threads for 1324 MiB at least, not the 300 the kernel would count at boot.
            assert!(threads_max(cmdline) >= 10592, "{cmdline}");
        }
        // Without room, none of it.
        let a = qemu(Machine::Pc, Accel::Tcg).args(
            &spec(),
            &RunPaths::new(Path::new("/r")),
            &QemuRam::Memfd,
            None,
            &[],
        );
        assert!(
            !a.iter()
                .any(|x| x.contains("hotmem") || x.contains("maxmem")),
            "{a:?}"
        );
        // A microvm has no room to give: refused, naming the machine to use.
        let mut config = Config::default();
        config.vm.hotplug_memory = true;
        config.qemu.binary = "/bin/true".into();
        let e = Qemu::new(&config, Accel::Tcg).err().expect("refused");
        assert!(e.to_string().contains("qemu.machine = \"pc\""), "{e}");
    }

    #[test]
    fn pc_kvm_command_line() {
        let q = qemu(Machine::Pc, Accel::Kvm);
        let a = plain_args(&q);
        assert_eq!(value_after(&a, "-machine"), ["pc"]);
        assert_eq!(value_after(&a, "-accel"), ["kvm"]);
        assert_eq!(value_after(&a, "-numa"), ["node,memdev=mem"]);
        assert_eq!(value_after(&a, "-cpu"), ["host"]);
        assert_eq!(
            value_after(&a, "-device"),
            [
                "vhost-user-vsock-pci,chardev=vsock0",
                "virtio-balloon-pci,free-page-reporting=on"
            ]
        );
        assert!(!value_after(&a, "-append")[0].contains("tsc_early_khz"));
        assert!(!value_after(&a, "-append")[0].contains("noreplace-smp"));
        let mut q = q;
        q.free_page_reporting = false;
        let a = plain_args(&q);
        assert!(!a.iter().any(|x| x.contains("balloon")), "{a:?}");
    }
}
