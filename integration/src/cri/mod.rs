//! A private containerd with its CRI plugin on, driven over CRI's gRPC socket the way
//! kubelet drives it: pods on a CNI bridge network of their own, the `runc` and `cocoon`
//! runtime handlers, images built here (no registry is reachable). Dropping a node removes
//! the pods it still has, stops containerd, kills its shims and deletes its bridge.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerStatusRequest, CreateContainerRequest, DnsConfig,
    ExecSyncRequest, ImageSpec, ImageStatusRequest, LinuxContainerConfig,
    LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    ListPodSandboxRequest, NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata,
    PodSandboxStatusRequest, PodSandboxStatusResponse, RemovePodSandboxRequest,
    RunPodSandboxRequest, StartContainerRequest, StatusRequest, StopPodSandboxRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Status;

use crate::containerd::tool_path;
use crate::image::{IMAGE_REF, PAUSE_ENTRYPOINT, PAUSE_REF};

mod setup;
use setup::{bridge_name, cni_conflist, containerd_config, spawn_containerd};
pub use setup::{subnet_v6, write_shim_config, write_shim_config_vm, write_shim_config_with};

/// The runtime handlers a node's containerd knows (its `runtimes` table).
pub const RUNC: &str = "runc";
pub const COCOON: &str = "cocoon";
/// A second Cocoon handler whose config is `ALT_CONFIG` in the node's directory, named
/// by containerd's runtime options (`ConfigPath`) rather than the environment.
pub const COCOON_ALT: &str = "cocoon-alt";
pub const ALT_CONFIG: &str = "cocoon-alt.toml";

/// Debian's CNI plugins (`containernetworking-plugins`) and the ones a node's network uses.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";
const CNI_PLUGINS: [&str; 3] = ["bridge", "host-local", "loopback"];

/// Long enough for a cocoon pod's VM to boot under TCG; a hung call still ends.
const RPC_TIMEOUT: Duration = Duration::from_secs(180);
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why this host cannot give pods a CNI network, if it cannot.
pub fn cni_missing() -> Option<String> {
    let absent: Vec<&str> = CNI_PLUGINS
        .into_iter()
        .filter(|p| !Path::new(CNI_BIN_DIR).join(p).is_file())
        .collect();
    (!absent.is_empty()).then(|| {
        format!(
            "CNI plugins {absent:?} not in {CNI_BIN_DIR} (apt-get install containernetworking-plugins)"
        )
    })
}

/// The `198.18.<subnet_index>.0/24` test network (RFC 2544's benchmarking range).
pub fn subnet(subnet_index: u8) -> (Ipv4Addr, u8) {
    (Ipv4Addr::new(198, 18, subnet_index, 0), 24)
}

/// What containerd reports about a sandbox in its verbose status.
#[derive(Debug, Clone)]
pub struct PodInfo {
    /// The sandbox (pause) process on the host.
    pub pid: u32,
    /// The network namespace CNI set up (`/var/run/netns/cni-…`).
    pub netns: Option<PathBuf>,
}

pub struct CriNode {
    pub dir: PathBuf,
    cocoon_config: PathBuf,
    pub address: PathBuf,
    pub subnet_index: u8,
    child: Option<Child>,
    channel: Channel,
}

impl CriNode {
    /// Starts containerd under `dir` with `cocoon_config` as the shim's COCOON_CONFIG, a
    /// CNI bridge network on `198.18.<subnet_index>.0/24` (tests that run at the same time
    /// need distinct indices) and the pause and busybox images; returns once CRI reports
    /// the runtime and the network ready and sees both images.
    pub async fn start(dir: &Path, cocoon_config: &Path, subnet_index: u8) -> CriNode {
        Self::start_with(dir, cocoon_config, subnet_index, false).await
    }

