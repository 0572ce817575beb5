//! A private containerd for tests: its own root, state and sockets under a
//! temp dir, the CRI plugin off, our shim and tools on its PATH. `ctr` runs
//! against it. Dropping it stops containerd (shims outlive it by design;
//! tests check they are gone after their tasks are deleted).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Where containerd 2's binaries come first on every PATH this test process sets, once
/// it asked for them (`use_containerd2`); otherwise the host's containerd (Debian 12's
/// 1.6) runs.
static CONTAINERD2_BIN: OnceLock<PathBuf> = OnceLock::new();

/// Set to `2`, every test runs containerd 2, as if it called `use_containerd2` (a sweep
/// of the whole suite under containerd 2: `COCOON_TEST_CONTAINERD=2 cargo nextest run`).
pub const CONTAINERD_ENV: &str = "COCOON_TEST_CONTAINERD";

/// containerd 2's binaries, if this test process runs them.
fn containerd2_in_use() -> Option<&'static PathBuf> {
    if let Some(bin) = CONTAINERD2_BIN.get() {
        return Some(bin);
    }
    match std::env::var(CONTAINERD_ENV).as_deref() {
        Err(_) | Ok("") | Ok("1") => {}
        Ok("2") => use_containerd2(),
        Ok(other) => panic!("{CONTAINERD_ENV}={other:?}: the tests run containerd 1 or 2"),
    }
    CONTAINERD2_BIN.get()
}

/// The major version of the containerd this test process runs: 2 once it asked for
/// containerd 2, Debian 12's 1 otherwise.
pub fn major_version_in_use() -> u32 {
    if containerd2_in_use().is_some() {
        2
    } else {
        1
    }
}

/// containerd 2's `containerd`, `ctr` and `containerd-shim-runc-v2`, which
/// `scripts/setup-host.sh` unpacks into Cocoon's cache (Debian 12 packages only 1.6).
pub fn containerd2_bin() -> Result<PathBuf, String> {
    let cache = cocoon_rootfs::resolve_cache_dir(None).map_err(|e| e.to_string())?;
    let bin = cache.join("containerd2/usr/bin");
    // Its own runc shim too: without it containerd 2 would run 1.6's from PATH.
    let all = ["containerd", "ctr", "containerd-shim-runc-v2"];
    if all.iter().all(|b| bin.join(b).is_file()) {
        Ok(bin)
    } else {
        Err(format!(
            "containerd 2 is not in {} (scripts/setup-host.sh unpacks it there)",
            bin.display()
        ))
    }
}

/// From here on this test process runs containerd 2 (its containerd, ctr and runc
/// shim), for the node and ctr helpers alike. Fails the test if it is missing.
pub fn use_containerd2() {
    let bin = containerd2_bin().unwrap_or_else(|e| panic!("{e}"));
    let set = CONTAINERD2_BIN.get_or_init(|| bin.clone());
    assert_eq!(set, &bin);
}

pub struct Containerd {
    pub dir: PathBuf,
    pub address: PathBuf,
    child: Option<Child>,
    env_path: String,
    cocoon_config: Option<PathBuf>,
}

/// Directories with containerd 2 (when asked for), our binaries (target/debug), virtiofsd,
/// and the system.
pub fn tool_path() -> String {
    let root = crate::workspace_root();
    let mut dirs: Vec<String> = containerd2_in_use()
        .map(|b| b.display().to_string())
        .into_iter()
        .collect();
    dirs.push(root.join("target/debug").display().to_string());
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin").display().to_string());
    }
    dirs.push(std::env::var("PATH").unwrap_or_default());
    dirs.join(":")
}

impl Containerd {
    /// Starts containerd with `cocoon_config` as the shim's COCOON_CONFIG.
    pub fn start(dir: &Path, cocoon_config: &Path) -> Containerd {
        Self::start_with(dir, Some(cocoon_config), tool_path())
    }

