//! Raw block devices on cocoon-vmm. A microVM has no bus a disk can join after boot, so
//! its VM gets empty virtio-blk slots at boot (`[vm] block_slots`) and the shim fills
//! one when a container names a host device: it opens the device itself (as for QEMU,
//! `disks::open_host`), passes the descriptor to the jailed VMM with the request
//! (`attach_disk` on its API socket, SCM_RIGHTS), and the guest's driver sees the
//! slot's capacity and serial change. Emptied (`detach_disk`) when the last container
//! using it goes: the VMM closes the device at once, whatever the guest does, so a
//! slot is never stuck the way an ACPI eject can be.
//!
//! The API socket is the one `memctl` made in the root-owned run directory; the VMM
//! runs the guest, so its replies are read with a deadline and a bounded length.

use std::os::fd::AsFd;
use std::path::Path;

use tokio::time::Instant;

use super::disks::HostDisk;
use super::memctl::MemctlError;

/// Puts `disk` in slot `slot` under `serial`, read-only unless it was opened writable.
pub async fn attach(
    api: &Path,
    slot: u8,
    serial: &str,
    disk: &HostDisk,
    deadline: Instant,
) -> Result<(), MemctlError> {
    let request = serde_json::json!({
        "action": "attach_disk",
        "slot": slot,
        "serial": serial,
        "read_only": !disk.writable,
    });
    let holds = call(api, &request, Some(disk), deadline).await?;
    match holds_in(&holds, slot)? {
        Some(s) if s == serial => Ok(()),
        other => Err(MemctlError::BadReply(format!(
            "slot {slot} holds {other:?} after attaching {serial}"
        ))),
    }
}

/// Empties slot `slot`: the VMM closes the host's device.
pub async fn detach(api: &Path, slot: u8, deadline: Instant) -> Result<(), MemctlError> {
    let request = serde_json::json!({"action": "detach_disk", "slot": slot});
    let holds = call(api, &request, None, deadline).await?;
    match holds_in(&holds, slot)? {
        None => Ok(()),
        Some(s) => Err(MemctlError::BadReply(format!(
            "slot {slot} still holds {s} after it was emptied"
        ))),
    }
}

/// What the reply's `disks` says slot `slot` holds.
fn holds_in(disks: &serde_json::Value, slot: u8) -> Result<Option<String>, MemctlError> {
    let entry = disks
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|d| d["slot"].as_u64() == Some(u64::from(slot)))
        })
        .ok_or_else(|| MemctlError::BadReply(format!("no slot {slot} in {disks}")))?;
    Ok(entry["serial"].as_str().map(str::to_owned))
}

/// One API request (with `disk`'s descriptor riding along); the reply's `disks`.
async fn call(
    api: &Path,
    request: &serde_json::Value,
    disk: Option<&HostDisk>,
    deadline: Instant,
) -> Result<serde_json::Value, MemctlError> {
    let left = deadline.saturating_duration_since(Instant::now());
    let fd = disk.map(|d| d.fd.as_fd());
    super::memctl::vmm_call(api, request, fd, "disks", left).await
}

/// A cocoon-vmm API stand-in for tests: it keeps slots as the real one does and
/// records each request with whether a descriptor came with it.
#[cfg(test)]
pub(crate) mod fake {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixListener;
    use std::path::Path;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    pub struct Vmm {
        /// (action, slot, whether a descriptor came) per request.
        pub asked: Arc<Mutex<Vec<(String, u64, bool)>>>,
        pub slots: Arc<Mutex<Vec<Option<String>>>>,
        /// The action answered with an error ("" for none); a test may change it.
        pub refuse: Arc<Mutex<&'static str>>,
    }

    impl Vmm {
        pub fn asked(&self) -> Vec<(String, u64, bool)> {
            std::mem::take(&mut *self.asked.lock().unwrap())
        }
    }

