//! A CRI pod whose container image the guest pulls itself (`io.cocoon.guest-image`), by
//! digest, from a registry on the pod network's gateway: the container runs from the
//! pulled root filesystem, the host shares none for it, and a digest the registry lacks
//! fails CreateContainer with the reason.

use std::net::Ipv4Addr;
use std::time::Duration;

mod common;

use cocoon_integration::cri::{CriNode, COCOON};
use cocoon_integration::image::IMAGE_REF;
use cocoon_nested::registry::{layer, Registry, E};
use common::env;

const GUEST_PULL_NET: u8 = 45;

/// A minimal image: busybox, a shell, and a file saying where it came from.
fn image_layers() -> Vec<Vec<u8>> {
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (busybox-static)");
    vec![layer(&[
        E::Dir("bin"),
        E::File("bin/busybox", &busybox, 0o755),
        E::Link("bin/sh", "busybox"),
        E::Link("bin/cat", "busybox"),
        E::Link("bin/sleep", "busybox"),
        E::Link("bin/ls", "busybox"),
        E::Dir("etc"),
        E::File("etc/pulled", b"pulled in the guest\n", 0o644),
    ])]
}

#[tokio::test]
async fn cocoon_pod_runs_an_image_the_guest_pulled() {
    let test = "cocoon_pod_runs_an_image_the_guest_pulled";
    let Some(env) = env(test, COCOON, GUEST_PULL_NET).await else {
        return;
    };
    let node = &env.node;
    let pconfig = node.pod_config("pulled", "uid-pulled", "default");
    let pod = node
        .run_pod(&pconfig, COCOON)
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", node.log_tail()));
    // The bridge and its gateway address exist once the pod's network does.
    let gateway: Ipv4Addr = node.gateway();
    let Some(registry) = Registry::start_on(test, gateway) else {
        return;
    };
    let digest = registry.push_image("cocoon/pulled", &image_layers());

    let mut c = CriNode::container_config("app", IMAGE_REF, &["/bin/sleep", "3600"], &[]);
    c.annotations.insert(
        "io.cocoon.guest-image".into(),
        registry.reference("cocoon/pulled", &digest),
    );
    let app = node
        .create_and_start(&pod, &c, &pconfig)
        .await
        .unwrap_or_else(|e| panic!("{test}: create/start: {e}\n{}", node.log_tail()));
    let (code, out, err) = node
        .exec_sync(&app, &["/bin/cat", "/etc/pulled"], Duration::from_secs(30))
        .await
        .expect("ExecSync cat");
    assert_eq!(
        (code, out.as_str()),
        (0, "pulled in the guest\n"),
        "{test}: {err}"
    );
    // Its root is the pulled image, not the host's busybox image (which has /usr).
    let (_, out, _) = node
        .exec_sync(&app, &["/bin/ls", "/"], Duration::from_secs(30))
        .await
        .expect("ExecSync ls");
    assert!(
        !out.split_whitespace().any(|e| e == "usr"),
        "{test}: / holds {out:?}"
    );
    // The host shares no root filesystem for it.
    let run = env.dir.path().join("run");
    let shared: Vec<_> = cocoon_integration::mounts_under(&run)
        .into_iter()
        .filter(|m| m.to_string_lossy().contains(&format!("{app}/rootfs")))
        .collect();
    assert!(
        shared.is_empty(),
        "{test}: the host mounted a rootfs for it: {shared:?}"
    );

    // A digest the registry does not have: CreateContainer fails, naming it.
    let missing = format!("sha256:{}", "0".repeat(64));
    let mut bad = CriNode::container_config("missing", IMAGE_REF, &["/bin/sleep", "3600"], &[]);
    bad.annotations.insert(
        "io.cocoon.guest-image".into(),
        registry.reference("cocoon/pulled", &missing),
    );
    let e = node
        .create_and_start(&pod, &bad, &pconfig)
        .await
        .expect_err("a missing digest was pulled");
    assert!(
        e.message().contains(&missing) && e.message().contains("not in the registry"),
        "{test}: {e}"
    );
    node.stop_and_remove_pod(&pod)
        .await
        .expect("stop/remove pod");
    let left = cocoon_integration::mounts_under(&run);
    assert!(left.is_empty(), "{test}: mounts left: {left:?}");
}
