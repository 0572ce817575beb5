//! Agent side of the runtime helper: starts `cocoon-agent __cocoon-runtime`
//! with the process's stdio and a sync socket, and talks to it.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::UnixStream;

use crate::cgroup::{Cgroup, CgroupError};
use crate::reaper::Reaper;
use crate::runtime::{HelperMessage, HelperRequest, RawSpec, HELPER_ARG, SYNC_FD};
use crate::stdio::ChildStdio;

/// Bound on each helper step (fork, setup, start); a wedged setup must not
/// hang the host's call forever.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

tokio::task_local! {
    /// When the host gives up on the call being served (its ttrpc timeout, less a
    /// margin; see `handlers`). Every helper step ends by then, so the guest answers,
    /// with an error at worst, before the host stops listening, and its normal error
    /// path undoes what the call had done: nothing is left half-made in the guest.
    pub static CALL_DEADLINE: tokio::time::Instant;
}

/// When the current step must end: its own bound, or the call's deadline if sooner.
pub fn step_deadline() -> tokio::time::Instant {
    let own = tokio::time::Instant::now() + STEP_TIMEOUT;
    CALL_DEADLINE.try_with(|d| (*d).min(own)).unwrap_or(own)
}

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
    #[error(
        "the out-of-memory killer ended the container's process before it started: its \
         memory limit ({0} bytes) is below what starting it takes"
    )]
    OutOfMemory(String),
    #[error(
        "the out-of-memory killer ended the container's process before it started: the \
         container has no memory limit of its own, so the pod's or the guest's memory ran out"
    )]
    OutOfMemoryAbove,
    #[error("the runtime helper sent no pty master with its console message")]
    NoConsoleFd,
    #[error("the runtime helper sent an unexpected message {0:?}")]
    Unexpected(HelperMessage),
    #[error("the runtime helper did not answer within {0:?}")]
    Timeout(Duration),
}

/// The agent's end of a sync socket. Read with recvmsg, not a buffered
/// reader: a `Console` line carries the pty master (SCM_RIGHTS), and a plain
/// read would close a descriptor that arrives with the bytes it takes.
#[derive(Debug)]
pub struct SyncChannel {
    stream: UnixStream,
    /// Bytes received and not yet returned as lines.
    buf: Vec<u8>,
    /// Descriptors received, in order, not yet claimed.
    fds: VecDeque<OwnedFd>,
    eof: bool,
}

impl SyncChannel {
    fn new(stream: UnixStream) -> Self {
        SyncChannel {
            stream,
            buf: Vec::new(),
            fds: VecDeque::new(),
            eof: false,
        }
    }

    pub async fn send_line(&mut self, line: &str) -> Result<(), SpawnError> {
        let s = &mut self.stream;
        s.write_all(line.as_bytes())
            .await
            .map_err(SpawnError::Sync)?;
        s.write_all(b"\n").await.map_err(SpawnError::Sync)
    }

    /// The next message, or `None` at EOF (the process exec'd or died).
    pub async fn recv(&mut self) -> Result<Option<HelperMessage>, SpawnError> {
        let deadline = step_deadline();
        let allowed = deadline.saturating_duration_since(tokio::time::Instant::now());
        let line = match tokio::time::timeout_at(deadline, self.read_line()).await {
            Err(_) => return Err(SpawnError::Timeout(allowed)),
            Ok(r) => r.map_err(SpawnError::Sync)?,
        };
        match line {
            None => Ok(None),
            Some(l) => serde_json::from_str(l.trim_end())
                .map(Some)
                .map_err(|e| SpawnError::Sync(e.into())),
        }
    }

