//! Facts about the guest for `GetGuestDetails`.

use std::fs;

use cocoon_protocol::agent::{GuestDetailsResponse, TimelineEvent};
use nix::time::{clock_gettime, ClockId};

/// The CPU's time-stamp counter.
#[cfg(target_arch = "x86_64")]
pub fn tsc() -> u64 {
    // SAFETY: RDTSC reads a counter; it touches no memory.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// No time-stamp counter to read here.
#[cfg(not(target_arch = "x86_64"))]
pub fn tsc() -> u64 {
    0
}

pub fn boottime_ns() -> i64 {
    clock_gettime(ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() * 1_000_000_000 + t.tv_nsec())
        .unwrap_or(0)
}

/// Wall-clock time, Unix nanoseconds (exit timestamps for the host).
pub fn realtime_ns() -> i64 {
    clock_gettime(ClockId::CLOCK_REALTIME)
        .map(|t| t.tv_sec() * 1_000_000_000 + t.tv_nsec())
        .unwrap_or(0)
}

/// Value in bytes of a `Key:   N kB` line of /proc/meminfo.
fn meminfo_bytes(meminfo: &str, key: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// What the agent did and when (guest CLOCK_BOOTTIME), for the shim's boot and container
/// timeline. Keeps the last [`Timeline::CAP`] events: a pod that runs containers for
/// weeks does not make it grow.
#[derive(Debug, Default)]
pub struct Timeline(std::sync::Mutex<std::collections::VecDeque<TimelineEvent>>);

/// The agent's one timeline: any part of it marks its moments here.
pub static TIMELINE: Timeline = Timeline::new();

impl Timeline {
    pub const CAP: usize = 256;

    pub const fn new() -> Self {
        Self(std::sync::Mutex::new(std::collections::VecDeque::new()))
    }

    /// Records `stage` of `container_id` (empty for the pod) now.
    pub fn mark(&self, stage: &str, container_id: &str) {
        self.mark_at(stage, container_id, boottime_ns());
    }

    /// Records `stage` of `container_id` at guest boot time `ns` (a moment another
    /// process of the guest read, such as the runtime helper's start).
    pub fn mark_at(&self, stage: &str, container_id: &str, ns: i64) {
        let mut e = TimelineEvent::new();
        e.stage = stage.into();
        e.container_id = container_id.into();
        e.boottime_ns = ns;
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() == Self::CAP {
            q.pop_front();
        }
        q.push_back(e);
    }

    pub fn events(&self) -> Vec<TimelineEvent> {
        let q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        q.iter().cloned().collect()
    }
}

pub fn collect(state: &crate::handlers::AgentState) -> GuestDetailsResponse {
    let mut r = GuestDetailsResponse::new();
    if let Ok(u) = nix::sys::utsname::uname() {
        r.kernel_release = u.release().to_string_lossy().into_owned();
    }
    r.kernel_cmdline = state.cmdline.clone();
    r.online_cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    r.mem_total_bytes = meminfo_bytes(&meminfo, "MemTotal");
    r.mem_available_bytes = meminfo_bytes(&meminfo, "MemAvailable");
    r.agent_version = env!("CARGO_PKG_VERSION").to_string();
    r.agent_start_boottime_ns = state.start_boottime_ns;
    r.agent_start_tsc = state.start_tsc;
    r.boottime_ns = boottime_ns();
    r.agent_init_ns = state.init_ns;
    r.server_ready_boottime_ns = state
        .server_ready_boottime_ns
        .load(std::sync::atomic::Ordering::Relaxed);
    r.loaded_modules = state.modules.lock().map(|m| m.clone()).unwrap_or_default();
    r.timeline = TIMELINE.events();
    r.confidential = std::path::Path::new("/sys/firmware/sev").exists()
        || fs::read_to_string("/proc/cpuinfo")
            .is_ok_and(|c| c.contains(" sev_snp") || c.contains(" tdx_guest"));
    r.cgroup_version = if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "v2".into()
    } else {
        String::new()
    };
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeline_keeps_the_last_events_in_order() {
        let t = Timeline::default();
        for i in 0..Timeline::CAP + 10 {
            t.mark("container-created", &format!("c{i}"));
        }
        let e = t.events();
        assert_eq!(e.len(), Timeline::CAP);
        assert_eq!(e[0].container_id, "c10");
        assert_eq!(
            e[Timeline::CAP - 1].container_id,
            format!("c{}", Timeline::CAP + 9)
        );
        assert!(e.windows(2).all(|w| w[0].boottime_ns <= w[1].boottime_ns));
    }

    #[test]
    fn meminfo_is_parsed_in_bytes() {
        let m = "MemTotal:        2014124 kB\nMemFree:  10 kB\nMemAvailable:   1000 kB\n";
        assert_eq!(meminfo_bytes(m, "MemTotal"), 2014124 * 1024);
        assert_eq!(meminfo_bytes(m, "MemAvailable"), 1000 * 1024);
        assert_eq!(meminfo_bytes(m, "Missing"), 0);
    }
}
