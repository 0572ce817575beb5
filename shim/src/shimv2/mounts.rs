//! What a container's filesystem looks like from the host: its rootfs (the
//! snapshot containerd prepared) and the sources of its bind mounts, mounted
//! in the pod's host directory, whose read-only view virtiofsd exports to the
//! guest (see `share`). The OCI spec is rewritten to the guest's view of those
//! paths. Read-only volumes are read-only on the host side too, all the way down
//! (nested mounts included), so a hostile guest cannot write through virtio-fs
//! host data the spec made read-only.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use containerd_shim::protos::api::Mount as RootfsMount;
use nix::mount::{umount2, MntFlags};
use oci_spec::runtime::{Mount, Spec};
use thiserror::Error;

use super::overlay;
use super::podns::{in_ns, PodNs};
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
    #[error("an idmapped mount: {0}")]
    Idmap(String),
}

/// Mounts made for one container, innermost last (unmounted in reverse).
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct ContainerMounts {
    pub dir: PathBuf,
    pub mounted: Vec<PathBuf>,
    /// The pod's mount namespace the mounts are in; none in a recorded state (a
    /// `shim delete` after the shim died works in the node's).
    #[serde(skip)]
    pub ns: Option<Arc<PodNs>>,
}

impl ContainerMounts {
    /// Unmounts everything (lazily, so a busy mount cannot block cleanup)
    /// and removes the container's directory in the share.
    ///
    /// Without the pod's namespace (its shim gone, or this is another process), the
    /// removal alone does it: a directory removed in the node's namespace takes the
    /// mounts another namespace had on it (Linux ≥ 3.18), and the node's view of the
    /// directory holds none of their data.
    pub fn cleanup(&mut self) {
        super::propagation::forget(&self.dir);
        let mut mounted = std::mem::take(&mut self.mounted);
        let dir = self.dir.clone();
        let remove = |dir: &Path| {
            if !dir.as_os_str().is_empty() {
                // Never a recursive delete into a mount that is still there.
                if let Err(e) = super::share::remove_tree_same_fs(dir) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!("cannot remove {}: {e}", dir.display());
                    }
                }
            }
        };
        let d = dir.clone();
        let undo = move || {
            while let Some(m) = mounted.pop() {
                if let Err(e) = umount2(&m, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
                    if e != nix::Error::EINVAL && e != nix::Error::ENOENT {
                        tracing::warn!("cannot unmount {}: {e}", m.display());
                    }
                }
            }
            remove(&d);
            Ok(())
        };
        if let Err(e) = in_ns(self.ns.as_deref(), undo) {
            tracing::warn!("{e}: removing {} from the node", dir.display());
            remove(&dir);
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
    ns: Option<Arc<PodNs>>,
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
        ns: ns.clone(),
    };
    match prepare_inner(&mut done, &host, userns, ns, id, bundle, root, spec) {
        Ok(()) => Ok(done),
        Err(e) => {
            done.cleanup();
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn prepare_inner(
    done: &mut ContainerMounts,
    host: &Path,
    userns: Option<Arc<PodUserns>>,
    ns: Option<Arc<PodNs>>,
    id: &str,
    bundle: &Path,
    root: Root,
    spec: &mut Spec,
) -> Result<(), MountError> {
    let pod = Beneath::open(host, userns, ns).map_err(|e| MountError::Mkdir(host.into(), e))?;
    let mut idmappers = super::idmaps::Idmappers::new(pod.userns());
    let guest_dir = format!("{GUEST_SHARE}/{id}");
    let rootfs = match root {
        Root::Host(rootfs) => {
            share_rootfs(done, &pod, &mut idmappers, id, bundle, rootfs, spec)?;
            format!("{guest_dir}/rootfs")
        }
        Root::Guest => format!("{GUEST_IMAGES}/{id}/rootfs"),
    };
    if let Some(root) = spec.root_mut() {
        root.set_path(PathBuf::from(rootfs));
    }
    share_volumes(done, &pod, &mut idmappers, host, id, &guest_dir, spec)?;
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
    idmappers: &mut super::idmaps::Idmappers<'_>,
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
        bind(pod, &src, &root_rel, true, false, None)?;
        done.mounted.push(target);
    } else {
        let rootfs_err = |detail: String| MountError::Rootfs {
            target: target.clone(),
            detail,
        };
        let tree = match (pod.userns(), rootfs) {
            (Some(ns), [m]) if m.type_ == "overlay" => {
                // An overlay of idmapped layers, made detached.
                let opts = overlay::parse(&m.options).map_err(rootfs_err)?;
                let lower = match &opts.idmap {
                    Some(maps) => Some(idmappers.get(maps).map_err(|e| {
                        rootfs_err(format!("a user namespace for its layers' uidmap: {e}"))
                    })?),
                    None => None,
                };
                overlay::mount_idmapped(&opts, ns, lower.as_ref().map(|l| l.as_fd()))
                    .map_err(|e| rootfs_err(format!("an overlay of idmapped layers: {e}")))?
            }
            (None, [m]) if m.type_ == "overlay" && asks_idmap(m) => {
                // containerd's snapshot of a `hostUsers: false` pod's container, its
                // layers to be idmapped with the pod's mapping: containerd's own
                // mount code does that for runc, the shim crate's does not know it.
                let opts = overlay::parse(&m.options).map_err(rootfs_err)?;
                let maps = opts
                    .idmap
                    .as_ref()
                    .ok_or_else(|| rootfs_err("no idmap".into()))?;
                let lower = idmappers.get(maps).map_err(|e| {
                    rootfs_err(format!("a user namespace for its layers' uidmap: {e}"))
                })?;
                overlay::mount_lowers_idmapped(&opts, lower.as_fd())
                    .map_err(|e| rootfs_err(format!("an overlay of idmapped layers: {e}")))?
            }
            (_, [m]) if asks_idmap(m) => {
                return Err(rootfs_err(format!(
                    "a {:?} rootfs with uidmap or gidmap: only overlay layers are idmapped",
                    m.type_
                )))
            }
            (Some(_), [_]) | (None, _) => {
                let tree = mount_detached(rootfs, &target)?;
                // A bind (a single-layer view) or a filesystem of its own: idmapped
                // before any container uses it.
                if let Some(ns) = pod.userns() {
                    ns.idmap(tree.as_fd(), false).map_err(|e| {
                        rootfs_err(format!("cannot idmap it for the pod's virtiofsd: {e}"))
                    })?;
                }
                tree
            }
            (Some(_), _) => {
                return Err(rootfs_err(format!(
                    "{} rootfs mounts: the pod's virtiofsd needs one, to idmap it",
                    rootfs.len()
                )))
            }
        };
        pod.attach(tree, &root_rel)
            .map_err(|e| rootfs_err(e.to_string()))?;
        done.mounted.push(target);
    }
    Ok(())
}

/// Whether a rootfs mount asks for idmapped layers (containerd's `uidmap=`/`gidmap=`).
fn asks_idmap(m: &RootfsMount) -> bool {
    m.options
        .iter()
        .any(|o| o.starts_with("uidmap=") || o.starts_with("gidmap="))
}

/// The container's bind mounts, each mounted where the guest sees it. A bind with
/// `uidMappings` and `gidMappings` is idmapped here with them (followed by the pod's
/// share's mapping when virtiofsd is jailed): the guest cannot idmap what virtiofsd
/// shows it (each host mount is a FUSE submount there, which the guest kernel never
/// lets be idmapped), so the guest gets the bind as the mapping shows it, with the
/// mappings taken out of its spec.
fn share_volumes(
    done: &mut ContainerMounts,
    pod: &Beneath,
    idmappers: &mut super::idmaps::Idmappers<'_>,
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
        let maps = super::idmaps::of_mount(m).map_err(MountError::Idmap)?;
        let idmap = match &maps {
            Some(maps) => Some(idmappers.get(maps).map_err(|e| {
                MountError::Idmap(format!(
                    "a user namespace for the mount at {}: {e}",
                    m.destination().display()
                ))
            })?),
            None => None,
        };
        let idmap_fd = idmap.as_ref().map(|i| i.as_fd());
        bind(
            pod,
            &src,
            &r,
            has_opt(m, "rbind"),
            is_read_only(m),
            idmap_fd,
        )?;
        done.mounted.push(pod.path_of(&r));
        if maps.is_some() {
            m.set_uid_mappings(None);
            m.set_gid_mappings(None);
        }
        let options = m.options().clone().unwrap_or_default();
        if src.is_dir() && super::propagation::wants(&options) {
            // Never mirrored: every pod's share (`<run>/shares`).
            let shares = host.parent().unwrap_or(host);
            let (ro, rec) = (is_read_only(m), has_opt(m, "rbind"));
            super::propagation::watch(pod, &done.dir, &src, &r, ro, rec, shares, idmap.clone())
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

/// Mounts the snapshot's mounts on `stage` with containerd's own mount code, in a
/// throwaway copy of the node's namespace (`podns::in_scratch_ns`: the snapshot's paths
/// mean what containerd meant, and nothing mounted there reaches the node, also if the
/// shim dies meanwhile), and returns a detached clone of what is mounted there. `stage`
/// is the rootfs's own place in the host directory, which no guest can have changed
/// (its path leads where it always did), and is empty outside the pod's namespace.
fn mount_detached(rootfs: &[RootfsMount], stage: &Path) -> Result<OwnedFd, MountError> {
    let err = |detail: String| MountError::Rootfs {
        target: stage.to_path_buf(),
        detail,
    };
    let made = super::podns::in_scratch_ns(|| {
        mount_by_path(rootfs, stage)?;
        super::share::open_tree(stage, false)
            .and_then(|t| super::share::set_private(t.as_fd(), false).map(|()| t))
            .map_err(|e| err(format!("cannot clone it for the pod: {e}")))
    });
    made.map_err(|e| err(format!("cannot make a namespace to mount it in: {e}")))?
}

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
    idmap: Option<std::os::fd::BorrowedFd<'_>>,
) -> Result<(), MountError> {
    pod.bind(src, rel, recursive, readonly, idmap)
        .map_err(|source| MountError::Bind {
            source_path: src.into(),
            target: pod.path_of(rel),
            source,
        })
}

#[cfg(test)]
#[path = "mounts_tests.rs"]
mod tests;
