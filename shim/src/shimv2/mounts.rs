//! What a container's filesystem looks like from the host: its rootfs (the
//! snapshot containerd prepared) and the sources of its bind mounts, mounted
//! under the pod's share directory, which virtiofsd exports to the guest.
//! The OCI spec is rewritten to the guest's view of those paths. Read-only
//! mounts are read-only on the host side too, so a hostile guest cannot write
//! through virtio-fs what the spec made read-only.

use std::path::{Path, PathBuf};

use containerd_shim::protos::api::Mount as RootfsMount;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use oci_spec::runtime::{Mount, Spec};
use thiserror::Error;

/// Where the guest agent mounts the pod's virtio-fs share.
pub const GUEST_SHARE: &str = "/run/cocoon/shared";

#[derive(Debug, Error)]
pub enum MountError {
    #[error("cannot create {0}")]
    Mkdir(PathBuf, #[source] std::io::Error),
    #[error("cannot mount the container rootfs at {target}: {detail}")]
    Rootfs { target: PathBuf, detail: String },
    #[error("bind mount source {0} does not exist")]
    MissingSource(PathBuf),
    #[error("cannot bind {source_path} to {target}")]
    Bind {
        source_path: PathBuf,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot make the share directory {0} a shared mount")]
    Share(PathBuf, #[source] nix::Error),
    #[error("the OCI spec has no root")]
    NoRoot,
}

/// Mounts made for one container, innermost last (unmounted in reverse).
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct ContainerMounts {
    pub dir: PathBuf,
    pub mounted: Vec<PathBuf>,
}

impl ContainerMounts {
    /// Unmounts everything (lazily, so a busy mount cannot block cleanup)
    /// and removes the container's directory in the share.
    pub fn cleanup(&mut self) {
        while let Some(m) = self.mounted.pop() {
            if let Err(e) = umount2(&m, MntFlags::MNT_DETACH) {
                if e != nix::Error::EINVAL && e != nix::Error::ENOENT {
                    tracing::warn!("cannot unmount {}: {e}", m.display());
                }
            }
        }
        if !self.dir.as_os_str().is_empty() {
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("cannot remove {}: {e}", self.dir.display());
                }
            }
        }
    }
}

/// Makes `share` a mount point with shared propagation, so mounts made under
/// it after virtiofsd started (in its own mount namespace, as a slave) still
/// reach virtiofsd.
pub fn make_share(share: &Path) -> Result<(), MountError> {
    std::fs::create_dir_all(share).map_err(|e| MountError::Mkdir(share.into(), e))?;
    mount(
        Some(share),
        share,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| MountError::Share(share.into(), e))?;
    mount(
        None::<&str>,
        share,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .map_err(|e| MountError::Share(share.into(), e))?;
    Ok(())
}

pub fn unmount_share(share: &Path) {
    let _ = umount2(share, MntFlags::MNT_DETACH);
    let _ = std::fs::remove_dir_all(share);
}

fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

fn has_opt(m: &Mount, opt: &str) -> bool {
    m.options()
        .as_ref()
        .is_some_and(|o| o.iter().any(|x| x == opt))
}

/// Mounts the container's rootfs and bind sources under `<share>/<id>/` and
/// rewrites `spec` to the guest paths. On error, what was mounted is undone.
pub fn prepare(
    share: &Path,
    id: &str,
    bundle: &Path,
    rootfs: &[RootfsMount],
    spec: &mut Spec,
) -> Result<ContainerMounts, MountError> {
    let mut done = ContainerMounts {
        dir: share.join(id),
        mounted: Vec::new(),
    };
    match prepare_inner(&mut done, id, bundle, rootfs, spec) {
        Ok(()) => Ok(done),
        Err(e) => {
            done.cleanup();
            Err(e)
        }
    }
}

fn prepare_inner(
    done: &mut ContainerMounts,
    id: &str,
    bundle: &Path,
    rootfs: &[RootfsMount],
    spec: &mut Spec,
) -> Result<(), MountError> {
    let dir = done.dir.clone();
    let target = dir.join("rootfs");
    std::fs::create_dir_all(&target).map_err(|e| MountError::Mkdir(target.clone(), e))?;
    let readonly = spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false);
    if rootfs.is_empty() {
        // No snapshot mounts: the bundle's rootfs directory is the rootfs.
        let root = spec.root().as_ref().ok_or(MountError::NoRoot)?;
        let src = if root.path().is_absolute() {
            root.path().clone()
        } else {
            bundle.join(root.path())
        };
        bind(&src, &target, true, readonly)?;
    } else {
        for m in rootfs {
            let fstype = Some(m.type_.as_str()).filter(|s| !s.is_empty());
            let source = Some(m.source.as_str()).filter(|s| !s.is_empty());
            containerd_shim::mount::mount_rootfs(fstype, source, &m.options, &target).map_err(
                |e| MountError::Rootfs {
                    target: target.clone(),
                    detail: e.to_string(),
                },
            )?;
        }
        if readonly {
            remount_ro(&target)?;
        }
    }
    done.mounted.push(target);
    let guest_dir = format!("{GUEST_SHARE}/{id}");
    if let Some(root) = spec.root_mut() {
        root.set_path(PathBuf::from(format!("{guest_dir}/rootfs")));
    }

    let mut mounts: Vec<Mount> = spec.mounts().clone().unwrap_or_default();
    for (i, m) in mounts.iter_mut().enumerate() {
        if !is_bind(m) {
            continue;
        }
        let Some(src) = m.source().clone() else {
            continue;
        };
        if !src.exists() {
            return Err(MountError::MissingSource(src));
        }
        let target = dir.join("mounts").join(i.to_string());
        let parent = target.parent().expect("has a parent");
        std::fs::create_dir_all(parent).map_err(|e| MountError::Mkdir(parent.into(), e))?;
        if src.is_dir() {
            std::fs::create_dir_all(&target).map_err(|e| MountError::Mkdir(target.clone(), e))?;
        } else {
            std::fs::write(&target, b"").map_err(|e| MountError::Mkdir(target.clone(), e))?;
        }
        bind(&src, &target, has_opt(m, "rbind"), has_opt(m, "ro"))?;
        done.mounted.push(target);
        m.set_source(Some(PathBuf::from(format!("{guest_dir}/mounts/{i}"))));
        m.set_typ(Some("bind".into()));
    }
    spec.set_mounts(Some(mounts));
    // Host hooks cannot run in the guest, and host cgroup paths mean nothing
    // there: the agent places the container in its own cgroup.
    spec.set_hooks(None);
    if let Some(linux) = spec.linux_mut() {
        linux.set_cgroups_path(None);
    }
    Ok(())
}

fn bind(src: &Path, target: &Path, recursive: bool, readonly: bool) -> Result<(), MountError> {
    let mut flags = MsFlags::MS_BIND;
    if recursive {
        flags |= MsFlags::MS_REC;
    }
    mount(Some(src), target, None::<&str>, flags, None::<&str>).map_err(|source| {
        MountError::Bind {
            source_path: src.into(),
            target: target.into(),
            source,
        }
    })?;
    if readonly {
        remount_ro(target)?;
    }
    Ok(())
}

fn remount_ro(target: &Path) -> Result<(), MountError> {
    let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    mount(None::<&str>, target, None::<&str>, flags, None::<&str>).map_err(|source| {
        MountError::Bind {
            source_path: target.into(),
            target: target.into(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with(mounts: serde_json::Value) -> Spec {
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs", "readonly": false},
            "mounts": mounts,
            "linux": {"cgroupsPath": "/default/x"},
            "hooks": {"prestart": [{"path": "/bin/true"}]}
        }))
        .unwrap()
    }

    #[test]
    fn rootfs_and_binds_are_mounted_and_rewritten() {
        if !nix::unistd::geteuid().is_root() {
            cocoon_nested::testing::missing("mounts", "mounting needs root");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let bundle = t.path().join("bundle");
        std::fs::create_dir_all(bundle.join("rootfs/etc")).unwrap();
        std::fs::write(bundle.join("rootfs/etc/hostname"), "x").unwrap();
        let data = t.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("f"), "hello").unwrap();
        let share = t.path().join("share");
        let mut spec = spec_with(serde_json::json!([
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/data", "type": "bind", "source": data, "options": ["rbind", "ro"]},
            {"destination": "/f", "source": data.join("f"), "options": ["bind", "rw"]}
        ]));
        let mut m = prepare(&share, "c1", &bundle, &[], &mut spec).unwrap();
        assert_eq!(
            spec.root().as_ref().unwrap().path(),
            Path::new("/run/cocoon/shared/c1/rootfs")
        );
        assert!(share.join("c1/rootfs/etc/hostname").exists());
        let mounts = spec.mounts().as_ref().unwrap();
        assert_eq!(mounts[0].source().as_deref(), Some(Path::new("proc")));
        assert_eq!(
            mounts[1].source().as_deref(),
            Some(Path::new("/run/cocoon/shared/c1/mounts/1"))
        );
        assert_eq!(
            mounts[2].source().as_deref(),
            Some(Path::new("/run/cocoon/shared/c1/mounts/2"))
        );
        assert_eq!(
            std::fs::read_to_string(share.join("c1/mounts/1/f")).unwrap(),
            "hello"
        );
        // Read-only on the host side too.
        let err = std::fs::write(share.join("c1/mounts/1/new"), "x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS));
        std::fs::write(share.join("c1/mounts/2"), "changed").unwrap();
        assert_eq!(std::fs::read_to_string(data.join("f")).unwrap(), "changed");
        assert!(spec.hooks().is_none());
        assert!(spec.linux().as_ref().unwrap().cgroups_path().is_none());
        m.cleanup();
        assert!(!share.join("c1").exists());
        assert_eq!(std::fs::read_to_string(data.join("f")).unwrap(), "changed");
    }

    #[test]
    fn missing_bind_source_is_named_and_undone() {
        if !nix::unistd::geteuid().is_root() {
            cocoon_nested::testing::missing("mounts", "mounting needs root");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let bundle = t.path().join("bundle");
        std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
        let share = t.path().join("share");
        let mut spec = spec_with(serde_json::json!([
            {"destination": "/x", "type": "bind", "source": "/nonexistent/src", "options": ["rbind"]}
        ]));
        let err = prepare(&share, "c2", &bundle, &[], &mut spec).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/src"), "{err}");
        assert!(
            !share.join("c2").exists(),
            "a failed prepare leaves nothing"
        );
    }
}
