//! `cocoon-vmm` as the VMM: our own KVM microVM monitor, one process per VM,
//! with vsock in-process (the same hybrid Unix socket as with QEMU) and
//! virtio-fs through virtiofsd. It needs hardware virtualization: on other
//! hosts `from_config` refuses it with the reason rather than falling back.

use std::path::PathBuf;
use std::time::Instant;

use async_trait::async_trait;
use tokio::process::Command;

use super::process::{configure, find_binary};
use super::{identity, launch, pod_jail, HypervisorError, Vm, VmSpec};
use crate::config::{Config, HugePages};

/// The VMM's stderr, in the VM's run dir.
const VMM_LOG: &str = "vmm.log";
/// The directory of virtiofsd's socket in the run dir, the only part of it a jailed
/// VMM sees.
const SOCKET_DIR: &str = "vhost";

pub struct CocoonVmm {
    binary: PathBuf,
    /// `Some` (`[jail] enabled`): the VMM runs through `jail-exec` as a uid of the pod's
    /// own from this range.
    jail: Option<crate::config::JailConfig>,
    huge_pages: HugePages,
    free_page_reporting: bool,
    /// `[vm] templates`: how long a template VM may take to get ready.
    templates: Option<std::time::Duration>,
}

/// Descriptors a jailed cocoon-vmm inherits instead of opening: `/dev/kvm` (which its
/// jail does not hold, and its uid could not open), the listener of `vsock.sock`, and
/// the guest RAM file where the VMM could not make it (it cannot mount; we can).
struct Inherited {
    kvm: std::os::fd::RawFd,
    vsock_listener: std::os::fd::RawFd,
    mem: Option<std::os::fd::RawFd>,
}

/// Whether a pod's cocoon-vmm gets a balloon for free page reports: as `vm.free_page_reporting`
/// says, but not with `vm.templates`. A template is saved without one (a clone must have
/// its template's devices), and a clone copies the template's RAM into a file of its own.
fn takes_free_page_reports(config: &Config) -> bool {
    config.vm.free_page_reporting && !config.vm.templates
}

impl CocoonVmm {
    pub fn new(config: &Config) -> Result<Self, HypervisorError> {
        Ok(Self {
            binary: find_binary("cocoon-vmm", &config.paths.vmm_binary)?,
            jail: config.jail.enabled.then(|| config.jail.clone()),
            huge_pages: config.vm.huge_pages,
            free_page_reporting: takes_free_page_reports(config),
            templates: config
                .vm
                .templates
                .then(|| std::time::Duration::from_millis(config.vm.boot_timeout_ms)),
        })
    }

