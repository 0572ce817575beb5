//! Raw block volumes (Kubernetes `volumeDevices`: a CRI container's `devices`) under runc
//! and under cocoon. containerd puts the host device's major:minor in the spec; under
//! cocoon the shim plugs the host's device into the pod VM as a virtio-blk disk (QEMU's
//! `pc`, through QMP; `shim/src/hypervisor/disks.rs`) or puts it in one of the disk
//! slots the VM booted with (QEMU's microvm, `hypervisor/qemu_slots.rs`; cocoon-vmm,
//! `hypervisor/slots.rs`, rerun in L1), and the agent gives the container the guest
//! disk's numbers. The container must see the same
//! device, read what the host wrote, write what the host then reads, and be refused
//! writes where its permissions say read-only; once it is removed, no process of the
//! pod holds the device.

mod common;

use std::time::Duration;

use cocoon_integration::cri::{CriNode, COCOON, RUNC};
use cocoon_integration::image::IMAGE_REF;
use cocoon_integration::loopdev::{held_after, Loop};
use cocoon_nested::testing::{hardware_kvm, Place};
use k8s_cri::v1::{Device, RemoveContainerRequest, StopContainerRequest};

/// Where cocoon's pod runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Vm {
    /// QEMU `pc`: disks plugged into its PCI bus.
    Pc,
    /// QEMU microvm: disks swapped into its slots, writable and read-only ones.
    Microvm,
    /// QEMU microvm with `block_slots = 0`: no disk after boot.
    NoSlots,
    /// cocoon-vmm: disks put in its slots.
    Slots,
}

#[tokio::test]
async fn runc_a_block_device_is_the_containers() {
    a_block_device_is_the_containers("runc_a_block_device_is_the_containers", RUNC, 90, Vm::Pc)
        .await;
}

#[test]
fn cocoon_a_block_device_is_the_containers() {
    on_qemu("cocoon_a_block_device_is_the_containers", 91, Vm::Pc);
}

/// Runs a case of cocoon on QEMU, whatever the host would pick: `auto` takes cocoon-vmm
/// on a host with hardware KVM, and the machine the case names would go untested.
fn on_qemu(test: &str, net: u8, vm: Vm) {
    // SAFETY: set before any thread of this test starts; the test runs alone in its
    // process (nextest's process per test).
    unsafe { std::env::set_var("COCOON_TEST_HYPERVISOR", "qemu") };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(a_block_device_is_the_containers(test, COCOON, net, vm));
}

/// cocoon-vmm (hardware KVM: rerun in L1), where each disk goes into a slot the VM
/// booted with, and a slot is used again by the next disk.
#[test]
fn cocoon_vmm_a_block_device_is_the_containers() {
    let test = "cocoon_vmm_a_block_device_is_the_containers";
    if hardware_kvm(test) == Place::Done {
        return;
    }
    // SAFETY: set before any thread of this test starts; the test runs alone in its
    // process (libtest's --exact inside L1, or nextest's process per test).
    unsafe { std::env::set_var("COCOON_TEST_HYPERVISOR", "cocoon-vmm") };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(a_block_device_is_the_containers(
        test,
        COCOON,
        93,
        Vm::Slots,
    ));
}

/// On the default machine (microvm), where each disk is swapped into a slot the VM
/// booted with (half of them read-only), and a slot is used again by the next disk.
#[test]
fn cocoon_microvm_a_block_device_is_the_containers() {
    on_qemu(
        "cocoon_microvm_a_block_device_is_the_containers",
        92,
        Vm::Microvm,
    );
}

/// A VM with no disk slots takes no device after boot: the container's create fails,
/// saying what would take it, and the pod goes on.
#[test]
fn cocoon_without_slots_refuses_a_block_device_naming_what_would_take_it() {
    on_qemu(
        "cocoon_without_slots_refuses_a_block_device_naming_what_would_take_it",
        94,
        Vm::NoSlots,
    );
}

/// The container's view, the same under both runtimes: the node is a block device, it
/// reads what the host wrote at the start, its write reaches the device, and the
/// read-only device refuses a write.
const SCRIPT: &str = "ls -l /dev/xvda | cut -c1; \
    dd if=/dev/xvda bs=11 count=1 2>/dev/null; echo; \
    echo guest-wrote | dd of=/dev/xvda bs=512 seek=1 conv=notrunc,fsync 2>/dev/null; \
    echo write=$?; \
    dd if=/dev/xvdb bs=9 count=1 2>/dev/null; echo; \
    (echo no > /dev/xvdb) 2>/dev/null; echo ro-write=$?";

