//! Raw block devices for containers (a spec's `linux.devices` of type `b`: Kubernetes
//! `volumeDevices`, `ctr run --device`). The spec names the host's device by its
//! major:minor, which means nothing inside the VM, so the shim opens the host's device
//! itself, hands the descriptor to QEMU (`add-fd`; a jailed QEMU could not open
//! `/dev/...`), and plugs it as a virtio-blk disk with a serial of its choosing
//! (`blockdev-add`, `device_add`); the agent finds the disk by that serial and gives
//! the container a node with the guest's numbers. Unplugged (ACPI eject) when the
//! last container using it goes.
//!
//! Needs QEMU's `pc`: its PCI bus takes devices after boot. microvm and cocoon-vmm have
//! no bus a device can join after boot.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use tokio::time::Instant;

use super::memctl::MemctlError;
use super::qmp::Session;

/// Why a pod VM cannot take a block device.
pub const NEEDS_PC: &str = "raw block devices (the spec's linux.devices of type b) are \
    plugged into the pod VM after it boots, which needs hypervisor = \"qemu\" with \
    qemu.machine = \"pc\"";

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
    #[error("cannot plug block device {major}:{minor} into the pod VM: {source}")]
    Plug {
        major: u64,
        minor: u64,
        #[source]
        source: MemctlError,
    },
    #[error("{0}")]
    Refused(String),
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

/// Plugs `disk` into the VM as virtio-blk device `id` (also its block node's name)
/// with `serial`, through QMP at `qmp`, by `deadline`. Anything half made is taken
/// back before an error returns.
pub async fn plug(
    qmp: &Path,
    disk: &HostDisk,
    id: &str,
    serial: &str,
    deadline: Instant,
) -> Result<(), MemctlError> {
    let mut q = Session::connect(qmp, deadline).await?;
    let added = q
        .execute_with_fd(serde_json::json!({"execute": "add-fd"}), disk.fd.as_fd())
        .await?;
    let fdset = added
        .get("fdset-id")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| MemctlError::BadReply(format!("add-fd: {added}")))?;
    let read_only = !disk.writable;
    let made = q
        .execute(serde_json::json!({"execute": "blockdev-add", "arguments": {
            "node-name": id,
            "driver": "raw",
            "read-only": read_only,
            "file": {
                "driver": "host_device",
                "filename": format!("/dev/fdset/{fdset}"),
                "read-only": read_only,
                // As under runc: nothing stops two users of one device.
                "locking": "off",
            },
        }}))
        .await;
    // QEMU holds its own copy once the node is made; the set's goes either way.
    let removed = q
        .execute(serde_json::json!({"execute": "remove-fd", "arguments": {"fdset-id": fdset}}))
        .await;
    made?;
    let device = match removed {
        Ok(_) => {
            q.execute(serde_json::json!({"execute": "device_add", "arguments": {
                "driver": "virtio-blk-pci",
                "id": id,
                "drive": id,
                "serial": serial,
            }}))
            .await
        }
        Err(e) => Err(e),
    };
    if let Err(e) = device {
        let _ = q
            .execute(serde_json::json!({"execute": "blockdev-del", "arguments": {"node-name": id}}))
            .await;
        return Err(e);
    }
    Ok(())
}

