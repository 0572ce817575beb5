//! The device against a fake driver: request chains built in mock guest memory
//! (`virtio_queue::mock`), with the region mapped where the VMM puts it and a fake
//! [`Discard`] that records what would go back to the host.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::*;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::defs::{self, reg, status};

const QSIZE: u16 = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
/// Low memory holding the queue, one request and one response.
const LOW: usize = 1 << 20;
const REQ: u64 = 0x8_0000;
const RESP: u64 = 0x9_0000;
const REGION: u64 = 4 << 30;
const BLOCKS: u64 = 16;
const REGION_SIZE: u64 = BLOCKS * BLOCK_SIZE;
const MIB: u64 = 1 << 20;

/// Records each range given back, as (host address, length); fails when told to.
#[derive(Clone, Default)]
struct Recorder {
    ranges: Arc<Mutex<Vec<(usize, usize)>>>,
    fail: bool,
}

impl Discard for Recorder {
    fn discard(&mut self, host: *mut u8, len: usize) -> Result<(), String> {
        self.ranges.lock().unwrap().push((host as usize, len));
        if self.fail {
            return Err("refused by the test".into());
        }
        Ok(())
    }
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), LOW),
        (GuestAddress(REGION), REGION_SIZE as usize),
    ])
    .unwrap()
}

struct Driver<'m> {
    mem: &'m GuestMemoryMmap,
    mock: MockSplitQueue<'m, GuestMemoryMmap>,
    queues: Vec<Queue>,
    dev: Mem<Recorder>,
    given_back: Arc<Mutex<Vec<(usize, usize)>>>,
    next: u16,
}

impl<'m> Driver<'m> {
    fn new(mem: &'m GuestMemoryMmap) -> Self {
        let mock = MockSplitQueue::create(mem, GuestAddress(0x1000), QSIZE);
        let queues = vec![mock.create_queue::<Queue>().unwrap()];
        let discard = Recorder::default();
        let given_back = discard.ranges.clone();
        Self {
            mem,
            mock,
            queues,
            dev: Mem::new(REGION, REGION_SIZE, discard).unwrap(),
            given_back,
            next: 0,
        }
    }

    /// Posts one chain of (address, length, device-writable) and runs the device;
    /// returns the length the device reported written.
    fn submit(&mut self, descs: &[(u64, u32, bool)]) -> u32 {
        let n = descs.len() as u16;
        if self.next + n > QSIZE {
            self.next = 0;
        }
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, write))| {
                let at = self.next + i as u16;
                let mut flags = if write { F_WRITE } else { 0 };
                if i + 1 < descs.len() {
                    flags |= F_NEXT;
                }
                RawDescriptor::from(Descriptor::new(addr, len, flags, at + 1))
            })
            .collect();
        self.mock.add_desc_chains(&raw, self.next).unwrap();
        self.next += n;
        self.dev.process_queue(0, &mut self.queues, self.mem);
        let used = self.mock.used_addr().0;
        let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
        let slot = u64::from((idx - 1) % QSIZE);
        self.mem
            .read_obj(GuestAddress(used + 4 + slot * 8 + 4))
            .unwrap()
    }

    fn write_request(&self, kind: u16, addr: u64, nb_blocks: u16) {
        let mut r = [0u8; REQUEST_LEN as usize];
        r[..2].copy_from_slice(&kind.to_le_bytes());
        r[8..16].copy_from_slice(&addr.to_le_bytes());
        r[16..18].copy_from_slice(&nb_blocks.to_le_bytes());
        self.mem.write_slice(&r, GuestAddress(REQ)).unwrap();
        self.mem
            .write_slice(&[0xee; RESPONSE_LEN as usize], GuestAddress(RESP))
            .unwrap();
    }

    /// Sends one well-formed request; returns the response type and state.
    fn ask(&mut self, kind: u16, addr: u64, nb_blocks: u16) -> (u16, u16) {
        self.write_request(kind, addr, nb_blocks);
        let written = self.submit(&[(REQ, REQUEST_LEN, false), (RESP, RESPONSE_LEN, true)]);
        assert_eq!(written, RESPONSE_LEN);
        let out: [u8; RESPONSE_LEN as usize] = self.mem.read_obj(GuestAddress(RESP)).unwrap();
        assert_eq!(out[2..8], [0; 6], "padding");
        (
            u16::from_le_bytes([out[0], out[1]]),
            u16::from_le_bytes([out[8], out[9]]),
        )
    }

    fn block(n: u64) -> u64 {
        REGION + n * BLOCK_SIZE
    }

    fn plugged(&self) -> u64 {
        self.dev.status().plugged_bytes
    }

    fn taken_back(&self) -> Vec<(usize, usize)> {
        std::mem::take(&mut *self.given_back.lock().unwrap())
    }

    /// The host address of guest address `addr`.
    fn host(&self, addr: u64) -> usize {
        self.mem.get_host_address(GuestAddress(addr)).unwrap() as usize
    }
}

