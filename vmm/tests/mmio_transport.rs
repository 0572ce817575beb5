//! The virtio-mmio transport driven register by register, as a guest driver would, with a
//! fake device and interrupt line: discovery, feature negotiation, queue setup, notify,
//! and everything a driver can get wrong.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use cocoon_vmm::devices::bus::BusDevice;
use cocoon_vmm::devices::virtio::defs::{reg, status, INT_USED_RING, MMIO_MAGIC};
use cocoon_vmm::devices::virtio::mmio::MmioTransport;
use cocoon_vmm::devices::virtio::{Interrupt, VirtioDevice};
use virtio_queue::Queue;
use vm_memory::{GuestAddress, GuestMemoryMmap};

#[derive(Default)]
struct Fake {
    notified: Vec<usize>,
    activated: Option<u64>,
    resets: usize,
}

impl VirtioDevice for Fake {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn avail_features(&self) -> u64 {
        1 << 3
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = (offset as u8).wrapping_add(i as u8);
        }
    }
    fn activate(&mut self, acked: u64, _: &[Queue], _: &GuestMemoryMmap) -> Result<(), String> {
        self.activated = Some(acked);
        Ok(())
    }
    fn process_queue(&mut self, index: usize, _: &mut [Queue], _: &GuestMemoryMmap) -> bool {
        self.notified.push(index);
        true
    }
    fn reset(&mut self) {
        self.resets += 1;
    }
}

#[derive(Clone, Default)]
struct Counter(Arc<AtomicUsize>);
impl Interrupt for Counter {
    fn trigger(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn transport() -> (MmioTransport<Fake, Counter>, Counter) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let irq = Counter::default();
    (
        MmioTransport::new(Fake::default(), irq.clone(), mem).unwrap(),
        irq,
    )
}

fn r(t: &mut MmioTransport<Fake, Counter>, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn w(t: &mut MmioTransport<Fake, Counter>, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn negotiate(t: &mut MmioTransport<Fake, Counter>, low: u32, high: u32) {
    w(t, reg::STATUS, 0);
    w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w(t, reg::DRIVER_FEATURES_SEL, 0);
    w(t, reg::DRIVER_FEATURES, low);
    w(t, reg::DRIVER_FEATURES_SEL, 1);
    w(t, reg::DRIVER_FEATURES, high);
    w(
        t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
}

fn setup_queue(t: &mut MmioTransport<Fake, Counter>, q: u32, base: u32) {
    w(t, reg::QUEUE_SEL, q);
    w(t, reg::QUEUE_NUM, 8);
    w(t, reg::QUEUE_DESC_LOW, base);
    w(t, reg::QUEUE_DRIVER_LOW, base + 0x1000);
    w(t, reg::QUEUE_DEVICE_LOW, base + 0x2000);
    w(t, reg::QUEUE_READY, 1);
}

#[test]
fn identification_registers() {
    let (mut t, _) = transport();
    assert_eq!(r(&mut t, reg::MAGIC), MMIO_MAGIC);
    assert_eq!(r(&mut t, reg::VERSION), 2);
    assert_eq!(r(&mut t, reg::DEVICE_ID), 42);
    w(&mut t, reg::DEVICE_FEATURES_SEL, 0);
    assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1 << 3);
    w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1, "VIRTIO_F_VERSION_1");
    w(&mut t, reg::DEVICE_FEATURES_SEL, 7);
    assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 0);
    w(&mut t, reg::QUEUE_SEL, 1);
    assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 8);
    w(&mut t, reg::QUEUE_SEL, 9);
    assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0, "no such queue");
    let mut cfg = [0u8; 2];
    t.read(reg::CONFIG + 4, &mut cfg);
    assert_eq!(cfg, [4, 5]);
}

/// Linux's `vm_get_shm_region` takes a length of all ones as "no such region"; anything
/// else (0 included) is a region it then tries to reserve.
#[test]
fn shared_memory_regions_read_as_absent() {
    let (mut t, _) = transport();
    for id in [0, 1, 255] {
        w(&mut t, reg::SHM_SEL, id);
        let len =
            u64::from(r(&mut t, reg::SHM_LEN_LOW)) | u64::from(r(&mut t, reg::SHM_LEN_HIGH)) << 32;
        assert_eq!(len, u64::MAX, "region {id}");
    }
}

