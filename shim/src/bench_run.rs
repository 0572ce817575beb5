//! `cocoon bench run`: the latency of `ctr run --rm <image> <id> true` with
//! cocoon and with runc, alternating in one run, cocoon's breakdown (from the
//! shim's timing records), and the host memory one pod costs.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;

use crate::bench::Stats;
use crate::shimv2::timings;

#[derive(Debug, Error)]
pub enum RunBenchError {
    #[error("cannot run ctr")]
    Ctr(#[source] std::io::Error),
    #[error("ctr {args} failed: {stderr}")]
    CtrFailed { args: String, stderr: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    pub process: String,
    pub pid: u32,
    /// Private memory: RssAnon + RssFile (kB).
    pub rss_kb: u64,
    /// Shared memory mapped (for QEMU and the backends: guest RAM touched) (kB).
    pub shmem_kb: u64,
    /// Proportional set size less its shared-memory part (kB): what the process holds
    /// beyond guest RAM, with the pages it shares with other processes (the same
    /// binary's text in every pod's shim) split between them. #12's footprint measure.
    pub pss_kb: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TimelineRow {
    pub stage: String,
    pub clock: String,
    pub at_ms: Stats,
    /// Median of the step from the stage before (the table's "+ms").
    pub step_ms: f64,
}

/// Each stage found in every record, with its spread over the runs.
pub fn timeline_rows(records: &[&timings::Record]) -> Vec<TimelineRow> {
    let with: Vec<&timings::Record> = records
        .iter()
        .copied()
        .filter(|r| !r.timeline.is_empty())
        .collect();
    let Some(first) = with.first() else {
        return Vec::new();
    };
    let mut rows: Vec<TimelineRow> = first
        .timeline
        .iter()
        .filter_map(|s| {
            let at: Vec<f64> = with
                .iter()
                .filter_map(|r| r.timeline.iter().find(|x| x.stage == s.stage))
                .map(|x| x.at_ms)
                .collect();
            (at.len() == with.len()).then(|| TimelineRow {
                stage: s.stage.clone(),
                clock: s.clock.clone(),
                at_ms: Stats::of(&at),
                step_ms: 0.0,
            })
        })
        .collect();
    rows.sort_by(|a, b| a.at_ms.median.total_cmp(&b.at_ms.median));
    for i in 1..rows.len() {
        rows[i].step_ms = rows[i].at_ms.median - rows[i - 1].at_ms.median;
    }
    rows
}

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub runs: usize,
    pub image: String,
    pub runc_ms: Vec<f64>,
    pub cocoon_ms: Vec<f64>,
    pub summary: Vec<(String, Stats)>,
    pub breakdown: Vec<(String, Stats)>,
    /// The whole start on one clock: each stage's ms after the shim's Create call
    /// (guest stages placed through the agent's clock), in order of their medians.
    pub timeline: Vec<TimelineRow>,
    pub cocoon_memory: Vec<Memory>,
    pub runc_memory: Vec<Memory>,
    pub cocoon_footprint: SharedFootprint,
    pub runc_footprint: SharedFootprint,
}

fn ctr(address: &Path, args: &[&str]) -> Result<std::process::Output, RunBenchError> {
    Command::new("ctr")
        .arg("--address")
        .arg(address)
        .args(args)
        .output()
        .map_err(RunBenchError::Ctr)
}

fn ctr_ok(address: &Path, args: &[&str]) -> Result<(), RunBenchError> {
    let o = ctr(address, args)?;
    if o.status.success() {
        Ok(())
    } else {
        Err(RunBenchError::CtrFailed {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        })
    }
}

fn timed_run(address: &Path, runtime: &str, image: &str, id: &str) -> Result<f64, RunBenchError> {
    let t = Instant::now();
    ctr_ok(
        address,
        &["run", "--rm", "--runtime", runtime, image, id, "true"],
    )?;
    Ok(t.elapsed().as_secs_f64() * 1000.0)
}

/// `(RssAnon + RssFile, RssShmem)` in kB.
fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("RssAnon:") + field("RssFile:"), field("RssShmem:"))
}