    /// The next message, or `None` once the helper is gone, also where it died with
    /// bytes of ours unread (the kernel then resets the connection rather than end it:
    /// an OOM kill before the helper read its request). Only for the steps where its
    /// end is an error whatever way it came ([`ended`] says why); never where EOF means
    /// the process exec'd.
    pub async fn recv_or_gone(&mut self) -> Result<Option<HelperMessage>, SpawnError> {
        match self.recv().await {
            Err(SpawnError::Sync(e)) if e.raw_os_error() == Some(libc::ECONNRESET) => Ok(None),
            r => r,
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

    /// Waits for the process's pty master (a terminal process sends it
    /// once it opened the pty in the container).
    pub async fn expect_console(&mut self) -> Result<OwnedFd, SpawnError> {
        match self.recv().await? {
            Some(HelperMessage::Console) => self.fds.pop_front().ok_or(SpawnError::NoConsoleFd),
            Some(HelperMessage::Error(e)) => Err(SpawnError::Runtime(e)),
            Some(other) => Err(SpawnError::Unexpected(other)),
            None => Err(SpawnError::Ended),
        }
    }

    /// One line without its newline; a partial last line counts at EOF.
    async fn read_line(&mut self) -> std::io::Result<Option<String>> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).take(i).collect();
                return Ok(Some(String::from_utf8_lossy(&line).into_owned()));
            }
            if self.eof {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                let rest = std::mem::take(&mut self.buf);
                return Ok(Some(String::from_utf8_lossy(&rest).into_owned()));
            }
            let mut chunk = [0u8; 4096];
            let fd = self.stream.as_raw_fd();
            let (n, fds) = self
                .stream
                .async_io(Interest::READABLE, || recv_with_fds(fd, &mut chunk))
                .await?;
            self.fds.extend(fds);
            self.buf.extend_from_slice(&chunk[..n]);
            self.eof = n == 0;
        }
    }
}

/// One recvmsg: the bytes read and any descriptors that came with them
/// (close-on-exec, so no other child inherits a pty master).
fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    // ENOBUFS when the control data was truncated: a descriptor was lost.
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: SCM_RIGHTS just installed these descriptors in this
            // process; nothing else knows or owns them.
            fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
        }
    }
    Ok((msg.bytes, fds))
}

/// A started helper: the pid of the process it forked (the container init or the exec'd
/// process), the sync channel, and when the helper's main() began (guest boot time).
pub struct Spawned {
    pub pid: i32,
    pub sync: SyncChannel,
    pub helper_main_ns: Option<i64>,
    /// The cgroup's OOM kills before the helper started (see [`ended`]).
    pub oom_kills_before: u64,
}

/// Starts the helper and waits for the pid of the process it forked.
pub async fn spawn(
    req: &HelperRequest<RawSpec>,
    stdio: ChildStdio,
    cgroup: Option<&Cgroup>,
    reaper: &Reaper,
) -> Result<Spawned, SpawnError> {
    let oom_kills_before = cgroup.map_or(0, Cgroup::oom_kills);
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(SpawnError::Socket)?;
    let theirs = OwnedFd::from(theirs);
    let helper_pid = match crate::runtime::zygote::spawn([
        &stdio.stdin,
        &stdio.stdout,
        &stdio.stderr,
        &theirs,
    ]) {
        // The zygote's child: the kernel reaps it, not the agent.
        Some(Ok(pid)) => pid,
        failed => {
            if let Some(Err(e)) = failed {
                tracing::warn!("runtime zygote: {e}; exec'ing the helper instead");
            }
            exec_helper(stdio, &theirs, reaper)?
        }
    };
    drop(theirs);
    ours.set_nonblocking(true).map_err(SpawnError::Socket)?;
    let stream = UnixStream::from_std(ours).map_err(SpawnError::Socket)?;
    let mut sync = SyncChannel::new(stream);
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
    match sync.send_line(&json).await {
        // The helper is gone before it read its request: say why, if the kernel knows.
        Err(SpawnError::Sync(e))
            if matches!(e.raw_os_error(), Some(libc::EPIPE | libc::ECONNRESET)) =>
        {
            return Err(ended(cgroup, oom_kills_before));
        }
        r => r?,
    }
    let mut helper_main_ns = None;
    loop {
        match sync.recv_or_gone().await? {
            // Once, first: a second one is as unexpected as any other line.
            Some(HelperMessage::Started(ns)) if helper_main_ns.is_none() => {
                helper_main_ns = Some(ns)
            }
            Some(HelperMessage::Pid(pid)) => {
                return Ok(Spawned {
                    pid,
                    sync,
                    helper_main_ns,
                    oom_kills_before,
                })
            }
            Some(HelperMessage::Error(e)) => return Err(SpawnError::Runtime(e)),
            Some(other) => return Err(SpawnError::Unexpected(other)),
            None => return Err(ended(cgroup, oom_kills_before)),
        }
    }
}

