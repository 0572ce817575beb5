//! virtio-mem (virtio 1.2 §5.15): a region of guest-physical memory above all RAM
//! (`arch::layout::hotplug_region_start`) that the guest plugs into and unplugs from in
//! [`BLOCK_SIZE`] blocks, never past the size the host asks for: how a running pod's
//! memory grows in place. The host asks through [`MemControl`] (the API's
//! `resize_memory`); the guest's driver does the rest.
//!
//! The region is guest memory from the start (a KVM slot, and in the table vhost-user
//! backends map; see `vstate::memory`), so plugging a block only marks it; unplugging
//! gives its pages back to the host ([`Discard`]). No feature bits: no ACPI node id, and
//! unplugged memory stays readable. Nothing but the guest's own driver keeps it from
//! touching unplugged blocks, so the host must be ready to back the whole region.
//!
//! The guest is hostile: every descriptor's direction and size are checked, every range
//! against the region (without overflow), and a request the device cannot answer is not
//! carried out.

use std::ops::Range;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

pub use super::defs::TYPE_MEM;
use super::discard::Discard;
use super::mmio::MmioTransport;
use super::{next_chain, return_used, Budget, Interrupt, VirtioDevice};
use crate::logging::LogLimiter;

/// The device's block size: the guest (un)plugs whole, aligned blocks. 2 MiB is what
/// Linux needs at least (a pageblock) and a huge page, so an unplugged block gives back
/// whole huge pages.
pub const BLOCK_SIZE: u64 = 2 << 20;
const QUEUE_SIZE: u16 = 128;

/// §5.15.6 request types (`struct virtio_mem_req`'s `type`).
pub mod req {
    pub const PLUG: u16 = 0;
    pub const UNPLUG: u16 = 1;
    pub const UNPLUG_ALL: u16 = 2;
    pub const STATE: u16 = 3;
}

/// §5.15.6 response types.
pub mod resp {
    pub const ACK: u16 = 0;
    /// Plugging would go past `requested_size`.
    pub const NACK: u16 = 1;
    pub const BUSY: u16 = 2;
    /// A malformed request: bad range, or blocks not in the state the request needs.
    pub const ERROR: u16 = 3;
}

/// §5.15.6.4 what a STATE request answers.
pub mod state {
    pub const PLUGGED: u16 = 0;
    pub const UNPLUGGED: u16 = 1;
    pub const MIXED: u16 = 2;
}

/// §5.15.6: `struct virtio_mem_req` (type, padding, then addr and nb_blocks).
pub const REQUEST_LEN: u32 = 24;
/// §5.15.6: `struct virtio_mem_resp` (type, padding, then the state).
pub const RESPONSE_LEN: u32 = 10;
/// §5.15.4: `struct virtio_mem_config`.
pub const CONFIG_LEN: usize = 56;

/// Errors in what the host asks of the device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemError {
    #[error("The region ({size:#x} bytes at {addr:#x}) is not whole, aligned 2 MiB blocks")]
    Region { addr: u64, size: u64 },
    #[error("The requested size ({0} bytes) is not a whole number of 2 MiB blocks")]
    Unaligned(u64),
    #[error("The requested size ({requested} bytes) is larger than the region ({region} bytes)")]
    TooBig { requested: u64, region: u64 },
}

/// Where the device stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemStatus {
    pub region_bytes: u64,
    pub requested_bytes: u64,
    pub plugged_bytes: u64,
}

/// One block per bit, set when plugged.
#[derive(Debug)]
struct Bitmap {
    words: Vec<u64>,
    set: u64,
}

impl Bitmap {
    fn new(blocks: u64) -> Self {
        Self {
            words: vec![0; blocks.div_ceil(64) as usize],
            set: 0,
        }
    }

