//! containerd's cleanup after a shim, driven directly: `shim delete` in a task's bundle,
//! which containerd runs whenever a task's connection closes (under a live shim too), and
//! the node's records of pod VMs, which the next shim undoes when no bundle names a pod
//! any more. Each case killed a live pod or leaked before its fix.

mod ctr_common;
mod direct_shim;

use std::time::Duration;

use containerd_shim::protos::api;
use ctr_common::*;
use direct_shim::*;

/// containerd runs `shim delete` in a task's bundle whenever the task's connection
/// closes: also after a Create its caller gave up on (kubelet's deadline during a slow
/// guest pull), while this live shim still undoes it. That may take the container's
/// mounts, never the pod's VM. The guest is held still, so the undo still waits on it
/// when the delete runs.
#[test]
fn containerds_cleanup_of_a_cut_create_leaves_the_pod_running() {
    let env = env();
    runtime().block_on(async {
        let shim = start_shim(&env, "kept", &["sleep", "1000"]).await;
        shim.create("kept").await.unwrap();
        shim.start("kept", "").await.unwrap();
        let vmm = vmm_pid(&env);
        signal(vmm, nix::sys::signal::Signal::SIGSTOP).unwrap();
        let second = tempfile::tempdir().unwrap();
        let bundle = write_bundle(second.path(), &["sh", "-c", "exit 3"]);
        let req = api::CreateTaskRequest {
            id: "cut-create-2nd".into(),
            bundle: bundle.to_string_lossy().into_owned(),
            ..Default::default()
        };
        let cut = ttrpc::context::with_timeout(Duration::from_secs(2).as_nanos() as i64);
        let r = shim.client.create(cut, &req).await;
        assert!(r.is_err(), "a Create answered by a stopped guest: {r:?}");
        assert!(
            bundle.join("cocoon-state.json").exists(),
            "no state recorded while the guest makes the container"
        );
        shim_delete(&env, &bundle, "cut-create-2nd");
        assert!(
            cocoon_integration::alive(vmm),
            "containerd's cleanup of a cut Create took the pod's VM"
        );
        signal(vmm, nix::sys::signal::Signal::SIGCONT).unwrap();
        // The pod goes on: once the cut Create is undone, it can be made again and runs.
        let deadline = std::time::Instant::now() + CALL;
        loop {
            match shim.client.create(ctx(), &req).await {
                Ok(_) => break,
                Err(ttrpc::Error::RpcStatus(s))
                    if [ttrpc::Code::ALREADY_EXISTS, ttrpc::Code::UNAVAILABLE]
                        .contains(&s.code())
                        && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => panic!("the Create again after one was cut: {e:?}"),
            }
        }
        shim.start("cut-create-2nd", "").await.unwrap();
        assert_eq!(shim.wait("cut-create-2nd").await.exit_status, 3);
        let req = api::DeleteRequest {
            id: "cut-create-2nd".into(),
            ..Default::default()
        };
        shim.client.delete(ctx(), &req).await.unwrap();
        shim.finish(&env, "kept").await;
    });
}

