//! Pods through containerd's CRI plugin, driven over its gRPC socket as kubelet drives
//! it, on a CNI bridge network. Each case is a function of the runtime handler, so the
//! same case runs on `runc` (the baseline) and on `cocoon`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

mod common;

use cocoon_integration::cri::{CriNode, COCOON, RUNC};
use cocoon_integration::image::{IMAGE_REF, PAUSE_REF};
use cocoon_integration::processes_mentioning;
use common::{alive, env, eventually};
use k8s_cri::v1::{
    ContainerFilter, ContainerState, ListContainersRequest, ListImagesRequest,
    ListPodSandboxRequest, PodSandboxState,
};

/// Each test's pod network, `198.18.<n>.0/24`: distinct, as tests run in parallel.
const RUNC_LIFECYCLE_NET: u8 = 11;
const RUNC_BY_IP_NET: u8 = 12;
const RUNC_LOCALHOST_NET: u8 = 13;
const COCOON_LIFECYCLE_NET: u8 = 21;
const COCOON_BY_IP_NET: u8 = 22;
const COCOON_LOCALHOST_NET: u8 = 23;
const COCOON_HOST_NETWORK_NET: u8 = 24;
const RUNC_PORT_FORWARD_NET: u8 = 14;
const COCOON_PORT_FORWARD_NET: u8 = 25;
const COCOON_VM_KILLED_NET: u8 = 27;
const COCOON_VIRTIOFSD_KILLED_NET: u8 = 36;
const COCOON_VSOCK_KILLED_NET: u8 = 37;
const COCOON_ABANDONED_NET: u8 = 38;
const RUNC_IPV6_NET: u8 = 18;
const COCOON_VMM_BY_IP_NET: u8 = 34;
const COCOON_VMM_PORT_FORWARD_NET: u8 = 35;
const COCOON_IPV6_NET: u8 = 33;

#[tokio::test]
async fn runc_pod_lifecycle() {
    pod_lifecycle("runc_pod_lifecycle", RUNC, RUNC_LIFECYCLE_NET).await;
}

#[tokio::test]
async fn runc_pod_reached_by_ip() {
    pod_reached_by_ip("runc_pod_reached_by_ip", RUNC, RUNC_BY_IP_NET).await;
}

#[tokio::test]
async fn runc_containers_of_a_pod_share_localhost() {
    containers_share_localhost(
        "runc_containers_of_a_pod_share_localhost",
        RUNC,
        RUNC_LOCALHOST_NET,
    )
    .await;
}

#[tokio::test]
async fn cocoon_pod_lifecycle() {
    pod_lifecycle("cocoon_pod_lifecycle", COCOON, COCOON_LIFECYCLE_NET).await;
}

#[tokio::test]
async fn cocoon_pod_reached_by_ip() {
    pod_reached_by_ip("cocoon_pod_reached_by_ip", COCOON, COCOON_BY_IP_NET).await;
}

#[tokio::test]
async fn cocoon_containers_of_a_pod_share_localhost() {
    containers_share_localhost(
        "cocoon_containers_of_a_pod_share_localhost",
        COCOON,
        COCOON_LOCALHOST_NET,
    )
    .await;
}

#[tokio::test]
async fn runc_port_forward_reaches_pod_localhost() {
    port_forward_reaches_pod_localhost(
        "runc_port_forward_reaches_pod_localhost",
        RUNC,
        RUNC_PORT_FORWARD_NET,
    )
    .await;
}

#[tokio::test]
async fn cocoon_port_forward_reaches_pod_localhost() {
    port_forward_reaches_pod_localhost(
        "cocoon_port_forward_reaches_pod_localhost",
        COCOON,
        COCOON_PORT_FORWARD_NET,
    )
    .await;
}

#[tokio::test]
async fn cocoon_pod_whose_vm_is_killed_exits_and_cleans_up() {
    pod_losing_a_host_process(
        "cocoon_pod_whose_vm_is_killed_exits_and_cleans_up",
        COCOON_VM_KILLED_NET,
        // QEMU here; cocoon-vmm's VM process where the host has hardware KVM.
        &["qemu-system", "cocoon-vmm run "],
    )
    .await;
}

