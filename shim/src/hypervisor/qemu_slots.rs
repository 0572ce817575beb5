//! Raw block devices on QEMU's microvm, which has no bus a disk can join after boot. As
//! on cocoon-vmm (`slots`), the VM boots with empty virtio-blk slots (`[vm]
//! block_slots`), and the shim swaps a host device in under a slot's device, and out
//! again, over QMP. A slot is a `raw` node (`slotN`) the device sits on, over an empty
//! memfd placeholder (`phN`) handed over at launch, so the jailed QEMU opens no path.
//!
//! - In: the host device's node is made (`add-fd`, `blockdev-add`, as for `pc`),
//!   `blockdev-reopen` moves the slot's node onto it, and a `block_resize` to its size
//!   tells the guest's driver (a resize is what raises the device's configuration
//!   interrupt).
//! - Out: the slot's node goes back onto its placeholder, resized to 0, and the host
//!   node is deleted: QEMU closes the device at once, whatever the guest does.
//!
//! A virtio-blk device settles its write permission when it is made: a writable slot
//! cannot take a read-only node, and a read-only node cannot be resized. So the first
//! half of the slots (rounded up) are writable and the rest are made read-only at boot
//! (the guest sees VIRTIO_BLK_F_RO). A read-only slot learns its capacity from its
//! placeholder: grown (sparse; the device holds no write permission, so no guest write
//! reaches it) to the disk's size before the slot moves onto the disk, and truncated
//! again when it leaves; its node is writable only for the moment of each resize.
//! Both swaps were tried in a real guest first (`docs/notes.md`): it reads each disk's
//! own bytes, never what it cached of the slot's last one.
//!
//! A slot's serial is fixed at boot (`cocoon-slotN`); the agent waits for the serial
//! and the disk's size.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use tokio::time::Instant;

use super::disks::{self, HostDisk};
use super::memctl::MemctlError;
use super::qmp::Session;

/// The descriptor sets the placeholders are handed over in (`-add-fd`); the sets QEMU
/// numbers itself for `add-fd` over QMP start from 0.
const FDSET_BASE: u64 = 100;

/// Whether slot `slot` of `count` takes writable disks (the rest take read-only ones).
pub fn writable(slot: u8, count: u8) -> bool {
    slot < count - count / 2
}

/// The serial the guest sees on slot `slot`, whatever disk is in it.
pub fn serial(slot: u8) -> String {
    format!("cocoon-slot{slot}")
}

