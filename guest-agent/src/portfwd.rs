//! Port forwarding into the pod (Kubernetes' `PortForward`): the host asks for a TCP port
//! and the agent connects to it on the pod's loopback, as `kubectl port-forward` reaches
//! a runc pod's `localhost`, then copies bytes both ways until either side closes.
//! See `cocoon_protocol::FORWARD_PORT` for the exchange.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;

/// The request line's longest form (`TCP 65535\n` is 10 bytes).
const MAX_REQUEST: usize = 32;
/// How long the host may take to say which port, and the pod's server to accept.
const DEADLINE: Duration = Duration::from_secs(10);
/// Forwarded connections at once; more are refused until some close.
pub const MAX_FORWARDS: usize = 256;

/// Parses `TCP <port>\n`.
pub fn parse_request(line: &[u8]) -> Result<u16, String> {
    let text = std::str::from_utf8(line).map_err(|_| "request is not text".to_string())?;
    let port = text
        .strip_prefix("TCP ")
        .ok_or_else(|| format!("unknown request {text:?}"))?
        .trim_end_matches('\n');
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("bad port {port:?}")),
    }
}

/// Reads one request line, byte by byte so nothing after it is consumed.
async fn read_request<S: AsyncRead + Unpin>(conn: &mut S) -> Result<u16, String> {
    let mut line = Vec::with_capacity(MAX_REQUEST);
    loop {
        let b = conn
            .read_u8()
            .await
            .map_err(|e| format!("reading the request: {e}"))?;
        line.push(b);
        if b == b'\n' {
            return parse_request(&line);
        }
        if line.len() >= MAX_REQUEST {
            return Err("request line too long".into());
        }
    }
}

/// Serves one forward connection from the host.
pub async fn serve_connection<S>(mut conn: S, limit: Arc<Semaphore>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Ok(_permit) = limit.try_acquire() else {
        let _ = conn
            .write_all(b"ERR too many forwarded connections\n")
            .await;
        return;
    };
    let port = match tokio::time::timeout(DEADLINE, read_request(&mut conn)).await {
        Ok(Ok(p)) => p,
        Ok(Err(why)) => {
            let _ = conn.write_all(format!("ERR {why}\n").as_bytes()).await;
            return;
        }
        Err(_) => return,
    };
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let target = match tokio::time::timeout(DEADLINE, connect(addr)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            let _ = conn
                .write_all(format!("ERR connect {addr}: {e}\n").as_bytes())
                .await;
            return;
        }
        Err(_) => {
            let _ = conn
                .write_all(format!("ERR connect {addr}: timed out\n").as_bytes())
                .await;
            return;
        }
    };
    if conn.write_all(b"OK\n").await.is_err() {
        return;
    }
    let mut target = target;
    if let Err(e) = tokio::io::copy_bidirectional(&mut conn, &mut target).await {
        tracing::debug!(port, "forward ended: {e}");
    }
}

/// Connects to `addr` on the pod's loopback: the guest's own, or that of the pod's
/// network namespace when it has one (`crate::network::in_pod_netns`).
async fn connect(addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    // The socket is made in the pod's namespace, unconnected, and connects here.
    let socket = crate::network::in_pod_netns(tokio::net::TcpSocket::new_v4)??;
    socket.connect(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_strictly() {
        assert_eq!(parse_request(b"TCP 8080\n"), Ok(8080));
        for bad in [
            &b"TCP 0\n"[..],
            b"TCP 70000\n",
            b"UDP 53\n",
            b"TCP x\n",
            b"\xff\n",
        ] {
            assert!(parse_request(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn bytes_flow_both_ways_and_refusals_say_why() {
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = server.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf.map(|b| b.to_ascii_uppercase()))
                .await
                .unwrap();
        });
        let limit = Arc::new(Semaphore::new(MAX_FORWARDS));
        let (mut host, guest) = tokio::io::duplex(1024);
        tokio::spawn(serve_connection(guest, limit.clone()));
        host.write_all(format!("TCP {port}\nping").as_bytes())
            .await
            .unwrap();
        let mut reply = vec![0u8; 7];
        host.read_exact(&mut reply).await.unwrap();
        assert_eq!(reply, b"OK\nPING");

        // Nothing listens on port 1 of the loopback: the refusal names the address.
        let (mut host, guest) = tokio::io::duplex(1024);
        tokio::spawn(serve_connection(guest, limit.clone()));
        host.write_all(b"TCP 1\n").await.unwrap();
        let mut text = String::new();
        host.read_to_string(&mut text).await.unwrap();
        assert!(text.starts_with("ERR connect 127.0.0.1:1"), "{text}");

        // No permits left: refused at once.
        let none = Arc::new(Semaphore::new(0));
        let (mut host, guest) = tokio::io::duplex(1024);
        tokio::spawn(serve_connection(guest, none));
        let mut text = String::new();
        host.read_to_string(&mut text).await.unwrap();
        assert_eq!(text, "ERR too many forwarded connections\n");
    }
}