    /// The command line for `cocoon-vmm run` (the VMM describes its devices in
    /// ACPI).
    fn cmdline(spec: &VmSpec) -> String {
        // The agent powers off through ACPI S5. A reboot (a kernel panic with
        // panic=-1) is the i8042 reset with reboot=k, which the VMM also treats
        // as a clean end; reboot=t would triple-fault and read as a crash.
        let mut cmdline = String::from("console=ttyS0 quiet panic=-1 reboot=k");
        for param in super::COMMON_KERNEL_PARAMS {
            cmdline.push(' ');
            cmdline.push_str(param);
        }
        for param in spec
            .growth_kernel_params()
            .into_iter()
            .chain(spec.limit_kernel_params())
        {
            cmdline.push(' ');
            cmdline.push_str(&param);
        }
        if !spec.extra_kernel_params.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&spec.extra_kernel_params);
        }
        cmdline
    }

    /// The command line for `cocoon-vmm run`: booting the spec's kernel, or restoring
    /// `template` (whose kernel, command line, memory and vCPUs are the spec's).
    /// `memctl_fd`: the API listener for a VM with room to grow (`spec.hotplug_mib`).
    /// `console_fd`: the pipe the guest's serial console goes to.
    fn args(
        &self,
        spec: &VmSpec,
        run_dir: &std::path::Path,
        inherited: Option<&Inherited>,
        template: Option<&std::path::Path>,
        memctl_fd: Option<std::os::fd::RawFd>,
        console_fd: std::os::fd::RawFd,
    ) -> Vec<String> {
        let mut a = vec!["run".to_string()];
        match template {
            Some(t) => a.extend(["--restore".into(), t.display().to_string()]),
            None => a.extend([
                "--kernel".into(),
                spec.kernel.display().to_string(),
                "--initrd".into(),
                spec.initrd.display().to_string(),
                "--cmdline".into(),
                Self::cmdline(spec),
                "--mem-mib".into(),
                spec.memory_mib.to_string(),
                "--vcpus".into(),
                spec.vcpus.to_string(),
            ]),
        }
        a.extend([
            // A pipe the shim copies into `console.log`, rotated (`console`): the VMM
            // holds no file a guest that took it over could grow, or lease.
            "--serial-out-fd".into(),
            console_fd.to_string(),
            "--vsock-uds".into(),
            run_dir.join("vsock.sock").display().to_string(),
            "--vsock-cid".into(),
            cocoon_protocol::GUEST_CID.to_string(),
            // Jailed by `jail-exec` when `[jail] enabled`, never by the silent fallback
            // of `auto`.
            "--jail".into(),
            "off".into(),
        ]);
        if let Some(i) = inherited {
            a.push("--kvm-fd".into());
            a.push(i.kvm.to_string());
            a.push("--vsock-uds-fd".into());
            a.push(i.vsock_listener.to_string());
        }
        match inherited.and_then(|i| i.mem) {
            Some(fd) => a.extend(["--mem-fd".into(), fd.to_string()]),
            None => a.extend(["--huge-pages".into(), self.huge_pages.to_string()]),
        }
        if let Some(shared) = &spec.shared_dir {
            a.push("--fs".into());
            a.push(format!(
                "{}:{}",
                run_dir.join(SOCKET_DIR).join("virtiofs.sock").display(),
                shared.tag
            ));
        }
        if let Some(net) = &spec.net {
            a.push("--net-fd".into());
            a.push(format!("{},mac={}", net.tap_fd, net.mac));
        }
        if self.free_page_reporting {
            a.push("--free-page-reporting".into());
        }
        if let Some(fd) = memctl_fd.filter(|_| spec.hotplug_mib > 0 || spec.block_slots > 0) {
            // A restored VM has the template's region and slots (part of its key).
            if template.is_none() && spec.hotplug_mib > 0 {
                a.extend(["--hotplug-mib".into(), spec.hotplug_mib.to_string()]);
            }
            if template.is_none() && spec.block_slots > 0 {
                a.extend(["--block-slots".into(), spec.block_slots.to_string()]);
            }
            a.extend(["--api-sock-fd".into(), fd.to_string()]);
        }
        a
    }
}

impl CocoonVmm {
    /// The template to restore this pod's VM from (made now if there is none), with
    /// `[vm] templates`; `None` boots it.
    async fn template_for(&self, spec: &VmSpec) -> Result<Option<PathBuf>, HypervisorError> {
        let Some(boot_timeout) = self.templates else {
            return Ok(None);
        };
        let store = super::template::Store {
            dir: spec.run_root.join(super::template::DIR),
            virtiofsd: spec
                .shared_dir
                .as_ref()
                .map(|s| s.virtiofsd.clone())
                .unwrap_or_default(),
            boot_timeout,
        };
        let cmdline = Self::cmdline(spec);
        let shape = super::template::Shape {
            vmm: &self.binary,
            kernel: &spec.kernel,
            initrd: &spec.initrd,
            cmdline: &cmdline,
            memory_mib: spec.memory_mib,
            vcpus: spec.vcpus,
            fs_tag: spec.shared_dir.as_ref().map(|s| s.tag.as_str()),
            net: spec.net.is_some(),
            hotplug_mib: spec.hotplug_mib,
            block_slots: spec.block_slots,
        };
        store.get_or_make(&shape).await.map(Some)
    }

    /// For a jailed VMM (which cannot mount): guest RAM on a huge-page tmpfs of its own,
    /// as `vm.huge_pages` asks. `None`: the VMM makes a memfd itself.
    fn guest_ram(&self, spec: &VmSpec) -> Result<Option<std::fs::File>, HypervisorError> {
        super::guest_ram::huge_file(self.huge_pages, u64::from(spec.memory_mib) << 20, &spec.id)
    }
}

