//! The soak: pod lifecycles through containerd's CRI plugin, as kubelet drives them, with
//! a fault injected in most cycles: the VMM, virtiofsd, the vsock backend or the shim
//! SIGKILLed, or containerd restarted, while the pod runs (or, for the kills, while it
//! starts or stops). Every cycle must end with the
//! pod removed and nothing of it left (no process, mount, run directory, share, network
//! namespace or cgroup), and every call must end within its deadline: a call that fails
//! after a fault is fine, one that hangs is not. At the end a fresh pod must still work.
//! `cocoon soak` runs it (through `cocoon-soak`); CI runs a short one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cri::{CriNode, COCOON};
use crate::image::IMAGE_REF;

/// Deadline for one CRI call; longer means a hang.
const CALL_DEADLINE: Duration = Duration::from_secs(120);
/// How long what a removed pod leaves may take to go.
const CLEANUP_DEADLINE: Duration = Duration::from_secs(20);

/// A fault injected into a running pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    None,
    KillVmm,
    KillVirtiofsd,
    KillVsockBackend,
    KillShim,
    RestartContainerd,
    /// The agent exits as a crash would (its fault hook, armed by the debug console):
    /// the guest kernel panics and the VM resets.
    CrashAgent,
}

pub const FAULTS: &[Fault] = &[
    Fault::None,
    Fault::KillVmm,
    Fault::KillVirtiofsd,
    Fault::KillVsockBackend,
    Fault::KillShim,
    Fault::RestartContainerd,
    Fault::CrashAgent,
];

impl Fault {
    /// The fault named `name`, as the report spells it (`kill_vsock_backend`; dashes
    /// work too).
    pub fn parse(name: &str) -> Result<Fault, String> {
        let want = name.replace('-', "_");
        FAULTS
            .iter()
            .copied()
            .find(|f| {
                serde_json::to_value(f)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    == Some(want.clone())
            })
            .ok_or_else(|| {
                let known: Vec<String> = FAULTS
                    .iter()
                    .filter_map(|f| serde_json::to_value(f).ok()?.as_str().map(str::to_owned))
                    .collect();
                format!("unknown fault {name:?} (known: {})", known.join(", "))
            })
    }
}

/// What the shim config of a soak needs beyond the tests' usual one: the debug console,
/// which arms the agent's crash hook.
pub const SHIM_CONFIG_TABLES: &str = "[debug]\nconsole = true\n";

/// When in a cycle the fault strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Moment {
    /// While the pod runs and has answered an exec.
    Running,
    /// At a random point while the pod and its container are being started.
    Starting(Duration),
    /// At a random point of the first 250 ms of the running pod's stop and removal (a shim
    /// killed then may die after its pod's last container is gone from containerd's
    /// view: its janitor has to undo the pod).
    Stopping(Duration),
}

#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub cycles: usize,
    pub seconds: f64,
    pub cycles_per_minute: f64,
    pub faults: BTreeMap<String, usize>,
    /// Of those, faults that struck while the pod was being started.
    pub faults_while_starting: usize,
    /// Faults (other than none) that struck while the pod was being stopped and removed.
    pub faults_while_stopping: usize,
    /// Starts that failed with an error because of a fault (clean: an error in time).
    pub starts_failed_cleanly: usize,
    /// Faults that found nothing to act on (e.g. no vsock backend under cocoon-vmm).
    pub faults_not_applicable: usize,
    /// What a cycle left behind: must be empty.
    pub leaks: Vec<String>,
    /// Calls that hung past their deadline or a pod that could not be removed: must be
    /// empty.
    pub unclean: Vec<String>,
    /// The shim's RSS (KiB) with its pod running, per cycle without a shim fault: a
    /// flat line, or the shim leaks per pod.
    pub shim_rss_kib: Vec<u64>,
    pub fresh_pod_after: bool,
}

