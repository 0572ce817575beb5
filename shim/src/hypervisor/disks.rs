//! Raw block devices for containers (a spec's `linux.devices` of type `b`: Kubernetes
//! `volumeDevices`, `ctr run --device`). The spec names the host's device by its
//! major:minor, which means nothing inside the VM, so the shim opens the host's device
//! itself, hands the descriptor to QEMU (`add-fd`; a jailed QEMU could not open
//! `/dev/...`), and plugs it as a virtio-blk disk with a serial of its choosing
//! (`blockdev-add`, `device_add`); the agent finds the disk by that serial and gives
//! the container a node with the guest's numbers. Unplugged (ACPI eject) when the
//! last container using it goes.
//!
//! Needs QEMU's `pc`: its PCI bus takes devices after boot. microvm has no bus a device
//! can join after boot, nor has cocoon-vmm: their VMs boot with slots the shim fills
//! instead (`qemu_slots`, `slots`).

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

use super::memctl::MemctlError;
use super::qmp::Session;

/// Why a pod VM cannot take a block device.
pub const NEEDS_PC: &str = "raw block devices (the spec's linux.devices of type b) are \
    put into the pod VM after it boots, which needs vm.block_slots above 0 (cocoon-vmm, \
    QEMU's microvm), or hypervisor = \"qemu\" with qemu.machine = \"pc\"";

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{0}")]
    Unsupported(&'static str),
    #[error("block device {major}:{minor} ({path}): {why}")]
    Host {
        major: u64,
        minor: u64,
        path: String,
        why: String,
    },
    #[error("cannot plug block device {major}:{minor} into the pod VM")]
    Plug {
        major: u64,
        minor: u64,
        #[source]
        source: MemctlError,
    },
    #[error("{0}")]
    Refused(String),
    /// The pod's VM has no room for another disk.
    #[error("{0}")]
    Full(String),
}

/// A host block device the shim opened for a guest.
#[derive(Debug)]
pub struct HostDisk {
    pub major: u64,
    pub minor: u64,
    pub path: PathBuf,
    pub fd: OwnedFd,
    pub writable: bool,
}

/// Opens the host's block device `major:minor`, found by its kernel name
/// (`/sys/dev/block/M:m/uevent`'s `DEVNAME`) under `/dev`, and checks that the node
/// opened is that device.
pub fn open_host(major: u64, minor: u64, writable: bool) -> Result<HostDisk, DiskError> {
    open_in(
        Path::new("/sys/dev/block"),
        Path::new("/dev"),
        major,
        minor,
        writable,
    )
}

fn open_in(
    sys: &Path,
    dev: &Path,
    major: u64,
    minor: u64,
    writable: bool,
) -> Result<HostDisk, DiskError> {
    let fail = |path: &str, why: String| DiskError::Host {
        major,
        minor,
        path: path.to_owned(),
        why,
    };
    let uevent = sys.join(format!("{major}:{minor}")).join("uevent");
    let text = std::fs::read_to_string(&uevent).map_err(|e| {
        fail(
            &uevent.display().to_string(),
            format!("not a block device of this host ({e})"),
        )
    })?;
    let name = text
        .lines()
        .find_map(|l| l.strip_prefix("DEVNAME="))
        .ok_or_else(|| fail(&uevent.display().to_string(), "no DEVNAME".into()))?;
    // A kernel name (`loop0`, `nvme0n1p2`, `mapper/...` is dm's link, never here).
    if name.is_empty()
        || name
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(fail(name, "not a device name".into()));
    }
    let path = dev.join(name);
    use nix::fcntl::OFlag;
    let mut flags = OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW | OFlag::O_NOCTTY;
    flags |= if writable {
        OFlag::O_RDWR
    } else {
        OFlag::O_RDONLY
    };
    let shown = path.display().to_string();
    let fd = nix::fcntl::open(&path, flags, nix::sys::stat::Mode::empty())
        .map_err(|e| fail(&shown, format!("cannot open: {e}")))?;
    let st = nix::sys::stat::fstat(&fd).map_err(|e| fail(&shown, format!("fstat: {e}")))?;
    let is_blk = st.st_mode & libc::S_IFMT == libc::S_IFBLK;
    let rdev = (
        nix::sys::stat::major(st.st_rdev),
        nix::sys::stat::minor(st.st_rdev),
    );
    if !is_blk || rdev != (major, minor) {
        return Err(fail(
            &shown,
            format!(
                "the node there is not that block device (it is {}:{})",
                rdev.0, rdev.1
            ),
        ));
    }
    Ok(HostDisk {
        major,
        minor,
        path,
        fd,
        writable,
    })
}

