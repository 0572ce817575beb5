//! A shim driven directly, the way containerd starts and calls one, for the tests that
//! drive its task API (`shim_task_api.rs`) and those of containerd's cleanup after a
//! shim (`shim_cleanup.rs`).

// Each test binary uses part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use containerd_shim::protos::api;
use containerd_shim::protos::shim_async::TaskClient;

use crate::ctr_common::*;

pub const NAMESPACE: &str = "cocoon-direct";
/// Covers a cold VM boot under TCG on a loaded machine.
pub const CALL: Duration = Duration::from_secs(120);

/// A shim started the way containerd starts one, with a bundle of our own.
pub struct DirectShim {
    pub client: TaskClient,
    pub bundle: PathBuf,
    _dir: tempfile::TempDir,
}

/// An OCI bundle running `args` from a busybox rootfs in the bundle.
pub fn write_bundle(dir: &Path, args: &[&str]) -> PathBuf {
    let bundle = dir.join("bundle");
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    cocoon_integration::image::write_rootfs(Path::new("/bin/busybox"), &rootfs);
    let out = Command::new("ctr")
        .args(["oci", "spec"])
        .env("PATH", cocoon_integration::containerd::tool_path())
        .output()
        .unwrap();
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
pub async fn start_shim(env: &Env, id: &str, args: &[&str]) -> DirectShim {
    start_shim_with(env, id, args, b"")
        .await
        .unwrap_or_else(|e| panic!("shim start: {e}"))
}

/// As `start_shim`, with `options` on the shim's stdin (what containerd writes there);
/// a failed start's stderr as the error.
pub async fn start_shim_with(
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
pub fn inline_options(body: &str) -> Vec<u8> {
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
pub fn exec_request(
    id: &str,
    exec_id: &str,
    args: &[&str],
    stdout: &str,
) -> api::ExecProcessRequest {
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

pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(CALL.as_nanos() as i64)
}

/// A deadline no call to the guest can meet: the shim's ttrpc server drops the
/// handler's future when it passes.
pub fn hurried() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_millis(1).as_nanos() as i64)
}

impl DirectShim {
    pub async fn create(&self, id: &str) -> ttrpc::Result<api::CreateTaskResponse> {
        let req = api::CreateTaskRequest {
            id: id.into(),
            bundle: self.bundle.to_string_lossy().into_owned(),
            ..Default::default()
        };
        self.client.create(ctx(), &req).await
    }

    pub async fn kill(&self, id: &str, exec_id: &str, signal: u32) -> ttrpc::Result<api::Empty> {
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
    pub async fn wait(&self, id: &str) -> api::WaitResponse {
        let req = api::WaitRequest {
            id: id.into(),
            ..Default::default()
        };
        tokio::time::timeout(Duration::from_secs(30), self.client.wait(ctx(), &req))
            .await
            .unwrap_or_else(|_| panic!("Wait for {id} did not return within 30 s"))
            .unwrap()
    }

    pub async fn state(&self, id: &str) -> api::StateResponse {
        let req = api::StateRequest {
            id: id.into(),
            ..Default::default()
        };
        self.client.state(ctx(), &req).await.unwrap()
    }

    pub async fn start(&self, id: &str, exec_id: &str) -> ttrpc::Result<api::StartResponse> {
        let req = api::StartRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.client.start(ctx(), &req).await
    }

    pub async fn pids(&self, id: &str) -> Vec<u32> {
        let req = api::PidsRequest {
            id: id.into(),
            ..Default::default()
        };
        let r = self.client.pids(ctx(), &req).await.unwrap();
        r.processes.iter().map(|p| p.pid).collect()
    }

    /// Kill (if running), Wait, Delete, Shutdown: the pod must then go entirely.
    pub async fn finish(self, env: &Env, id: &str) {
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

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The mount points ending in `suffix`, in the node's namespace or any pod's own.
/// Tests run in parallel and every pod's namespace is read, so the container id in
/// `suffix` must be one no other test uses (a CI run once saw another test's "second"
/// rootfs here).
pub fn mounts_ending(suffix: &str) -> Vec<String> {
    cocoon_integration::mount_points_everywhere()
        .into_iter()
        .filter(|m| m.ends_with(suffix))
        .collect()
}

/// `containerd-shim-cocoon-v2 delete` in `bundle`, as containerd runs it for each task
/// of a shim that died.
pub fn shim_delete(env: &Env, bundle: &Path, id: &str) {
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
    // What it decided (spare a live shim's VM, or kill a shim that does not answer).
    eprintln!(
        "shim delete of {id}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    assert!(out.status.success(), "shim delete of {id} failed");
}

/// The pod VM's VMM process (the test's only pod).
pub fn vmm_pid(env: &Env) -> u32 {
    cocoon_integration::processes_mentioning(&env.run_dir.to_string_lossy())
        .into_iter()
        .find(|(_, c)| c.contains("qemu-system") || c.contains("cocoon-vmm"))
        .expect("no VMM process")
        .0
}

pub fn signal(pid: u32, s: nix::sys::signal::Signal) -> nix::Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), s)
}

/// Stops `pid` with SIGSTOP and waits (10 s at most) until every one of its threads
/// shows as stopped: the stop reaches each thread only when it next runs, which on a
/// loaded machine can come after the test's next step.
pub fn stop_fully(pid: u32) {
    signal(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let stopped = || {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return false;
        };
        tasks.flatten().all(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            // The state follows the command name's closing parenthesis.
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('T') || rest.starts_with('t'))
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !stopped() {
        assert!(
            std::time::Instant::now() < deadline,
            "process {pid} was sent SIGSTOP but its threads did not all stop within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