#[tokio::test]
async fn cocoon_pod_whose_virtiofsd_is_killed_exits_and_cleans_up() {
    pod_losing_a_host_process(
        "cocoon_pod_whose_virtiofsd_is_killed_exits_and_cleans_up",
        COCOON_VIRTIOFSD_KILLED_NET,
        &["virtiofsd"],
    )
    .await;
}

#[tokio::test]
async fn cocoon_pod_whose_vsock_backend_is_killed_exits_and_cleans_up() {
    pod_losing_a_host_process(
        "cocoon_pod_whose_vsock_backend_is_killed_exits_and_cleans_up",
        COCOON_VSOCK_KILLED_NET,
        // QEMU's vhost-user vsock backend (cocoon-vmm serves vsock itself).
        &["cocoon-vmm vhost-user-vsock"],
    )
    .await;
}

/// One of a running pod's host processes (the VMM, virtiofsd, the vsock backend) is
/// SIGKILLed: the pod cannot go on without it, so every container of the pod is reported
/// exited (137, as runc reports a killed process) at once, the pod goes NotReady, it can
/// be stopped and removed, and nothing of it remains.
async fn pod_losing_a_host_process(test: &str, net: u8, victim: &[&str]) {
    let Some(env) = env(test, COCOON, net).await else {
        return;
    };
    let node = &env.node;
    let pconfig = node.pod_config("doomed", "uid-doomed", "default");
    let pod = node
        .run_pod(&pconfig, COCOON)
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", node.log_tail()));
    let c = CriNode::container_config("sleeper", IMAGE_REF, &["sleep", "3600"], &[]);
    let ctr = node
        .create_and_start(&pod, &c, &pconfig)
        .await
        .unwrap_or_else(|e| panic!("create/start: {e}\n{}", node.log_tail()));
    let run_dir = env.dir.path().join("run").to_string_lossy().into_owned();
    let vmm: Vec<_> = processes_mentioning(&run_dir)
        .into_iter()
        .filter(|(_, cmd)| victim.iter().any(|v| cmd.contains(v)))
        .collect();
    // virtiofsd is two processes (its sandbox runs in a child): all of them go.
    assert!(!vmm.is_empty(), "{test}: no {victim:?} of the pod runs");
    let t = Instant::now();
    for (pid, _) in &vmm {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }

    let status = |id: String| {
        let mut runtime = node.runtime();
        async move {
            runtime
                .container_status(k8s_cri::v1::ContainerStatusRequest {
                    container_id: id,
                    verbose: false,
                })
                .await
                .map(|r| r.into_inner().status.unwrap_or_default())
        }
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let exited = loop {
        let s = status(ctr.clone()).await.expect("ContainerStatus");
        if s.state == ContainerState::ContainerExited as i32 {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the container still runs 20 s after its VM died: {s:?}\n{}",
            node.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        exited.exit_code, 137,
        "a container whose VM died exits as killed"
    );
    let noticed = t.elapsed();
    let sandbox_state = loop {
        let s = node.pod_status(&pod).await.expect("PodSandboxStatus");
        let state = s.status.unwrap_or_default().state;
        if state == PodSandboxState::SandboxNotready as i32 || Instant::now() >= deadline {
            break state;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        sandbox_state,
        PodSandboxState::SandboxNotready as i32,
        "the pod must be NotReady once its VM is gone"
    );
    eprintln!("{test}: container reported exited {noticed:?} after {victim:?} was killed");
    // A later container cannot start there: containerd already refuses (its sandbox
    // task is gone), before the shim's own "the pod VM is gone" (ctr.rs checks that one).
    let again = CriNode::container_config("again", IMAGE_REF, &["true"], &[]);
    let e = node
        .create_and_start(&pod, &again, &pconfig)
        .await
        .expect_err("a container cannot start in a pod whose VM is gone");
    assert!(!e.message().is_empty(), "{test}: {e}");

    node.stop_pod(&pod)
        .await
        .expect("StopPodSandbox after the VM died");
    node.remove_pod(&pod)
        .await
        .expect("RemovePodSandbox after the VM died");
    let gone = eventually(Duration::from_secs(10), || {
        processes_mentioning(&pod).is_empty() && processes_mentioning(&run_dir).is_empty()
    })
    .await;
    assert!(
        gone,
        "left running: {:?} {:?}",
        processes_mentioning(&pod),
        processes_mentioning(&run_dir)
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let left: Vec<_> = mounts.lines().filter(|l| l.contains(&run_dir)).collect();
    assert!(left.is_empty(), "mounts left: {left:?}");
    // The failed pod's console stays readable (`cocoon logs`) after it is removed.
    let logs = std::process::Command::new(
        cocoon_integration::workspace_root().join("target/debug/cocoon"),
    )
    .args(["logs", &pod])
    .env("COCOON_CONFIG", env.dir.path().join("cocoon.toml"))
    .output()
    .expect("cocoon logs");
    let console = String::from_utf8_lossy(&logs.stdout);
    assert!(
        logs.status.success() && console.contains("cocoon-agent"),
        "{test}: cocoon logs {pod}: {}\n{console}",
        String::from_utf8_lossy(&logs.stderr)
    );
}

#[tokio::test]
async fn runc_pod_has_its_ipv6_address_too() {
    pod_has_its_ipv6_address_too("runc_pod_has_its_ipv6_address_too", RUNC, RUNC_IPV6_NET).await;
}

#[tokio::test]
async fn cocoon_pod_has_its_ipv6_address_too() {
    pod_has_its_ipv6_address_too(
        "cocoon_pod_has_its_ipv6_address_too",
        COCOON,
        COCOON_IPV6_NET,
    )
    .await;
}

/// On a dual-stack network the pod has CNI's IPv6 address and default route too, and
/// the host reaches a server in the pod over IPv6.
async fn pod_has_its_ipv6_address_too(test: &str, handler: &str, net: u8) {
    let Some(env) = common::env_with(test, handler, net, true).await else {
        return;
    };
    let node = &env.node;
    let pconfig = node.pod_config("v6", "uid-v6", "default");
    let pod = node
        .run_pod(&pconfig, handler)
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", node.log_tail()));
    let status = node.pod_status(&pod).await.expect("PodSandboxStatus");
    let network = status
        .status
        .unwrap_or_default()
        .network
        .unwrap_or_default();
    let v6: std::net::Ipv6Addr = network
        .additional_ips
        .iter()
        .find_map(|ip| ip.ip.parse().ok())
        .unwrap_or_else(|| panic!("{test}: no IPv6 pod address in {network:?}"));
    let (prefix, _) = cocoon_integration::cri::subnet_v6(net);
    assert_eq!(v6.segments()[..4], prefix.segments()[..4], "{test}: {v6}");
    let c = CriNode::container_config(
        "server",
        IMAGE_REF,
        &["nc", "-ll", "-p", "8080", "-e", "echo", "hello6"],
        &[],
    );
    let ctr = node
        .create_and_start(&pod, &c, &pconfig)
        .await
        .unwrap_or_else(|e| panic!("create/start: {e}\n{}", node.log_tail()));
    let (code, out, err) = node
        .exec_sync(
            &ctr,
            &[
                "sh",
                "-c",
                "ip -6 addr show dev eth0 scope global; ip -6 route show default",
            ],
            Duration::from_secs(10),
        )
        .await
        .expect("ExecSync");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("inet6 {v6}/64")), "{test}: {out}");
    assert!(
        out.contains("default via fd00:cc:"),
        "{test}: no IPv6 default route: {out}"
    );
    // The guest's address goes through duplicate address detection first: retry.
    let addr = SocketAddr::from((v6, 8080));
    let reply = common::reply_from(addr, Duration::from_secs(20)).await;
    match reply {
        Ok(r) => assert_eq!(r, "hello6\n"),
        Err(e) => panic!("{test}: cannot reach [{v6}]:8080: {e}"),
    }
    node.stop_and_remove_pod(&pod).await.expect("stop/remove");
}

/// The production VMM: where the host has hardware KVM pods run on cocoon-vmm, with the
/// pod's tap handed over as an fd (`--net-fd`). Here that runs inside an L1 guest with
/// emulated SVM (the nested harness): the host and another pod reach a pod by IP, and
/// PortForward reaches its loopback.
#[test]
fn cocoon_vmm_runs_cri_pods() {
    use cocoon_nested::testing::{hardware_kvm, Place};
    let test = "cocoon_vmm_runs_cri_pods";
    if hardware_kvm(test) == Place::Done {
        return;
    }
    // SAFETY: set before any thread of this test starts; the test runs alone in its
    // process (libtest's --exact inside L1, or nextest's process per test).
    unsafe { std::env::set_var("COCOON_TEST_HYPERVISOR", "cocoon-vmm") };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(pod_reached_by_ip(test, COCOON, COCOON_VMM_BY_IP_NET));
    rt.block_on(port_forward_reaches_pod_localhost(
        test,
        COCOON,
        COCOON_VMM_PORT_FORWARD_NET,
    ));
}

/// kubelet gives up on a RunPodSandbox that takes too long (its CRI deadline) and
/// containerd then cancels the Create and shuts the shim down while the VM still boots:
/// the boot must be abandoned and undone, with no shim, VM, mount or cgroup left.
#[tokio::test]
async fn cocoon_pod_abandoned_while_booting_leaves_nothing() {
    let test = "cocoon_pod_abandoned_while_booting_leaves_nothing";
    if let Some(why) = common::prerequisites_missing(COCOON) {
        cocoon_nested::testing::missing(test, &why);
        return;
    }
    // A guest that never answers: QEMU starts with its CPUs stopped (-S), and the boot
    // deadline is far away, so only the abandonment can end this boot.
    let dir = tempfile::tempdir().unwrap();
    let config = cocoon_integration::cri::write_shim_config(dir.path(), Duration::from_secs(600));
    let toml = std::fs::read_to_string(&config).unwrap() + "[qemu]\nextra_args = [\"-S\"]\n";
    std::fs::write(&config, toml).unwrap();
    let node = CriNode::start(
        &dir.path().join("containerd"),
        &config,
        COCOON_ABANDONED_NET,
    )
    .await;
    let env = common::Env { node, dir };
    let node = &env.node;
    let pconfig = node.pod_config("abandoned", "uid-abandoned", "default");
    std::fs::create_dir_all(&pconfig.log_directory).unwrap();
    let netns_before = cocoon_integration::cri::cni_netns();
    let mut req = tonic::Request::new(k8s_cri::v1::RunPodSandboxRequest {
        config: Some(pconfig.clone()),
        runtime_handler: COCOON.into(),
    });
    req.set_timeout(Duration::from_secs(3));
    let r = node.runtime().run_pod_sandbox(req).await;
    assert!(
        r.is_err(),
        "{test}: a guest that never runs answered: {r:?}"
    );
    let run_dir = env.dir.path().join("run");
    let address = node.address.to_string_lossy().into_owned();
    let gone = eventually(Duration::from_secs(30), || {
        processes_mentioning(&run_dir.to_string_lossy()).is_empty()
            && processes_mentioning(&address)
                .iter()
                .all(|(_, cmd)| !cmd.contains("containerd-shim-cocoon"))
            && cocoon_integration::mounts_under(&run_dir).is_empty()
    })
    .await;
    assert!(
        gone,
        "{test}: left after the abandoned boot: {:?} {:?} {:?}",
        processes_mentioning(&run_dir.to_string_lossy()),
        processes_mentioning(&address),
        cocoon_integration::mounts_under(&run_dir)
    );
    let left = cocoon_integration::pod_leftovers(&run_dir);
    assert!(left.is_empty(), "{test}: left in the run dir: {left:?}");
    let cg = format!("{}/poduid-abandoned", node.cgroup_parent_root());
    let cgroups: Vec<_> = std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|h| {
            std::fs::read_dir(h.path().join(&cg))
                .into_iter()
                .flatten()
                .flatten()
        })
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    assert!(cgroups.is_empty(), "{test}: cgroups left: {cgroups:?}");
    // containerd goes on with the abandoned RunPodSandbox until the shim's Create fails,
    // then tears the pod's network down: wait for that, or the node's teardown would
    // kill containerd halfway and leave the pod's network namespace behind (seen).
    let failed = eventually(Duration::from_secs(60), || {
        node.log().lines().any(|l| {
            l.contains("RunPodSandbox for") && l.contains("abandoned") && l.contains("failed")
        })
    })
    .await;
    assert!(
        failed,
        "{test}: containerd never finished the abandoned RunPodSandbox:\n{}",
        node.log_tail()
    );
    // No network namespace of this node left: none with an address in its subnet (a
    // teardown that never ran, as a CI run once left), and no new one left bare (a
    // teardown that did not remove it; other tests' pods have their interfaces, and one
    // still bare seconds later is a leftover).
    let ours: Vec<String> = cocoon_integration::cri::cni_netns()
        .into_iter()
        .filter(|n| cocoon_integration::cri::netns_in_subnet(n, COCOON_ABANDONED_NET))
        .collect();
    assert!(
        ours.is_empty(),
        "{test}: network namespaces of the pod left: {ours:?}"
    );
    let bare = || -> Vec<String> {
        cocoon_integration::cri::cni_netns()
            .difference(&netns_before)
            .filter(|n| cocoon_integration::cri::netns_is_bare(n))
            .cloned()
            .collect()
    };
    let first = bare();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let left: Vec<String> = bare().into_iter().filter(|n| first.contains(n)).collect();
    assert!(left.is_empty(), "{test}: network namespaces left: {left:?}");
}

/// A VM cannot share the host's network, processes or IPC: a hostNetwork, hostPID or hostIPC
/// pod is refused, saying so.
#[tokio::test]
async fn cocoon_refuses_host_namespace_pods() {
    let test = "cocoon_refuses_host_namespace_pods";
    let Some(env) = env(test, COCOON, COCOON_HOST_NETWORK_NET).await else {
        return;
    };
    let node = &env.node;
    // hostNetwork, hostPID, hostIPC: a VM has its own; run differently than asked, the
    // pod would not be what its owner wrote.
    type Pick = fn(&mut k8s_cri::v1::NamespaceOption) -> &mut i32;
    let cases: [(&str, Pick); 3] = [
        ("hostNetwork", |o| &mut o.network),
        ("hostPID", |o| &mut o.pid),
        ("hostIPC", |o| &mut o.ipc),
    ];
    for (word, field) in cases {
        let name = word.to_lowercase();
        let mut pconfig = node.pod_config(&name, &format!("uid-{name}"), "default");
        let opts = pconfig
            .linux
            .as_mut()
            .and_then(|l| l.security_context.as_mut())
            .and_then(|s| s.namespace_options.as_mut())
            .expect("pod_config sets namespace options");
        *field(opts) = k8s_cri::v1::NamespaceMode::Node as i32;
        let e = node
            .run_pod(&pconfig, COCOON)
            .await
            .expect_err("a pod with a host namespace must not start on cocoon");
        assert!(e.message().contains(word), "the error must say why: {e}");
    }
    let run_dir = env.dir.path().join("run");
    let gone = eventually(Duration::from_secs(10), || {
        processes_mentioning(&run_dir.to_string_lossy()).is_empty()
    })
    .await;
    assert!(
        gone,
        "left running: {:?}",
        processes_mentioning(&run_dir.to_string_lossy())
    );
}

/// A pod's whole life as kubelet drives it, and nothing of it left afterwards.
async fn pod_lifecycle(test: &str, handler: &str, net: u8) {
    let Some(env) = env(test, handler, net).await else {
        return;
    };
    let node = &env.node;

    // Both images came in through `ctr import` into k8s.io; CRI must list them.
    let images = node
        .images()
        .list_images(ListImagesRequest { filter: None })
        .await
        .expect("ListImages")
        .into_inner()
        .images;
    for image in [IMAGE_REF, PAUSE_REF] {
        assert!(
            images
                .iter()
                .any(|i| i.repo_tags.iter().any(|t| t == image)),
            "ListImages lacks {image}: {images:?}"
        );
    }

    let pconfig = node.pod_config("lifecycle", "uid-lifecycle", "default");
    let pod = node
        .run_pod(&pconfig, handler)
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\ncontainerd log:\n{}", node.log_tail()));
    let status = node.pod_status(&pod).await.expect("PodSandboxStatus");
    let sandbox = status.status.expect("a status");
    assert_eq!(sandbox.state, PodSandboxState::SandboxReady as i32);
    assert_eq!(sandbox.runtime_handler, handler);
    let ip: Ipv4Addr = sandbox
        .network
        .expect("a network status")
        .ip
        .parse()
        .expect("an IPv4 pod IP");
    assert_eq!(ip.octets()[..3], [198, 18, net], "pod IP {ip}");
    let info = node.pod_info(&pod).await.expect("verbose PodSandboxStatus");
    let netns = info.netns.clone().expect("the pod's network namespace");
    assert!(
        netns.exists(),
        "{} missing while the pod runs",
        netns.display()
    );
    // Under runc the pids CRI reports are host processes; under cocoon they are the
    // guest's, and the host side of the pod is the shim and the VM's processes.
    let host_pids = handler == RUNC;
    let run_dir = env.dir.path().join("run").to_string_lossy().into_owned();
    if host_pids {
        assert!(alive(info.pid), "sandbox process {} not running", info.pid);
    } else {
        assert!(
            !processes_mentioning(&run_dir).is_empty(),
            "no VM process of the pod runs"
        );
    }

    let cconfig = CriNode::container_config("sleeper", IMAGE_REF, &["sleep", "3600"], &[]);
    let ctr = node
        .create_and_start(&pod, &cconfig, &pconfig)
        .await
        .unwrap_or_else(|e| panic!("create/start: {e}\ncontainerd log:\n{}", node.log_tail()));
    let ctr_pid = node.container_pid(&ctr).await.expect("ContainerStatus");
    assert!(
        !host_pids || alive(ctr_pid),
        "container process {ctr_pid} not running"
    );

    let (code, stdout, stderr) = node
        .exec_sync(
            &ctr,
            &["sh", "-c", "echo hi; echo err >&2; exit 3"],
            Duration::from_secs(10),
        )
        .await
        .expect("ExecSync");
    assert_eq!(
        (code, stdout.as_str(), stderr.as_str()),
        (3, "hi\n", "err\n")
    );

    let state_of = |containers: &[k8s_cri::v1::Container]| {
        containers
            .iter()
            .find(|c| c.id == ctr)
            .map(|c| ContainerState::try_from(c.state).unwrap())
    };
    let list = |pod: String| {
        let mut runtime = node.runtime();
        async move {
            runtime
                .list_containers(ListContainersRequest {
                    filter: Some(ContainerFilter {
                        pod_sandbox_id: pod,
                        ..Default::default()
                    }),
                })
                .await
                .expect("ListContainers")
                .into_inner()
                .containers
        }
    };
    assert_eq!(
        state_of(&list(pod.clone()).await),
        Some(ContainerState::ContainerRunning)
    );

    node.stop_pod(&pod).await.expect("StopPodSandbox");
    assert_eq!(
        state_of(&list(pod.clone()).await),
        Some(ContainerState::ContainerExited)
    );
    node.remove_pod(&pod).await.expect("RemovePodSandbox");
    let pods = node
        .runtime()
        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .await
        .expect("ListPodSandbox")
        .into_inner()
        .items;
    assert!(
        pods.iter().all(|p| p.id != pod),
        "pod still listed: {pods:?}"
    );
    assert!(
        !netns.exists(),
        "{} left after RemovePodSandbox",
        netns.display()
    );
    // The sandbox, the container, and the shim serving them (its command line names the
    // pod) are gone: the shim exits just after answering the last delete.
    let gone = eventually(Duration::from_secs(10), || {
        let pids_gone = !host_pids || (!alive(info.pid) && !alive(ctr_pid));
        pids_gone
            && processes_mentioning(&pod).is_empty()
            && processes_mentioning(&run_dir).is_empty()
    })
    .await;
    assert!(
        gone,
        "left running: sandbox {} ({}), container {ctr_pid} ({}), {:?} {:?}",
        info.pid,
        host_pids && alive(info.pid),
        host_pids && alive(ctr_pid),
        processes_mentioning(&pod),
        processes_mentioning(&run_dir)
    );
    // No mount, socket or file of the VM's (its run dir and the pod's share), and no
    // host network namespace of ours (the tap and tc state lived in CNI's).
    let run_root = Path::new(&run_dir);
    let mounts = cocoon_integration::mounts_under(run_root);
    assert!(mounts.is_empty(), "{test}: mounts left: {mounts:?}");
    let left = cocoon_integration::pod_leftovers(run_root);
    assert!(left.is_empty(), "{test}: left in the run dir: {left:?}");
}

/// The host reaches a server in a pod at the pod's IP, over the CNI bridge.
async fn pod_reached_by_ip(test: &str, handler: &str, net: u8) {
    let Some(env) = env(test, handler, net).await else {
        return;
    };
    let node = &env.node;
    let pconfig = node.pod_config("by-ip", "uid-by-ip", "default");
    let pod = node
        .run_pod(&pconfig, handler)
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\ncontainerd log:\n{}", node.log_tail()));
    // busybox 1.35's nc: `-ll` keeps listening after each connection (it has no `-k`).
    let cconfig = CriNode::container_config(
        "server",
        IMAGE_REF,
        &["nc", "-ll", "-p", "8080", "-e", "echo", "hello"],
        &[],
    );
    node.create_and_start(&pod, &cconfig, &pconfig)
        .await
        .unwrap_or_else(|e| panic!("create/start: {e}\ncontainerd log:\n{}", node.log_tail()));
    let ip: Ipv4Addr = node.pod_ip(&pod).await.expect("pod IP").parse().unwrap();
    let addr = SocketAddr::from((ip, 8080));

    // The server listens a moment after StartContainer returns: retry until it answers.
    let reply = common::reply_from(addr, Duration::from_secs(20)).await;
    match reply {
        Ok(reply) => assert_eq!(reply, "hello\n", "reply from {addr}"),
        Err(e) => panic!(
            "cannot reach {addr}: {e}\ncontainerd log:\n{}",
            node.log_tail()
        ),
    }
    // Another pod (another VM under cocoon) reaches it by pod IP too.
    let client_pod = node.pod_config("client", "uid-client", "default");
    let other = node
        .run_pod(&client_pod, handler)
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox (client): {e}\n{}", node.log_tail()));
    let c = CriNode::container_config("client", IMAGE_REF, &["sleep", "3600"], &[]);
    let client = node
        .create_and_start(&other, &c, &client_pod)
        .await
        .unwrap_or_else(|e| panic!("create/start client: {e}\n{}", node.log_tail()));
    let (code, out, err) = node
        .exec_sync(
            &client,
            &["sh", "-c", &format!("nc {ip} 8080 </dev/null")],
            Duration::from_secs(20),
        )
        .await
        .expect("ExecSync nc");
    assert_eq!(
        (code, out.as_str()),
        (0, "hello\n"),
        "{test}: pod to pod over {ip}:8080: {err}"
    );
    for p in [&pod, &other] {
        node.stop_and_remove_pod(p).await.expect("stop/remove pod");
    }
}

/// Two containers of one pod reach each other over localhost (one network namespace,
/// as Kubernetes promises), and both see the pod's IP.
async fn containers_share_localhost(test: &str, handler: &str, net: u8) {
    let Some(env) = env(test, handler, net).await else {
        return;
    };
    let node = &env.node;
    let pconfig = node.pod_config("localhost", "uid-localhost", "default");
    let pod = node
        .run_pod(&pconfig, handler)
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\ncontainerd log:\n{}", node.log_tail()));
    let server = CriNode::container_config(
        "server",
        IMAGE_REF,
        &["nc", "-ll", "-p", "9090", "-e", "echo", "from-server"],
        &[],
    );
    node.create_and_start(&pod, &server, &pconfig)
        .await
        .unwrap_or_else(|e| panic!("create/start server: {e}\n{}", node.log_tail()));
    let client = CriNode::container_config("client", IMAGE_REF, &["sleep", "3600"], &[]);
    let client = node
        .create_and_start(&pod, &client, &pconfig)
        .await
        .unwrap_or_else(|e| panic!("create/start client: {e}\n{}", node.log_tail()));
    let ip = node.pod_ip(&pod).await.expect("pod IP");
    let deadline = Instant::now() + Duration::from_secs(20);
    let reply = loop {
        let (code, out, err) = node
            .exec_sync(
                &client,
                &["sh", "-c", "nc 127.0.0.1 9090 </dev/null"],
                Duration::from_secs(10),
            )
            .await
            .expect("ExecSync nc");
        if code == 0 && out == "from-server\n" {
            break Ok(out);
        }
        if Instant::now() >= deadline {
            break Err(format!("exit {code}, stdout {out:?}, stderr {err:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    reply.unwrap_or_else(|e| panic!("client could not reach the server over localhost: {e}"));
    let (code, out, _) = node
        .exec_sync(
            &client,
            &["ip", "-o", "-4", "addr", "show"],
            Duration::from_secs(10),
        )
        .await
        .expect("ExecSync ip");
    assert_eq!(code, 0);
    assert!(
        out.contains(&format!("inet {ip}/24")),
        "the pod IP {ip}/24 is not on an interface the container sees:\n{out}"
    );
    node.stop_and_remove_pod(&pod)
        .await
        .expect("stop/remove pod");
}

/// `PortForward` (what `kubectl port-forward` uses) reaches a server listening only on the
/// pod's 127.0.0.1, through CRI's streaming server; a port nothing listens on comes back
/// as an error on the error channel, not as data.
async fn port_forward_reaches_pod_localhost(test: &str, handler: &str, net: u8) {
    let Some(env) = env(test, handler, net).await else {
        return;
    };
    let node = &env.node;
    let pconfig = node.pod_config("forward", "uid-forward", "default");
    let pod = node
        .run_pod(&pconfig, handler)
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\ncontainerd log:\n{}", node.log_tail()));
    let server = CriNode::container_config(
        "server",
        IMAGE_REF,
        &[
            "sh",
            "-c",
            "mkdir -p /tmp/www && echo forwarded > /tmp/www/index.html && \
             exec httpd -f -p 127.0.0.1:8081 -h /tmp/www",
        ],
        &[],
    );
    let server = node
        .create_and_start(&pod, &server, &pconfig)
        .await
        .unwrap_or_else(|e| panic!("create/start server: {e}\n{}", node.log_tail()));
    let url_for = |port: u16| {
        let mut runtime = node.runtime();
        let pod = pod.clone();
        async move {
            runtime
                .port_forward(k8s_cri::v1::PortForwardRequest {
                    pod_sandbox_id: pod,
                    port: vec![port.into()],
                })
                .await
                .expect("PortForward")
                .into_inner()
                .url
        }
    };
    // The server listens a moment after StartContainer: retry until it answers. Each
    // streaming URL serves one session, so each try asks for a new one.
    let deadline = Instant::now() + Duration::from_secs(30);
    let got = loop {
        let url = url_for(8081).await;
        let r = tokio::task::spawn_blocking(move || {
            cocoon_integration::streaming::port_forward(
                &url,
                8081,
                b"GET / HTTP/1.0\r\n\r\n",
                Duration::from_secs(20),
            )
        })
        .await
        .unwrap();
        match r {
            Ok(f) if f.data.starts_with(b"HTTP/1.") && f.data.ends_with(b"\r\n\r\nforwarded\n") => {
                break Ok(f)
            }
            other if Instant::now() >= deadline => break Err(other),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    if let Err(last) = got {
        let seen = node
            .exec_sync(
                &server,
                &["sh", "-c", "ps; netstat -ltn"],
                Duration::from_secs(10),
            )
            .await;
        let log = std::fs::read_to_string(Path::new(&pconfig.log_directory).join("server/0.log"));
        panic!(
            "port-forward to the pod's 127.0.0.1:8081 did not answer: {last:?}\n\
             in the pod: {seen:?}\nserver log: {log:?}\ncontainerd log:\n{}",
            node.log_tail()
        );
    }
    // Nothing listens on 8082: containerd says so on the error channel.
    let url = url_for(8082).await;
    let closed = tokio::task::spawn_blocking(move || {
        cocoon_integration::streaming::port_forward(&url, 8082, b"", Duration::from_secs(20))
    })
    .await
    .unwrap();
    match closed {
        Ok(f) => assert!(
            f.data.is_empty() && !f.error.is_empty(),
            "a closed port must come back as an error: {f:?}"
        ),
        Err(e) => panic!("port-forward to a closed port: {e}"),
    }
    node.stop_and_remove_pod(&pod)
        .await
        .expect("stop/remove pod");
}