/// Processes whose command line contains every one of `needles`.
fn find_processes(needles: &[&str]) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Some(cmd) = cmdline(pid) else {
            continue;
        };
        if needles.iter().all(|n| cmd.contains(n)) {
            out.push((pid, cmd));
        }
    }
    out
}

fn memory_of(procs: &[(u32, String)]) -> Vec<Memory> {
    procs
        .iter()
        .map(|(pid, cmd)| {
            // argv[0], less a pod's virtiofsd's `@<share>`, less its directory.
            let name = cmd
                .split_whitespace()
                .next()
                .unwrap_or("")
                .split('@')
                .next()
                .unwrap_or("")
                .rsplit('/')
                .next()
                .unwrap_or("")
                .to_string();
            let (rss_kb, shmem_kb) = rss(*pid);
            let pss_kb = crate::telemetry::Rollup::of(*pid).map_or(0, |r| r.pss_beyond_shmem());
            Memory {
                process: name,
                pid: *pid,
                rss_kb,
                shmem_kb,
                pss_kb,
            }
        })
        .collect()
}

/// The host memory of idle pods under one runtime, by process kind, once `pods` of
/// them run: what a pod costs a node that runs several, where every pod's shim (and
/// janitor, and VMM) shares its binary's text with the others.
#[derive(Debug, Clone, Serialize)]
pub struct SharedFootprint {
    pub pods: usize,
    /// Process kind (argv[0]'s file name) and its Pss beyond shared memory per pod (kB).
    pub pss_kb_per_pod: Vec<(String, u64)>,
    pub total_pss_kb_per_pod: u64,
}

impl SharedFootprint {
    fn of(mem: &[Memory], pods: usize) -> Self {
        let mut by_kind: std::collections::BTreeMap<&str, u64> = Default::default();
        for m in mem {
            *by_kind.entry(&m.process).or_default() += m.pss_kb;
        }
        let n = pods.max(1) as u64;
        let pss_kb_per_pod: Vec<(String, u64)> = by_kind
            .into_iter()
            .map(|(k, v)| (k.to_string(), v / n))
            .collect();
        let total_pss_kb_per_pod = pss_kb_per_pod.iter().map(|(_, v)| v).sum();
        Self {
            pods,
            pss_kb_per_pod,
            total_pss_kb_per_pod,
        }
    }
}

fn cmdline(pid: u32) -> Option<String> {
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(String::from_utf8_lossy(&cmd).replace('\0', " "))
}

/// The processes of the idle pods under `runtime`: each pod's shim and everything
/// below it (cocoon's janitor, VMM, PID-namespace waiters, virtiofsd and its helpers;
/// runc's container), and for cocoon anything else that names the pod's run dir.
fn idle_pod_processes(address: &Path, runtime: &str, run_dir: &Path) -> Vec<Memory> {
    let addr = address.to_string_lossy().into_owned();
    let mut procs = find_processes(&["containerd-shim", &addr]);
    let shims: Vec<u32> = procs.iter().map(|p| p.0).collect();
    procs.extend(
        crate::telemetry::descendants(&shims)
            .into_iter()
            .filter_map(|pid| Some((pid, cmdline(pid).filter(|c| !c.trim().is_empty())?))),
    );
    if runtime.contains("cocoon") {
        procs.extend(find_processes(&[&run_dir.to_string_lossy()]));
    }
    procs.sort();
    procs.dedup_by_key(|p| p.0);
    memory_of(&procs)
}

