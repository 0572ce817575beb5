//! Watches a running VM's host processes (the VMM, virtiofsd, the vsock backend). A pod
//! cannot go on without any of them: a dead virtiofsd leaves every file access in the
//! guest waiting forever, a dead vsock backend cuts the agent off. So the first one to
//! exit ends the VM: the others are SIGKILLed at once, every guest call then fails, and
//! every task of the pod is reported exited, instead of a pod that hangs.
//!
//! Pidfds (Linux 5.3+) make this race-free: they become readable when their process
//! exits, and a signal sent through one cannot reach a recycled pid.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;

/// One watched process.
struct Watched {
    name: String,
    pid: u32,
    fd: Option<AsyncFd<OwnedFd>>,
}

/// The processes of one VM, watched.
pub struct VmWatch {
    procs: Vec<Watched>,
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// How a loss names the process: its `comm`, or for a PID-namespace waiter (which
/// exits as its program does, and may be seen first) the program it waits for.
fn process_name(pid: u32) -> String {
    match comm(pid) {
        Some(c) if c == cocoon_vmm::pid_ns::WAITER_NAME => {
            let program = crate::telemetry::children_of(pid)
                .first()
                .and_then(|&p| comm(p))
                .unwrap_or_else(|| "its program".into());
            format!("the waiter of {program}")
        }
        Some(c) => c,
        None => format!("pid {pid}"),
    }
}

impl VmWatch {
    /// Starts watching `pids`. A process already gone counts as exited at once.
    pub fn new(pids: &[u32]) -> VmWatch {
        let procs = pids
            .iter()
            .map(|&pid| Watched {
                name: process_name(pid),
                pid,
                fd: pidfd_open(pid).ok().and_then(|fd| {
                    // SAFETY: an OwnedFd is open and returns the same fd for as long as it
                    // lives, and the AsyncFd owns it until it is dropped.
                    unsafe { AsyncFd::register(fd) }.ok()
                }),
            })
            .collect();
        VmWatch { procs }
    }

    /// Resolves when the first watched process exits, with its name and pid.
    pub async fn first_exit(&self) -> (String, u32) {
        if let Some(gone) = self.procs.iter().find(|p| p.fd.is_none()) {
            return (gone.name.clone(), gone.pid);
        }
        if self.procs.is_empty() {
            return std::future::pending().await;
        }
        let waits = self.procs.iter().map(|p| {
            Box::pin(async move {
                if let Some(fd) = &p.fd {
                    // Readable once the process has exited; that never reverts.
                    let _ = fd.readable().await;
                }
                (p.name.clone(), p.pid)
            })
        });
        futures::future::select_all(waits).await.0
    }

    /// SIGKILLs every watched process still running (through its pidfd).
    pub fn kill_all(&self) {
        for p in &self.procs {
            if let Some(fd) = &p.fd {
                // SAFETY: pidfd_send_signal on a pidfd we own; no pointers but a null info.
                unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        fd.get_ref().as_raw_fd(),
                        libc::SIGKILL,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn the_first_exit_is_named_and_the_rest_are_killed() {
        let mut a = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let mut b = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let watch = VmWatch::new(&[a.id(), b.id()]);
        let waiting = tokio::time::timeout(Duration::from_millis(200), watch.first_exit()).await;
        assert!(waiting.is_err(), "nothing has exited yet");
        b.kill().unwrap();
        b.wait().unwrap();
        let (_, pid) = tokio::time::timeout(Duration::from_secs(5), watch.first_exit())
            .await
            .expect("b's exit is seen");
        // (The name is read at watch time: a child just spawned may not have exec'd yet.)
        assert_eq!(pid, b.id());
        watch.kill_all();
        let status = a.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
    }

    #[tokio::test]
    async fn a_process_gone_before_the_watch_counts_as_exited() {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        let watch = VmWatch::new(&[pid]);
        let (_, seen) = tokio::time::timeout(Duration::from_secs(1), watch.first_exit())
            .await
            .expect("seen at once");
        assert_eq!(seen, pid);
    }
}
