//! Raw block devices the host plugged into the VM for a container (the spec's
//! `linux.devices` of type `b`). The spec names each by the host's major:minor; the
//! host says which disk it plugged for it by the virtio-blk serial it gave the disk.
//! The agent waits for that disk to appear, then gives the spec the guest's numbers,
//! in the device and in the cgroup rules that named the host's, so the container's
//! node and its device rules are the guest disk's.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use cocoon_protocol::agent::BlockDevice;

/// Where the kernel lists block devices, each with `dev` (`major:minor`) and, for
/// virtio-blk, `serial`.
pub const SYS_BLOCK: &str = "/sys/block";
/// At most this many in one request.
const MAX_DEVICES: usize = 64;

/// The spec `spec` with each of `wanted`'s devices given the numbers of the guest's
/// disk with its serial, found under `sys_block` by `deadline`.
pub fn remap(
    spec: &[u8],
    wanted: &[BlockDevice],
    sys_block: &Path,
    deadline: Instant,
) -> Result<Vec<u8>, String> {
    if wanted.len() > MAX_DEVICES {
        return Err(format!("more than {MAX_DEVICES} block devices"));
    }
    for w in wanted {
        let ok = !w.serial.is_empty()
            && w.serial.len() <= 20
            && w.serial
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            return Err(format!("block device serial {:?}", w.serial));
        }
    }
    let mut doc: serde_json::Value =
        serde_json::from_slice(spec).map_err(|e| format!("the spec: {e}"))?;
    let mut found: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for w in wanted {
        if found.contains_key(&w.serial) {
            continue;
        }
        let numbers = wait_for(sys_block, &w.serial, deadline)?;
        found.insert(w.serial.clone(), numbers);
    }
    // The host's numbers → the guest's, from the devices, then applied to the rules.
    let mut moved: BTreeMap<(u64, u64), (u64, u64)> = BTreeMap::new();
    let devices = doc
        .pointer_mut("/linux/devices")
        .and_then(|d| d.as_array_mut());
    let devices = devices.map(|d| d.as_mut_slice()).unwrap_or_default();
    for w in wanted {
        let guest = found[&w.serial];
        let d = devices
            .iter_mut()
            .find(|d| d["type"] == "b" && d["path"] == w.container_path.as_str())
            .ok_or_else(|| {
                format!(
                    "no block device {:?} in the spec's linux.devices",
                    w.container_path
                )
            })?;
        let host = (
            d["major"].as_u64().unwrap_or(u64::MAX),
            d["minor"].as_u64().unwrap_or(u64::MAX),
        );
        d["major"] = guest.0.into();
        d["minor"] = guest.1.into();
        moved.insert(host, guest);
    }
    if let Some(rules) = doc
        .pointer_mut("/linux/resources/devices")
        .and_then(|d| d.as_array_mut())
    {
        for r in rules.iter_mut().filter(|r| r["type"] == "b") {
            let (Some(major), Some(minor)) = (r["major"].as_u64(), r["minor"].as_u64()) else {
                continue;
            };
            if let Some(guest) = moved.get(&(major, minor)) {
                r["major"] = guest.0.into();
                r["minor"] = guest.1.into();
            }
        }
    }
    serde_json::to_vec(&doc).map_err(|e| e.to_string())
}