#[test]
fn plugs_within_the_requested_size_are_acked_and_counted() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    d.dev.request(8 * BLOCK_SIZE).unwrap();
    assert_eq!(d.ask(req::PLUG, Driver::block(0), 4), (resp::ACK, 0));
    assert_eq!(d.ask(req::PLUG, Driver::block(10), 4), (resp::ACK, 0));
    assert_eq!(d.plugged(), 8 * BLOCK_SIZE);
    assert_eq!(d.dev.status().requested_bytes, 8 * BLOCK_SIZE);
    assert!(d.taken_back().is_empty(), "plugging gives nothing back");
}

#[test]
fn plugs_past_the_requested_size_are_nacked() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    assert_eq!(d.ask(req::PLUG, Driver::block(0), 1), (resp::NACK, 0));
    d.dev.request(3 * BLOCK_SIZE).unwrap();
    assert_eq!(d.ask(req::PLUG, Driver::block(0), 2), (resp::ACK, 0));
    assert_eq!(d.ask(req::PLUG, Driver::block(2), 2), (resp::NACK, 0));
    assert_eq!(d.plugged(), 2 * BLOCK_SIZE, "a NACK plugs nothing");
    assert_eq!(d.ask(req::PLUG, Driver::block(2), 1), (resp::ACK, 0));
}

/// A plug or unplug changes `plugged_size`, so the config generation the transport
/// reports moves with it (§2.5.1); a refused request changes nothing.
#[test]
fn plugs_and_unplugs_move_the_config_epoch() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    d.dev.request(4 * BLOCK_SIZE).unwrap();
    let e0 = d.dev.config_epoch();
    assert_eq!(d.ask(req::PLUG, Driver::block(0), 2), (resp::ACK, 0));
    let e1 = d.dev.config_epoch();
    assert_ne!(e1, e0);
    assert_eq!(d.ask(req::PLUG, Driver::block(0), 1), (resp::ERROR, 0));
    assert_eq!(
        d.ask(req::STATE, Driver::block(0), 2),
        (resp::ACK, state::PLUGGED)
    );
    assert_eq!(d.dev.config_epoch(), e1, "nothing changed");
    assert_eq!(d.ask(req::UNPLUG, Driver::block(0), 2), (resp::ACK, 0));
    assert_ne!(d.dev.config_epoch(), e1);
}

#[test]
fn malformed_plugs_are_errors_and_change_nothing() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    d.dev.request(REGION_SIZE).unwrap();
    assert_eq!(d.ask(req::PLUG, Driver::block(1), 2), (resp::ACK, 0));
    let bad: [(u64, u16, &str); 8] = [
        (Driver::block(4) + 4096, 1, "misaligned"),
        (Driver::block(4), 0, "no blocks"),
        (REGION - BLOCK_SIZE, 1, "below the region"),
        (Driver::block(BLOCKS), 1, "just past the region"),
        (Driver::block(BLOCKS - 1), 2, "running past the region"),
        (!(BLOCK_SIZE - 1), u16::MAX, "addr + size overflows"),
        (Driver::block(0), 2, "half of it already plugged"),
        (Driver::block(1), 1, "already plugged"),
    ];
    for (addr, nb, why) in bad {
        assert_eq!(d.ask(req::PLUG, addr, nb), (resp::ERROR, 0), "{why}");
    }
    assert_eq!(d.plugged(), 2 * BLOCK_SIZE);
    assert_eq!(
        d.ask(req::STATE, Driver::block(0), 1),
        (resp::ACK, state::UNPLUGGED)
    );
    assert_eq!(
        d.ask(7, Driver::block(0), 1),
        (resp::ERROR, 0),
        "unknown type"
    );
}

