//! What kubelet does with a running pod, through CRI: streaming exec and attach (with and
//! without a terminal, with a resize), container logs in CRI's format, a container that
//! exits and is created again in the same pod, UpdateContainerResources, and stopping or
//! removing twice. Each case runs under runc and under cocoon.

mod common;

use std::time::{Duration, Instant};

use cocoon_integration::cri::{CriNode, COCOON, RUNC};
use cocoon_integration::image::IMAGE_REF;
use cocoon_integration::streaming::command_session;
use cocoon_nested::testing::{hardware_kvm, Place};
use common::env;
use k8s_cri::v1::{
    AttachRequest, ContainerState, ContainerStatusRequest, ExecRequest, LinuxContainerResources,
    NamespaceMode, RemoveContainerRequest, UpdateContainerResourcesRequest,
};

macro_rules! both {
    ($case:ident, $runc:ident = $rn:expr, $cocoon:ident = $cn:expr) => {
        #[tokio::test]
        async fn $runc() {
            $case(stringify!($runc), RUNC, $rn).await;
        }
        #[tokio::test]
        async fn $cocoon() {
            $case(stringify!($cocoon), COCOON, $cn).await;
        }
    };
}

both!(
    exec_streams,
    runc_exec_streams = 41,
    cocoon_exec_streams = 51
);
both!(
    attach_to_a_terminal,
    runc_attach_to_a_terminal = 42,
    cocoon_attach_to_a_terminal = 52
);
both!(
    logs_in_cri_format,
    runc_logs_in_cri_format = 43,
    cocoon_logs_in_cri_format = 53
);
both!(
    container_restarts_in_its_pod,
    runc_container_restarts_in_its_pod = 44,
    cocoon_container_restarts_in_its_pod = 54
);
both!(
    a_failed_exec_leaves_its_container_alone,
    runc_a_failed_exec_leaves_its_container_alone = 66,
    cocoon_a_failed_exec_leaves_its_container_alone = 67
);
both!(
    update_resources_take_effect,
    runc_update_resources_take_effect = 45,
    cocoon_update_resources_take_effect = 55
);

/// A pod with one container running `command` (`tty`: with a terminal and stdin).
async fn pod_with(
    test: &str,
    handler: &str,
    net: u8,
    command: &[&str],
    tty: bool,
) -> Option<(common::Env, k8s_cri::v1::PodSandboxConfig, String, String)> {
    let env = env(test, handler, net).await?;
    let node = &env.node;
    let pconfig = node.pod_config("kubelet", "uid-kubelet", "default");
    let pod = node
        .run_pod(&pconfig, handler)
        .await
        .unwrap_or_else(|e| panic!("{test}: RunPodSandbox: {e}\n{}", node.log_tail()));
    let mut c = CriNode::container_config("main", IMAGE_REF, command, &[]);
    c.tty = tty;
    c.stdin = tty;
    let ctr = node
        .create_and_start(&pod, &c, &pconfig)
        .await
        .unwrap_or_else(|e| panic!("{test}: create/start: {e}\n{}", node.log_tail()));
    Some((env, pconfig, pod, ctr))
}

