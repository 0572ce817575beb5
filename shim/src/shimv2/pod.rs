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

/// Rewrites a container's spec for the guest: its network namespace path names the
/// host's pod namespace (CRI's, or the one `ctr run --with-ns` named), which does not
/// exist in the guest. The pod's network is the guest's own (the agent configured its
/// interface there), so the entry is dropped and the container stays in it, with every
/// other container of the pod.
pub fn adapt_spec(spec: &mut Spec) {
    if let Some(ns) = spec
        .linux_mut()
        .as_mut()
        .and_then(|l| l.namespaces_mut().as_mut())
    {
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
mod tests {
    use super::*;

    fn spec(annotations: serde_json::Value, namespaces: serde_json::Value) -> Spec {
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "annotations": annotations,
            "linux": {"namespaces": namespaces},
        }))
        .unwrap()
    }

    fn pause(namespaces: serde_json::Value) -> Spec {
        spec(
            serde_json::json!({
                "io.kubernetes.cri.sandbox-id": "abc",
                "io.kubernetes.cri.container-type": "sandbox",
            }),
            namespaces,
        )
    }

    #[test]
    fn a_guest_pulled_pod_pulls_each_containers_own_image_by_digest() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        let app = |extra: serde_json::Value| {
            let mut a = serde_json::json!({
                "io.kubernetes.cri.sandbox-id": "abc",
                "io.kubernetes.cri.container-type": "container",
            });
            a.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            spec(a, serde_json::json!([]))
        };
        let named = format!("r.io:5000/team/app@{digest}");
        let s =
            app(serde_json::json!({GUEST_PULL_ANNOTATION: "true", IMAGE_NAME_ANNOTATION: named}));
        assert_eq!(guest_image(&s), Ok(Some(named.clone())));
        // The container's own annotation wins; without either, the host's root is used.
        let own = format!("other.io/x@{digest}");
        let s = app(
            serde_json::json!({GUEST_PULL_ANNOTATION: "true", IMAGE_NAME_ANNOTATION: named, GUEST_IMAGE_ANNOTATION: own}),
        );
        assert_eq!(guest_image(&s), Ok(Some(own)));
        let s =
            app(serde_json::json!({GUEST_PULL_ANNOTATION: "false", IMAGE_NAME_ANNOTATION: named}));
        assert_eq!(guest_image(&s), Ok(None));
        assert_eq!(guest_image(&app(serde_json::json!({}))), Ok(None));
        // A tag beside the digest is dropped; Docker Hub's short names are made whole.
        for (given, taken) in [
            (
                format!("r.io:5000/team/app:1.2@{digest}"),
                format!("r.io:5000/team/app@{digest}"),
            ),
            (
                format!("nginx:1.25@{digest}"),
                format!("docker.io/library/nginx@{digest}"),
            ),
            (
                format!("team/app@{digest}"),
                format!("docker.io/team/app@{digest}"),
            ),
            (
                format!("localhost/app@{digest}"),
                format!("localhost/app@{digest}"),
            ),
        ] {
            let s = app(
                serde_json::json!({GUEST_PULL_ANNOTATION: "true", IMAGE_NAME_ANNOTATION: given}),
            );
            assert_eq!(guest_image(&s), Ok(Some(taken)), "{given}");
        }
        // A tag, or no name: refused, naming why.
        let s = app(
            serde_json::json!({GUEST_PULL_ANNOTATION: "true", IMAGE_NAME_ANNOTATION: "r.io/app:1.0"}),
        );
        assert!(guest_image(&s).unwrap_err().contains("not named by digest"));
        let s = app(serde_json::json!({GUEST_PULL_ANNOTATION: "true"}));
        assert!(guest_image(&s).unwrap_err().contains(IMAGE_NAME_ANNOTATION));
        // The sandbox runs nothing in the VM.
        let mut p = pause(serde_json::json!([]));
        p.annotations_mut()
            .get_or_insert_with(Default::default)
            .insert(GUEST_PULL_ANNOTATION.into(), "true".into());
        assert_eq!(guest_image(&p), Ok(None));
    }

    #[test]
    fn the_sandbox_names_its_cni_namespace() {
        let s = pause(serde_json::json!([
            {"type": "pid"},
            {"type": "network", "path": "/var/run/netns/cni-1234"},
        ]));
        assert_eq!(
            pod_netns(&s).unwrap(),
            Some(PathBuf::from("/var/run/netns/cni-1234"))
        );
    }

    #[test]
    fn host_pid_and_ipc_pods_are_refused() {
        let net = serde_json::json!({"type": "network", "path": "/var/run/netns/cni-1"});
        let s = pause(serde_json::json!([net, {"type": "ipc"}]));
        assert_eq!(pod_vm(&s, true), Err(PodSpecError::HostPid));
        let s = pause(serde_json::json!([net, {"type": "pid"}]));
        assert_eq!(pod_vm(&s, true), Err(PodSpecError::HostIpc));
        let s = pause(serde_json::json!([net, {"type": "pid"}, {"type": "ipc"}]));
        assert!(pod_vm(&s, true).is_ok());
        // A container joins its pod's namespaces by path or not at all: only the sandbox
        // says what the pod asked.
        let workload = spec(
            serde_json::json!({
                "io.kubernetes.cri.sandbox-id": "abc",
                "io.kubernetes.cri.container-type": "container",
            }),
            serde_json::json!([]),
        );
        assert!(pod_vm(&workload, true).is_ok());
        // A container of its own with no network namespace (ctr run --net-host) would
        // be on the host's network under runc: refused.
        let ctr = spec(serde_json::json!({}), serde_json::json!([]));
        assert_eq!(pod_vm(&ctr, true), Err(PodSpecError::SharesHostNetwork));
        let own = |types: &[&str]| {
            let ns: Vec<_> = types
                .iter()
                .map(|t| serde_json::json!({"type": t}))
                .collect();
            spec(serde_json::json!({}), serde_json::json!(ns))
        };
        assert!(pod_vm(&own(&["network", "pid", "ipc"]), true).is_ok());
        // Nor may it share the host's PID or IPC namespace (`--pid=host`, `--ipc=host`):
        // it would see the guest's, the agent's processes among them.
        assert_eq!(
            pod_vm(&own(&["network", "ipc"]), true),
            Err(PodSpecError::SharesHostNamespace("pid"))
        );
        assert_eq!(
            pod_vm(&own(&["network", "pid"]), true),
            Err(PodSpecError::SharesHostNamespace("ipc"))
        );
        assert!(PodSpecError::SharesHostNamespace("pid")
            .to_string()
            .contains("host's pid namespace"));
        assert!(PodSpecError::HostIpc.to_string().contains("hostIPC"));
        assert!(PodSpecError::HostPid.to_string().contains("hostPID"));
    }

    #[test]
    fn a_host_network_pod_is_refused() {
        let s = pause(serde_json::json!([{"type": "pid"}, {"type": "ipc"}]));
        assert_eq!(pod_netns(&s), Err(PodSpecError::HostNetwork));
        assert!(PodSpecError::HostNetwork
            .to_string()
            .contains("hostNetwork"));
    }

    #[test]
    fn plain_containers_and_workloads_bring_no_namespace() {
        let ctr = spec(serde_json::json!({}), serde_json::json!([{"type": "pid"}]));
        assert_eq!(pod_netns(&ctr), Ok(None));
        let workload = spec(
            serde_json::json!({
                "io.kubernetes.cri.sandbox-id": "abc",
                "io.kubernetes.cri.container-type": "container",
            }),
            serde_json::json!([{"type": "network", "path": "/var/run/netns/cni-1234"}]),
        );
        assert_eq!(pod_netns(&workload), Ok(None));
    }

    #[test]
    fn host_network_namespace_paths_are_dropped() {
        let mut s = pause(serde_json::json!([
            {"type": "network", "path": "/var/run/netns/cni-1234"},
            {"type": "ipc", "path": "/proc/7/ns/ipc"},
            {"type": "mount"},
        ]));
        adapt_spec(&mut s);
        let kinds: Vec<_> = s
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|n| n.typ())
            .collect();
        assert_eq!(kinds, [LinuxNamespaceType::Ipc, LinuxNamespaceType::Mount]);
        // ctr's container's network namespace is the VM's, too (`pod_netns`).
        let mut c = spec(
            serde_json::json!({}),
            serde_json::json!([{"type": "network", "path": "/run/netns/x"}, {"type": "pid"}]),
        );
        adapt_spec(&mut c);
        let kinds: Vec<_> = c
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .iter()
            .flatten()
            .map(|n| n.typ())
            .collect();
        assert_eq!(kinds, [LinuxNamespaceType::Pid]);
    }

    /// `ctr run --with-ns network:<path>`: the VM's network comes from that namespace;
    /// any other host namespace a container of its own names is refused, naming it.
    #[test]
    fn a_ctr_container_gives_its_network_namespace_and_no_other() {
        let c = spec(
            serde_json::json!({}),
            serde_json::json!([
                {"type": "network", "path": "/run/netns/x"},
                {"type": "pid"},
                {"type": "ipc"}
            ]),
        );
        assert_eq!(pod_netns(&c), Ok(Some(PathBuf::from("/run/netns/x"))));
        assert!(pod_vm(&c, false).is_ok());
        let joins = spec(
            serde_json::json!({}),
            serde_json::json!([{"type": "network"}, {"type": "pid", "path": "/proc/9/ns/pid"}]),
        );
        assert_eq!(pod_netns(&joins), Ok(None));
        let e = pod_vm(&joins, false).unwrap_err();
        assert!(
            matches!(&e, PodSpecError::HostNamespace { kind, .. } if kind == "pid"),
            "{e}"
        );
        assert!(e.to_string().contains("/proc/9/ns/pid"), "{e}");
        // The host's own network namespace would hand the host's interface to the VM.
        let host = spec(
            serde_json::json!({}),
            serde_json::json!([{"type": "network", "path": "/proc/self/ns/net"}]),
        );
        assert!(matches!(
            pod_netns(&host),
            Err(PodSpecError::HostNamespace { kind, .. }) if kind == "network"
        ));
    }

    #[test]
    fn the_pod_shm_becomes_the_guest_tmpfs_in_place() {
        let mut s: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "annotations": {"io.kubernetes.cri.sandbox-id": "abc"},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev/shm", "type": "bind",
                 "source": "/run/containerd/io.containerd.grpc.v1.cri/sandboxes/abc/shm",
                 "options": ["rbind", "ro"]},
                {"destination": "/etc/hosts", "type": "bind", "source": "/x/hosts"},
            ],
        }))
        .unwrap();
        let taken = take_pod_shm(&mut s);
        assert_eq!(taken.as_ref().map(|t| t.0), Some(1));
        assert_eq!(s.mounts().as_ref().unwrap().len(), 2);
        restore_pod_shm(&mut s, taken);
        let m = &s.mounts().as_ref().unwrap()[1];
        assert_eq!(m.destination(), Path::new("/dev/shm"));
        assert_eq!(
            m.source().as_deref(),
            Some(Path::new(cocoon_protocol::GUEST_POD_SHM))
        );
        assert_eq!(
            m.options().as_deref(),
            Some(&["rbind".to_string(), "ro".to_string()][..])
        );
    }

    #[test]
    fn pod_annotations_size_the_vm_or_are_refused_by_name() {
        let mut s = pause(serde_json::json!([
            {"type": "network", "path": "/var/run/netns/cni-1"},
            {"type": "pid"},
            {"type": "ipc"},
        ]));
        let a = s.annotations_mut().get_or_insert_with(Default::default);
        a.insert(VCPUS_ANNOTATION.into(), "2".into());
        a.insert(MEMORY_ANNOTATION.into(), "384".into());
        a.insert(BLOCK_SLOTS_ANNOTATION.into(), "6".into());
        // `version = "0.1.0"` and `algorithm = "sha256"`.
        let doc = "dmVyc2lvbiA9ICIwLjEuMCIKYWxnb3JpdGhtID0gInNoYTI1NiIK";
        a.insert(INIT_DATA_ANNOTATION.into(), doc.into());
        let vm = pod_vm(&s, true).unwrap();
        assert_eq!((vm.vcpus, vm.memory_mib), (Some(2), Some(384)));
        assert_eq!(vm.block_slots, Some(6));
        assert_eq!(
            vm.init_data.as_deref(),
            Some(&b"version = \"0.1.0\"\nalgorithm = \"sha256\"\n"[..])
        );
        assert_eq!(vm.netns, Some(PathBuf::from("/var/run/netns/cni-1")));
        for (key, value, says) in [
            (VCPUS_ANNOTATION, "0", "1 to 64"),
            (VCPUS_ANNOTATION, "lots", "1 to 64"),
            (MEMORY_ANNOTATION, "32", "64 to 1048576"),
            (BLOCK_SLOTS_ANNOTATION, "9", "0 to 8"),
            (BLOCK_SLOTS_ANNOTATION, "-1", "0 to 8"),
            ("io.cocoon.vm.vcpu", "2", "not a Cocoon annotation"),
            (INIT_DATA_ANNOTATION, "%%%", "not base64"),
            // On the pod's sandbox: it would reach every container.
            (
                GUEST_IMAGE_ANNOTATION,
                "r.io/a@sha256:00",
                "container annotation",
            ),
            (KBS_SECRETS_ANNOTATION, "", "one line"),
            (GUEST_PULL_ANNOTATION, "yes", "true or false"),
            // `version = "0.1.0"` with no algorithm.
            (
                INIT_DATA_ANNOTATION,
                "dmVyc2lvbiA9ICIwLjEuMCIK",
                "algorithm",
            ),
        ] {
            let mut bad = s.clone();
            bad.annotations_mut()
                .get_or_insert_with(Default::default)
                .insert(key.into(), value.into());
            let e = pod_vm(&bad, true).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(says), "{e}");
        }
    }

    #[test]
    fn a_confidential_pod_is_refused_never_started_unprotected() {
        for kind in ["sev-snp", "tdx"] {
            let s = pause_with(serde_json::json!({ CONFIDENTIAL_ANNOTATION: kind }));
            let e = pod_vm(&s, true).unwrap_err();
            assert_eq!(e, PodSpecError::Confidential(kind.into()));
            assert!(e.to_string().contains("refused"), "{e}");
        }
        let s = pause_with(serde_json::json!({ CONFIDENTIAL_ANNOTATION: "sgx" }));
        let e = pod_vm(&s, true).unwrap_err().to_string();
        assert!(e.contains("sev-snp or tdx"), "{e}");
    }

    fn pause_with(extra: serde_json::Value) -> Spec {
        let mut annotations = serde_json::json!({
            "io.kubernetes.cri.sandbox-id": "abc",
            "io.kubernetes.cri.container-type": "sandbox",
        });
        for (k, v) in extra.as_object().unwrap() {
            annotations[k] = v.clone();
        }
        spec(
            annotations,
            serde_json::json!([
                {"type": "network", "path": "/var/run/netns/cni-1"},
                {"type": "pid"},
                {"type": "ipc"}
            ]),
        )
    }
}
