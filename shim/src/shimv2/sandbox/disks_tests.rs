//! Tests of the pod's disk table (`disks`).

use super::*;
use crate::hypervisor::slots;

fn spec(devices: serde_json::Value, rules: serde_json::Value) -> Spec {
    serde_json::from_value(serde_json::json!({
        "ociVersion": "1.0.2",
        "linux": {"devices": devices, "resources": {"devices": rules}},
    }))
    .unwrap()
}

#[test]
fn block_devices_and_whether_their_rules_let_them_be_written() {
    let s = spec(
        serde_json::json!([
            {"path": "/dev/xvda", "type": "b", "major": 7, "minor": 0},
            {"path": "/dev/xvdb", "type": "b", "major": 7, "minor": 1},
            {"path": "/dev/xvdc", "type": "b", "major": 8, "minor": 0},
            {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229},
        ]),
        serde_json::json!([
            {"allow": false, "access": "rwm"},
            {"allow": true, "type": "b", "major": 7, "minor": 0, "access": "rwm"},
            {"allow": true, "type": "b", "major": 7, "minor": 1, "access": "rw"},
            {"allow": false, "type": "b", "major": 7, "minor": 1, "access": "w"},
            // A later rule that says nothing of writes changes nothing.
            {"allow": true, "type": "b", "major": 7, "minor": 1, "access": "m"},
            {"allow": true, "type": "b", "major": 8, "minor": 0, "access": "r"},
        ]),
    );
    let w = wanted(&s);
    let got: Vec<(&str, u64, u64, bool)> = w
        .iter()
        .map(|w| (w.path.as_str(), w.major, w.minor, w.writable))
        .collect();
    assert_eq!(
        got,
        [
            ("/dev/xvda", 7, 0, true),
            // The last rule that speaks of writes decides.
            ("/dev/xvdb", 7, 1, false),
            ("/dev/xvdc", 8, 0, false),
        ]
    );
    assert!(wanted(&spec(serde_json::json!([]), serde_json::json!([]))).is_empty());
}

/// A privileged container's spec lists every host device, with one rule allowing
/// all: none of the node's disks is plugged, and they leave the spec; a device also
/// named on its own (a CRI device beside privileged) stays.
#[test]
fn a_catch_all_rule_plugs_no_disk_of_the_node() {
    let mut s = spec(
        serde_json::json!([
            {"path": "/dev/sda", "type": "b", "major": 8, "minor": 0},
            {"path": "/dev/sda1", "type": "b", "major": 8, "minor": 1},
            {"path": "/dev/xvda", "type": "b", "major": 7, "minor": 0},
            {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229},
        ]),
        serde_json::json!([
            {"allow": true, "access": "rwm"},
            {"allow": true, "type": "b", "major": 8, "access": "rwm"},
            {"allow": true, "type": "b", "major": 7, "minor": 0, "access": "rwm"},
        ]),
    );
    let w = wanted(&s);
    assert_eq!(w.len(), 1);
    assert_eq!((w[0].path.as_str(), w[0].writable), ("/dev/xvda", true));
    assert_eq!(take_unnamed(&mut s), ["/dev/sda", "/dev/sda1"]);
    let left: Vec<String> = s
        .linux()
        .as_ref()
        .unwrap()
        .devices()
        .as_ref()
        .unwrap()
        .iter()
        .map(|d| d.path().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["/dev/xvda", "/dev/fuse"]);
}

#[tokio::test]
async fn a_vm_without_a_bus_for_disks_refuses_them_naming_the_machine() {
    let d = Disks::new(None, Duration::from_secs(1));
    let none = spec(serde_json::json!([]), serde_json::json!([]));
    assert!(d.attach("c1", &none).await.unwrap().is_empty());
    let one = spec(
        serde_json::json!([{"path": "/dev/xvda", "type": "b", "major": 7, "minor": 0}]),
        serde_json::json!([{"allow": true, "type": "b", "major": 7, "minor": 0, "access": "rwm"}]),
    );
    let e = d.attach("c1", &one).await.unwrap_err().to_string();
    assert!(e.contains("qemu.machine = \"pc\""), "{e}");
}

fn stuck_ids(d: &Disks) -> Vec<String> {
    d.table
        .try_lock()
        .unwrap()
        .stuck
        .iter()
        .map(|s| s.id.clone())
        .collect()
}

