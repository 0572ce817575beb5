//! `ctr run --device` of a host block device, under runc and under cocoon: on QEMU's
//! `pc`, which plugs the device as a virtio-blk disk after boot, and on the default
//! microvm, which swaps it into a disk slot its VM booted with (`cri_block.rs` has the
//! CRI side and the refusal of a VM without slots). Both pin QEMU: `auto` would take
//! cocoon-vmm on a host with hardware KVM, and these machines would go untested.

mod ctr_common;

use std::time::Duration;

use cocoon_integration::loopdev::{held_after, Loop};
use ctr_common::*;

#[test]
fn a_host_block_device_is_the_containers() {
    let env = env_with("hypervisor = \"qemu\"\n", "[qemu]\nmachine = \"pc\"\n");
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = same_device_as_runc(&env, dir.path(), "a_host_block_device_is_the_containers")
    else {
        return;
    };
    let dev = disk.dev.to_string_lossy().into_owned();

    // `--privileged` lists every block device of the host, under one rule allowing
    // all: under cocoon none of them reaches the VM (the node's disks are never given
    // wholesale), where runc's container has them all.
    let probe = format!("test -e {dev}; echo has-host-disk=$?");
    let out = ctr_run(
        &env,
        COCOON,
        "blk-priv",
        &["--privileged"],
        &["sh", "-c", &probe],
    );
    assert_eq!(
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).as_ref()
        ),
        (Some(0), "has-host-disk=1\n"),
        "{}",
        show(&out)
    );
    let out = ctr_run(
        &env,
        RUNC,
        "blk-priv-runc",
        &["--privileged"],
        &["sh", "-c", &probe],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "has-host-disk=0\n");
    assert_clean(&env);
    let held = held_after(&[&disk], Duration::from_secs(30));
    assert!(held.is_empty(), "held after the privileged tasks: {held:?}");
}

/// The default machine, microvm: the device goes into one of its VM's disk slots.
#[test]
fn on_microvm_a_host_block_device_is_the_containers() {
    let env = env_with("hypervisor = \"qemu\"\n", "");
    let dir = tempfile::tempdir().unwrap();
    same_device_as_runc(
        &env,
        dir.path(),
        "on_microvm_a_host_block_device_is_the_containers",
    );
}

/// `ctr run --device` of a new loop device under both runtimes: the same node type, the
/// host's bytes, a write the host then reads; nothing holds the device afterwards. The
/// device, for more (`None` where there is none, under `CI` a failure).
fn same_device_as_runc(env: &Env, dir: &std::path::Path, test: &str) -> Option<Loop> {
    let disk = match Loop::new(dir, "disk.img", b"host-marker") {
        Ok(l) => l,
        Err(why) => {
            cocoon_nested::testing::missing(test, &why);
            return None;
        }
    };
    let dev = disk.dev.to_string_lossy().into_owned();
    // ctr gives the device the host's path in the container.
    let script = format!(
        "ls -l {dev} | cut -c1; dd if={dev} bs=11 count=1 2>/dev/null; echo; \
         echo ctr-wrote | dd of={dev} bs=512 seek=2 conv=notrunc,fsync 2>/dev/null; \
         echo write=$?"
    );
    let out = same_in(env, "blk", &["--device", &dev], &["sh", "-c", &script]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "b\nhost-marker\nwrite=0\n",
        "{test}"
    );
    assert_eq!(
        &std::fs::read(&disk.file).unwrap()[1024..1034],
        b"ctr-wrote\n",
        "{test}"
    );
    assert_clean(env);
    let held = held_after(&[&disk], Duration::from_secs(30));
    assert!(held.is_empty(), "{test}: held after the tasks: {held:?}");
    Some(disk)
}