/// Unplugs device `id`: asks the guest to let it go (ACPI eject), waits until QEMU
/// says it is gone, then closes its block node (and with it the host's device). A
/// guest that keeps the disk keeps it until its VM ends: an error here.
pub async fn unplug(qmp: &Path, id: &str, deadline: Instant) -> Result<(), MemctlError> {
    let mut q = Session::connect(qmp, deadline).await?;
    q.execute(serde_json::json!({"execute": "device_del", "arguments": {"id": id}}))
        .await?;
    q.wait_event("DEVICE_DELETED", "device", id).await?;
    q.execute(serde_json::json!({"execute": "blockdev-del", "arguments": {"node-name": id}}))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// A fake QEMU on one connection: greets, then answers each command by name,
    /// recording each and whether a descriptor came with it; `DEVICE_DELETED` comes
    /// before device_del's own reply, as QEMU may send it.
    fn fake_qemu(
        listener: std::os::unix::net::UnixListener,
        fail: &'static str,
    ) -> std::thread::JoinHandle<Vec<(String, bool)>> {
        std::thread::spawn(move || {
            use std::io::Write;
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"{\"QMP\": {}}\n").unwrap();
            let mut seen = Vec::new();
            let mut pending = Vec::new();
            loop {
                let mut buf = [0u8; 4096];
                let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
                let mut iov = [std::io::IoSliceMut::new(&mut buf)];
                let msg = nix::sys::socket::recvmsg::<()>(
                    std::os::fd::AsRawFd::as_raw_fd(&s),
                    &mut iov,
                    Some(&mut space),
                    nix::sys::socket::MsgFlags::empty(),
                )
                .unwrap();
                let got_fd = msg.cmsgs().unwrap().any(|c| {
                    matches!(c, nix::sys::socket::ControlMessageOwned::ScmRights(f) if !f.is_empty())
                });
                let n = msg.bytes;
                if n == 0 {
                    return seen;
                }
                pending.extend_from_slice(&buf[..n]);
                while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let cmd: serde_json::Value = serde_json::from_slice(&line).unwrap();
                    let name = cmd["execute"].as_str().unwrap().to_owned();
                    seen.push((name.clone(), got_fd));
                    let reply = match name.as_str() {
                        n if n == fail => {
                            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"no slot\"}}\n".to_string()
                        }
                        "add-fd" => "{\"return\": {\"fdset-id\": 3, \"fd\": 20}}\n".into(),
                        "device_del" => format!(
                            "{{\"event\": \"DEVICE_DELETED\", \"data\": {{\"device\": \"{}\"}}}}\n{{\"return\": {{}}}}\n",
                            cmd["arguments"]["id"].as_str().unwrap()
                        ),
                        _ => "{\"return\": {}}\n".into(),
                    };
                    s.write_all(reply.as_bytes()).unwrap();
                }
            }
        })
    }

    fn names(seen: &[(String, bool)]) -> Vec<&str> {
        seen.iter().map(|(n, _)| n.as_str()).collect()
    }

    #[tokio::test]
    async fn a_disk_is_plugged_with_its_descriptor_and_unplugged_after_the_guest_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let file = std::fs::File::open("/dev/null").unwrap();
        let disk = HostDisk {
            major: 1,
            minor: 3,
            path: "/dev/null".into(),
            fd: file.into(),
            writable: false,
        };
        let deadline = Instant::now() + std::time::Duration::from_secs(10);

        let server = fake_qemu(std::os::unix::net::UnixListener::bind(&sock).unwrap(), "");
        plug(&sock, &disk, "disk1", "cocoon-disk1", deadline)
            .await
            .unwrap();
        let seen = server.join().unwrap();
        assert_eq!(
            names(&seen),
            [
                "qmp_capabilities",
                "add-fd",
                "blockdev-add",
                "remove-fd",
                "device_add"
            ]
        );
        assert!(seen[1].1, "the descriptor rides with add-fd");
        assert!(!seen[2].1 && !seen[4].1);

        // No slot left: the node made for it is taken back, and the error says why.
        std::fs::remove_file(&sock).unwrap();
        let server = fake_qemu(
            std::os::unix::net::UnixListener::bind(&sock).unwrap(),
            "device_add",
        );
        let e = plug(&sock, &disk, "disk2", "cocoon-disk2", deadline)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, MemctlError::Refused(s) if s == "no slot"),
            "{e:?}"
        );
        assert_eq!(
            names(&server.join().unwrap())[4..],
            ["device_add", "blockdev-del"]
        );

        std::fs::remove_file(&sock).unwrap();
        let server = fake_qemu(std::os::unix::net::UnixListener::bind(&sock).unwrap(), "");
        unplug(&sock, "disk1", deadline).await.unwrap();
        assert_eq!(
            names(&server.join().unwrap()),
            ["qmp_capabilities", "device_del", "blockdev-del"]
        );
    }

    #[tokio::test]
    async fn a_guest_that_keeps_its_disk_ends_the_unplug_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        // Answers device_del, but no DEVICE_DELETED ever comes.
        let _server = std::thread::spawn(move || {
            use std::io::{BufRead, Write};
            let (s, _) = listener.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            w.write_all(b"{\"QMP\": {}}\n").unwrap();
            for line in std::io::BufReader::new(s).lines() {
                if line.is_err() {
                    return;
                }
                let _ = w.write_all(b"{\"return\": {}}\n");
            }
        });
        let started = std::time::Instant::now();
        let deadline = Instant::now() + std::time::Duration::from_millis(600);
        let e = unplug(&sock, "disk1", deadline).await.unwrap_err();
        assert!(matches!(e, MemctlError::Timeout(_)), "{e:?}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }
}