/// Why a helper ended without a word: most often the container's memory limit, which
/// the kernel enforced before the helper could say anything. Only an OOM kill counted
/// since `kills_before` (the cgroup's count when the helper started) is its.
pub fn ended(cgroup: Option<&Cgroup>, kills_before: u64) -> SpawnError {
    match cgroup {
        Some(cg) if cg.oom_kills() > kills_before => {
            let max = std::fs::read_to_string(cg.path().join("memory.max"))
                .map(|m| m.trim().to_string())
                .unwrap_or_default();
            match max.as_str() {
                "max" | "" => SpawnError::OutOfMemoryAbove,
                _ => SpawnError::OutOfMemory(max),
            }
        }
        _ => SpawnError::Ended,
    }
}

/// Starts the helper by exec'ing the agent's own binary, when no zygote runs (see
/// `runtime::zygote` for why that is the slower way).
fn exec_helper(stdio: ChildStdio, theirs: &OwnedFd, reaper: &Reaper) -> Result<i32, SpawnError> {
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
    Ok(helper_pid)
}

/// kill(2) with a signal by number: nix's `Signal` has no real-time signals, which
/// containers use (SIGRTMIN+3 stops systemd) and runc sends.
pub fn send_signal(pid: i32, signal: i32) -> nix::Result<()> {
    // SAFETY: kill(2) takes two integers and touches no memory of ours.
    nix::errno::Errno::result(unsafe { libc::kill(pid, signal) }).map(drop)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;
    use crate::runtime::{send, send_with_fd};

    /// A helper that never answers: the step ends at the host call's deadline (here
    /// 150 ms), not after its own 30 s, so the error reaches the host in time.
    #[tokio::test]
    async fn a_silent_helper_times_out_at_the_call_deadline() {
        let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut sync = SyncChannel::new(UnixStream::from_std(ours).unwrap());
        let t = tokio::time::Instant::now();
        let deadline = t + Duration::from_millis(150);
        let r = CALL_DEADLINE.scope(deadline, sync.recv()).await;
        assert!(matches!(r, Err(SpawnError::Timeout(_))), "{r:?}");
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(140) && took < Duration::from_secs(5),
            "{took:?}"
        );
        // Outside a call, the step's own bound applies.
        let own = step_deadline() - tokio::time::Instant::now();
        assert!(own > Duration::from_secs(29), "{own:?}");
    }

    #[tokio::test]
    async fn the_console_line_brings_its_descriptor() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut sync = SyncChannel::new(UnixStream::from_std(ours).unwrap());
        let (r, w) = nix::unistd::pipe().unwrap();
        // All sent before the first read, so one recvmsg may take the plain
        // line and the one with the descriptor together.
        send(&theirs, &HelperMessage::Pid(7));
        send_with_fd(&theirs, &HelperMessage::Console, w.as_fd()).unwrap();
        drop(w);
        send(&theirs, &HelperMessage::Console);
        drop(theirs);

        assert_eq!(sync.recv().await.unwrap(), Some(HelperMessage::Pid(7)));
        let fd = sync.expect_console().await.unwrap();
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(
            flags & libc::FD_CLOEXEC,
            0,
            "received without close-on-exec"
        );
        nix::unistd::write(&fd, b"x").unwrap();
        drop(fd);
        let mut b = [0u8; 2];
        assert_eq!(nix::unistd::read(&r, &mut b).unwrap(), 1);
        assert_eq!(b[0], b'x');
        // A console line without a descriptor is an error, not a hang.
        assert!(matches!(
            sync.expect_console().await,
            Err(SpawnError::NoConsoleFd)
        ));
        assert_eq!(sync.recv().await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_helper_gone_with_our_request_unread_reads_as_its_end() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut sync = SyncChannel::new(UnixStream::from_std(ours).unwrap());
        sync.send_line("{\"request\":1}").await.unwrap();
        // Killed before it read a byte: the kernel resets the connection, which only
        // the steps before the exec take for the helper's end.
        drop(theirs);
        assert_eq!(sync.recv_or_gone().await.unwrap(), None);
        // And a request sent to a helper already gone is a broken pipe, which spawn()
        // takes for the helper's end.
        let e = sync.send_line("{}").await.unwrap_err();
        assert!(
            matches!(&e, SpawnError::Sync(io) if io.raw_os_error() == Some(libc::EPIPE)),
            "{e:?}"
        );
        // Where EOF means the process exec'd (Start), a reset stays an error: an init
        // killed before it read the start line never ran its program.
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut sync = SyncChannel::new(UnixStream::from_std(ours).unwrap());
        sync.send_line(crate::runtime::START_LINE).await.unwrap();
        drop(theirs);
        assert!(sync.expect_exec().await.is_err());
    }
}
