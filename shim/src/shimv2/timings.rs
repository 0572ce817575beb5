//! Where a pod's time goes, appended as JSON lines to `<run_dir>/timings.jsonl`
//! (per container a `container` record at Delete and a `timeline` record once it
//! started, and a `vm-stop` record per VM): for `cocoon bench run`, and for operators
//! asking why a start was slow.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub const TIMINGS_FILE: &str = "timings.jsonl";
/// The most the file holds before it moves to `timings.jsonl.1` (replacing the one
/// before): it lives in `/run`, the node's memory, for as long as the node runs.
pub const TIMINGS_LIMIT: u64 = 4 * 1024 * 1024;
/// The most guest stages one container's timeline takes, and the longest stage name:
/// the names and their number come from the guest, and each record stays small
/// whatever the guest says (the agent names a container's stages in a few words of
/// `[a-z0-9-]`, about seven of them).
const MAX_GUEST_STAGES: usize = 32;
const MAX_STAGE_NAME: usize = 48;

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
    /// Every stage from the shim's Create call to the container's first instruction,
    /// host and guest on one clock: ms after the Create call, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<Stage>,
    /// How far off a guest stage may be placed (half the round trip that read the
    /// guest's clock).
    #[serde(default)]
    pub clock_uncertainty_ms: f64,
    /// The pod's VM was restored from a VM template, not booted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub from_template: bool,
}

/// One moment of a container's timeline.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Stage {
    pub stage: String,
    /// "host" (read on the shim's clock) or "guest" (the agent's, placed on the host's).
    pub clock: String,
    /// Milliseconds after the shim took the Create call.
    pub at_ms: f64,
}

/// The host's moments of one container's start (the VM's only when its Create booted it).
#[derive(Debug, Clone, Copy)]
pub struct HostMarks {
    pub create_called: Instant,
    /// VMM spawned, agent answered, sandbox set up.
    pub vm: Option<(Instant, Instant, Instant)>,
    /// The VM was restored from a template: its start, the agent's main and listening
    /// happened in the template, before this pod existed, and are left out.
    pub from_template: bool,
    pub create_returned: Instant,
}

/// Places guest CLOCK_BOOTTIME readings on the host's clock. The guest read `boottime_ns`
/// between `asked` and `answered`; taking the midpoint puts each guest moment within
/// half that round trip of where it was (both clocks run at the same rate: kvmclock
/// under KVM, the host's clock under TCG).
#[derive(Debug, Clone, Copy)]
pub struct GuestClock {
    pub asked: Instant,
    pub answered: Instant,
    pub boottime_ns: i64,
}

impl GuestClock {
    /// Guest moment `ns`, in ms after `anchor` on the host's clock. In floating point:
    /// the guest's numbers are its own, and no pair of them may overflow the shim.
    pub fn ms_after(&self, anchor: Instant, ns: i64) -> f64 {
        let asked = ms(self.asked.saturating_duration_since(anchor));
        asked + self.uncertainty_ms() - (self.boottime_ns as f64 - ns as f64) / 1e6
    }

    pub fn uncertainty_ms(&self) -> f64 {
        ms(self.answered.saturating_duration_since(self.asked)) / 2.0
    }
}

