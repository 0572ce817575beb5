//! `ctr run --device` of a host block device, under runc and under cocoon (QEMU's `pc`,
//! which takes the device as a virtio-blk disk after boot; `cri_block.rs` has the CRI
//! side and the refusal on microvm).

mod ctr_common;

use std::time::Duration;

use cocoon_integration::loopdev::{held_after, Loop};
use ctr_common::*;

#[test]
fn a_host_block_device_is_the_containers() {
    let env = env_with("", "[qemu]\nmachine = \"pc\"\n");
    let dir = tempfile::tempdir().unwrap();
    let disk = match Loop::new(dir.path(), "disk.img", b"host-marker") {
        Ok(l) => l,
        Err(why) => {
            cocoon_nested::testing::missing("a_host_block_device_is_the_containers", &why);
            return;
        }
    };
    let dev = disk.dev.to_string_lossy().into_owned();
    // ctr gives the device the host's path in the container.
    let script = format!(
        "ls -l {dev} | cut -c1; dd if={dev} bs=11 count=1 2>/dev/null; echo; \
         echo ctr-wrote | dd of={dev} bs=512 seek=2 conv=notrunc,fsync 2>/dev/null; \
         echo write=$?"
    );
    let out = same_in(&env, "blk", &["--device", &dev], &["sh", "-c", &script]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "b\nhost-marker\nwrite=0\n"
    );
    assert_eq!(
        &std::fs::read(&disk.file).unwrap()[1024..1034],
        b"ctr-wrote\n"
    );
    assert_clean(&env);
    let held = held_after(&[&disk], Duration::from_secs(30));
    assert!(held.is_empty(), "held after the tasks: {held:?}");

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