impl SoakReport {
    pub fn table(&self) -> String {
        let mut t = format!(
            "soak: {} cycles in {:.0} s ({:.1}/min), leaks {}, unclean failures {}, fresh pod \
             after: {}\n",
            self.cycles,
            self.seconds,
            self.cycles_per_minute,
            self.leaks.len(),
            self.unclean.len(),
            if self.fresh_pod_after { "ok" } else { "FAILED" }
        );
        for (k, n) in &self.faults {
            t.push_str(&format!("  {k:<20} {n}\n"));
        }
        t.push_str(&format!(
            "  of which while starting: {} ({} starts failed cleanly), while stopping: {}\n",
            self.faults_while_starting, self.starts_failed_cleanly, self.faults_while_stopping
        ));
        if let (Some(first), Some(last)) = (self.shim_rss_kib.first(), self.shim_rss_kib.last()) {
            t.push_str(&format!("  shim RSS first/last: {first} / {last} KiB\n"));
        }
        for l in self.leaks.iter().chain(self.unclean.iter()) {
            t.push_str(&format!("  ! {l}\n"));
        }
        t
    }
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> Result<T, String> {
    tokio::time::timeout(CALL_DEADLINE, f)
        .await
        .map_err(|_| format!("{what} hung past {CALL_DEADLINE:?}"))
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn kill(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// The node's own processes: our shims and whatever mentions its run directory.
fn shims(node: &CriNode) -> Vec<(u32, String)> {
    crate::processes_mentioning(&node.address.to_string_lossy())
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("containerd-shim-cocoon"))
        .collect()
}

/// Injects `fault` into the pod; false when there was nothing to act on.
async fn inject(node: &mut CriNode, run_dir: &Path, fault: Fault) -> bool {
    if fault == Fault::RestartContainerd {
        node.restart_containerd().await;
        return true;
    }
    inject_kill(node, run_dir, fault).await
}

/// The faults that need no hold of containerd itself (so they can strike mid-start).
async fn inject_kill(node: &CriNode, run_dir: &Path, fault: Fault) -> bool {
    let vm_procs = crate::processes_mentioning(&run_dir.to_string_lossy());
    let matching = |pat: &[&str]| -> Vec<u32> {
        vm_procs
            .iter()
            .filter(|(_, c)| pat.iter().any(|p| c.contains(p)))
            .map(|(p, _)| *p)
            .collect()
    };
    let victims = match fault {
        Fault::None => return true,
        Fault::RestartContainerd => return false,
        Fault::CrashAgent => return crash_agent(run_dir).await,
        Fault::KillVmm => matching(&["qemu-system", "cocoon-vmm run "]),
        Fault::KillVirtiofsd => matching(&["virtiofsd"]),
        Fault::KillVsockBackend => matching(&["cocoon-vmm vhost-user-vsock"]),
        Fault::KillShim => shims(node).into_iter().map(|(p, _)| p).collect(),
    };
    for &p in &victims {
        kill(p);
    }
    !victims.is_empty()
}

/// Fires the agent's crash hook through the debug console of the VM under `run_dir`.
async fn crash_agent(run_dir: &Path) -> bool {
    let Some(uds) = crate::leftover_entries(run_dir)
        .into_iter()
        .map(|d| d.join("vsock.sock"))
        .find(|p| p.exists())
    else {
        return false;
    };
    let command = ["kill -USR2 1".to_string()];
    match tokio::time::timeout(
        CLEANUP_DEADLINE,
        cocoon_shim::debugconsole::open(&uds, &command),
    )
    .await
    {
        Ok(Ok(stream)) => {
            // The console answers nothing; the VM going away ends the stream.
            drop(stream);
            true
        }
        _ => false,
    }
}

/// What of the pod is still there, after a deadline for it to go.
async fn leftovers(
    node: &CriNode,
    run_dir: &Path,
    netns: Option<&PathBuf>,
    uid: &str,
) -> Vec<String> {
    let deadline = Instant::now() + CLEANUP_DEADLINE;
    loop {
        let mut left = Vec::new();
        for (pid, cmd) in crate::processes_mentioning(&run_dir.to_string_lossy()) {
            left.push(format!("process {pid}: {cmd}"));
        }
        for (pid, cmd) in shims(node) {
            left.push(format!("shim {pid}: {cmd}"));
        }
        for m in crate::mounts_under(run_dir) {
            left.push(format!("mount {}", m.display()));
        }
        for e in crate::leftover_entries(run_dir) {
            let name = e.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            match name {
                "shares" => {
                    for s in crate::leftover_entries(&e) {
                        left.push(format!("share {}", s.display()));
                    }
                }
                "pods" => {
                    for s in crate::leftover_entries(&e) {
                        left.push(format!("pod record {}", s.display()));
                    }
                }
                _ if crate::is_node_wide(&e) => {}
                _ => left.push(format!("run dir entry {}", e.display())),
            }
        }
        if let Some(ns) = netns.filter(|n| n.exists()) {
            left.push(format!("network namespace {}", ns.display()));
        }
        let pod_cg = format!("{}/pod{uid}", node.cgroup_parent_root());
        for h in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            for e in std::fs::read_dir(h.path().join(&pod_cg))
                .into_iter()
                .flatten()
                .flatten()
            {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    left.push(format!("cgroup {}", e.path().display()));
                }
            }
        }
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A pod being started: what exists of it so far, and how its start ended.
struct Started {
    pod: Option<String>,
    netns: Option<PathBuf>,
    result: Result<(), String>,
}

/// Starts a pod with one container and checks it answers an exec.
async fn start_pod(node: &CriNode, name: &str) -> Started {
    let mut s = Started {
        pod: None,
        netns: None,
        result: Ok(()),
    };
    s.result = start_pod_into(node, name, &mut s).await;
    s
}

async fn start_pod_into(node: &CriNode, name: &str, s: &mut Started) -> Result<(), String> {
    let pconfig = node.pod_config(name, &format!("uid-{name}"), "soak");
    let pod = within("RunPodSandbox", node.run_pod(&pconfig, COCOON))
        .await?
        .map_err(|e| format!("RunPodSandbox: {e}"))?;
    s.pod = Some(pod.clone());
    s.netns = node.pod_info(&pod).await.ok().and_then(|i| i.netns);
    let c = CriNode::container_config("main", IMAGE_REF, &["sleep", "3600"], &[]);
    let ctr = within("create/start", node.create_and_start(&pod, &c, &pconfig))
        .await?
        .map_err(|e| format!("create/start: {e}"))?;
    let (code, out, _) = within(
        "ExecSync",
        node.exec_sync(&ctr, &["echo", "ok"], Duration::from_secs(30)),
    )
    .await?
    .map_err(|e| format!("ExecSync: {e}"))?;
    if (code, out.as_str()) != (0, "ok\n") {
        return Err(format!("ExecSync gave {code} {out:?}"));
    }
    Ok(())
}

/// Removes a pod, retrying while containerd catches up with a fault (a dead shim is
/// noticed asynchronously), within the cleanup deadline.
async fn remove_pod(node: &CriNode, pod: &str) -> Result<(), String> {
    let deadline = Instant::now() + CLEANUP_DEADLINE * 2;
    loop {
        let r = within("stop/remove", node.stop_and_remove_pod(pod)).await?;
        match r {
            Ok(()) => return Ok(()),
            // Already gone: containerd undid a failed start itself.
            Err(e) if e.code() == tonic::Code::NotFound => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(format!("cannot remove: {e}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Runs `cycles` cycles on `node` (whose shim config keeps VMs under `run_dir`), each
/// with one of `faults` (every one once first, then at random).
pub async fn soak(
    node: &mut CriNode,
    run_dir: &Path,
    cycles: usize,
    seed: u64,
    faults: &[Fault],
) -> SoakReport {
    assert!(!faults.is_empty(), "a soak needs at least one fault kind");
    let started_at = Instant::now();
    let mut rng = cocoon_nested::fuzzing::Rng::new(seed);
    let mut report = SoakReport {
        cycles,
        seconds: 0.0,
        cycles_per_minute: 0.0,
        faults: BTreeMap::new(),
        faults_while_starting: 0,
        faults_while_stopping: 0,
        starts_failed_cleanly: 0,
        faults_not_applicable: 0,
        leaks: Vec::new(),
        unclean: Vec::new(),
        shim_rss_kib: Vec::new(),
        fresh_pod_after: false,
    };
    for i in 0..cycles {
        // Every kind once first, then at random; of those, one in three strikes at a
        // random point of the start, one in three of the stop (a containerd restart
        // always waits for a running pod: it needs the node to itself).
        let fault = match faults.get(i) {
            Some(f) => *f,
            None => faults[(rng.next() % faults.len() as u64) as usize],
        };
        let moment = match i.checked_sub(faults.len()).map(|k| k % 3) {
            _ if fault == Fault::RestartContainerd => Moment::Running,
            Some(0) => Moment::Starting(Duration::from_millis(rng.next() % 3000)),
            Some(1) => Moment::Stopping(Duration::from_millis(rng.next() % 250)),
            _ => Moment::Running,
        };
        let name = format!("soak-{i}");
        let tag = format!("cycle {i} ({fault:?}, {moment:?})");
        let started = match moment {
            Moment::Running | Moment::Stopping(_) => start_pod(node, &name).await,
            Moment::Starting(after) => {
                let strike = async {
                    tokio::time::sleep(after).await;
                    inject_kill(node, run_dir, fault).await
                };
                let (started, acted) = tokio::join!(start_pod(node, &name), strike);
                count(&mut report, fault, acted);
                if acted {
                    report.faults_while_starting += 1;
                }
                started
            }
        };
        if let Err(e) = &started.result {
            if e.contains("hung past") || !matches!(moment, Moment::Starting(_)) {
                report.unclean.push(format!("{tag}: the start failed: {e}"));
            } else {
                report.starts_failed_cleanly += 1;
            }
        }
        if moment == Moment::Running && started.result.is_ok() {
            if let Some((pid, _)) = shims(node).first() {
                if fault != Fault::KillShim {
                    report.shim_rss_kib.push(rss_kib(*pid));
                }
            }
            let acted = inject(node, run_dir, fault).await;
            count(&mut report, fault, acted);
        }
        // After the fault a call may fail; it must not hang.
        let pods = match &started.pod {
            Some(p) => vec![p.clone()],
            // The start failed before the sandbox had an id: whatever containerd kept.
            None => node.pod_ids().await.unwrap_or_default(),
        };
        for pod in &pods {
            if let Err(e) = within("PodSandboxStatus after the fault", node.pod_status(pod)).await {
                report.unclean.push(format!("{tag}: {e}"));
            }
            let removed = match moment {
                Moment::Stopping(after) if started.result.is_ok() => {
                    let strike = async {
                        tokio::time::sleep(after).await;
                        inject_kill(node, run_dir, fault).await
                    };
                    let (removed, acted) = tokio::join!(remove_pod(node, pod), strike);
                    count(&mut report, fault, acted);
                    if acted && fault != Fault::None {
                        report.faults_while_stopping += 1;
                    }
                    removed
                }
                _ => remove_pod(node, pod).await,
            };
            if let Err(e) = removed {
                report.unclean.push(format!("{tag}: {e}"));
            }
        }
        let netns = started.netns.as_ref();
        for l in leftovers(node, run_dir, netns, &format!("uid-{name}")).await {
            report.leaks.push(format!("{tag}: {l}"));
        }
        if (i + 1) % 25 == 0 {
            eprintln!(
                "soak: {} cycles in {:.0} s, leaks {}, unclean {}",
                i + 1,
                started_at.elapsed().as_secs_f64(),
                report.leaks.len(),
                report.unclean.len()
            );
        }
    }
    let fresh = start_pod(node, "soak-fresh").await;
    match (fresh.result, fresh.pod) {
        (Ok(()), Some(pod)) => report.fresh_pod_after = remove_pod(node, &pod).await.is_ok(),
        (r, pod) => {
            if let Some(pod) = pod {
                let _ = remove_pod(node, &pod).await;
            }
            report
                .unclean
                .push(format!("fresh pod after the soak: {:?}", r.err()));
        }
    }
    report.seconds = started_at.elapsed().as_secs_f64();
    report.cycles_per_minute = cycles as f64 * 60.0 / report.seconds.max(1e-9);
    report
}

fn count(report: &mut SoakReport, fault: Fault, acted: bool) {
    if acted {
        *report.faults.entry(format!("{fault:?}")).or_default() += 1;
    } else {
        report.faults_not_applicable += 1;
    }
}
