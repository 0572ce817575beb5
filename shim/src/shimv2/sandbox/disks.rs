//! A pod VM's raw block devices: one guest disk per host device per pod, whichever of
//! its containers use it, as one device node is one device under runc; plugged for the
//! first container that names it, unplugged after the last. QEMU's `pc` plugs each into
//! its PCI bus (`hypervisor::disks`); cocoon-vmm puts each in a slot its VM booted with
//! (`hypervisor::slots`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cocoon_protocol::agent as pb;
use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType, Spec};

use crate::hypervisor::disks::{self, DiskError};
use crate::hypervisor::slots;

/// Where a pod's VM takes disks after boot.
#[derive(Debug, Clone)]
pub enum Bus {
    /// QEMU's `pc`, through its QMP socket.
    Qmp(PathBuf),
    /// cocoon-vmm's `count` slots, through its API socket.
    Slots { api: PathBuf, count: u8 },
}

/// At most this many host devices in one pod: QEMU's PCI bus has 32 slots, a few taken.
pub const MAX_DISKS: usize = 16;

/// The pod's plugged disks, by the host device's major:minor.
pub struct Disks {
    /// Where the VM takes disks after boot, if it does.
    bus: Option<Bus>,
    /// How long one plug or unplug may take.
    call: Duration,
    table: Arc<tokio::sync::Mutex<Table>>,
    /// A task settles the stuck disks while there are any (one at a time).
    settling: Arc<std::sync::atomic::AtomicBool>,
    /// The containers that asked for disks: a container without is deleted without
    /// waiting for the table (behind another's plugs).
    holders: std::sync::Mutex<BTreeSet<String>>,
    /// Opens a host device (`disks::open_host`; a test's stand-in).
    open: fn(u64, u64, bool) -> Result<disks::HostDisk, DiskError>,
}

#[derive(Default)]
struct Table {
    /// Names given so far: each plug gets a new one, so a disk the guest kept (its
    /// eject never came) can never be taken for a new one.
    next: u32,
    plugged: BTreeMap<(u64, u64), Plugged>,
    /// Disks unplugged (or half plugged) that QEMU may still hold, the host's device
    /// with them: closed once the guest lets them go, tried again at each attach and
    /// release, and counted against [`MAX_DISKS`] until then.
    stuck: Vec<disks::Stuck>,
    /// cocoon-vmm slots whose emptying failed (the VMM did not answer in time): the
    /// disk may still be in them, so they are counted, never chosen, and emptied again
    /// at each attach and release (and every second) until the VMM says they are.
    stuck_slots: BTreeSet<u8>,
}

impl Table {
    fn stuck_count(&self) -> usize {
        self.stuck.len() + self.stuck_slots.len()
    }

    /// Tries again to let go of what is stuck.
    async fn settle(&mut self, bus: &Bus) {
        match bus {
            Bus::Qmp(qmp) => {
                let stuck = std::mem::take(&mut self.stuck);
                self.stuck = disks::settle_all(qmp, stuck).await;
            }
            Bus::Slots { api, .. } => {
                // One deadline for the pass, which ends at the first failure: a VMM that
                // does not answer for one slot will not for the next, and the table is
                // locked meanwhile.
                let deadline = tokio::time::Instant::now() + disks::CLEANUP;
                let mut left = std::mem::take(&mut self.stuck_slots);
                while let Some(slot) = left.first().copied() {
                    if slots::detach(api, slot, deadline).await.is_err() {
                        break;
                    }
                    left.remove(&slot);
                }
                self.stuck_slots = left;
            }
        }
    }
}

impl Bus {
    /// The VMM's socket: gone with the VM.
    fn socket(&self) -> &std::path::Path {
        match self {
            Bus::Qmp(p) | Bus::Slots { api: p, .. } => p,
        }
    }
}

