//! A QMP session with a VM's QEMU, on the control socket the shim made for it in the
//! root-owned run directory (`memctl::Listener`): what grows its memory and plugs its
//! disks. QEMU runs the guest, so it is only as trusted as the guest: every reply is
//! read with a deadline and a bounded length, and one that makes no sense is an error.
//!
//! Our own small client rather than a QMP crate: the shim needs a few commands and
//! descriptor passing (`add-fd`), each bounded in time and size, on tokio. Sessions are
//! short (a few commands each), so that memory growth and disk plugging, which share the
//! one client QMP serves at a time, never wait long behind each other.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::time::Instant;

use super::memctl::MemctlError;

/// The longest reply line read (QMP greets with a few hundred bytes).
pub const MAX_LINE: u64 = 64 << 10;
/// Lines skipped while waiting for one reply (events, a late reply to an earlier
/// command): a guest that makes QEMU emit events without end cannot keep a call waiting
/// past its deadline, nor grow memory.
const MAX_SKIPPED: usize = 1024;

/// One connection, past the greeting and capabilities negotiation. QMP serves one
/// client at a time: a second connection waits in the listener's backlog until this
/// one closes, within its own deadline.
pub struct Session {
    s: BufReader<UnixStream>,
    deadline: Instant,
    /// The id of the last command sent: each reply must carry its command's, so a late
    /// reply to a command whose wait ended cannot pass for the next one's.
    id: u64,
}

impl Session {
    pub async fn connect(path: &Path, deadline: Instant) -> Result<Session, MemctlError> {
        let connecting = async {
            let s = UnixStream::connect(path)
                .await
                .map_err(|e| MemctlError::Connect(path.to_owned(), e))?;
            let mut session = Session {
                s: BufReader::new(s),
                deadline,
                id: 0,
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

    async fn send(
        &mut self,
        command: &serde_json::Value,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), MemctlError> {
        self.id += 1;
        let mut command = command.clone();
        command["id"] = self.id.into();
        let mut line = command.to_string();
        line.push('\n');
        let bytes = line.as_bytes();
        let deadline = self.deadline;
        let s = self.s.get_mut();
        within(deadline, write_with_fd(s, bytes, fd)).await
    }

    /// The reply to the command just sent, skipping events and replies to others.
    async fn reply(&mut self) -> Result<serde_json::Value, MemctlError> {
        let deadline = self.deadline;
        let id = self.id;
        within(deadline, async {
            for _ in 0..=MAX_SKIPPED {
                let reply = read_line(&mut self.s).await?;
                if reply.get("event").is_some()
                    || reply.get("id").and_then(|i| i.as_u64()) != Some(id)
                {
                    continue;
                }
                if let Some(e) = reply.get("error") {
                    let desc = e.get("desc").and_then(|d| d.as_str()).unwrap_or("?");
                    let class = e.get("class").and_then(|d| d.as_str()).unwrap_or("");
                    if class == "DeviceNotFound" {
                        return Err(MemctlError::NotFound(desc.to_owned()));
                    }
                    return Err(MemctlError::Refused(desc.to_owned()));
                }
                return match reply.get("return") {
                    Some(r) => Ok(r.clone()),
                    None => Err(MemctlError::BadReply(reply.to_string())),
                };
            }
            Err(MemctlError::BadReply(format!(
                "more than {MAX_SKIPPED} events or other replies before a reply"
            )))
        })
        .await
    }
}

/// Writes `bytes`, `fd` (if any) riding with the first of them (SCM_RIGHTS).
pub(crate) async fn write_with_fd(
    s: &mut UnixStream,
    bytes: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> Result<(), MemctlError> {
    let mut sent = 0;
    if let Some(fd) = fd {
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
            let ok = crate::hypervisor::memctl::tests::with_id_of(&line, r#"{"return": {}}"#);
            s.get_mut()
                .write_all(format!("{ok}\n").as_bytes())
                .await
                .unwrap();
            // A late reply to some other command, then events.
            s.get_mut()
                .write_all(b"{\"return\": {}, \"id\": 999}\n")
                .await
                .unwrap();
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
        assert!(e.to_string().contains("before a reply"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
