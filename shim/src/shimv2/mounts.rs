//! What a container's filesystem looks like from the host: its rootfs (the
//! snapshot containerd prepared) and the sources of its bind mounts, mounted
//! in the pod's host directory, whose read-only view virtiofsd exports to the
//! guest (see `share`). The OCI spec is rewritten to the guest's view of those
//! paths. Read-only volumes are read-only on the host side too, all the way down
//! (nested mounts included), so a hostile guest cannot write through virtio-fs
//! host data the spec made read-only.

use std::path::{Path, PathBuf};

use containerd_shim::protos::api::Mount as RootfsMount;
use nix::mount::{umount2, MntFlags};
use oci_spec::runtime::{Mount, Spec};
use thiserror::Error;

use super::overlay;
use super::share::Beneath;
use crate::hypervisor::userns::PodUserns;
use std::sync::Arc;

/// Where the guest agent mounts the pod's virtio-fs share.
pub const GUEST_SHARE: &str = "/run/cocoon/shared";

#[derive(Debug, Error)]
pub enum MountError {
    #[error("cannot create {0}")]
    Mkdir(PathBuf, #[source] std::io::Error),
    #[error("cannot make {0} traversable for the container's user namespace")]
    Traversable(PathBuf, #[source] std::io::Error),
    #[error("cannot mount the container rootfs at {target}: {detail}")]
    Rootfs { target: PathBuf, detail: String },
    #[error("bind mount source {0} does not exist")]
    MissingSource(PathBuf),
    #[error("cannot bind {source_path} to {target}")]
    Bind {
        source_path: PathBuf,
        target: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("container id {0:?} cannot name a directory")]
    BadId(String),
    #[error("cannot make the share directory {0} a shared mount")]
    Share(PathBuf, #[source] std::io::Error),
    #[error("the OCI spec has no root")]
    NoRoot,
    #[error(
        "cannot follow the host's mounts beneath {0} (the volume's propagation asks for them): {1}"
    )]
    Propagation(PathBuf, String),
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
        super::propagation::forget(&self.dir);
        while let Some(m) = self.mounted.pop() {
            if let Err(e) = umount2(&m, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
                if e != nix::Error::EINVAL && e != nix::Error::ENOENT {
                    tracing::warn!("cannot unmount {}: {e}", m.display());
                }
            }
        }
        if !self.dir.as_os_str().is_empty() {
            // Never a recursive delete into a mount that is still there.
            if let Err(e) = super::share::remove_tree_same_fs(&self.dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("cannot remove {}: {e}", self.dir.display());
                }
            }
        }
    }
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

fn is_read_only(m: &Mount) -> bool {
    cocoon_protocol::read_only(m.options().as_deref().unwrap_or_default())
}

/// Where the agent unpacks an image it pulls itself (`GUEST_IMAGE_ANNOTATION`).
pub const GUEST_IMAGES: &str = "/run/cocoon/images";

/// Where a container's root filesystem comes from.
#[derive(Clone, Copy, Debug)]
pub enum Root<'a> {
    /// containerd's snapshot (or the bundle's rootfs), shared into the guest.
    Host(&'a [RootfsMount]),
    /// The guest pulls the image: nothing of the host's is shared for it.
    Guest,
}

/// Mounts the container's rootfs and bind sources under `<host dir>/<id>/` (the
/// export of `share` shows them to the guest) and rewrites `spec` to the guest paths.
/// On error, what was mounted is undone.
pub fn prepare(
    share: &Path,
    userns: Option<Arc<PodUserns>>,
    id: &str,
    bundle: &Path,
    root: Root,
    spec: &mut Spec,
) -> Result<ContainerMounts, MountError> {
    if id.is_empty() || id.contains('/') || id == "." || id == ".." {
        return Err(MountError::BadId(id.into()));
    }
    let host = super::share::host_dir(share);
    let mut done = ContainerMounts {
        dir: host.join(id),
        mounted: Vec::new(),
    };
    match prepare_inner(&mut done, &host, userns, id, bundle, root, spec) {
        Ok(()) => Ok(done),
        Err(e) => {
            done.cleanup();
            Err(e)
        }
    }
}