async fn session(
    url: String,
    size: Option<(u16, u16)>,
    stdin: &'static [u8],
    until: Option<&'static [u8]>,
) -> cocoon_integration::streaming::Session {
    tokio::task::spawn_blocking(move || {
        command_session(&url, size, stdin, until, Duration::from_secs(30))
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("streaming session: {e}"))
}

/// `kubectl exec`: both streams apart and the exit code without a terminal; with one,
/// a pts that takes the client's size.
async fn exec_streams(test: &str, handler: &str, net: u8) {
    let Some((env, _, pod, ctr)) = pod_with(test, handler, net, &["sleep", "3600"], false).await
    else {
        return;
    };
    let node = &env.node;
    let mut runtime = node.runtime();
    let url = runtime
        .exec(ExecRequest {
            container_id: ctr.clone(),
            cmd: vec![
                "sh".into(),
                "-c".into(),
                "echo out; echo err >&2; exit 7".into(),
            ],
            stdout: true,
            stderr: true,
            ..Default::default()
        })
        .await
        .expect("Exec")
        .into_inner()
        .url;
    let s = session(url, None, b"", None).await;
    assert_eq!(
        (s.stdout.as_slice(), s.stderr.as_slice(), s.exit_code()),
        (&b"out\n"[..], &b"err\n"[..], Some(7)),
        "{test}: {s:?}"
    );

    // With a terminal: the size the client sends arrives (the shell polls for it, with a
    // deadline, since the resize races the command's start).
    let script = "i=0; while [ \"$(stty size)\" != '40 120' ] && [ $i -lt 100 ]; do \
                  i=$((i+1)); sleep 0.05; done; echo \"size $(stty size)\"; tty";
    let url = runtime
        .exec(ExecRequest {
            container_id: ctr.clone(),
            cmd: vec!["sh".into(), "-c".into(), script.into()],
            tty: true,
            stdin: true,
            stdout: true,
            ..Default::default()
        })
        .await
        .expect("Exec with a tty")
        .into_inner()
        .url;
    let s = session(url, Some((120, 40)), b"", None).await;
    let text = String::from_utf8_lossy(&s.stdout);
    assert!(text.contains("size 40 120\r\n"), "{test}: {text:?}");
    assert!(
        text.contains("/dev/pts/"),
        "{test}: not a terminal: {text:?}"
    );
    assert_eq!(s.exit_code(), Some(0), "{test}: {s:?}");
    node.stop_and_remove_pod(&pod).await.expect("stop/remove");
}

/// `kubectl attach -it`: typing into a container's interactive shell on its terminal.
async fn attach_to_a_terminal(test: &str, handler: &str, net: u8) {
    let Some((env, _, pod, ctr)) = pod_with(test, handler, net, &["sh"], true).await else {
        return;
    };
    let node = &env.node;
    let url = node
        .runtime()
        .attach(AttachRequest {
            container_id: ctr.clone(),
            stdin: true,
            tty: true,
            stdout: true,
            stderr: false,
        })
        .await
        .expect("Attach")
        .into_inner()
        .url;
    let s = session(
        url,
        Some((100, 30)),
        b"echo attached-$((20+22))\n",
        Some(b"attached-42"),
    )
    .await;
    let text = String::from_utf8_lossy(&s.stdout);
    assert!(text.contains("attached-42"), "{test}: {text:?}");
    node.stop_and_remove_pod(&pod).await.expect("stop/remove");
}

/// An exec that cannot start (its program does not exist) fails, and containerd's
/// clean-up of it (a kill with "all", then a delete, under a one-minute deadline) returns
/// at once and touches nothing else: the container runs on and takes the next exec.
/// Under cocoon the kill once reached every process of the container, and waited for an
/// exit that never came.
async fn a_failed_exec_leaves_its_container_alone(test: &str, handler: &str, net: u8) {
    let Some((env, _, pod, ctr)) = pod_with(test, handler, net, &["sleep", "3600"], false).await
    else {
        return;
    };
    let node = &env.node;
    let missing = ["/no/such/program"];
    // Well inside containerd's one minute: a clean-up that hangs shows as a timeout.
    let failed = tokio::time::timeout(
        Duration::from_secs(40),
        node.exec_sync(&ctr, &missing, Duration::from_secs(30)),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{test}: ExecSync of a missing program hung\n{}",
            node.log_tail()
        )
    });
    match failed {
        Err(e) => assert!(e.message().contains("no/such/program"), "{test}: {e}"),
        Ok((code, _, err)) => assert_ne!(code, 0, "{test}: {err}"),
    }
    let status = status_of(node, &ctr).await;
    assert_eq!(
        status.state,
        ContainerState::ContainerRunning as i32,
        "{test}: {status:?}"
    );
    let (code, out, err) = node
        .exec_sync(&ctr, &["echo", "still here"], Duration::from_secs(30))
        .await
        .expect("ExecSync");
    assert_eq!((code, out.as_str()), (0, "still here\n"), "{test}: {err}");
    node.stop_and_remove_pod(&pod).await.expect("stop/remove");
}

/// `ctr`'s ContainerStatus.
async fn status_of(node: &CriNode, ctr: &str) -> k8s_cri::v1::ContainerStatus {
    node.runtime()
        .container_status(ContainerStatusRequest {
            container_id: ctr.into(),
            verbose: false,
        })
        .await
        .expect("ContainerStatus")
        .into_inner()
        .status
        .expect("a status")
}