    fn get(&self, block: u64) -> bool {
        self.words[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    fn put(&mut self, blocks: Range<u64>, plugged: bool) {
        for b in blocks {
            if self.get(b) != plugged {
                self.words[(b / 64) as usize] ^= 1 << (b % 64);
                if plugged {
                    self.set += 1;
                } else {
                    self.set -= 1;
                }
            }
        }
    }

    fn all(&self, mut blocks: Range<u64>, plugged: bool) -> bool {
        blocks.all(|b| self.get(b) == plugged)
    }

    /// The runs of plugged blocks, in order.
    fn plugged_runs(&self) -> Vec<Range<u64>> {
        let mut runs: Vec<Range<u64>> = Vec::new();
        let blocks = self.words.len() as u64 * 64;
        for b in (0..blocks).filter(|b| self.get(*b)) {
            match runs.last_mut() {
                Some(r) if r.end == b => r.end += 1,
                _ => runs.push(b..b + 1),
            }
        }
        runs
    }
}

/// One request as read from the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Request {
    kind: u16,
    addr: u64,
    nb_blocks: u16,
}

/// Why a chain was handed back unanswered.
#[derive(Debug, thiserror::Error)]
enum ChainError {
    #[error("the chain does not start with a device-readable request of {REQUEST_LEN} bytes")]
    Request,
    #[error("the request is not readable guest memory")]
    RequestMemory,
    #[error("the request is not followed by a device-writable response of {RESPONSE_LEN} bytes")]
    Response,
    #[error("the response is not writable guest memory")]
    ResponseMemory,
}

pub struct Mem<D: Discard> {
    discard: D,
    addr: u64,
    region_size: u64,
    requested: u64,
    plugged: Bitmap,
    /// Plugs and unplugs so far (wrapping): each changes `plugged_size`.
    epoch: u32,
    queue_sizes: [u16; 1],
    log: LogLimiter,
}

impl<D: Discard> Mem<D> {
    /// A device for the `region_size` bytes of guest memory at `addr`, all unplugged and
    /// none requested.
    pub fn new(addr: u64, region_size: u64, discard: D) -> Result<Self, MemError> {
        let whole = addr.is_multiple_of(BLOCK_SIZE)
            && region_size.is_multiple_of(BLOCK_SIZE)
            && region_size > 0
            && addr.checked_add(region_size).is_some();
        if !whole {
            return Err(MemError::Region {
                addr,
                size: region_size,
            });
        }
        Ok(Self {
            discard,
            addr,
            region_size,
            requested: 0,
            plugged: Bitmap::new(region_size / BLOCK_SIZE),
            epoch: 0,
            queue_sizes: [QUEUE_SIZE],
            log: LogLimiter::new("virtio-mem"),
        })
    }

    pub fn status(&self) -> MemStatus {
        MemStatus {
            region_bytes: self.region_size,
            requested_bytes: self.requested,
            plugged_bytes: self.plugged.set * BLOCK_SIZE,
        }
    }

    /// Sets `requested_size`: the guest may plug up to `bytes` (and should unplug down to
    /// it). Through the transport ([`MemControl::request`]) the driver is told.
    pub fn request(&mut self, bytes: u64) -> Result<(), MemError> {
        if !bytes.is_multiple_of(BLOCK_SIZE) {
            return Err(MemError::Unaligned(bytes));
        }
        if bytes > self.region_size {
            return Err(MemError::TooBig {
                requested: bytes,
                region: self.region_size,
            });
        }
        log::info!(
            "virtio-mem: {} MiB requested ({} MiB plugged)",
            bytes >> 20,
            self.status().plugged_bytes >> 20
        );
        self.requested = bytes;
        Ok(())
    }