#[test]
fn full_bring_up_then_notify_interrupts() {
    let (mut t, irq) = transport();
    negotiate(&mut t, 1 << 3, 1);
    assert_ne!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
    setup_queue(&mut t, 0, 0x1_0000);
    setup_queue(&mut t, 1, 0x2_0000);
    assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
    w(&mut t, reg::STATUS, 0xf);
    assert_eq!(t.device().activated, Some((1 << 32) | (1 << 3)));
    w(&mut t, reg::QUEUE_NOTIFY, 1);
    assert_eq!(t.device().notified, vec![1]);
    assert_eq!(irq.0.load(Ordering::SeqCst), 1);
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), INT_USED_RING);
    w(&mut t, reg::INTERRUPT_ACK, INT_USED_RING);
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
    // Reset clears everything and tells the device.
    let resets = t.device().resets;
    w(&mut t, reg::STATUS, 0);
    assert_eq!(r(&mut t, reg::STATUS), 0);
    assert_eq!(t.device().resets, resets + 1);
    assert!(t.queues().iter().all(|q| !virtio_queue::QueueT::ready(q)));
}

#[test]
fn unoffered_features_or_missing_version_1_are_refused() {
    let (mut t, _) = transport();
    negotiate(&mut t, 1 << 4, 1);
    assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
    negotiate(&mut t, 1 << 3, 0);
    assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
}