#[async_trait]
impl super::Hypervisor for CocoonVmm {
    fn name(&self) -> &'static str {
        "cocoon-vmm"
    }

    async fn launch(&self, spec: &VmSpec) -> Result<Vm, HypervisorError> {
        spec.validate()?;
        let started = Instant::now();
        let run_dir = launch::create_run_dir(spec)?;
        let mut vm = launch::new_vm(spec, &run_dir, VMM_LOG, "kvm", started);
        let socket_dir = run_dir.join(SOCKET_DIR);
        let virtiofs_socket = socket_dir.join("virtiofs.sock");
        // The jail binds the kernel and initrd themselves: no link left in their names.
        let mut spec = spec.clone();
        if let Some(j) = &self.jail {
            spec.kernel = pod_jail::canonical("kernel", &spec.kernel)?;
            spec.initrd = pod_jail::canonical("initrd", &spec.initrd)?;
            let identity = identity::allocate(&j.lock_file, j.uid_base, j.uid_count, &spec.id)?;
            pod_jail::make_socket_dir(&socket_dir, &identity)?;
            vm.identity = Some(identity);
        } else {
            std::fs::create_dir(&socket_dir)
                .map_err(|e| HypervisorError::RunDir(socket_dir.clone(), e))?;
        }
        let spec = &spec;
        let template = self.template_for(spec).await?;
        if let Some(shared) = &spec.shared_dir {
            launch::spawn_virtiofsd(&mut vm, shared, &virtiofs_socket).await?;
        }
        vm.times.backend_ready = Instant::now();
        let spawn_err = |source| HypervisorError::Spawn {
            what: "cocoon-vmm",
            source,
        };
        let mut cmd = Command::new(&self.binary);
        // The console's pipe: the VMM gets the write end, a thread here copies the rest.
        let (console_read, console_write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| spawn_err(e.into()))?;
        let console_fd = std::os::fd::AsRawFd::as_raw_fd(&console_write);
        super::inherit_fd(&mut cmd, console_fd);
        // The API's listener, for growing the guest's memory and filling its disk slots.
        let controlled = spec.hotplug_mib > 0 || spec.block_slots > 0;
        let memctl = super::memctl::Listener::for_vm(&run_dir, controlled)?;
        let memctl_fd = memctl.as_ref().map(super::memctl::Listener::fd);
        if let Some(fd) = memctl_fd {
            super::inherit_fd(&mut cmd, fd);
        }
        // Held until the VMM has its copies.
        let mut held = None;
        match &vm.identity {
            Some(identity) => {
                if spec.shared_dir.is_some() {
                    pod_jail::give_socket(&virtiofs_socket, identity)?;
                }
                pod_jail::readable_by_others("kernel", &spec.kernel, identity.uid)?;
                pod_jail::readable_by_others("initrd", &spec.initrd, identity.uid)?;
                let mut read_only: Vec<&std::path::Path> =
                    vec![&spec.kernel, &spec.initrd, &socket_dir];
                read_only.extend(template.as_deref());
                let jail = pod_jail::PodJail {
                    program: &self.binary,
                    read_only,
                    writable: vec![],
                    identity,
                    kvm: false,
                    huge_tmpfs: None,
                };
                let kvm = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/kvm")
                    .map_err(|e| HypervisorError::NoKvm(format!("/dev/kvm: {e}")))?;
                let listener = pod_jail::unix_listener(&vm.vsock_uds)?;
                let mem = self.guest_ram(spec)?;
                let inherited = Inherited {
                    kvm: std::os::fd::AsRawFd::as_raw_fd(&kvm),
                    vsock_listener: std::os::fd::AsRawFd::as_raw_fd(&listener),
                    mem: mem.as_ref().map(std::os::fd::AsRawFd::as_raw_fd),
                };
                cmd.args(jail.command_prefix()?);
                cmd.args(self.args(
                    spec,
                    &run_dir,
                    Some(&inherited),
                    template.as_deref(),
                    memctl_fd,
                    console_fd,
                ));
                super::inherit_fd(&mut cmd, inherited.kvm);
                super::inherit_fd(&mut cmd, inherited.vsock_listener);
                if let Some(fd) = inherited.mem {
                    super::inherit_fd(&mut cmd, fd);
                }
                held = Some((kvm, listener, mem));
            }
            None => {
                cmd.args(self.args(
                    spec,
                    &run_dir,
                    None,
                    template.as_deref(),
                    memctl_fd,
                    console_fd,
                ));
            }
        }
        vm.vmm_log_copy = Some(configure(&mut cmd, &run_dir.join(VMM_LOG)).map_err(spawn_err)?);
        if let Some(net) = &spec.net {
            net.inherit(&mut cmd);
        }
        vm.procs.vmm = Some(cmd.spawn().map_err(spawn_err)?);
        drop(held);
        // Only the VMM writes the console now: its end closes the copy.
        drop(console_write);
        // A restored guest printed its ready line before the template was saved.
        let watch = template.is_none().then(|| {
            let seen = std::sync::Arc::new(tokio::sync::Notify::new());
            vm.agent_ready = Some(seen.clone());
            super::console::ConsoleWatch {
                marker: cocoon_protocol::READY_LINE.as_bytes(),
                seen,
            }
        });
        vm.console_copy = Some(super::console::spawn_copier(
            Ok(console_read),
            vm.console_log.clone(),
            super::console::CONSOLE_LIMIT,
            watch,
        ));
        // The VMM holds the API's listener now.
        if let Some(api) = memctl.map(super::memctl::Listener::into_path) {
            if spec.hotplug_mib > 0 {
                vm.memory_control = Some(super::memctl::MemoryControl::CocoonVmm(api.clone()));
            }
            if spec.block_slots > 0 {
                vm.disk_slots =
                    Some((super::disk_slots::SlotVmm::CocoonVmm(api), spec.block_slots));
            }
        }
        vm.times.vmm_spawned = Instant::now();
        match &template {
            Some(t) => tracing::info!(id = %spec.id, pid = ?vm.vmm_pid(), template = %t.display(),
                "VM restored from a template on cocoon-vmm"),
            None => tracing::info!(id = %spec.id, pid = ?vm.vmm_pid(), "VM launched on cocoon-vmm"),
        }
        vm.template = template;
        Ok(vm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::SharedDir;

    /// cocoon-vmm refuses a command line longer than 2 047 bytes less 48 per virtio
    /// device (`vmm::config`); a pod with every device may have 13 (net, fs, vsock, free
    /// page reporting, virtio-mem, 8 disk slots). Cocoon's own words, with this host's
    /// values, must leave the user's `kernel_params` room.
    #[test]
    fn cocoons_own_command_line_leaves_the_user_room() {
        let mut spec = crate::hypervisor::tests::bare_spec("v1", "/k", "/i", 256);
        spec.hotplug_mib = 1 << 20;
        spec.block_slots = 8;
        let ours = CocoonVmm::cmdline(&spec);
        let budget = 2047 - 48 * 13;
        assert!(ours.len() + 400 < budget, "{} bytes: {ours}", ours.len());
    }

    #[test]
    fn command_line_carries_the_spec() {
        let v = CocoonVmm {
            binary: "/usr/bin/cocoon-vmm".into(),
            jail: Some(Default::default()),
            huge_pages: HugePages::Auto,
            free_page_reporting: true,
            templates: None,
        };
        let spec = VmSpec {
            id: "v1".into(),
            kernel: "/k".into(),
            initrd: "/i".into(),
            vcpus: 2,
            memory_mib: 300,
            extra_kernel_params: "cocoon.log=debug".into(),
            run_root: "/run/cocoon".into(),
            shared_dir: Some(SharedDir {
                path: "/s".into(),
                tag: "cocoon".into(),
                virtiofsd: "/v".into(),
                userns: None,
                mount_ns: None,
            }),
            net: Some(crate::hypervisor::NetAttach {
                tap_fd: 7,
                mac: "02:00:00:00:00:01".into(),
            }),
            hotplug_mib: 0,
            block_slots: 0,
        };
        let inherited = Inherited {
            kvm: 11,
            vsock_listener: 12,
            mem: Some(13),
        };
        let a = v.args(
            &spec,
            std::path::Path::new("/run/cocoon/v1"),
            Some(&inherited),
            None,
            Some(14),
            15,
        );
        let after = |f: &str| {
            a.windows(2)
                .find(|w| w[0] == f)
                .map(|w| w[1].clone())
                .unwrap()
        };
        assert_eq!(a[0], "run");
        assert_eq!(after("--kernel"), "/k");
        assert_eq!(after("--mem-mib"), "300");
        assert_eq!(after("--vcpus"), "2");
        assert_eq!(after("--vsock-uds"), "/run/cocoon/v1/vsock.sock");
        assert_eq!(after("--fs"), "/run/cocoon/v1/vhost/virtiofs.sock:cocoon");
        // Jailed by jail-exec, never by auto's silent fallback.
        assert_eq!(after("--jail"), "off");
        assert_eq!(after("--kvm-fd"), "11");
        assert_eq!(after("--vsock-uds-fd"), "12");
        assert_eq!(after("--mem-fd"), "13");
        // The console is a pipe the shim bounds, never a file the VMM writes.
        assert_eq!(after("--serial-out-fd"), "15");
        assert!(!a.iter().any(|x| x == "--serial-out"), "{a:?}");
        assert!(!a.iter().any(|x| x == "--huge-pages"), "{a:?}");
        assert!(after("--cmdline").ends_with("cocoon.log=debug"));
        assert!(after("--cmdline").contains("reboot=k"));
        assert_eq!(after("--net-fd"), "7,mac=02:00:00:00:00:01");
        assert!(a.iter().any(|x| x == "--free-page-reporting"), "{a:?}");
        // Room to grow only where the spec has it, with the API on the shim's listener.
        assert!(
            !a.iter()
                .any(|x| x == "--hotplug-mib" || x == "--api-sock-fd"),
            "{a:?}"
        );
        let mut grows = spec.clone();
        grows.hotplug_mib = 768;
        let g = v.args(&grows, std::path::Path::new("/r"), None, None, Some(14), 15);
        let after_g = |f: &str| g.windows(2).find(|w| w[0] == f).map(|w| w[1].clone());
        assert_eq!(after_g("--hotplug-mib").as_deref(), Some("768"));
        assert_eq!(after_g("--api-sock-fd").as_deref(), Some("14"));
        assert!(after_g("--cmdline").is_some_and(|c| c.contains("memhp_default_state=online")));
        let threads = after_g("--cmdline")
            .and_then(|c| {
                c.split(' ')
                    .find_map(|p| p.strip_prefix("sysctl.kernel.threads-max="))
                    .and_then(|v| v.parse::<u32>().ok())
            })
            .unwrap_or(0);
        assert!(threads >= (spec.memory_mib + 768) * 8, "{g:?}");
        // Restored, the region is the template's: only the API's descriptor is given.
        let t = Some(std::path::Path::new("/t"));
        let rg = v.args(&grows, std::path::Path::new("/r"), None, t, Some(14), 15);
        assert!(!rg.iter().any(|x| x == "--hotplug-mib"), "{rg:?}");
        assert!(
            rg.windows(2)
                .any(|w| w[0] == "--api-sock-fd" && w[1] == "14"),
            "{rg:?}"
        );
        // Disk slots alone also give the VMM the API; restored, the slots are the
        // template's.
        let mut slotted = spec.clone();
        slotted.block_slots = 4;
        let s = v.args(
            &slotted,
            std::path::Path::new("/r"),
            None,
            None,
            Some(14),
            15,
        );
        let after_s = |f: &str| s.windows(2).find(|w| w[0] == f).map(|w| w[1].clone());
        assert_eq!(after_s("--block-slots").as_deref(), Some("4"));
        assert_eq!(after_s("--api-sock-fd").as_deref(), Some("14"));
        assert_eq!(after_s("--hotplug-mib"), None);
        let rs = v.args(&slotted, std::path::Path::new("/r"), None, t, Some(14), 15);
        assert!(!rs.iter().any(|x| x == "--block-slots"), "{rs:?}");
        assert!(rs.iter().any(|x| x == "--api-sock-fd"), "{rs:?}");
        // Restored from a template: the template holds the kernel, command line, memory
        // and vCPUs; the pod's own devices and descriptors are given as for a boot.
        let r = v.args(
            &spec,
            std::path::Path::new("/run/cocoon/v1"),
            Some(&inherited),
            Some(std::path::Path::new("/run/cocoon/+templates/k")),
            None,
            15,
        );
        let after_r = |f: &str| r.windows(2).find(|w| w[0] == f).map(|w| w[1].clone());
        assert_eq!(
            after_r("--restore").as_deref(),
            Some("/run/cocoon/+templates/k")
        );
        for gone in ["--kernel", "--initrd", "--cmdline", "--mem-mib", "--vcpus"] {
            assert_eq!(after_r(gone), None, "{gone} with --restore: {r:?}");
        }
        for kept in [
            "--vsock-uds",
            "--fs",
            "--kvm-fd",
            "--mem-fd",
            "--serial-out-fd",
        ] {
            assert_eq!(after_r(kept), Some(after(kept)), "{kept}");
        }
    }

    #[test]
    fn cold_booted_pods_take_free_page_reports_and_template_pods_do_not() {
        let mut config = Config::default();
        assert!(takes_free_page_reports(&config), "on by default");
        config.vm.templates = true;
        assert!(
            !takes_free_page_reports(&config),
            "a template has no balloon"
        );
        config.vm.templates = false;
        config.vm.free_page_reporting = false;
        assert!(!takes_free_page_reports(&config), "turned off");
    }
}
