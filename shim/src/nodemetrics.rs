//! `cocoon metrics`: the node's view, in Prometheus' text format. Collects each running
//! pod's exposition from its shim's socket (`shimv2::podmetrics`), adds the node's own
//! families, and prints it once or serves it over HTTP for a scraper.
//!
//! The HTTP side is a few lines of our own: one route, GET only, bounded request size and
//! time; a web framework would be most of the binary for that.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::shimv2::podmetrics::SOCKET;
use crate::telemetry::{family, merge};

/// How long one pod's shim may take to answer.
const POD_DEADLINE: Duration = Duration::from_secs(2);
/// The most taken from one pod.
const POD_MAX_BYTES: u64 = 4 * 1024 * 1024;
/// A scraper's request head: at most this big, within this time.
const REQUEST_MAX_BYTES: usize = 8 * 1024;
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// One pod's exposition, from its shim.
async fn scrape(sock: &Path) -> Result<String, String> {
    let read = async {
        let conn = tokio::net::UnixStream::connect(sock)
            .await
            .map_err(|e| e.to_string())?;
        let mut text = String::new();
        conn.take(POD_MAX_BYTES)
            .read_to_string(&mut text)
            .await
            .map_err(|e| e.to_string())?;
        Ok(text)
    };
    tokio::time::timeout(POD_DEADLINE, read)
        .await
        .map_err(|_| format!("no answer within {POD_DEADLINE:?}"))?
}

/// The node's exposition: every pod under `run_root`, then the node's own families.
pub async fn collect(run_root: &Path) -> String {
    let mut texts = Vec::new();
    let (mut pods, mut errors) = (0u64, 0u64);
    let mut dirs: Vec<_> = std::fs::read_dir(run_root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    dirs.sort();
    for dir in dirs {
        let sock = dir.join(SOCKET);
        if !sock.exists() {
            continue;
        }
        match scrape(&sock).await {
            Ok(t) => {
                pods += 1;
                texts.push(t);
            }
            Err(e) => {
                errors += 1;
                tracing::warn!("cannot read {}: {e}", sock.display());
            }
        }
    }
    let failed_kept = std::fs::read_dir(run_root.join(crate::consolelog::FAILED_DIR))
        .map(|d| d.count())
        .unwrap_or(0);
    let mut node = String::new();
    family(
        &mut node,
        "cocoon_node_pods",
        "gauge",
        "Pods running on this node whose shim answered.",
    );
    let _ = writeln!(node, "cocoon_node_pods {pods}");
    family(
        &mut node,
        "cocoon_node_scrape_errors",
        "gauge",
        "Pods whose shim did not answer this scrape.",
    );
    let _ = writeln!(node, "cocoon_node_scrape_errors {errors}");
    family(
        &mut node,
        "cocoon_node_failed_pods_kept",
        "gauge",
        "Failed pods whose guest console is kept for `cocoon logs`.",
    );
    let _ = writeln!(node, "cocoon_node_failed_pods_kept {failed_kept}");
    family(&mut node, "cocoon_build_info", "gauge", "Cocoon's version.");
    let _ = writeln!(
        node,
        "cocoon_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    texts.push(node);
    merge(&texts)
}

/// What a request head asks for: the path of a GET, or why it is refused.
pub fn parse_request(head: &[u8]) -> Result<String, (u16, &'static str)> {
    let text = std::str::from_utf8(head).map_err(|_| (400, "Bad Request"))?;
    let line = text.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("GET"), Some(path), Some(v)) if v.starts_with("HTTP/1.") => Ok(path.to_owned()),
        (Some(_), Some(_), Some(v)) if v.starts_with("HTTP/1.") => Err((405, "Method Not Allowed")),
        _ => Err((400, "Bad Request")),
    }
}

async fn answer(mut conn: tokio::net::TcpStream, run_root: &Path) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = conn.read(&mut buf).await.ok()?;
            if n == 0 || head.len() + n > REQUEST_MAX_BYTES {
                return None;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Some(())
    };
    if !matches!(
        tokio::time::timeout(REQUEST_DEADLINE, read).await,
        Ok(Some(()))
    ) {
        return;
    }
    let (status, reason, body, kind) = match parse_request(&head) {
        Ok(p) if p == "/metrics" => (
            200,
            "OK",
            collect(run_root).await,
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        Ok(_) => (404, "Not Found", "try /metrics\n".into(), "text/plain"),
        Err((code, reason)) => (code, reason, format!("{reason}\n"), "text/plain"),
    };
    let reply = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(reply.as_bytes()).await;
    let _ = conn.shutdown().await;
}

/// Serves `GET /metrics` on `listen` until the process ends.
pub async fn serve(listen: &str, run_root: &Path) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    eprintln!(
        "cocoon metrics: serving http://{}/metrics",
        listener.local_addr()?
    );
    loop {
        let (conn, _) = listener.accept().await?;
        let root = run_root.to_path_buf();
        tokio::spawn(async move { answer(conn, &root).await });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_is_served() {
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap(),
            "/metrics"
        );
        assert_eq!(
            parse_request(b"POST /metrics HTTP/1.1\r\n\r\n")
                .unwrap_err()
                .0,
            405
        );
        assert_eq!(parse_request(b"hello\r\n\r\n").unwrap_err().0, 400);
        assert_eq!(parse_request(&[0xff, 0xfe]).unwrap_err().0, 400);
    }

    #[tokio::test]
    async fn an_empty_node_still_has_its_own_families() {
        let root = tempfile::tempdir().unwrap();
        // A dead pod's socket is an error, not a hang.
        let dead = root.path().join("pod-dead");
        std::fs::create_dir_all(&dead).unwrap();
        drop(std::os::unix::net::UnixListener::bind(dead.join(SOCKET)).unwrap());
        let text = collect(root.path()).await;
        assert!(text.contains("cocoon_node_pods 0\n"), "{text}");
        assert!(text.contains("cocoon_node_scrape_errors 1\n"), "{text}");
        assert!(text.contains("# TYPE cocoon_build_info gauge"), "{text}");
    }
}