    /// Starts containerd with the given PATH and, if any, COCOON_CONFIG.
    pub fn start_with(dir: &Path, cocoon_config: Option<&Path>, env_path: String) -> Containerd {
        // A PATH of the test's own still finds the containerd the test process runs.
        let env_path = match containerd2_in_use() {
            Some(bin) if !env_path.starts_with(&*bin.to_string_lossy()) => {
                format!("{}:{env_path}", bin.display())
            }
            _ => env_path,
        };
        std::fs::create_dir_all(dir).unwrap();
        let address = dir.join("containerd.sock");
        let config = dir.join("containerd.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{r}/root\"\nstate = \"{r}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{a}\"\n[ttrpc]\n  address = \"{a}.ttrpc\"\n[debug]\n  level = \"info\"\n[plugins.\"io.containerd.nri.v1.nri\"]\n  socket_path = \"{r}/nri.sock\"\n",
                r = dir.display(),
                a = address.display()
            ),
        )
        .unwrap();
        let mut c = Containerd {
            dir: dir.to_path_buf(),
            address,
            child: None,
            env_path,
            cocoon_config: cocoon_config.map(Path::to_path_buf),
        };
        c.spawn();
        c
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("containerd.log"))
            .unwrap();
        let mut cmd = Command::new("containerd");
        if let Some(c) = &self.cocoon_config {
            cmd.env("COCOON_CONFIG", c);
        } else {
            cmd.env_remove("COCOON_CONFIG");
        }
        let child = cmd
            .arg("--config")
            .arg(self.dir.join("containerd.toml"))
            .env("PATH", &self.env_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("containerd (apt-get install containerd)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let version = self
                .address
                .exists()
                .then(|| self.ctr(&["version"]))
                .filter(|o| o.status.success());
            if let Some(v) = version {
                let text = String::from_utf8_lossy(&v.stdout).into_owned();
                let server = text.split("Server:").nth(1).unwrap_or_default();
                let version = server
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("Version:"))
                    .map(|v| v.trim().trim_start_matches('v'))
                    .unwrap_or_default();
                // A test that asked for containerd 2 must not run another one.
                assert!(
                    containerd2_in_use().is_none() || version.starts_with("2."),
                    "this test runs containerd 2, the server says: {text}"
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not come up: {}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops containerd (SIGTERM, then SIGKILL) without touching shims.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
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

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        crate::tail_lines(&text, 30)
    }

    pub fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(&self.address)
            .args(args)
            .env("PATH", &self.env_path);
        c
    }

    /// Runs `ctr args` to completion; a call still running after
    /// [`crate::stuck::CTR_DEADLINE`] fails the test with what is stuck where.
    pub fn ctr(&self, args: &[&str]) -> Output {
        crate::stuck::output_within(self.ctr_cmd(args), crate::stuck::CTR_DEADLINE, || {
            self.stuck_report()
        })
    }

    /// containerd's log and, from the test's directory (the one above containerd's),
    /// the VMs' logs and our processes' wait channels.
    pub fn stuck_report(&self) -> String {
        let root = self.dir.parent().unwrap_or(&self.dir);
        format!(
            "--- containerd log (end):\n{}\n{}",
            self.log_tail(),
            crate::stuck::report(root)
        )
    }

    /// Imports the test busybox image (built once per containerd).
    pub fn import_busybox(&self) {
        let tar = self.dir.join("busybox.tar");
        crate::image::write_archive(Path::new("/bin/busybox"), &tar);
        let out = self.ctr(&["images", "import", &tar.to_string_lossy()]);
        assert!(
            out.status.success(),
            "import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = self.ctr(&["images", "ls", "-q"]);
        let list = String::from_utf8_lossy(&out.stdout);
        assert!(
            list.contains(crate::image::IMAGE_REF),
            "image not listed: {list}"
        );
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop_and_kill_shims();
    }
}

impl Containerd {
    pub fn stop_and_kill_shims(&mut self) {
        self.stop();
        // Shims outlive containerd by design; a failed test must not leave
        // them (and their VMs, which die with them) running.
        let addr = self.address.to_string_lossy().into_owned();
        for (pid, _) in crate::processes_mentioning(&addr) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}