/// One disk shared by two containers, unplugged after the second; a guest that keeps
/// it keeps it counted as stuck, until it lets go and a later release closes it. A
/// container that asked for no disk is deleted without a word to QEMU.
#[tokio::test]
async fn a_disk_the_guest_keeps_stays_counted_until_it_lets_go() {
    use crate::hypervisor::disks::fake;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let q = fake::qemu(&sock, true, "");
    let mut d = Disks::new(Some(Bus::Qmp(sock)), Duration::from_millis(500));
    d.open = |major, minor, writable| {
        let file =
            std::fs::File::open("/dev/null").map_err(|e| DiskError::Refused(e.to_string()))?;
        Ok(disks::HostDisk {
            major,
            minor,
            path: "/dev/null".into(),
            fd: file.into(),
            writable,
        })
    };
    let one = spec(
        serde_json::json!([{"path": "/dev/xvda", "type": "b", "major": 7, "minor": 0}]),
        serde_json::json!([{"allow": true, "type": "b", "major": 7, "minor": 0, "access": "rwm"}]),
    );
    let serials = |v: Vec<pb::BlockDevice>| v.into_iter().map(|b| b.serial).collect::<Vec<_>>();
    assert_eq!(
        serials(d.attach("c1", &one).await.unwrap()),
        ["cocoon-disk1"]
    );
    assert_eq!(
        serials(d.attach("c2", &one).await.unwrap()),
        ["cocoon-disk1"]
    );
    assert_eq!(
        q.names(),
        ["add-fd", "blockdev-add", "remove-fd", "device_add"]
    );
    d.release("c1").await;
    assert!(q.names().is_empty(), "still c2's");
    d.release("c2").await;
    assert_eq!(stuck_ids(&d), ["disk1"]);
    assert_eq!(q.names()[0], "device_del");
    d.release("c3").await;
    assert!(
        q.names().is_empty(),
        "a container without disks asks QEMU nothing"
    );

    // Once the guest lets go, the background settling closes it by itself.
    q.keeps.store(false, std::sync::atomic::Ordering::SeqCst);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !d.table.lock().await.stuck.is_empty() {
        assert!(std::time::Instant::now() < deadline, "never settled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(q.names().contains(&"blockdev-del".to_string()));
    assert_eq!(
        serials(d.attach("c4", &one).await.unwrap()),
        ["cocoon-disk2"]
    );
    d.release("c4").await;
    assert!(stuck_ids(&d).is_empty());
    let names = q.names();
    assert_eq!(
        names.iter().filter(|n| *n == "blockdev-del").count(),
        1,
        "{names:?}"
    );
}

/// cocoon-vmm: each host device in a slot of its own, shared by the containers that
/// name it, the slot emptied after the last; a pod with every slot taken is refused
/// naming the setting; the agent is told each disk's size and whether it is
/// read-only.
#[tokio::test]
async fn disks_go_into_free_slots_and_come_out_after_their_last_container() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("memctl.sock");
    let v = slots::fake::vmm(&sock, 2, "");
    let mut d = Disks::new(
        Some(Bus::Slots {
            vmm: SlotVmm::CocoonVmm(sock),
            count: 2,
        }),
        Duration::from_millis(500),
    );
    d.open = |major, minor, writable| {
        let file = tempfile::tempfile().map_err(|e| DiskError::Refused(e.to_string()))?;
        file.set_len(4096 * (minor + 1)).unwrap();
        Ok(disks::HostDisk {
            major,
            minor,
            path: "/dev/test".into(),
            fd: file.into(),
            writable,
        })
    };
    let dev = |minor: u64, access: &str| {
        spec(
            serde_json::json!([{"path": format!("/dev/xvd{minor}"), "type": "b", "major": 7, "minor": minor}]),
            serde_json::json!([{"allow": true, "type": "b", "major": 7, "minor": minor, "access": access}]),
        )
    };
    let got = d.attach("c1", &dev(0, "rwm")).await.unwrap();
    assert_eq!(
        (got[0].serial.as_str(), got[0].size_bytes, got[0].read_only),
        ("cocoon-disk1", 4096, false)
    );
    assert_eq!(v.asked(), [("attach_disk".into(), 0, true)]);
    let got = d.attach("c2", &dev(0, "rwm")).await.unwrap();
    assert_eq!(got[0].serial, "cocoon-disk1");
    assert!(v.asked().is_empty(), "the same device, the same slot");
    let got = d.attach("c3", &dev(1, "r")).await.unwrap();
    assert_eq!(
        (got[0].serial.as_str(), got[0].size_bytes, got[0].read_only),
        ("cocoon-disk2", 8192, true)
    );
    assert_eq!(v.asked(), [("attach_disk".into(), 1, true)]);
    let e = d.attach("c4", &dev(2, "rw")).await.unwrap_err().to_string();
    assert!(e.contains("2 disk slots (vm.block_slots"), "{e}");
    assert!(v.asked().is_empty());

    d.release("c1").await;
    assert!(v.asked().is_empty(), "still c2's");
    d.release("c2").await;
    assert_eq!(v.asked(), [("detach_disk".into(), 0, false)]);
    // The free slot takes the next device.
    let got = d.attach("c5", &dev(2, "rw")).await.unwrap();
    assert_eq!(got[0].serial, "cocoon-disk3");
    assert_eq!(v.asked(), [("attach_disk".into(), 0, true)]);
    d.release("c3").await;
    d.release("c5").await;
    let mut asked = v.asked();
    asked.sort();
    assert_eq!(
        asked,
        [
            ("detach_disk".into(), 0, false),
            ("detach_disk".into(), 1, false)
        ]
    );
    assert!(v.slots.lock().unwrap().iter().all(Option::is_none));
}

/// Disks on `count` cocoon-vmm slots at `sock`, opening /dev/null for every device.
fn slotted(sock: PathBuf, count: u8) -> Disks {
    let mut d = Disks::new(
        Some(Bus::Slots {
            vmm: SlotVmm::CocoonVmm(sock),
            count,
        }),
        Duration::from_millis(500),
    );
    d.open = |major, minor, writable| {
        Ok(disks::HostDisk {
            major,
            minor,
            path: "/dev/null".into(),
            fd: std::fs::File::open("/dev/null").unwrap().into(),
            writable,
        })
    };
    d
}

/// A refused attach leaves nothing in the slot (the slot is emptied, in case it
/// went in before the call failed) and nothing counted.
#[tokio::test]
async fn a_refused_attach_empties_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("memctl.sock");
    let v = slots::fake::vmm(&sock, 1, "attach_disk");
    let d = slotted(sock, 1);
    let one = spec(
        serde_json::json!([{"path": "/dev/xvda", "type": "b", "major": 7, "minor": 0}]),
        serde_json::json!([{"allow": true, "type": "b", "major": 7, "minor": 0, "access": "rwm"}]),
    );
    let e = d.attach("c1", &one).await.unwrap_err();
    assert!(format!("{e:#}").contains("7:0"), "{e:#}");
    assert_eq!(
        v.asked(),
        [
            ("attach_disk".into(), 0, true),
            ("detach_disk".into(), 0, false)
        ]
    );
    assert!(d.table.lock().await.plugged.is_empty());
}