/// The guest events the timeline takes: the pod's (the VM's start, then the agent's main
/// and its listening server) only for the container whose Create booted the VM, and this
/// container's own.
///
/// The VM's start is the guest's TSC 0, placed back from agent main by the TSC the agent
/// read there at `tsc_khz` (the host's rate; 0 when unknown leaves it out). Not the guest
/// clock's boot time 0: under TCG the kernel keeps time on jiffies until its TSC
/// clocksource takes over and loses the ticks of its long interrupts-off steps (code
/// patching, the local APIC timer's calibration), so its clock misses 300-500 ms of its
/// own boot and would place the kernel's start that much too late.
pub fn timeline(
    marks: &HostMarks,
    start: (Instant, Instant),
    clock: &GuestClock,
    details: &cocoon_protocol::agent::GuestDetailsResponse,
    container_id: &str,
    tsc_khz: u64,
) -> Vec<Stage> {
    let anchor = marks.create_called;
    let host = |stage: &str, at: Instant| Stage {
        stage: stage.into(),
        clock: "host".into(),
        at_ms: ms(at.saturating_duration_since(anchor)),
    };
    let guest = |stage: &str, ns: i64| Stage {
        stage: stage.into(),
        clock: "guest".into(),
        at_ms: clock.ms_after(anchor, ns),
    };
    let mut out = vec![host("create-called", anchor)];
    if let Some((launched, ready, set_up)) = marks.vm {
        out.push(host("vmm-spawned", launched));
        if !marks.from_template {
            let main = guest("agent-main", details.agent_start_boottime_ns);
            if details.agent_start_tsc > 0 && tsc_khz > 0 {
                out.push(Stage {
                    stage: "vm-start".into(),
                    clock: "guest-tsc".into(),
                    at_ms: main.at_ms - details.agent_start_tsc as f64 / tsc_khz as f64,
                });
            }
            out.push(main);
            out.push(guest("agent-listening", details.server_ready_boottime_ns));
        }
        out.push(host("agent-ready", ready));
        if let Some(e) = details
            .timeline
            .iter()
            .rev()
            .find(|e| e.stage == "sandbox-created")
        {
            out.push(guest("sandbox-created", e.boottime_ns));
        }
        out.push(host("sandbox-set-up", set_up));
    }
    for e in details
        .timeline
        .iter()
        .rev()
        .filter(|e| e.container_id == container_id && stage_name_ok(&e.stage))
        .take(MAX_GUEST_STAGES)
    {
        out.push(guest(&e.stage, e.boottime_ns));
    }
    out.push(host("create-returned", marks.create_returned));
    out.push(host("start-called", start.0));
    out.push(host("start-returned", start.1));
    out.sort_by(|a, b| a.at_ms.total_cmp(&b.at_ms));
    out
}

/// A stage name as the agent writes them: a few words of `[a-z0-9-]`.
fn stage_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_STAGE_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Appends one record; timing is best effort and never fails a call.
pub fn append(run_dir: &Path, rec: &Record) {
    append_within(run_dir, rec, TIMINGS_LIMIT)
}