/// The numbers of the disk with `serial`, once the kernel has it (a disk plugged just
/// before the request is still being probed).
fn wait_for(sys_block: &Path, serial: &str, deadline: Instant) -> Result<(u64, u64), String> {
    loop {
        if let Some(n) = find(sys_block, serial) {
            return Ok(n);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the disk with serial {serial} did not appear in the VM in time"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn find(sys_block: &Path, serial: &str) -> Option<(u64, u64)> {
    for e in std::fs::read_dir(sys_block).ok()?.flatten() {
        let dir = e.path();
        let Ok(s) = std::fs::read_to_string(dir.join("serial")) else {
            continue;
        };
        if s.trim_end_matches(['\n', '\0']) != serial {
            continue;
        }
        let dev = std::fs::read_to_string(dir.join("dev")).ok()?;
        let (major, minor) = dev.trim().split_once(':')?;
        return Some((major.parse().ok()?, minor.parse().ok()?));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(path: &str, serial: &str) -> BlockDevice {
        let mut b = BlockDevice::new();
        b.container_path = path.into();
        b.serial = serial.into();
        b
    }

    fn disk(sys: &Path, name: &str, serial: &str, dev: &str) {
        let d = sys.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("serial"), serial).unwrap();
        std::fs::write(d.join("dev"), format!("{dev}\n")).unwrap();
    }

    #[test]
    fn devices_and_their_rules_get_the_guest_disks_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path();
        std::fs::create_dir_all(sys.join("ram0")).unwrap();
        disk(sys, "vda", "cocoon-disk1", "253:0");
        disk(sys, "vdb", "cocoon-disk2\n", "253:16");
        let spec = serde_json::json!({
            "linux": {
                "devices": [
                    {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229},
                    {"path": "/dev/xvda", "type": "b", "major": 7, "minor": 0, "fileMode": 432},
                    {"path": "/dev/xvdb", "type": "b", "major": 253, "minor": 16},
                ],
                "resources": {"devices": [
                    {"allow": false, "access": "rwm"},
                    {"allow": true, "type": "b", "major": 7, "minor": 0, "access": "rwm"},
                    {"allow": true, "type": "b", "major": 253, "minor": 16, "access": "r"},
                    {"allow": true, "type": "c", "major": 7, "minor": 0, "access": "rwm"},
                ]},
            },
        });
        let wanted = [
            want("/dev/xvda", "cocoon-disk2"),
            want("/dev/xvdb", "cocoon-disk1"),
        ];
        let deadline = Instant::now() + Duration::from_secs(5);
        let out = remap(&serde_json::to_vec(&spec).unwrap(), &wanted, sys, deadline).unwrap();
        let out: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let devices = &out["linux"]["devices"];
        assert_eq!(devices[0]["major"], 10, "a character device stays");
        assert_eq!(
            (&devices[1]["major"], &devices[1]["minor"]),
            (&253.into(), &16.into())
        );
        assert_eq!(devices[1]["fileMode"], 432);
        assert_eq!(
            (&devices[2]["major"], &devices[2]["minor"]),
            (&253.into(), &0.into())
        );
        let rules = &out["linux"]["resources"]["devices"];
        // Each rule follows its own device, once: 7:0 → 253:16 and 253:16 → 253:0,
        // never 7:0 → 253:16 → 253:0.
        assert_eq!(
            (&rules[1]["major"], &rules[1]["minor"]),
            (&253.into(), &16.into())
        );
        assert_eq!(rules[1]["access"], "rwm");
        assert_eq!(
            (&rules[2]["major"], &rules[2]["minor"]),
            (&253.into(), &0.into())
        );
        assert_eq!(rules[2]["access"], "r");
        assert_eq!(rules[3]["major"], 7, "a character device's rule stays");
    }

    #[test]
    fn a_disk_that_never_comes_or_a_bad_request_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let spec = br#"{"linux": {"devices": [{"path": "/dev/xvda", "type": "b", "major": 7, "minor": 0}]}}"#;
        let started = Instant::now();
        let deadline = started + Duration::from_millis(300);
        let e = remap(
            spec,
            &[want("/dev/xvda", "cocoon-disk9")],
            dir.path(),
            deadline,
        )
        .unwrap_err();
        assert!(e.contains("cocoon-disk9") && e.contains("in time"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(3));

        disk(dir.path(), "vda", "cocoon-disk1", "253:0");
        let far = Instant::now() + Duration::from_secs(5);
        let e = remap(spec, &[want("/dev/xvdz", "cocoon-disk1")], dir.path(), far).unwrap_err();
        assert!(e.contains("/dev/xvdz"), "{e}");
        let e = remap(spec, &[want("/dev/xvda", "../x")], dir.path(), far).unwrap_err();
        assert!(e.contains("serial"), "{e}");
        let e = remap(spec, &[want("/dev/xvda", "")], dir.path(), far).unwrap_err();
        assert!(e.contains("serial"), "{e}");
    }
}
