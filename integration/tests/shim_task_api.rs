//! The shim's task API driven directly, as containerd's Go client may drive it but
//! neither `ctr` nor CRI does: a task killed before it was started, two Creates of one
//! id at once, an exec whose stdio cannot be attached, a Shutdown its caller gave up
//! on. Each case hung, broke the pod or leaked before its fix.

mod ctr_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use containerd_shim::protos::api;
use containerd_shim::protos::shim_async::TaskClient;
use ctr_common::*;

const NAMESPACE: &str = "cocoon-direct";
/// Covers a cold VM boot under TCG on a loaded machine.
const CALL: Duration = Duration::from_secs(120);

/// A shim started the way containerd starts one, with a bundle of our own.
struct DirectShim {
    client: TaskClient,
    bundle: PathBuf,
    _dir: tempfile::TempDir,
}

/// An OCI bundle running `args` from a busybox rootfs in the bundle.
fn write_bundle(dir: &Path, args: &[&str]) -> PathBuf {
    let bundle = dir.join("bundle");
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    cocoon_integration::image::write_rootfs(Path::new("/bin/busybox"), &rootfs);
    let out = Command::new("ctr").args(["oci", "spec"]).output().unwrap();
    assert!(out.status.success(), "ctr oci spec failed");
    let mut spec: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    spec["root"] = serde_json::json!({ "path": rootfs, "readonly": false });
    spec["process"]["args"] = serde_json::json!(args);
    spec["process"]["terminal"] = serde_json::json!(false);
    spec["process"]["env"] = serde_json::json!(["PATH=/bin"]);
    std::fs::write(
        bundle.join("config.json"),
        serde_json::to_vec(&spec).unwrap(),
    )
    .unwrap();
    bundle
}

/// Runs `containerd-shim-cocoon-v2 start` in the bundle and connects to the address
/// it prints.
async fn start_shim(env: &Env, id: &str, args: &[&str]) -> DirectShim {
    start_shim_with(env, id, args, b"")
        .await
        .unwrap_or_else(|e| panic!("shim start: {e}"))
}

/// As `start_shim`, with `options` on the shim's stdin (what containerd writes there);
/// a failed start's stderr as the error.
async fn start_shim_with(
    env: &Env,
    id: &str,
    args: &[&str],
    options: &[u8],
) -> Result<DirectShim, String> {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let bundle = write_bundle(dir.path(), args);
    let sock = env.containerd.address.to_string_lossy().into_owned();
    let mut child = Command::new("containerd-shim-cocoon-v2")
        .args(["-namespace", NAMESPACE, "-id", id, "-address", &sock])
        .args(["-publish-binary", "containerd", "start"])
        .current_dir(&bundle)
        .env("TTRPC_ADDRESS", format!("{sock}.ttrpc"))
        .env("COCOON_CONFIG", &env.config)
        .env("PATH", cocoon_integration::containerd::tool_path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("containerd-shim-cocoon-v2 (cargo build first)");
    child.stdin.take().unwrap().write_all(options).unwrap();
    let out = child.wait_with_output().unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let address = String::from_utf8(out.stdout).unwrap();
    let client = ttrpc::asynchronous::Client::connect(address.trim())
        .await
        .unwrap();
    Ok(DirectShim {
        client: TaskClient::new(client),
        bundle,
        _dir: dir,
    })
}

/// `runtimeoptions.v1.Options` as containerd 1.7+ sends a handler's `options` table
/// that names no ConfigPath: the table itself as TOML (`config_body`, field 3).
fn inline_options(body: &str) -> Vec<u8> {
    use containerd_shim::protos::protobuf::{CodedOutputStream, Message};
    let mut value = Vec::new();
    let mut out = CodedOutputStream::vec(&mut value);
    out.write_bytes(3, body.as_bytes()).unwrap();
    out.flush().unwrap();
    drop(out);
    containerd_shim::protos::protobuf::well_known_types::any::Any {
        type_url: "runtimeoptions.v1.Options".into(),
        value,
        ..Default::default()
    }
    .write_to_bytes()
    .unwrap()
}

/// An Exec of `args` in container `id` as `exec_id`, its stdout to `stdout`.
fn exec_request(id: &str, exec_id: &str, args: &[&str], stdout: &str) -> api::ExecProcessRequest {
    let process = serde_json::json!({
        "args": args, "cwd": "/", "user": {"uid": 0, "gid": 0}, "env": ["PATH=/bin"],
    });
    let spec = containerd_shim::protos::protobuf::well_known_types::any::Any {
        type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
        value: serde_json::to_vec(&process).unwrap(),
        ..Default::default()
    };
    api::ExecProcessRequest {
        id: id.into(),
        exec_id: exec_id.into(),
        stdout: stdout.into(),
        spec: containerd_shim::protos::protobuf::MessageField::some(spec),
        ..Default::default()
    }
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(CALL.as_nanos() as i64)
}

/// A deadline no call to the guest can meet: the shim's ttrpc server drops the
/// handler's future when it passes.
fn hurried() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_millis(1).as_nanos() as i64)
}

impl DirectShim {
    async fn create(&self, id: &str) -> ttrpc::Result<api::CreateTaskResponse> {
        let req = api::CreateTaskRequest {
            id: id.into(),
            bundle: self.bundle.to_string_lossy().into_owned(),
            ..Default::default()
        };
        self.client.create(ctx(), &req).await
    }