/// The size of an opened host device in bytes (where it ends; 0 if that cannot be
/// told: the agent then does not wait for a size).
pub fn size_of(disk: &HostDisk) -> u64 {
    nix::unistd::lseek(&disk.fd, 0, nix::unistd::Whence::SeekEnd).map_or(0, |n| n as u64)
}

/// Deadline of the steps that take back what a failed plug made, and of `blockdev-del`
/// after an unplug: their own, since the step before may have used up the call's.
pub(crate) const CLEANUP: Duration = Duration::from_secs(5);
/// How often an unplug asks whether the guest has let the disk go.
const POLL: Duration = Duration::from_millis(100);

/// A disk that may still be in QEMU after its plug or unplug failed: closed once the
/// guest lets it go ([`settle_all`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stuck {
    pub id: String,
    /// The guest was asked to let it go (`device_del` taken).
    pub asked: bool,
}

/// A plug that failed: why, and what may be left in QEMU.
#[derive(Debug)]
pub struct PlugFailed {
    pub error: MemctlError,
    pub left: Option<Stuck>,
}

/// An unplug that did not finish: why, and the disk, left for [`settle_all`].
#[derive(Debug)]
pub struct UnplugFailed {
    pub error: MemctlError,
    pub stuck: Stuck,
}

/// Takes back descriptor set `set` that a failed step left in QEMU, on a session of its
/// own (the failed one may be out of step); best effort, as QEMU closes it with the VM.
pub(crate) async fn remove_fdset(qmp: &Path, set: u64) {
    if let Ok(mut q) = Session::connect(qmp, Instant::now() + CLEANUP).await {
        let _ = q
            .execute(serde_json::json!({"execute": "remove-fd", "arguments": {"fdset-id": set}}))
            .await;
    }
}

/// Plugs `disk` into the VM as virtio-blk device `id` (also its block node's name)
/// with `serial`, through QMP at `qmp`, by `deadline`. What a failed plug made is taken
/// back on a fresh session (the failed one may be out of step): a device whose
/// `device_add` was done after all is asked to go, and returned as left.
pub async fn plug(
    qmp: &Path,
    disk: &HostDisk,
    id: &str,
    serial: &str,
    deadline: Instant,
) -> Result<(), PlugFailed> {
    let mut fdset = None;
    let Err(error) = plug_steps(qmp, disk, id, serial, deadline, &mut fdset).await else {
        return Ok(());
    };
    let mut stuck = Stuck {
        id: id.to_owned(),
        asked: false,
    };
    let left = match Session::connect(qmp, Instant::now() + CLEANUP).await {
        Ok(mut q) => {
            if let Some(set) = fdset {
                let _ = q
                    .execute(
                        serde_json::json!({"execute": "remove-fd", "arguments": {"fdset-id": set}}),
                    )
                    .await;
            }
            settle(&mut q, &mut stuck).await.err().map(|_| stuck)
        }
        Err(_) => Some(stuck),
    };
    Err(PlugFailed { error, left })
}

async fn plug_steps(
    qmp: &Path,
    disk: &HostDisk,
    id: &str,
    serial: &str,
    deadline: Instant,
    fdset: &mut Option<u64>,
) -> Result<(), MemctlError> {
    let mut q = Session::connect(qmp, deadline).await?;
    add_host_node(&mut q, disk, id, true, fdset).await?;
    q.execute(serde_json::json!({"execute": "device_add", "arguments": {
        "driver": "virtio-blk-pci",
        "id": id,
        "drive": id,
        "serial": serial,
    }}))
    .await?;
    Ok(())
}

