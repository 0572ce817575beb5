//! A QMP session with a VM's QEMU, on the control socket the shim made for it in the
//! root-owned run directory (`memctl::Listener`): what grows its memory and plugs its
//! disks. QEMU runs the guest, so it is only as trusted as the guest: every reply is
//! read with a deadline and a bounded length, and one that makes no sense is an error.
//!
//! Our own small client rather than a QMP crate: the shim needs four commands, one
//! event and descriptor passing (`add-fd`), each bounded in time and size, on tokio.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::time::Instant;

use super::memctl::MemctlError;

/// The longest reply line read (QMP greets with a few hundred bytes).
pub const MAX_LINE: u64 = 64 << 10;
/// Events skipped while waiting for one reply: a guest that makes QEMU emit events
/// without end cannot keep a call waiting past its deadline, nor grow memory.
const MAX_SKIPPED_EVENTS: usize = 1024;

/// One connection, past the greeting and capabilities negotiation. QMP serves one
/// client at a time: a second connection waits in the listener's backlog until this
/// one closes, within its own deadline.
pub struct Session {
    s: BufReader<UnixStream>,
    deadline: Instant,
    /// Events seen while waiting for replies, the last [`KEPT_EVENTS`]: one may be
    /// what a later `wait_event` waits for (QEMU can send it before the reply).
    events: std::collections::VecDeque<serde_json::Value>,
}

const KEPT_EVENTS: usize = 16;

impl Session {
    pub async fn connect(path: &Path, deadline: Instant) -> Result<Session, MemctlError> {
        let connecting = async {
            let s = UnixStream::connect(path)
                .await
                .map_err(|e| MemctlError::Connect(path.to_owned(), e))?;
            let mut session = Session {
                s: BufReader::new(s),
                deadline,
                events: Default::default(),
            };
            let greeting = read_line(&mut session.s).await?;
            if greeting.get("QMP").is_none() {
                return Err(MemctlError::BadReply(format!(
                    "not a QMP greeting: {greeting}"
                )));
            }
            session
                .execute(serde_json::json!({"execute": "qmp_capabilities"}))
                .await?;
            Ok(session)
        };
        within(deadline, connecting).await
    }

    /// Runs one command: its `return` value, or its error as `Refused`.
    pub async fn execute(
        &mut self,
        command: serde_json::Value,
    ) -> Result<serde_json::Value, MemctlError> {
        self.send(&command, None).await?;
        self.reply().await
    }

    /// Runs one command with `fd` passed beside it (`add-fd`, `getfd`).
    pub async fn execute_with_fd(
        &mut self,
        command: serde_json::Value,
        fd: BorrowedFd<'_>,
    ) -> Result<serde_json::Value, MemctlError> {
        self.send(&command, Some(fd)).await?;
        self.reply().await
    }

    /// Waits for the event named `event` whose data has `key` equal to `value`
    /// (`DEVICE_DELETED` of one device), skipping replies and other events.
    pub async fn wait_event(
        &mut self,
        event: &str,
        key: &str,
        value: &str,
    ) -> Result<(), MemctlError> {
        let is_it = |line: &serde_json::Value| {
            line.get("event").and_then(|e| e.as_str()) == Some(event)
                && line
                    .get("data")
                    .and_then(|d| d.get(key))
                    .and_then(|v| v.as_str())
                    == Some(value)
        };
        if self.events.iter().any(is_it) {
            return Ok(());
        }
        let deadline = self.deadline;
        within(deadline, async {
            loop {
                if is_it(&read_line(&mut self.s).await?) {
                    return Ok(());
                }
            }
        })
        .await
    }

