//! A Kubernetes in-place resize of a container's memory: UpdateContainerResources raises
//! its limit, and the container can then use what the new limit allows, under runc and
//! under cocoon. Under cocoon that needs memory the VM did not boot with: with `[vm]
//! hotplug_memory` the VM has a virtio-mem device, and the shim has the guest plug more
//! of it before the update returns (`shim/src/hypervisor/memctl.rs`).

mod common;

use std::time::Duration;

use cocoon_integration::cri::{CriNode, COCOON, RUNC};
use cocoon_integration::image::IMAGE_REF;
use cocoon_nested::testing::{hardware_kvm, Place};
use cocoon_shim::shimv2::timings;
use k8s_cri::v1::{LinuxContainerResources, UpdateContainerResourcesRequest};

#[tokio::test]
async fn runc_a_raised_memory_limit_can_be_used() {
    a_raised_memory_limit_can_be_used("runc_a_raised_memory_limit_can_be_used", RUNC, 86).await;
}

#[tokio::test]
async fn cocoon_a_raised_memory_limit_can_be_used() {
    a_raised_memory_limit_can_be_used("cocoon_a_raised_memory_limit_can_be_used", COCOON, 87).await;
}

/// The same on cocoon-vmm (hardware KVM, or else inside L1), whose own virtio-mem device
/// the guest plugs.
#[test]
fn cocoon_vmm_a_raised_memory_limit_can_be_used() {
    on_cocoon_vmm("cocoon_vmm_a_raised_memory_limit_can_be_used", false, 88);
}

/// And a pod restored from a VM template (`[vm] templates`), made before anything was
/// plugged: the clone's device starts as the template's, and grows the same.
#[test]
fn cocoon_vmm_a_pod_from_a_template_grows_its_memory() {
    on_cocoon_vmm(
        "cocoon_vmm_a_pod_from_a_template_grows_its_memory",
        true,
        89,
    );
}