/// A slot the VMM did not empty when asked stays counted and is never chosen, and
/// is emptied in the background once the VMM answers.
#[tokio::test]
async fn a_slot_not_emptied_stays_counted_until_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("memctl.sock");
    let v = slots::fake::vmm(&sock, 1, "detach_disk");
    let d = slotted(sock, 1);
    let dev = |minor: u64| {
        spec(
            serde_json::json!([{"path": "/dev/xvda", "type": "b", "major": 7, "minor": minor}]),
            serde_json::json!([{"allow": true, "type": "b", "major": 7, "minor": minor, "access": "rwm"}]),
        )
    };
    d.attach("c1", &dev(0)).await.unwrap();
    d.release("c1").await;
    assert_eq!(
        d.table.lock().await.stuck_slots.keys().collect::<Vec<_>>(),
        [&0]
    );
    let e = d.attach("c2", &dev(1)).await.unwrap_err().to_string();
    assert!(e.contains("all in use (1 not yet emptied)"), "{e}");
    assert_eq!(v.slots.lock().unwrap()[0].as_deref(), Some("cocoon-disk1"));
    v.asked();

    *v.refuse.lock().unwrap() = "";
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !d.table.lock().await.stuck_slots.is_empty() {
        assert!(std::time::Instant::now() < deadline, "never emptied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(v.slots.lock().unwrap()[0], None);
    let got = d.attach("c3", &dev(1)).await.unwrap();
    assert_eq!(
        got[0].serial, "cocoon-disk2",
        "a refused attach names nothing"
    );
    d.release("c3").await;
    assert!(d.table.lock().await.stuck_slots.is_empty());
}

/// QEMU's microvm: writable devices take the writable slots and read-only ones the
/// rest, each under its slot's own serial; a device with no free slot of its kind is
/// refused naming both counts, even with a slot of the other kind free.
#[tokio::test]
async fn microvm_slots_take_devices_of_their_own_kind() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let q = disks::fake::qemu(&sock, false, "");
    let mut d = Disks::new(
        Some(Bus::Slots {
            vmm: SlotVmm::Qemu(sock),
            count: 3,
        }),
        Duration::from_millis(500),
    );
    d.open = |major, minor, writable| {
        let file = tempfile::tempfile().map_err(|e| DiskError::Refused(e.to_string()))?;
        file.set_len(4096 * (minor + 1)).unwrap();
        Ok(disks::HostDisk {
            major,
            minor,
            path: "/dev/test".into(),
            fd: file.into(),
            writable,
        })
    };
    let dev = |minor: u64, access: &str| {
        spec(
            serde_json::json!([{"path": format!("/dev/xvd{minor}"), "type": "b", "major": 7, "minor": minor}]),
            serde_json::json!([{"allow": true, "type": "b", "major": 7, "minor": minor, "access": access}]),
        )
    };
    // The slot each reopen put a disk in, and whether read-only.
    let placed = |q: &disks::fake::Qemu| -> Vec<(String, String, bool)> {
        let seen = std::mem::take(&mut *q.seen.lock().unwrap());
        seen.into_iter()
            .filter(|(n, _, _)| n == "blockdev-reopen")
            .map(|(_, a, _)| {
                let o = &a["options"][0];
                (
                    o["node-name"].as_str().unwrap().to_owned(),
                    o["file"].as_str().unwrap().to_owned(),
                    o["read-only"].as_bool().unwrap(),
                )
            })
            .collect()
    };
    let got = d.attach("c1", &dev(1, "r")).await.unwrap();
    assert_eq!(
        (got[0].serial.as_str(), got[0].size_bytes, got[0].read_only),
        ("cocoon-slot2", 8192, true)
    );
    assert_eq!(
        placed(&q),
        [
            ("slot2".into(), "ph2".into(), false),
            ("slot2".into(), "disk1".into(), true)
        ]
    );
    let got = d.attach("c2", &dev(0, "rwm")).await.unwrap();
    assert_eq!(
        (got[0].serial.as_str(), got[0].read_only),
        ("cocoon-slot0", false)
    );
    assert_eq!(placed(&q), [("slot0".into(), "disk2".into(), false)]);
    // The second read-only device finds the one read-only slot taken.
    let e = d.attach("c3", &dev(3, "r")).await.unwrap_err().to_string();
    assert!(
        e.contains("3 disk slots (vm.block_slots")
            && e.contains("2 writable and 1 read-only")
            && e.contains("no read-only one is free"),
        "{e}"
    );
    assert!(placed(&q).is_empty());
    let got = d.attach("c4", &dev(4, "rw")).await.unwrap();
    assert_eq!(got[0].serial, "cocoon-slot1");
    placed(&q);

    // Out: back onto the placeholder, emptied, read-only again as the slot was made,
    // the host's node closed.
    d.release("c1").await;
    let seen: Vec<(String, serde_json::Value)> = std::mem::take(&mut *q.seen.lock().unwrap())
        .into_iter()
        .filter(|(n, _, _)| n != "qmp_capabilities")
        .map(|(n, a, _)| (n, a))
        .collect();
    let names: Vec<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "blockdev-reopen",
            "block_resize",
            "blockdev-del",
            "blockdev-reopen"
        ]
    );
    assert_eq!(seen[0].1["options"][0]["file"], "ph2");
    assert_eq!(
        seen[1].1,
        serde_json::json!({"node-name": "slot2", "size": 0})
    );
    assert_eq!(seen[2].1["node-name"], "disk1");
    let last = &seen[3].1["options"][0];
    assert_eq!(
        (last["node-name"].as_str(), last["file"].as_str()),
        (Some("slot2"), Some("ph2"))
    );
    assert_eq!(last["read-only"], true);
    // And the read-only slot takes the next read-only device.
    let got = d.attach("c5", &dev(3, "r")).await.unwrap();
    assert_eq!(got[0].serial, "cocoon-slot2");
}
