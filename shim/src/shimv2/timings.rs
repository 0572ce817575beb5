//! Where a pod's time goes, appended as JSON lines to `<run_dir>/timings.jsonl`
//! (one record per container and one per VM stop): for `cocoon bench run`,
//! and for operators asking why a start was slow.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub const TIMINGS_FILE: &str = "timings.jsonl";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Record {
    pub kind: String,
    pub container_id: String,
    pub vm_id: String,
    /// Shim process start to the first Create call.
    #[serde(default)]
    pub shim_to_create_ms: f64,
    /// 0 when the container joined an existing VM.
    #[serde(default)]
    pub vm_launch_ms: f64,
    #[serde(default)]
    pub agent_ready_ms: f64,
    #[serde(default)]
    pub sandbox_setup_ms: f64,
    #[serde(default)]
    pub container_create_ms: f64,
    #[serde(default)]
    pub start_to_exit_ms: f64,
    #[serde(default)]
    pub delete_ms: f64,
    #[serde(default)]
    pub vm_stop_ms: f64,
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Appends one record; timing is best effort and never fails a call.
pub fn append(run_dir: &Path, rec: &Record) {
    let Ok(line) = serde_json::to_string(rec) else {
        return;
    };
    let _ = std::fs::create_dir_all(run_dir);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run_dir.join(TIMINGS_FILE));
    if let Ok(mut f) = file {
        let _ = writeln!(f, "{line}");
    }
}

/// Reads every record (unparseable lines are skipped).
pub fn read(run_dir: &Path) -> Vec<Record> {
    std::fs::read_to_string(run_dir.join(TIMINGS_FILE))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let d = tempfile::tempdir().unwrap();
        append(
            d.path(),
            &Record {
                kind: "container".into(),
                container_id: "c".into(),
                vm_launch_ms: 1.5,
                ..Default::default()
            },
        );
        append(
            d.path(),
            &Record {
                kind: "vm-stop".into(),
                vm_id: "v".into(),
                vm_stop_ms: 2.0,
                ..Default::default()
            },
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(d.path().join(TIMINGS_FILE))
            .unwrap()
            .write_all(b"garbage\n")
            .unwrap();
        let r = read(d.path());
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].vm_launch_ms, 1.5);
        assert_eq!(r[1].vm_id, "v");
    }
}
