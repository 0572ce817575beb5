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
    fn recycled_pids_are_not_ours() {
        let me = std::process::id();
        assert!(!is_vm_process(me, &[Path::new("/nonexistent/run/pod-x")]));
        assert!(!is_vm_process(u32::MAX, &[Path::new("/")]));
    }
}
