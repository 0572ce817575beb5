//! Virtio devices and their virtio-mmio transport. A device implements [`VirtioDevice`]
//! (queues in, used buffers out) and knows nothing of MMIO registers; [`mmio`] owns the
//! register file, feature negotiation and queue setup.

pub mod balloon;
pub mod block;
pub mod defs;
pub mod discard;
pub mod mem;
pub mod mmio;
pub mod net;
pub mod vhost_user;
pub mod vsock;

use std::os::fd::RawFd;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::logging::LogLimiter;

/// The device side of the transport.
pub trait VirtioDevice: Send {
    /// Virtio device id (§5).
    fn device_type(&self) -> u32;
    /// Largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered; the transport adds VIRTIO_F_VERSION_1.
    fn avail_features(&self) -> u64;
    /// Reads device config space at `offset`; out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device config space; most devices ignore it.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK with these features acked and these queues (the ready
    /// ones live). Devices whose rings are served elsewhere (vhost-user) hand them over
    /// here; an error leaves the device needing a reset.
    fn activate(
        &mut self,
        _acked_features: u64,
        _queues: &[Queue],
        _mem: &GuestMemoryMmap,
    ) -> Result<(), String> {
        Ok(())
    }
    /// A snapshot is being taken of an activated device: a device whose rings are
    /// served elsewhere writes where that server stands in each ring (`next_avail`,
    /// `next_used`) over what the transport saw and returns true: it stopped the rings
    /// to learn that, and the transport activates it again. In-process devices keep
    /// the transport's view.
    fn save_queues(&mut self, _queues: &mut [virtio_queue::QueueState]) -> Result<bool, String> {
        Ok(false)
    }
    /// The driver notified queue `index`. Returns whether to interrupt the driver.
    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool;
    /// A host-side descriptor the event loop should poll for this device.
    fn host_fd(&self) -> Option<RawFd> {
        None
    }
    /// `host_fd` became readable. Returns whether to interrupt the driver.
    fn process_host(&mut self, _queues: &mut [Queue], _mem: &GuestMemoryMmap) -> bool {
        false
    }
    /// The driver reset the device: drop in-flight state.
    fn reset(&mut self) {}
    /// How many times the device changed its config space itself (wrapping), which the
    /// transport adds to its config generation: a driver reading the config across such
    /// a change reads it again (§2.5.1). Changes the host asks for go through
    /// `MmioTransport::change_config`.
    fn config_epoch(&self) -> u32 {
        0
    }
}

/// How a transport raises its interrupt line.
pub trait Interrupt: Send {
    fn trigger(&self);
}

impl Interrupt for vmm_sys_util::eventfd::EventFd {
    fn trigger(&self) {
        if let Err(e) = self.write(1) {
            log::error!("virtio: failed to raise an interrupt: {e}");
        }
    }
}

/// How many chains one pass over a queue may take: one ring's worth. The avail index is
/// read again for every chain, so a driver on another vCPU that keeps making buffers
/// available would otherwise keep this pass (and the device's lock, which the event loop
/// and the API also take) forever. Devices that never suppress notifications lose
/// nothing by stopping: every buffer made available after the pass began brings a kick
/// of its own, and the first `size` chains include every buffer that was there before.
pub struct Budget(u16);

impl Budget {
    pub fn of(q: &Queue) -> Self {
        Self(q.size())
    }

    /// Takes one chain's worth; false once the pass has had its ring's worth.
    pub fn take(&mut self) -> bool {
        match self.0.checked_sub(1) {
            Some(left) => {
                self.0 = left;
                true
            }
            None => false,
        }
    }
}

/// The next chain the driver made available; None when there is none, when the pass has
/// spent its `budget`, or when the queue is corrupt (logged through `log`, which names the
/// device). Every device's queue loop takes its chains here:
/// `let mut b = Budget::of(q); while let Some(chain) = next_chain(.., &mut b) { ..; return_used(..) }`.
pub fn next_chain<'m>(
    q: &mut Queue,
    mem: &'m GuestMemoryMmap,
    log: &mut LogLimiter,
    budget: &mut Budget,
) -> Option<DescriptorChain<&'m GuestMemoryMmap>> {
    if !budget.take() {
        return None;
    }
    match q.iter(mem) {
        Ok(mut it) => it.next(),
        Err(e) => {
            if log.allow() {
                log::warn!("{}: queue is corrupt: {e}", log.what());
            }
            None
        }
    }
}

/// Hands chain `head` back to the driver with `len` bytes written. False (logged) when
/// the used ring cannot take it: the caller stops serving the queue until the next notify.
pub fn return_used(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
    log: &mut LogLimiter,
) -> bool {
    match q.add_used(mem, head, len) {
        Ok(()) => true,
        Err(e) => {
            if log.allow() {
                log::warn!("{}: cannot hand a buffer back: {e}", log.what());
            }
            false
        }
    }
}

/// A split queue of `size` in `mem` at `start`, ready, for tests that play the driver:
/// the queue and where its descriptor table, avail ring and used ring are. Laid out by
/// hand, back to back as the spec sizes them: virtio-queue 0.18's `MockSplitQueue` ends
/// its avail ring after `size` bytes instead of `2 * size + 6`, so its used ring lies
/// over the avail ring's second half, and a driver that posts more than half a ring
/// sees the device's used entries overwrite its own.
#[doc(hidden)]
pub fn test_queue(mem: &GuestMemoryMmap, start: u64, size: u16) -> (Queue, [u64; 3]) {
    let n = u64::from(size);
    let desc = start;
    let avail = desc + 16 * n;
    let used = (avail + 6 + 2 * n + 3) & !3;
    for (addr, len) in [(desc, 16 * n), (avail, 6 + 2 * n), (used, 6 + 8 * n)] {
        vm_memory::Bytes::write_slice(mem, &vec![0u8; len as usize], vm_memory::GuestAddress(addr))
            .expect("test queue inside guest memory");
    }
    let mut q = Queue::new(size).expect("a valid queue size");
    q.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
    q.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
    q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
    q.set_ready(true);
    (q, [desc, avail, used])
}
