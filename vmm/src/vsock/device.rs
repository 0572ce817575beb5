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
    /// A pass over the tx queue stopped at its budget with chains left: the backend was
    /// woken, and whoever runs the device calls [`Self::process_tx`] again from
    /// [`VsockBackend::process_host_events`]'s turn.
    tx_backlog: bool,
}

impl<B: VsockBackend> VsockDevice<B> {
    pub fn new(guest_cid: u64, backend: B) -> Self {
        Self {
            guest_cid,
            backend,
            buf: vec![0u8; MAX_PKT_PAYLOAD].into_boxed_slice(),
            stats: VsockStats::default(),
            log: LogLimiter::new("vsock"),
            tx_backlog: false,
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

    /// Whether the last tx pass left chains for the next one (see [`Self::process_tx`]).
    pub fn tx_backlog(&self) -> bool {
        self.tx_backlog
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
        // A driver on another vCPU can keep the ring full for as long as it likes, and the
        // device's lock is held meanwhile: one ring's worth per pass. What is left then
        // was made available while notifications were off, so no kick will come for it:
        // the backend is woken to bring the runner back (`tx_backlog`).
        let mut budget = queue.size();
        self.tx_backlog = false;
        loop {
            queue.disable_notification(mem).map_err(qerr)?;
            let mut popped = false;
            while budget > 0 {
                let Some(chain) = self.next_chain(queue, mem) else {
                    break;
                };
                budget -= 1;
                popped = true;
                let head = chain.head_index();
                self.handle_tx_chain(mem, chain);
                // Tx buffers are device-readable only; nothing was written.
                queue.add_used(mem, head, 0).map_err(qerr)?;
                used = true;
            }
            let more = queue.enable_notification(mem).map_err(qerr)?;
            idle_rounds += u32::from(!popped);
            if more && budget == 0 {
                self.tx_backlog = true;
                self.backend.wake();
                break;
            }
            if !more || idle_rounds > 1 {
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
        // One ring's worth per pass, as for tx; the backend is woken for the rest.
        let mut budget = queue.size();
        loop {
            queue.disable_notification(mem).map_err(qerr)?;
            let mut popped = false;
            while budget > 0 && self.backend.has_pending_rx() {
                let Some(chain) = self.next_chain(queue, mem) else {
                    break;
                };
                budget -= 1;
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
            if more_buffers && budget == 0 && self.backend.has_pending_rx() {
                self.backend.wake();
                break;
            }
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

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, RawFd};
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::vsock::defs::{VSOCK_OP_RW, VSOCK_TYPE_STREAM};
    use crate::vsock::VsockHeader;

    const SIZE: u16 = 8;
    const PKT: u64 = 0x1_0000;

    /// A driver on another vCPU: each packet the device hands over makes the same chain
    /// available again at once, while `refill` holds, so the ring never runs dry.
    struct Refiller {
        mem: GuestMemoryMmap,
        avail: u64,
        refill: AtomicBool,
        sent: AtomicU32,
        woken: AtomicU32,
        fd: vmm_sys_util::eventfd::EventFd,
    }

    impl Refiller {
        fn publish(&self) {
            let idx: u16 = self.mem.read_obj(GuestAddress(self.avail + 2)).unwrap();
            let slot = self.avail + 4 + 2 * u64::from(idx % SIZE);
            self.mem.write_obj(0u16, GuestAddress(slot)).unwrap();
            self.mem
                .write_obj(idx.wrapping_add(1), GuestAddress(self.avail + 2))
                .unwrap();
        }
    }

    impl AsRawFd for Refiller {
        fn as_raw_fd(&self) -> RawFd {
            self.fd.as_raw_fd()
        }
    }

    impl VsockBackend for Refiller {
        fn send_pkt(&mut self, _: &VsockHeader, _: &[u8]) {
            let sent = self.sent.fetch_add(1, Ordering::SeqCst) + 1;
            assert!(sent < 10_000, "the device never stopped taking chains");
            if self.refill.load(Ordering::SeqCst) {
                self.publish();
            }
        }
        fn recv_pkt(&mut self, _: &mut [u8]) -> Option<VsockHeader> {
            None
        }
        fn has_pending_rx(&self) -> bool {
            false
        }
        fn process_host_events(&mut self) {}
        fn wake(&self) {
            self.woken.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// One tx chain (descriptor 0: a header-only RW packet from the guest) on a queue of
    /// `SIZE`, made available once.
    fn setup() -> (GuestMemoryMmap, Queue, VsockDevice<Refiller>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (queue, [desc, avail, _]) = crate::devices::virtio::test_queue(&mem, 0x1000, SIZE);
        let hdr = VsockHeader {
            src_cid: 3,
            dst_cid: crate::vsock::defs::VSOCK_HOST_CID,
            src_port: 1,
            dst_port: 2,
            type_: VSOCK_TYPE_STREAM,
            op: VSOCK_OP_RW,
            ..Default::default()
        };
        let bytes = hdr.to_bytes();
        mem.write_slice(&bytes, GuestAddress(PKT)).unwrap();
        mem.write_obj(PKT, GuestAddress(desc)).unwrap();
        mem.write_obj(bytes.len() as u32, GuestAddress(desc + 8))
            .unwrap();
        mem.write_obj(0u32, GuestAddress(desc + 12)).unwrap();
        let backend = Refiller {
            mem: mem.clone(),
            avail,
            refill: AtomicBool::new(true),
            sent: AtomicU32::new(0),
            woken: AtomicU32::new(0),
            fd: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        };
        backend.publish();
        (mem, queue, VsockDevice::new(3, backend))
    }

    /// A driver that keeps the tx ring full cannot keep one pass (and the device's lock)
    /// forever: each pass takes one ring's worth, wakes the backend for the rest, and
    /// the pass after the driver stops leaves no backlog.
    #[test]
    fn a_driver_that_keeps_the_tx_ring_full_gets_one_ring_per_pass() {
        let (mem, mut q, mut dev) = setup();
        for pass in 1..=3u32 {
            dev.process_tx(&mut q, &mem).unwrap();
            let b = dev.backend();
            assert_eq!(b.sent.load(Ordering::SeqCst), pass * u32::from(SIZE));
            assert!(dev.tx_backlog(), "pass {pass} left chains and said so");
            assert_eq!(b.woken.load(Ordering::SeqCst), pass);
        }
        dev.backend().refill.store(false, Ordering::SeqCst);
        dev.process_tx(&mut q, &mem).unwrap();
        assert_eq!(
            dev.backend().sent.load(Ordering::SeqCst),
            3 * u32::from(SIZE) + 1
        );
        assert!(!dev.tx_backlog());
        assert_eq!(dev.backend().woken.load(Ordering::SeqCst), 3);
    }
}
