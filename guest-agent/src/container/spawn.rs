//! Agent side of the runtime helper: starts `cocoon-agent __cocoon-runtime`
//! with the process's stdio and a sync socket, and talks to it.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::cgroup::{Cgroup, CgroupError};
use crate::reaper::Reaper;
use crate::runtime::{HelperMessage, HelperRequest, HELPER_ARG, SYNC_FD};
use crate::stdio::ChildStdio;

/// Bound on each helper step (fork, setup, start); a wedged setup must not
/// hang the host's call forever.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum SpawnError {
    #[error("cannot create the sync socket")]
    Socket(#[source] std::io::Error),
    #[error("cannot start the runtime helper")]
    Spawn(#[source] std::io::Error),
    #[error("cannot place the process in its cgroup")]
    Cgroup(#[from] CgroupError),
    #[error("cannot talk to the runtime helper")]
    Sync(#[source] std::io::Error),
    #[error("{0}")]
    Runtime(String),
    #[error("the runtime helper ended without a reply")]
    Ended,
    #[error("the runtime helper sent an unexpected message {0:?}")]
    Unexpected(HelperMessage),
    #[error("the runtime helper did not answer within {0:?}")]
    Timeout(Duration),
}

/// The agent's end of a sync socket.
#[derive(Debug)]
pub struct SyncChannel {
    stream: BufReader<UnixStream>,
}

impl SyncChannel {
    pub async fn send_line(&mut self, line: &str) -> Result<(), SpawnError> {
        let s = self.stream.get_mut();
        s.write_all(line.as_bytes())
            .await
            .map_err(SpawnError::Sync)?;
        s.write_all(b"\n").await.map_err(SpawnError::Sync)
    }

    /// The next message, or `None` at EOF (the process exec'd or died).
    pub async fn recv(&mut self) -> Result<Option<HelperMessage>, SpawnError> {
        let mut line = String::new();
        let read = self.stream.read_line(&mut line);
        match tokio::time::timeout(STEP_TIMEOUT, read).await {
            Err(_) => Err(SpawnError::Timeout(STEP_TIMEOUT)),
            Ok(Err(e)) => Err(SpawnError::Sync(e)),
            Ok(Ok(0)) => Ok(None),
            Ok(Ok(_)) => serde_json::from_str(line.trim_end())
                .map(Some)
                .map_err(|e| SpawnError::Sync(e.into())),
        }
    }

    /// Waits for EOF (success) or an error report.
    pub async fn expect_exec(&mut self) -> Result<(), SpawnError> {
        match self.recv().await? {
            None => Ok(()),
            Some(HelperMessage::Error(e)) => Err(SpawnError::Runtime(e)),
            Some(other) => Err(SpawnError::Unexpected(other)),
        }
    }
}

/// Starts the helper; returns the pid of the process it forked (the
/// container init or the exec'd process) and the sync channel.
pub async fn spawn(
    req: &HelperRequest,
    stdio: ChildStdio,
    cgroup: Option<&Cgroup>,
    reaper: &Reaper,
) -> Result<(i32, SyncChannel), SpawnError> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(SpawnError::Socket)?;
    let their_fd = theirs.as_raw_fd();
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg(HELPER_ARG)
        .env_clear()
        .stdin(Stdio::from(stdio.stdin))
        .stdout(Stdio::from(stdio.stdout))
        .stderr(Stdio::from(stdio.stderr));
    // SAFETY: the hook runs in the forked child before exec and only calls
    // dup2/fcntl, which are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let rc = if their_fd == SYNC_FD {
                libc::fcntl(SYNC_FD, libc::F_SETFD, 0)
            } else {
                libc::dup2(their_fd, SYNC_FD)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(SpawnError::Spawn)?;
    let helper_pid = child.id() as i32;
    // The reaper collects it; its status says nothing the socket doesn't.
    drop(child);
    drop(reaper.watch(helper_pid));
    drop(theirs);
    ours.set_nonblocking(true).map_err(SpawnError::Socket)?;
    let stream = UnixStream::from_std(ours).map_err(SpawnError::Socket)?;
    let mut sync = SyncChannel {
        stream: BufReader::new(stream),
    };
    if let Some(cg) = cgroup {
        // Before the helper forks or unshares the cgroup namespace.
        if let Err(e) = cg.add_pid(helper_pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(helper_pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            return Err(e.into());
        }
    }
    let json = serde_json::to_string(req).map_err(|e| SpawnError::Sync(e.into()))?;
    sync.send_line(&json).await?;
    match sync.recv().await? {
        Some(HelperMessage::Pid(pid)) => Ok((pid, sync)),
        Some(HelperMessage::Error(e)) => Err(SpawnError::Runtime(e)),
        Some(other) => Err(SpawnError::Unexpected(other)),
        None => Err(SpawnError::Ended),
    }
}
