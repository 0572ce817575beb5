//! Host end of a hybrid vsock connection (the Firecracker convention): connect
//! to the VM's Unix socket, send `CONNECT <port>\n`, read `OK <hostport>\n`;
//! after that the stream is the guest port. The backend behind the socket may
//! be slow or hostile (it serves an untrusted guest), so the reply is read
//! with a byte limit and a deadline.

use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Longest acceptable reply line ("OK 4294967295\n" is 14 bytes).
const MAX_REPLY: usize = 32;

#[derive(Debug, Error)]
pub enum VsockError {
    #[error("cannot connect to the VM's vsock socket {0}")]
    Connect(PathBuf, #[source] std::io::Error),
    #[error("vsock handshake for guest port {port} failed")]
    Handshake {
        port: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("guest port {port} refused the connection (nothing listening yet)")]
    Refused { port: u32 },
    #[error("unexpected vsock handshake reply for guest port {port}: {reply:?}")]
    BadReply { port: u32, reply: String },
    #[error("vsock handshake for guest port {port} timed out after {after:?}")]
    Timeout { port: u32, after: Duration },
}

/// Opens a stream to `port` in the guest through the hybrid vsock socket.
pub async fn connect(uds: &Path, port: u32, deadline: Duration) -> Result<UnixStream, VsockError> {
    match tokio::time::timeout(deadline, connect_inner(uds, port)).await {
        Ok(r) => r,
        Err(_) => Err(VsockError::Timeout {
            port,
            after: deadline,
        }),
    }
}

async fn connect_inner(uds: &Path, port: u32) -> Result<UnixStream, VsockError> {
    let mut s = UnixStream::connect(uds)
        .await
        .map_err(|e| VsockError::Connect(uds.into(), e))?;
    let hs = |source| VsockError::Handshake { port, source };
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(hs)?;
    // Byte by byte: anything after the newline already belongs to the guest.
    let mut line = Vec::with_capacity(MAX_REPLY);
    loop {
        let mut b = [0u8; 1];
        let n = s.read(&mut b).await.map_err(hs)?;
        if n == 0 {
            // The backend closes the stream when the guest resets the
            // connection: nobody listens on that port.
            return Err(VsockError::Refused { port });
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
        if line.len() > MAX_REPLY {
            return Err(VsockError::BadReply {
                port,
                reply: String::from_utf8_lossy(&line).into(),
            });
        }
    }
    parse_reply(&line, port).map(|_| s)
}

/// The backend's answer to `CONNECT <port>`, less its newline: `OK <host port>`.
pub fn parse_reply(line: &[u8], port: u32) -> Result<u32, VsockError> {
    let text = String::from_utf8_lossy(line);
    match text.strip_prefix("OK ").map(|p| p.trim().parse::<u32>()) {
        Some(Ok(host_port)) => Ok(host_port),
        _ => Err(VsockError::BadReply {
            port,
            reply: text.into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;
    use tokio::net::UnixListener;

    /// A fake backend that answers the handshake with `reply` and then echoes.
    async fn fake_backend(dir: &Path, reply: &'static [u8]) -> PathBuf {
        let path = dir.join("v.sock");
        let l = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut s = tokio::io::BufReader::new(s);
            let mut req = String::new();
            s.read_line(&mut req).await.unwrap();
            assert_eq!(req, "CONNECT 1024\n");
            s.get_mut().write_all(reply).await.unwrap();
            let mut buf = [0u8; 5];
            if s.read_exact(&mut buf).await.is_ok() {
                s.get_mut().write_all(&buf).await.unwrap();
            }
        });
        path
    }

    #[tokio::test]
    async fn handshake_then_stream() {
        let d = tempfile::tempdir().unwrap();
        // The OK line and the first guest bytes can arrive in one read.
        let p = fake_backend(d.path(), b"OK 1073741824\n").await;
        let mut s = connect(&p, 1024, Duration::from_secs(5)).await.unwrap();
        s.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
    }

    #[tokio::test]
    async fn garbage_replies_are_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = fake_backend(d.path(), b"NO\n").await;
        let err = connect(&p, 1024, Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, VsockError::BadReply { .. }), "{err}");
        let d = tempfile::tempdir().unwrap();
        let p = fake_backend(d.path(), &[b'x'; 100]).await;
        let err = connect(&p, 1024, Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, VsockError::BadReply { .. }), "{err}");
    }

    #[tokio::test]
    async fn closed_stream_means_refused() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("v.sock");
        let l = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut b = [0u8; 13];
            let _ = s.read_exact(&mut b).await;
            // dropped: closed without OK
        });
        let err = connect(&path, 1024, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, VsockError::Refused { port: 1024 }), "{err}");
    }

    #[tokio::test]
    async fn silent_backend_times_out() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("v.sock");
        let l = UnixListener::bind(&path).unwrap();
        let t = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            // Hold the connection open without answering.
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(s);
        });
        let err = connect(&path, 1024, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(err, VsockError::Timeout { .. }), "{err}");
        t.abort();
    }

    #[tokio::test]
    async fn missing_socket_is_named() {
        let err = connect(
            Path::new("/nonexistent/v.sock"),
            1024,
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/v.sock"), "{err}");
    }
}
