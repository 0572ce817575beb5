//! The pod sandbox: one VM per pod, its virtio-fs share, and the connection
//! to its agent. Created by the first container of the pod, stopped when the
//! shim shuts down with no container left.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cocoon_protocol::agent::CreateSandboxRequest;
use thiserror::Error;
use tokio::sync::Mutex;

pub mod disks;
mod limits;

use super::mounts::MountError;
use super::persist::ContainerState;
use super::pod::PodVm;
use super::share::PodShare;
use crate::agent_client::{AgentClient, AgentError};
use crate::config::Config;
use crate::hostcgroup::{HostCgroup, CGROUP_ROOT};
use crate::hypervisor::userns::PodUserns;
use crate::hypervisor::watch::VmWatch;
use crate::hypervisor::{self, find_binary, HypervisorError, NetAttach, SharedDir, Vm, VmSpec};
use crate::podnet::{PodNetError, PodNetwork};

/// The virtio-fs tag of the pod share.
pub const SHARE_TAG: &str = "cocoon";

#[derive(Debug, Error)]
pub enum SandboxError {
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error("cannot carry the pod network into the VM")]
    Network(#[from] PodNetError),
    #[error("cannot read the host's random bytes for the guest")]
    Entropy(#[source] std::io::Error),
    #[error("the guest refused the pod network ({what})")]
    GuestNetwork {
        what: &'static str,
        #[source]
        source: AgentError,
    },
}

pub struct Sandbox {
    pub id: String,
    pub agent: AgentClient,
    pub share: PathBuf,
    /// The namespace the share's mounts are idmapped with (`[jail] virtiofsd`).
    pub share_userns: Option<Arc<PodUserns>>,
    /// The pod's mount namespace, where the share's mounts live (`podns`).
    pub share_ns: Option<Arc<super::podns::PodNs>>,
    pub run_dir: PathBuf,
    vm: Mutex<Option<Vm>>,
    /// Host pids of the VM's processes, for the on-disk state.
    pub pids: Vec<u32>,
    /// The VMM program's pid, which the state given to OCI hooks names.
    pub vmm_pid: Option<u32>,
    /// How the boot went, for the timing records.
    pub boot: BootTimes,
    /// The pod's network (CRI pods), undone when the VM stops.
    net: Option<PodNetwork>,
    /// Serves `PortForward` into the guest while the VM runs.
    forwarder: Option<tokio::task::JoinHandle<()>>,
    /// The pod's host cgroup, which the VM's processes joined; removed after them.
    host_cgroup: std::sync::Mutex<Option<HostCgroup>>,
    /// Ends the VM when any of its host processes exits (see `hypervisor::watch`).
    watcher: tokio::task::JoinHandle<()>,
    /// Why the VM is gone, once it is.
    lost: Arc<std::sync::Mutex<Option<String>>>,
    /// Turns true when `lost` is set, for those waiting on the guest.
    lost_tx: tokio::sync::watch::Sender<bool>,
    /// What the shim counts for `cocoon metrics` (agent calls, containers, OOMs).
    pub stats: Arc<crate::telemetry::PodStats>,
    /// The guest's memory, as launched.
    pub memory_mib: u32,
    /// The VM's vCPUs, online and held offline, and its containers' CPU limits.
    cpus: std::sync::Mutex<super::sizing::CpuRoom>,
    /// Held across an `OnlineCpus` call: one at a time per pod.
    onlining: Mutex<()>,
    /// The VM's memory and its room to grow, and its containers' memory limits, when
    /// it was launched with room (`[vm] hotplug_memory`).
    memory: std::sync::Mutex<Option<super::sizing::MemRoom>>,
    /// How to have the guest plug more of its room, and how long one step may take.
    memory_control: Option<(crate::hypervisor::memctl::MemoryControl, Duration)>,
    /// Held while memory is being plugged: one resize at a time per pod.
    plugging: Mutex<()>,
    /// The raw block devices plugged for its containers.
    pub disks: disks::Disks,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct BootTimes {
    pub vm_launch: Duration,
    pub agent_ready: Duration,
    pub sandbox_setup: Duration,
    /// When the VMM was spawned, the agent answered and the sandbox was set up.
    pub marks: Option<(Instant, Instant, Instant)>,
    /// The VM was restored from a VM template instead of booted.
    pub from_template: bool,
}

/// The VM id for a pod: short, path-safe, and unique per namespace+group.
pub fn vm_id(namespace: &str, group: &str) -> String {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(format!("{namespace}/{group}").as_bytes());
    format!("pod-{}", &hex::encode(h)[..24])
}

impl Sandbox {
    /// Boots the pod VM, sized as the pod asks. Its `netns` is the host network
    /// namespace CNI prepared for a Kubernetes pod, carried into the guest (see
    /// `crate::podnet`).
    pub async fn start(
        config: &Config,
        vm_id: &str,
        sandbox_id: &str,
        pod_vm: PodVm,
    ) -> Result<Self, SandboxError> {
        let mut config = config.clone();
        let base = (config.vm.vcpus, config.vm.memory_mib);
        let (vcpus, memory_mib, note) = super::sizing::vm_size(
            base,
            (pod_vm.vcpus, pod_vm.memory_mib),
            pod_vm.limits,
            config.vm.size_from_pod_limits,
            super::sizing::host_capacity(&config.vm),
        );
        if let Some(note) = note {
            tracing::info!(vm = %vm_id, "{note}");
        }
        (config.vm.vcpus, config.vm.memory_mib) = (vcpus, memory_mib);
        // A template per size would let pods' annotations and limits fill the host
        // with saved VMs: only the config's own size is restored from one.
        if config.vm.templates && (vcpus, memory_mib) != base {
            tracing::info!(
                vm = %vm_id,
                "booted, not restored from a template: the pod's VM is not the config's size"
            );
            config.vm.templates = false;
        }
        // With vCPU hotplug, all the vCPUs raised limits could ever bring online exist
        // from the start, those beyond the pod's size held offline by the guest kernel.
        // (A confidential launch never gets here: the shim refuses those pods.)
        let present = if config.vm.hotplug_vcpus
            && config.vm.size_from_pod_limits
            && pod_vm.vcpus.is_none()
        {
            let (host, _) = super::sizing::host_capacity(&config.vm);
            host.min(super::sizing::MAX_HOTPLUG_VCPUS).max(vcpus)
        } else {
            vcpus
        };
        if present > vcpus {
            tracing::info!(
                vm = %vm_id,
                "{present} vCPUs, {vcpus} online at boot; raised CPU limits bring more online"
            );
            config.vm.vcpus = present;
            config.vm.kernel_params = format!("maxcpus={vcpus} {}", config.vm.kernel_params)
                .trim_end()
                .to_owned();
        }
        // The pod's own disk slots. Templates key on the count: only the config's own
        // is restored from one, as for the size.
        if let Some(slots) = pod_vm.block_slots.filter(|&n| n != config.vm.block_slots) {
            tracing::info!(
                vm = %vm_id,
                "{slots} disk slots, as the pod's annotation asks (cocoon-vmm's and microvm's; QEMU's pc plugs disks)"
            );
            if config.vm.templates {
                tracing::info!(
                    vm = %vm_id,
                    "booted, not restored from a template: the pod asks for its own disk slots"
                );
                config.vm.templates = false;
            }
            config.vm.block_slots = slots;
        }
        let cpus = super::sizing::CpuRoom::new(base.0, vcpus, present);
        // With memory hotplug, a region up to the most a pod's limits may make a VM,
        // which raised limits have the guest plug (a VM sized by annotation keeps it).
        let region = if config.vm.hotplug_memory && pod_vm.memory_mib.is_none() {
            let (_, max) = super::sizing::host_capacity(&config.vm);
            crate::hypervisor::memctl::region_mib(memory_mib, max)
        } else {
            0
        };
        config.vm.hotplug_memory = region > 0;
        if region > 0 {
            tracing::info!(
                vm = %vm_id,
                "{memory_mib} MiB of memory at boot, room for {region} MiB more for raised \
                 memory limits"
            );
            // Exactly what `boot_with` launches with.
            config.vm.max_memory_mib = memory_mib + region;
        }
        let memory = (region > 0).then(|| super::sizing::MemRoom::new(base.1, memory_mib, region));
        let config = &config;
        let netns = pod_vm.netns;
        let host_cgroup = pod_vm.host_cgroup;
        let init_data = pod_vm.init_data;
        let path = config.paths.run_dir.join("shares").join(vm_id);
        let userns = if config.jail.enabled && config.jail.virtiofsd {
            let j = &config.jail;
            Some(Arc::new(PodUserns::for_pod(
                &j.share_lock_file,
                j.share_id_base,
                j.share_ranges,
                vm_id,
                &pod_vm.share_ids,
            )?))
        } else {
            None
        };
        // A share left by a crashed shim must not be exported twice.
        super::share::remove(&path, None);
        // The pod's mount namespace keeps the shares and the virtiofsd it will exec.
        let keep = vec![
            config.paths.run_dir.join("shares"),
            virtiofsd_binary(config)?,
        ];
        let made = tokio::task::spawn_blocking(move || super::podns::PodNs::new(&keep)).await;
        let mount_ns = made
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
            .map(Arc::new)
            .map_err(|e| super::mounts::MountError::Share(path.clone(), e))?;
        super::share::create(&path, userns.as_deref(), Some(&mount_ns))?;
        let share = PodShare {
            path,
            userns,
            mount_ns: Some(mount_ns),
        };
        // Undone on every way out but success, a dropped (abandoned) boot included.
        let mut share_guard = ShareGuard(Some(share.clone()));
        let net = match netns {
            Some(path) => {
                let attached = tokio::task::spawn_blocking(move || PodNetwork::attach(&path)).await;
                match attached.unwrap_or(Err(PodNetError::Thread)) {
                    Ok(n) => Some(n),
                    Err(e) => return Err(e.into()),
                }
            }
            None => None,
        };
        let result = Self::boot(
            config,
            vm_id,
            sandbox_id,
            &share,
            net,
            host_cgroup,
            init_data,
        )
        .await;
        if result.is_ok() {
            share_guard.0 = None;
        }
        result.map(|mut sb| {
            sb.cpus = std::sync::Mutex::new(cpus);
            sb.memory = std::sync::Mutex::new(memory);
            sb
        })
    }

    async fn boot(
        config: &Config,
        vm_id: &str,
        sandbox_id: &str,
        share: &PodShare,
        mut net: Option<PodNetwork>,
        host_cgroup: Option<String>,
        init_data: Option<Vec<u8>>,
    ) -> Result<Self, SandboxError> {
        let result = Self::boot_with(
            config,
            vm_id,
            sandbox_id,
            share,
            &mut net,
            host_cgroup,
            init_data,
        )
        .await;
        match result {
            Ok(mut sb) => {
                sb.net = net;
                Ok(sb)
            }
            Err(e) => {
                if let Some(n) = &net {
                    n.detach();
                }
                Err(e)
            }
        }
    }

    async fn boot_with(
        config: &Config,
        vm_id: &str,
        sandbox_id: &str,
        share: &PodShare,
        net: &mut Option<PodNetwork>,
        host_cgroup: Option<String>,
        init_data: Option<Vec<u8>>,
    ) -> Result<Self, SandboxError> {
        let hv = hypervisor::from_config(config)?;
        let mut spec = VmSpec::from_config(config, vm_id);
        if config.vm.hotplug_memory {
            spec.hotplug_mib = crate::hypervisor::memctl::region_mib(
                config.vm.memory_mib,
                config.vm.max_memory_mib,
            );
        }
        spec.shared_dir = Some(SharedDir {
            path: share.path.clone(),
            tag: SHARE_TAG.into(),
            virtiofsd: virtiofsd_binary(config)?,
            userns: share.userns.clone(),
            mount_ns: share.mount_ns.clone(),
        });
        spec.net = net.as_ref().and_then(|n| {
            n.tap.as_ref().map(|fd| NetAttach {
                tap_fd: std::os::fd::AsRawFd::as_raw_fd(fd),
                mac: n.interface.hw_addr.clone(),
            })
        });
        let t0 = std::time::Instant::now();
        let launched = hv.launch(&spec).await;
        // The VMM holds the tap now (or failed to start): with the shim's copy closed,
        // the tap goes away with the VMM.
        if let Some(n) = net.as_mut() {
            n.tap = None;
        }
        let mut vm = launched?;
        // At once, so that the guest's memory, touched as it boots, is charged to the pod.
        let host_cgroup = host_cgroup.and_then(|path| join_host_cgroup(vm_id, &path, &vm.pids()));
        let t_launched = std::time::Instant::now();
        let boot = Duration::from_millis(config.vm.boot_timeout_ms);
        let call = Duration::from_millis(config.vm.call_timeout_ms);
        let agent = match AgentClient::wait_ready(&mut vm, boot, call).await {
            Ok(a) => a,
            Err(e) => {
                keep_console(&config.paths.run_dir, vm_id, &vm.console_log);
                return Err(e.into());
            }
        };
        let t_ready = std::time::Instant::now();
        let stats = Arc::new(crate::telemetry::PodStats::default());
        let agent = agent.with_stats(stats.clone());
        let lost = Arc::new(std::sync::Mutex::new(None));
        let lost_tx = tokio::sync::watch::channel(false).0;
        // The pod's init-data first: from then on the agent enforces its policy on
        // every call, this shim's included.
        if let Some(toml) = init_data {
            let r = agent.set_init_data(toml).await?;
            tracing::info!(
                vm = vm_id,
                digest = %hex::encode(&r.digest),
                policy = r.policy,
                "init-data handed to the guest"
            );
        }
        let mut req = CreateSandboxRequest::new();
        req.sandbox_id = sandbox_id.into();
        req.shared_fs_tag = SHARE_TAG.into();
        // Under runc a container without a hostname of its own sees the
        // host's (its new UTS namespace starts as a copy); give the guest
        // the same, so the container cannot tell the difference.
        req.hostname = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        // For the guest's CRNG (a VM restored from a template starts with the template's).
        let mut entropy = vec![0u8; 32];
        std::io::Read::read_exact(
            &mut std::fs::File::open("/dev/urandom").map_err(SandboxError::Entropy)?,
            &mut entropy,
        )
        .map_err(SandboxError::Entropy)?;
        req.host_entropy = entropy;
        // Last, so the guest's clock (crate::clock in the agent) is set to a fresh reading.
        req.host_realtime_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        agent.create_sandbox(req).await?;
        let mut forwarder = None;
        if let Some(n) = net.as_ref() {
            // A restored guest's NIC has the template's MAC; the agent gives it the pod's.
            let current = vm
                .template
                .as_ref()
                .map(|_| crate::hypervisor::template::TEMPLATE_MAC);
            let got = agent
                .update_interface(n.interface.clone(), current)
                .await
                .map_err(|source| SandboxError::GuestNetwork {
                    what: "interface",
                    source,
                })?;
            agent
                .update_routes(n.routes.clone())
                .await
                .map_err(|source| SandboxError::GuestNetwork {
                    what: "routes",
                    source,
                })?;
            let listener = n.forward.as_ref().and_then(|l| l.try_clone().ok());
            forwarder = listener.map(|l| crate::portfwd::spawn(l, vm.vsock_uds.clone()));
            tracing::info!(
                vm = vm_id,
                interface = %got.name,
                mac = %got.hw_addr,
                "pod network carried into the guest"
            );
        }
        tracing::info!(
            vm = vm_id,
            "sandbox ready in {:?}",
            vm.times.started.elapsed()
        );
        Ok(Self {
            id: vm_id.into(),
            agent,
            share: share.path.clone(),
            share_userns: share.userns.clone(),
            share_ns: share.mount_ns.clone(),
            run_dir: vm.run_dir.clone(),
            pids: vm.pids(),
            vmm_pid: vm.vmm_program_pid(),
            boot: BootTimes {
                vm_launch: t_launched - t0,
                agent_ready: t_ready - t_launched,
                sandbox_setup: t_ready.elapsed(),
                marks: Some((t_launched, t_ready, Instant::now())),
                from_template: vm.template.is_some(),
            },
            watcher: watch_vm(
                vm_id,
                VmWatch::new(&vm.pids()),
                lost.clone(),
                lost_tx.clone(),
            ),
            lost,
            lost_tx,
            stats,
            memory_mib: config.vm.memory_mib,
            cpus: std::sync::Mutex::new(super::sizing::CpuRoom::new(
                config.vm.vcpus,
                config.vm.vcpus,
                config.vm.vcpus,
            )),
            onlining: Mutex::new(()),
            memory: std::sync::Mutex::new(None),
            memory_control: vm.memory_control.clone().map(|c| (c, call)),
            plugging: Mutex::new(()),
            disks: disks::Disks::new(
                vm.qmp.clone().map(disks::Bus::Qmp).or_else(|| {
                    let (vmm, count) = vm.disk_slots.clone()?;
                    Some(disks::Bus::Slots { vmm, count })
                }),
                call,
            ),
            vm: Mutex::new(Some(vm)),
            net: None,
            forwarder,
            host_cgroup: std::sync::Mutex::new(host_cgroup),
        })
    }

    /// The pod cgroup directories created for the VM's processes (for the state file).
    pub fn host_cgroup_dirs(&self) -> Vec<PathBuf> {
        self.host_cgroup
            .lock()
            .ok()
            .and_then(|c| c.as_ref().map(HostCgroup::dirs))
            .unwrap_or_default()
    }

    /// What `shim delete` needs to take this VM and container `cid`'s `mounts` away,
    /// should the shim die.
    pub fn state_for(&self, cid: &str, mounts: &super::mounts::ContainerMounts) -> ContainerState {
        ContainerState {
            container_id: cid.into(),
            vm_id: self.id.clone(),
            vm_run_dir: self.run_dir.clone(),
            share: self.share.clone(),
            vm_pids: self.pids.clone(),
            mounts: mounts.clone(),
            host_cgroup: self.host_cgroup_dirs(),
            shim: super::persist::Shim::this(),
            poststop_pending: false,
        }
    }

    /// Why the pod's VM is gone, if it is (one of its host processes exited).
    /// Returns once the VM is lost (at once if it already is). A call waiting on the
    /// guest must not rely on the connection failing: one made after the vsock backend
    /// died can wait on a dead connection for good.
    pub async fn until_lost(&self) {
        let mut rx = self.lost_tx.subscribe();
        let _ = rx.wait_for(|l| *l).await;
    }

    pub fn lost(&self) -> Option<String> {
        self.lost.lock().ok().and_then(|l| l.clone())
    }

    /// Ends the VM at once, for `why`: its watcher then reports it lost, which ends every
    /// task of the pod as a lost VM does. `stop` still reaps and cleans up.
    pub async fn end(&self, why: String) {
        tracing::error!(vm = %self.id, "ending the pod VM: {why}");
        if let Ok(mut l) = self.lost.lock() {
            l.get_or_insert(why);
        }
        if let Some(vm) = self.vm.lock().await.as_ref() {
            vm.kill();
        }
    }

    pub fn vsock_uds(&self) -> PathBuf {
        self.run_dir.join("vsock.sock")
    }

    /// Powers the guest off (killing it if it does not go in time), reaps
    /// every process and removes the share.
    pub async fn stop(&self) {
        let t = std::time::Instant::now();
        let Some(mut vm) = self.vm.lock().await.take() else {
            return;
        };
        // A stop ends the processes on purpose: not a loss to report.
        self.watcher.abort();
        // A VM whose processes died before this stop failed, whether or not the
        // watcher got to say so before it was aborted (containerd may ask for the stop
        // as soon as the agent's connection drops).
        let died = self.lost().is_some() || self.pids.iter().any(|&p| !running(p));
        if died {
            // The console's last lines (a panic, say) are in the file once the copy
            // has caught up with the VMM's end.
            vm.settle_logs().await;
            if let Some(run_root) = self.run_dir.parent() {
                keep_console(run_root, &self.id, &self.run_dir.join("console.log"));
            }
        }
        // A lost VM has no agent to ask (its processes are already being killed). A
        // guest that synced its filesystems and replied is ended at once; one whose
        // connection closed first may be powering off and gets a grace for it. Nothing
        // else waits: the wait would only push Shutdown past containerd's deadline, and
        // a shim killed for that mid-teardown leaves the share and the pod cgroup behind.
        let mut grace = Duration::ZERO;
        if !died {
            match self.agent.sync_for_stop().await {
                Ok(true) => {}
                Ok(false) => grace = Duration::from_secs(5),
                Err(e) => tracing::warn!("agent shutdown: {e}"),
            }
        }
        if let Some(f) = &self.forwarder {
            f.abort();
        }
        let synced = t.elapsed();
        vm.stop(grace).await;
        // Whatever still waits on the guest (an abandoned Create's undo, say) ends now,
        // rather than at its own deadline.
        self.lost_tx.send_replace(true);
        let ended = t.elapsed();
        super::share::remove(&self.share, self.share_ns.as_deref());
        let cg = self.host_cgroup.lock().ok().and_then(|mut c| c.take());
        if let Some(mut cg) = cg {
            let _ = tokio::task::spawn_blocking(move || cg.remove()).await;
        }
        if let Some(n) = &self.net {
            let (netns, dev) = (n.netns.clone(), n.interface.name.clone());
            let _ = tokio::task::spawn_blocking(move || crate::podnet::detach(&netns, &dev)).await;
        }
        tracing::debug!(
            synced_ms = synced.as_millis() as u64,
            vm_ended_ms = ended.as_millis() as u64,
            cleaned_ms = t.elapsed().as_millis() as u64,
            "VM stopped"
        );
        if let Some(run_root) = self.run_dir.parent() {
            let rec = super::timings::Record {
                kind: "vm-stop".into(),
                vm_id: self.id.clone(),
                vm_stop_ms: super::timings::ms(t.elapsed()),
                ..Default::default()
            };
            super::timings::append(run_root, &rec);
        }
    }
}

/// What a boot of `vm_id` may leave on the host before it has pids to record: its run
/// directory, its share, its pod cgroup. Saved in the bundle before the boot, so that
/// containerd's `shim delete` after a shim killed mid-boot still finds them.
pub fn pending_state(config: &Config, vm_id: &str, pod_vm: &PodVm) -> ContainerState {
    let host_cgroup = pod_vm
        .host_cgroup
        .as_deref()
        .and_then(|p| crate::hostcgroup::relative_path(p).ok())
        .and_then(|rel| {
            crate::hostcgroup::hierarchy_dirs(std::path::Path::new(CGROUP_ROOT), &rel).ok()
        })
        .unwrap_or_default();
    ContainerState {
        vm_id: vm_id.into(),
        vm_run_dir: config.paths.run_dir.join(vm_id),
        share: config.paths.run_dir.join("shares").join(vm_id),
        host_cgroup,
        shim: super::persist::Shim::this(),
        ..Default::default()
    }
}

/// Moves the VM's host processes into the pod's cgroup. A host where that fails (no
/// writable cgroupfs) still runs the pod, unaccounted, and says why.
fn join_host_cgroup(vm_id: &str, cgroups_path: &str, pids: &[u32]) -> Option<HostCgroup> {
    match HostCgroup::join(std::path::Path::new(CGROUP_ROOT), cgroups_path, pids) {
        Ok(cg) => {
            tracing::info!(
                vm = vm_id,
                cgroup = cgroups_path,
                "VM processes in the pod cgroup"
            );
            Some(cg)
        }
        Err(e) => {
            tracing::warn!(
                vm = vm_id,
                "the VM's host processes stay outside the pod cgroup (the node will not \
                 account them): {:#}",
                anyhow::Error::new(e)
            );
            None
        }
    }
}

/// Ends the VM as soon as one of its host processes exits: the rest are killed, so every
/// guest call fails at once and every task of the pod is reported exited.
fn watch_vm(
    vm_id: &str,
    watch: VmWatch,
    lost: Arc<std::sync::Mutex<Option<String>>>,
    lost_tx: tokio::sync::watch::Sender<bool>,
) -> tokio::task::JoinHandle<()> {
    let vm_id = vm_id.to_string();
    tokio::spawn(async move {
        let (name, pid) = watch.first_exit().await;
        let why = format!("{name} (pid {pid}) exited");
        tracing::error!(vm = %vm_id, "pod VM lost: {why}; stopping the rest of it");
        // A VM ended on purpose (`Sandbox::end`) keeps the reason it was ended for.
        if let Ok(mut l) = lost.lock() {
            l.get_or_insert(why);
        }
        lost_tx.send_replace(true);
        watch.kill_all();
    })
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with(['Z', 'X']))
    })
}

/// Keeps a failed VM's console for `cocoon logs` after its run directory is gone.
fn keep_console(run_root: &std::path::Path, vm_id: &str, console: &std::path::Path) {
    match crate::consolelog::keep_failed(run_root, vm_id, console) {
        Ok(kept) => tracing::info!(vm = vm_id, "console kept in {}", kept.display()),
        Err(e) => tracing::warn!(vm = vm_id, "cannot keep the console: {e}"),
    }
}

/// The virtiofsd to run, as an absolute path without links: it is exec'd in the pod's
/// mount namespace (`podns`), whose `/` is the node's but whose cwd is not the shim's.
fn virtiofsd_binary(config: &Config) -> Result<PathBuf, SandboxError> {
    let found = find_binary("virtiofsd", &config.paths.virtiofsd)?;
    Ok(std::fs::canonicalize(&found).unwrap_or(found))
}

/// Unmounts a pod share when dropped while still holding it.
struct ShareGuard(Option<PodShare>);

impl Drop for ShareGuard {
    fn drop(&mut self) {
        if let Some(share) = self.0.take() {
            super::share::remove(&share.path, share.mount_ns.as_deref());
        }
    }
}
