//! Metrics in Prometheus' text format (version 0.0.4): what each pod's shim counts
//! (`PodStats`), how one family is written, and how `cocoon metrics` merges the pods'
//! texts into one exposition (each family once, its samples together, as the format
//! requires). Written here rather than with a client library: a few counters and one
//! histogram, no registry, no global state, and the shim stays small.
//!
//! Also what the metrics and benchmarks read of host processes: a process's memory
//! (`Rollup`) and the processes below it (`children_of`, `descendants`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Histogram bucket bounds (seconds) for agent call latency: from a fast ttrpc round
/// trip on KVM to a container create under TCG.
pub const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Calls that wait for something to happen, not for the agent: their time is not a
/// latency.
pub const LONG_POLLS: [&str; 2] = ["Agent.GetOomEvent", "Agent.WaitProcess"];

#[derive(Debug, Clone, Default)]
pub struct Histogram {
    /// Per bucket, not cumulative; the last is +Inf.
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        let i = BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i] += 1;
        self.sum += seconds;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

/// What a pod's shim counts while it serves the pod.
#[derive(Debug, Default)]
pub struct PodStats {
    calls: Mutex<BTreeMap<&'static str, Histogram>>,
    /// (method, kind) → count.
    errors: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// Named counters: containers created, restarts, OOM events relayed or dropped.
    counters: Mutex<BTreeMap<&'static str, u64>>,
    /// CRI container names seen in this pod, to count restarts (kubelet re-creates a
    /// container under the same name).
    names: Mutex<std::collections::HashSet<String>>,
}

impl PodStats {
    /// Records one agent call: its latency (unless it is a long poll) and its failure
    /// kind, if it failed.
    pub fn record_call(&self, method: &'static str, took: Duration, error: Option<&'static str>) {
        if !LONG_POLLS.contains(&method) {
            lock(&self.calls)
                .entry(method)
                .or_default()
                .observe(took.as_secs_f64());
        }
        if let Some(kind) = error {
            *lock(&self.errors).entry((method, kind)).or_default() += 1;
        }
    }

    pub fn count(&self, what: &'static str) {
        *lock(&self.counters).entry(what).or_default() += 1;
    }

    /// Counts a container created in the pod, and a restart if its name was seen.
    pub fn container_created(&self, cri_name: Option<&str>) {
        self.count("containers_created");
        if let Some(name) = cri_name.filter(|n| !n.is_empty()) {
            if !lock(&self.names).insert(name.to_owned()) {
                self.count("container_restarts");
            }
        }
    }