#[test]
fn unplug_gives_back_exactly_those_pages() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    d.dev.request(REGION_SIZE).unwrap();
    assert_eq!(d.ask(req::PLUG, Driver::block(2), 6), (resp::ACK, 0));
    assert_eq!(d.ask(req::UNPLUG, Driver::block(3), 2), (resp::ACK, 0));
    assert_eq!(
        d.taken_back(),
        [(d.host(Driver::block(3)), 2 * BLOCK_SIZE as usize)]
    );
    assert_eq!(d.plugged(), 4 * BLOCK_SIZE);
    // Not (all) plugged, outside the region, misaligned: refused, nothing given back.
    for (addr, nb) in [
        (Driver::block(3), 1),
        (Driver::block(1), 2),
        (Driver::block(7), 2),
        (Driver::block(2) + 1, 1),
        (REGION + REGION_SIZE, 1),
    ] {
        assert_eq!(
            d.ask(req::UNPLUG, addr, nb),
            (resp::ERROR, 0),
            "{addr:#x}+{nb}"
        );
    }
    assert!(d.taken_back().is_empty());
    assert_eq!(d.plugged(), 4 * BLOCK_SIZE);
}

#[test]
fn unplug_all_gives_back_every_plugged_run() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    d.dev.request(REGION_SIZE).unwrap();
    assert_eq!(d.ask(req::PLUG, Driver::block(0), 2), (resp::ACK, 0));
    assert_eq!(d.ask(req::PLUG, Driver::block(5), 1), (resp::ACK, 0));
    assert_eq!(
        d.ask(req::PLUG, Driver::block(BLOCKS - 3), 3),
        (resp::ACK, 0)
    );
    // Its address and count mean nothing.
    assert_eq!(d.ask(req::UNPLUG_ALL, 1, 0), (resp::ACK, 0));
    let b = BLOCK_SIZE as usize;
    assert_eq!(
        d.taken_back(),
        [
            (d.host(Driver::block(0)), 2 * b),
            (d.host(Driver::block(5)), b),
            (d.host(Driver::block(BLOCKS - 3)), 3 * b),
        ]
    );
    assert_eq!(d.plugged(), 0);
    assert_eq!(d.ask(req::UNPLUG_ALL, 0, 0), (resp::ACK, 0));
    assert!(d.taken_back().is_empty(), "nothing left to give back");
}

#[test]
fn a_failed_discard_still_unplugs() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    d.dev.discard.fail = true;
    d.dev.request(REGION_SIZE).unwrap();
    assert_eq!(d.ask(req::PLUG, Driver::block(0), 1), (resp::ACK, 0));
    assert_eq!(d.ask(req::UNPLUG, Driver::block(0), 1), (resp::ACK, 0));
    assert_eq!(d.taken_back().len(), 1);
    assert_eq!(d.plugged(), 0);
}

