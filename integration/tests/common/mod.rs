//! What the CRI test files share: a node per test on its own pod network, the
//! prerequisites of each runtime handler, and waiting on a condition with a deadline.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cocoon_integration::cri::{self, CriNode};
use cocoon_integration::image_dir;
use cocoon_nested::testing::missing;

pub struct Env {
    pub node: CriNode,
    pub dir: tempfile::TempDir,
}

/// Why `handler`'s pods cannot run here, if they cannot.
pub fn prerequisites_missing(handler: &str) -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (network namespaces, CNI, runc)".into());
    }
    let path = cocoon_integration::containerd::tool_path();
    let on_path = |bin: &str| path.split(':').any(|d| Path::new(d).join(bin).is_file());
    for (bin, package) in [
        ("containerd", "containerd"),
        ("ctr", "containerd"),
        ("runc", "runc"),
    ] {
        if !on_path(bin) {
            return Some(format!("{bin} not on PATH (apt-get install {package})"));
        }
    }
    if !Path::new("/bin/busybox").is_file() {
        return Some("no /bin/busybox for the test images (apt-get install busybox-static)".into());
    }
    if let Some(why) = cri::cni_missing() {
        return Some(why);
    }
    if handler == cri::COCOON && !image_dir().join("vmlinuz").is_file() {
        return Some(format!(
            "guest image not found in {}: run `make image`",
            image_dir().display()
        ));
    }
    None
}

/// A CRI node for `test` on pod network `net`, or None (after `missing`) when this host
/// cannot run `handler`'s pods: under CI=true that fails the test.
pub async fn env(test: &str, handler: &str, net: u8) -> Option<Env> {
    env_with(test, handler, net, false).await
}

/// As `env`; with `ipv6`, a dual-stack pod network.
pub async fn env_with(test: &str, handler: &str, net: u8, ipv6: bool) -> Option<Env> {
    env_full(test, handler, net, ipv6, "").await
}

/// As `env_with`; `tables` are added to the cocoon shim's config.
pub async fn env_full(test: &str, handler: &str, net: u8, ipv6: bool, tables: &str) -> Option<Env> {
    env_vm(test, handler, net, ipv6, "", tables).await
}

/// As `env_full`; `vm_keys` are added to the cocoon shim config's `[vm]` table.
pub async fn env_vm(
    test: &str,
    handler: &str,
    net: u8,
    ipv6: bool,
    vm_keys: &str,
    tables: &str,
) -> Option<Env> {
    if let Some(why) = prerequisites_missing(handler) {
        missing(test, &why);
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let config_path = cocoon_config(dir.path(), handler, vm_keys, tables);
    let node = CriNode::start_with(&dir.path().join("containerd"), &config_path, net, ipv6).await;
    Some(Env { node, dir })
}

/// The shim's COCOON_CONFIG. runc pods never read it, so for them it need not name a
/// guest image that exists.
fn cocoon_config(dir: &Path, handler: &str, vm_keys: &str, tables: &str) -> PathBuf {
    if handler == cri::COCOON {
        return cri::write_shim_config_vm(dir, Duration::from_secs(90), vm_keys, tables);
    }
    let path = dir.join("cocoon.toml");
    let toml = format!("[paths]\nrun_dir = {:?}\n", dir.join("run"));
    std::fs::write(&path, toml).unwrap();
    path
}

/// Connects to `addr` and reads its whole reply, again every 50 ms until a reply is
/// not empty or `limit` passes (a server listens a moment after its container starts;
/// a guest address goes through duplicate address detection first). The last
/// attempt's result.
pub async fn reply_from(addr: std::net::SocketAddr, limit: Duration) -> std::io::Result<String> {
    use std::io::Read;
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + limit;
        loop {
            let attempt = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .and_then(|mut s| {
                    s.set_read_timeout(Some(Duration::from_secs(5)))?;
                    let mut reply = String::new();
                    s.read_to_string(&mut reply)?;
                    Ok(reply)
                })
                // An empty reply: connected before the server's program ran.
                .and_then(|r| match r.is_empty() {
                    true => Err(std::io::Error::other("empty reply")),
                    false => Ok(r),
                });
            if attempt.is_ok() || Instant::now() >= deadline {
                return attempt;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

/// Polls `check` until it holds or `limit` passes; returns whether it held.
pub async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn alive(pid: u32) -> bool {
    pid != 0 && cocoon_integration::alive(pid)
}