    pub fn calls(&self) -> BTreeMap<&'static str, Histogram> {
        lock(&self.calls).clone()
    }

    /// Writes the counted families with `labels` (already escaped, `k="v",…`).
    pub fn render(&self, labels: &str, out: &mut String) {
        let calls = self.calls();
        family(
            out,
            "cocoon_agent_call_duration_seconds",
            "histogram",
            "Host-to-agent call latency by method (long polls excluded).",
        );
        for (method, h) in &calls {
            let l = format!("{labels},method=\"{}\"", escape(method));
            let mut cumulative = 0;
            for (i, bound) in BUCKETS.iter().enumerate() {
                cumulative += h.counts[i];
                let _ = writeln!(
                    out,
                    "cocoon_agent_call_duration_seconds_bucket{{{l},le=\"{bound}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "cocoon_agent_call_duration_seconds_bucket{{{l},le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "cocoon_agent_call_duration_seconds_sum{{{l}}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "cocoon_agent_call_duration_seconds_count{{{l}}} {}",
                h.count
            );
        }
        family(
            out,
            "cocoon_agent_call_errors_total",
            "counter",
            "Failed host-to-agent calls by method and kind (timeout, disconnected, rpc).",
        );
        for ((method, kind), n) in lock(&self.errors).iter() {
            let _ = writeln!(
                out,
                "cocoon_agent_call_errors_total{{{labels},method=\"{}\",kind=\"{kind}\"}} {n}",
                escape(method)
            );
        }
        let counters = lock(&self.counters).clone();
        for (name, help) in [
            ("containers_created", "Containers created in the pod."),
            (
                "container_restarts",
                "Containers re-created under a name the pod had before (kubelet restarts).",
            ),
            ("oom_events", "Guest OOM kills relayed to containerd."),
            (
                "oom_events_dropped",
                "Guest OOM events dropped (unknown container or over the rate).",
            ),
        ] {
            let metric = format!("cocoon_pod_{name}_total");
            family(out, &metric, "counter", help);
            let n = counters.get(name).copied().unwrap_or(0);
            let _ = writeln!(out, "{metric}{{{labels}}} {n}");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes a family's HELP and TYPE lines.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value as the text format wants it.
pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The family a sample line belongs to: its metric name, less a histogram's suffix
/// when that family is a histogram.
fn family_of(sample: &str, histograms: &std::collections::HashSet<String>) -> String {
    let name = sample
        .split(|c: char| c == '{' || c.is_whitespace())
        .next()
        .unwrap_or("");
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if histograms.contains(base) {
                return base.to_owned();
            }
        }
    }
    name.to_owned()
}

/// Merges expositions (one per pod, plus the node's) into one: each family's HELP and
/// TYPE once, then all its samples. Families keep their first-seen order.
pub fn merge(texts: &[String]) -> String {
    let mut histograms = std::collections::HashSet::new();
    for t in texts {
        for l in t.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                if let Some(name) = rest.strip_suffix(" histogram") {
                    histograms.insert(name.to_owned());
                }
            }
        }
    }
    let mut order: Vec<String> = Vec::new();
    let mut heads: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut samples: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for t in texts {
        for l in t.lines().filter(|l| !l.trim().is_empty()) {
            let (fam, head) = if let Some(rest) = l
                .strip_prefix("# HELP ")
                .or_else(|| l.strip_prefix("# TYPE "))
            {
                (rest.split(' ').next().unwrap_or("").to_owned(), true)
            } else if l.starts_with('#') {
                continue;
            } else {
                (family_of(l, &histograms), false)
            };
            if !heads.contains_key(&fam) && !samples.contains_key(&fam) {
                order.push(fam.clone());
            }
            if head {
                let h = heads.entry(fam).or_default();
                if !h.iter().any(|x| x == l) && h.len() < 2 {
                    h.push(l.to_owned());
                }
            } else {
                samples.entry(fam).or_default().push(l.to_owned());
            }
        }
    }
    let mut out = String::new();
    for fam in order {
        for l in heads.get(&fam).into_iter().flatten() {
            out.push_str(l);
            out.push('\n');
        }
        for l in samples.get(&fam).into_iter().flatten() {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// The totals of a process's `/proc/<pid>/smaps_rollup`, in KiB. The one reader of it
/// for the pod metrics, the benchmarks and the footprint tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rollup {
    pub rss: u64,
    pub pss: u64,
    /// The shared-memory part of `pss`: for a VMM, the guest RAM the guest has touched.
    pub pss_shmem: u64,
}

impl Rollup {
    /// The process's totals, or None once it is gone.
    pub fn of(pid: u32) -> Option<Self> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
        Some(Self::parse(&text))
    }

    /// A field missing from `text` reads 0.
    pub fn parse(text: &str) -> Self {
        let field = |name: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        Self {
            rss: field("Rss:"),
            pss: field("Pss:"),
            pss_shmem: field("Pss_Shmem:"),
        }
    }

    /// What the process holds beyond shared memory (for a VMM: beyond guest RAM).
    pub fn pss_beyond_shmem(&self) -> u64 {
        self.pss.saturating_sub(self.pss_shmem)
    }
}

/// Proportional and resident set size of a process, in bytes.
pub fn process_memory(pid: u32) -> Option<(u64, u64)> {
    let r = Rollup::of(pid)?;
    Some((r.pss * 1024, r.rss * 1024))
}

/// The children of `pid`, whichever of its threads forked them (none if it has gone, or
/// the kernel lacks `CONFIG_PROC_CHILDREN`). The kernel lists a child under the thread
/// that forked it, and the shim forks from tokio's worker threads, so every task's list
/// is read, not only the main thread's.
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out: Vec<u32> = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|c| c.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    // A child reparented from an exiting thread to another between the reads shows twice.
    out.sort_unstable();
    out.dedup();
    out
}

/// Every process below `roots` (children, theirs, and so on), roots excluded. A process
/// reached twice (a root below another root) is listed once.
pub fn descendants(roots: &[u32]) -> Vec<u32> {
    let mut found: Vec<u32> = Vec::new();
    let mut todo: Vec<u32> = roots.to_vec();
    while let Some(p) = todo.pop() {
        for c in children_of(p) {
            if !roots.contains(&c) && !found.contains(&c) {
                found.push(c);
                todo.push(c);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn kill(pid: u32) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }

    /// A child forked by a thread other than the main one is still this process's.
    #[test]
    fn children_of_sees_a_child_forked_by_another_thread() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        // The forking thread stays alive until the check is done: when a thread exits,
        // the kernel moves its children to another thread's list.
        let t = std::thread::spawn(move || {
            let mut c = Command::new("sleep").arg("30").spawn().unwrap();
            tx.send(c.id()).unwrap();
            let _ = done_rx.recv();
            kill(c.id());
            c.wait().unwrap();
        });
        let child = rx.recv().unwrap();
        let me = std::process::id();
        let seen = children_of(me);
        let main_only =
            std::fs::read_to_string(format!("/proc/{me}/task/{me}/children")).unwrap_or_default();
        done_tx.send(()).unwrap();
        t.join().unwrap();
        assert!(seen.contains(&child), "child {child} not in {seen:?}");
        // What the old reader (the main thread's list alone) would have missed.
        assert!(
            !main_only.split_whitespace().any(|c| c == child.to_string()),
            "the main thread's list already had {child}: {main_only}"
        );
        assert!(children_of(u32::MAX).is_empty());
    }

    /// A child's own child counts as the child does; a process elsewhere does not.
    #[test]
    fn descendants_reach_grandchildren_and_nothing_else() {
        let mut child = Command::new("sh")
            .args(["-c", "sleep 30 & echo $!; wait"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        let grandchild: u32 = line.trim().parse().unwrap();
        let mut other = Command::new("sleep").arg("30").spawn().unwrap();
        let below = descendants(&[child.id()]);
        let both = descendants(&[child.id(), grandchild]);
        for p in [child.id(), other.id(), grandchild] {
            kill(p);
        }
        child.wait().unwrap();
        other.wait().unwrap();
        assert_eq!(below, [grandchild]);
        assert!(both.is_empty(), "{both:?}");
    }

    #[test]
    fn a_rollup_reads_its_totals_and_missing_fields_as_zero() {
        let text = "00400000-7ffd [rollup]\nRss:               10240 kB\nPss:                8192 kB\n\
                    Pss_Dirty:           100 kB\nPss_Anon:            900 kB\nPss_Shmem:          4096 kB\n";
        let r = Rollup::parse(text);
        assert_eq!((r.rss, r.pss, r.pss_shmem), (10240, 8192, 4096));
        assert_eq!(r.pss_beyond_shmem(), 4096);
        assert_eq!(
            Rollup::parse("Pss: 7 kB\n"),
            Rollup {
                rss: 0,
                pss: 7,
                pss_shmem: 0
            }
        );
        assert!(Rollup::of(u32::MAX).is_none());
    }

    #[test]
    fn histograms_are_cumulative_and_long_polls_are_not_latencies() {
        let s = PodStats::default();
        s.record_call("Agent.CreateContainer", Duration::from_millis(3), None);
        s.record_call(
            "Agent.CreateContainer",
            Duration::from_secs(20),
            Some("timeout"),
        );
        s.record_call("Agent.WaitProcess", Duration::from_secs(300), None);
        let mut out = String::new();
        s.render("pod=\"p\"", &mut out);
        assert!(out.contains(
            "cocoon_agent_call_duration_seconds_bucket{pod=\"p\",method=\"Agent.CreateContainer\",le=\"0.005\"} 1"
        ));
        assert!(out.contains(
            "cocoon_agent_call_duration_seconds_bucket{pod=\"p\",method=\"Agent.CreateContainer\",le=\"10\"} 1"
        ));
        assert!(out.contains(
            "cocoon_agent_call_duration_seconds_bucket{pod=\"p\",method=\"Agent.CreateContainer\",le=\"+Inf\"} 2"
        ));
        assert!(!out.contains("method=\"Agent.WaitProcess\",le"));
        assert!(out.contains(
            "cocoon_agent_call_errors_total{pod=\"p\",method=\"Agent.CreateContainer\",kind=\"timeout\"} 1"
        ));
    }

    #[test]
    fn a_name_seen_again_is_a_restart() {
        let s = PodStats::default();
        s.container_created(Some("web"));
        s.container_created(Some("sidecar"));
        s.container_created(Some("web"));
        s.container_created(None);
        let mut out = String::new();
        s.render("pod=\"p\"", &mut out);
        assert!(out.contains("cocoon_pod_containers_created_total{pod=\"p\"} 4"));
        assert!(out.contains("cocoon_pod_container_restarts_total{pod=\"p\"} 1"));
    }

    #[test]
    fn merged_families_appear_once_with_all_their_samples() {
        let a = PodStats::default();
        a.record_call("Health.Check", Duration::from_millis(1), None);
        let b = PodStats::default();
        b.record_call("Health.Check", Duration::from_millis(1), None);
        let (mut ta, mut tb) = (String::new(), String::new());
        a.render("pod=\"a\"", &mut ta);
        b.render("pod=\"b\"", &mut tb);
        let m = merge(&[ta, tb]);
        assert_eq!(
            m.matches("# TYPE cocoon_agent_call_duration_seconds histogram")
                .count(),
            1
        );
        // A family's samples are contiguous: no other family's line between them.
        let lines: Vec<&str> = m.lines().collect();
        let idx: Vec<usize> = lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.starts_with("cocoon_agent_call_duration_seconds"))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(idx.len(), 2 * (BUCKETS.len() + 3));
        assert_eq!(idx.last().unwrap() - idx[0] + 1, idx.len());
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn this_process_has_memory() {
        let (pss, rss) = process_memory(std::process::id()).unwrap();
        assert!(pss > 0 && rss >= pss, "{pss} {rss}");
    }
}