/// Hands `disk`'s descriptor to QEMU and makes block node `node` on it: a `raw` node
/// over the host device when `raw`, else the host device's node alone (for a slot's own
/// `raw` node to take). `fdset` names the descriptor set while QEMU still holds it, for
/// a cleanup to remove.
pub(crate) async fn add_host_node(
    q: &mut Session,
    disk: &HostDisk,
    node: &str,
    raw: bool,
    fdset: &mut Option<u64>,
) -> Result<(), MemctlError> {
    let added = q
        .execute_with_fd(serde_json::json!({"execute": "add-fd"}), disk.fd.as_fd())
        .await?;
    let set = added
        .get("fdset-id")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| MemctlError::BadReply(format!("add-fd: {added}")))?;
    *fdset = Some(set);
    let read_only = !disk.writable;
    let file = serde_json::json!({
        "driver": "host_device",
        "filename": format!("/dev/fdset/{set}"),
        "read-only": read_only,
        // As under runc: nothing stops two users of one device.
        "locking": "off",
    });
    let mut arguments = if raw {
        serde_json::json!({"driver": "raw", "read-only": read_only, "file": file})
    } else {
        file
    };
    arguments["node-name"] = node.into();
    q.execute(serde_json::json!({"execute": "blockdev-add", "arguments": arguments}))
        .await?;
    // QEMU holds its own copy once the node is made; the set's can go.
    q.execute(serde_json::json!({"execute": "remove-fd", "arguments": {"fdset-id": set}}))
        .await?;
    *fdset = None;
    Ok(())
}

/// Unplugs device `id`: asks the guest to let it go (ACPI eject), waits until QEMU no
/// longer has the device, then closes its block node (and with it the host's device).
/// A guest that keeps the disk keeps it: an error at `deadline`, the disk stuck.
/// Asked on short sessions, so memory growth is never held up behind a slow guest.
pub async fn unplug(qmp: &Path, id: &str, deadline: Instant) -> Result<(), UnplugFailed> {
    let mut stuck = Stuck {
        id: id.to_owned(),
        asked: false,
    };
    match unplug_steps(qmp, &mut stuck, deadline).await {
        Ok(()) => Ok(()),
        Err(error) => Err(UnplugFailed { error, stuck }),
    }
}

async fn unplug_steps(qmp: &Path, s: &mut Stuck, deadline: Instant) -> Result<(), MemctlError> {
    let started = Instant::now();
    let mut q = Session::connect(qmp, deadline).await?;
    device_del(&mut q, &s.id).await?;
    s.asked = true;
    drop(q);
    loop {
        let mut q = Session::connect(qmp, deadline).await?;
        if !present(&mut q, &s.id).await? {
            break;
        }
        drop(q);
        if Instant::now() + POLL >= deadline {
            return Err(MemctlError::Timeout(deadline.duration_since(started)));
        }
        tokio::time::sleep(POLL).await;
    }
    let mut q = Session::connect(qmp, Instant::now() + CLEANUP).await?;
    blockdev_del(&mut q, &s.id).await
}

/// Moves each stuck disk a step on, on one session: asks the guest to let it go if it
/// was not asked yet, and closes it once QEMU no longer has it. Those still left.
pub async fn settle_all(qmp: &Path, stuck: Vec<Stuck>) -> Vec<Stuck> {
    if stuck.is_empty() {
        return stuck;
    }
    let Ok(mut q) = Session::connect(qmp, Instant::now() + CLEANUP).await else {
        return stuck;
    };
    let mut left = Vec::new();
    for mut s in stuck {
        if settle(&mut q, &mut s).await.is_err() {
            left.push(s);
        }
    }
    left
}

/// One step for a disk that may still be in QEMU; `Ok` once nothing of it is left.
async fn settle(q: &mut Session, s: &mut Stuck) -> Result<(), MemctlError> {
    if present(q, &s.id).await? {
        if !s.asked {
            device_del(q, &s.id).await?;
            s.asked = true;
        }
        return Err(MemctlError::Refused(format!(
            "device {} is still plugged",
            s.id
        )));
    }
    blockdev_del(q, &s.id).await
}