/// A Delete its caller gave up on still takes the container away (waiting on the guest,
/// held still here), and a retry of it is answered NotFound meanwhile; containerd then
/// closes that task's connection and runs `shim delete` in its bundle, which still holds
/// the container's full state. The live shim's VM must stay: it is that shim's to stop.
#[test]
fn containerds_cleanup_of_a_cut_delete_leaves_the_pod_running() {
    let env = env();
    runtime().block_on(async {
        let shim = start_shim(&env, "kept2", &["sleep", "1000"]).await;
        shim.create("kept2").await.unwrap();
        shim.start("kept2", "").await.unwrap();
        let second = tempfile::tempdir().unwrap();
        let bundle = write_bundle(second.path(), &["sh", "-c", "exit 3"]);
        let create = api::CreateTaskRequest {
            id: "cut-delete-2nd".into(),
            bundle: bundle.to_string_lossy().into_owned(),
            ..Default::default()
        };
        shim.client.create(ctx(), &create).await.unwrap();
        shim.start("cut-delete-2nd", "").await.unwrap();
        assert_eq!(shim.wait("cut-delete-2nd").await.exit_status, 3);
        let vmm = vmm_pid(&env);
        signal(vmm, nix::sys::signal::Signal::SIGSTOP).unwrap();
        let req = api::DeleteRequest {
            id: "cut-delete-2nd".into(),
            ..Default::default()
        };
        let cut = ttrpc::context::with_timeout(Duration::from_secs(2).as_nanos() as i64);
        let r = shim.client.delete(cut, &req).await;
        assert!(r.is_err(), "a Delete answered by a stopped guest: {r:?}");
        assert!(
            bundle.join("cocoon-state.json").exists(),
            "the state went before the container did"
        );
        shim_delete(&env, &bundle, "cut-delete-2nd");
        assert!(
            cocoon_integration::alive(vmm),
            "containerd's cleanup of a cut Delete took the pod's VM"
        );
        assert!(
            mounts_ending("/cut-delete-2nd/rootfs").is_empty(),
            "containerd's cleanup left the container's mounts"
        );
        signal(vmm, nix::sys::signal::Signal::SIGCONT).unwrap();
        // The pod goes on: once the cut Delete is done, the id can be made again.
        let deadline = std::time::Instant::now() + CALL;
        loop {
            match shim.client.create(ctx(), &create).await {
                Ok(_) => break,
                Err(ttrpc::Error::RpcStatus(s))
                    if s.code() == ttrpc::Code::UNAVAILABLE
                        && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => panic!("the Create again after a cut Delete: {e:?}"),
            }
        }
        shim.start("cut-delete-2nd", "").await.unwrap();
        assert_eq!(shim.wait("cut-delete-2nd").await.exit_status, 3);
        shim.client.delete(ctx(), &req).await.unwrap();
        assert!(!bundle.join("cocoon-state.json").exists());
        shim.finish(&env, "kept2").await;
    });
}

/// A shim that lives but does not answer (containerd's reload of it after a restart
/// timed out, and containerd ran `shim delete` for its tasks) can never be reached
/// again: `shim delete` ends it, and its VM with it, instead of sparing a live shim's VM.
#[test]
fn containerds_cleanup_ends_a_shim_that_does_not_answer() {
    let env = env();
    runtime().block_on(async {
        let shim = start_shim(&env, "wedged", &["sleep", "1000"]).await;
        shim.create("wedged").await.unwrap();
        shim.start("wedged", "").await.unwrap();
        let req = api::ConnectRequest {
            id: "wedged".into(),
            ..Default::default()
        };
        let shim_pid = shim.client.connect(ctx(), &req).await.unwrap().shim_pid;
        let vmm = vmm_pid(&env);
        // Seen once in a loaded CI run: `shim delete` found this shim answering.
        stop_fully(shim_pid);
        shim_delete(&env, &shim.bundle, "wedged");
        let left = cocoon_integration::wait_gone(&[shim_pid, vmm], Duration::from_secs(10));
        assert!(
            left.is_empty(),
            "a shim that does not answer, or its VM, outlived containerd's cleanup: {left:?}"
        );
        assert!(!shim.bundle.join("cocoon-state.json").exists());
        drop(shim);
        assert_clean(&env);
    });
}