/// Memory of idle pods (detached `sleep`s) under `runtime`: each process of the first
/// pod alone, then by kind per pod once `pods` run. Every pod is removed again, also
/// when one fails to start.
fn pod_memory(
    address: &Path,
    runtime: &str,
    image: &str,
    tag: &str,
    run_dir: &Path,
    pods: usize,
) -> Result<(Vec<Memory>, SharedFootprint), RunBenchError> {
    let ids: Vec<String> = (0..pods.max(1)).map(|i| format!("{tag}-{i}")).collect();
    let mut started = Vec::new();
    let measured = (|| {
        let mut one = Vec::new();
        for id in &ids {
            ctr_ok(
                address,
                &["run", "-d", "--runtime", runtime, image, id, "sleep", "600"],
            )?;
            started.push(id.clone());
            // The pod is up once its task runs (ctr run -d returns after Start). A host
            // runtime's init may still be on its way to exec `sleep` then: counted as
            // what it was before, it would be missing from the pod's processes.
            if !runtime.contains("cocoon") {
                wait_for_exec(address, id, "sleep");
            }
            if one.is_empty() {
                one = idle_pod_processes(address, runtime, run_dir);
            }
        }
        let all = idle_pod_processes(address, runtime, run_dir);
        Ok((one, SharedFootprint::of(&all, ids.len())))
    })();
    for id in &started {
        remove_task(address, id);
    }
    let removed = started
        .iter()
        .try_for_each(|id| ctr_ok(address, &["container", "delete", id]));
    let measured = measured?;
    removed?;
    Ok(measured)
}

/// Waits (10 s at most) until task `id`'s process on the host runs `comm`.
fn wait_for_exec(address: &Path, id: &str, comm: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let pid = ctr(address, &["task", "ls"]).ok().and_then(|o| {
            String::from_utf8_lossy(&o.stdout).lines().find_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some(id)).then(|| f.next()?.parse::<u32>().ok())?
            })
        });
        let running = pid
            .and_then(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).ok())
            .is_some_and(|c| c.trim() == comm);
        if running {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::warn!(id, comm, "the task's process does not run {comm} yet");
}

