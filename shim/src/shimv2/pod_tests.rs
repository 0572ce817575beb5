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
    let s = app(serde_json::json!({GUEST_PULL_ANNOTATION: "true", IMAGE_NAME_ANNOTATION: named}));
    assert_eq!(guest_image(&s), Ok(Some(named.clone())));
    // The container's own annotation wins; without either, the host's root is used.
    let own = format!("other.io/x@{digest}");
    let s = app(
        serde_json::json!({GUEST_PULL_ANNOTATION: "true", IMAGE_NAME_ANNOTATION: named, GUEST_IMAGE_ANNOTATION: own}),
    );
    assert_eq!(guest_image(&s), Ok(Some(own)));
    let s = app(serde_json::json!({GUEST_PULL_ANNOTATION: "false", IMAGE_NAME_ANNOTATION: named}));
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
        let s =
            app(serde_json::json!({GUEST_PULL_ANNOTATION: "true", IMAGE_NAME_ANNOTATION: given}));
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

/// A `hostUsers: false` pod's sandbox makes the pod's user namespace in the guest
/// (containerd's pinned one is the host's), and a network namespace of its own there,
/// which the pod's user namespace owns; its other containers keep their paths, which
/// name the sandbox's namespaces in the guest.
#[test]
fn a_user_namespaced_pods_sandbox_makes_its_own_namespaces_in_the_guest() {
    let mut s = pause(serde_json::json!([
        {"type": "network", "path": "/var/run/netns/cni-1234"},
        {"type": "user", "path": "/var/lib/containerd/pinned-namespaces/user-abc"},
        {"type": "pid"},
    ]));
    own_user_namespace(&mut s);
    adapt_spec(&mut s);
    let ns = s.linux().as_ref().unwrap().namespaces().clone().unwrap();
    assert_eq!(ns.len(), 3);
    assert!(ns.iter().all(|n| n.path().is_none()), "{ns:?}");
    let workload = || {
        spec(
            serde_json::json!({
                "io.kubernetes.cri.sandbox-id": "abc",
                "io.kubernetes.cri.container-type": "container",
            }),
            serde_json::json!([
                {"type": "network", "path": "/proc/7/ns/net"},
                {"type": "user", "path": "/proc/7/ns/user"},
                {"type": "mount"},
            ]),
        )
    };
    let mut w = workload();
    own_user_namespace(&mut w);
    adapt_spec(&mut w);
    assert_eq!(w, workload());
    // Without a user namespace, the network path goes as before.
    let mut plain = pause(serde_json::json!([
        {"type": "network", "path": "/var/run/netns/cni-1234"},
        {"type": "pid"},
    ]));
    own_user_namespace(&mut plain);
    adapt_spec(&mut plain);
    let ns = plain
        .linux()
        .as_ref()
        .unwrap()
        .namespaces()
        .clone()
        .unwrap();
    assert_eq!(ns.len(), 1);
}
