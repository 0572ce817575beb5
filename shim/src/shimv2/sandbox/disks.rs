//! A pod VM's raw block devices: one guest disk per host device per pod, whichever of
//! its containers use it, as one device node is one device under runc; plugged for the
//! first container that names it, unplugged after the last. QEMU's `pc` plugs each into
//! its PCI bus (`hypervisor::disks`); cocoon-vmm and QEMU's microvm put each in a slot
//! their VM booted with (`hypervisor::disk_slots`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cocoon_protocol::agent as pb;
use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType, Spec};

use crate::hypervisor::disk_slots::SlotVmm;
use crate::hypervisor::disks::{self, DiskError};

/// Where a pod's VM takes disks after boot.
#[derive(Debug, Clone)]
pub enum Bus {
    /// QEMU's `pc`, through its QMP socket.
    Qmp(PathBuf),
    /// `count` slots the VM booted with, filled through its VMM.
    Slots { vmm: SlotVmm, count: u8 },
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
    /// Slots whose emptying failed (the VMM did not answer in time), with the disk
    /// that may still be in each: counted, never chosen, and emptied again at each
    /// attach and release (and every second) until the VMM says they are.
    stuck_slots: BTreeMap<u8, String>,
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
            Bus::Slots { vmm, count } => {
                // One deadline for the pass, which ends at the first failure: a VMM that
                // does not answer for one slot will not for the next, and the table is
                // locked meanwhile.
                let deadline = tokio::time::Instant::now() + disks::CLEANUP;
                let mut left = std::mem::take(&mut self.stuck_slots);
                while let Some((slot, id)) = left.pop_first() {
                    if vmm.detach(slot, *count, &id, deadline).await.is_err() {
                        left.insert(slot, id);
                        break;
                    }
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
            Bus::Qmp(p) => p,
            Bus::Slots { vmm, .. } => vmm.socket(),
        }
    }
}

struct Plugged {
    id: String,
    /// The slot it is in (cocoon-vmm, QEMU's microvm).
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
            // Room may be held by disks let go of since.
            if table.stuck_count() > 0 && room(&table, bus, limit, w.writable).is_none() {
                table.settle(bus).await;
            }
            let Some(slot) = room(&table, bus, limit, w.writable) else {
                failed = Some(DiskError::Full(match bus {
                    Bus::Qmp(_) => format!(
                        "a pod takes at most {MAX_DISKS} block devices ({} the guest has \
                         not let go of yet)",
                        table.stuck.len()
                    ),
                    Bus::Slots { vmm, count } => {
                        vmm.full(*count, w.writable, table.stuck_slots.len())
                    }
                }));
                break;
            };
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
            let size = disks::size_of(&host);
            // Each plug its own deadline, from when it can begin.
            let deadline = tokio::time::Instant::now() + self.call;
            let (serial, plugged) = match (bus, slot) {
                (Bus::Slots { vmm, count }, Some(slot)) => {
                    let plugged = match vmm.attach(slot, &id, &host, deadline).await {
                        Ok(()) => Ok(Some(slot)),
                        Err(e) => {
                            // It may have gone in before the call failed: never left
                            // there, and counted until the VMM says it is empty.
                            let cleanup = tokio::time::Instant::now() + disks::CLEANUP;
                            if vmm.detach(slot, *count, &id, cleanup).await.is_err() {
                                table.stuck_slots.insert(slot, id.clone());
                            }
                            Err(e)
                        }
                    };
                    (vmm.serial(slot, &id), plugged)
                }
                (bus, _) => {
                    // virtio-blk serials are at most 20 bytes.
                    let serial = format!("cocoon-{id}");
                    let plugged = match bus {
                        Bus::Qmp(qmp) => disks::plug(qmp, &host, &id, &serial, deadline)
                            .await
                            .map(|()| None)
                            .map_err(|f| {
                                table.stuck.extend(f.left);
                                f.error
                            }),
                        Bus::Slots { .. } => Err(crate::hypervisor::memctl::MemctlError::Refused(
                            "no free disk slot".into(),
                        )),
                    };
                    (serial, plugged)
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
                (Bus::Slots { vmm, count }, Some(slot)) => {
                    // The VMM closes the device whatever the guest does, once it answers.
                    match vmm.detach(slot, *count, &p.id, deadline).await {
                        Ok(()) => {
                            tracing::info!(container, id = %p.id, slot, "block device out of its slot")
                        }
                        Err(e) => {
                            tracing::warn!(container, id = %p.id, slot, "block device {}:{} not taken out of its slot yet (tried again, and closed with the VM at the latest): {e}", key.0, key.1);
                            table.stuck_slots.insert(slot, p.id.clone());
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

/// Where a disk opened `writable` can go: `Some(None)` on a bus that takes one more
/// (below `limit`), `Some(Some(slot))` for a free slot of its kind, `None` if there is
/// no room.
fn room(table: &Table, bus: &Bus, limit: usize, writable: bool) -> Option<Option<u8>> {
    if table.plugged.len() + table.stuck_count() >= limit {
        return None;
    }
    match bus {
        Bus::Qmp(_) => Some(None),
        Bus::Slots { vmm, count } => {
            let taken: BTreeSet<u8> = table
                .plugged
                .values()
                .filter_map(|p| p.slot)
                .chain(table.stuck_slots.keys().copied())
                .collect();
            (0..*count)
                .find(|&s| !taken.contains(&s) && vmm.fits(s, *count, writable))
                .map(Some)
        }
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
#[path = "disks_tests.rs"]
mod tests;
