//! Pods through containerd's CRI plugin that lose a host process or are abandoned
//! while booting: the pod is reported as kubelet expects (containers exited 137, the pod
//! NotReady), can be stopped and removed, and leaves nothing behind.

use std::time::{Duration, Instant};

mod common;

use cocoon_integration::cri::{CriNode, COCOON};
use cocoon_integration::image::IMAGE_REF;
use cocoon_integration::processes_mentioning;
use common::{env, eventually};
use k8s_cri::v1::{ContainerState, PodSandboxState};

const COCOON_VM_KILLED_NET: u8 = 27;
const COCOON_VIRTIOFSD_KILLED_NET: u8 = 36;
const COCOON_VSOCK_KILLED_NET: u8 = 37;
const COCOON_ABANDONED_NET: u8 = 38;

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
    let tables = cocoon_integration::mount_tables();
    let left: Vec<_> = tables
        .iter()
        .flat_map(|t| t.lines())
        .filter(|l| l.contains(&run_dir))
        .collect();
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
