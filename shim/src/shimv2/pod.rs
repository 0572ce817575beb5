//! What a Kubernetes pod (through containerd's CRI plugin) asks of the shim beyond a
//! plain container: which container is the sandbox (pause), which host network namespace
//! CNI prepared for the pod, and the namespace paths in each spec that mean something on
//! the host but not in the guest.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Mount, Spec};
use thiserror::Error;

use super::SANDBOX_ID_ANNOTATION;

/// Per-pod VM size, set on the pod (`metadata.annotations`) and passed to the runtime by
/// containerd's `pod_annotations = ["io.cocoon.*"]` for the handler.
pub const VCPUS_ANNOTATION: &str = "io.cocoon.vm.vcpus";
pub const MEMORY_ANNOTATION: &str = "io.cocoon.vm.memory_mib";
/// The pod's own count of empty disk slots (`[vm] block_slots`), for a pod with more raw
/// block volumes than the node's default, or none (cocoon-vmm; QEMU ignores it).
pub const BLOCK_SLOTS_ANNOTATION: &str = "io.cocoon.vm.block_slots";
/// `sev-snp` or `tdx`: the pod asks for a memory-encrypted, measured VM.
pub const CONFIDENTIAL_ANNOTATION: &str = "io.cocoon.confidential";
/// The pod's init-data (Confidential Containers' TOML, standard base64): the agent policy
/// in Rego and other settings the guest enforces, whoever asks.
pub const INIT_DATA_ANNOTATION: &str = "io.cocoon.init-data";
/// Every annotation the runtime reads from a pod starts with this (containerd's
/// `pod_annotations` pattern `io.cocoon.*`).
pub const ANNOTATION_PREFIX: &str = "io.cocoon.";
/// A container whose image the guest pulls itself, by digest
/// (`registry/repository@sha256:…`): the host shares no root filesystem for it
/// (containerd's `container_annotations = ["io.cocoon.*"]` passes it to the shim).
pub const GUEST_IMAGE_ANNOTATION: &str = "io.cocoon.guest-image";
/// A pod annotation (`"true"`): the guest pulls every workload container's own image, as
/// the node names it (`IMAGE_NAME_ANNOTATION`, which must name a digest), the way
/// `GUEST_IMAGE_ANNOTATION` asks for one container; the way for Kubernetes pods, whose
/// containers cannot carry annotations of their own.
pub const GUEST_PULL_ANNOTATION: &str = "io.cocoon.guest-pull";
/// containerd's name for the image a CRI container was created from.
pub const IMAGE_NAME_ANNOTATION: &str = "io.kubernetes.cri.image-name";
/// Secrets the agent fetches from the pod's key broker into a container
/// (`name=repository/type/tag,...`; the agent's `secrets` module).
pub const KBS_SECRETS_ANNOTATION: &str = "io.cocoon.kbs-secrets";

/// CRI's annotation saying whether a container is the pod's sandbox or a workload.
pub const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";
/// The container's name in its pod (kubelet re-creates a restarted one under it).
pub const CONTAINER_NAME_ANNOTATION: &str = "io.kubernetes.cri.container-name";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PodSpecError {
    #[error("pod annotation {key}={value:?}: {why}")]
    BadAnnotation {
        key: String,
        value: String,
        why: String,
    },
    #[error(
        "pods with hostNetwork: true cannot run on Cocoon: a VM cannot share the host's \
         network namespace (run this pod with another RuntimeClass)"
    )]
    HostNetwork,
    #[error(
        "pods with hostPID: true cannot run on Cocoon: processes in a VM cannot see the \
         host's (run this pod with another RuntimeClass)"
    )]
    HostPid,
    #[error(
        "pods with hostIPC: true cannot run on Cocoon: a VM cannot share the host's IPC \
         namespace (run this pod with another RuntimeClass)"
    )]
    HostIpc,
    /// Never started without the protection asked for (nor with the debug console).
    #[error(
        "the pod asks for a confidential VM ({0}), which this Cocoon cannot launch yet; it \
         is refused rather than started unprotected"
    )]
    Confidential(String),
    #[error("the container's user namespace: {0}")]
    UserNamespace(String),
    #[error(
        "the container joins the host's {kind} namespace {path:?}, which a VM cannot share \
         (only a network namespace can be given: its interface becomes the VM's)"
    )]
    HostNamespace { kind: String, path: PathBuf },
    #[error(
        "the container shares the host's network (ctr run --net-host, or no network \
         namespace in its spec), which a VM cannot: give it a network namespace of its own, \
         or one prepared on the host (ctr run --with-ns network:<path>)"
    )]
    SharesHostNetwork,
    #[error(
        "the container shares the host's {0} namespace (no {0} namespace in its spec, as \
         with --{0}=host), which a VM cannot: give it a {0} namespace of its own"
    )]
    SharesHostNamespace(&'static str),
}

