//! A private containerd for tests: its own root, state and sockets under a
//! temp dir, the CRI plugin off, our shim and tools on its PATH. `ctr` runs
//! against it. Dropping it stops containerd (shims outlive it by design;
//! tests check they are gone after their tasks are deleted).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct Containerd {
    pub dir: PathBuf,
    pub address: PathBuf,
    child: Option<Child>,
    env_path: String,
    cocoon_config: Option<PathBuf>,
}

/// Directories with our binaries (target/debug), virtiofsd, and the system.
pub fn tool_path() -> String {
    let root = crate::workspace_root();
    let mut dirs = vec![root.join("target/debug").display().to_string()];
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
        std::fs::create_dir_all(dir).unwrap();
        let address = dir.join("containerd.sock");
        let config = dir.join("containerd.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{r}/root\"\nstate = \"{r}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{a}\"\n[ttrpc]\n  address = \"{a}.ttrpc\"\n[debug]\n  level = \"info\"\n",
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
            if self.address.exists() && self.ctr(&["version"]).status.success() {
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
