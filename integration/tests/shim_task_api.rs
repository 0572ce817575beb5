//! The shim's task API driven directly, as containerd's Go client may drive it but
//! neither `ctr` nor CRI does: a task killed before it was started, two Creates of one
//! id at once, an exec whose stdio cannot be attached, a Shutdown its caller gave up
//! on. Each case hung, broke the pod or leaked before its fix. containerd's
//! cleanup after a shim (`shim delete`, the node's pod records) is in `shim_cleanup.rs`.

mod ctr_common;
mod direct_shim;

use std::path::Path;
use std::time::Duration;

use containerd_shim::protos::api;
use ctr_common::*;
use direct_shim::*;

#[test]
fn a_task_killed_before_start_exits_and_deletes() {
    let env = env();
    runtime().block_on(async {
        let shim = start_shim(&env, "never-started", &["sleep", "1000"]).await;
        shim.create("never-started").await.unwrap();
        assert_eq!(
            shim.state("never-started").await.status,
            api::Status::CREATED.into()
        );
        shim.kill("never-started", "", libc::SIGKILL as u32)
            .await
            .unwrap();
        let exit = shim.wait("never-started").await;
        assert_eq!(exit.exit_status, 137, "{exit:?}");
        assert_eq!(
            shim.state("never-started").await.status,
            api::Status::STOPPED.into()
        );
        assert!(
            shim.start("never-started", "").await.is_err(),
            "a killed task started"
        );
        shim.finish(&env, "never-started").await;
    });
}

#[test]
fn two_creates_of_one_id_make_one_working_container() {
    let env = env();
    runtime().block_on(async {
        let shim = start_shim(&env, "twin", &["sh", "-c", "exit 7"]).await;
        let (a, b) = tokio::join!(shim.create("twin"), shim.create("twin"));
        let refused: Vec<String> = [&a, &b]
            .iter()
            .filter_map(|r| r.as_ref().err().map(|e| format!("{e:?}")))
            .collect();
        assert_eq!(refused.len(), 1, "{a:?} / {b:?}");
        assert!(refused[0].contains("already exists"), "{refused:?}");
        // The refused Create must not have undone the other one in the guest.
        shim.start("twin", "").await.unwrap();
        assert_eq!(shim.wait("twin").await.exit_status, 7);
        shim.finish(&env, "twin").await;
    });
}

#[test]
fn an_exec_whose_stdio_cannot_attach_leaves_no_guest_process() {
    let env = env();
    runtime().block_on(async {
        let shim = start_shim(&env, "host", &["sleep", "1000"]).await;
        shim.create("host").await.unwrap();
        shim.start("host", "").await.unwrap();
        let before = shim.pids("host").await;
        assert_eq!(before.len(), 1, "{before:?}");
        let req = exec_request(
            "host",
            "orphan",
            &["sleep", "999"],
            "/nonexistent/cocoon-test/stdout",
        );
        shim.client.exec(ctx(), &req).await.unwrap();
        let started = shim.start("host", "orphan").await;
        assert!(started.is_err(), "an exec without its stdout started");
        let after = shim.pids("host").await;
        assert_eq!(after, before, "the failed exec still runs in the guest");
        shim.finish(&env, "host").await;
    });
}

#[test]
fn an_exec_whose_output_nobody_reads_fails_without_stalling_the_pod() {
    let env = env();
    runtime().block_on(async {
        let shim = start_shim(&env, "busy", &["sleep", "1000"]).await;
        shim.create("busy").await.unwrap();
        shim.start("busy", "").await.unwrap();
        let fifo = shim.bundle.join("stuck-stdout");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let req = exec_request("busy", "stuck", &["sleep", "999"], &fifo.to_string_lossy());
        shim.client.exec(ctx(), &req).await.unwrap();
        // The Start waits for a reader of its stdout fifo, which never comes; the pod's
        // other calls must not wait with it.
        let probe = async {
            tokio::time::timeout(Duration::from_secs(3), shim.state("busy"))
                .await
                .expect("State waited behind a Start")
        };
        let started = tokio::time::timeout(Duration::from_secs(30), shim.start("busy", "stuck"));
        let (started, state) = tokio::join!(started, probe);
        assert_eq!(state.status, api::Status::RUNNING.into());
        let err = started
            .expect("a Start whose stdout nobody reads never returned")
            .expect_err("started without a reader");
        // The error says what became of the fifo: here, nobody ever opened it.
        let err = format!("{err:?}");
        assert!(err.contains("nobody opened it"), "{err}");
        assert!(
            err.contains("the fifo is there and no process holds it"),
            "{err}"
        );
        assert_eq!(shim.pids("busy").await.len(), 1, "the exec still runs");
        shim.finish(&env, "busy").await;
    });
}