/// FEATURES_OK and DRIVER_OK in one write, with features the device refuses: neither
/// bit is taken and the device is not activated.
#[test]
fn refused_features_with_driver_ok_in_one_write_leave_the_device_inactive() {
    let (mut t, _) = transport();
    w(&mut t, reg::STATUS, 0);
    w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w(&mut t, reg::DRIVER_FEATURES_SEL, 0);
    w(&mut t, reg::DRIVER_FEATURES, 1 << 4);
    w(
        &mut t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    let st = r(&mut t, reg::STATUS);
    assert_eq!(st & (status::FEATURES_OK | status::DRIVER_OK), 0, "{st:#x}");
    assert_eq!(t.device().activated, None);
}

#[test]
fn queue_config_outside_setup_is_ignored() {
    let (mut t, _) = transport();
    // Before FEATURES_OK.
    setup_queue(&mut t, 0, 0x1_0000);
    assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
    negotiate(&mut t, 0, 1);
    // Nonexistent queue.
    setup_queue(&mut t, 5, 0x1_0000);
    assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
    setup_queue(&mut t, 0, 0x1_0000);
    w(&mut t, reg::STATUS, 0xf);
    // After DRIVER_OK the live queue cannot be moved.
    w(&mut t, reg::QUEUE_SEL, 0);
    w(&mut t, reg::QUEUE_DESC_LOW, 0x5_0000);
    assert_eq!(virtio_queue::QueueT::desc_table(&t.queues()[0]), 0x1_0000);
}

#[test]
fn misprogrammed_queues_need_reset() {
    let (mut t, irq) = transport();
    negotiate(&mut t, 0, 1);
    // Rings outside guest memory (1 MiB).
    setup_queue(&mut t, 0, 0x20_0000);
    assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
    assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(irq.0.load(Ordering::SeqCst), 1, "config interrupt");
    // Nothing is processed until the driver resets.
    w(&mut t, reg::STATUS, 0xf | status::DEVICE_NEEDS_RESET);
    w(&mut t, reg::QUEUE_NOTIFY, 0);
    assert!(t.device().notified.is_empty());
}

#[test]
fn bad_sizes_and_orders_are_survived() {
    let (mut t, _) = transport();
    // Bad queue size: not a power of two, and zero.
    negotiate(&mut t, 0, 1);
    w(&mut t, reg::QUEUE_SEL, 0);
    w(&mut t, reg::QUEUE_NUM, 3);
    w(&mut t, reg::QUEUE_NUM, 0);
    // DRIVER_OK before FEATURES_OK.
    w(&mut t, reg::STATUS, 0);
    w(&mut t, reg::STATUS, 3);
    w(&mut t, reg::STATUS, 7);
    assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(t.device().activated, None);
    // Clearing status bits without a reset is refused.
    w(&mut t, reg::STATUS, 0);
    w(&mut t, reg::STATUS, 3);
    w(&mut t, reg::STATUS, 1);
    assert_eq!(r(&mut t, reg::STATUS), 3);
    // Notify before DRIVER_OK, unknown registers, odd widths and offsets.
    w(&mut t, reg::QUEUE_NOTIFY, 0);
    w(&mut t, 0x0c8, 1);
    assert_eq!(r(&mut t, 0x0c8), 0);
    t.write(reg::STATUS, &[0xff]);
    t.write(reg::STATUS + 1, &[0, 0, 0, 0]);
    let mut b = [0u8; 2];
    t.read(reg::MAGIC, &mut b);
    assert_eq!(b, [0, 0]);
    assert_eq!(r(&mut t, reg::STATUS), 3);
    assert!(t.device().notified.is_empty());
}

/// A snapshot of a live transport, restored on a fresh one, reads back the same
/// registers, activates the device again with the acked features, and re-raises a
/// pending interrupt; the restored queue is live (a notify reaches the device).
#[test]
fn saved_state_restores_on_a_fresh_transport() {
    let (mut t, _) = transport();
    negotiate(&mut t, 1 << 3, 1);
    setup_queue(&mut t, 1, 0x4000);
    w(&mut t, reg::STATUS, 0xf);
    w(&mut t, reg::QUEUE_NOTIFY, 1);
    let saved = t.save().unwrap();
    assert_eq!(saved.queues.len(), 2);
    assert!(saved.queues[1].ready && !saved.queues[0].ready);
    assert_eq!(saved.queues[1].desc_table, 0x4000);

    let (mut fresh, irq) = transport();
    fresh.restore(&saved).unwrap();
    assert_eq!(fresh.device().activated, Some((1 << 32) | (1 << 3)));
    assert_eq!(
        irq.0.load(Ordering::SeqCst),
        1,
        "pending interrupt raised again"
    );
    assert_eq!(r(&mut fresh, reg::STATUS), 0xf);
    assert_eq!(r(&mut fresh, reg::INTERRUPT_STATUS), INT_USED_RING);
    w(&mut fresh, reg::QUEUE_SEL, 1);
    assert_eq!(r(&mut fresh, reg::QUEUE_READY), 1);
    assert_eq!(fresh.save().unwrap(), saved);
    w(&mut fresh, reg::QUEUE_NOTIFY, 1);
    assert_eq!(fresh.device().notified, vec![1]);
}

/// A state that does not fit the device or guest memory is refused whole: the
/// transport keeps its own state and nothing is activated.
#[test]
fn restore_refuses_state_that_does_not_fit() {
    let (mut t, _) = transport();
    negotiate(&mut t, 1 << 3, 1);
    setup_queue(&mut t, 0, 0x4000);
    w(&mut t, reg::STATUS, 0xf);
    let good = t.save().unwrap();
    let refused = |tweak: &dyn Fn(&mut cocoon_vmm::devices::virtio::mmio::TransportState),
                   what: &str| {
        let mut s = good.clone();
        tweak(&mut s);
        let (mut fresh, _) = transport();
        let e = fresh.restore(&s).unwrap_err();
        assert!(e.contains(what), "{e}");
        assert_eq!(fresh.device().activated, None);
        assert_eq!(r(&mut fresh, reg::STATUS), 0);
    };
    refused(&|s| s.device_type = 7, "device type");
    refused(&|s| s.queues.pop().map(|_| ()).unwrap(), "queues saved");
    refused(
        &|s| s.queues[0].desc_table = 0xffff_0000,
        "outside guest memory",
    );
    refused(&|s| s.queues[0].size = 3, "queue 0");
    refused(&|s| s.queues[1].max_size = 64, "size limit");
    refused(&|s| s.acked_features |= 1 << 20, "not offered");
}