fn prepare_inner(
    done: &mut ContainerMounts,
    host: &Path,
    userns: Option<Arc<PodUserns>>,
    id: &str,
    bundle: &Path,
    root: Root,
    spec: &mut Spec,
) -> Result<(), MountError> {
    let pod = Beneath::open(host, userns).map_err(|e| MountError::Mkdir(host.into(), e))?;
    let guest_dir = format!("{GUEST_SHARE}/{id}");
    let rootfs = match root {
        Root::Host(rootfs) => {
            share_rootfs(done, &pod, id, bundle, rootfs, spec)?;
            format!("{guest_dir}/rootfs")
        }
        Root::Guest => format!("{GUEST_IMAGES}/{id}/rootfs"),
    };
    if let Some(root) = spec.root_mut() {
        root.set_path(PathBuf::from(rootfs));
    }
    share_volumes(done, &pod, host, id, &guest_dir, spec)?;
    if super::idmaps::any_user_namespace(spec) {
        // The container's root is root of its own ids only, and walks to its rootfs
        // and volumes through directories guest root owns.
        let own = PathBuf::from(id);
        pod.traversable(&[&own, &own.join("mounts")])
            .map_err(|e| MountError::Traversable(pod.path_of(&own), e))?;
    }
    Ok(())
}

/// The container's root filesystem, mounted where the guest sees it.
fn share_rootfs(
    done: &mut ContainerMounts,
    pod: &Beneath,
    id: &str,
    bundle: &Path,
    rootfs: &[RootfsMount],
    spec: &Spec,
) -> Result<(), MountError> {
    let mkdir = |r: &Path| {
        pod.mkdir_all(r)
            .map_err(|e| MountError::Mkdir(pod.path_of(r), e))
    };
    let root_rel = PathBuf::from(id).join("rootfs");
    mkdir(&root_rel)?;
    let target = pod.path_of(&root_rel);
    // A read-only root is the container's own property, enforced in the guest as runc
    // enforces it: the agent first makes the spec's mount points in it (resolv.conf,
    // hosts), then remounts it read-only in the container. The rootfs is the
    // container's own snapshot (its writes reach only its upper layer), so the host
    // leaves it writable; what the host keeps read-only is host data, the volumes.
    if rootfs.is_empty() {
        // No snapshot mounts: the bundle's rootfs directory is the rootfs.
        let root = spec.root().as_ref().ok_or(MountError::NoRoot)?;
        let src = if root.path().is_absolute() {
            root.path().clone()
        } else {
            bundle.join(root.path())
        };
        bind(pod, &src, &root_rel, true, false)?;
        done.mounted.push(target);
    } else if let (Some(ns), [m]) = (pod.userns(), rootfs) {
        let rootfs_err = |detail: String| MountError::Rootfs {
            target: target.clone(),
            detail,
        };
        if m.type_ == "overlay" {
            // An overlay of idmapped layers, made detached and attached by descriptor.
            let opts = overlay::parse(&m.options).map_err(rootfs_err)?;
            let made = overlay::mount_idmapped(&opts, ns)
                .map_err(|e| rootfs_err(format!("an overlay of idmapped layers: {e}")))?;
            pod.attach(&made, &root_rel)
                .map_err(|e| rootfs_err(e.to_string()))?;
            done.mounted.push(target.clone());
        } else {
            // A bind (a single-layer view) or a filesystem of its own: idmapped where
            // it was mounted, before any container uses it.
            mount_by_path(rootfs, &target)?;
            done.mounted.push(target.clone());
            pod.idmap_in_place(&root_rel)
                .map_err(|e| rootfs_err(format!("cannot idmap it for the pod's virtiofsd: {e}")))?;
        }
    } else {
        if pod.userns().is_some() {
            return Err(MountError::Rootfs {
                target,
                detail: format!(
                    "{} rootfs mounts: the pod's virtiofsd needs one, to idmap it",
                    rootfs.len()
                ),
            });
        }
        mount_by_path(rootfs, &target)?;
        done.mounted.push(target);
    }
    Ok(())
}