/// Runs the test on cocoon-vmm (hardware KVM, or else inside L1), pods restored from VM
/// templates when `templates`.
fn on_cocoon_vmm(test: &str, templates: bool, net: u8) {
    if hardware_kvm(test) == Place::Done {
        return;
    }
    // SAFETY: set before any thread of this test starts; the test runs alone in its
    // process (libtest's --exact inside L1, or nextest's process per test).
    unsafe {
        std::env::set_var("COCOON_TEST_HYPERVISOR", "cocoon-vmm");
        if templates {
            std::env::set_var("COCOON_TEST_TEMPLATES", "1");
        }
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(a_raised_memory_limit_can_be_used(test, COCOON, net));
}

/// Touches the MiB it is given, a page at a time, and says so: what an application
/// that grows into its raised limit does. Static: the test image has no C library.
const TOUCH_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int main(int argc, char **argv) {
    long mib = argc > 1 ? atol(argv[1]) : 0;
    char *p = malloc(mib << 20);
    if (!p) {
        printf("malloc failed\n");
        return 1;
    }
    for (long i = 0; i < (mib << 20); i += 4096)
        p[i] = 1;
    printf("touched %ld MiB\n", mib);
    return 0;
}
"#;

/// The guest's memory as its kernel counts it (under runc, the host's).
async fn mem_total_kib(node: &CriNode, ctr: &str, test: &str) -> u64 {
    let (code, out, err) = node
        .exec_sync(
            ctr,
            &["grep", "MemTotal", "/proc/meminfo"],
            Duration::from_secs(30),
        )
        .await
        .expect("ExecSync");
    assert_eq!(code, 0, "{test}: {out}{err}");
    out.split_whitespace()
        .nth(1)
        .and_then(|k| k.parse().ok())
        .unwrap_or_else(|| panic!("{test}: MemTotal in {out:?}"))
}

/// A pod whose VM boots with the config's 256 MiB and room up to 1 GiB: its container,
/// limited to 64 MiB, has its limit raised to 640 MiB and then touches 400 MiB, more
/// than the VM has before the update. Without the plug, the guest's OOM killer ends it.
async fn a_raised_memory_limit_can_be_used(test: &str, handler: &str, net: u8) {
    let keys = "hotplug_memory = true\nmax_memory_mib = 1024\n";
    // QEMU's virtio-mem is a PCI device with a region only the pc machine has.
    let tables = "[qemu]\nmachine = \"pc\"\n";
    let Some(env) = common::env_vm(test, handler, net, false, keys, tables).await else {
        return;
    };
    let node = &env.node;
    let tools = env.dir.path().join("tools");
    std::fs::create_dir_all(&tools).unwrap();
    if let Err(why) = cocoon_integration::build_static_c(&tools, "touch", TOUCH_C) {
        cocoon_nested::testing::missing(test, &why);
        return;
    }
    let pconfig = node.pod_config("resized", "uid-resized", "default");
    let pod = node
        .run_pod(&pconfig, handler)
        .await
        .unwrap_or_else(|e| panic!("{test}: RunPodSandbox: {e}\n{}", node.log_tail()));
    let mut c = CriNode::container_config("app", IMAGE_REF, &["sleep", "3600"], &[]);
    c.mounts = vec![k8s_cri::v1::Mount {
        host_path: tools.to_string_lossy().into_owned(),
        container_path: "/tools".into(),
        readonly: true,
        ..Default::default()
    }];
    c.linux
        .get_or_insert_with(Default::default)
        .resources
        .get_or_insert_with(Default::default)
        .memory_limit_in_bytes = 64 << 20;
    let ctr = node
        .create_and_start(&pod, &c, &pconfig)
        .await
        .unwrap_or_else(|e| panic!("{test}: create/start: {e}\n{}", node.log_tail()));
    let before = mem_total_kib(node, &ctr, test).await;
    node.runtime()
        .update_container_resources(UpdateContainerResourcesRequest {
            container_id: ctr.clone(),
            linux: Some(LinuxContainerResources {
                memory_limit_in_bytes: 640 << 20,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{test}: UpdateContainerResources: {e}"));
    let after = mem_total_kib(node, &ctr, test).await;
    let (code, out, err) = node
        .exec_sync(&ctr, &["/tools/touch", "400"], Duration::from_secs(120))
        .await
        .expect("ExecSync");
    assert_eq!(
        (code, out.as_str()),
        (0, "touched 400 MiB\n"),
        "{test}: {err}\nMemTotal {before} kB before the update, {after} kB after\n{}",
        node.log_tail()
    );
    if handler == COCOON {
        // The guest booted with 256 MiB and had a block of 128 plugged for the limit
        // the container was created with (the pod's resources said nothing of it); the
        // raised limit asks 256 + 640, so 640 beyond the boot's 256: 512 more.
        assert!(
            before < 400 << 10 && after >= before + (500 << 10),
            "{test}: MemTotal {before} kB before the update, {after} kB after"
        );
        // The kernel sized its thread table for the 256 MiB it booted with (about
        // 2 000); the shim asked for the host's, or 1 GiB's worth (what the VM may
        // grow to) if that is more.
        let (code, out, err) = node
            .exec_sync(
                &ctr,
                &["cat", "/proc/sys/kernel/threads-max"],
                Duration::from_secs(30),
            )
            .await
            .expect("ExecSync");
        let hosts = cocoon_shim::hypervisor::host_sysctl("kernel.threads-max").unwrap();
        let want = hosts.max(8192).to_string();
        assert_eq!((code, out.trim()), (0, want.as_str()), "{test}: {err}");
    }
    node.stop_and_remove_pod(&pod).await.expect("stop/remove");
    if std::env::var("COCOON_TEST_TEMPLATES").is_ok_and(|v| v == "1") {
        // The records are written as containers are deleted.
        let records: Vec<_> = timings::read(&env.dir.path().join("run"))
            .into_iter()
            .filter(|r| r.kind == "container" && r.vm_launch_ms > 0.0)
            .collect();
        assert!(
            records.len() == 1 && records[0].from_template,
            "{test}: the pod's VM was not restored from a template: {records:?}"
        );
    }
}
