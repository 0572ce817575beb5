//! The pod as a whole: CreateSandbox prepares the guest for containers (the
//! shared filesystem, hostname, DNS); DestroySandbox undoes it.

use std::path::Path;
use std::time::Duration;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use thiserror::Error;

use crate::handlers::AgentState;

/// Where the host's shared directory (container rootfs, bind sources) lives.
pub const SHARED_DIR: &str = "/run/cocoon/shared";
/// How long CreateSandbox waits for the deferred kernel modules.
const MODULES_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum SandboxError {
    #[error("kernel modules (virtiofs, overlay, ...) still loading after {0:?}")]
    ModulesTimeout(Duration),
    #[error("loading kernel modules failed: {0}")]
    Modules(String),
    #[error("cannot create {0}")]
    MountPoint(&'static str, #[source] std::io::Error),
    #[error("cannot mount virtio-fs tag {0:?} on {SHARED_DIR}")]
    Mount(String, #[source] nix::Error),
    #[error("cannot set the hostname")]
    Hostname(#[source] nix::Error),
    #[error("cannot write /etc/resolv.conf")]
    Dns(#[source] std::io::Error),
}

/// resolv.conf text for the given nameservers.
pub fn resolv_conf(nameservers: &[String]) -> String {
    nameservers
        .iter()
        .map(|n| format!("nameserver {n}\n"))
        .collect()
}

/// Waits (bounded) for the deferred kernel modules: filesystems such as
/// virtiofs and overlay are among them.
pub async fn wait_modules(state: &AgentState) -> Result<(), SandboxError> {
    let mut rx = state.modules_done.subscribe();
    let own = tokio::time::Instant::now() + MODULES_DEADLINE;
    let deadline = crate::container::CALL_DEADLINE
        .try_with(|d| (*d).min(own))
        .unwrap_or(own);
    let outcome = match tokio::time::timeout_at(deadline, rx.wait_for(|v| v.is_some())).await {
        Err(_) | Ok(Err(_)) => return Err(SandboxError::ModulesTimeout(MODULES_DEADLINE)),
        Ok(Ok(v)) => v.clone(),
    };
    match outcome {
        Some(Err(e)) => Err(SandboxError::Modules(e)),
        _ => Ok(()),
    }
}

pub async fn create(
    state: &AgentState,
    hostname: &str,
    dns: &[String],
    shared_fs_tag: &str,
) -> Result<(), SandboxError> {
    wait_modules(state).await?;
    if !state.is_init {
        // The dev mode shares the host's namespaces: leave them alone.
        tracing::warn!("not PID 1: shared fs, hostname and DNS are not touched");
        return Ok(());
    }
    if !shared_fs_tag.is_empty() {
        std::fs::create_dir_all(SHARED_DIR).map_err(|e| SandboxError::MountPoint(SHARED_DIR, e))?;
        match mount(
            Some(shared_fs_tag),
            SHARED_DIR,
            Some("virtiofs"),
            MsFlags::empty(),
            None::<&str>,
        ) {
            Ok(()) | Err(nix::Error::EBUSY) => {}
            Err(e) => return Err(SandboxError::Mount(shared_fs_tag.into(), e)),
        }
    }
    mount_pod_shm()?;
    if !hostname.is_empty() {
        nix::unistd::sethostname(hostname).map_err(SandboxError::Hostname)?;
    }
    if !dns.is_empty() {
        std::fs::create_dir_all("/etc").map_err(|e| SandboxError::MountPoint("/etc", e))?;
        std::fs::write("/etc/resolv.conf", resolv_conf(dns)).map_err(SandboxError::Dns)?;
    }
    Ok(())
}

/// How long a container's shared root and volumes may take to show as the mounts the
/// host made.
const SHARED_ROOT_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// The directories of `spec_json` that the host mounted in the pod share before it
/// asked for the container: its root, when shared, and each directory volume
/// (`<SHARED_DIR>/<id>/mounts/<n>`). Files (kubelet's `/etc/hosts`) are left out: a
/// file bind mount need not show a device of its own.
fn shared_mounts(spec: &serde_json::Value, shared_dir: &Path) -> Vec<std::path::PathBuf> {
    use std::path::PathBuf;
    let shared = |p: &PathBuf| p.is_absolute() && p.starts_with(shared_dir);
    let root = spec
        .get("root")
        .and_then(|r| r.get("path")?.as_str())
        .map(PathBuf::from)
        .filter(shared);
    let volumes = spec
        .get("mounts")
        .and_then(|m| m.as_array())
        .into_iter()
        .flatten()
        .filter(|m| m.get("type").and_then(|t| t.as_str()) == Some("bind"))
        .filter_map(|m| m.get("source")?.as_str().map(PathBuf::from))
        .filter(|p| {
            shared(p)
                && p.parent().and_then(|d| d.file_name()) == Some("mounts".as_ref())
                && p.is_dir()
        });
    root.into_iter().chain(volumes).collect()
}

/// Waits until a container's root and volumes shared from the host (`shared_mounts`)
/// show in the guest as the filesystems the host mounted there (each its own device,
/// virtiofsd announcing submounts), bounded. The host mounts them before it asks for
/// the container, but the guest's virtio-fs keeps a lookup for a second (`--cache
/// auto`): a guest process that looked at a path between the host's mkdir and its
/// mount (a hostile one racing the shim did, in `hostile_race.rs`) leaves the bare
/// mount point cached, and the container was then made on that read-only directory
/// ("cannot create .../rootfs/proc: Read-only file system"; an rw volume that was
/// read-only). Returns at once when nothing is shared or all are mounted; after the
/// bound, the create goes on and reports what it finds. `spec` is `None` when it did
/// not parse: the create reports that.
pub async fn wait_shared_mounts(spec: Option<&serde_json::Value>) {
    let Some(spec) = spec else { return };
    let points = shared_mounts(spec, Path::new(SHARED_DIR));
    if points.is_empty() {
        return;
    }
    let mounted = move || -> bool {
        use std::os::unix::fs::MetadataExt;
        points.iter().all(|point| {
            let Some(parent) = point.parent() else {
                return true;
            };
            // `point/.`: stat inside it, so that virtio-fs crosses into the announced
            // submount (the automount) rather than answer for the mount point itself.
            match (
                std::fs::metadata(point.join(".")),
                std::fs::metadata(parent),
            ) {
                (Ok(r), Ok(p)) => r.dev() != p.dev(),
                // Not there: nothing to wait for; the create says so.
                _ => true,
            }
        })
    };
    let deadline = std::time::Instant::now() + SHARED_ROOT_WAIT;
    let mut waited = false;
    loop {
        let check = mounted.clone();
        if tokio::task::spawn_blocking(check).await.unwrap_or(true) {
            if waited {
                tracing::info!("a container's shared mounts showed after a stale lookup");
            }
            return;
        }
        if std::time::Instant::now() >= deadline {
            tracing::warn!("a container's shared mounts still show as bare mount points");
            return;
        }
        waited = true;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The tmpfs a pod's containers share as `/dev/shm` (see `GUEST_POD_SHM`).
fn mount_pod_shm() -> Result<(), SandboxError> {
    use cocoon_protocol::{GUEST_POD_SHM, GUEST_POD_SHM_SIZE};
    std::fs::create_dir_all(GUEST_POD_SHM)
        .map_err(|e| SandboxError::MountPoint(GUEST_POD_SHM, e))?;
    match mount(
        Some("shm"),
        GUEST_POD_SHM,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(format!("mode=1777,size={GUEST_POD_SHM_SIZE}").as_str()),
    ) {
        Ok(()) | Err(nix::Error::EBUSY) => Ok(()),
        Err(e) => Err(SandboxError::Mount("pod shm".into(), e)),
    }
}

pub async fn destroy(state: &AgentState) {
    state.containers.remove_all(Duration::from_secs(10)).await;
    if state.is_init && Path::new(SHARED_DIR).exists() {
        match umount2(SHARED_DIR, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
            Err(e) => tracing::warn!("cannot unmount {SHARED_DIR}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_lists_nameservers() {
        assert_eq!(
            resolv_conf(&["10.0.0.1".into(), "1.1.1.1".into()]),
            "nameserver 10.0.0.1\nnameserver 1.1.1.1\n"
        );
    }

    #[test]
    fn the_shared_root_and_directory_volumes_are_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let share = dir.path().join("shared");
        std::fs::create_dir_all(share.join("c1/mounts/0")).unwrap();
        std::fs::write(share.join("c1/mounts/1"), "").unwrap();
        std::fs::create_dir_all(dir.path().join("elsewhere/mounts/0")).unwrap();
        let at = |p: &str| format!("{}/{p}", dir.path().display());
        let spec = serde_json::json!({
            "root": {"path": at("shared/c1/rootfs")},
            "mounts": [
                {"destination": "/data", "type": "bind", "source": at("shared/c1/mounts/0")},
                {"destination": "/etc/hosts", "type": "bind", "source": at("shared/c1/mounts/1")},
                {"destination": "/other", "type": "bind", "source": at("elsewhere/mounts/0")},
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/gone", "type": "bind", "source": at("shared/c1/mounts/2")},
            ]
        });
        let found = shared_mounts(&spec, &share);
        assert_eq!(
            found,
            [share.join("c1/rootfs"), share.join("c1/mounts/0")],
            "the root, and only directory volumes in the share"
        );
        let pulled = serde_json::json!({"root": {"path": "/run/cocoon/pulled/c1/rootfs"}});
        assert!(shared_mounts(&pulled, &share).is_empty());
        assert!(shared_mounts(&serde_json::json!("not a spec"), &share).is_empty());
    }
}
