//! Virtio devices and their virtio-mmio transport. A device implements [`VirtioDevice`]
//! (queues in, used buffers out) and knows nothing of MMIO registers; [`mmio`] owns the
//! register file, feature negotiation and queue setup.

pub mod balloon;
pub mod block;
pub mod defs;
pub mod mmio;
pub mod net;
pub mod vhost_user;
pub mod vsock;

use std::os::fd::RawFd;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

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
