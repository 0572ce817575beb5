//! `PortForward` for pods in VMs. containerd's CRI plugin serves a port-forward by
//! entering the pod's network namespace on the host and dialing `localhost:<port>` there
//! (tcp4). With a VM, nothing listens in that namespace: the pod's servers are in the
//! guest. VM runtimes commonly fail here; we make it work as with runc:
//!
//! 1. In the pod namespace, a listener on an ephemeral loopback port, and an nftables NAT
//!    rule (table `cocoon_portfwd`) redirecting every other loopback TCP connection made
//!    in that namespace to it. Only containerd's port-forward makes such connections.
//! 2. For each connection, the original port (`SO_ORIGINAL_DST`) goes to the agent over
//!    vsock (`cocoon_protocol::FORWARD_PORT`), which connects to it on the pod's loopback
//!    in the guest, so servers bound to 127.0.0.1 are reached too, as under runc.
//!
//! The guest is untrusted: its reply line is bounded and has a deadline, and the
//! connections forwarded at once per pod are limited.

use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

use crate::podnet::PodNetError;

/// The nftables table in the pod namespace.
pub const NFT_TABLE: &str = "cocoon_portfwd";
/// Connections forwarded at once per pod; more wait for a free slot.
const MAX_FORWARDS: usize = 64;
/// How long the guest may take to connect to the pod's server and say so.
const GUEST_DEADLINE: Duration = Duration::from_secs(15);
/// Longest acceptable reply line from the agent.
const MAX_REPLY: usize = 256;

/// The ruleset redirecting loopback TCP (other than to `port` itself) to `port`.
pub fn ruleset(port: u16) -> String {
    format!(
        "table ip {NFT_TABLE} {{\n  chain output {{\n    type nat hook output priority -100;\n    \
         ip daddr 127.0.0.1 tcp dport != {port} redirect to :{port}\n  }}\n}}\n"
    )
}

/// In the calling thread's (pod) namespace: binds the listener and installs the redirect.
pub(crate) fn install() -> Result<TcpListener, PodNetError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(PodNetError::Forward)?;
    let port = listener.local_addr().map_err(PodNetError::Forward)?.port();
    let nft = crate::podnet::tool("nft");
    let mut child = std::process::Command::new(&nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| PodNetError::Spawn(nft.clone(), e))?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        stdin
            .write_all(ruleset(port).as_bytes())
            .map_err(|e| PodNetError::Spawn(nft.clone(), e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| PodNetError::Spawn(nft, e))?;
    if !out.status.success() {
        return Err(PodNetError::Command {
            command: format!("nft -f - (table {NFT_TABLE})"),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(listener)
}

/// In the calling thread's (pod) namespace: removes the redirect.
pub(crate) fn uninstall() {
    let _ = std::process::Command::new(crate::podnet::tool("nft"))
        .args(["delete", "table", "ip", NFT_TABLE])
        .stderr(Stdio::null())
        .status();
}

/// The port a redirected connection was made to.
fn original_port(conn: &tokio::net::TcpStream) -> std::io::Result<u16> {
    // SAFETY: a zeroed sockaddr_in is a valid value to be overwritten.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: SO_ORIGINAL_DST writes at most `len` bytes of a sockaddr_in into `addr`.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_IP,
            libc::SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(u16::from_be(addr.sin_port))
}

/// Serves redirected connections until the task is aborted (with the sandbox).
pub fn spawn(listener: TcpListener, vsock_uds: PathBuf) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let listener = match listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(listener))
        {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("port-forward listener unusable: {e}");
                return;
            }
        };
        let slots = Arc::new(Semaphore::new(MAX_FORWARDS));
        loop {
            let (conn, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("port-forward accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let uds = vsock_uds.clone();
            tokio::spawn(async move {
                if let Err(e) = forward(conn, &uds).await {
                    tracing::warn!(%peer, "port-forward failed: {e}");
                }
                drop(slot);
            });
        }
    })
}

async fn forward(mut conn: tokio::net::TcpStream, uds: &std::path::Path) -> Result<(), String> {
    let mut guest = match connect_guest(&conn, uds).await {
        Ok(g) => g,
        Err(e) => {
            // containerd has already connected: a reset (not a clean close) is how it
            // learns that the pod's port refused, and it says so on the stream's error
            // channel, as it does for a runc pod whose port is closed.
            // Deprecated for lingering closes that block the thread; a zero linger never
            // blocks: the close sends the reset at once.
            #[allow(deprecated)]
            let _ = conn.set_linger(Some(Duration::ZERO));
            return Err(e);
        }
    };
    let _ = tokio::io::copy_bidirectional(&mut conn, &mut guest).await;
    Ok(())
}

/// Asks the agent to connect to the port `conn` was made to, inside the guest.
async fn connect_guest(
    conn: &tokio::net::TcpStream,
    uds: &std::path::Path,
) -> Result<tokio::net::UnixStream, String> {
    let port = original_port(conn).map_err(|e| format!("no original destination: {e}"))?;
    let mut guest = crate::vsock::connect(uds, cocoon_protocol::FORWARD_PORT, GUEST_DEADLINE)
        .await
        .map_err(|e| format!("port {port}: {e}"))?;
    guest
        .write_all(format!("TCP {port}\n").as_bytes())
        .await
        .map_err(|e| format!("port {port}: {e}"))?;
    let reply = tokio::time::timeout(GUEST_DEADLINE, read_line(&mut guest))
        .await
        .map_err(|_| format!("port {port}: the guest did not answer in {GUEST_DEADLINE:?}"))?
        .map_err(|e| format!("port {port}: {e}"))?;
    if reply != "OK" {
        return Err(format!(
            "port {port}: the guest refused: {}",
            crate::agent_reply::escape_controls(&reply)
        ));
    }
    tracing::debug!(port, "forwarding into the pod");
    Ok(guest)
}

/// One line, byte by byte (what follows belongs to the forwarded stream), at most
/// `MAX_REPLY` bytes, without its newline.
async fn read_line(s: &mut tokio::net::UnixStream) -> Result<String, String> {
    let mut line = Vec::new();
    loop {
        let b = s.read_u8().await.map_err(|e| e.to_string())?;
        if b == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(b);
        if line.len() > MAX_REPLY {
            return Err("the guest's reply line is too long".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_spares_its_own_port() {
        let r = ruleset(40123);
        assert!(r.contains(&format!("table ip {NFT_TABLE}")));
        assert!(r.contains("type nat hook output priority -100;"));
        assert!(r.contains("ip daddr 127.0.0.1 tcp dport != 40123 redirect to :40123"));
    }
}
