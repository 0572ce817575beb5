//! The two VMMs whose VMs take disks in slots made at boot: cocoon-vmm (its API socket,
//! `hypervisor::slots`) and QEMU's microvm (QMP, `hypervisor::qemu_slots`). They differ
//! in which slot a disk may take and in the serial the guest sees; the pod's table
//! (`disks`) is the same for both.

use std::path::{Path, PathBuf};

use tokio::time::Instant;

use super::disks::HostDisk;
use super::memctl::MemctlError;
use super::{qemu_slots, slots};

/// The VMM that fills a pod VM's slots, by its socket.
#[derive(Debug, Clone)]
pub enum SlotVmm {
    /// cocoon-vmm's API socket: any slot takes any disk, under the serial it is given.
    CocoonVmm(PathBuf),
    /// QEMU microvm's QMP socket: a slot takes writable or read-only disks, as it was
    /// made, and keeps its own serial.
    Qemu(PathBuf),
}

impl SlotVmm {
    pub fn socket(&self) -> &Path {
        match self {
            SlotVmm::CocoonVmm(p) | SlotVmm::Qemu(p) => p,
        }
    }

    /// Whether slot `slot` of `count` can take a disk opened `writable`.
    pub fn fits(&self, slot: u8, count: u8, writable: bool) -> bool {
        match self {
            SlotVmm::CocoonVmm(_) => true,
            SlotVmm::Qemu(_) => qemu_slots::writable(slot, count) == writable,
        }
    }

    /// The serial the guest will see for disk `id` in slot `slot`.
    pub fn serial(&self, slot: u8, id: &str) -> String {
        match self {
            // virtio-blk serials are at most 20 bytes.
            SlotVmm::CocoonVmm(_) => format!("cocoon-{id}"),
            SlotVmm::Qemu(_) => qemu_slots::serial(slot),
        }
    }

    /// Puts `disk` (the pod's disk `id`) in slot `slot`.
    pub async fn attach(
        &self,
        slot: u8,
        id: &str,
        disk: &HostDisk,
        deadline: Instant,
    ) -> Result<(), MemctlError> {
        match self {
            SlotVmm::CocoonVmm(api) => {
                slots::attach(api, slot, &self.serial(slot, id), disk, deadline).await
            }
            SlotVmm::Qemu(qmp) => qemu_slots::attach(qmp, slot, id, disk, deadline).await,
        }
    }

    /// Empties slot `slot` of `count`, which holds (or may hold) the pod's disk `id`.
    pub async fn detach(
        &self,
        slot: u8,
        count: u8,
        id: &str,
        deadline: Instant,
    ) -> Result<(), MemctlError> {
        match self {
            SlotVmm::CocoonVmm(api) => slots::detach(api, slot, deadline).await,
            SlotVmm::Qemu(qmp) => {
                let writable = qemu_slots::writable(slot, count);
                qemu_slots::detach(qmp, slot, writable, id, deadline).await
            }
        }
    }

    /// Why no slot of `count` is free for a disk opened `writable`; `stuck` of them
    /// not emptied yet.
    pub fn full(&self, count: u8, writable: bool, stuck: usize) -> String {
        let mut why = format!(
            "the pod's VM has {count} disk slots (vm.block_slots, or the pod's \
             io.cocoon.vm.block_slots)"
        );
        match self {
            SlotVmm::CocoonVmm(_) => why.push_str(", all in use"),
            SlotVmm::Qemu(_) => {
                let w = (0..count)
                    .filter(|&s| qemu_slots::writable(s, count))
                    .count();
                let kind = if writable { "writable" } else { "read-only" };
                why.push_str(&format!(
                    ", {w} writable and {} read-only on QEMU's microvm, and no {kind} one \
                     is free",
                    usize::from(count) - w
                ));
            }
        }
        why.push_str(&format!(" ({stuck} not yet emptied)"));
        why
    }
}
