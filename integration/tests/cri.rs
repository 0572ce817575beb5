//! Pods through containerd's CRI plugin, driven over its gRPC socket as kubelet drives
//! it, on a CNI bridge network. Each case is a function of the runtime handler, so the
//! same case runs on `runc` (the baseline) and on `cocoon`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

mod common;

use cocoon_integration::containerd::use_containerd2;
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
const RUNC_IPV6_NET: u8 = 18;
const COCOON_VMM_BY_IP_NET: u8 = 34;
const COCOON_VMM_PORT_FORWARD_NET: u8 = 35;
const COCOON_IPV6_NET: u8 = 33;
const RUNC_C2_LIFECYCLE_NET: u8 = 110;
const COCOON_C2_LIFECYCLE_NET: u8 = 111;
const COCOON_C2_PORT_FORWARD_NET: u8 = 112;
const COCOON_C2_LOCALHOST_NET: u8 = 113;

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

// The same cases under containerd 2 (what Kubernetes nodes run now: its CRI is split in
// plugins, its config is version 3 with the handler from deploy/containerd2-cocoon.toml,
// and it sandboxes pods through its podsandbox controller), runc first as the baseline.

#[tokio::test]
async fn runc_pod_lifecycle_on_containerd_2() {
    use_containerd2();
    pod_lifecycle(
        "runc_pod_lifecycle_on_containerd_2",
        RUNC,
        RUNC_C2_LIFECYCLE_NET,
    )
    .await;
}

#[tokio::test]
async fn cocoon_pod_lifecycle_on_containerd_2() {
    use_containerd2();
    pod_lifecycle(
        "cocoon_pod_lifecycle_on_containerd_2",
        COCOON,
        COCOON_C2_LIFECYCLE_NET,
    )
    .await;
}

#[tokio::test]
async fn cocoon_port_forward_reaches_pod_localhost_on_containerd_2() {
    use_containerd2();
    port_forward_reaches_pod_localhost(
        "cocoon_port_forward_reaches_pod_localhost_on_containerd_2",
        COCOON,
        COCOON_C2_PORT_FORWARD_NET,
    )
    .await;
}

#[tokio::test]
async fn cocoon_containers_of_a_pod_share_localhost_on_containerd_2() {
    use_containerd2();
    containers_share_localhost(
        "cocoon_containers_of_a_pod_share_localhost_on_containerd_2",
        COCOON,
        COCOON_C2_LOCALHOST_NET,
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
    // And no other interface than runc's pod has (a veth there, whose name shows its
    // peer after '@'): none of the guest kernel's fallback tunnels or dummies. runc's
    // depends on the host's loaded modules (a loaded ipip adds tunl0), so only ours is
    // held to it.
    let (code, links, _) = node
        .exec_sync(
            &client,
            &[
                "sh",
                "-c",
                "ip -o link | awk '{print $2}' | cut -d@ -f1 | tr -d :",
            ],
            Duration::from_secs(10),
        )
        .await
        .expect("ExecSync ip link");
    if handler == COCOON {
        assert_eq!((code, links.as_str()), (0, "lo\neth0\n"), "{test}");
    }
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