fn annotation<'a>(spec: &'a Spec, key: &str) -> Option<&'a str> {
    spec.annotations()
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// Whether CRI made this spec (it groups containers into pods).
pub fn is_cri(spec: &Spec) -> bool {
    annotation(spec, SANDBOX_ID_ANNOTATION).is_some_and(|s| !s.is_empty())
}

/// Whether this is a pod's sandbox (pause) container.
pub fn is_sandbox(spec: &Spec) -> bool {
    annotation(spec, CONTAINER_TYPE_ANNOTATION) == Some("sandbox")
}

/// What a pod asks of its VM: the network CNI prepared and, from its annotations, a
/// size other than the config's.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PodVm {
    pub netns: Option<PathBuf>,
    /// The sandbox container's host cgroup (`cgroupsPath`), which the VM's host
    /// processes join (see `crate::hostcgroup`).
    pub host_cgroup: Option<String>,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u32>,
    pub block_slots: Option<u8>,
    /// What the pod's containers' limits add to the VM (a CRI sandbox's resources).
    pub limits: Option<super::sizing::PodLimits>,
    /// The init-data document, checked to parse (the guest parses it again).
    pub init_data: Option<Vec<u8>>,
    /// Host id ranges the pod's share maps beyond its own, for the first container's
    /// user namespace (`idmaps::extra_share_ranges`).
    pub share_ids: Vec<(u32, u32)>,
}

