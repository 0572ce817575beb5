//! Raw block devices the host plugged into the VM for a container (the spec's
//! `linux.devices` of type `b`). The spec names each by the host's major:minor; the
//! host says which disk it plugged for it by the virtio-blk serial it gave the disk.
//! The agent waits for that disk to appear, then gives the spec the guest's numbers,
//! in the device and in the cgroup rules that named the host's, so the container's
//! node and its device rules are the guest disk's.
//!
//! On cocoon-vmm a disk goes into a slot the VM had from boot (a microVM has no bus
//! to plug into): the guest's device stays when the host takes the disk out and puts
//! another in. So the agent drops what the guest cached of the slot's last disk
//! before a container gets it ([`ready`]), and writes back what a container left
//! dirty when it is removed ([`flush`]), before the host empties the slot.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use cocoon_protocol::agent::BlockDevice;

/// Where the kernel lists block devices, each with `dev` (`major:minor`) and, for
/// virtio-blk, `serial`.
pub const SYS_BLOCK: &str = "/sys/block";
/// At most this many in one request.
const MAX_DEVICES: usize = 64;

/// A guest disk the host named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Its name under /sys/block and /dev.
    pub name: String,
    pub major: u64,
    pub minor: u64,
    pub read_only: bool,
}

/// The spec `spec` with each of `wanted`'s devices given the numbers of the guest's
/// disk with its serial (and size, when given), found under `sys_block` by `deadline`;
/// and those disks.
pub fn remap(
    spec: &[u8],
    wanted: &[BlockDevice],
    sys_block: &Path,
    deadline: Instant,
) -> Result<(Vec<u8>, Vec<Found>), String> {
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
    let mut found: BTreeMap<String, Found> = BTreeMap::new();
    for w in wanted {
        if found.contains_key(&w.serial) {
            continue;
        }
        let mut disk = wait_for(sys_block, &w.serial, w.size_bytes, deadline)?;
        disk.read_only = w.read_only;
        found.insert(w.serial.clone(), disk);
    }
    // The host's numbers → the guest's, from the devices, then applied to the rules.
    let mut moved: BTreeMap<(u64, u64), (u64, u64)> = BTreeMap::new();
    let devices = doc
        .pointer_mut("/linux/devices")
        .and_then(|d| d.as_array_mut());
    let devices = devices.map(|d| d.as_mut_slice()).unwrap_or_default();
    for w in wanted {
        let guest = (found[&w.serial].major, found[&w.serial].minor);
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
    let spec = serde_json::to_vec(&doc).map_err(|e| e.to_string())?;
    Ok((spec, found.into_values().collect()))
}

/// The disk with `serial`, once the kernel has it (a disk plugged just before the
/// request is still being probed) at `size_bytes` (unless 0: a disk put in a slot
/// gets its capacity a moment after its serial answers).
fn wait_for(
    sys_block: &Path,
    serial: &str,
    size_bytes: u64,
    deadline: Instant,
) -> Result<Found, String> {
    loop {
        let found = find(sys_block, serial);
        if let Some((disk, sectors)) = &found {
            // Whole sectors: what a VMM reports of a disk whose size is not.
            if size_bytes == 0 || *sectors == size_bytes / 512 {
                return Ok(disk.clone());
            }
        }
        if Instant::now() >= deadline {
            return Err(match found {
                None => format!("the disk with serial {serial} did not appear in the VM in time"),
                Some((_, sectors)) => format!(
                    "the disk with serial {serial} has {sectors} sectors in the VM, not the \
                     {size_bytes} bytes the host gave it, in time"
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The disk with `serial` and its size in sectors.
fn find(sys_block: &Path, serial: &str) -> Option<(Found, u64)> {
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
        let sectors = std::fs::read_to_string(dir.join("size"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let disk = Found {
            name: e.file_name().to_string_lossy().into_owned(),
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
            read_only: false,
        };
        return Some((disk, sectors));
    }
    None
}

nix::ioctl_none!(blk_flush_buffers, 0x12, 97); // BLKFLSBUF
nix::ioctl_write_ptr_bad!(blk_set_read_only, 0x125d, libc::c_int); // BLKROSET

/// Opens the guest's node of a disk by its numbers (devtmpfs names it as sysfs does).
fn open_disk(major: u64, minor: u64) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
    let uevent = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/uevent"))?;
    let name = uevent
        .lines()
        .find_map(|l| l.strip_prefix("DEVNAME="))
        .filter(|n| !n.is_empty() && !n.contains(".."))
        .ok_or_else(|| std::io::Error::other(format!("no DEVNAME for {major}:{minor}")))?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(Path::new("/dev").join(name))?;
    let m = f.metadata()?;
    let want = libc::makedev(major as u32, minor as u32);
    if !m.file_type().is_block_device() || m.rdev() != want {
        return Err(std::io::Error::other(format!(
            "/dev/{name} is not block device {major}:{minor}"
        )));
    }
    Ok(f)
}

/// Makes a found disk ready for its container: what the guest cached of the slot's
/// earlier disk is dropped, and it is marked read-only or writable in the guest (a
/// slot's device keeps the mark of its last disk).
pub fn ready(disk: &Found) -> Result<(), String> {
    let why = |what: &str, e: &dyn std::fmt::Display| format!("{what} /dev/{}: {e}", disk.name);
    let f = open_disk(disk.major, disk.minor).map_err(|e| why("cannot open", &e))?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    // SAFETY: BLKFLSBUF takes no argument; the descriptor is ours.
    unsafe { blk_flush_buffers(fd) }.map_err(|e| why("cannot drop the cache of", &e))?;
    let ro = libc::c_int::from(disk.read_only);
    // SAFETY: BLKROSET reads one int, which `ro` is, for the call's length.
    unsafe { blk_set_read_only(fd, &ro) }.map_err(|e| why("cannot set read-only on", &e))?;
    Ok(())
}

/// Writes back what the guest holds dirty for the block devices of a removed
/// container's spec (by then in the guest's numbers), before the host takes the disk
/// away. A device that is gone is skipped.
pub fn flush(devices: &[(u64, u64)]) {
    for &(major, minor) in devices {
        let Ok(f) = open_disk(major, minor) else {
            continue;
        };
        // Dirty pages out and the disk's cache flushed (an fsync of the device), then
        // the pages dropped.
        if let Err(e) = f.sync_all() {
            tracing::warn!("block device {major}:{minor} not synced: {e}");
        }
        // SAFETY: as above.
        if let Err(e) = unsafe { blk_flush_buffers(std::os::fd::AsRawFd::as_raw_fd(&f)) } {
            tracing::warn!("block device {major}:{minor} not written back: {e}");
        }
    }
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
        let (out, found) =
            remap(&serde_json::to_vec(&spec).unwrap(), &wanted, sys, deadline).unwrap();
        let names: Vec<&str> = found.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["vda", "vdb"], "each disk once, in serial order");
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

    #[test]
    fn a_disk_is_taken_once_it_has_the_size_the_host_gave() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().to_owned();
        disk(&sys, "vdc", "cocoon-disk3", "253:32");
        // The slot's capacity is still the empty slot's.
        std::fs::write(sys.join("vdc/size"), "0\n").unwrap();
        let spec = br#"{"linux": {"devices": [{"path": "/dev/xvda", "type": "b", "major": 7, "minor": 0}]}}"#;
        let mut w = want("/dev/xvda", "cocoon-disk3");
        w.size_bytes = 8 << 20;
        w.read_only = true;
        let e = remap(
            spec,
            &[w.clone()],
            &sys,
            Instant::now() + Duration::from_millis(200),
        )
        .unwrap_err();
        assert!(e.contains("0 sectors") && e.contains("8388608"), "{e}");
        let grow = {
            let sys = sys.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                std::fs::write(sys.join("vdc/size"), "16384\n").unwrap();
            })
        };
        let (_, found) = remap(spec, &[w], &sys, Instant::now() + Duration::from_secs(5)).unwrap();
        grow.join().unwrap();
        assert_eq!(
            found,
            [Found {
                name: "vdc".into(),
                major: 253,
                minor: 32,
                read_only: true
            }]
        );
    }
}