#[test]
fn state_reports_plugged_unplugged_and_mixed() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    d.dev.request(REGION_SIZE).unwrap();
    assert_eq!(d.ask(req::PLUG, Driver::block(4), 4), (resp::ACK, 0));
    let ack = |s| (resp::ACK, s);
    assert_eq!(d.ask(req::STATE, Driver::block(4), 4), ack(state::PLUGGED));
    assert_eq!(d.ask(req::STATE, Driver::block(5), 1), ack(state::PLUGGED));
    assert_eq!(
        d.ask(req::STATE, Driver::block(0), 4),
        ack(state::UNPLUGGED)
    );
    assert_eq!(
        d.ask(req::STATE, Driver::block(8), 8),
        ack(state::UNPLUGGED)
    );
    assert_eq!(d.ask(req::STATE, Driver::block(3), 2), ack(state::MIXED));
    assert_eq!(
        d.ask(req::STATE, Driver::block(0), BLOCKS as u16),
        ack(state::MIXED)
    );
    assert_eq!(d.ask(req::STATE, Driver::block(0), 17), (resp::ERROR, 0));
    assert_eq!(
        d.ask(req::STATE, Driver::block(0) + 512, 1),
        (resp::ERROR, 0)
    );
}

/// Chains the device cannot answer are handed back with nothing written and nothing
/// done, and the queue goes on.
#[test]
fn bad_chains_are_not_answered_and_change_nothing() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    d.dev.request(REGION_SIZE).unwrap();
    let (r, w) = (false, true);
    let bad: [&[(u64, u32, bool)]; 8] = [
        &[(REQ, REQUEST_LEN, r)],
        &[(REQ, REQUEST_LEN - 1, r), (RESP, RESPONSE_LEN, w)],
        &[(REQ, REQUEST_LEN, w), (RESP, RESPONSE_LEN, w)],
        &[(REQ, REQUEST_LEN, r), (RESP, RESPONSE_LEN - 1, w)],
        &[(REQ, REQUEST_LEN, r), (RESP, RESPONSE_LEN, r)],
        &[(RESP, RESPONSE_LEN, w), (REQ, REQUEST_LEN, r)],
        // Outside guest memory: the request, then the response.
        &[
            (REGION + REGION_SIZE, REQUEST_LEN, r),
            (RESP, RESPONSE_LEN, w),
        ],
        &[(REQ, REQUEST_LEN, r), (LOW as u64 - 4, RESPONSE_LEN, w)],
    ];
    for chain in bad {
        d.write_request(req::PLUG, Driver::block(0), 1);
        assert_eq!(d.submit(chain), 0, "{chain:x?}");
        let out: [u8; RESPONSE_LEN as usize] = mem.read_obj(GuestAddress(RESP)).unwrap();
        assert_eq!(
            out, [0xee; RESPONSE_LEN as usize],
            "{chain:x?} wrote a response"
        );
        assert_eq!(d.plugged(), 0, "{chain:x?} was carried out");
    }
    // A longer buffer is fine, and the queue still works.
    d.write_request(req::PLUG, Driver::block(0), 1);
    assert_eq!(d.submit(&[(REQ, 4096, r), (RESP, 4096, w)]), RESPONSE_LEN);
    assert_eq!(d.plugged(), BLOCK_SIZE);
    // Other queue indices are not the device's.
    assert!(!d.dev.process_queue(1, &mut d.queues, &mem));
}

#[test]
fn config_space_says_where_the_region_is_and_how_much_is_plugged() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    d.dev.request(6 * BLOCK_SIZE).unwrap();
    assert_eq!(d.ask(req::PLUG, Driver::block(0), 2), (resp::ACK, 0));
    let mut c = [0xffu8; CONFIG_LEN];
    d.dev.read_config(0, &mut c);
    let u64_at = |at: usize| u64::from_le_bytes(c[at..at + 8].try_into().unwrap());
    assert_eq!(u64_at(0), BLOCK_SIZE);
    assert_eq!(c[8..16], [0; 8], "node_id and padding");
    assert_eq!(u64_at(16), REGION);
    assert_eq!(u64_at(24), REGION_SIZE);
    assert_eq!(u64_at(32), REGION_SIZE, "usable_region_size: all of it");
    assert_eq!(u64_at(40), 2 * BLOCK_SIZE);
    assert_eq!(u64_at(48), 6 * BLOCK_SIZE);
    // A driver reads u64 fields as two u32 reads; past the end reads nothing.
    let mut half = [0u8; 4];
    d.dev.read_config(52, &mut half);
    assert_eq!(u32::from_le_bytes(half), 0);
    d.dev.read_config(48, &mut half);
    assert_eq!(u64::from(u32::from_le_bytes(half)), 6 * BLOCK_SIZE);
    let mut past = [0x11u8; 8];
    d.dev.read_config(CONFIG_LEN as u64 - 2, &mut past);
    assert_eq!(past[2..], [0x11; 6]);
    d.dev.read_config(u64::MAX, &mut past);
    assert_eq!(d.dev.device_type(), 24);
    assert_eq!(d.dev.avail_features(), 0, "no feature bits offered");
    assert_eq!(d.dev.queue_max_sizes().len(), 1);
}

