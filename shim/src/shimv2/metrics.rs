//! The agent's container stats in containerd's cgroup v2 metrics format
//! (`io.containerd.cgroups.v2.Metrics`), which `ctr task metrics` reads.

use cocoon_protocol::agent::StatsContainerResponse;
use containerd_shim::protos::cgroups_v2::metrics as m;
use containerd_shim::protos::protobuf::MessageField;

pub fn to_cgroups_v2(s: &StatsContainerResponse) -> m::Metrics {
    let mut out = m::Metrics::new();
    if let Some(p) = s.pids.as_ref() {
        out.pids = MessageField::some(m::PidsStat {
            current: p.current,
            limit: p.limit,
            ..Default::default()
        });
    }
    if let Some(c) = s.cpu.as_ref() {
        out.cpu = MessageField::some(m::CPUStat {
            usage_usec: c.usage_usec,
            user_usec: c.user_usec,
            system_usec: c.system_usec,
            nr_periods: c.nr_periods,
            nr_throttled: c.nr_throttled,
            throttled_usec: c.throttled_usec,
            ..Default::default()
        });
    }
    if let Some(mem) = s.memory.as_ref() {
        let stat = |k: &str| mem.stat.get(k).copied().unwrap_or(0);
        out.memory = MessageField::some(m::MemoryStat {
            usage: mem.usage_bytes,
            usage_limit: mem.limit_bytes,
            max_usage: mem.max_usage_bytes,
            anon: mem.anon_bytes,
            file: mem.file_bytes,
            kernel_stack: stat("kernel_stack"),
            slab: stat("slab"),
            sock: stat("sock"),
            shmem: stat("shmem"),
            file_mapped: stat("file_mapped"),
            file_dirty: stat("file_dirty"),
            inactive_anon: stat("inactive_anon"),
            active_anon: stat("active_anon"),
            inactive_file: stat("inactive_file"),
            active_file: stat("active_file"),
            pgfault: stat("pgfault"),
            pgmajfault: stat("pgmajfault"),
            ..Default::default()
        });
        out.memory_events = MessageField::some(m::MemoryEvents {
            oom: mem.oom_events,
            oom_kill: mem.oom_kill_events,
            ..Default::default()
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use cocoon_protocol::agent as pb;

    #[test]
    fn stats_map_to_v2_metrics() {
        let mut s = pb::StatsContainerResponse::new();
        s.pids = MessageField::some(pb::PidsStats {
            current: 3,
            limit: 10,
            ..Default::default()
        });
        let mut mem = pb::MemoryStats::new();
        mem.usage_bytes = 4096;
        mem.limit_bytes = 1 << 20;
        mem.oom_kill_events = 1;
        mem.stat.insert("pgfault".into(), 7);
        s.memory = MessageField::some(mem);
        let out = to_cgroups_v2(&s);
        assert_eq!(out.pids.current, 3);
        assert_eq!(out.memory.usage, 4096);
        assert_eq!(out.memory.usage_limit, 1 << 20);
        assert_eq!(out.memory.pgfault, 7);
        assert_eq!(out.memory_events.oom_kill, 1);
        assert!(out.cpu.is_none());
    }
}