    /// As `start`; with `ipv6`, pods also get an address in `fd00:cc:<subnet_index>::/64`
    /// (a dual-stack CNI configuration).
    pub async fn start_with(
        dir: &Path,
        cocoon_config: &Path,
        subnet_index: u8,
        ipv6: bool,
    ) -> CriNode {
        if let Some(why) = cni_missing() {
            panic!("{why}");
        }
        std::fs::create_dir_all(dir).unwrap();
        let address = dir.join("containerd.sock");
        std::fs::write(
            dir.join("containerd.toml"),
            containerd_config(dir, &address),
        )
        .unwrap();
        std::fs::create_dir_all(dir.join("cni")).unwrap();
        std::fs::write(
            dir.join("cni/10-cocoon-test.conflist"),
            cni_conflist(dir, subnet_index, ipv6),
        )
        .unwrap();
        let child = spawn_containerd(dir, cocoon_config);
        let mut node = CriNode {
            dir: dir.to_path_buf(),
            cocoon_config: cocoon_config.to_path_buf(),
            channel: unix_channel(&address),
            address,
            subnet_index,
            child: Some(child),
        };
        node.wait_ready().await;
        node.import(IMAGE_REF, &[]).await;
        node.import(PAUSE_REF, PAUSE_ENTRYPOINT).await;
        node
    }

    /// Restarts containerd (SIGTERM, then a new one on the same state), as a node's
    /// containerd upgrade or crash does; shims and pods live on. Returns once CRI is
    /// ready again.
    pub async fn restart_containerd(&mut self) {
        self.stop();
        self.child = Some(spawn_containerd(&self.dir, &self.cocoon_config));
        self.channel = unix_channel(&self.address);
        self.wait_ready().await;
    }

    /// The bridge CNI creates on the host for this node's pods.
    pub fn bridge(&self) -> String {
        bridge_name(self.subnet_index)
    }

