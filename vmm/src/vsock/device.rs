//! The transport-independent virtio-vsock device: drains the tx queue into a
//! [`VsockBackend`] and fills the rx queue from it. Checks what the device can check
//! itself (chain layout, length, addresses) so backends only see well-formed packets.

use log::trace;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::defs::{MAX_PKT_PAYLOAD, VSOCK_HOST_CID};
use super::packet::{read_tx_packet, RxSlot};
use super::{warn_limited, LogLimiter, VsockBackend};

/// Errors that stop queue processing; a broken queue, not a bad packet.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("Failed to access the {0} queue")]
    Queue(&'static str, #[source] virtio_queue::Error),
}

/// Counters for what the device did with guest packets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockStats {
    /// Packets from the guest handed to the backend.
    pub tx_packets: u64,
    /// Packets from the guest dropped as malformed.
    pub tx_malformed: u64,
    /// Packets delivered to the guest.
    pub rx_packets: u64,
    /// Rx buffers the guest gave us that could not hold a packet.
    pub rx_bad_buffers: u64,
}

pub struct VsockDevice<B: VsockBackend> {
    guest_cid: u64,
    backend: B,
    /// One packet's payload; both directions copy through it.
    buf: Box<[u8]>,
    stats: VsockStats,
    log: LogLimiter,
}

impl<B: VsockBackend> VsockDevice<B> {
    pub fn new(guest_cid: u64, backend: B) -> Self {
        Self {
            guest_cid,
            backend,
            buf: vec![0u8; MAX_PKT_PAYLOAD].into_boxed_slice(),
            stats: VsockStats::default(),
            log: LogLimiter::new("vsock"),
        }
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    pub fn stats(&self) -> VsockStats {
        self.stats
    }

    /// Handles every packet on the tx queue. Returns whether the driver must be notified.
    pub fn process_tx(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        let qerr = |e| DeviceError::Queue("tx", e);
        let mut used = false;
        // A corrupt avail ring yields no chains yet looks non-empty: give up on it after
        // one round that found nothing instead of spinning.
        let mut idle_rounds = 0;
        loop {
            queue.disable_notification(mem).map_err(qerr)?;
            let mut popped = false;
            while let Some(chain) = self.next_chain(queue, mem) {
                popped = true;
                let head = chain.head_index();
                self.handle_tx_chain(mem, chain);
                // Tx buffers are device-readable only; nothing was written.
                queue.add_used(mem, head, 0).map_err(qerr)?;
                used = true;
            }
            idle_rounds += u32::from(!popped);
            if !queue.enable_notification(mem).map_err(qerr)? || idle_rounds > 1 {
                break;
            }
        }
        Ok(used && queue.needs_notification(mem).map_err(qerr)?)
    }

    fn handle_tx_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    ) {
        let (hdr, len) = match read_tx_packet(mem, chain, &mut self.buf) {
            Ok(pkt) => pkt,
            Err(e) => {
                self.stats.tx_malformed += 1;
                warn_limited!(self.log, "vsock: dropping malformed tx packet: {e}");
                return;
            }
        };
        // §5.10.6: the guest may only speak as itself, and only to the host.
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != VSOCK_HOST_CID {
            self.stats.tx_malformed += 1;
            warn_limited!(
                self.log,
                "vsock: dropping tx packet from cid {} to cid {}",
                hdr.src_cid,
                hdr.dst_cid
            );
            return;
        }
        trace!("vsock: tx {hdr:?}");
        self.stats.tx_packets += 1;
        self.backend.send_pkt(&hdr, &self.buf[..len]);
    }

    /// Moves packets from the backend onto the rx queue while both have some. Returns
    /// whether the driver must be notified.
    pub fn process_rx(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        let qerr = |e| DeviceError::Queue("rx", e);
        let mut used = false;
        // A corrupt avail ring yields no chains yet looks non-empty: give up on it after
        // one round that found nothing instead of spinning.
        let mut idle_rounds = 0;
        loop {
            queue.disable_notification(mem).map_err(qerr)?;
            let mut popped = false;
            while self.backend.has_pending_rx() {
                let Some(chain) = self.next_chain(queue, mem) else {
                    break;
                };
                let head = chain.head_index();
                let slot = match RxSlot::new(mem, chain) {
                    Ok(slot) => slot,
                    Err(e) => {
                        self.stats.rx_bad_buffers += 1;
                        warn_limited!(self.log, "vsock: unusable rx buffer: {e}");
                        queue.add_used(mem, head, 0).map_err(qerr)?;
                        used = true;
                        popped = true;
                        continue;
                    }
                };
                let cap = slot.payload_capacity();
                let Some(hdr) = self.backend.recv_pkt(&mut self.buf[..cap]) else {
                    // Nothing after all: leave the buffer for the next packet.
                    queue.go_to_previous_position();
                    break;
                };
                let len = (hdr.len as usize).min(cap);
                trace!("vsock: rx {hdr:?}");
                let written = match slot.write(&hdr, &self.buf[..len]) {
                    Ok(n) => {
                        self.stats.rx_packets += 1;
                        n
                    }
                    Err(e) => {
                        self.stats.rx_bad_buffers += 1;
                        warn_limited!(self.log, "vsock: lost an rx packet: {e}");
                        0
                    }
                };
                queue.add_used(mem, head, written).map_err(qerr)?;
                used = true;
                popped = true;
            }
            // Re-enable notifications so a guest adding buffers wakes us, then re-check
            // the race where it added them just before.
            let more_buffers = queue.enable_notification(mem).map_err(qerr)?;
            idle_rounds += u32::from(!popped);
            if !more_buffers || idle_rounds > 1 || !self.backend.has_pending_rx() {
                break;
            }
        }
        Ok(used && queue.needs_notification(mem).map_err(qerr)?)
    }

    fn next_chain<'m>(
        &mut self,
        queue: &mut Queue,
        mem: &'m GuestMemoryMmap,
    ) -> Option<virtio_queue::DescriptorChain<&'m GuestMemoryMmap>> {
        match queue.iter(mem) {
            Ok(mut iter) => iter.next(),
            Err(e) => {
                warn_limited!(self.log, "vsock: guest queue is corrupt: {e}");
                None
            }
        }
    }
}