#[test]
fn the_region_must_be_whole_blocks() {
    for (addr, size) in [
        (REGION + 4096, REGION_SIZE),
        (REGION, REGION_SIZE + 4096),
        (REGION, 0),
        (u64::MAX - BLOCK_SIZE + 1, 2 * BLOCK_SIZE),
    ] {
        assert!(matches!(
            Mem::new(addr, size, Recorder::default()),
            Err(MemError::Region { .. })
        ));
    }
}

#[derive(Clone, Default)]
struct Counter(Arc<AtomicUsize>);

impl Interrupt for Counter {
    fn trigger(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn reg_read(t: &mut MmioTransport<Mem<Recorder>, Counter>, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

#[test]
fn requests_are_checked_and_raise_the_config_interrupt() {
    let mem = memory();
    let irq = Counter::default();
    let dev = Mem::new(REGION, REGION_SIZE, Recorder::default()).unwrap();
    let mut t = MmioTransport::new(dev, irq.clone(), mem).unwrap();
    let fired = || irq.0.load(Ordering::SeqCst);

    // Before the driver runs: taken, a new generation, but no interrupt.
    assert_eq!(
        MemControl::request(&mut t, 4 * MIB)
            .unwrap()
            .requested_bytes,
        4 * MIB
    );
    assert_eq!(reg_read(&mut t, reg::CONFIG_GENERATION), 1);
    assert_eq!(fired(), 0);

    let w = |t: &mut MmioTransport<_, _>, offset: u64, v: u32| t.write(offset, &v.to_le_bytes());
    w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
    w(&mut t, reg::DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1
    let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    w(&mut t, reg::STATUS, s);
    w(&mut t, reg::STATUS, s | status::DRIVER_OK);
    assert_eq!(
        reg_read(&mut t, reg::STATUS) & status::DRIVER_OK,
        status::DRIVER_OK
    );

    let grown = MemControl::request(&mut t, 256 * MIB).unwrap_err();
    assert_eq!(
        grown,
        MemError::TooBig {
            requested: 256 * MIB,
            region: REGION_SIZE
        }
    );
    assert_eq!(
        MemControl::request(&mut t, 3 * MIB),
        Err(MemError::Unaligned(3 * MIB))
    );
    assert_eq!(fired(), 0, "a refused request tells the driver nothing");
    assert_eq!(reg_read(&mut t, reg::CONFIG_GENERATION), 1);
    assert_eq!(MemControl::status(&t).requested_bytes, 4 * MIB);

    let s = MemControl::request(&mut t, REGION_SIZE).unwrap();
    assert_eq!(
        s,
        MemStatus {
            region_bytes: REGION_SIZE,
            requested_bytes: REGION_SIZE,
            plugged_bytes: 0
        }
    );
    assert_eq!(fired(), 1);
    assert_eq!(reg_read(&mut t, reg::INTERRUPT_STATUS), defs::INT_CONFIG);
    assert_eq!(reg_read(&mut t, reg::CONFIG_GENERATION), 2);
    let mut requested = [0u8; 8];
    t.read(reg::CONFIG + 48, &mut requested);
    assert_eq!(u64::from_le_bytes(requested), REGION_SIZE);
    // Shrinking (even to 0) is a request like any other.
    MemControl::request(&mut t, 0).unwrap();
    assert_eq!(fired(), 2);
}