    async fn kill(&self, id: &str, exec_id: &str, signal: u32) -> ttrpc::Result<api::Empty> {
        let req = api::KillRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            signal,
            ..Default::default()
        };
        self.client.kill(ctx(), &req).await
    }

    /// Wait, with a deadline of our own: the bug this catches is a Wait that never
    /// returns.
    async fn wait(&self, id: &str) -> api::WaitResponse {
        let req = api::WaitRequest {
            id: id.into(),
            ..Default::default()
        };
        tokio::time::timeout(Duration::from_secs(30), self.client.wait(ctx(), &req))
            .await
            .unwrap_or_else(|_| panic!("Wait for {id} did not return within 30 s"))
            .unwrap()
    }

    async fn state(&self, id: &str) -> api::StateResponse {
        let req = api::StateRequest {
            id: id.into(),
            ..Default::default()
        };
        self.client.state(ctx(), &req).await.unwrap()
    }

    async fn start(&self, id: &str, exec_id: &str) -> ttrpc::Result<api::StartResponse> {
        let req = api::StartRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.client.start(ctx(), &req).await
    }

    async fn pids(&self, id: &str) -> Vec<u32> {
        let req = api::PidsRequest {
            id: id.into(),
            ..Default::default()
        };
        let r = self.client.pids(ctx(), &req).await.unwrap();
        r.processes.iter().map(|p| p.pid).collect()
    }

    /// Kill (if running), Wait, Delete, Shutdown: the pod must then go entirely.
    async fn finish(self, env: &Env, id: &str) {
        let _ = self.kill(id, "", libc::SIGKILL as u32).await;
        self.wait(id).await;
        let req = api::DeleteRequest {
            id: id.into(),
            ..Default::default()
        };
        self.client.delete(ctx(), &req).await.unwrap();
        let req = api::ShutdownRequest {
            id: id.into(),
            now: true,
            ..Default::default()
        };
        // The shim exits while answering: the reply may be lost.
        let _ = self.client.shutdown(ctx(), &req).await;
        assert_clean(env);
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

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
        assert!(format!("{err:?}").contains("nobody opened it"), "{err:?}");
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
fn mounts_ending(suffix: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.ends_with(suffix))
        .map(str::to_owned)
        .collect()
}

/// `containerd-shim-cocoon-v2 delete` in `bundle`, as containerd runs it for each task
/// of a shim that died.
fn shim_delete(env: &Env, bundle: &Path, id: &str) {
    let sock = env.containerd.address.to_string_lossy().into_owned();
    let out = Command::new("containerd-shim-cocoon-v2")
        .args(["-namespace", NAMESPACE, "-id", id, "-address", &sock])
        .args(["-publish-binary", "containerd", "-bundle"])
        .arg(bundle)
        .arg("delete")
        .current_dir(bundle)
        .env("COCOON_CONFIG", &env.config)
        .env("PATH", cocoon_integration::containerd::tool_path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "shim delete of {id}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The pod VM's VMM process (the test's only pod).
fn vmm_pid(env: &Env) -> u32 {
    cocoon_integration::processes_mentioning(&env.run_dir.to_string_lossy())
        .into_iter()
        .find(|(_, c)| c.contains("qemu-system") || c.contains("cocoon-vmm"))
        .expect("no VMM process")
        .0
}

fn signal(pid: u32, s: nix::sys::signal::Signal) -> nix::Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), s)
}

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
            id: "second".into(),
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
        shim_delete(&env, &bundle, "second");
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
        shim.start("second", "").await.unwrap();
        assert_eq!(shim.wait("second").await.exit_status, 3);
        let req = api::DeleteRequest {
            id: "second".into(),
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
            id: "second".into(),
            bundle: bundle.to_string_lossy().into_owned(),
            ..Default::default()
        };
        shim.client.create(ctx(), &create).await.unwrap();
        shim.start("second", "").await.unwrap();
        assert_eq!(shim.wait("second").await.exit_status, 3);
        let vmm = vmm_pid(&env);
        signal(vmm, nix::sys::signal::Signal::SIGSTOP).unwrap();
        let req = api::DeleteRequest {
            id: "second".into(),
            ..Default::default()
        };
        let cut = ttrpc::context::with_timeout(Duration::from_secs(2).as_nanos() as i64);
        let r = shim.client.delete(cut, &req).await;
        assert!(r.is_err(), "a Delete answered by a stopped guest: {r:?}");
        assert!(
            bundle.join("cocoon-state.json").exists(),
            "the state went before the container did"
        );
        shim_delete(&env, &bundle, "second");
        assert!(
            cocoon_integration::alive(vmm),
            "containerd's cleanup of a cut Delete took the pod's VM"
        );
        assert!(
            mounts_ending("/second/rootfs").is_empty(),
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
        shim.start("second", "").await.unwrap();
        assert_eq!(shim.wait("second").await.exit_status, 3);
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
        signal(shim_pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
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
            id: "second".into(),
            bundle: bundle.to_string_lossy().into_owned(),
            ..Default::default()
        };
        let client = shim.client.clone();
        let pending = tokio::spawn(async move { client.create(ctx(), &req).await });
        // The shim has shared the rootfs and now waits on the stopped guest.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while mounts_ending("/second/rootfs").is_empty() {
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

        shim_delete(&env, &bundle, "second");
        let left = mounts_ending("/second/rootfs");
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
