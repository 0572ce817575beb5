//! cgroup v2 for containers: one group per container under
//! `<root>/cocoon/<id>`, its limits, freezing, and the statistics read back.
//! All file access is relative to a root directory so the logic is tested
//! against a temporary directory; the guest uses /sys/fs/cgroup.

use std::collections::HashMap;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thiserror::Error;

/// Where the guest's unified hierarchy is mounted (by early init).
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Parent group of all containers.
const PARENT: &str = "cocoon";
/// Controllers delegated to container groups (those the kernel offers).
const CONTROLLERS: &[&str] = &["cpu", "cpuset", "io", "memory", "pids"];

#[derive(Debug, Error)]
pub enum CgroupError {
    #[error("cannot create cgroup {0}")]
    Create(PathBuf, #[source] std::io::Error),
    #[error("cannot write {value:?} to {path}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("cannot attach the device filter to {0}")]
    Devices(PathBuf, #[source] std::io::Error),
    #[error("invalid resources: {0}")]
    Invalid(String),
    #[error("cgroup {0} did not reach the frozen={1} state in time")]
    FreezeTimeout(PathBuf, bool),
    #[error("cannot remove cgroup {0}")]
    Remove(PathBuf, #[source] std::io::Error),
}

/// Whether `root` holds a cgroup v2 (unified) hierarchy.
pub fn is_v2(root: &Path) -> bool {
    root.join("cgroup.controllers").exists()
}

/// Container limits in OCI terms; `None` leaves a value untouched.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Limits {
    pub memory_limit: Option<i64>,
    /// OCI semantics: memory + swap; -1 is unlimited.
    pub memory_swap: Option<i64>,
    pub cpu_shares: Option<u64>,
    pub cpu_quota: Option<i64>,
    pub cpu_period: Option<u64>,
    pub cpuset_cpus: Option<String>,
    pub cpuset_mems: Option<String>,
    pub pids_limit: Option<i64>,
    /// `linux.resources.unified`: cgroup v2 files written as given.
    pub unified: Vec<(String, String)>,
}

impl From<&oci_spec::runtime::LinuxResources> for Limits {
    fn from(r: &oci_spec::runtime::LinuxResources) -> Self {
        let mem = r.memory().as_ref();
        let cpu = r.cpu().as_ref();
        let mut unified: Vec<(String, String)> = r
            .unified()
            .as_ref()
            .map(|u| u.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        unified.sort();
        Limits {
            memory_limit: mem.and_then(|m| m.limit()),
            memory_swap: mem.and_then(|m| m.swap()),
            cpu_shares: cpu.and_then(|c| c.shares()),
            cpu_quota: cpu.and_then(|c| c.quota()),
            cpu_period: cpu.and_then(|c| c.period()),
            cpuset_cpus: cpu.and_then(|c| c.cpus().clone()),
            cpuset_mems: cpu.and_then(|c| c.mems().clone()),
            pids_limit: r.pids().as_ref().map(|p| p.limit()),
            unified,
        }
    }
}

impl From<&cocoon_protocol::agent::LinuxResources> for Limits {
    /// Protocol zeros (and empty strings) mean "leave as is".
    fn from(r: &cocoon_protocol::agent::LinuxResources) -> Self {
        let nz = |v: i64| (v != 0).then_some(v);
        let nzu = |v: u64| (v != 0).then_some(v);
        let ne = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Limits {
            memory_limit: nz(r.memory_limit_bytes),
            memory_swap: nz(r.memory_swap_bytes),
            cpu_shares: nzu(r.cpu_shares),
            cpu_quota: nz(r.cpu_quota),
            cpu_period: nzu(r.cpu_period),
            cpuset_cpus: ne(&r.cpuset_cpus),
            cpuset_mems: ne(&r.cpuset_mems),
            pids_limit: nz(r.pids_limit),
            unified: Vec::new(),
        }
    }
}

/// runc's conversion of cpu shares (2..262144) to cpu.weight (1..10000).
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 0;
    }
    1 + (shares.clamp(2, 262_144) - 2) * 9999 / 262_142
}

/// The cgroup v2 files and values that express `limits`, in write order.
pub fn limit_files(l: &Limits) -> Result<Vec<(&'static str, String)>, CgroupError> {
    let max_or = |v: i64| {
        if v < 0 {
            "max".to_string()
        } else {
            v.to_string()
        }
    };
    let mut out: Vec<(&'static str, String)> = Vec::new();
    if let Some(cpus) = &l.cpuset_cpus {
        out.push(("cpuset.cpus", cpus.clone()));
    }
    if let Some(mems) = &l.cpuset_mems {
        out.push(("cpuset.mems", mems.clone()));
    }
    if let Some(limit) = l.memory_limit {
        out.push(("memory.max", max_or(limit)));
    }
    if let Some(swap) = l.memory_swap {
        // OCI gives memory+swap; v2 wants the swap part alone.
        let value = match (swap, l.memory_limit) {
            (-1, _) => "max".to_string(),
            (0, _) => String::new(),
            (s, Some(m)) if m > 0 => {
                if s < m {
                    return Err(CgroupError::Invalid(format!(
                        "memory+swap limit {s} is below the memory limit {m}"
                    )));
                }
                (s - m).to_string()
            }
            (_, _) => {
                return Err(CgroupError::Invalid(
                    "a swap limit needs a memory limit".into(),
                ))
            }
        };
        if !value.is_empty() {
            out.push(("memory.swap.max", value));
        }
    }
    if let Some(shares) = l.cpu_shares {
        out.push(("cpu.weight", shares_to_weight(shares).to_string()));
    }
    if l.cpu_quota.is_some() || l.cpu_period.is_some() {
        let period = l.cpu_period.unwrap_or(100_000);
        let quota = match l.cpu_quota {
            Some(q) if q > 0 => q.to_string(),
            _ => "max".to_string(),
        };
        out.push(("cpu.max", format!("{quota} {period}")));
    }
    if let Some(pids) = l.pids_limit {
        out.push((
            "pids.max",
            if pids <= 0 {
                "max".into()
            } else {
                pids.to_string()
            },
        ));
    }
    Ok(out)
}

/// One container's group.
#[derive(Debug, Clone)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `<root>/cocoon/<id>` with the controllers delegated to it.
    pub fn create(root: &Path, id: &str) -> Result<Self, CgroupError> {
        let parent = root.join(PARENT);
        fs::create_dir_all(&parent).map_err(|e| CgroupError::Create(parent.clone(), e))?;
        let available = fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        let wanted: Vec<String> = CONTROLLERS
            .iter()
            .filter(|c| available.split_whitespace().any(|a| a == **c))
            .map(|c| format!("+{c}"))
            .collect();
        for dir in [root, parent.as_path()] {
            let control = dir.join("cgroup.subtree_control");
            // Enabled by the pod's first container already, usually: each write, even
            // of a controller already on, walks the subtree in the kernel.
            let on = fs::read_to_string(&control).unwrap_or_default();
            for c in &wanted {
                if on.split_whitespace().any(|o| o == &c[1..]) {
                    continue;
                }
                // One at a time: an unavailable controller must not block the rest.
                let _ = write_file(&control, c);
            }
        }
        let path = parent.join(id);
        match fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(CgroupError::Create(path, e)),
        }
        Ok(Cgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn apply(&self, limits: &Limits) -> Result<(), CgroupError> {
        for (file, value) in limit_files(limits)? {
            write_file(&self.path.join(file), &value)?;
        }
        for (file, value) in &limits.unified {
            if file.contains('/') || file.starts_with('.') {
                return Err(CgroupError::Invalid(format!(
                    "unified key {file:?} is not a file name"
                )));
            }
            write_file(&self.path.join(file), value)?;
        }
        Ok(())
    }

    pub fn add_pid(&self, pid: i32) -> Result<(), CgroupError> {
        write_file(&self.path.join("cgroup.procs"), &pid.to_string())
    }

    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let p = self.path.join("cgroup.procs");
        let text = fs::read_to_string(&p).map_err(|e| CgroupError::Read(p, e))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Freezes or thaws the group and waits until the kernel says it is done.
    pub async fn set_frozen(&self, frozen: bool, deadline: Duration) -> Result<(), CgroupError> {
        write_file(
            &self.path.join("cgroup.freeze"),
            if frozen { "1" } else { "0" },
        )?;
        let want = if frozen { 1 } else { 0 };
        let until = Instant::now() + deadline;
        loop {
            let events = self.read_keyed("cgroup.events")?;
            if events.get("frozen").copied() == Some(want) {
                return Ok(());
            }
            if Instant::now() >= until {
                return Err(CgroupError::FreezeTimeout(self.path.clone(), frozen));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The file the kernel touches when it counts a memory event of this cgroup or one
    /// below it (an OOM kill among them): what inotify watches for OOM reports.
    pub fn events_file(&self) -> PathBuf {
        self.path.join("memory.events")
    }

    /// `oom_kill` count of memory.events (0 when unreadable).
    pub fn oom_kills(&self) -> u64 {
        self.read_keyed("memory.events")
            .ok()
            .and_then(|m| m.get("oom_kill").copied())
            .unwrap_or(0)
    }

    fn read_keyed(&self, file: &str) -> Result<HashMap<String, u64>, CgroupError> {
        let p = self.path.join(file);
        let text = fs::read_to_string(&p).map_err(|e| CgroupError::Read(p, e))?;
        Ok(parse_flat_keyed(&text))
    }

    fn read_u64(&self, file: &str) -> Option<u64> {
        let text = fs::read_to_string(self.path.join(file)).ok()?;
        let t = text.trim();
        if t == "max" {
            Some(u64::MAX)
        } else {
            t.parse().ok()
        }
    }

    pub fn stats(&self) -> Stats {
        let cpu = self.read_keyed("cpu.stat").unwrap_or_default();
        let mem_stat = self.read_keyed("memory.stat").unwrap_or_default();
        let mem_events = self.read_keyed("memory.events").unwrap_or_default();
        let io = fs::read_to_string(self.path.join("io.stat")).unwrap_or_default();
        let g = |m: &HashMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
        Stats {
            cpu_usage_usec: g(&cpu, "usage_usec"),
            cpu_user_usec: g(&cpu, "user_usec"),
            cpu_system_usec: g(&cpu, "system_usec"),
            cpu_nr_periods: g(&cpu, "nr_periods"),
            cpu_nr_throttled: g(&cpu, "nr_throttled"),
            cpu_throttled_usec: g(&cpu, "throttled_usec"),
            memory_usage: self.read_u64("memory.current").unwrap_or(0),
            memory_limit: self.read_u64("memory.max").unwrap_or(u64::MAX),
            memory_max_usage: self.read_u64("memory.peak").unwrap_or(0),
            memory_anon: g(&mem_stat, "anon"),
            memory_file: g(&mem_stat, "file"),
            memory_oom: g(&mem_events, "oom"),
            memory_oom_kill: g(&mem_events, "oom_kill"),
            memory_stat: mem_stat,
            pids_current: self.read_u64("pids.current").unwrap_or(0),
            pids_limit: self.read_u64("pids.max").unwrap_or(u64::MAX),
            io: parse_io_stat(&io),
        }
    }

    /// Removes the group; it must be empty. Retries briefly, as the kernel
    /// releases a group a moment after its last process is reaped.
    pub async fn remove(&self) -> Result<(), CgroupError> {
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                Err(e) if Instant::now() >= until => {
                    return Err(CgroupError::Remove(self.path.clone(), e))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

/// Parses "key value" lines (cpu.stat, memory.stat, memory.events, ...).
pub fn parse_flat_keyed(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let k = it.next()?;
            let v = it.next()?.parse().ok()?;
            Some((k.to_string(), v))
        })
        .collect()
}

/// Totals of io.stat ("MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=.. ...").
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IoTotals {
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_ios: u64,
    pub write_ios: u64,
}

pub fn parse_io_stat(text: &str) -> IoTotals {
    let mut t = IoTotals::default();
    for line in text.lines() {
        for kv in line.split_whitespace().skip(1) {
            let Some((k, v)) = kv.split_once('=') else {
                continue;
            };
            let v: u64 = v.parse().unwrap_or(0);
            match k {
                "rbytes" => t.read_bytes += v,
                "wbytes" => t.write_bytes += v,
                "rios" => t.read_ios += v,
                "wios" => t.write_ios += v,
                _ => {}
            }
        }
    }
    t
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Stats {
    pub cpu_usage_usec: u64,
    pub cpu_user_usec: u64,
    pub cpu_system_usec: u64,
    pub cpu_nr_periods: u64,
    pub cpu_nr_throttled: u64,
    pub cpu_throttled_usec: u64,
    pub memory_usage: u64,
    pub memory_limit: u64,
    pub memory_max_usage: u64,
    pub memory_anon: u64,
    pub memory_file: u64,
    pub memory_oom: u64,
    pub memory_oom_kill: u64,
    pub memory_stat: HashMap<String, u64>,
    pub pids_current: u64,
    pub pids_limit: u64,
    pub io: IoTotals,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_root() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        fs::write(
            d.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        fs::write(d.path().join("cgroup.subtree_control"), "").unwrap();
        d
    }

    #[test]
    fn limits_translate_like_runc() {
        let l = Limits {
            memory_limit: Some(64 << 20),
            memory_swap: Some(96 << 20),
            cpu_shares: Some(1024),
            cpu_quota: Some(50_000),
            cpu_period: None,
            cpuset_cpus: Some("0-1".into()),
            cpuset_mems: None,
            pids_limit: Some(100),
            unified: vec![],
        };
        let files = limit_files(&l).unwrap();
        let get = |k: &str| files.iter().find(|(f, _)| *f == k).map(|(_, v)| v.as_str());
        assert_eq!(get("memory.max"), Some("67108864"));
        assert_eq!(get("memory.swap.max"), Some("33554432"));
        assert_eq!(get("cpu.weight"), Some("39"));
        assert_eq!(get("cpu.max"), Some("50000 100000"));
        assert_eq!(get("cpuset.cpus"), Some("0-1"));
        assert_eq!(get("pids.max"), Some("100"));

        let unlimited = Limits {
            memory_limit: Some(-1),
            memory_swap: Some(-1),
            cpu_quota: Some(-1),
            cpu_period: Some(50_000),
            pids_limit: Some(-1),
            ..Default::default()
        };
        let files = limit_files(&unlimited).unwrap();
        assert!(files.contains(&("memory.max", "max".into())));
        assert!(files.contains(&("memory.swap.max", "max".into())));
        assert!(files.contains(&("cpu.max", "max 50000".into())));
        assert!(files.contains(&("pids.max", "max".into())));

        let bad = Limits {
            memory_limit: Some(100),
            memory_swap: Some(50),
            ..Default::default()
        };
        assert!(matches!(limit_files(&bad), Err(CgroupError::Invalid(_))));
    }

    #[test]
    fn weight_bounds() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(0), 0);
    }

    #[test]
    fn protocol_zeros_leave_values_alone() {
        let mut r = cocoon_protocol::agent::LinuxResources::new();
        r.memory_limit_bytes = 1 << 20;
        let l = Limits::from(&r);
        assert_eq!(l.memory_limit, Some(1 << 20));
        assert_eq!(l.cpu_shares, None);
        assert_eq!(l.cpuset_cpus, None);
    }

    #[test]
    fn create_delegates_controllers_and_writes_limits() {
        let root = fake_root();
        let cg = Cgroup::create(root.path(), "c1").unwrap();
        assert_eq!(cg.path(), root.path().join("cocoon/c1"));
        // A plain directory keeps only the last write; the real file accumulates.
        let sub = fs::read_to_string(root.path().join("cgroup.subtree_control")).unwrap();
        assert_eq!(sub, "+pids");
        // Controllers already on are not written again (the pod's next containers).
        let on = "cpuset cpu io memory pids\n";
        for dir in [root.path(), &root.path().join("cocoon")] {
            fs::write(dir.join("cgroup.subtree_control"), on).unwrap();
        }
        Cgroup::create(root.path(), "c0").unwrap();
        for dir in [root.path(), &root.path().join("cocoon")] {
            let sub = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap();
            assert_eq!(sub, on, "{}", dir.display());
        }
        cg.apply(&Limits {
            memory_limit: Some(1000),
            unified: vec![("memory.high".into(), "900".into())],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            fs::read_to_string(cg.path().join("memory.max")).unwrap(),
            "1000"
        );
        assert_eq!(
            fs::read_to_string(cg.path().join("memory.high")).unwrap(),
            "900"
        );
        let evil = Limits {
            unified: vec![("../x".into(), "1".into())],
            ..Default::default()
        };
        assert!(cg.apply(&evil).is_err());
    }

    #[test]
    fn stats_are_parsed() {
        let root = fake_root();
        let cg = Cgroup::create(root.path(), "c").unwrap();
        let w = |f: &str, t: &str| fs::write(cg.path().join(f), t).unwrap();
        w(
            "cpu.stat",
            "usage_usec 1000\nuser_usec 600\nsystem_usec 400\nnr_periods 5\nnr_throttled 2\nthrottled_usec 70\n",
        );
        w("memory.current", "4096\n");
        w("memory.max", "max\n");
        w("memory.stat", "anon 1024\nfile 2048\nkernel 10\n");
        w("memory.events", "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n");
        w("pids.current", "3\n");
        w("pids.max", "100\n");
        w(
            "io.stat",
            "8:0 rbytes=100 wbytes=200 rios=1 wios=2 dbytes=0 dios=0\n8:16 rbytes=1 wbytes=2 rios=3 wios=4\n",
        );
        let s = cg.stats();
        assert_eq!(s.cpu_usage_usec, 1000);
        assert_eq!(s.cpu_throttled_usec, 70);
        assert_eq!(s.memory_usage, 4096);
        assert_eq!(s.memory_limit, u64::MAX);
        assert_eq!(s.memory_anon, 1024);
        assert_eq!(s.memory_stat.get("kernel"), Some(&10));
        assert_eq!(s.memory_oom_kill, 1);
        assert_eq!(s.pids_current, 3);
        assert_eq!(s.pids_limit, 100);
        assert_eq!(
            s.io,
            IoTotals {
                read_bytes: 101,
                write_bytes: 202,
                read_ios: 4,
                write_ios: 6
            }
        );
        assert_eq!(cg.oom_kills(), 1);
    }

    #[tokio::test]
    async fn freeze_waits_for_the_events_file() {
        let root = fake_root();
        let cg = Cgroup::create(root.path(), "f").unwrap();
        fs::write(cg.path().join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        let err = cg
            .set_frozen(true, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(err, CgroupError::FreezeTimeout(..)));
        assert_eq!(
            fs::read_to_string(cg.path().join("cgroup.freeze")).unwrap(),
            "1"
        );
        fs::write(cg.path().join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
        cg.set_frozen(true, Duration::from_millis(50))
            .await
            .unwrap();
    }
}
