//! Test harness: the agent binary in its dev mode (`--listen-unix`), a
//! busybox rootfs, runc-like OCI specs, and stdio stream helpers.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cocoon_protocol::agent::{
    ContainerRequest, CreateContainerRequest, ExecProcessRequest, ProcessRequest,
    RemoveContainerRequest, SignalProcessRequest, StdioStreams, WaitProcessResponse,
};
use cocoon_protocol::agent_ttrpc::AgentClient;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

pub const RPC_TIMEOUT_NS: i64 = 30_000_000_000;

pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(RPC_TIMEOUT_NS)
}

/// These tests create namespaces and mounts: they need root.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Without root, which namespaces and mounts need, or without Debian's busybox-static
/// for the rootfs: fails the test under CI=true, else says SKIPPED and returns.
macro_rules! require_root {
    () => {
        if !is_root() {
            cocoon_nested::testing::missing(module_path!(), "needs root");
            return;
        }
        if !std::path::Path::new("/bin/busybox").exists() {
            cocoon_nested::testing::missing(
                module_path!(),
                "needs a static /bin/busybox (apt-get install busybox-static)",
            );
            return;
        }
    };
}
pub(crate) use require_root;

pub fn sh(script: &str) -> Vec<&str> {
    vec!["sh", "-c", script]
}

/// Reads from `out` into `got` until `got` contains `pat` (10 s deadline).
pub async fn read_until(out: &mut UnixStream, got: &mut Vec<u8>, pat: &str) {
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(got).contains(pat) {
        let n = tokio::time::timeout(Duration::from_secs(10), out.read(&mut buf))
            .await
            .expect("terminal output")
            .unwrap();
        assert!(
            n > 0,
            "EOF before {pat:?}: {:?}",
            String::from_utf8_lossy(got)
        );
        got.extend_from_slice(&buf[..n]);
    }
}

/// Polls `f` until it returns Some or the deadline passes.
pub async fn poll<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A running agent in dev mode; killed (with its containers) on drop.
pub struct Agent {
    pub dir: tempfile::TempDir,
    child: Child,
    pub client: AgentClient,
    pids: Mutex<Vec<i32>>,
}

impl Agent {
    pub async fn start() -> Agent {
        Self::start_with(&[]).await
    }