fn remove_task(address: &Path, id: &str) {
    let _ = ctr(address, &["task", "kill", "-s", "SIGKILL", id]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while ctr(address, &["task", "delete", id])
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `runs` timed `ctr run --rm` of each runtime, then the memory of one idle pod and
/// of each pod among `idle_pods`.
pub fn run_bench(
    address: &Path,
    image: &str,
    runs: usize,
    idle_pods: usize,
    run_dir: &Path,
) -> Result<RunReport, RunBenchError> {
    let tag = std::process::id();
    let mut runc_ms = Vec::new();
    let mut cocoon_ms = Vec::new();
    let mut ids = Vec::new();
    for i in 0..runs {
        runc_ms.push(timed_run(
            address,
            "io.containerd.runc.v2",
            image,
            &format!("bench-runc-{tag}-{i}"),
        )?);
        let id = format!("bench-cocoon-{tag}-{i}");
        cocoon_ms.push(timed_run(address, "io.containerd.cocoon.v2", image, &id)?);
        ids.push(id);
    }
    let records = timings::read(run_dir);
    let containers: Vec<&timings::Record> = records
        .iter()
        .filter(|r| r.kind == "container" && ids.contains(&r.container_id))
        .collect();
    let stops: Vec<f64> = records
        .iter()
        .filter(|r| r.kind == "vm-stop" && containers.iter().any(|c| c.vm_id == r.vm_id))
        .map(|r| r.vm_stop_ms)
        .collect();
    let col = |f: fn(&timings::Record) -> f64| {
        Stats::of(&containers.iter().map(|r| f(r)).collect::<Vec<_>>())
    };
    let breakdown = vec![
        (
            "shim process start -> Create call".to_string(),
            col(|r| r.shim_to_create_ms),
        ),
        (
            "VM launch (backends + QEMU spawned)".to_string(),
            col(|r| r.vm_launch_ms),
        ),
        (
            "VM boot -> agent ready".to_string(),
            col(|r| r.agent_ready_ms),
        ),
        (
            "sandbox setup (virtio-fs mount)".to_string(),
            col(|r| r.sandbox_setup_ms),
        ),
        (
            "container create (mounts, agent, stdio)".to_string(),
            col(|r| r.container_create_ms),
        ),
        (
            "container start -> exit".to_string(),
            col(|r| r.start_to_exit_ms),
        ),
        ("task delete".to_string(), col(|r| r.delete_ms)),
        ("VM stop (teardown)".to_string(), Stats::of(&stops)),
    ];
    let timelines: Vec<&timings::Record> = records
        .iter()
        .filter(|r| r.kind == "timeline" && ids.contains(&r.container_id))
        .collect();
    let timeline = timeline_rows(&timelines);
    let summary = vec![
        ("runc: ctr run --rm true".to_string(), Stats::of(&runc_ms)),
        (
            "cocoon: ctr run --rm true".to_string(),
            Stats::of(&cocoon_ms),
        ),
    ];
    let (cocoon_memory, cocoon_footprint) = pod_memory(
        address,
        "io.containerd.cocoon.v2",
        image,
        &format!("bench-mem-cocoon-{tag}"),
        run_dir,
        idle_pods,
    )?;
    let (runc_memory, runc_footprint) = pod_memory(
        address,
        "io.containerd.runc.v2",
        image,
        &format!("bench-mem-runc-{tag}"),
        run_dir,
        idle_pods,
    )?;
    Ok(RunReport {
        runs,
        image: image.into(),
        runc_ms,
        cocoon_ms,
        summary,
        breakdown,
        timeline,
        cocoon_memory,
        runc_memory,
        cocoon_footprint,
        runc_footprint,
    })
}

impl RunReport {
    pub fn table(&self) -> String {
        let mut s = format!(
            "run benchmark: {} runs of `ctr run --rm {} <id> true`\n",
            self.runs, self.image
        );
        s.push_str(&format!(
            "{:<44} {:>9} {:>9} {:>9} {:>9}\n",
            "latency (ms)", "median", "p90", "min", "max"
        ));
        for (name, st) in self.summary.iter().chain(self.breakdown.iter()) {
            s.push_str(&format!(
                "{name:<44} {:>9.1} {:>9.1} {:>9.1} {:>9.1}\n",
                st.median, st.p90, st.min, st.max
            ));
        }
        let r = Stats::of(&self.runc_ms);
        let c = Stats::of(&self.cocoon_ms);
        if r.median > 0.0 {
            s.push_str(&format!(
                "ratio cocoon / runc: median {:.1}x, p90 {:.1}x\n",
                c.median / r.median,
                c.p90 / r.p90.max(f64::MIN_POSITIVE)
            ));
        }
        if !self.timeline.is_empty() {
            s.push_str("\ntimeline of one cocoon start (ms after the shim's Create call)\n");
            s.push_str(&format!(
                "{:<28} {:<6} {:>9} {:>9} {:>9}\n",
                "stage", "clock", "median", "+ms", "p90"
            ));
            for r in &self.timeline {
                s.push_str(&format!(
                    "{:<28} {:<6} {:>9.1} {:>9.1} {:>9.1}\n",
                    r.stage, r.clock, r.at_ms.median, r.step_ms, r.at_ms.p90
                ));
            }
        }
        s.push_str(
            "\nhost memory of one idle pod (kB; rss = anon + file, shmem = guest RAM mapped, \
             pss = proportional set size beyond shared memory)\n",
        );
        for (label, mem) in [("cocoon", &self.cocoon_memory), ("runc", &self.runc_memory)] {
            let total: u64 = mem.iter().map(|m| m.rss_kb).sum();
            let total_pss: u64 = mem.iter().map(|m| m.pss_kb).sum();
            for m in mem {
                s.push_str(&format!(
                    "  {label:<7} {:<28} rss {:>8}  pss {:>8}  shmem {:>8}\n",
                    m.process, m.rss_kb, m.pss_kb, m.shmem_kb
                ));
            }
            s.push_str(&format!(
                "  {label:<7} {:<28} rss {total:>8}  pss {total_pss:>8}\n",
                "total (without guest RAM)"
            ));
        }
        s.push_str(&format!(
            "\nhost memory per pod with {} idle pods (kB of pss beyond shared memory)\n",
            self.cocoon_footprint.pods
        ));
        for (label, f) in [
            ("cocoon", &self.cocoon_footprint),
            ("runc", &self.runc_footprint),
        ] {
            for (kind, kb) in &f.pss_kb_per_pod {
                s.push_str(&format!("  {label:<7} {kind:<28} pss {kb:>8}\n"));
            }
            s.push_str(&format!(
                "  {label:<7} {:<28} pss {:>8}\n",
                "total per pod", f.total_pss_kb_per_pod
            ));
        }
        s
    }
}
