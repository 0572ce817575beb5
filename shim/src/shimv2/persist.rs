//! What the shim writes to disk so that `containerd-shim-cocoon-v2 delete`
//! can clean up after a shim that died: one file per container, in its bundle.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::mounts::ContainerMounts;

pub const STATE_FILE: &str = "cocoon-state.json";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ContainerState {
    pub container_id: String,
    pub vm_id: String,
    pub vm_run_dir: PathBuf,
    pub share: PathBuf,
    /// Host pids of the VM's processes (QEMU, vsock backend, virtiofsd).
    pub vm_pids: Vec<u32>,
    pub mounts: ContainerMounts,
    /// The pod cgroup directories the shim created for the VM's processes.
    #[serde(default)]
    pub host_cgroup: Vec<PathBuf>,
    /// The shim that wrote a state naming a VM: while it lives and answers, the VM is
    /// its to stop (containerd runs `shim delete` whenever a task's connection closes,
    /// also under a live shim).
    #[serde(default)]
    pub shim: Option<Shim>,
    /// The container's Create hooks began and its poststop hooks have not run: a
    /// `shim delete` after its shim died runs them (and only then, as `runc delete`
    /// runs them only for a container its state still holds).
    #[serde(default)]
    pub poststop_pending: bool,
}

/// A shim process and the socket it serves its task API on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shim {
    pub process: ProcessId,
    pub socket: PathBuf,
}

static THIS_SHIM: std::sync::OnceLock<Option<Shim>> = std::sync::OnceLock::new();

impl Shim {
    /// Records this process as the shim serving on `socket`, once, as it starts: read
    /// then, not when a state is written (a shim short of descriptors could not read
    /// /proc, and its state would name no live shim).
    pub fn set_this(socket: &Path) {
        let _ = THIS_SHIM.set(ProcessId::this().map(|process| Self {
            process,
            socket: socket.into(),
        }));
    }

    /// This shim, if it serves (None in `shim start` or `shim delete`).
    pub fn this() -> Option<Self> {
        THIS_SHIM.get().cloned().flatten()
    }
}

/// A process, told apart from a later one given the same pid by its start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    pub pid: u32,
    /// Clock ticks after boot (`/proc/<pid>/stat`'s 22nd field).
    pub started: u64,
}

impl ProcessId {
    pub fn this() -> Option<Self> {
        Self::of(std::process::id())
    }

    /// `pid` as it is now; None if no process has it, or it is exiting or a zombie.
    /// A killed shim's sockets close while it exits, before it is a zombie: containerd's
    /// cleanup can run in that window, and must see the shim as gone.
    pub fn of(pid: u32) -> Option<Self> {
        /// `PF_EXITING` (include/linux/sched.h): set as `do_exit` begins.
        const EXITING: u64 = 0x4;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the parenthesised command name (which may hold anything) start
        // at the 3rd, the state; the 9th holds the task's flags.
        let (_, rest) = stat.rsplit_once(')')?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if matches!(*fields.first()?, "Z" | "X" | "x") {
            return None;
        }
        let flags: u64 = fields.get(9 - 3)?.parse().ok()?;
        if flags & EXITING != 0 {
            return None;
        }
        let started = fields.get(22 - 3)?.parse().ok()?;
        Some(Self { pid, started })
    }

    pub fn alive(&self) -> bool {
        Self::of(self.pid) == Some(*self)
    }
}

impl ContainerState {
    pub fn save(&self, bundle: &Path) -> std::io::Result<()> {
        let tmp = bundle.join(format!("{STATE_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(tmp, bundle.join(STATE_FILE))
    }

    pub fn load(bundle: &Path) -> Option<Self> {
        let text = std::fs::read(bundle.join(STATE_FILE)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    pub fn remove(bundle: &Path) {
        let _ = std::fs::remove_file(bundle.join(STATE_FILE));
    }
}

/// Whether `pid` is alive and still one of this VM's processes (its command
/// line names the VM's run dir or share), so a recycled pid is never killed.
pub fn is_vm_process(pid: u32, marks: &[&Path]) -> bool {
    let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let cmd = String::from_utf8_lossy(&cmd);
    marks
        .iter()
        .any(|m| !m.as_os_str().is_empty() && cmd.contains(&*m.to_string_lossy()))
}

/// A stand-in VM process for tests: one `sleep` whose command line names `run_dir`, as a
/// VMM's does (one process: `sh -c` would leave an orphaned `sleep` holding the test's
/// output when sh is killed). Returned once its command line says so: a process spawned
/// by vfork shows an empty one for a moment after its parent resumes.
#[cfg(test)]
pub fn stand_in_vm(run_dir: &Path) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let child = std::process::Command::new("sleep")
        .arg0(format!("vm {}", run_dir.display()))
        .arg("60")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !is_vm_process(child.id(), &[run_dir]) {
        assert!(
            std::time::Instant::now() < deadline,
            "the stand-in VM's command line never named {}",
            run_dir.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let s = ContainerState {
            container_id: "c".into(),
            vm_pids: vec![1, 2],
            ..Default::default()
        };
        s.save(d.path()).unwrap();
        let l = ContainerState::load(d.path()).unwrap();
        assert_eq!(l.container_id, "c");
        assert_eq!(l.vm_pids, vec![1, 2]);
        ContainerState::remove(d.path());
        assert!(ContainerState::load(d.path()).is_none());
    }

    #[test]
    fn a_process_is_told_apart_from_a_later_one_of_its_pid() {
        let me = ProcessId::this().expect("this process");
        assert!(me.alive());
        let later = ProcessId {
            started: me.started + 1,
            ..me
        };
        assert!(
            !later.alive(),
            "a later process of this pid taken for this one"
        );
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let started = ProcessId::of(pid);
        // Exited, not yet reaped: a zombie is not alive.
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while ProcessId::of(pid).is_some() {
            assert!(std::time::Instant::now() < end, "`true` never exited");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(started.is_none_or(|p| !p.alive()));
        child.wait().unwrap();
    }

    #[test]
    fn recycled_pids_are_not_ours() {
        let me = std::process::id();
        assert!(!is_vm_process(me, &[Path::new("/nonexistent/run/pod-x")]));
        assert!(!is_vm_process(u32::MAX, &[Path::new("/")]));
    }
}
