//! Zombie reaping and exit routing. As PID 1 (or a subreaper in the dev mode)
//! the agent inherits every orphan; on each SIGCHLD it collects all exited
//! children and hands each status to whoever watches that pid.
//!
//! A process may exit before anyone watches it (a container init dying during
//! setup, a short exec). Such statuses are kept as "unclaimed" for a while so
//! a late `watch` still gets them.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// Exit status the way runc reports it: the exit code, or 128 + signal.
pub fn exit_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

/// How a watched process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// runc-style status: code, or 128 + signal.
    pub status: i32,
    /// Wall-clock time of the reap, Unix nanoseconds.
    pub at_ns: i64,
    /// Monotonic time of the reap, for grace periods.
    pub at: Instant,
}

/// Unclaimed statuses older than this are dropped: by then their pid may
/// belong to someone else.
const UNCLAIMED_TTL: Duration = Duration::from_secs(60);
/// Bound on remembered unclaimed statuses (orphans nobody watches).
const UNCLAIMED_MAX: usize = 4096;

#[derive(Default)]
struct Inner {
    watchers: HashMap<i32, Vec<oneshot::Sender<Exit>>>,
    unclaimed: HashMap<i32, Exit>,
    order: VecDeque<i32>,
}

/// Routes exit statuses of reaped children to their watchers.
#[derive(Default)]
pub struct Reaper {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Reaper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reaper").finish_non_exhaustive()
    }
}

impl Reaper {
    /// Returns a receiver that resolves when `pid` is reaped, also when that
    /// already happened.
    pub fn watch(&self, pid: i32) -> oneshot::Receiver<Exit> {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(exit) = inner.unclaimed.remove(&pid) {
            // A live process with this pid means the stored status belongs
            // to an earlier process that had the same pid.
            let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
            if !alive && exit.at.elapsed() < UNCLAIMED_TTL {
                let _ = tx.send(exit);
                return rx;
            }
        }
        inner.watchers.entry(pid).or_default().push(tx);
        rx
    }

    fn deliver(&self, pid: i32, status: i32) {
        let exit = Exit {
            status,
            at_ns: crate::details::realtime_ns(),
            at: Instant::now(),
        };
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(txs) = inner.watchers.remove(&pid) {
            for tx in txs {
                let _ = tx.send(exit);
            }
            return;
        }
        if inner.unclaimed.insert(pid, exit).is_none() {
            inner.order.push_back(pid);
        }
        while inner.order.len() > UNCLAIMED_MAX {
            if let Some(old) = inner.order.pop_front() {
                inner.unclaimed.remove(&old);
            }
        }
        // Forget entries nobody claimed in time.
        while let Some(&old) = inner.order.front() {
            match inner.unclaimed.get(&old) {
                Some(e) if e.at.elapsed() < UNCLAIMED_TTL => break,
                _ => {
                    inner.order.pop_front();
                    inner.unclaimed.remove(&old);
                }
            }
        }
    }

    /// Reaps children forever.
    pub async fn run(self: std::sync::Arc<Self>) {
        let mut sigchld = match signal(SignalKind::child()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot watch SIGCHLD, orphans will not be reaped: {e}");
                return;
            }
        };
        loop {
            self.reap_all();
            if sigchld.recv().await.is_none() {
                return;
            }
        }
    }

    fn reap_all(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(status) => {
                    let (Some(pid), Some(code)) = (status.pid(), exit_code(status)) else {
                        continue;
                    };
                    tracing::debug!(pid = pid.as_raw(), code, "reaped");
                    self.deliver(pid.as_raw(), code);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    #[test]
    fn exit_codes_match_runc() {
        let pid = Pid::from_raw(10);
        assert_eq!(exit_code(WaitStatus::Exited(pid, 42)), Some(42));
        assert_eq!(
            exit_code(WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            Some(137)
        );
        assert_eq!(
            exit_code(WaitStatus::Signaled(pid, Signal::SIGTERM, true)),
            Some(143)
        );
        assert_eq!(exit_code(WaitStatus::StillAlive), None);
    }

    #[test]
    fn exits_before_and_after_watch_both_arrive() {
        let r = Reaper::default();
        // Pids far above pid_max never exist, so the stored status is ours.
        let early = 0x7fff_fff0;
        r.deliver(early, 3);
        let mut rx = r.watch(early);
        assert_eq!(rx.try_recv().unwrap().status, 3);

        let late = 0x7fff_fff1;
        let mut a = r.watch(late);
        let mut b = r.watch(late);
        assert!(a.try_recv().is_err());
        r.deliver(late, 137);
        assert_eq!(a.try_recv().unwrap().status, 137);
        assert_eq!(b.try_recv().unwrap().status, 137);
    }

    #[test]
    fn stale_status_of_a_live_pid_is_ignored() {
        let r = Reaper::default();
        let me = std::process::id() as i32;
        r.deliver(me, 1);
        let mut rx = r.watch(me);
        assert!(rx.try_recv().is_err());
    }
}