    /// The blocks of `nb_blocks` from `addr`, if that is a non-empty, aligned range
    /// inside the region.
    fn blocks(&self, addr: u64, nb_blocks: u16) -> Option<Range<u64>> {
        if nb_blocks == 0 || !addr.is_multiple_of(BLOCK_SIZE) {
            return None;
        }
        let offset = addr.checked_sub(self.addr)?;
        let end = offset.checked_add(u64::from(nb_blocks) * BLOCK_SIZE)?;
        (end <= self.region_size).then_some(offset / BLOCK_SIZE..end / BLOCK_SIZE)
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let s = self.status();
        // node_id (8..10) stays 0: VIRTIO_MEM_F_ACPI_PXM is not offered.
        for (at, v) in [
            (0, BLOCK_SIZE),
            (16, self.addr),
            (24, self.region_size),
            // usable_region_size: all of it, from the start.
            (32, self.region_size),
            (40, s.plugged_bytes),
            (48, s.requested_bytes),
        ] {
            c[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        c
    }

    /// Reads a chain's request and checks its response buffer.
    fn parse(
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<(Request, GuestAddress), ChainError> {
        let mut descs = chain.take(2);
        let request = descs
            .next()
            .filter(|d| !d.is_write_only() && d.len() >= REQUEST_LEN)
            .ok_or(ChainError::Request)?;
        let response = descs
            .next()
            .filter(|d| d.is_write_only() && d.len() >= RESPONSE_LEN)
            .ok_or(ChainError::Response)?;
        let mut raw = [0u8; REQUEST_LEN as usize];
        mem.read_slice(&mut raw, request.addr())
            .map_err(|_| ChainError::RequestMemory)?;
        if !mem.check_range(response.addr(), RESPONSE_LEN as usize) {
            return Err(ChainError::ResponseMemory);
        }
        let u16_at = |at: usize| u16::from_le_bytes([raw[at], raw[at + 1]]);
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&raw[8..16]);
        let request = Request {
            kind: u16_at(0),
            addr: u64::from_le_bytes(addr),
            nb_blocks: u16_at(16),
        };
        Ok((request, response.addr()))
    }

    /// Carries out one request; returns the response type and state.
    fn execute(&mut self, mem: &GuestMemoryMmap, r: Request) -> (u16, u16) {
        let blocks = self.blocks(r.addr, r.nb_blocks);
        let answer = match (r.kind, blocks) {
            (req::UNPLUG_ALL, _) => {
                for run in self.plugged.plugged_runs() {
                    self.give_back(mem, run);
                }
                (resp::ACK, 0)
            }
            (req::PLUG, Some(b)) if self.plugged.all(b.clone(), false) => {
                let bytes = (b.end - b.start) * BLOCK_SIZE;
                if self.status().plugged_bytes + bytes > self.requested {
                    (resp::NACK, 0)
                } else {
                    self.plugged.put(b, true);
                    self.epoch = self.epoch.wrapping_add(1);
                    (resp::ACK, 0)
                }
            }
            (req::UNPLUG, Some(b)) if self.plugged.all(b.clone(), true) => {
                self.give_back(mem, b);
                (resp::ACK, 0)
            }
            (req::STATE, Some(b)) => {
                let s = if self.plugged.all(b.clone(), true) {
                    state::PLUGGED
                } else if self.plugged.all(b, false) {
                    state::UNPLUGGED
                } else {
                    state::MIXED
                };
                (resp::ACK, s)
            }
            _ => (resp::ERROR, 0),
        };
        if answer.0 == resp::ERROR && self.log.allow() {
            log::warn!(
                "virtio-mem: refused request {} for {} blocks at {:#x}",
                r.kind,
                r.nb_blocks,
                r.addr
            );
        }
        answer
    }

    /// Unplugs `blocks` and gives their pages to the host. The guest stopped using them
    /// before asking, so a failure to free the pages costs the host memory, not the guest
    /// its data: logged, and the blocks are unplugged all the same.
    fn give_back(&mut self, mem: &GuestMemoryMmap, blocks: Range<u64>) {
        let addr = self.addr + blocks.start * BLOCK_SIZE;
        let len = ((blocks.end - blocks.start) * BLOCK_SIZE) as usize;
        self.plugged.put(blocks, false);
        self.epoch = self.epoch.wrapping_add(1);
        let done = match mem.get_slice(GuestAddress(addr), len) {
            Ok(s) => self.discard.discard(s.ptr_guard_mut().as_ptr(), len),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = done {
            if self.log.allow() {
                log::warn!("virtio-mem: {len} bytes at {addr:#x} not given back: {e}");
            }
        }
    }
}

impl<D: Discard> VirtioDevice for Mem<D> {
    fn device_type(&self) -> u32 {
        TYPE_MEM
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        0
    }

    fn config_epoch(&self) -> u32 {
        self.epoch
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config();
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(c.len());
        let end = start.saturating_add(data.len()).min(c.len());
        data[..end - start].copy_from_slice(&c[start..end]);
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let Some(queue) = queues.get_mut(index).filter(|_| index == 0) else {
            return false;
        };
        let mut used = false;
        let mut budget = Budget::of(queue);
        while let Some(chain) = next_chain(queue, mem, &mut self.log, &mut budget) {
            let head = chain.head_index();
            let written = match Self::parse(mem, chain) {
                Ok((request, response)) => {
                    let (kind, state) = self.execute(mem, request);
                    let mut out = [0u8; RESPONSE_LEN as usize];
                    out[..2].copy_from_slice(&kind.to_le_bytes());
                    out[8..].copy_from_slice(&state.to_le_bytes());
                    // Checked writable in `parse`.
                    match mem.write_slice(&out, response) {
                        Ok(()) => RESPONSE_LEN,
                        Err(_) => 0,
                    }
                }
                Err(e) => {
                    if self.log.allow() {
                        log::warn!("virtio-mem: request not answered: {e}");
                    }
                    0
                }
            };
            if !return_used(queue, mem, head, written, &mut self.log) {
                break;
            }
            used = true;
        }
        used && queue.needs_notification(mem).unwrap_or(true)
    }

    /// The plugged blocks stay plugged: a driver that goes away (or reloads) may leave
    /// plugged memory in use, and a new driver finds `plugged_size` set and asks for
    /// UNPLUG_ALL itself (§5.15.5).
    fn reset(&mut self) {}
}

/// The host's side of a virtio-mem device on its transport, for the API.
pub trait MemControl: Send {
    fn status(&self) -> MemStatus;
    /// Sets `requested_size` ([`Mem::request`]) and tells the driver through the
    /// configuration-change interrupt; the guest plugs (or unplugs) blocks to match.
    fn request(&mut self, bytes: u64) -> Result<MemStatus, MemError>;
}

impl<D: Discard, I: Interrupt> MemControl for MmioTransport<Mem<D>, I> {
    fn status(&self) -> MemStatus {
        self.device().status()
    }

    fn request(&mut self, bytes: u64) -> Result<MemStatus, MemError> {
        self.change_config(|m| m.request(bytes).map(|()| m.status()))
    }
}

#[cfg(test)]
mod tests;
