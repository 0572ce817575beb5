//! A pod VM's raw block devices (`hypervisor::disks`): one guest disk per host device
//! per pod, whichever of its containers use it, as one device node is one device under
//! runc; plugged for the first container that names it, unplugged after the last.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use cocoon_protocol::agent as pb;
use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType, Spec};

use crate::hypervisor::disks::{self, DiskError};

/// At most this many host devices in one pod: QEMU's PCI bus has 32 slots, a few taken.
pub const MAX_DISKS: usize = 16;

/// The pod's plugged disks, by the host device's major:minor.
pub struct Disks {
    /// QMP, where the VM takes disks after boot.
    qmp: Option<PathBuf>,
    /// How long one plug or unplug may take.
    call: Duration,
    table: tokio::sync::Mutex<Table>,
}

#[derive(Default)]
struct Table {
    /// Names given so far: each plug gets a new one, so a disk the guest kept (its
    /// eject never came) can never be taken for a new one.
    next: u32,
    plugged: BTreeMap<(u64, u64), Plugged>,
}

struct Plugged {
    id: String,
    serial: String,
    writable: bool,
    users: BTreeSet<String>,
}

/// A block device the spec gives a container: its path there, its host numbers and
/// whether the container may write to it.
#[derive(Debug, PartialEq, Eq)]
pub struct Wanted {
    pub path: String,
    pub major: u64,
    pub minor: u64,
    pub writable: bool,
}

/// The spec's block devices, and for each whether its cgroup rules let it be written
/// (the last rule that matches decides, as in the kernel's device cgroup; a device no
/// rule allows is plugged read-only, and the container cannot open it, as under runc).
pub fn wanted(spec: &Spec) -> Vec<Wanted> {
    let Some(linux) = spec.linux() else {
        return Vec::new();
    };
    let rules: &[LinuxDeviceCgroup] = linux
        .resources()
        .as_ref()
        .and_then(|r| r.devices().as_deref())
        .unwrap_or_default();
    linux
        .devices()
        .as_deref()
        .unwrap_or_default()
        .iter()
        .filter(|d| d.typ() == LinuxDeviceType::B)
        .map(|d| {
            let (major, minor) = (d.major() as u64, d.minor() as u64);
            let writable = rules
                .iter()
                .rev()
                .find(|r| {
                    matches!(
                        r.typ(),
                        None | Some(LinuxDeviceType::A) | Some(LinuxDeviceType::B)
                    ) && r.major().is_none_or(|m| m as u64 == major)
                        && r.minor().is_none_or(|m| m as u64 == minor)
                })
                .is_some_and(|r| {
                    r.allow() && r.access().as_deref().is_some_and(|a| a.contains('w'))
                });
            Wanted {
                path: d.path().to_string_lossy().into_owned(),
                major,
                minor,
                writable,
            }
        })
        .collect()
}

impl Disks {
    pub fn new(qmp: Option<PathBuf>, call: Duration) -> Disks {
        Disks {
            qmp,
            call,
            table: Default::default(),
        }
    }