/// A shim that dies while the guest makes a container (the host's mounts for it made,
/// the guest yet to answer) leaves `shim delete` of that container what to clean up: its
/// mounts go with its own delete, not only with the pod's share. The guest is held
/// still (its VMM stopped) so the Create waits there when the shim is killed.
#[test]
fn a_shim_that_dies_mid_create_leaves_that_containers_cleanup_to_delete() {
    let env = env();
    runtime().block_on(async {
        let shim = start_shim(&env, "crashed", &["sleep", "1000"]).await;
        shim.create("crashed").await.unwrap();
        shim.start("crashed", "").await.unwrap();
        let req = api::ConnectRequest {
            id: "crashed".into(),
            ..Default::default()
        };
        let shim_pid = shim.client.connect(ctx(), &req).await.unwrap().shim_pid;
        let vmm = vmm_pid(&env);
        signal(vmm, nix::sys::signal::Signal::SIGSTOP).unwrap();

        let second = tempfile::tempdir().unwrap();
        let bundle = write_bundle(second.path(), &["true"]);
        let req = api::CreateTaskRequest {
            id: "mid-create-2nd".into(),
            bundle: bundle.to_string_lossy().into_owned(),
            ..Default::default()
        };
        let client = shim.client.clone();
        let pending = tokio::spawn(async move { client.create(ctx(), &req).await });
        // The shim has shared the rootfs and now waits on the stopped guest.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while mounts_ending("/mid-create-2nd/rootfs").is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the second container's rootfs was never shared"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        signal(shim_pid, nix::sys::signal::Signal::SIGKILL).unwrap();
        let r = pending.await.unwrap();
        assert!(r.is_err(), "a Create answered by a stopped guest: {r:?}");
        assert!(
            cocoon_integration::wait_gone(&[shim_pid], Duration::from_secs(10)).is_empty(),
            "the shim outlived SIGKILL"
        );

        shim_delete(&env, &bundle, "mid-create-2nd");
        let left = mounts_ending("/mid-create-2nd/rootfs");
        assert!(
            left.is_empty(),
            "the dead shim's container mounts stayed: {left:?}"
        );
        assert!(!bundle.join("cocoon-state.json").exists());
        // And the pod, from the sandbox's bundle.
        shim_delete(&env, &shim.bundle, "crashed");
        let _ = signal(vmm, nix::sys::signal::Signal::SIGCONT);
        drop(shim);
        assert_clean(&env);
    });
}

/// Runs a pod of one container, deletes the container (the pod's last: no bundle names
/// the VM any more) and SIGKILLs the shim before containerd's Shutdown would tear the
/// pod down; its janitor too, first, when `and_janitor`. Returns the shim (its client is
/// dead) once it and its VM are gone.
async fn orphan_a_pod(env: &Env, id: &str, and_janitor: bool) -> DirectShim {
    orphan_a_pod_in(env, id, and_janitor).await.0
}