    /// The node's pod network's gateway, the bridge's address on the host.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.subnet_index, 1)
    }

    pub fn runtime(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(self.channel.clone())
    }

    pub fn images(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel.clone())
    }

    /// `ctr` against this containerd, in CRI's `k8s.io` namespace.
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.address)
            .args(["--namespace", "k8s.io"])
            .args(args)
            .env("PATH", tool_path())
            .stdin(Stdio::null())
            .output()
            .expect("ctr")
    }

    /// containerd's whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        let text = self.log();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Polls CRI's `Status` until RuntimeReady and NetworkReady (the latter needs CNI's
    /// config loaded), or panics with what it last saw.
    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("containerd exited ({status}): {}", self.log_tail());
            }
            let last = match self
                .runtime()
                .status(StatusRequest { verbose: false })
                .await
            {
                Ok(r) => {
                    let conditions = r.into_inner().status.unwrap_or_default().conditions;
                    let ready = |t: &str| conditions.iter().any(|c| c.r#type == t && c.status);
                    if ready("RuntimeReady") && ready("NetworkReady") {
                        return self.assert_major_version().await;
                    }
                    format!("{conditions:?}")
                }
                Err(e) => e.to_string(),
            };
            assert!(
                Instant::now() < deadline,
                "CRI not ready after {READY_TIMEOUT:?}: {last}\ncontainerd log:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A node of a test that asked for containerd 2 (`use_containerd2`) runs it, not
    /// another one that happened to be first on PATH.
    async fn assert_major_version(&self) {
        let v = self
            .runtime()
            .version(k8s_cri::v1::VersionRequest::default())
            .await
            .expect("CRI Version")
            .into_inner();
        let got = v.runtime_version.trim_start_matches('v');
        assert!(
            crate::containerd::major_version_in_use() < 2 || got.starts_with("2."),
            "the test asked for containerd 2; the node runs containerd {got}"
        );
    }

    /// Imports a busybox image into `k8s.io`, where CRI looks, and waits until CRI's
    /// `ImageStatus` knows it (CRI learns of it from containerd's image events).
    async fn import(&self, image_ref: &str, entrypoint: &[&str]) {
        let name = image_ref.rsplit('/').next().unwrap().replace(':', "-");
        let tar = self.dir.join(format!("{name}.tar"));
        crate::image::write_image(Path::new("/bin/busybox"), &tar, image_ref, entrypoint);
        let out = self.ctr(&["images", "import", &tar.to_string_lossy()]);
        assert!(
            out.status.success(),
            "import {image_ref}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let status = self
                .images()
                .image_status(ImageStatusRequest {
                    image: Some(image_spec(image_ref)),
                    verbose: false,
                })
                .await;
            if status.is_ok_and(|s| s.into_inner().image.is_some()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "CRI does not see {image_ref} after importing it:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Has this node's containerd reach the registry at `addr` (`host:port`) over plain
    /// HTTP, as a node's `hosts.toml` says so.
    pub fn plain_http_registry(&self, addr: &str) {
        let dir = self.dir.join("certs.d").join(addr);
        std::fs::create_dir_all(&dir).unwrap();
        let hosts = format!(
            "server = \"http://{addr}\"\n[host.\"http://{addr}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        );
        std::fs::write(dir.join("hosts.toml"), hosts).unwrap();
    }

    /// The runtime's version as CRI's Version call gives it (containerd's: "v1.6.20").
    pub async fn runtime_version(&self) -> Result<String, Status> {
        let reply = self
            .runtime()
            .version(k8s_cri::v1::VersionRequest::default())
            .await?;
        Ok(reply.into_inner().runtime_version)
    }

    /// Pulls `image` as kubelet does before it creates a container of it; returns the
    /// image's reference as CRI gives it (kubelet creates containers with that).
    pub async fn pull_image(&self, image: &str) -> Result<String, Status> {
        let reply = self
            .images()
            .pull_image(k8s_cri::v1::PullImageRequest {
                image: Some(image_spec(image)),
                ..Default::default()
            })
            .await?;
        Ok(reply.into_inner().image_ref)
    }

    /// A pod's config as kubelet writes it: metadata and kubelet's labels, a log
    /// directory, DNS, and Linux namespaces (the pod's network, a PID namespace per
    /// container). Handler-specific annotations are the caller's to add.
    pub fn pod_config(&self, name: &str, uid: &str, namespace: &str) -> PodSandboxConfig {
        let labels = HashMap::from([
            ("io.kubernetes.pod.name".to_string(), name.to_string()),
            ("io.kubernetes.pod.namespace".into(), namespace.into()),
            ("io.kubernetes.pod.uid".into(), uid.into()),
        ]);
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: uid.into(),
                namespace: namespace.into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: self
                .dir
                .join(format!("pods/{namespace}_{name}_{uid}"))
                .to_string_lossy()
                .into_owned(),
            dns_config: Some(DnsConfig {
                servers: vec![self.gateway().to_string()],
                searches: vec![format!("{namespace}.svc.cluster.local")],
                options: vec!["ndots:5".into()],
            }),
            labels,
            linux: Some(LinuxPodSandboxConfig {
                // As kubelet: the pod's own cgroup, below one per node here.
                cgroup_parent: format!("/{}/pod{uid}", self.cgroup_parent_root()),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(namespaces()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A container's config as kubelet writes it; `command` replaces the image's
    /// entrypoint and `args` its `Cmd` (empty: the image's).
    pub fn container_config(
        name: &str,
        image: &str,
        command: &[&str],
        args: &[&str],
    ) -> ContainerConfig {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(image_spec(image)),
            command: strings(command),
            args: strings(args),
            log_path: format!("{name}/0.log"),
            linux: Some(LinuxContainerConfig {
                resources: None,
                security_context: Some(LinuxContainerSecurityContext {
                    namespace_options: Some(namespaces()),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }
    }

    /// Gives `config` the masked and read-only paths kubelet sends for every container
    /// (its default `procMount`); containerd adds none of its own for CRI containers.
    pub fn with_kubelet_proc_masks(config: &mut ContainerConfig) {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let sc = config
            .linux
            .get_or_insert_with(Default::default)
            .security_context
            .get_or_insert_with(Default::default);
        sc.masked_paths = strings(&[
            "/proc/asound",
            "/proc/acpi",
            "/proc/kcore",
            "/proc/keys",
            "/proc/latency_stats",
            "/proc/timer_list",
            "/proc/timer_stats",
            "/proc/sched_debug",
            "/proc/scsi",
            "/sys/firmware",
            "/sys/devices/virtual/powercap",
        ]);
        sc.readonly_paths = strings(&[
            "/proc/bus",
            "/proc/fs",
            "/proc/irq",
            "/proc/sys",
            "/proc/sysrq-trigger",
        ]);
    }

    /// RunPodSandbox on `handler`; returns the pod's id. Like kubelet, makes the pod's
    /// log directory first.
    pub async fn run_pod(
        &self,
        config: &PodSandboxConfig,
        handler: &str,
    ) -> Result<String, Status> {
        std::fs::create_dir_all(&config.log_directory).unwrap();
        let r = self
            .runtime()
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.into(),
            })
            .await?;
        Ok(r.into_inner().pod_sandbox_id)
    }

    /// CreateContainer then StartContainer in `pod_id`; returns the container's id.
    pub async fn create_and_start(
        &self,
        pod_id: &str,
        config: &ContainerConfig,
        pod_config: &PodSandboxConfig,
    ) -> Result<String, Status> {
        let log = Path::new(&pod_config.log_directory).join(&config.log_path);
        std::fs::create_dir_all(log.parent().unwrap()).unwrap();
        let mut runtime = self.runtime();
        let id = runtime
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod_id.into(),
                config: Some(config.clone()),
                sandbox_config: Some(pod_config.clone()),
            })
            .await?
            .into_inner()
            .container_id;
        runtime
            .start_container(StartContainerRequest {
                container_id: id.clone(),
            })
            .await?;
        Ok(id)
    }

    /// ExecSync; returns the exit code, stdout and stderr. `timeout` is CRI's (whole
    /// seconds; zero: none).
    pub async fn exec_sync(
        &self,
        container_id: &str,
        cmd: &[&str],
        timeout: Duration,
    ) -> Result<(i32, String, String), Status> {
        let r = self
            .runtime()
            .exec_sync(ExecSyncRequest {
                container_id: container_id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: timeout.as_secs() as i64,
            })
            .await?
            .into_inner();
        Ok((
            r.exit_code,
            String::from_utf8_lossy(&r.stdout).into_owned(),
            String::from_utf8_lossy(&r.stderr).into_owned(),
        ))
    }

    /// StopPodSandbox: stops its containers and tears down its network.
    pub async fn stop_pod(&self, pod_id: &str) -> Result<(), Status> {
        self.runtime()
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod_id.into(),
            })
            .await?;
        Ok(())
    }

    /// RemovePodSandbox: removes a stopped pod and its containers.
    pub async fn remove_pod(&self, pod_id: &str) -> Result<(), Status> {
        self.runtime()
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod_id.into(),
            })
            .await?;
        Ok(())
    }

    /// StopPodSandbox then RemovePodSandbox, as kubelet does when a pod is deleted.
    pub async fn stop_and_remove_pod(&self, pod_id: &str) -> Result<(), Status> {
        self.stop_pod(pod_id).await?;
        self.remove_pod(pod_id).await
    }

    /// The ids of every pod sandbox containerd knows.
    pub async fn pod_ids(&self) -> Result<Vec<String>, Status> {
        let r = self
            .runtime()
            .list_pod_sandbox(ListPodSandboxRequest { filter: None })
            .await?;
        Ok(r.into_inner().items.into_iter().map(|p| p.id).collect())
    }

    /// PodSandboxStatus, verbose (its `info` has containerd's view of the sandbox).
    pub async fn pod_status(&self, pod_id: &str) -> Result<PodSandboxStatusResponse, Status> {
        let r = self
            .runtime()
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: pod_id.into(),
                verbose: true,
            })
            .await?;
        Ok(r.into_inner())
    }

    /// The pod's IP, as PodSandboxStatus reports it (empty: none).
    pub async fn pod_ip(&self, pod_id: &str) -> Result<String, Status> {
        let status = self.pod_status(pod_id).await?.status.unwrap_or_default();
        Ok(status.network.unwrap_or_default().ip)
    }

    /// The sandbox process and network namespace, from containerd's verbose status.
    pub async fn pod_info(&self, pod_id: &str) -> Result<PodInfo, Status> {
        let status = self.pod_status(pod_id).await?;
        let info = verbose_info(&status.info)?;
        Ok(PodInfo {
            pid: info["pid"].as_u64().unwrap_or(0) as u32,
            netns: spec_netns(&info["runtimeSpec"]),
        })
    }

    /// A container's process on the host (0 once it has exited), from verbose status.
    pub async fn container_pid(&self, container_id: &str) -> Result<u32, Status> {
        let r = self
            .runtime()
            .container_status(ContainerStatusRequest {
                container_id: container_id.into(),
                verbose: true,
            })
            .await?
            .into_inner();
        Ok(verbose_info(&r.info)?["pid"].as_u64().unwrap_or(0) as u32)
    }
}

impl Drop for CriNode {
    fn drop(&mut self) {
        // Runs after a failed assertion too. Pods first, through CRI, so that runc
        // stops their processes and CNI frees their namespaces and addresses. The test's
        // runtime is blocked in this drop, so that happens on a runtime of its own.
        let address = self.address.clone();
        let running = matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)));
        if running {
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(30),
                        remove_all_pods(unix_channel(&address)),
                    )
                    .await;
                });
            })
            .join();
        }
        self.stop();
        // Shims outlive containerd by design, and runc's containers outlive their shims.
        let addr = self.address.to_string_lossy().into_owned();
        for (pid, _) in crate::processes_mentioning(&addr) {
            kill(pid);
        }
        self.force_remove_tasks();
        let _ = Command::new("ip")
            .args(["link", "delete", &self.bridge()])
            .stderr(Stdio::null())
            .status();
        crate::unmount_under(&self.dir);
        self.remove_pod_cgroups();
    }
}