/// The container's bind mounts, each mounted where the guest sees it.
fn share_volumes(
    done: &mut ContainerMounts,
    pod: &Beneath,
    host: &Path,
    id: &str,
    guest_dir: &str,
    spec: &mut Spec,
) -> Result<(), MountError> {
    let rel = |p: &str| PathBuf::from(id).join(p);
    let mkdir = |r: &Path| {
        pod.mkdir_all(r)
            .map_err(|e| MountError::Mkdir(pod.path_of(r), e))
    };
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
        let r = rel("mounts").join(i.to_string());
        mkdir(&rel("mounts"))?;
        if src.is_dir() {
            mkdir(&r)?;
        } else {
            pod.create_file(&r)
                .map_err(|e| MountError::Mkdir(pod.path_of(&r), e))?;
        }
        bind(pod, &src, &r, has_opt(m, "rbind"), is_read_only(m))?;
        done.mounted.push(pod.path_of(&r));
        let options = m.options().clone().unwrap_or_default();
        if src.is_dir() && super::propagation::wants(&options) {
            // Never mirrored: every pod's share (`<run>/shares`).
            let shares = host.parent().unwrap_or(host);
            let (ro, rec) = (is_read_only(m), has_opt(m, "rbind"));
            super::propagation::watch(pod, &done.dir, &src, &r, ro, rec, shares)
                .map_err(|e| MountError::Propagation(src.clone(), e))?;
        }
        m.set_source(Some(PathBuf::from(format!("{guest_dir}/mounts/{i}"))));
        m.set_typ(Some("bind".into()));
    }
    spec.set_mounts(Some(mounts));
    // Host cgroup paths mean nothing in the guest: the agent places the container in
    // its own cgroup. (The host's hooks were taken out before: `hooks::take`.)
    if let Some(linux) = spec.linux_mut() {
        linux.set_cgroups_path(None);
    }
    Ok(())
}

/// Mounts the snapshot's mounts on `target` with containerd's own mount code, which
/// takes a path: the host directory is private to the host, so no guest can have
/// changed what it leads to.
fn mount_by_path(rootfs: &[RootfsMount], target: &Path) -> Result<(), MountError> {
    for m in rootfs {
        let fstype = Some(m.type_.as_str()).filter(|s| !s.is_empty());
        let source = Some(m.source.as_str()).filter(|s| !s.is_empty());
        containerd_shim::mount::mount_rootfs(fstype, source, &m.options, target).map_err(|e| {
            MountError::Rootfs {
                target: target.to_path_buf(),
                detail: e.to_string(),
            }
        })?;
    }
    Ok(())
}

