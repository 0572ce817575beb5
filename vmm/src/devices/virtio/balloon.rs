//! virtio-balloon (virtio 1.2 §5.5) for free page reporting only: the guest reports
//! ranges of memory it has freed, and the host gives their pages back (guest RAM is a
//! shared memfd or tmpfs file: `MADV_REMOVE` punches them out of it), so a pod is not
//! charged for its life for every page its guest ever touched. No ballooning: the
//! device never asks for pages (`num_pages` stays 0), and inflate/deflate buffers are
//! handed back untouched.
//!
//! The guest is hostile: a reported range is given back only if it is page-aligned and
//! lies inside guest RAM; anything else is skipped and counted. A guest that reports
//! memory it still uses only loses its own data.

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

pub use super::discard::{Discard, RemovePages};
use super::{next_chain, return_used, Budget, VirtioDevice};
use crate::logging::LogLimiter;

/// §5.5 device id.
pub const TYPE_BALLOON: u32 = 5;
/// §5.5.3: the device can take free page reports.
pub const VIRTIO_BALLOON_F_REPORTING: u64 = 1 << 5;
/// Queues: inflate, deflate and (with only REPORTING offered, no stats or hinting
/// queues before it) the reporting queue, which the driver numbers 2.
const INFLATE: usize = 0;
const DEFLATE: usize = 1;
const REPORTING: usize = 2;
const QUEUE_SIZE: u16 = 64;
const PAGE: u64 = 4096;

/// What the device did, for the API's stats and the tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BalloonStats {
    /// Bytes given back to the host.
    pub reported_bytes: u64,
    /// Reported ranges refused (unaligned, outside guest RAM, or failing to discard).
    pub refused: u64,
}

pub struct Balloon<D: Discard> {
    discard: D,
    queue_sizes: [u16; 3],
    /// `num_pages` (always 0) and `actual`, which the driver writes.
    config: [u8; 8],
    acked: u64,
    stats: BalloonStats,
    log: LogLimiter,
}

impl<D: Discard> Balloon<D> {
    pub fn new(discard: D) -> Self {
        Self {
            discard,
            queue_sizes: [QUEUE_SIZE; 3],
            config: [0; 8],
            acked: 0,
            stats: BalloonStats::default(),
            log: LogLimiter::new("virtio-balloon"),
        }
    }

    pub fn stats(&self) -> BalloonStats {
        self.stats
    }

    /// Gives back one reported range, if it is whole pages of guest RAM.
    fn report(&mut self, mem: &GuestMemoryMmap, addr: u64, len: u32) {
        let len = u64::from(len);
        let aligned = addr.is_multiple_of(PAGE) && len.is_multiple_of(PAGE) && len > 0;
        let slice = aligned
            .then(|| mem.get_slice(GuestAddress(addr), len as usize).ok())
            .flatten();
        let done = match slice {
            Some(s) => self
                .discard
                .discard(s.ptr_guard_mut().as_ptr(), len as usize),
            None => Err(format!(
                "{len} bytes at {addr:#x} are not whole pages of guest RAM"
            )),
        };
        match done {
            Ok(()) => self.stats.reported_bytes += len,
            Err(e) => {
                self.stats.refused += 1;
                if self.log.allow() {
                    log::warn!("virtio-balloon: reported range refused: {e}");
                }
            }
        }
    }
}

impl<D: Discard> VirtioDevice for Balloon<D> {
    fn device_type(&self) -> u32 {
        TYPE_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_BALLOON_F_REPORTING
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let start = (offset as usize).min(self.config.len());
        let end = (start + data.len()).min(self.config.len());
        data[..end - start].copy_from_slice(&self.config[start..end]);
    }

    /// The driver writes `actual` (bytes 4..8); `num_pages` is the device's.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let at = offset as usize + i;
            if (4..8).contains(&at) {
                self.config[at] = *b;
            }
        }
    }

    fn activate(&mut self, acked: u64, _: &[Queue], _: &GuestMemoryMmap) -> Result<(), String> {
        self.acked = acked;
        Ok(())
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let reporting = index == REPORTING && self.acked & VIRTIO_BALLOON_F_REPORTING != 0;
        if !(reporting || index == INFLATE || index == DEFLATE) {
            return false;
        }
        let Some(queue) = queues.get_mut(index) else {
            return false;
        };
        let mut used = false;
        let mut budget = Budget::of(queue);
        while let Some(chain) = next_chain(queue, mem, &mut self.log, &mut budget) {
            let head = chain.head_index();
            if reporting {
                // Each descriptor is one freed range (the driver's scatterlist).
                let ranges: Vec<(u64, u32)> = chain.map(|d| (d.addr().0, d.len())).collect();
                for (addr, len) in ranges {
                    self.report(mem, addr, len);
                }
            }
            if !return_used(queue, mem, head, 0, &mut self.log) {
                break;
            }
            used = true;
        }
        used && queue.needs_notification(mem).unwrap_or(true)
    }

    fn reset(&mut self) {
        self.acked = 0;
    }
}
