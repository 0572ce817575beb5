//! A pod's metrics, served by its shim on `<VM run dir>/metrics.sock` (0600): each
//! connection gets the current exposition, then EOF. `cocoon metrics` collects them
//! from every running pod and serves the node's view.
//!
//! A Unix socket, not a port: nothing off the host can reach it, a pod needs no port
//! of its own, and it goes away with the VM's run directory.

use std::fmt::Write as _;
use std::sync::{Arc, Weak};

use tokio::io::AsyncWriteExt;

use super::sandbox::Sandbox;
use crate::telemetry::{escape, family, process_memory};

/// The socket's name in the VM's run directory.
pub const SOCKET: &str = "metrics.sock";

/// Starts serving `sb`'s metrics; stops once the sandbox is gone.
/// `janitor` is the pod's janitor process (`janitor`), reported with the pod's others.
pub fn spawn(sb: &Arc<Sandbox>, namespace: &str, sandbox_id: &str, janitor: Option<u32>) {
    let path = sb.run_dir.join(SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(
                "no metrics for this pod: cannot listen on {}: {e}",
                path.display()
            );
            return;
        }
    };
    use std::os::unix::fs::PermissionsExt;
    if let Err(e) = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)) {
        tracing::warn!("cannot restrict {}: {e}", path.display());
    }
    let labels = format!(
        "namespace=\"{}\",sandbox=\"{}\",pod=\"{}\"",
        escape(namespace),
        escape(sandbox_id),
        escape(&sb.id)
    );
    let weak: Weak<Sandbox> = Arc::downgrade(sb);
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let Some(sb) = weak.upgrade() else {
                return;
            };
            let text = render(&sb, &labels, janitor);
            drop(sb);
            tokio::spawn(async move {
                let _ = conn.write_all(text.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
}

/// The pod's exposition: its VM's boot stages, size, state, host processes' memory,
/// then what the shim counted.
pub fn render(sb: &Sandbox, labels: &str, janitor: Option<u32>) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "cocoon_pod_boot_seconds",
        "gauge",
        "Time of each stage of the pod VM's boot (vm_launch, agent_ready, sandbox_setup).",
    );
    for (stage, d) in [
        ("vm_launch", sb.boot.vm_launch),
        ("agent_ready", sb.boot.agent_ready),
        ("sandbox_setup", sb.boot.sandbox_setup),
    ] {
        let _ = writeln!(
            out,
            "cocoon_pod_boot_seconds{{{labels},stage=\"{stage}\"}} {}",
            d.as_secs_f64()
        );
    }
    family(
        &mut out,
        "cocoon_pod_guest_memory_bytes",
        "gauge",
        "The pod VM's guest RAM: as launched, and plugged since (hotplug_memory).",
    );
    let _ = writeln!(
        out,
        "cocoon_pod_guest_memory_bytes{{{labels}}} {}",
        u64::from(sb.memory_now_mib()) * 1024 * 1024
    );
    family(
        &mut out,
        "cocoon_pod_vcpus",
        "gauge",
        "The pod VM's vCPUs online.",
    );
    let _ = writeln!(out, "cocoon_pod_vcpus{{{labels}}} {}", sb.online_vcpus());
    family(
        &mut out,
        "cocoon_pod_vm_lost",
        "gauge",
        "1 once a host process of the pod's VM has died (the pod is failing), else 0.",
    );
    let _ = writeln!(
        out,
        "cocoon_pod_vm_lost{{{labels}}} {}",
        u8::from(sb.lost().is_some())
    );
    family(
        &mut out,
        "cocoon_pod_process_memory_bytes",
        "gauge",
        "Host memory of the pod's processes (shim, its janitor, VMM, virtiofsd, vsock backend): PSS and RSS.",
    );
    let procs = std::iter::once(std::process::id())
        .chain(janitor)
        .chain(sb.pids.iter().copied());
    for pid in procs {
        let Some((pss, rss)) = process_memory(pid) else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let l = format!("{labels},process=\"{}\",pid=\"{pid}\"", escape(comm.trim()));
        let _ = writeln!(
            out,
            "cocoon_pod_process_memory_bytes{{{l},kind=\"pss\"}} {pss}"
        );
        let _ = writeln!(
            out,
            "cocoon_pod_process_memory_bytes{{{l},kind=\"rss\"}} {rss}"
        );
    }
    sb.stats.render(labels, &mut out);
    out
}