    /// Serves `sock` with `count` slots; `refuse` (an action) is answered with an error.
    pub fn vmm(sock: &Path, count: usize, refuse: &'static str) -> Vmm {
        let listener = UnixListener::bind(sock).unwrap();
        let v = Vmm {
            slots: Arc::new(Mutex::new(vec![None; count])),
            refuse: Arc::new(Mutex::new(refuse)),
            ..Vmm::default()
        };
        let state = v.clone();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let mut s = s.unwrap();
                let mut buf = [0u8; 4096];
                let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
                let mut iov = [std::io::IoSliceMut::new(&mut buf)];
                let Ok(msg) = nix::sys::socket::recvmsg::<()>(
                    s.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    nix::sys::socket::MsgFlags::empty(),
                ) else {
                    continue;
                };
                let got_fd = msg.cmsgs().unwrap().any(|c| {
                    matches!(c, nix::sys::socket::ControlMessageOwned::ScmRights(f) if !f.is_empty())
                });
                let n = msg.bytes;
                let req: serde_json::Value = serde_json::from_slice(&buf[..n]).unwrap();
                let action = req["action"].as_str().unwrap().to_owned();
                let slot = req["slot"].as_u64().unwrap();
                state
                    .asked
                    .lock()
                    .unwrap()
                    .push((action.clone(), slot, got_fd));
                let mut slots = state.slots.lock().unwrap();
                let reply = if action == *state.refuse.lock().unwrap() {
                    serde_json::json!({"ok": false, "state": "running", "error": "refused by the test"})
                } else {
                    let held = &mut slots[slot as usize];
                    *held = match action.as_str() {
                        "attach_disk" => req["serial"].as_str().map(str::to_owned),
                        _ => None,
                    };
                    let disks: Vec<_> = slots
                        .iter()
                        .enumerate()
                        .map(|(i, s)| serde_json::json!({"slot": i, "serial": s, "read_only": false}))
                        .collect();
                    serde_json::json!({"ok": true, "state": "running", "disks": disks})
                };
                let _ = writeln!(s, "{reply}");
            }
        });
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn disk(writable: bool) -> HostDisk {
        HostDisk {
            major: 7,
            minor: 0,
            path: "/dev/null".into(),
            fd: std::fs::File::open("/dev/null").unwrap().into(),
            writable,
        }
    }

    #[tokio::test]
    async fn a_disk_goes_into_a_slot_with_its_descriptor_and_comes_out() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("memctl.sock");
        let v = fake::vmm(&sock, 2, "");
        let deadline = || Instant::now() + Duration::from_secs(5);
        attach(&sock, 1, "cocoon-disk1", &disk(true), deadline())
            .await
            .unwrap();
        assert_eq!(v.asked(), [("attach_disk".into(), 1, true)]);
        assert_eq!(v.slots.lock().unwrap()[1].as_deref(), Some("cocoon-disk1"));
        detach(&sock, 1, deadline()).await.unwrap();
        assert_eq!(v.asked(), [("detach_disk".into(), 1, false)]);
        assert_eq!(v.slots.lock().unwrap()[1], None);
    }

    #[tokio::test]
    async fn refusals_silence_and_wrong_answers_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("memctl.sock");
        fake::vmm(&sock, 1, "attach_disk");
        let deadline = Instant::now() + Duration::from_secs(5);
        let e = attach(&sock, 0, "s", &disk(false), deadline)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, MemctlError::Refused(r) if r.contains("refused by the test")),
            "{e}"
        );
        // A slot the reply does not list.
        let e = detach(&sock, 3, deadline).await.unwrap_err();
        assert!(matches!(e, MemctlError::BadReply(_)), "{e}");

        // A VMM that never answers: the deadline.
        let silent = dir.path().join("silent.sock");
        let _l = std::os::unix::net::UnixListener::bind(&silent).unwrap();
        let started = std::time::Instant::now();
        let e = detach(&silent, 0, Instant::now() + Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(e, MemctlError::Timeout(_)), "{e}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}