    async fn send(
        &mut self,
        command: &serde_json::Value,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), MemctlError> {
        let mut line = command.to_string();
        line.push('\n');
        let bytes = line.as_bytes();
        let deadline = self.deadline;
        let s = self.s.get_mut();
        within(deadline, async {
            let mut sent = 0;
            if let Some(fd) = fd {
                // The descriptor rides with the first bytes of the command.
                sent = loop {
                    s.writable().await?;
                    let r = s.try_io(tokio::io::Interest::WRITABLE, || {
                        send_with_fd(s.as_raw_fd(), bytes, fd.as_raw_fd())
                    });
                    match r {
                        Ok(n) => break n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                        Err(e) => return Err(MemctlError::Io(e)),
                    }
                };
            }
            s.write_all(&bytes[sent..]).await?;
            Ok(())
        })
        .await
    }

    /// The reply to the command just sent, skipping events.
    async fn reply(&mut self) -> Result<serde_json::Value, MemctlError> {
        let deadline = self.deadline;
        within(deadline, async {
            for _ in 0..=MAX_SKIPPED_EVENTS {
                let reply = read_line(&mut self.s).await?;
                if reply.get("event").is_some() {
                    if self.events.len() == KEPT_EVENTS {
                        self.events.pop_front();
                    }
                    self.events.push_back(reply);
                    continue;
                }
                if let Some(e) = reply.get("error") {
                    let desc = e.get("desc").and_then(|d| d.as_str()).unwrap_or("?");
                    return Err(MemctlError::Refused(desc.to_owned()));
                }
                return match reply.get("return") {
                    Some(r) => Ok(r.clone()),
                    None => Err(MemctlError::BadReply(reply.to_string())),
                };
            }
            Err(MemctlError::BadReply(format!(
                "more than {MAX_SKIPPED_EVENTS} events before a reply"
            )))
        })
        .await
    }
}

fn send_with_fd(sock: i32, bytes: &[u8], fd: i32) -> std::io::Result<usize> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let iov = [std::io::IoSlice::new(bytes)];
    let fds = [fd];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    sendmsg::<()>(sock, &iov, &cmsg, MsgFlags::MSG_DONTWAIT, None).map_err(std::io::Error::from)
}

async fn within<T>(
    deadline: Instant,
    f: impl std::future::Future<Output = Result<T, MemctlError>>,
) -> Result<T, MemctlError> {
    let left = deadline.saturating_duration_since(Instant::now());
    tokio::time::timeout_at(deadline, f)
        .await
        .map_err(|_| MemctlError::Timeout(left))?
}

/// Reads one line of at most [`MAX_LINE`] bytes.
pub async fn read_line(r: &mut BufReader<UnixStream>) -> Result<serde_json::Value, MemctlError> {
    let mut line = String::new();
    let n = tokio::io::AsyncReadExt::take(&mut *r, MAX_LINE)
        .read_line(&mut line)
        .await?;
    if n == 0 || !line.ends_with('\n') {
        return Err(MemctlError::BadReply(format!(
            "the connection ended or the line ran past {MAX_LINE} bytes"
        )));
    }
    serde_json::from_str(&line).map_err(|e| MemctlError::BadReply(format!("{e}: {line}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A QEMU that greets, accepts the capabilities, then sends events without end.
    #[tokio::test]
    async fn a_flood_of_events_ends_the_wait_for_a_reply() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let mut s = BufReader::new(s);
            s.get_mut().write_all(b"{\"QMP\": {}}\n").await.unwrap();
            let mut line = String::new();
            s.read_line(&mut line).await.unwrap();
            s.get_mut().write_all(b"{\"return\": {}}\n").await.unwrap();
            let event = b"{\"event\": \"RTC_CHANGE\", \"data\": {\"offset\": 1}}\n";
            while s.get_mut().write_all(event).await.is_ok() {}
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let started = std::time::Instant::now();
        let mut q = Session::connect(&path, deadline).await.unwrap();
        let e = q
            .execute(serde_json::json!({"execute": "query-status"}))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("events before a reply"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            q.events.len() <= KEPT_EVENTS,
            "what is kept of them is bounded"
        );
    }
}