/// Reads what the first container of a pod asks of its VM. An `io.cocoon.*`
/// annotation that is not ours, or a value out of range, is an error naming it: a typo
/// must not silently give a pod the default size.
///
/// With `size_from_limits`, also the pod's limits as containerd passed them
/// (`sizing::pod_limits`).
pub fn pod_vm(spec: &Spec, size_from_limits: bool) -> Result<PodVm, PodSpecError> {
    let mut vm = PodVm {
        netns: pod_netns(spec)?,
        ..Default::default()
    };
    host_namespaces(spec)?;
    vm.share_ids = super::idmaps::extra_share_ranges(spec).map_err(PodSpecError::UserNamespace)?;
    if !is_cri(spec) && size_from_limits {
        // A VM of its own: its own limits.
        vm.limits = super::sizing::container_limits(spec);
    }
    if is_cri(spec) && is_sandbox(spec) {
        if size_from_limits {
            vm.limits = super::sizing::pod_limits(spec)?;
        }
        vm.host_cgroup = spec
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().as_ref())
            .map(|p| p.to_string_lossy().into_owned())
            .filter(|p| !p.is_empty());
    }
    let Some(annotations) = spec.annotations().as_ref() else {
        return Ok(vm);
    };
    let mut keys: Vec<_> = annotations
        .keys()
        .filter(|k| k.starts_with(ANNOTATION_PREFIX))
        .collect();
    keys.sort();
    for key in keys {
        let value = &annotations[key];
        let bad = |why: &str| PodSpecError::BadAnnotation {
            key: key.clone(),
            value: value.clone(),
            why: why.into(),
        };
        match key.as_str() {
            VCPUS_ANNOTATION => match value.trim().parse::<u32>() {
                Ok(n @ 1..=64) => vm.vcpus = Some(n),
                _ => return Err(bad("must be a whole number from 1 to 64")),
            },
            MEMORY_ANNOTATION => match value.trim().parse::<u32>() {
                Ok(n @ 64..=1_048_576) => vm.memory_mib = Some(n),
                _ => return Err(bad("must be a whole number of MiB from 64 to 1048576")),
            },
            BLOCK_SLOTS_ANNOTATION => match value.trim().parse::<u8>() {
                Ok(n) if n <= crate::config::MAX_BLOCK_SLOTS => vm.block_slots = Some(n),
                _ => {
                    return Err(bad(&format!(
                        "must be a whole number from 0 to {}",
                        crate::config::MAX_BLOCK_SLOTS
                    )))
                }
            },
            INIT_DATA_ANNOTATION => {
                vm.init_data = Some(
                    cocoon_confidential::initdata::from_annotation(value).map_err(|e| bad(&e))?,
                );
            }
            // Checked by the agent, which fetches them; here only that it is one line.
            KBS_SECRETS_ANNOTATION => {
                if value.is_empty() || value.len() > 8192 || value.chars().any(char::is_control) {
                    return Err(bad("must be name=repository/type/tag[,...] on one line"));
                }
            }
            // A container's own: as a pod annotation containerd would copy it into every
            // container of the pod, sidecars and init containers too.
            GUEST_IMAGE_ANNOTATION if is_cri(spec) && is_sandbox(spec) => {
                return Err(bad("is a container annotation: as a pod annotation it would apply to every container"));
            }
            // Checked by the agent, which pulls it; here only that it is one plain line.
            GUEST_IMAGE_ANNOTATION => {
                if value.is_empty()
                    || value.len() > 512
                    || value.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    return Err(bad(
                        "must be one image reference (registry/repository@sha256:digest)",
                    ));
                }
            }
            GUEST_PULL_ANNOTATION => {
                if !matches!(value.trim(), "true" | "false") {
                    return Err(bad("must be true or false"));
                }
            }
            CONFIDENTIAL_ANNOTATION => match value.trim() {
                kind @ ("sev-snp" | "tdx") => {
                    return Err(PodSpecError::Confidential(kind.to_owned()))
                }
                _ => return Err(bad("must be sev-snp or tdx")),
            },
            _ => {
                return Err(bad(&format!(
                    "not a Cocoon annotation (known: {VCPUS_ANNOTATION}, {MEMORY_ANNOTATION}, \
                     {BLOCK_SLOTS_ANNOTATION}, {INIT_DATA_ANNOTATION}, {CONFIDENTIAL_ANNOTATION}, {GUEST_IMAGE_ANNOTATION}, \
                     {GUEST_PULL_ANNOTATION}, {KBS_SECRETS_ANNOTATION})"
                )))
            }
        }
    }
    Ok(vm)
}

/// The image the guest pulls for this container, if it asks for one (never for a CRI
/// pod's sandbox container, which runs nothing in the VM): its own annotation's, or with
/// the pod's `GUEST_PULL_ANNOTATION`, its image as containerd names it, which must name
/// a digest (the guest pulls by digest only).
pub fn guest_image(spec: &Spec) -> Result<Option<String>, String> {
    if is_cri(spec) && is_sandbox(spec) {
        return Ok(None);
    }
    let Some(annotations) = spec.annotations().as_ref() else {
        return Ok(None);
    };
    if let Some(image) = annotations.get(GUEST_IMAGE_ANNOTATION) {
        return Ok(Some(image.clone()));
    }
    if annotations.get(GUEST_PULL_ANNOTATION).map(|v| v.trim()) != Some("true") {
        return Ok(None);
    }
    let name = annotations.get(IMAGE_NAME_ANNOTATION).ok_or_else(|| {
        format!(
            "{GUEST_PULL_ANNOTATION}=true, but the container's spec does not name its image \
             ({IMAGE_NAME_ANNOTATION}, set by containerd's CRI)"
        )
    })?;
    cocoon_confidential::image_ref::digest_reference(name)
        .map(Some)
        .ok_or_else(|| {
            format!(
                "{GUEST_PULL_ANNOTATION}=true, but the container's image {name:?} is not named by \
             digest: the guest pulls by digest only (image: registry/repository@sha256:...)"
            )
        })
}