/// One empty placeholder per slot, for QEMU to inherit.
pub fn placeholders(count: u8) -> std::io::Result<Vec<OwnedFd>> {
    (0..count)
        .map(|i| {
            let name = format!("cocoon-slot{i}");
            nix::sys::memfd::memfd_create(name.as_str(), nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .map_err(std::io::Error::from)
        })
        .collect()
}

/// QEMU's arguments for a microvm's slots, one per placeholder.
pub fn args(placeholders: &[OwnedFd]) -> Vec<String> {
    let count = placeholders.len() as u8;
    let mut a = Vec::new();
    for (i, fd) in placeholders.iter().enumerate() {
        let slot = i as u8;
        let set = FDSET_BASE + u64::from(slot);
        let read_only = if writable(slot, count) {
            ""
        } else {
            ",read-only=on"
        };
        a.extend([
            "-add-fd".to_owned(),
            format!("fd={},set={set}", fd.as_raw_fd()),
            "-blockdev".to_owned(),
            format!("driver=file,node-name=ph{slot},filename=/dev/fdset/{set},locking=off"),
            "-blockdev".to_owned(),
            format!("driver=raw,node-name=slot{slot},file=ph{slot}{read_only}"),
            "-device".to_owned(),
            format!("virtio-blk-device,drive=slot{slot},serial={}", serial(slot)),
        ]);
    }
    a
}

/// Puts `disk` in slot `slot` as block node `node`, by `deadline`. The caller took the
/// slot for its kind (`writable`) and takes it back (`detach`) if this fails.
pub async fn attach(
    qmp: &Path,
    slot: u8,
    node: &str,
    disk: &HostDisk,
    deadline: Instant,
) -> Result<(), MemctlError> {
    let size = disks::size_of(disk);
    if size == 0 {
        return Err(MemctlError::Refused(format!(
            "cannot tell the size of {}",
            disk.path.display()
        )));
    }
    let mut q = Session::connect(qmp, deadline).await?;
    let mut fdset = None;
    if let Err(e) = disks::add_host_node(&mut q, disk, node, false, &mut fdset).await {
        // The descriptor set QEMU still holds goes on a fresh session: the failed one
        // may be out of step (a reply that came late).
        if let Some(set) = fdset {
            drop(q);
            disks::remove_fdset(qmp, set).await;
        }
        return Err(e);
    }
    if disk.writable {
        reopen(&mut q, slot, node, false).await?;
        resize(&mut q, slot, size).await
    } else {
        // The placeholder is grown and the read-only slot's node made writable only
        // long enough for the resize: the device itself cannot write.
        reopen(&mut q, slot, &format!("ph{slot}"), false).await?;
        resize(&mut q, slot, size).await?;
        reopen(&mut q, slot, node, true).await
    }
}

/// Empties slot `slot`, made writable or not at boot, and closes its disk, node `node`
/// (one already gone is no error: this also takes back a failed `attach`). A read-only
/// slot's node is writable only for its resize, and read-only again after, as at boot.
pub async fn detach(
    qmp: &Path,
    slot: u8,
    writable: bool,
    node: &str,
    deadline: Instant,
) -> Result<(), MemctlError> {
    let mut q = Session::connect(qmp, deadline).await?;
    let placeholder = format!("ph{slot}");
    reopen(&mut q, slot, &placeholder, false).await?;
    resize(&mut q, slot, 0).await?;
    // The disk's node is unused once the slot is off it: closed first, so a failure
    // below cannot leave the host's device open.
    disks::blockdev_del(&mut q, node).await?;
    if !writable {
        reopen(&mut q, slot, &placeholder, true).await?;
    }
    Ok(())
}

/// Moves slot `slot`'s node onto node `file`.
async fn reopen(q: &mut Session, slot: u8, file: &str, read_only: bool) -> Result<(), MemctlError> {
    q.execute(
        serde_json::json!({"execute": "blockdev-reopen", "arguments": {"options": [{
            "driver": "raw",
            "node-name": format!("slot{slot}"),
            "file": file,
            "read-only": read_only,
        }]}}),
    )
    .await
    .map(|_| ())
}

/// Sets slot `slot`'s capacity, which the guest's driver is told of.
async fn resize(q: &mut Session, slot: u8, size: u64) -> Result<(), MemctlError> {
    q.execute(serde_json::json!({"execute": "block_resize", "arguments": {
        "node-name": format!("slot{slot}"),
        "size": size,
    }}))
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn half_the_slots_rounded_up_are_writable() {
        let kinds = |count: u8| -> Vec<bool> { (0..count).map(|s| writable(s, count)).collect() };
        assert_eq!(kinds(1), [true]);
        assert_eq!(kinds(2), [true, false]);
        assert_eq!(kinds(3), [true, true, false]);
        assert_eq!(kinds(4), [true, true, false, false]);
    }

    #[test]
    fn each_slot_is_a_device_on_a_raw_node_over_its_inherited_placeholder() {
        let fds = placeholders(2).unwrap();
        let a = args(&fds).join(" ");
        let (f0, f1) = (fds[0].as_raw_fd(), fds[1].as_raw_fd());
        assert_eq!(
            a,
            format!(
                "-add-fd fd={f0},set=100 \
                 -blockdev driver=file,node-name=ph0,filename=/dev/fdset/100,locking=off \
                 -blockdev driver=raw,node-name=slot0,file=ph0 \
                 -device virtio-blk-device,drive=slot0,serial=cocoon-slot0 \
                 -add-fd fd={f1},set=101 \
                 -blockdev driver=file,node-name=ph1,filename=/dev/fdset/101,locking=off \
                 -blockdev driver=raw,node-name=slot1,file=ph1,read-only=on \
                 -device virtio-blk-device,drive=slot1,serial=cocoon-slot1"
            )
        );
        // Empty, writable and closed on exec unless handed over.
        let st = nix::sys::stat::fstat(&fds[0]).unwrap();
        assert_eq!(st.st_size, 0);
        let fl = nix::fcntl::fcntl(&fds[0], nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(fl & libc::FD_CLOEXEC, 0);
    }

    fn disk(writable: bool) -> HostDisk {
        // A file stands in for the device: it has a size to tell.
        let f = tempfile::tempfile().unwrap();
        f.set_len(8192).unwrap();
        HostDisk {
            major: 7,
            minor: 0,
            path: "/dev/loop0".into(),
            fd: f.into(),
            writable,
        }
    }

    /// The arguments of each command the fake QEMU was sent, by name.
    fn sent(q: &disks::fake::Qemu) -> Vec<(String, serde_json::Value)> {
        let seen = std::mem::take(&mut *q.seen.lock().unwrap());
        seen.into_iter()
            .filter(|(n, _, _)| n != "qmp_capabilities")
            .map(|(n, a, _)| (n, a))
            .collect()
    }

    #[tokio::test]
    async fn a_writable_disk_goes_in_then_tells_its_size_and_comes_out_onto_the_placeholder() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let q = disks::fake::qemu(&sock, false, "");
        let deadline = || Instant::now() + Duration::from_secs(5);
        attach(&sock, 0, "disk1", &disk(true), deadline())
            .await
            .unwrap();
        let s = sent(&q);
        let names: Vec<&str> = s.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "add-fd",
                "blockdev-add",
                "remove-fd",
                "blockdev-reopen",
                "block_resize"
            ]
        );
        // The host's node alone: the slot's raw node goes on it, writable.
        assert_eq!(s[1].1["driver"], "host_device");
        assert_eq!(s[1].1["read-only"], false);
        let opts = &s[3].1["options"][0];
        assert_eq!(
            (opts["node-name"].as_str(), opts["file"].as_str()),
            (Some("slot0"), Some("disk1"))
        );
        assert_eq!(opts["read-only"], false);
        assert_eq!(
            s[4].1,
            serde_json::json!({"node-name": "slot0", "size": 8192})
        );

        detach(&sock, 0, true, "disk1", deadline()).await.unwrap();
        let s = sent(&q);
        let names: Vec<&str> = s.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["blockdev-reopen", "block_resize", "blockdev-del"]);
        assert_eq!(s[0].1["options"][0]["file"], "ph0");
        assert_eq!(s[1].1["size"], 0);
        assert_eq!(s[2].1["node-name"], "disk1");
    }

    /// A step's name with the slot node's file and read-only flag, or the size asked.
    fn steps(s: Vec<(String, serde_json::Value)>) -> Vec<(String, serde_json::Value)> {
        s.into_iter()
            .map(|(n, a)| match n.as_str() {
                "blockdev-reopen" => {
                    let o = &a["options"][0];
                    (n, serde_json::json!([o["file"], o["read-only"]]))
                }
                "block_resize" => (n, a["size"].clone()),
                _ => (n, a["node-name"].clone()),
            })
            .collect()
    }

    #[tokio::test]
    async fn a_read_only_slot_learns_the_size_from_its_placeholder_before_taking_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let q = disks::fake::qemu(&sock, false, "");
        let deadline = Instant::now() + Duration::from_secs(5);
        attach(&sock, 1, "disk2", &disk(false), deadline)
            .await
            .unwrap();
        let s = steps(sent(&q));
        assert_eq!(
            s[3..],
            [
                ("blockdev-reopen".into(), serde_json::json!(["ph1", false])),
                ("block_resize".into(), serde_json::json!(8192)),
                ("blockdev-reopen".into(), serde_json::json!(["disk2", true])),
            ]
        );

        // Out again, the slot is left as it was made: read-only, on its placeholder.
        detach(&sock, 1, false, "disk2", deadline).await.unwrap();
        assert_eq!(
            steps(sent(&q)),
            [
                ("blockdev-reopen".into(), serde_json::json!(["ph1", false])),
                ("block_resize".into(), serde_json::json!(0)),
                ("blockdev-del".into(), serde_json::json!("disk2")),
                ("blockdev-reopen".into(), serde_json::json!(["ph1", true])),
            ]
        );
    }

    #[tokio::test]
    async fn a_refused_step_is_an_error_and_a_disk_of_no_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let q = disks::fake::qemu(&sock, false, "blockdev-reopen");
        let deadline = Instant::now() + Duration::from_secs(5);
        let e = attach(&sock, 0, "disk1", &disk(true), deadline)
            .await
            .unwrap_err();
        assert!(matches!(e, MemctlError::Refused(_)), "{e}");
        sent(&q);
        // A failed blockdev-add leaves no descriptor set behind: it is removed on a
        // session of its own, as the failed one may be out of step.
        let sock2 = dir.path().join("qmp2.sock");
        let q2 = disks::fake::qemu(&sock2, false, "blockdev-add");
        attach(&sock2, 0, "disk1", &disk(true), deadline)
            .await
            .unwrap_err();
        let names: Vec<String> = std::mem::take(&mut *q2.seen.lock().unwrap())
            .into_iter()
            .map(|(n, _, _)| n)
            .collect();
        assert_eq!(
            names,
            [
                "qmp_capabilities",
                "add-fd",
                "blockdev-add",
                "qmp_capabilities",
                "remove-fd"
            ]
        );

        let mut empty = disk(true);
        empty.fd = tempfile::tempfile().unwrap().into();
        let e = attach(&sock, 0, "disk1", &empty, deadline)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("cannot tell the size"), "{e}");
        assert!(sent(&q).is_empty());
    }
}
