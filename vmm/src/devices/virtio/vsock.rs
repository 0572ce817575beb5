//! The in-process virtio-vsock device: the transport-independent [`VsockDevice`] (and
//! whatever [`VsockBackend`] it holds, the hybrid muxer in production) behind the
//! virtio-mmio transport.

use std::os::fd::RawFd;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::defs::TYPE_VSOCK;
use super::VirtioDevice;
use crate::logging::LogLimiter;
use crate::vsock::defs::{NUM_QUEUES, RX_QUEUE, TX_QUEUE};
use crate::vsock::{VsockBackend, VsockDevice};

/// §5.10.3: stream sockets, the only kind the muxer speaks.
pub const VIRTIO_VSOCK_F_STREAM: u64 = 1;
const QUEUE_SIZE: u16 = 256;

pub struct Vsock<B: VsockBackend> {
    device: VsockDevice<B>,
    config: [u8; 8],
    queue_sizes: [u16; NUM_QUEUES],
    log: LogLimiter,
}

impl<B: VsockBackend> Vsock<B> {
    pub fn new(guest_cid: u64, backend: B) -> Self {
        Self {
            device: VsockDevice::new(guest_cid, backend),
            config: guest_cid.to_le_bytes(),
            queue_sizes: [QUEUE_SIZE; NUM_QUEUES],
            log: LogLimiter::new("virtio-vsock"),
        }
    }

    pub fn device(&self) -> &VsockDevice<B> {
        &self.device
    }

    /// One pass over the tx queue (on the driver's kick, or after a pass that stopped at
    /// its budget woke the backend) or the rx queue; whether to interrupt the driver.
    fn serve(&mut self, index: u16, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let Some(q) = queues.get_mut(usize::from(index)) else {
            return false;
        };
        let done = if index == TX_QUEUE {
            self.device.process_tx(q, mem)
        } else {
            self.device.process_rx(q, mem)
        };
        done.unwrap_or_else(|e| {
            if self.log.allow() {
                log::warn!("virtio-vsock: {e}");
            }
            false
        })
    }
}

impl<B: VsockBackend> VirtioDevice for Vsock<B> {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_VSOCK_F_STREAM
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let start = (offset as usize).min(self.config.len());
        let end = (start + data.len()).min(self.config.len());
        data[..end - start].copy_from_slice(&self.config[start..end]);
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let notify = index == usize::from(TX_QUEUE) && self.serve(TX_QUEUE, queues, mem);
        // Tx may have produced replies, and an rx kick means new buffers: fill rx either way.
        // The event queue is never used (no transport reset events).
        notify | self.serve(RX_QUEUE, queues, mem)
    }

    fn host_fd(&self) -> Option<RawFd> {
        Some(self.device.backend().as_raw_fd())
    }

    fn process_host(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        self.device.backend_mut().process_host_events();
        let notify = self.device.tx_backlog() && self.serve(TX_QUEUE, queues, mem);
        notify | self.serve(RX_QUEUE, queues, mem)
    }
}