async fn a_block_device_is_the_containers(test: &str, handler: &str, net: u8, vm: Vm) {
    let tables = if vm == Vm::Pc {
        "[qemu]\nmachine = \"pc\"\n"
    } else {
        ""
    };
    let vm_keys = if vm == Vm::NoSlots {
        "block_slots = 0\n"
    } else {
        ""
    };
    let slotted = matches!(vm, Vm::Slots | Vm::Microvm);
    let Some(env) = common::env_vm(test, handler, net, false, vm_keys, tables).await else {
        return;
    };
    let node = &env.node;
    let (rw, ro) = match (
        Loop::new(env.dir.path(), "rw.img", b"host-marker"),
        Loop::new(env.dir.path(), "ro.img", b"ro-marker"),
    ) {
        (Ok(rw), Ok(ro)) => (rw, ro),
        (Err(why), _) | (_, Err(why)) => {
            cocoon_nested::testing::missing(test, &format!("a loop device: {why}"));
            return;
        }
    };
    let mut pconfig = node.pod_config("disks", &format!("uid-disks-{net}"), "default");
    // Two slots of its own, where the node's default is 4: the container's two devices
    // fill them (on microvm, its one writable and one read-only slot), and a third is
    // refused.
    let extra = if slotted {
        pconfig
            .annotations
            .insert("io.cocoon.vm.block_slots".into(), "2".into());
        match Loop::new(env.dir.path(), "extra.img", b"extra-marker") {
            Ok(l) => Some(l),
            Err(why) => {
                cocoon_nested::testing::missing(test, &format!("a loop device: {why}"));
                return;
            }
        }
    } else {
        None
    };
    let pod = node
        .run_pod(&pconfig, handler)
        .await
        .unwrap_or_else(|e| panic!("{test}: RunPodSandbox: {e}\n{}", node.log_tail()));
    let mut c = CriNode::container_config("app", IMAGE_REF, &["sleep", "3600"], &[]);
    c.devices = vec![
        Device {
            container_path: "/dev/xvda".into(),
            host_path: rw.dev.to_string_lossy().into_owned(),
            permissions: "rwm".into(),
        },
        Device {
            container_path: "/dev/xvdb".into(),
            host_path: ro.dev.to_string_lossy().into_owned(),
            permissions: "r".into(),
        },
    ];
    let created = node.create_and_start(&pod, &c, &pconfig).await;
    if vm == Vm::NoSlots {
        let e = created.expect_err("a block device in a VM without slots");
        assert!(
            e.message().contains("vm.block_slots above 0")
                && e.message().contains("qemu.machine = \"pc\""),
            "{test}: the error does not say what would take it: {e}"
        );
        // The pod is still there for containers without devices.
        let plain = CriNode::container_config("plain", IMAGE_REF, &["sleep", "3600"], &[]);
        let ctr = node
            .create_and_start(&pod, &plain, &pconfig)
            .await
            .unwrap_or_else(|e| panic!("{test}: a plain container after the refusal: {e}"));
        let (code, out, _) = node
            .exec_sync(&ctr, &["echo", "alive"], Duration::from_secs(30))
            .await
            .expect("ExecSync");
        assert_eq!((code, out.as_str()), (0, "alive\n"), "{test}");
        node.stop_and_remove_pod(&pod).await.expect("stop/remove");
        let held = held_after(&[&rw, &ro], Duration::from_secs(30));
        assert!(held.is_empty(), "{test}: {held:?}");
        return;
    }
    let ctr = created.unwrap_or_else(|e| panic!("{test}: create/start: {e}\n{}", node.log_tail()));
    let (code, out, err) = node
        .exec_sync(&ctr, &["sh", "-c", SCRIPT], Duration::from_secs(60))
        .await
        .expect("ExecSync");
    assert_eq!(
        (code, out.as_str()),
        (0, "b\nhost-marker\nwrite=0\nro-marker\nro-write=1\n"),
        "{test}: {err}\n{}",
        node.log_tail()
    );
    if handler == COCOON {
        // The disk itself is read-only for the `r` device, not only its cgroup rule.
        let (code, out, err) = node
            .exec_sync(
                &ctr,
                &[
                    "sh",
                    "-c",
                    "blockdev --getro /dev/xvda; blockdev --getro /dev/xvdb",
                ],
                Duration::from_secs(30),
            )
            .await
            .expect("ExecSync");
        assert_eq!((code, out.as_str()), (0, "0\n1\n"), "{test}: {err}");
    }
    if let Some(extra) = &extra {
        let mut third = CriNode::container_config("third", IMAGE_REF, &["true"], &[]);
        third.devices = vec![Device {
            container_path: "/dev/xvdc".into(),
            host_path: extra.dev.to_string_lossy().into_owned(),
            permissions: "rwm".into(),
        }];
        let e = node
            .create_and_start(&pod, &third, &pconfig)
            .await
            .expect_err("a third device in a pod of two disk slots");
        assert!(
            e.message().contains("2 disk slots (vm.block_slots"),
            "{test}: the refusal does not name the pod's slots: {e}"
        );
    }
    if slotted {
        // Written without a sync: the guest holds it dirty until the container's
        // removal writes it back, before the slot is emptied.
        let (code, _, err) = node
            .exec_sync(
                &ctr,
                &[
                    "sh",
                    "-c",
                    "echo unsynced | dd of=/dev/xvda bs=512 seek=3 conv=notrunc",
                ],
                Duration::from_secs(30),
            )
            .await
            .expect("ExecSync");
        assert_eq!(code, 0, "{test}: {err}");
    }
    // The write reached the host's device, and through it the file.
    let bytes = std::fs::read(&rw.file).unwrap();
    assert_eq!(&bytes[512..524], b"guest-wrote\n", "{test}");
    assert_eq!(
        &std::fs::read(&ro.file).unwrap()[..9],
        b"ro-marker",
        "{test}"
    );

    // The container goes: nothing of the pod holds either device any more (under
    // cocoon, the guest let the disks go and QEMU closed them), while the pod runs.
    stop_and_remove(node, &ctr, test).await;
    let held = held_after(&[&rw, &ro], Duration::from_secs(30));
    assert!(
        held.is_empty(),
        "{test}: still held after the container's removal: {held:?}\n{}",
        node.log_tail()
    );
    if let Some(extra) = &extra {
        assert_eq!(
            &std::fs::read(&rw.file).unwrap()[1536..1545],
            b"unsynced\n",
            "{test}: the unsynced write was lost when the slot was emptied"
        );
        // A read-only device alone now goes into a slot another disk had: on
        // cocoon-vmm the read-only device into the writable one's slot; on microvm
        // another device of the same size into the one read-only slot, under the same
        // serial. The guest reads its bytes, not what it cached of the slot's last disk.
        let (next, marker) = if vm == Vm::Slots {
            (&ro, "ro-marker")
        } else {
            (extra, "extra-mar")
        };
        let mut only_ro = CriNode::container_config("ro", IMAGE_REF, &["sleep", "3600"], &[]);
        only_ro.devices = vec![Device {
            container_path: "/dev/xvda".into(),
            host_path: next.dev.to_string_lossy().into_owned(),
            permissions: "r".into(),
        }];
        let ctr = node
            .create_and_start(&pod, &only_ro, &pconfig)
            .await
            .unwrap_or_else(|e| panic!("{test}: the slot again: {e}\n{}", node.log_tail()));
        let (code, out, err) = node
            .exec_sync(
                &ctr,
                &[
                    "sh",
                    "-c",
                    "dd if=/dev/xvda bs=9 count=1 2>/dev/null; echo; blockdev --getro /dev/xvda",
                ],
                Duration::from_secs(60),
            )
            .await
            .expect("ExecSync");
        assert_eq!(
            (code, out.as_str()),
            (0, format!("{marker}\n1\n").as_str()),
            "{test}: {err}"
        );
        stop_and_remove(node, &ctr, test).await;
    }
    // A new container takes the device again (a new disk in the same VM).
    let ctr = node
        .create_and_start(&pod, &c, &pconfig)
        .await
        .unwrap_or_else(|e| panic!("{test}: create again: {e}\n{}", node.log_tail()));
    let (code, out, err) = node
        .exec_sync(
            &ctr,
            &["dd", "if=/dev/xvda", "bs=512", "skip=1", "count=1"],
            Duration::from_secs(60),
        )
        .await
        .expect("ExecSync");
    assert!(
        code == 0 && out.starts_with("guest-wrote\n"),
        "{test}: {code} {out:?} {err}"
    );
    if slotted {
        // The writable device is back in a slot a read-only one last had (cocoon-vmm)
        // or in its writable slot (microvm): it is writable in the guest again.
        let (code, out, err) = node
            .exec_sync(
                &ctr,
                &[
                    "sh",
                    "-c",
                    "blockdev --getro /dev/xvda; echo again | dd of=/dev/xvda bs=512 \
                     seek=5 conv=notrunc,fsync 2>/dev/null; echo write=$?",
                ],
                Duration::from_secs(60),
            )
            .await
            .expect("ExecSync");
        assert_eq!((code, out.as_str()), (0, "0\nwrite=0\n"), "{test}: {err}");
    }
    node.stop_and_remove_pod(&pod).await.expect("stop/remove");
    let mut devices = vec![&rw, &ro];
    devices.extend(extra.as_ref());
    let held = held_after(&devices, Duration::from_secs(30));
    assert!(held.is_empty(), "{test}: held after the pod: {held:?}");
}

/// Stops (at once) and removes a container of the pod.
async fn stop_and_remove(node: &CriNode, ctr: &str, test: &str) {
    let mut rt = node.runtime();
    rt.stop_container(StopContainerRequest {
        container_id: ctr.to_owned(),
        timeout: 0,
    })
    .await
    .unwrap_or_else(|e| panic!("{test}: StopContainer: {e}"));
    rt.remove_container(RemoveContainerRequest {
        container_id: ctr.to_owned(),
    })
    .await
    .unwrap_or_else(|e| panic!("{test}: RemoveContainer: {e}"));
}