struct Plugged {
    id: String,
    /// The cocoon-vmm slot it is in.
    slot: Option<u8>,
    serial: String,
    /// The host device's size in bytes, which the agent waits for the guest's disk to have.
    size: u64,
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

/// The block devices the spec names one by one: a `b` device with a rule allowing
/// exactly its major:minor (what containerd writes for a CRI device or `ctr run
/// --device`), and whether it may be written (the last rule that matches it and
/// speaks of writes decides, as in the kernel's device cgroup). A device no such rule
/// names came with a catch-all rule (a privileged container's every host device): it
/// is never plugged (see [`take_unnamed`]).
pub fn wanted(spec: &Spec) -> Vec<Wanted> {
    let Some(linux) = spec.linux() else {
        return Vec::new();
    };
    let rules: &[LinuxDeviceCgroup] = linux
        .resources()
        .as_ref()
        .and_then(|r| r.devices().as_deref())
        .unwrap_or_default();
    let matches = |r: &LinuxDeviceCgroup, major: u64, minor: u64| {
        matches!(
            r.typ(),
            None | Some(LinuxDeviceType::A) | Some(LinuxDeviceType::B)
        ) && r.major().is_none_or(|m| m as u64 == major)
            && r.minor().is_none_or(|m| m as u64 == minor)
    };
    let access =
        |r: &LinuxDeviceCgroup, a: char| r.access().as_deref().is_some_and(|s| s.contains(a));
    linux
        .devices()
        .as_deref()
        .unwrap_or_default()
        .iter()
        .filter(|d| d.typ() == LinuxDeviceType::B)
        .filter_map(|d| {
            let (major, minor) = (d.major() as u64, d.minor() as u64);
            let named = rules.iter().any(|r| {
                r.allow()
                    && r.typ() == Some(LinuxDeviceType::B)
                    && r.major() == Some(major as i64)
                    && r.minor() == Some(minor as i64)
            });
            if !named {
                return None;
            }
            let writable = rules
                .iter()
                .rev()
                .find(|r| matches(r, major, minor) && access(r, 'w'))
                .is_some_and(|r| r.allow());
            Some(Wanted {
                path: d.path().to_string_lossy().into_owned(),
                major,
                minor,
                writable,
            })
        })
        .collect()
}

/// Takes out of `spec` the block devices [`wanted`] does not plug: their host numbers
/// mean nothing in the VM, and a node's disks are never given to a pod wholesale (as
/// with containerd's `privileged_without_host_devices`, which Kata asks for); the
/// container gets no node for them. Their paths, for the log.
pub fn take_unnamed(spec: &mut Spec) -> Vec<String> {
    let keep: BTreeSet<(String, u64, u64)> = wanted(spec)
        .into_iter()
        .map(|w| (w.path, w.major, w.minor))
        .collect();
    let Some(devices) = spec
        .linux_mut()
        .as_mut()
        .and_then(|l| l.devices_mut().as_mut())
    else {
        return Vec::new();
    };
    let mut taken = Vec::new();
    devices.retain(|d| {
        let path = d.path().to_string_lossy().into_owned();
        let key = (path.clone(), d.major() as u64, d.minor() as u64);
        let keep = d.typ() != LinuxDeviceType::B || keep.contains(&key);
        if !keep {
            taken.push(path);
        }
        keep
    });
    taken
}

impl Disks {
    pub fn new(bus: Option<Bus>, call: Duration) -> Disks {
        Disks {
            bus,
            call,
            table: Default::default(),
            settling: Default::default(),
            holders: Default::default(),
            open: disks::open_host,
        }
    }