impl CriNode {
    /// The cgroup under which this node's pods get theirs (kubelet's `kubepods`).
    pub fn cgroup_parent_root(&self) -> String {
        format!("cocoon-cri-test-{}", self.subnet_index)
    }

    /// Removes the pod cgroups kubelet would have (this node's whole subtree), deepest
    /// first, in every hierarchy; by now nothing runs in them.
    fn remove_pod_cgroups(&self) {
        fn rmdir_tree(dir: &Path) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    rmdir_tree(&e.path());
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
        let root = self.cgroup_parent_root();
        let hierarchies = std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten();
        for h in hierarchies {
            let mine = h.path().join(&root);
            if mine.is_dir() {
                rmdir_tree(&mine);
            }
        }
        let unified = Path::new("/sys/fs/cgroup").join(&root);
        if unified.is_dir() {
            rmdir_tree(&unified);
        }
    }
}

impl CriNode {
    /// Stops containerd (SIGTERM, then SIGKILL) without touching shims.
    fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl CriNode {
    /// What a containerd that could not remove its pods (it died, or hung) left: runc
    /// containers, which outlive their shims, and CNI's network namespaces. A no-op once
    /// CRI removed every pod, since the task directories go with them.
    fn force_remove_tasks(&self) {
        let tasks = self.dir.join("state/io.containerd.runtime.v2.task/k8s.io");
        for task in std::fs::read_dir(tasks).into_iter().flatten().flatten() {
            // containerd's runc shim keeps runc's state host-wide, per namespace.
            let _ = Command::new("runc")
                .args(["--root", "/run/containerd/runc/k8s.io", "delete", "--force"])
                .arg(task.file_name())
                .env("PATH", tool_path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let spec: serde_json::Value = std::fs::read(task.path().join("config.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            if let Some(netns) = spec_netns(&spec).filter(|p| p.starts_with("/var/run/netns")) {
                let _ = nix::mount::umount2(&netns, nix::mount::MntFlags::MNT_DETACH);
                let _ = std::fs::remove_file(&netns);
            }
        }
    }
}

fn kill(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

async fn remove_all_pods(channel: Channel) {
    let mut runtime = RuntimeServiceClient::new(channel);
    let Ok(pods) = runtime
        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .await
    else {
        return;
    };
    for pod in pods.into_inner().items {
        let pod_sandbox_id = pod.id;
        let stop = StopPodSandboxRequest {
            pod_sandbox_id: pod_sandbox_id.clone(),
        };
        if runtime.stop_pod_sandbox(stop).await.is_ok() {
            let remove = RemovePodSandboxRequest { pod_sandbox_id };
            let _ = runtime.remove_pod_sandbox(remove).await;
        }
    }
}

/// containerd 1.6's verbose `info` map: one key, `info`, holding JSON.
fn verbose_info(info: &HashMap<String, String>) -> Result<serde_json::Value, Status> {
    let text = info
        .get("info")
        .ok_or_else(|| Status::internal("verbose status has no \"info\""))?;
    serde_json::from_str(text)
        .map_err(|e| Status::internal(format!("verbose status is not JSON: {e}")))
}

/// The network namespace an OCI runtime spec joins (a sandbox's: CNI's bind mount).
/// The network namespaces CNI pods have now (`/var/run/netns/cni-*`).
pub fn cni_netns() -> std::collections::BTreeSet<String> {
    std::fs::read_dir("/var/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("cni-"))
        .collect()
}

/// Whether network namespace `name` has no interface but loopback: a pod's whose CNI
/// teardown ran but whose namespace was not removed (or one CNI has not set up yet).
pub fn netns_is_bare(name: &str) -> bool {
    let out = Command::new("ip")
        .args(["-n", name, "-o", "link", "show"])
        .env("PATH", tool_path())
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .all(|l| l.contains(": lo:")),
        _ => false,
    }
}

/// Whether network namespace `name` has an address in the `subnet_index` test network:
/// on a node whose pods are all gone, one left behind without its CNI teardown.
pub fn netns_in_subnet(name: &str, subnet_index: u8) -> bool {
    let out = Command::new("ip")
        .args(["-n", name, "-4", "-o", "addr", "show"])
        .env("PATH", tool_path())
        .output();
    let prefix = format!(" 198.18.{subnet_index}.");
    matches!(out, Ok(o) if o.status.success()
        && String::from_utf8_lossy(&o.stdout).contains(&prefix))
}

fn spec_netns(spec: &serde_json::Value) -> Option<PathBuf> {
    spec["linux"]["namespaces"]
        .as_array()?
        .iter()
        .find(|ns| ns["type"] == "network")
        .and_then(|ns| ns["path"].as_str())
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

fn image_spec(image: &str) -> ImageSpec {
    ImageSpec {
        image: image.into(),
        ..Default::default()
    }
}

/// Kubelet's defaults: the pod's network and IPC, a PID namespace per container.
fn namespaces() -> NamespaceOption {
    NamespaceOption {
        network: NamespaceMode::Pod.into(),
        pid: NamespaceMode::Container.into(),
        ipc: NamespaceMode::Pod.into(),
        ..Default::default()
    }
}

/// A gRPC channel over containerd's unix socket. Lazy: it connects on the first call and
/// again after a failed one, so it can be made before containerd listens.
fn unix_channel(address: &Path) -> Channel {
    let address = address.to_path_buf();
    Endpoint::from_static("http://[::]:50051")
        .timeout(RPC_TIMEOUT)
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let address = address.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(address).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
}