/// Asks the guest to let device `id` go; one already gone, or already being let go
/// of, is no error.
async fn device_del(q: &mut Session, id: &str) -> Result<(), MemctlError> {
    match q
        .execute(serde_json::json!({"execute": "device_del", "arguments": {"id": id}}))
        .await
    {
        Ok(_) | Err(MemctlError::NotFound(_)) => Ok(()),
        Err(MemctlError::Refused(why)) if why.contains("in the process of unplug") => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether QEMU has device `id`.
async fn present(q: &mut Session, id: &str) -> Result<bool, MemctlError> {
    let list = q
        .execute(serde_json::json!({"execute": "qom-list", "arguments": {"path": "/machine/peripheral"}}))
        .await?;
    let list = list
        .as_array()
        .ok_or_else(|| MemctlError::BadReply(format!("qom-list: {list}")))?;
    Ok(list
        .iter()
        .any(|p| p.get("name").and_then(|n| n.as_str()) == Some(id)))
}

/// Closes block node `id`; one already gone is no error.
pub(crate) async fn blockdev_del(q: &mut Session, id: &str) -> Result<(), MemctlError> {
    match q
        .execute(serde_json::json!({"execute": "blockdev-del", "arguments": {"node-name": id}}))
        .await
    {
        Err(MemctlError::Refused(why)) if why.contains("Failed to find node") => Ok(()),
        r => r.map(|_| ()),
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! A fake QEMU for the disk code's tests.

    use std::path::Path;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    /// What the fake QEMU was asked: each command's name and arguments, and whether a
    /// descriptor came with it.
    pub type Seen = Arc<Mutex<Vec<(String, serde_json::Value, bool)>>>;

    /// The fake's guest: while `keeps` is true it never lets a disk go; once false, it
    /// lets go of every disk it was asked to.
    pub struct Qemu {
        pub seen: Seen,
        pub keeps: Arc<AtomicBool>,
    }

    impl Qemu {
        /// The names of the commands seen so far (but capabilities), forgetting them.
        pub fn names(&self) -> Vec<String> {
            let mut seen = self.seen.lock().unwrap();
            seen.drain(..)
                .map(|(n, _, _)| n)
                .filter(|n| n != "qmp_capabilities")
                .collect()
        }
    }

    /// Serves connection after connection at `sock`: greets, then answers each command
    /// by name, with its id, keeping the devices plugged. `fail` names a command it
    /// refuses; `device_add-done` refuses a device_add it has done.
    pub fn qemu(sock: &Path, keeps: bool, fail: &'static str) -> Qemu {
        let listener = std::os::unix::net::UnixListener::bind(sock).unwrap();
        let seen: Seen = Default::default();
        let keeps = Arc::new(AtomicBool::new(keeps));
        let (record, keeping) = (seen.clone(), keeps.clone());
        std::thread::spawn(move || {
            use std::io::Write;
            let mut devices: Vec<String> = Vec::new();
            let mut asked: Vec<String> = Vec::new();
            for s in listener.incoming() {
                let mut s = s.unwrap();
                s.write_all(b"{\"QMP\": {}}\n").unwrap();
                let mut pending = Vec::new();
                loop {
                    let mut buf = [0u8; 4096];
                    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
                    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
                    let Ok(msg) = nix::sys::socket::recvmsg::<()>(
                        std::os::fd::AsRawFd::as_raw_fd(&s),
                        &mut iov,
                        Some(&mut space),
                        nix::sys::socket::MsgFlags::empty(),
                    ) else {
                        break;
                    };
                    let got_fd = msg.cmsgs().unwrap().any(|c| {
                        matches!(c, nix::sys::socket::ControlMessageOwned::ScmRights(f) if !f.is_empty())
                    });
                    let n = msg.bytes;
                    if n == 0 {
                        break;
                    }
                    pending.extend_from_slice(&buf[..n]);
                    while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = pending.drain(..=end).collect();
                        let cmd: serde_json::Value = serde_json::from_slice(&line).unwrap();
                        let name = cmd["execute"].as_str().unwrap().to_owned();
                        let args = cmd["arguments"].clone();
                        record
                            .lock()
                            .unwrap()
                            .push((name.clone(), args.clone(), got_fd));
                        if !keeping.load(Ordering::SeqCst) {
                            devices.retain(|d| !asked.contains(d));
                        }
                        let error = |class: &str, desc: &str| serde_json::json!({"error": {"class": class, "desc": desc}});
                        let ok = serde_json::json!({"return": {}});
                        let reply = match name.as_str() {
                            n if n == fail => error("GenericError", "no slot"),
                            "add-fd" => serde_json::json!({"return": {"fdset-id": 3, "fd": 20}}),
                            "device_add" => {
                                devices.push(args["id"].as_str().unwrap().into());
                                if fail == "device_add-done" {
                                    error("GenericError", "no reply in time")
                                } else {
                                    ok
                                }
                            }
                            "device_del" => {
                                let id = args["id"].as_str().unwrap().to_owned();
                                if !devices.contains(&id) {
                                    error("DeviceNotFound", "no such device")
                                } else if asked.contains(&id) {
                                    error(
                                        "GenericError",
                                        &format!("Device {id} is already in the process of unplug"),
                                    )
                                } else {
                                    asked.push(id.clone());
                                    if !keeping.load(Ordering::SeqCst) {
                                        devices.retain(|d| *d != id);
                                    }
                                    ok
                                }
                            }
                            "qom-list" => serde_json::json!({"return": devices
                                .iter()
                                .map(|d| serde_json::json!({"name": d, "type": "child<virtio-blk-pci>"}))
                                .collect::<Vec<_>>()}),
                            "blockdev-del" if devices.iter().any(|d| *d == args["node-name"]) => {
                                error("GenericError", "Node is in use")
                            }
                            _ => ok,
                        };
                        let mut reply = reply;
                        reply["id"] = cmd["id"].clone();
                        if s.write_all(format!("{reply}\n").as_bytes()).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Qemu { seen, keeps }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn the_host_device_is_found_by_its_numbers_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        let dev = dir.path().join("dev");
        std::fs::create_dir_all(&dev).unwrap();
        // /dev/null is 1:3, a character device: named right, but not a block device.
        std::fs::create_dir_all(sys.join("1:3")).unwrap();
        std::fs::write(sys.join("1:3/uevent"), "MAJOR=1\nMINOR=3\nDEVNAME=null\n").unwrap();
        std::os::unix::fs::symlink("/dev/null", dev.join("null")).unwrap();
        let e = open_in(&sys, &dev, 1, 3, false).unwrap_err().to_string();
        assert!(e.contains("cannot open"), "a link is not followed: {e}");
        std::fs::remove_file(dev.join("null")).unwrap();
        std::fs::write(sys.join("1:3/uevent"), "DEVNAME=../../dev/null\n").unwrap();
        let e = open_in(&sys, &dev, 1, 3, false).unwrap_err().to_string();
        assert!(e.contains("not a device name"), "{e}");
        let e = open_in(&sys, &dev, 7, 99, false).unwrap_err().to_string();
        assert!(
            e.contains("7:99") && e.contains("not a block device of this host"),
            "{e}"
        );
        // The real /dev/null under its own name: opened, and refused for its type.
        std::fs::write(sys.join("1:3/uevent"), "DEVNAME=null\n").unwrap();
        let e = open_in(&sys, Path::new("/dev"), 1, 3, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not that block device (it is 1:3)"), "{e}");
    }

    pub(crate) fn null_disk() -> HostDisk {
        let file = std::fs::File::open("/dev/null").unwrap();
        HostDisk {
            major: 1,
            minor: 3,
            path: "/dev/null".into(),
            fd: file.into(),
            writable: false,
        }
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    #[tokio::test]
    async fn a_disk_is_plugged_with_its_descriptor_and_unplugged_after_the_guest_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let q = fake::qemu(&sock, false, "");
        plug(&sock, &null_disk(), "disk1", "cocoon-disk1", soon())
            .await
            .unwrap();
        {
            let s = q.seen.lock().unwrap();
            let get = |name: &str| s.iter().find(|c| c.0 == name).cloned().unwrap();
            assert!(get("add-fd").2, "the descriptor rides with add-fd");
            let node = get("blockdev-add").1;
            assert_eq!(node["node-name"], "disk1");
            assert_eq!(node["read-only"], true);
            assert_eq!(node["file"]["driver"], "host_device");
            assert_eq!(node["file"]["filename"], "/dev/fdset/3");
            assert_eq!(node["file"]["read-only"], true);
            assert_eq!(get("remove-fd").1["fdset-id"], 3);
            let dev = get("device_add").1;
            assert_eq!(
                (&dev["driver"], &dev["id"], &dev["drive"], &dev["serial"]),
                (
                    &"virtio-blk-pci".into(),
                    &"disk1".into(),
                    &"disk1".into(),
                    &"cocoon-disk1".into()
                )
            );
            assert!(!get("blockdev-add").2 && !get("device_add").2);
        }
        assert_eq!(
            q.names(),
            ["add-fd", "blockdev-add", "remove-fd", "device_add"]
        );
        unplug(&sock, "disk1", soon()).await.unwrap();
        assert_eq!(q.names(), ["device_del", "qom-list", "blockdev-del"]);
        // A device the guest ejected on its own: device_del finds nothing, and the
        // unplug still closes the node.
        unplug(&sock, "disk1", soon()).await.unwrap();
        assert_eq!(q.names(), ["device_del", "qom-list", "blockdev-del"]);
    }

    #[tokio::test]
    async fn a_failed_plug_takes_back_what_it_made() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let q = fake::qemu(&sock, false, "device_add");
        let e = plug(&sock, &null_disk(), "disk2", "cocoon-disk2", soon())
            .await
            .unwrap_err();
        assert!(
            matches!(&e.error, MemctlError::Refused(s) if s == "no slot"),
            "{e:?}"
        );
        assert_eq!(e.left, None, "nothing left");
        assert_eq!(
            q.names(),
            [
                "add-fd",
                "blockdev-add",
                "remove-fd",
                "device_add",
                "qom-list",
                "blockdev-del"
            ]
        );
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let q = fake::qemu(&sock, false, "blockdev-add");
        let e = plug(&sock, &null_disk(), "disk3", "cocoon-disk3", soon())
            .await
            .unwrap_err();
        assert_eq!(e.left, None);
        assert_eq!(
            q.names(),
            [
                "add-fd",
                "blockdev-add",
                "remove-fd",
                "qom-list",
                "blockdev-del"
            ],
            "the descriptor set is removed too"
        );
        // A device_add that was done though its reply said otherwise (or never came):
        // the guest is asked to let it go, and the disk is left stuck until it does.
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let q = fake::qemu(&sock, true, "device_add-done");
        let e = plug(&sock, &null_disk(), "disk4", "cocoon-disk4", soon())
            .await
            .unwrap_err();
        let left = e.left.expect("left stuck");
        assert_eq!((left.id.as_str(), left.asked), ("disk4", true));
        assert_eq!(q.names()[4..], ["qom-list", "device_del"]);
        let left = settle_all(&sock, vec![left]).await;
        assert_eq!(left.len(), 1, "still kept by the guest");
        q.keeps.store(false, Ordering::SeqCst);
        assert!(settle_all(&sock, left).await.is_empty());
        assert_eq!(q.names(), ["qom-list", "qom-list", "blockdev-del"]);
    }

    #[tokio::test]
    async fn a_guest_that_keeps_its_disk_ends_the_unplug_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let q = fake::qemu(&sock, true, "");
        plug(&sock, &null_disk(), "disk1", "cocoon-disk1", soon())
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let deadline = Instant::now() + Duration::from_millis(600);
        let e = unplug(&sock, "disk1", deadline).await.unwrap_err();
        assert!(
            matches!(e.error, MemctlError::Timeout(d) if d >= Duration::from_millis(500)),
            "the whole wait, not one poll's: {e:?}"
        );
        assert_eq!(
            e.stuck,
            Stuck {
                id: "disk1".into(),
                asked: true
            }
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        // Later, still there: the node stays, and it is not asked twice.
        q.names();
        let left = settle_all(&sock, vec![e.stuck]).await;
        assert_eq!(left.len(), 1);
        assert_eq!(q.names(), ["qom-list"]);
        q.keeps.store(false, Ordering::SeqCst);
        assert!(settle_all(&sock, left).await.is_empty());
        assert_eq!(q.names(), ["qom-list", "blockdev-del"]);
    }
}