    fn holders(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.holders.lock().unwrap_or_else(|e| e.into_inner())
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
        let Some(bus) = &self.bus else {
            return Err(DiskError::Unsupported(disks::NEEDS_PC));
        };
        let limit = match bus {
            Bus::Qmp(_) => MAX_DISKS,
            Bus::Slots { count, .. } => usize::from(*count),
        };
        self.holders().insert(container.to_owned());
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
                out.push(block_device(&w.path, &p.serial, p.size, p.writable));
                continue;
            }
            if table.plugged.len() + table.stuck_count() >= limit && table.stuck_count() > 0 {
                // Room may be held by disks let go of since.
                table.settle(bus).await;
            }
            if table.plugged.len() + table.stuck_count() >= limit {
                failed = Some(DiskError::Full(match bus {
                    Bus::Qmp(_) => format!(
                        "a pod takes at most {MAX_DISKS} block devices ({} the guest has \
                         not let go of yet)",
                        table.stuck.len()
                    ),
                    Bus::Slots { count, .. } => format!(
                        "the pod's VM has {count} disk slots (vm.block_slots, or the pod's \
                         io.cocoon.vm.block_slots), all in use ({} not yet emptied)",
                        table.stuck_slots.len()
                    ),
                }));
                break;
            }
            // Opened on a blocking thread: a device can take its time to open.
            let (major, minor, writable) = (w.major, w.minor, w.writable);
            let open = self.open;
            let opened = tokio::task::spawn_blocking(move || open(major, minor, writable))
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
            let size = disks::size_of(&host);
            // Each plug its own deadline, from when it can begin.
            let deadline = tokio::time::Instant::now() + self.call;
            let plugged = match bus {
                Bus::Qmp(qmp) => disks::plug(qmp, &host, &id, &serial, deadline)
                    .await
                    .map(|()| None)
                    .map_err(|f| {
                        table.stuck.extend(f.left);
                        f.error
                    }),
                Bus::Slots { api, count } => {
                    let mut taken: BTreeSet<u8> =
                        table.plugged.values().filter_map(|p| p.slot).collect();
                    taken.extend(table.stuck_slots.iter().copied());
                    // There is one: the limit counts every slot taken.
                    let slot = (0..*count).find(|s| !taken.contains(s));
                    match slot {
                        None => Err(crate::hypervisor::memctl::MemctlError::Refused(
                            "no free disk slot".into(),
                        )),
                        Some(slot) => {
                            match slots::attach(api, slot, &serial, &host, deadline).await {
                                Ok(()) => Ok(Some(slot)),
                                Err(e) => {
                                    // It may have gone in before the call failed: never left
                                    // there, and counted until the VMM says it is empty.
                                    let cleanup = tokio::time::Instant::now() + disks::CLEANUP;
                                    if slots::detach(api, slot, cleanup).await.is_err() {
                                        table.stuck_slots.insert(slot);
                                    }
                                    Err(e)
                                }
                            }
                        }
                    }
                }
            };
            let slot = match plugged {
                Ok(slot) => slot,
                Err(source) => {
                    failed = Some(DiskError::Plug {
                        major,
                        minor,
                        source,
                    });
                    break;
                }
            };
            tracing::info!(container, %id, ?slot, device = %host.path.display(), writable, "block device plugged");
            out.push(block_device(&w.path, &serial, size, writable));
            table.plugged.insert(
                key,
                Plugged {
                    id,
                    slot,
                    serial,
                    size,
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

    /// Unplugs the disks only `container` was using. One the guest does not let go of
    /// in time is logged and kept as stuck, closed once it does.
    pub async fn release(&self, container: &str) {
        let Some(bus) = &self.bus else {
            return;
        };
        if !self.holders().remove(container) {
            return;
        }
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
            let qmp = match (bus, p.slot) {
                (Bus::Qmp(qmp), _) => qmp,
                (Bus::Slots { api, .. }, Some(slot)) => {
                    // The VMM closes the device whatever the guest does, once it answers.
                    match slots::detach(api, slot, deadline).await {
                        Ok(()) => {
                            tracing::info!(container, id = %p.id, slot, "block device out of its slot")
                        }
                        Err(e) => {
                            tracing::warn!(container, id = %p.id, slot, "block device {}:{} not taken out of its slot yet (tried again, and closed with the VM at the latest): {e}", key.0, key.1);
                            table.stuck_slots.insert(slot);
                        }
                    }
                    continue;
                }
                (Bus::Slots { .. }, None) => continue,
            };
            match disks::unplug(qmp, &p.id, deadline).await {
                Ok(()) => tracing::info!(container, id = %p.id, "block device unplugged"),
                Err(f) => {
                    tracing::warn!(
                        container,
                        id = %p.id,
                        "block device {}:{} not unplugged yet (closed once the guest lets \
                         it go, or with the VM): {}",
                        key.0,
                        key.1,
                        f.error
                    );
                    table.stuck.push(f.stuck);
                }
            }
        }
        table.settle(bus).await;
        if table.stuck_count() > 0 {
            self.settle_in_background(bus.clone());
        }
    }

    /// Settles the stuck disks every second until none is left or QEMU is gone, so the
    /// host's device is closed soon after a slow guest lets go, not only at the pod's
    /// next attach or release.
    fn settle_in_background(&self, bus: Bus) {
        use std::sync::atomic::Ordering;
        if self.settling.swap(true, Ordering::SeqCst) {
            return;
        }
        let (table, settling) = (self.table.clone(), self.settling.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SETTLE_EVERY).await;
                let mut t = table.lock().await;
                let before = t.stuck_count();
                t.settle(&bus).await;
                if t.stuck_count() < before {
                    tracing::info!(
                        left = t.stuck_count(),
                        "stuck block devices let go of, closed"
                    );
                }
                // No socket: the VM is gone, and its disks with it.
                if t.stuck_count() == 0 || !bus.socket().exists() {
                    settling.store(false, Ordering::SeqCst);
                    return;
                }
            }
        });
    }
}

/// How often stuck disks are looked at again.
const SETTLE_EVERY: Duration = Duration::from_secs(1);

fn block_device(path: &str, serial: &str, size: u64, writable: bool) -> pb::BlockDevice {
    let mut b = pb::BlockDevice::new();
    b.container_path = path.to_owned();
    b.serial = serial.to_owned();
    b.size_bytes = size;
    b.read_only = !writable;
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
                api: sock,
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
            Some(Bus::Slots { api: sock, count }),
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
        assert_eq!(d.table.lock().await.stuck_slots, BTreeSet::from([0]));
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
}