/// A CRI sandbox without a PID or IPC namespace of its own asks for the host's
/// (hostPID, hostIPC). In a VM its containers would get the guest's instead, which is not
/// what was asked: refused, as hostNetwork is, never run differently than asked.
///
/// A container of its own (ctr, nerdctl, Docker) is held to the same: a namespace it
/// names by path is one of the host's, and one missing from its spec (`--net-host`,
/// `--pid=host`, `--ipc=host`) is the host's under runc.
fn host_namespaces(spec: &Spec) -> Result<(), PodSpecError> {
    let namespaces = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_deref())
        .unwrap_or_default();
    let has = |t: LinuxNamespaceType| namespaces.iter().any(|n| n.typ() == t);
    if is_cri(spec) {
        // A workload container joins its pod's namespaces by path or not at all: only
        // the sandbox says what the pod asked.
        if !is_sandbox(spec) {
            return Ok(());
        }
        if !has(LinuxNamespaceType::Pid) {
            return Err(PodSpecError::HostPid);
        }
        if !has(LinuxNamespaceType::Ipc) {
            return Err(PodSpecError::HostIpc);
        }
        return Ok(());
    }
    let joined = namespaces
        .iter()
        .find(|n| n.typ() != LinuxNamespaceType::Network && n.path().is_some());
    if let Some(n) = joined {
        return Err(PodSpecError::HostNamespace {
            kind: format!("{:?}", n.typ()).to_lowercase(),
            path: n.path().clone().unwrap_or_default(),
        });
    }
    // runc's container would be on the host's network; the guest's is not that.
    if !has(LinuxNamespaceType::Network) {
        return Err(PodSpecError::SharesHostNetwork);
    }
    // Under runc it would see the host's processes or IPC objects; here it would see
    // the guest's, the agent's among them.
    for (t, kind) in [
        (LinuxNamespaceType::Pid, "pid"),
        (LinuxNamespaceType::Ipc, "ipc"),
    ] {
        if !has(t) {
            return Err(PodSpecError::SharesHostNamespace(kind));
        }
    }
    Ok(())
}

/// The host network namespace CNI prepared, for a CRI sandbox container. A sandbox with
/// no network namespace of its own is a hostNetwork pod, which a VM cannot be.
///
/// A container of its own (ctr) that names a network namespace (`ctr run --with-ns
/// network:<path>`, prepared by hand or by `cnitool`) gets its VM's network from that
/// namespace the same way: where runc's container joins it, the VM takes its interface.
pub fn pod_netns(spec: &Spec) -> Result<Option<PathBuf>, PodSpecError> {
    let net = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|ns| ns.iter().find(|n| n.typ() == LinuxNamespaceType::Network));
    if !is_cri(spec) {
        let path = net.and_then(|n| n.path().clone());
        if let Some(p) = &path {
            if is_own_netns(p) {
                // The VM would take the host's own interface: its traffic redirected
                // into the guest, the host cut off. runc's container would share it.
                return Err(PodSpecError::HostNamespace {
                    kind: "network".into(),
                    path: p.clone(),
                });
            }
        }
        return Ok(path);
    }
    if !is_sandbox(spec) {
        return Ok(None);
    }
    match net {
        None => Err(PodSpecError::HostNetwork),
        Some(n) => Ok(n.path().clone()),
    }
}

