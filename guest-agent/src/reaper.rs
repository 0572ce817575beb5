//! Zombie reaping. As PID 1 the agent inherits every orphan in the guest; on
//! each SIGCHLD it collects all exited children so none linger.

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};

/// Exit status the way runc reports it: the exit code, or 128 + signal.
pub fn exit_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

/// Reaps children forever. Statuses are only logged for now; container
/// processes will be matched to their waiters here.
pub async fn run() {
    let mut sigchld = match signal(SignalKind::child()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot watch SIGCHLD, orphans will not be reaped: {e}");
            return;
        }
    };
    loop {
        reap_all();
        if sigchld.recv().await.is_none() {
            return;
        }
    }
}

fn reap_all() {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(status) => {
                tracing::debug!(pid = ?status.pid(), code = ?exit_code(status), "reaped");
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
}