fn bind(
    pod: &Beneath,
    src: &Path,
    rel: &Path,
    recursive: bool,
    readonly: bool,
) -> Result<(), MountError> {
    pod.bind(src, rel, recursive, readonly)
        .map_err(|source| MountError::Bind {
            source_path: src.into(),
            target: pod.path_of(rel),
            source,
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
            "linux": {"cgroupsPath": "/default/x"}
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
        crate::shimv2::share::create(&share, None).unwrap();
        let mut spec = spec_with(serde_json::json!([
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/data", "type": "bind", "source": data, "options": ["rbind", "ro"]},
            {"destination": "/f", "source": data.join("f"), "options": ["bind", "rw"]}
        ]));
        let mut m = prepare(&share, None, "c1", &bundle, Root::Host(&[]), &mut spec).unwrap();
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
        assert!(spec.linux().as_ref().unwrap().cgroups_path().is_none());
        // The guest's view takes no new names in the container's directory.
        let planted = std::os::unix::fs::symlink("/", share.join("c1/mounts/evil")).unwrap_err();
        assert_eq!(planted.raw_os_error(), Some(libc::EROFS));
        m.cleanup();
        assert!(!share.join("c1").exists());
        assert_eq!(std::fs::read_to_string(data.join("f")).unwrap(), "changed");
        crate::shimv2::share::remove(&share);
        assert!(!share.exists());
    }

    /// A container whose image the guest pulls: nothing of the host's root filesystem
    /// is shared, the spec names where the agent unpacks it, volumes are shared as ever.
    #[test]
    fn a_guest_pulled_root_shares_only_the_volumes() {
        if !nix::unistd::geteuid().is_root() {
            cocoon_nested::testing::missing("mounts", "mounting needs root");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let bundle = t.path().join("bundle");
        std::fs::create_dir_all(bundle.join("rootfs/etc")).unwrap();
        let data = t.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let share = t.path().join("share");
        crate::shimv2::share::create(&share, None).unwrap();
        let mut spec = spec_with(serde_json::json!([
            {"destination": "/data", "type": "bind", "source": data, "options": ["rbind", "ro"]}
        ]));
        let mut m = prepare(&share, None, "c3", &bundle, Root::Guest, &mut spec).unwrap();
        assert_eq!(
            spec.root().as_ref().unwrap().path(),
            Path::new("/run/cocoon/images/c3/rootfs")
        );
        assert!(!share.join("c3/rootfs").exists());
        let mounts = spec.mounts().as_ref().unwrap();
        assert_eq!(
            mounts[0].source().as_deref(),
            Some(Path::new("/run/cocoon/shared/c3/mounts/0"))
        );
        m.cleanup();
        assert!(!share.join("c3").exists());
        crate::shimv2::share::remove(&share);
    }

    /// With the pod's namespace: a snapshot given as a bind (a single-layer view, the
    /// native snapshotter) and a volume are idmapped, and the spec is still rewritten.
    #[test]
    fn with_a_namespace_a_bind_rootfs_and_volumes_show_shifted_owners() {
        if !nix::unistd::geteuid().is_root() {
            cocoon_nested::testing::missing("mounts", "mounting needs root");
            return;
        }
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().unwrap();
        let bundle = t.path().join("bundle");
        std::fs::create_dir_all(&bundle).unwrap();
        let snap = t.path().join("snap");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("owned"), "x").unwrap();
        std::os::unix::fs::lchown(snap.join("owned"), Some(1000), Some(1000)).unwrap();
        let data = t.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("f"), "hello").unwrap();
        std::os::unix::fs::lchown(data.join("f"), Some(7), Some(7)).unwrap();
        let base = 1_500_327_680;
        let ns = Arc::new(PodUserns::create(base, crate::hypervisor::userns::IDS_PER_POD).unwrap());
        let share = t.path().join("share");
        crate::shimv2::share::create(&share, Some(&ns)).unwrap();
        let rootfs = [RootfsMount {
            type_: "bind".into(),
            source: snap.display().to_string(),
            options: vec!["rbind".into(), "rw".into()],
            ..Default::default()
        }];
        let mut spec = spec_with(serde_json::json!([
            {"destination": "/data", "type": "bind", "source": data, "options": ["rbind", "rw"]}
        ]));
        let mut m = prepare(
            &share,
            Some(ns),
            "c1",
            &bundle,
            Root::Host(&rootfs),
            &mut spec,
        )
        .unwrap();
        let uid = |p: &str| std::fs::symlink_metadata(share.join(p)).unwrap().uid();
        assert_eq!(uid("c1/rootfs/owned"), base + 1000);
        assert_eq!(uid("c1/mounts/0/f"), base + 7);
        // The structure shows as the namespace's root.
        assert_eq!(uid("c1"), base);
        assert_eq!(
            spec.mounts().as_ref().unwrap()[0].source().as_deref(),
            Some(Path::new("/run/cocoon/shared/c1/mounts/0"))
        );
        m.cleanup();
        crate::shimv2::share::remove(&share);
        assert!(!share.exists());
        assert_eq!(std::fs::metadata(data.join("f")).unwrap().uid(), 7);
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
        crate::shimv2::share::create(&share, None).unwrap();
        let mut spec = spec_with(serde_json::json!([
            {"destination": "/x", "type": "bind", "source": "/nonexistent/src", "options": ["rbind"]}
        ]));
        let err = prepare(&share, None, "c2", &bundle, Root::Host(&[]), &mut spec).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/src"), "{err}");
        assert!(
            !share.join("c2").exists(),
            "a failed prepare leaves nothing"
        );
        crate::shimv2::share::remove(&share);
    }

    /// A volume on a filesystem that cannot be idmapped (an overlay, as `/tmp` is in
    /// many containers; NFS) cannot reach the jailed virtiofsd: the error names the
    /// volume, the filesystem and the way out, and nothing is left in the share.
    #[test]
    fn a_volume_that_cannot_be_idmapped_is_named_with_its_filesystem() {
        if !nix::unistd::geteuid().is_root() {
            cocoon_nested::testing::missing("mounts", "mounting needs root");
            return;
        }
        use nix::mount::{mount, MsFlags};
        let t = tempfile::tempdir().unwrap();
        let bundle = t.path().join("bundle");
        let (lower, upper, work, vol) = (
            t.path().join("lower"),
            t.path().join("upper"),
            t.path().join("work"),
            t.path().join("vol"),
        );
        for d in [&bundle.join("rootfs"), &lower, &upper, &work, &vol] {
            std::fs::create_dir_all(d).unwrap();
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        mount(
            Some("overlay"),
            &vol,
            Some("overlay"),
            MsFlags::empty(),
            Some(opts.as_str()),
        )
        .unwrap();
        let ns = Arc::new(
            PodUserns::create(1_500_458_752, crate::hypervisor::userns::IDS_PER_POD).unwrap(),
        );
        let share = t.path().join("share");
        crate::shimv2::share::create(&share, Some(&ns)).unwrap();
        let mut spec = spec_with(serde_json::json!([
            {"destination": "/data", "type": "bind", "source": vol, "options": ["rbind", "rw"]}
        ]));
        let err = prepare(&share, Some(ns), "c4", &bundle, Root::Host(&[]), &mut spec).unwrap_err();
        let _ = umount2(&vol, MntFlags::MNT_DETACH);
        let mut text = err.to_string();
        let mut next = std::error::Error::source(&err);
        while let Some(e) = next {
            text = format!("{text}: {e}");
            next = e.source();
        }
        for part in [
            vol.to_str().unwrap(),
            "overlayfs",
            "[jail] virtiofsd = true",
        ] {
            assert!(text.contains(part), "{part:?} not in: {text}");
        }
        assert!(
            !share.join("c4").exists(),
            "a failed prepare leaves nothing"
        );
        crate::shimv2::share::remove(&share);
    }

    /// A host mount beneath an rslave volume's source reaches the share, idmapped, and
    /// goes when the host unmounts it; one that cannot be idmapped (sysfs) gets its place
    /// held by an empty read-only directory, so the guest cannot remove or rename over
    /// the host's mount point through virtiofsd.
    #[test]
    fn host_mounts_reach_an_rslave_volume_or_have_their_place_held() {
        if !nix::unistd::geteuid().is_root() {
            cocoon_nested::testing::missing("mounts", "mounting needs root");
            return;
        }
        use nix::mount::{mount, MsFlags};
        let none = None::<&str>;
        let t = tempfile::tempdir().unwrap();
        let bundle = t.path().join("bundle");
        let data = t.path().join("data");
        for d in [&bundle, &data.join("ok"), &data.join("bad")] {
            std::fs::create_dir_all(d).unwrap();
        }
        mount(Some(&data), &data, none, MsFlags::MS_BIND, none).unwrap();
        mount(none, &data, none, MsFlags::MS_SHARED, none).unwrap();
        let ns = Arc::new(
            PodUserns::create(1_500_393_216, crate::hypervisor::userns::IDS_PER_POD).unwrap(),
        );
        // As `<run>/shares/<vm>`: mounts under `<run>/shares` are never mirrored.
        let share = t.path().join("shares/share");
        crate::shimv2::share::create(&share, Some(&ns)).unwrap();
        let mut spec = spec_with(serde_json::json!([
            {"destination": "/data", "type": "bind", "source": data, "options": ["rbind", "rslave"]}
        ]));
        let mut m = prepare(&share, Some(ns), "c1", &bundle, Root::Guest, &mut spec).unwrap();
        let vol = share.join("c1/mounts/0");
        let eventually = |what: &str, f: &dyn Fn() -> bool| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while !f() {
                assert!(std::time::Instant::now() < deadline, "never: {what}");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        };
        let mounted_at = |p: &Path| {
            let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            table
                .lines()
                .any(|l| l.split(' ').nth(4) == Some(&p.display().to_string()))
        };
        mount(
            Some("t"),
            &data.join("ok"),
            Some("tmpfs"),
            MsFlags::empty(),
            none,
        )
        .unwrap();
        std::fs::write(data.join("ok/f"), "x").unwrap();
        mount(
            Some("sysfs"),
            &data.join("bad"),
            Some("sysfs"),
            MsFlags::empty(),
            none,
        )
        .unwrap();
        eventually("the tmpfs in the share", &|| vol.join("ok/f").exists());
        use std::os::unix::fs::MetadataExt;
        let uid = std::fs::metadata(vol.join("ok/f")).unwrap().uid();
        assert_eq!(uid, 1_500_393_216, "the copy is idmapped");
        eventually("the held place", &|| mounted_at(&vol.join("bad")));
        assert_eq!(std::fs::read_dir(vol.join("bad")).unwrap().count(), 0);
        assert!(
            std::fs::create_dir(vol.join("bad/x")).is_err(),
            "the placeholder takes writes"
        );
        umount2(&data.join("ok"), MntFlags::empty()).unwrap();
        eventually("the copy gone", &|| !vol.join("ok/f").exists());
        umount2(&data.join("bad"), MntFlags::empty()).unwrap();
        eventually("the held place gone", &|| !mounted_at(&vol.join("bad")));
        m.cleanup();
        umount2(&data, MntFlags::MNT_DETACH).unwrap();
        crate::shimv2::share::remove(&share);
        assert!(!share.exists());
    }
}