    /// Starts the agent with extra dev-mode flags after `--listen-unix <dir>`.
    pub async fn start_with(extra: &[&str]) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_cocoon-agent"))
            .arg("--listen-unix")
            .arg(dir.path())
            .args(extra)
            .stdout(Stdio::piped())
            // The agent's log, when debugging a test.
            .stderr(if std::env::var_os("COCOON_TEST_AGENT_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .unwrap();
        // Killed on drop from here on, even if it never gets ready.
        let guard = KillOnDrop(Some(child.id() as i32));
        // The agent prints its ready line once both servers listen.
        let stdout = child.stdout.take().unwrap();
        let ready = tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .any(|l| l.starts_with("cocoon-agent: ready"))
        });
        let ready = tokio::time::timeout(Duration::from_secs(20), ready)
            .await
            .expect("the agent did not get ready in time")
            .unwrap();
        assert!(ready, "the agent exited before it was ready");
        let sock = dir.path().join("agent.sock");
        let c = ttrpc::r#async::Client::connect(&format!("unix://{}", sock.display()))
            .await
            .unwrap();
        std::mem::forget(guard);
        Agent {
            dir,
            child,
            client: AgentClient::new(c),
            pids: Mutex::new(Vec::new()),
        }
    }

    /// The agent's pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// How many fds the agent holds now.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    pub fn stdio_path(&self) -> PathBuf {
        self.dir.path().join("stdio.sock")
    }

    /// Opens a stdio stream for `<kind> <cid>[ <exec>]`.
    pub async fn stream(&self, kind: &str, cid: &str, exec: &str) -> UnixStream {
        let mut s = UnixStream::connect(self.stdio_path()).await.unwrap();
        let header = if exec.is_empty() {
            format!("{kind} {cid}\n")
        } else {
            format!("{kind} {cid} {exec}\n")
        };
        s.write_all(header.as_bytes()).await.unwrap();
        s
    }

    pub async fn create(&self, cid: &str, spec: &Value, stdio: StdioStreams) -> ttrpc::Result<u32> {
        let mut req = CreateContainerRequest::new();
        req.container_id = cid.into();
        req.oci_spec_json = serde_json::to_vec(spec).unwrap();
        req.stdio = Some(stdio).into();
        let r = self.client.create_container(ctx(), &req).await?;
        self.pids.lock().unwrap().push(r.pid as i32);
        Ok(r.pid)
    }

    pub async fn start_container(&self, cid: &str) -> ttrpc::Result<()> {
        let mut req = ContainerRequest::new();
        req.container_id = cid.into();
        self.client.start_container(ctx(), &req).await.map(|_| ())
    }

    pub async fn exec(
        &self,
        cid: &str,
        exec_id: &str,
        process: &Value,
        stdio: StdioStreams,
    ) -> ttrpc::Result<u32> {
        let mut req = ExecProcessRequest::new();
        req.container_id = cid.into();
        req.exec_id = exec_id.into();
        req.process_json = serde_json::to_vec(process).unwrap();
        req.stdio = Some(stdio).into();
        let r = self.client.exec_process(ctx(), &req).await?;
        self.pids.lock().unwrap().push(r.pid as i32);
        Ok(r.pid)
    }

    pub async fn wait(&self, cid: &str, exec_id: &str) -> ttrpc::Result<WaitProcessResponse> {
        let mut req = ProcessRequest::new();
        req.container_id = cid.into();
        req.exec_id = exec_id.into();
        self.client.wait_process(ctx(), &req).await
    }

    pub async fn signal(&self, cid: &str, exec_id: &str, sig: i32, all: bool) -> ttrpc::Result<()> {
        let mut req = SignalProcessRequest::new();
        req.container_id = cid.into();
        req.exec_id = exec_id.into();
        req.signal = sig as u32;
        req.all = all;
        self.client.signal_process(ctx(), &req).await.map(|_| ())
    }

    pub async fn remove(&self, cid: &str) -> ttrpc::Result<()> {
        let mut req = RemoveContainerRequest::new();
        req.container_id = cid.into();
        self.client.remove_container(ctx(), &req).await.map(|_| ())
    }

    /// Runs a container to completion: returns (status, stdout, stderr).
    pub async fn run(&self, cid: &str, spec: &Value) -> (i32, Vec<u8>, Vec<u8>) {
        self.create(cid, spec, streams(false, true, true))
            .await
            .unwrap();
        let mut out = self.stream("stdout", cid, "").await;
        let mut err = self.stream("stderr", cid, "").await;
        self.start_container(cid).await.unwrap();
        let (o, e) = tokio::join!(read_all(&mut out), read_all(&mut err));
        let status = self.wait(cid, "").await.unwrap().status;
        self.remove(cid).await.unwrap();
        (status, o, e)
    }
}

/// Kills a pid on drop (an agent that failed to start).
struct KillOnDrop(Option<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Normally every test removed its containers; after a failed assert
        // nothing may outlive the test. A container init is PID 1 of its
        // namespace, so killing it ends the whole container.
        for pid in self.pids.lock().unwrap().iter() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn read_all(s: &mut UnixStream) -> Vec<u8> {
    let mut v = Vec::new();
    s.read_to_end(&mut v).await.unwrap();
    v
}

pub fn streams(stdin: bool, stdout: bool, stderr: bool) -> StdioStreams {
    let mut s = StdioStreams::new();
    s.stdin = stdin;
    s.stdout = stdout;
    s.stderr = stderr;
    s
}

/// Applets the tests use, as symlinks to a static busybox.
const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "id", "grep", "touch", "mkdir", "pwd", "env", "seq", "stty",
    "head", "wc", "ls", "true", "false", "kill", "tr", "hostname", "tty", "stat",
];

/// A minimal rootfs: static busybox and the usual top-level directories.
pub fn busybox_rootfs(parent: &Path) -> PathBuf {
    let root = parent.join("rootfs");
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "root"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for a in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a)).unwrap();
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/tmp:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nuser:x:1000:\n").unwrap();
    root
}

pub fn process(args: &[&str]) -> Value {
    json!({
        "terminal": false,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
        "cwd": "/",
        "capabilities": {
            "bounding": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
            "effective": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
            "permitted": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
            "ambient": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
        },
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": true
    })
}

/// What `runc spec` writes, with a writable root and the given command.
pub fn spec(rootfs: &Path, args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": process(args),
        "root": {"path": rootfs, "readonly": false},
        "hostname": "cocoon-test",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}
            ],
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/sys/firmware", "/proc/scsi"
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"
            ]
        }
    })
}

pub fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}
