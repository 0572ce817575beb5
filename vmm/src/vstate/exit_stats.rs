//! VM exits by kind (port, MMIO address, halt, shutdown, system event, signal) with the
//! time the VMM spent handling each kind, and the time the vCPUs spent inside KVM_RUN:
//! the figures that explain where a boot goes. Under nested virtualization every exit
//! is expensive, so a guest that exits differently boots slower.
//!
//! The guest chooses the ports and addresses it touches, so the table is bounded:
//! past `MAX_KEYS` distinct kinds, new ones are counted together as `other`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

use super::kvm_stats::KvmStatsFd;

/// Distinct kinds kept apart before new ones are lumped under `other`.
pub const MAX_KEYS: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ExitKind {
    IoIn(u16),
    IoOut(u16),
    MmioRead(u64),
    MmioWrite(u64),
    Hlt,
    Shutdown,
    SystemEvent,
    /// KVM_RUN returned EINTR/EAGAIN: a kick (pause, stop) or a signal.
    Interrupted,
    Other,
}

impl ExitKind {
    pub fn name(&self) -> String {
        match self {
            ExitKind::IoIn(p) => format!("io_in {p:#x}"),
            ExitKind::IoOut(p) => format!("io_out {p:#x}"),
            ExitKind::MmioRead(a) => format!("mmio_read {a:#x}"),
            ExitKind::MmioWrite(a) => format!("mmio_write {a:#x}"),
            ExitKind::Hlt => "hlt".into(),
            ExitKind::Shutdown => "shutdown".into(),
            ExitKind::SystemEvent => "system_event".into(),
            ExitKind::Interrupted => "interrupted".into(),
            ExitKind::Other => "other".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub count: u64,
    /// Time from KVM_RUN's return to the next KVM_RUN: the VMM's share of the exit.
    pub handling_ns: u64,
}

/// One row of a report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExitRow {
    pub kind: String,
    pub count: u64,
    pub handling_ns: u64,
}

/// What `stats` returns: totals first, then every kind, most frequent first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExitReport {
    pub exits: u64,
    pub handling_ns: u64,
    /// Wall time the vCPUs spent inside KVM_RUN (guest code and in-kernel exits).
    pub in_kvm_run_ns: u64,
    pub by_kind: Vec<ExitRow>,
    /// KVM's own counters summed over the vCPUs (`exits`, `irq_window_exits`,
    /// `insn_emulation`, ...), where the kernel has them; the non-zero ones.
    pub kvm: BTreeMap<String, u64>,
}

#[derive(Debug, Default)]
pub struct ExitStats {
    by_kind: Mutex<BTreeMap<ExitKind, Tally>>,
    in_kvm_run_ns: AtomicU64,
    kvm: Mutex<Vec<KvmStatsFd>>,
}

impl ExitStats {
    pub fn record(&self, kind: ExitKind, handling: Duration) {
        let mut map = self.by_kind.lock().unwrap_or_else(|e| e.into_inner());
        let key = if map.len() >= MAX_KEYS && !map.contains_key(&kind) {
            ExitKind::Other
        } else {
            kind
        };
        let t = map.entry(key).or_default();
        t.count += 1;
        t.handling_ns += handling.as_nanos() as u64;
    }

    /// Adds a vCPU's KVM statistics to the report.
    pub fn add_kvm_stats(&self, fd: KvmStatsFd) {
        self.kvm.lock().unwrap_or_else(|e| e.into_inner()).push(fd);
    }

    pub fn add_run_time(&self, d: Duration) {
        self.in_kvm_run_ns
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn report(&self) -> ExitReport {
        let map = self.by_kind.lock().unwrap_or_else(|e| e.into_inner());
        let mut by_kind: Vec<ExitRow> = map
            .iter()
            .map(|(k, t)| ExitRow {
                kind: k.name(),
                count: t.count,
                handling_ns: t.handling_ns,
            })
            .collect();
        by_kind.sort_by(|a, b| b.count.cmp(&a.count).then(a.kind.cmp(&b.kind)));
        let mut kvm = BTreeMap::new();
        for fd in self.kvm.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            for (name, v) in fd.read() {
                *kvm.entry(name).or_insert(0) += v;
            }
        }
        kvm.retain(|_, v| *v > 0);
        ExitReport {
            exits: map.values().map(|t| t.count).sum(),
            handling_ns: map.values().map(|t| t.handling_ns).sum(),
            in_kvm_run_ns: self.in_kvm_run_ns.load(Ordering::Relaxed),
            by_kind,
            kvm,
        }
    }
}

impl ExitReport {
    /// A readable table, for `--stats`.
    pub fn table(&self) -> String {
        let mut s = format!(
            "VM exits: {} (VMM handling {:.1} ms, vCPUs in KVM_RUN {:.1} ms)\n{:<28} {:>10} {:>12}\n",
            self.exits,
            self.handling_ns as f64 / 1e6,
            self.in_kvm_run_ns as f64 / 1e6,
            "kind",
            "count",
            "handling ms"
        );
        for r in &self.by_kind {
            s.push_str(&format!(
                "{:<28} {:>10} {:>12.3}\n",
                r.kind,
                r.count,
                r.handling_ns as f64 / 1e6
            ));
        }
        if !self.kvm.is_empty() {
            s.push_str("KVM's own counters (all vCPUs, exits handled in the kernel included)\n");
            for (name, v) in &self.kvm {
                s.push_str(&format!("{name:<28} {v:>10}\n"));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_times_add_up_by_kind() {
        let s = ExitStats::default();
        s.record(ExitKind::IoOut(0x3f8), Duration::from_nanos(100));
        s.record(ExitKind::IoOut(0x3f8), Duration::from_nanos(50));
        s.record(ExitKind::MmioRead(0xd000_0000), Duration::from_nanos(7));
        s.add_run_time(Duration::from_micros(3));
        let r = s.report();
        assert_eq!(r.exits, 3);
        assert_eq!(r.handling_ns, 157);
        assert_eq!(r.in_kvm_run_ns, 3000);
        assert_eq!(
            r.by_kind[0],
            ExitRow {
                kind: "io_out 0x3f8".into(),
                count: 2,
                handling_ns: 150
            }
        );
        assert_eq!(r.by_kind[1].kind, "mmio_read 0xd0000000");
        assert!(r.table().contains("io_out 0x3f8"));
    }

    #[test]
    fn a_guest_cannot_grow_the_table_without_bound() {
        let s = ExitStats::default();
        for a in 0..10_000u64 {
            s.record(ExitKind::MmioWrite(a * 4096), Duration::ZERO);
        }
        let r = s.report();
        assert_eq!(r.by_kind.len(), MAX_KEYS + 1);
        assert_eq!(r.exits, 10_000);
        let other = r.by_kind.iter().find(|k| k.kind == "other").unwrap();
        assert_eq!(other.count, 10_000 - MAX_KEYS as u64);
    }
}