/// Appends one record, first moving the file to `<file>.1` if the record would take it
/// past `limit`: whole lines in each file. Shims appending at once may each move it;
/// then a few records are lost, never the bound.
fn append_within(run_dir: &Path, rec: &Record, limit: u64) {
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(mut line) = serde_json::to_string(rec) else {
        return;
    };
    line.push('\n');
    let _ = std::fs::create_dir_all(run_dir);
    let path = run_dir.join(TIMINGS_FILE);
    if std::fs::symlink_metadata(&path).is_ok_and(|m| m.len() + line.len() as u64 > limit) {
        let _ = std::fs::rename(&path, run_dir.join(format!("{TIMINGS_FILE}.1")));
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path);
    if let Ok(mut f) = file {
        // One write: appends from several shims do not interleave within a line.
        let _ = f.write_all(line.as_bytes());
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

    fn event(stage: &str, cid: &str, ns: i64) -> cocoon_protocol::agent::TimelineEvent {
        let mut e = cocoon_protocol::agent::TimelineEvent::new();
        e.stage = stage.into();
        e.container_id = cid.into();
        e.boottime_ns = ns;
        e
    }

    /// A guest whose clock reads 1 000 ms at the host's 1 500 ms (after Create), and whose
    /// TSC at agent main says 850 ms since the VM's start (at 1 000 kHz): the VM started
    /// 50 ms after Create, and each of its stages lands where it was.
    #[test]
    fn guest_stages_land_on_the_host_clock_in_order() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let marks = HostMarks {
            create_called: t0,
            vm: Some((at(10), at(1200), at(1300))),
            from_template: false,
            create_returned: at(1400),
        };
        // Read between 1 490 and 1 510 ms: midpoint 1 500, 10 ms either way.
        let clock = GuestClock {
            asked: at(1490),
            answered: at(1510),
            boottime_ns: 1_000_000_000,
        };
        let mut d = cocoon_protocol::agent::GuestDetailsResponse::new();
        d.agent_start_boottime_ns = 400_000_000;
        d.agent_start_tsc = 850_000;
        d.server_ready_boottime_ns = 600_000_000;
        d.timeline = vec![
            event("sandbox-created", "", 750_000_000),
            event("container-create-received", "other", 790_000_000),
            event("container-create-received", "c", 800_000_000),
            event("container-created", "c", 850_000_000),
            event("container-running", "c", 950_000_000),
        ];
        let t = timeline(&marks, (at(1420), at(1460)), &clock, &d, "c", 1000);
        let got: Vec<(&str, &str, i64)> = t
            .iter()
            .map(|s| (s.stage.as_str(), s.clock.as_str(), s.at_ms.round() as i64))
            .collect();
        assert_eq!(
            got,
            [
                ("create-called", "host", 0),
                ("vmm-spawned", "host", 10),
                ("vm-start", "guest-tsc", 50),
                ("agent-main", "guest", 900),
                ("agent-listening", "guest", 1100),
                ("agent-ready", "host", 1200),
                ("sandbox-created", "guest", 1250),
                ("sandbox-set-up", "host", 1300),
                ("container-create-received", "guest", 1300),
                ("container-created", "guest", 1350),
                ("create-returned", "host", 1400),
                ("start-called", "host", 1420),
                ("container-running", "guest", 1450),
                ("start-returned", "host", 1460),
            ]
        );
        assert_eq!(clock.uncertainty_ms(), 10.0);
        // A hostile guest's extreme numbers place stages absurdly, never panic.
        let wild = GuestClock {
            boottime_ns: i64::MIN,
            ..clock
        };
        assert!(wild.ms_after(t0, i64::MAX).is_finite());
        // A VM restored from a template started, and its agent ran, before the pod:
        // from the VMM's spawn it goes straight to the agent answering.
        let restored = HostMarks {
            from_template: true,
            ..marks
        };
        let t = timeline(&restored, (at(1420), at(1460)), &clock, &d, "c", 1000);
        let stages: Vec<&str> = t.iter().map(|s| s.stage.as_str()).collect();
        assert_eq!(
            stages[..4],
            [
                "create-called",
                "vmm-spawned",
                "agent-ready",
                "sandbox-created"
            ]
        );
        // A container that joined a running VM has no VM stages.
        let joined = HostMarks { vm: None, ..marks };
        let t = timeline(&joined, (at(1420), at(1460)), &clock, &d, "c", 1000);
        assert!(t
            .iter()
            .all(|s| !s.stage.starts_with("agent") && s.stage != "vm-start"));
        assert_eq!(
            t.len(),
            7,
            "Create, its three guest stages, Create returned, Start: {t:#?}"
        );
    }

    /// Stage names and their number come from the guest: only names as the agent
    /// writes them are taken, and at most `MAX_GUEST_STAGES` of them.
    #[test]
    fn a_guests_stages_are_held_to_a_few_short_names() {
        let t0 = Instant::now();
        let marks = HostMarks {
            create_called: t0,
            vm: None,
            from_template: false,
            create_returned: t0,
        };
        let clock = GuestClock {
            asked: t0,
            answered: t0,
            boottime_ns: 0,
        };
        let mut d = cocoon_protocol::agent::GuestDetailsResponse::new();
        d.timeline = vec![
            event("container-created", "c", 1),
            event("forged\nline", "c", 2),
            event(&"x".repeat(4096), "c", 3),
            event("", "c", 4),
            event("Upper", "c", 5),
        ];
        d.timeline
            .extend((0..1000).map(|i| event(&format!("stage-{i}"), "c", 10 + i)));
        let guest_stages = |d: &cocoon_protocol::agent::GuestDetailsResponse| -> Vec<String> {
            timeline(&marks, (t0, t0), &clock, d, "c", 0)
                .into_iter()
                .filter(|s| s.clock == "guest")
                .map(|s| s.stage)
                .collect()
        };
        let guest = guest_stages(&d);
        assert_eq!(guest.len(), MAX_GUEST_STAGES, "{guest:?}");
        assert!(guest.iter().all(|s| s.starts_with("stage-")), "{guest:?}");
        d.timeline.truncate(5);
        assert_eq!(guest_stages(&d), ["container-created"]);
    }

    /// The file moves aside before a record would take it past its limit: the two
    /// files together stay within twice the limit, each of whole lines.
    #[test]
    fn the_file_moves_aside_at_its_limit() {
        let d = tempfile::tempdir().unwrap();
        let rec = |i: usize| Record {
            kind: "container".into(),
            container_id: format!("c{i}"),
            ..Default::default()
        };
        let limit = 2000;
        for i in 0..200 {
            append_within(d.path(), &rec(i), limit);
        }
        let main = std::fs::metadata(d.path().join(TIMINGS_FILE))
            .unwrap()
            .len();
        let old = std::fs::metadata(d.path().join(format!("{TIMINGS_FILE}.1")))
            .unwrap()
            .len();
        assert!(main <= limit && old <= limit, "{main} {old}");
        let recent = read(d.path());
        assert!(!recent.is_empty());
        assert_eq!(recent.last().unwrap().container_id, "c199");
        let text = std::fs::read_to_string(d.path().join(format!("{TIMINGS_FILE}.1"))).unwrap();
        assert!(text
            .lines()
            .all(|l| serde_json::from_str::<Record>(l).is_ok()));
    }

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