    /// Plugs what `container`'s spec asks that the pod does not have yet: the serial
    /// of each of its block devices, for the agent. Nothing is left plugged for it
    /// when this fails.
    pub async fn attach(
        &self,
        container: &str,
        spec: &Spec,
    ) -> Result<Vec<pb::BlockDevice>, DiskError> {
        let wanted = wanted(spec);
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let Some(qmp) = &self.qmp else {
            return Err(DiskError::Unsupported(disks::NEEDS_PC));
        };
        let deadline = tokio::time::Instant::now() + self.call;
        let mut out = Vec::new();
        let mut table = self.table.lock().await;
        let mut failed = None;
        for w in &wanted {
            let key = (w.major, w.minor);
            if let Some(p) = table.plugged.get_mut(&key) {
                if w.writable && !p.writable {
                    failed = Some(DiskError::Refused(format!(
                        "block device {}:{} is in this pod read-only already; another \
                         container cannot have it writable",
                        w.major, w.minor
                    )));
                    break;
                }
                p.users.insert(container.to_owned());
                out.push(block_device(&w.path, &p.serial));
                continue;
            }
            if table.plugged.len() >= MAX_DISKS {
                failed = Some(DiskError::Refused(format!(
                    "a pod takes at most {MAX_DISKS} block devices"
                )));
                break;
            }
            // Opened on a blocking thread: a device can take its time to open.
            let (major, minor, writable) = (w.major, w.minor, w.writable);
            let opened =
                tokio::task::spawn_blocking(move || disks::open_host(major, minor, writable))
                    .await
                    .map_err(|e| DiskError::Refused(e.to_string()))
                    .and_then(|r| r);
            let host = match opened {
                Ok(h) => h,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            table.next += 1;
            let id = format!("disk{}", table.next);
            // virtio-blk serials are at most 20 bytes.
            let serial = format!("cocoon-{id}");
            if let Err(source) = disks::plug(qmp, &host, &id, &serial, deadline).await {
                failed = Some(DiskError::Plug {
                    major,
                    minor,
                    source,
                });
                break;
            }
            tracing::info!(container, %id, device = %host.path.display(), writable, "block device plugged");
            out.push(block_device(&w.path, &serial));
            table.plugged.insert(
                key,
                Plugged {
                    id,
                    serial,
                    writable,
                    users: BTreeSet::from([container.to_owned()]),
                },
            );
        }
        drop(table);
        match failed {
            None => Ok(out),
            Some(e) => {
                self.release(container).await;
                Err(e)
            }
        }
    }

    /// Unplugs the disks only `container` was using. One the guest does not let go is
    /// logged and forgotten: the VM holds it until it ends.
    pub async fn release(&self, container: &str) {
        let Some(qmp) = &self.qmp else {
            return;
        };
        let mut table = self.table.lock().await;
        let done: Vec<(u64, u64)> = table
            .plugged
            .iter_mut()
            .filter_map(|(k, p)| (p.users.remove(container) && p.users.is_empty()).then_some(*k))
            .collect();
        for key in done {
            let Some(p) = table.plugged.remove(&key) else {
                continue;
            };
            let deadline = tokio::time::Instant::now() + self.call;
            match disks::unplug(qmp, &p.id, deadline).await {
                Ok(()) => tracing::info!(container, id = %p.id, "block device unplugged"),
                Err(e) => tracing::warn!(
                    container,
                    id = %p.id,
                    "block device {}:{} not unplugged, the VM keeps it until it ends: {e}",
                    key.0,
                    key.1
                ),
            }
        }
    }
}

fn block_device(path: &str, serial: &str) -> pb::BlockDevice {
    let mut b = pb::BlockDevice::new();
    b.container_path = path.to_owned();
    b.serial = serial.to_owned();
    b
}

#[cfg(test)]
mod tests {
    use super::*;

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
                {"allow": true, "type": "b", "major": 7, "minor": 1, "access": "r"},
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
                // The last matching rule decides.
                ("/dev/xvdb", 7, 1, false),
                // No rule allows it: plugged read-only.
                ("/dev/xvdc", 8, 0, false),
            ]
        );
        assert!(wanted(&spec(serde_json::json!([]), serde_json::json!([]))).is_empty());
    }

    #[tokio::test]
    async fn a_vm_without_a_bus_for_disks_refuses_them_naming_the_machine() {
        let d = Disks::new(None, Duration::from_secs(1));
        let none = spec(serde_json::json!([]), serde_json::json!([]));
        assert!(d.attach("c1", &none).await.unwrap().is_empty());
        let one = spec(
            serde_json::json!([{"path": "/dev/xvda", "type": "b", "major": 7, "minor": 0}]),
            serde_json::json!([]),
        );
        let e = d.attach("c1", &one).await.unwrap_err().to_string();
        assert!(e.contains("qemu.machine = \"pc\""), "{e}");
    }
}