/// `orphan_a_pod`, also returning the pod's own mount namespace (`mnt:[inode]`) as the
/// shim held it.
async fn orphan_a_pod_in(env: &Env, id: &str, and_janitor: bool) -> (DirectShim, String) {
    let shim = start_shim(env, id, &["sleep", "1000"]).await;
    shim.create(id).await.unwrap();
    shim.start(id, "").await.unwrap();
    let req = api::ConnectRequest {
        id: id.into(),
        ..Default::default()
    };
    let shim_pid = shim.client.connect(ctx(), &req).await.unwrap().shim_pid;
    let vmm = vmm_pid(env);
    let pod_ns = cocoon_integration::pod_namespaces_of(shim_pid);
    assert_eq!(pod_ns.len(), 1, "the shim's pod namespaces: {pod_ns:?}");
    let janitor = janitor_pid(env).expect("the pod has no janitor");
    assert_confined(janitor);
    shim.kill(id, "", libc::SIGKILL as u32).await.unwrap();
    shim.wait(id).await;
    let req = api::DeleteRequest {
        id: id.into(),
        ..Default::default()
    };
    shim.client.delete(ctx(), &req).await.unwrap();
    assert!(!shim.bundle.join("cocoon-state.json").exists());
    if and_janitor {
        signal(janitor, nix::sys::signal::Signal::SIGKILL).unwrap();
        let left = cocoon_integration::wait_gone(&[janitor], Duration::from_secs(10));
        assert!(left.is_empty(), "the janitor outlived SIGKILL");
    }
    signal(shim_pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    let left = cocoon_integration::wait_gone(&[shim_pid, vmm], Duration::from_secs(10));
    assert!(
        left.is_empty(),
        "the shim or its VM outlived SIGKILL: {left:?}"
    );
    (shim, pod_ns.into_iter().next().unwrap_or_default())
}

/// The pod's janitor process (`cocoon-janitor`), if it has one.
fn janitor_pid(env: &Env) -> Option<u32> {
    cocoon_integration::processes_mentioning(&env.run_dir.to_string_lossy())
        .into_iter()
        .find(|(_, c)| c.starts_with("cocoon-janitor "))
        .map(|(p, _)| p)
}

/// The janitor keeps only the capabilities undoing a pod needs, has no_new_privs, and
/// has its seccomp filter on and a session of its own (a signal to the shim's group
/// spares it).
fn assert_confined(janitor: u32) {
    let status = std::fs::read_to_string(format!("/proc/{janitor}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    // CAP_DAC_OVERRIDE 1, CAP_DAC_READ_SEARCH 2, CAP_FOWNER 3, CAP_KILL 5; not
    // CAP_SYS_ADMIN (21): the pod's mounts went with its own mount namespace.
    let want = format!("{:016x}", (1u64 << 1) | (1 << 2) | (1 << 3) | (1 << 5));
    for set in ["CapEff:", "CapPrm:", "CapBnd:"] {
        assert_eq!(field(set), want, "{set} of the janitor:\n{status}");
    }
    assert_eq!(field("CapInh:"), "0000000000000000", "{status}");
    assert_eq!(field("CapAmb:"), "0000000000000000", "{status}");
    assert_eq!(field("NoNewPrivs:"), "1", "{status}");
    // Its allow-list (`janitor::ALLOWED`), on before it starts watching.
    assert_eq!(field("Seccomp:"), "2", "{status}");
    let sid = nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(janitor as i32))).unwrap();
    assert_eq!(sid.as_raw() as u32, janitor, "the janitor shares a session");
}

/// Waits (30 s) until nothing of the test's pods is left on the node: no run dir entry,
/// share, record or mount.
async fn wait_node_clean(env: &Env, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = cocoon_integration::pod_leftovers(&env.run_dir);
        let mounts = cocoon_integration::mounts_under(&env.run_dir);
        if left.is_empty() && mounts.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: the dead shim's pod stayed: {left:?} {mounts:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A shim killed after its pod's last container was deleted and before its teardown
/// ended (containerd's Shutdown yet to come): no bundle names the pod any more, so no
/// `shim delete` runs for it. Its VM dies with it; its janitor, which the shim's death
/// wakes, undoes the share, mounts, run dir and record, with no other shim on the node.
/// The janitor runs with only the capabilities it needs, and no_new_privs.
#[test]
fn a_pod_whose_shim_died_before_its_teardown_is_undone_by_its_janitor() {
    let env = env();
    runtime().block_on(async {
        let orphaned = orphan_a_pod(&env, "orphaned", false).await;
        wait_node_clean(&env, "no other shim started; the janitor").await;
        let left = cocoon_integration::wait_gone(
            &janitor_pid(&env).into_iter().collect::<Vec<_>>(),
            Duration::from_secs(10),
        );
        assert!(left.is_empty(), "a janitor stayed after undoing its pod");
        drop(orphaned);
        assert_clean(&env);
    });
}

/// The same with the janitor killed too: its mounts go with the pod's mount namespace
/// (no one undoes them), and what else the pod left stays until the next shim
/// on the node starts and undoes what the node's record of the pod names.
#[test]
fn a_pod_whose_shim_and_janitor_died_is_undone_by_the_next_shim() {
    let env = env();
    runtime().block_on(async {
        let (shim, pod_ns) = orphan_a_pod_in(&env, "orphaned", true).await;
        let left = cocoon_integration::pod_leftovers(&env.run_dir);
        assert!(
            !left.is_empty(),
            "the killed shim's pod left nothing behind: the case this test is for was not made"
        );
        // Its mounts were in the pod's own namespace, held by the shim (virtiofsd's
        // copies are in its own, which ends with it): the namespace and every process
        // of the pod are gone, with no one to undo them.
        let run = env.run_dir.to_string_lossy().into_owned();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let holders = cocoon_integration::namespace_holders(&pod_ns);
            let procs = cocoon_integration::processes_mentioning(&run);
            let mounts = cocoon_integration::mounts_under(&env.run_dir);
            if holders.is_empty() && procs.is_empty() && mounts.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the killed shim's pod namespace {pod_ns} outlived it: held by {holders:?}, \
                 processes {procs:?}, mounts {mounts:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // The next shim on the node, as containerd starts it for a new pod.
        let next = start_shim(&env, "next", &["true"]).await;
        wait_node_clean(&env, "after the next shim started").await;
        let req = api::ShutdownRequest {
            id: "next".into(),
            now: true,
            ..Default::default()
        };
        // The shim exits while answering: the reply may be lost.
        let _ = next.client.shutdown(ctx(), &req).await;
        drop((shim, next));
        assert_clean(&env);
    });
}