/// Waits for `ctr` to exit; returns its exit code.
async fn exited(node: &CriNode, ctr: &str) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status_of(node, ctr).await;
        if s.state == ContainerState::ContainerExited as i32 {
            return s.exit_code;
        }
        assert!(Instant::now() < deadline, "{ctr} did not exit: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The log file kubelet reads: one line per line written, `<RFC3339Nano> <stream> F <text>`.
async fn logs_in_cri_format(test: &str, handler: &str, net: u8) {
    let script = "echo to-out; echo to-err >&2; printf 'partial'";
    let Some((env, pconfig, pod, ctr)) =
        pod_with(test, handler, net, &["sh", "-c", script], false).await
    else {
        return;
    };
    let node = &env.node;
    assert_eq!(exited(node, &ctr).await, 0);
    let log = std::path::Path::new(&pconfig.log_directory).join("main/0.log");
    let text = std::fs::read_to_string(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    let mut lines: Vec<(String, String, String)> = text
        .lines()
        .map(|l| {
            let mut f = l.splitn(4, ' ');
            let ts = f.next().unwrap_or_default();
            assert!(
                ts.len() >= 20 && ts.ends_with('Z') && ts.contains('T'),
                "{test}: timestamp {ts:?} in {l:?}"
            );
            (
                f.next().unwrap_or_default().to_string(),
                f.next().unwrap_or_default().to_string(),
                f.next().unwrap_or_default().to_string(),
            )
        })
        .collect();
    // stdout and stderr are copied apart, so only each stream's own order is fixed.
    lines.sort();
    let expected = [
        ("stderr", "F", "to-err"),
        ("stdout", "F", "to-out"),
        ("stdout", "P", "partial"),
    ];
    let got: Vec<(&str, &str, &str)> = lines
        .iter()
        .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()))
        .collect();
    assert_eq!(got, expected, "{test}: {text:?}");
    node.stop_and_remove_pod(&pod).await.expect("stop/remove");
}

/// kubelet restarting a container: the old one exits and is removed, a new one with the
/// same name and the next attempt runs in the same pod (and, under cocoon, the same VM).
async fn container_restarts_in_its_pod(test: &str, handler: &str, net: u8) {
    let Some((env, pconfig, pod, first)) =
        pod_with(test, handler, net, &["sh", "-c", "exit 3"], false).await
    else {
        return;
    };
    let node = &env.node;
    assert_eq!(
        exited(node, &first).await,
        3,
        "{test}: first attempt's exit code"
    );
    node.runtime()
        .remove_container(RemoveContainerRequest {
            container_id: first.clone(),
        })
        .await
        .expect("RemoveContainer");
    let mut c = CriNode::container_config("main", IMAGE_REF, &["sleep", "3600"], &[]);
    c.metadata.as_mut().unwrap().attempt = 1;
    c.log_path = "main/1.log".into();
    let second = node
        .create_and_start(&pod, &c, &pconfig)
        .await
        .unwrap_or_else(|e| panic!("{test}: second attempt: {e}\n{}", node.log_tail()));
    assert_ne!(first, second);
    let (code, out, _) = node
        .exec_sync(&second, &["echo", "again"], Duration::from_secs(10))
        .await
        .expect("ExecSync in the second attempt");
    assert_eq!((code, out.as_str()), (0, "again\n"));
    node.stop_and_remove_pod(&pod).await.expect("stop/remove");
}