/// Whether `path` names the shim's own network namespace (the host's).
fn is_own_netns(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &Path| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    id(path).is_some_and(|named| id(Path::new("/proc/self/ns/net")) == Some(named))
}

/// A `hostUsers: false` pod's sandbox, as containerd 2's CRI writes it, joins a user
/// namespace containerd made and pinned on the host (`pinned-namespaces/user-<id>`,
/// the owner of the pod's network namespace there), with the pod's mappings. That path
/// means nothing in the guest, where the pod's user namespace is the sandbox's own, made
/// with the same mappings: the path is dropped. The pod's other containers join the
/// sandbox's by the path containerd gives them (`/proc/<sandbox pid>/ns/user`, the
/// sandbox's pid in the guest, as the shim reports it). Done before `pod_vm`, which
/// then maps the pod's host ids in its share.
pub fn own_user_namespace(spec: &mut Spec) {
    if !(is_cri(spec) && is_sandbox(spec)) {
        return;
    }
    if let Some(ns) = spec
        .linux_mut()
        .as_mut()
        .and_then(|l| l.namespaces_mut().as_mut())
    {
        for n in ns.iter_mut() {
            if n.typ() == LinuxNamespaceType::User {
                n.set_path(None);
            }
        }
    }
}

/// Rewrites a container's spec for the guest: its network namespace path names the
/// host's pod namespace (CRI's, or the one `ctr run --with-ns` named), which does not
/// exist in the guest. The pod's network is the guest's own (the agent configured its
/// interface there), so the entry is dropped and the container stays in it, with every
/// other container of the pod.
///
/// A pod with a user namespace of its own (`hostUsers: false`) is different: its
/// network namespace must belong to that user namespace, as under runc (so its root may
/// mount sysfs, bind low ports and configure its network). Its sandbox gets a network
/// namespace of its own in the guest (made after its user namespace, so owned by it),
/// into which the agent moves the pod's interface; its other containers keep the path
/// containerd gave them, the sandbox's in the guest (`/proc/<sandbox pid>/ns/net`).
pub fn adapt_spec(spec: &mut Spec) {
    let cri = is_cri(spec);
    let sandbox = is_sandbox(spec);
    let userns = super::idmaps::any_user_namespace(spec);
    if let Some(ns) = spec
        .linux_mut()
        .as_mut()
        .and_then(|l| l.namespaces_mut().as_mut())
    {
        if cri && userns {
            for n in ns.iter_mut() {
                if n.typ() == LinuxNamespaceType::Network && sandbox {
                    n.set_path(None);
                }
            }
            return;
        }
        ns.retain(|n| !(n.typ() == LinuxNamespaceType::Network && n.path().is_some()));
    }
}

/// A CRI container's `/dev/shm` bind (of containerd's per-sandbox tmpfs on the host),
/// taken out of the spec so that it is not shared from the host, with its position.
pub fn take_pod_shm(spec: &mut Spec) -> Option<(usize, Mount)> {
    if !is_cri(spec) {
        return None;
    }
    let mounts = spec.mounts_mut().as_mut()?;
    let i = mounts.iter().position(|m| {
        m.destination() == Path::new("/dev/shm") && m.typ().as_deref() == Some("bind")
    })?;
    Some((i, mounts.remove(i)))
}

/// Puts the `/dev/shm` mount back, now a bind of the pod's tmpfs in the guest: the
/// pod's containers share it, and it is memory of the VM, not a file share.
pub fn restore_pod_shm(spec: &mut Spec, taken: Option<(usize, Mount)>) {
    let Some((i, mut m)) = taken else {
        return;
    };
    m.set_source(Some(PathBuf::from(cocoon_protocol::GUEST_POD_SHM)));
    let mounts = spec.mounts_mut().get_or_insert_with(Vec::new);
    mounts.insert(i.min(mounts.len()), m);
}

#[cfg(test)]
#[path = "pod_tests.rs"]
mod tests;
