//! The virtio-mmio transport (virtio 1.2 §4.2, non-legacy): the register file, feature
//! negotiation, queue configuration and notifications for one [`VirtioDevice`]. Anything
//! a driver can get wrong is logged (rate-limited) and refused, never a VMM crash.

use std::os::fd::RawFd;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;

use super::defs::{self, reg, status};
use super::{Interrupt, VirtioDevice};
use crate::devices::bus::BusDevice;
use crate::logging::LogLimiter;

/// Errors while creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("Queue size {0} is not a power of two up to 32768")]
    QueueSize(u16, #[source] virtio_queue::Error),
}

/// A transport's registers and queues, for snapshots (`vstate::snapshot`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub queues: Vec<SavedQueue>,
}

/// virtio-queue's `QueueState`, mirrored for serde.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedQueue {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for SavedQueue {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<SavedQueue> for QueueState {
    fn from(q: SavedQueue) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

pub struct MmioTransport<D: VirtioDevice, I: Interrupt> {
    device: D,
    interrupt: I,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    log: LogLimiter,
}

impl<D: VirtioDevice, I: Interrupt> MmioTransport<D, I> {
    pub fn new(device: D, interrupt: I, mem: GuestMemoryMmap) -> Result<Self, MmioError> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|s| Queue::new(*s).map_err(|e| MmioError::QueueSize(*s, e)))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            device,
            interrupt,
            mem,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
            log: LogLimiter::new("virtio-mmio"),
        })
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    pub fn queues(&self) -> &[Queue] {
        &self.queues
    }

    /// The registers and queues. Devices whose rings a backend serves (vhost-user)
    /// report where the backend stands in each ring; they stop and hand the rings back
    /// over to do so, so the VM can go on after the snapshot.
    pub fn save(&mut self) -> Result<TransportState, String> {
        let mut queues: Vec<QueueState> = self.queues.iter().map(|q| q.state()).collect();
        if self.activated() && self.device.save_queues(&mut queues)? {
            for (q, s) in self.queues.iter_mut().zip(&queues) {
                q.set_next_avail(s.next_avail);
                q.set_next_used(s.next_used);
            }
            self.device
                .activate(self.acked_features, &self.queues, &self.mem)?;
        }
        Ok(TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: queues.into_iter().map(SavedQueue::from).collect(),
        })
    }

    /// Takes a saved state on a transport built for the same device; an activated
    /// device is activated again with the saved queues (a vhost-user backend gets them
    /// at the saved positions). Nothing is taken unless all of it is valid.
    pub fn restore(&mut self, s: &TransportState) -> Result<(), String> {
        let kind = self.device.device_type();
        if s.device_type != kind {
            return Err(format!(
                "saved device type {} on a device of type {kind}",
                s.device_type
            ));
        }
        if s.queues.len() != self.queues.len() {
            return Err(format!(
                "{} queues saved for a device with {}",
                s.queues.len(),
                self.queues.len()
            ));
        }
        let mut queues = Vec::with_capacity(s.queues.len());
        for (i, (saved, mine)) in s.queues.iter().zip(&self.queues).enumerate() {
            if saved.max_size != mine.max_size() {
                return Err(format!(
                    "queue {i}: saved size limit {}, device's {}",
                    saved.max_size,
                    mine.max_size()
                ));
            }
            let q =
                Queue::try_from(QueueState::from(*saved)).map_err(|e| format!("queue {i}: {e}"))?;
            if q.ready() && !q.is_valid(&self.mem) {
                return Err(format!("queue {i}: its rings are outside guest memory"));
            }
            queues.push(q);
        }
        if s.acked_features & !self.offered_features() != 0 {
            return Err(format!(
                "features {:#x} were acked but are not offered",
                s.acked_features
            ));
        }
        self.queues = queues;
        self.status = s.status;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.acked_features = s.acked_features;
        self.queue_sel = s.queue_sel;
        self.interrupt_status = s.interrupt_status;
        self.config_generation = s.config_generation;
        if self.activated() {
            self.device
                .activate(self.acked_features, &self.queues, &self.mem)?;
        }
        if self.interrupt_status != 0 {
            // The line is edge-triggered through an irqfd: raise it again so an
            // interrupt the guest had not yet taken is not lost.
            self.interrupt.trigger();
        }
        Ok(())
    }

    fn offered_features(&self) -> u64 {
        self.device.avail_features() | defs::VIRTIO_F_VERSION_1
    }

    fn activated(&self) -> bool {
        self.status & status::DRIVER_OK != 0 && self.status & status::DEVICE_NEEDS_RESET == 0
    }

    /// The selected queue, if the driver may still configure it.
    fn configurable_queue(&mut self) -> Option<&mut Queue> {
        let setting_up = self.status & status::FEATURES_OK != 0 && !self.activated();
        let sel = self.queue_sel as usize;
        let ok = setting_up && self.queues.get(sel).is_some_and(|q| !q.ready());
        if !ok {
            if self.log.allow() {
                log::warn!(
                    "virtio-mmio: driver configured queue {sel} in status {:#x}; ignored",
                    self.status
                );
            }
            return None;
        }
        self.queues.get_mut(sel)
    }

    fn needs_reset(&mut self, why: &str) {
        if self.log.allow() {
            log::warn!("virtio-mmio: device {}: {why}", self.device.device_type());
        }
        self.status |= status::DEVICE_NEEDS_RESET;
        self.interrupt_status |= defs::INT_CONFIG;
        self.interrupt.trigger();
    }

    /// The host changes the device's configuration through `change` (a virtio-mem
    /// resize): when it succeeds the configuration gets a new generation (§4.2.2: so a
    /// driver reading it in pieces sees a consistent copy) and, once the driver is
    /// running, the configuration-change interrupt (§2.5.2). Before DRIVER_OK the
    /// driver reads the configuration anyway, and has no handler to interrupt.
    pub fn change_config<R, E>(
        &mut self,
        change: impl FnOnce(&mut D) -> Result<R, E>,
    ) -> Result<R, E> {
        let r = change(&mut self.device)?;
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.activated() {
            self.interrupt_status |= defs::INT_CONFIG;
            self.interrupt.trigger();
        }
        Ok(r)
    }

    fn signal_used(&mut self) {
        self.interrupt_status |= defs::INT_USED_RING;
        self.interrupt.trigger();
    }

    /// The driver kicked queue `index`.
    pub fn notify(&mut self, index: u32) {
        let i = index as usize;
        if !self.activated() || !self.queues.get(i).is_some_and(|q| q.ready()) {
            if self.log.allow() {
                log::warn!("virtio-mmio: notify for queue {index} that is not live; ignored");
            }
            return;
        }
        if self.device.process_queue(i, &mut self.queues, &self.mem) {
            self.signal_used();
        }
    }

    /// The device's host fd is readable.
    pub fn process_host(&mut self) {
        if self.activated() && self.device.process_host(&mut self.queues, &self.mem) {
            self.signal_used();
        }
    }

    pub fn host_fd(&self) -> Option<RawFd> {
        self.device.host_fd()
    }

    fn reset(&mut self) {
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.device.reset();
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let new_bits = v & !self.status;
        if v & self.status != self.status {
            // §2.1.2: the driver must not clear bits; only a write of 0 resets.
            if self.log.allow() {
                log::warn!(
                    "virtio-mmio: driver cleared status bits ({:#x} -> {v:#x})",
                    self.status
                );
            }
            return;
        }
        if new_bits & status::FEATURES_OK != 0 {
            let acked = self.acked_features;
            if acked & !self.offered_features() != 0 || acked & defs::VIRTIO_F_VERSION_1 == 0 {
                if self.log.allow() {
                    log::warn!("virtio-mmio: refusing features {acked:#x}");
                }
                // Leave FEATURES_OK clear: §3.1.1 says the driver re-reads and gives up.
                // DRIVER_OK in the same write is not taken either: the device was never
                // activated, so it must not look live.
                self.status = v & !(status::FEATURES_OK | status::DRIVER_OK);
                return;
            }
        }
        if new_bits & status::DRIVER_OK != 0 {
            if self.status & status::FEATURES_OK == 0 {
                self.needs_reset("DRIVER_OK before FEATURES_OK");
                return;
            }
            self.status = v;
            if let Err(e) = self
                .device
                .activate(self.acked_features, &self.queues, &self.mem)
            {
                self.needs_reset(&format!("activation failed: {e}"));
            }
            return;
        }
        self.status = v;
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC => defs::MMIO_MAGIC,
            reg::VERSION => defs::MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => defs::VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => q.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            // Changes the device makes itself (a guest's request) count too (§2.5.1).
            reg::CONFIG_GENERATION => self
                .config_generation
                .wrapping_add(self.device.config_epoch()),
            // No shared memory regions: a length of all ones means "absent" (§4.2.2.1).
            // Linux reads 0 as a region of length 0 at address 0, and virtio-fs with
            // CONFIG_FUSE_DAX then fails to probe (it cannot reserve that range).
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            _ => {
                if self.log.allow() {
                    log::warn!("virtio-mmio: read of register {offset:#x}; returning 0");
                }
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                if self.status & status::FEATURES_OK != 0 {
                    if self.log.allow() {
                        log::warn!("virtio-mmio: features written after FEATURES_OK; ignored");
                    }
                    return;
                }
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                self.acked_features =
                    (self.acked_features & !(0xffff_ffffu64 << shift)) | (u64::from(v) << shift);
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if let Some(q) = self.configurable_queue() {
                    // Queue::set_size refuses sizes that are zero, too big or not a power
                    // of two, leaving the old one; is_valid() catches it at QUEUE_READY.
                    q.set_size(v as u16);
                }
            }
            reg::QUEUE_DESC_LOW => self.with_queue(|q| q.set_desc_table_address(Some(v), None)),
            reg::QUEUE_DESC_HIGH => self.with_queue(|q| q.set_desc_table_address(None, Some(v))),
            reg::QUEUE_DRIVER_LOW => self.with_queue(|q| q.set_avail_ring_address(Some(v), None)),
            reg::QUEUE_DRIVER_HIGH => self.with_queue(|q| q.set_avail_ring_address(None, Some(v))),
            reg::QUEUE_DEVICE_LOW => self.with_queue(|q| q.set_used_ring_address(Some(v), None)),
            reg::QUEUE_DEVICE_HIGH => self.with_queue(|q| q.set_used_ring_address(None, Some(v))),
            reg::QUEUE_READY => {
                let sel = self.queue_sel;
                if v == 0 {
                    if let Some(q) = self.queues.get_mut(sel as usize) {
                        q.set_ready(false);
                    }
                    return;
                }
                let mem = self.mem.clone();
                let Some(q) = self.configurable_queue() else {
                    return;
                };
                // is_valid() also requires the ready bit; take it back if the rings do
                // not fit in guest memory.
                q.set_ready(true);
                if !q.is_valid(&mem) {
                    q.set_ready(false);
                    self.needs_reset(&format!("queue {sel} is misprogrammed"));
                }
            }
            reg::QUEUE_NOTIFY => self.notify(v),
            reg::INTERRUPT_ACK => self.interrupt_status &= !v,
            reg::SHM_SEL => {}
            reg::STATUS => self.set_status(v),
            _ => {
                if self.log.allow() {
                    log::warn!("virtio-mmio: write to register {offset:#x}; ignored");
                }
            }
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.configurable_queue() {
            f(q);
        }
    }
}

impl<D: VirtioDevice, I: Interrupt> BusDevice for MmioTransport<D, I> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            data.fill(0);
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            if self.log.allow() {
                log::warn!("virtio-mmio: {}-byte read at {offset:#x}", data.len());
            }
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            if self.log.allow() {
                log::warn!("virtio-mmio: {}-byte write at {offset:#x}", data.len());
            }
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}