/// Found by the soak: a pod whose VM died during RunPodSandbox stayed behind, because
/// containerd's cleanup of the failed sandbox could not Kill its task ("the connection
/// to the agent was lost") and CRI marked it UNKNOWN. A kill after the VM is lost has
/// nothing left to do and succeeds; the task then reports its exit.
#[test]
fn a_task_is_killed_after_its_vm_is_lost() {
    let env = env();
    runtime().block_on(async {
        let shim = start_shim(&env, "orphaned", &["sleep", "1000"]).await;
        shim.create("orphaned").await.unwrap();
        let fsd = cocoon_integration::processes_mentioning(&env.run_dir.to_string_lossy())
            .into_iter()
            .find(|(_, c)| c.contains("virtiofsd"))
            .expect("no virtiofsd")
            .0;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(fsd as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        // The kill must succeed once the shim has noticed the loss (within a second).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match shim.kill("orphaned", "", libc::SIGKILL as u32).await {
                Ok(_) => break,
                Err(e) => assert!(
                    std::time::Instant::now() < deadline,
                    "Kill after the VM was lost: {e:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(shim.wait("orphaned").await.exit_status, 137);
        shim.finish(&env, "orphaned").await;
    });
}

/// containerd gives Shutdown 3 s, then closes its connection, and ttrpc drops a
/// handler whose deadline passed or whose connection closed. Under CI's load a VM's
/// teardown took longer, was cut, and left the pod's share and cgroup behind (the
/// soak's KillVsockBackend leak); a Start cut the same way (an ExecSync's timeout)
/// left its process marked started with nothing watching it, and a Create cut the same
/// way (kubelet's deadline during a slow guest pull) left its container in the guest.
/// A Create, an exec Start and a Shutdown, each with a deadline too short for it, a
/// second Shutdown, then the connection closed as containerd closes it: the Create must
/// be undone (so it can be made again), the exec must still run and exit, and the pod
/// must still go entirely (its cgroup too), and the shim with it.
#[test]
fn calls_their_caller_gave_up_on_still_finish() {
    let env = env();
    let cgroup = format!("/cocoon-test-abandoned-shutdown-{}", std::process::id());
    runtime().block_on(async {
        let shim = start_shim(&env, "abandoned", &["sleep", "1000"]).await;
        let config = shim.bundle.join("config.json");
        let mut spec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
        // A pod's sandbox, as CRI marks it: its VM's processes join its cgroup.
        spec["linux"]["cgroupsPath"] = serde_json::json!(cgroup);
        spec["annotations"] = serde_json::json!({
            "io.kubernetes.cri.container-type": "sandbox",
            "io.kubernetes.cri.sandbox-id": "abandoned",
        });
        std::fs::write(&config, serde_json::to_vec(&spec).unwrap()).unwrap();
        shim.create("abandoned").await.unwrap();
        shim.start("abandoned", "").await.unwrap();
        let cg_dirs = cocoon_shim::hostcgroup::hierarchy_dirs(
            Path::new(cocoon_shim::hostcgroup::CGROUP_ROOT),
            Path::new(cgroup.trim_start_matches('/')),
        )
        .unwrap();
        assert!(
            !cg_dirs.is_empty() && cg_dirs.iter().all(|d| d.is_dir()),
            "the VM's cgroup {cg_dirs:?} was not made"
        );
        // A second container whose Create is cut short: what it made in the guest and
        // the share is undone, so the same Create again works.
        let second = tempfile::tempdir().unwrap();
        let req = api::CreateTaskRequest {
            id: "second".into(),
            bundle: write_bundle(second.path(), &["sh", "-c", "exit 3"])
                .to_string_lossy()
                .into_owned(),
            ..Default::default()
        };
        let r = shim.client.create(hurried(), &req).await;
        assert!(r.is_err(), "a container was created within 1 ms: {r:?}");
        let deadline = std::time::Instant::now() + CALL;
        loop {
            match shim.client.create(ctx(), &req).await {
                Ok(_) => break,
                // The cut Create is not cut yet (the shim's clock runs after ours), or
                // its undo is still under way. The guest refusing it is INTERNAL.
                Err(ttrpc::Error::RpcStatus(s))
                    if [ttrpc::Code::ALREADY_EXISTS, ttrpc::Code::UNAVAILABLE]
                        .contains(&s.code())
                        && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => panic!(
                    "the Create again after one was cut (still refused at the deadline: the \
                     first was never cut, or its undo never ended): {e:?}"
                ),
            }
        }
        shim.start("second", "").await.unwrap();
        assert_eq!(shim.wait("second").await.exit_status, 3);
        let req = api::DeleteRequest {
            id: "second".into(),
            ..Default::default()
        };
        shim.client.delete(ctx(), &req).await.unwrap();

        let req = exec_request("abandoned", "hurried", &["true"], "");
        shim.client.exec(ctx(), &req).await.unwrap();
        let req = api::StartRequest {
            id: "abandoned".into(),
            exec_id: "hurried".into(),
            ..Default::default()
        };
        let r = shim.client.start(hurried(), &req).await;
        assert!(r.is_err(), "an exec started within 1 ms: {r:?}");
        let req = api::WaitRequest {
            id: "abandoned".into(),
            exec_id: "hurried".into(),
            ..Default::default()
        };
        let exit = tokio::time::timeout(CALL, shim.client.wait(ctx(), &req))
            .await
            .expect("the exec whose Start was cut never exited")
            .unwrap();
        assert_eq!(exit.exit_status, 0, "{exit:?}");
        let req = api::DeleteRequest {
            id: "abandoned".into(),
            exec_id: "hurried".into(),
            ..Default::default()
        };
        shim.client.delete(ctx(), &req).await.unwrap();
        shim.kill("abandoned", "", libc::SIGKILL as u32)
            .await
            .unwrap();
        shim.wait("abandoned").await;
        let req = api::DeleteRequest {
            id: "abandoned".into(),
            ..Default::default()
        };
        shim.client.delete(ctx(), &req).await.unwrap();
        let req = api::ShutdownRequest {
            id: "abandoned".into(),
            ..Default::default()
        };
        let r = shim.client.shutdown(hurried(), &req).await;
        assert!(r.is_err(), "a pod VM stopped within 1 ms: {r:?}");
        // Another Shutdown (containerd's after a restart, say) waits for that teardown
        // rather than ending the shim in the middle of it. The shim exits while
        // answering: the reply may be lost.
        let _ = shim.client.shutdown(ctx(), &req).await;
        drop(shim);
        assert_clean(&env);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while cg_dirs.iter().any(|d| d.exists()) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left: Vec<_> = cg_dirs.iter().filter(|d| d.exists()).collect();
        assert!(left.is_empty(), "the pod cgroup stayed: {left:?}");
    });
}

/// Mount points of this host's mount table that end in `suffix`.
/// containerd 1.7 and later send a handler's `options` table as the config itself when
/// it names no ConfigPath, laid over the node's file (`COCOON_CONFIG` here, which holds
/// the test's kernel, image and run directory): the pod's VM gets the table's memory,
/// and a misspelt key fails the start, naming the key.
#[test]
fn an_inline_handler_config_sizes_the_pods_vm() {
    let env = env();
    let body = "[vm]\nmemory_mib = 384\n";
    runtime().block_on(async {
        let e = start_shim_with(
            &env,
            "inline-bad",
            &["true"],
            &inline_options(&body.replace("memory_mib", "memry_mib")),
        )
        .await
        .err()
        .expect("a config with a misspelt key started");
        assert!(e.contains("memry_mib") && e.contains("config_body"), "{e}");

        let args = ["grep", "MemTotal", "/proc/meminfo"];
        let shim = start_shim_with(&env, "inline", &args, &inline_options(body))
            .await
            .unwrap();
        let fifo = shim.bundle.join("stdout");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read_to_string(fifo))
        };
        let req = api::CreateTaskRequest {
            id: "inline".into(),
            bundle: shim.bundle.to_string_lossy().into_owned(),
            stdout: fifo.to_string_lossy().into_owned(),
            ..Default::default()
        };
        shim.client.create(ctx(), &req).await.unwrap();
        shim.start("inline", "").await.unwrap();
        assert_eq!(shim.wait("inline").await.exit_status, 0);
        let out = reader.join().unwrap().unwrap();
        let kib: u64 = out
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no MemTotal in {out:?}"));
        // 384 MiB less what the guest kernel keeps; the test config's own is 256 MiB.
        assert!(
            (320 << 10..=384 << 10).contains(&kib),
            "MemTotal {kib} kB for a 384 MiB config"
        );
        shim.finish(&env, "inline").await;
    });
}