/// UpdateContainerResources reaches the container's cgroup: under cocoon the guest's
/// (cgroup v2, read from inside), under runc the host's (v1 here, from outside: a runc
/// container on this host sees no cgroupfs).
async fn update_resources_take_effect(test: &str, handler: &str, net: u8) {
    let Some((env, _, pod, ctr)) = pod_with(test, handler, net, &["sleep", "3600"], false).await
    else {
        return;
    };
    let node = &env.node;
    let limit = 200 * 1024 * 1024;
    node.runtime()
        .update_container_resources(UpdateContainerResourcesRequest {
            container_id: ctr.clone(),
            linux: Some(LinuxContainerResources {
                memory_limit_in_bytes: limit,
                cpu_period: 100_000,
                cpu_quota: 50_000,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{test}: UpdateContainerResources: {e}"));
    if handler == COCOON {
        let (code, out, err) = node
            .exec_sync(
                &ctr,
                &[
                    "sh",
                    "-c",
                    "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max",
                ],
                Duration::from_secs(10),
            )
            .await
            .expect("ExecSync");
        assert_eq!(code, 0, "{test}: {err}");
        assert_eq!(out, format!("{limit}\n50000 100000\n"), "{test}");
    } else {
        let status = node
            .runtime()
            .container_status(ContainerStatusRequest {
                container_id: ctr.clone(),
                verbose: true,
            })
            .await
            .expect("ContainerStatus")
            .into_inner();
        let info: serde_json::Value = serde_json::from_str(&status.info["info"]).unwrap();
        let path = info["runtimeSpec"]["linux"]["cgroupsPath"]
            .as_str()
            .expect("cgroupsPath")
            .trim_start_matches('/')
            .to_string();
        let read = |f: &str| {
            std::fs::read_to_string(format!("/sys/fs/cgroup/{f}"))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|e| panic!("{test}: {f}: {e}"))
        };
        assert_eq!(
            read(&format!("memory/{path}/memory.limit_in_bytes")),
            limit.to_string()
        );
        assert_eq!(read(&format!("cpu/{path}/cpu.cfs_quota_us")), "50000");
    }
    node.stop_and_remove_pod(&pod).await.expect("stop/remove");
}

/// With `[vm] hotplug_vcpus`, a raised CPU limit brings the VM's held-offline vCPUs
/// online (as Kata's CPU hotplug): a pod without limits boots with its one vCPU online of
/// two; a limit of 1.5 CPUs asks for 1 + 2, capped at the two the VM has. The new vCPU
/// is the guest kernel's (online in sysfs) and the container's (`nproc`).
#[tokio::test]
async fn cocoon_raised_cpu_limits_bring_vcpus_online() {
    raised_cpu_limits_bring_vcpus_online("cocoon_raised_cpu_limits_bring_vcpus_online", 78).await;
}

/// The same on cocoon-vmm (hardware KVM, or else inside L1), whose vCPUs held offline
/// wait for the guest's start-up IPI in KVM itself.
#[test]
fn cocoon_vmm_raised_cpu_limits_bring_vcpus_online() {
    let test = "cocoon_vmm_raised_cpu_limits_bring_vcpus_online";
    if hardware_kvm(test) == Place::Done {
        return;
    }
    // SAFETY: set before any thread of this test starts; the test runs alone in its
    // process (libtest's --exact inside L1, or nextest's process per test).
    unsafe { std::env::set_var("COCOON_TEST_HYPERVISOR", "cocoon-vmm") };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(raised_cpu_limits_bring_vcpus_online(test, 79));
}

async fn raised_cpu_limits_bring_vcpus_online(test: &str, net: u8) {
    let keys = "hotplug_vcpus = true\nmax_vcpus = 2\n";
    let Some(env) = common::env_vm(test, COCOON, net, false, keys, "").await else {
        return;
    };
    let node = &env.node;
    let pconfig = node.pod_config("grows", "uid-grows", "default");
    let pod = node
        .run_pod(&pconfig, COCOON)
        .await
        .unwrap_or_else(|e| panic!("{test}: RunPodSandbox: {e}\n{}", node.log_tail()));
    let c = CriNode::container_config("app", IMAGE_REF, &["sleep", "3600"], &[]);
    let ctr = node
        .create_and_start(&pod, &c, &pconfig)
        .await
        .unwrap_or_else(|e| panic!("{test}: create/start: {e}\n{}", node.log_tail()));
    let cpus = || async {
        let script = "nproc; cat /sys/devices/system/cpu/present /sys/devices/system/cpu/online";
        let (code, out, err) = node
            .exec_sync(&ctr, &["sh", "-c", script], Duration::from_secs(30))
            .await
            .expect("ExecSync");
        assert_eq!(code, 0, "{test}: {out}{err}");
        out
    };
    assert_eq!(cpus().await, "1\n0-1\n0\n", "{test}: before the update");
    node.runtime()
        .update_container_resources(UpdateContainerResourcesRequest {
            container_id: ctr.clone(),
            linux: Some(LinuxContainerResources {
                cpu_period: 100_000,
                cpu_quota: 150_000,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{test}: UpdateContainerResources: {e}"));
    assert_eq!(
        cpus().await,
        "2\n0-1\n0-1\n",
        "{test}: after the update\n{}",
        node.log_tail()
    );
    node.stop_and_remove_pod(&pod).await.expect("stop/remove");
}

both!(
    a_debug_container_joins_its_targets_processes,
    runc_a_debug_container_joins_its_targets_processes = 80,
    cocoon_a_debug_container_joins_its_targets_processes = 81
);

/// `kubectl debug --target=app`: an ephemeral container created in a running pod with
/// the PID namespace of one of its containers (CRI's `NamespaceMode::Target`) sees that
/// container's processes, its init as PID 1.
async fn a_debug_container_joins_its_targets_processes(test: &str, handler: &str, net: u8) {
    let Some(env) = env(test, handler, net).await else {
        return;
    };
    let node = &env.node;
    let pconfig = node.pod_config("debugged", "uid-debugged", "default");
    let pod = node
        .run_pod(&pconfig, handler)
        .await
        .unwrap_or_else(|e| panic!("{test}: RunPodSandbox: {e}\n{}", node.log_tail()));
    let app = CriNode::container_config("app", IMAGE_REF, &["sleep", "3600"], &[]);
    let app_id = node
        .create_and_start(&pod, &app, &pconfig)
        .await
        .unwrap_or_else(|e| panic!("{test}: create/start app: {e}\n{}", node.log_tail()));
    let mut debug = CriNode::container_config("debugger", IMAGE_REF, &["sleep", "3599"], &[]);
    let ns = debug
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .and_then(|s| s.namespace_options.as_mut())
        .expect("namespace options");
    ns.pid = NamespaceMode::Target.into();
    ns.target_id = app_id.clone();
    let debug_id = node
        .create_and_start(&pod, &debug, &pconfig)
        .await
        .unwrap_or_else(|e| panic!("{test}: create/start debugger: {e}\n{}", node.log_tail()));
    let script = "cat /proc/1/cmdline | tr '\\0' ' '; echo; ls /proc | grep -c '^[0-9]'";
    let (code, out, err) = node
        .exec_sync(&debug_id, &["sh", "-c", script], Duration::from_secs(30))
        .await
        .expect("ExecSync");
    assert_eq!(code, 0, "{test}: {out}{err}");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("sleep 3600 "), "{test}: {out}");
    // app's sleep (PID 1: not the debugger's own, 3599), the debugger's sleep, this sh.
    let procs: u32 = lines.next().and_then(|l| l.parse().ok()).expect("a count");
    assert!(procs >= 3, "{test}: {procs} processes seen: {out}");
    node.stop_and_remove_pod(&pod).await.expect("stop/remove");
}

both!(
    a_termination_message_is_on_the_host_when_the_exit_is,
    runc_a_termination_message_is_on_the_host_when_the_exit_is = 82,
    cocoon_a_termination_message_is_on_the_host_when_the_exit_is = 83
);

/// kubelet mounts a file of its own at `/dev/termination-log` and reads it as soon as
/// ContainerStatus says the container exited (`kubectl describe`'s "Message"): what the
/// container wrote last must be in the host's file by then, not in a guest cache.
async fn a_termination_message_is_on_the_host_when_the_exit_is(test: &str, handler: &str, net: u8) {
    let Some(env) = env(test, handler, net).await else {
        return;
    };
    let node = &env.node;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("termination-log");
    // As kubelet makes it: empty, writable by any user of the container.
    std::fs::write(&log, "").unwrap();
    std::fs::set_permissions(&log, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let pconfig = node.pod_config("terminates", "uid-terminates", "default");
    let pod = node
        .run_pod(&pconfig, handler)
        .await
        .unwrap_or_else(|e| panic!("{test}: RunPodSandbox: {e}\n{}", node.log_tail()));
    let message = "x".repeat(3000) + "the last words";
    let script = format!("printf '%s' '{message}' > /dev/termination-log; exit 3");
    let mut c = CriNode::container_config("main", IMAGE_REF, &["sh", "-c", &script], &[]);
    c.mounts = vec![k8s_cri::v1::Mount {
        host_path: log.to_string_lossy().into_owned(),
        container_path: "/dev/termination-log".into(),
        ..Default::default()
    }];
    let ctr = node
        .create_and_start(&pod, &c, &pconfig)
        .await
        .unwrap_or_else(|e| panic!("{test}: create/start: {e}\n{}", node.log_tail()));
    assert_eq!(exited(node, &ctr).await, 3, "{test}");
    let got = std::fs::read_to_string(&log).unwrap();
    assert!(
        got == message,
        "{test}: the host's file holds {} bytes: {:?}",
        got.len(),
        got.get(got.len().saturating_sub(40)..)
    );
    node.stop_and_remove_pod(&pod).await.expect("stop/remove");
}

both!(
    created_container_is_removed_unstarted,
    runc_created_container_is_removed_unstarted = 46,
    cocoon_created_container_is_removed_unstarted = 56
);

/// kubelet may remove a container it created but never started (the pod was deleted in
/// between): that must not wait forever on an exit that never comes.
async fn created_container_is_removed_unstarted(test: &str, handler: &str, net: u8) {
    let Some(env) = env(test, handler, net).await else {
        return;
    };
    let node = &env.node;
    let pconfig = node.pod_config("unstarted", "uid-unstarted", "default");
    let pod = node
        .run_pod(&pconfig, handler)
        .await
        .unwrap_or_else(|e| panic!("{test}: RunPodSandbox: {e}\n{}", node.log_tail()));
    let c = CriNode::container_config("never", IMAGE_REF, &["sleep", "3600"], &[]);
    let log = std::path::Path::new(&pconfig.log_directory).join(&c.log_path);
    std::fs::create_dir_all(log.parent().unwrap()).unwrap();
    let ctr = node
        .runtime()
        .create_container(k8s_cri::v1::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(c),
            sandbox_config: Some(pconfig.clone()),
        })
        .await
        .unwrap_or_else(|e| panic!("{test}: CreateContainer: {e}"))
        .into_inner()
        .container_id;
    let removed = tokio::time::timeout(
        Duration::from_secs(30),
        node.runtime().remove_container(RemoveContainerRequest {
            container_id: ctr.clone(),
        }),
    )
    .await
    .unwrap_or_else(|_| panic!("{test}: RemoveContainer of a created container hung"));
    removed.unwrap_or_else(|e| panic!("{test}: RemoveContainer: {e}"));
    let stopped = tokio::time::timeout(Duration::from_secs(30), node.stop_and_remove_pod(&pod))
        .await
        .unwrap_or_else(|_| panic!("{test}: stop/remove of the pod hung"));
    stopped.unwrap_or_else(|e| panic!("{test}: stop/remove: {e}"));
}

both!(
    stop_and_remove_are_idempotent,
    runc_stop_and_remove_are_idempotent = 71,
    cocoon_stop_and_remove_are_idempotent = 72
);

/// CRI's idempotence (critest's "Idempotence" cases): stopping a stopped container or
/// pod and removing a removed one succeed. (Ids nobody knows are containerd's to answer,
/// whatever the runtime: 1.6 says NotFound for a container, newer ones succeed.)
async fn stop_and_remove_are_idempotent(test: &str, handler: &str, net: u8) {
    use k8s_cri::v1::StopContainerRequest;
    let Some(env) = env(test, handler, net).await else {
        return;
    };
    let node = &env.node;
    let pconfig = node.pod_config("idem", "uid-idem", "default");
    let pod = node
        .run_pod(&pconfig, handler)
        .await
        .unwrap_or_else(|e| panic!("{test}: RunPodSandbox: {e}\n{}", node.log_tail()));
    let c = CriNode::container_config("idem", IMAGE_REF, &["sleep", "3600"], &[]);
    let ctr = node
        .create_and_start(&pod, &c, &pconfig)
        .await
        .unwrap_or_else(|e| panic!("{test}: create/start: {e}\n{}", node.log_tail()));
    for id in [ctr.as_str(), ctr.as_str()] {
        node.runtime()
            .stop_container(StopContainerRequest {
                container_id: id.into(),
                timeout: 0,
            })
            .await
            .unwrap_or_else(|e| panic!("{test}: StopContainer {id}: {e}"));
    }
    for id in [ctr.as_str(), ctr.as_str()] {
        node.runtime()
            .remove_container(RemoveContainerRequest {
                container_id: id.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("{test}: RemoveContainer {id}: {e}"));
    }
    for id in [pod.as_str(), pod.as_str()] {
        node.stop_pod(id)
            .await
            .unwrap_or_else(|e| panic!("{test}: StopPodSandbox {id}: {e}\n{}", node.log_tail()));
    }
    for id in [pod.as_str(), pod.as_str()] {
        node.remove_pod(id)
            .await
            .unwrap_or_else(|e| panic!("{test}: RemovePodSandbox {id}: {e}"));
    }
    assert!(
        node.pod_ids().await.unwrap().is_empty(),
        "{test}: a pod is still listed"
    );
}
