//! Room for the open-file limit a process is given. The shim passes on its own
//! `RLIMIT_NOFILE` where a spec names none, as runc's container inherits containerd's
//! (CRI's specs name none; a node's containerd often runs with `LimitNOFILE=infinity`,
//! the host's `fs.nr_open`). The guest kernel refuses a limit above its own
//! `fs.nr_open` (1 048 576 by default), which a host may have raised: it is raised here
//! to what the process is given, as the host's must already be. It only bounds what a
//! process may ask for; file tables grow as files are opened.

use std::path::Path;

use oci_spec::runtime::{PosixRlimitType, Process};

const NR_OPEN: &str = "/proc/sys/fs/nr_open";

/// Raises `fs.nr_open` (at `path`) to the process's `RLIMIT_NOFILE` hard limit when that
/// is higher. A failure is only logged: setting the limit then fails with the reason.
pub fn make_room(process: &Process, path: &Path) {
    let Some(hard) = process
        .rlimits()
        .iter()
        .flatten()
        .filter(|r| r.typ() == PosixRlimitType::RlimitNofile)
        .map(|r| r.hard())
        .max()
    else {
        return;
    };
    // Two creates at once must not lower what the other just raised.
    static RAISING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = RAISING.lock().unwrap_or_else(|e| e.into_inner());
    let current = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    if current.is_some_and(|c| c >= hard) {
        return;
    }
    match std::fs::write(path, hard.to_string()) {
        Ok(()) => tracing::debug!(hard, "fs.nr_open raised for RLIMIT_NOFILE"),
        Err(e) => tracing::warn!(hard, "cannot raise fs.nr_open: {e}"),
    }
}

/// `make_room` on the guest's own `fs.nr_open`.
pub fn make_room_in_guest(process: &Process) {
    make_room(process, Path::new(NR_OPEN));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(nofile_hard: Option<u64>) -> Process {
        let mut p = serde_json::json!({"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}});
        if let Some(h) = nofile_hard {
            p["rlimits"] = serde_json::json!([{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": h}]);
        }
        serde_json::from_value(p).unwrap()
    }

    #[test]
    fn nr_open_is_raised_to_the_hard_limit_and_never_lowered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nr_open");
        std::fs::write(&path, "1048576\n").unwrap();
        make_room(&process(Some(4096)), &path);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1048576\n");
        make_room(&process(None), &path);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1048576\n");
        make_room(&process(Some(1073741816)), &path);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1073741816");
    }
}
