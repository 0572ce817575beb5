//! virtio-blk against a fake driver: descriptor chains built in mock guest memory
//! (`virtio_queue::mock`), the device processing them against an in-memory disk.

use cocoon_vmm::devices::virtio::block::*;
use cocoon_vmm::devices::virtio::VirtioDevice;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const QSIZE: u16 = 16;
const MEM_SIZE: usize = 0x40_0000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const BAD: u64 = 0x1000_0000;

struct Driver<B: BlockBackend = MemBackend> {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    dev: Block<B>,
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    used_seen: u16,
    next_desc: u16,
}

impl Driver {
    fn new(read_only: bool) -> Self {
        let mut disk = vec![0u8; 64 * 512];
        for (i, s) in disk.chunks_mut(512).enumerate() {
            s.fill(i as u8);
        }
        Driver::with(Block::new(MemBackend(disk), read_only, "disk-0"))
    }
}

impl<B: BlockBackend> Driver<B> {
    fn with(dev: Block<B>) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let (q, [desc, avail, used]) = cocoon_vmm::devices::virtio::test_queue(&mem, 0, QSIZE);
        Self {
            mem,
            queues: vec![q],
            dev,
            desc,
            avail,
            used,
            avail_idx: 0,
            used_seen: 0,
            next_desc: 0,
        }
    }

    fn header(&self, type_: u32, sector: u64) {
        self.mem.write_obj(type_, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// Posts a chain and runs the device; returns the used entries it produced.
    fn submit(&mut self, descs: &[(u64, u32, u16)]) -> Vec<(u16, u32)> {
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = (self.next_desc + i as u16) % QSIZE;
            let flags = if i + 1 == descs.len() {
                flags
            } else {
                flags | F_NEXT
            };
            let at = self.desc + u64::from(idx) * 16;
            self.mem.write_obj(addr, GuestAddress(at)).unwrap();
            self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            self.mem
                .write_obj((idx + 1) % QSIZE, GuestAddress(at + 14))
                .unwrap();
        }
        self.next_desc = (self.next_desc + descs.len() as u16) % QSIZE;
        let slot = self.avail + 4 + u64::from(self.avail_idx % QSIZE) * 2;
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        self.dev.process_queue(0, &mut self.queues, &self.mem);
        let idx: u16 = self.mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = self.used + 4 + u64::from(self.used_seen % QSIZE) * 8;
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id as u16, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn read_req(&mut self, sector: u64, len: u32) -> Vec<(u16, u32)> {
        self.header(VIRTIO_BLK_T_IN, sector);
        self.submit(&[(HDR, 16, 0), (DATA, len, F_WRITE), (STATUS, 1, F_WRITE)])
    }
}

#[test]
fn reads_sectors_into_guest_memory() {
    let mut d = Driver::new(false);
    let used = d.read_req(3, 1024);
    assert_eq!(used, vec![(0, 1025)]);
    assert_eq!(d.status(), VIRTIO_BLK_S_OK);
    let mut buf = [0u8; 1024];
    d.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert!(buf[..512].iter().all(|b| *b == 3));
    assert!(buf[512..].iter().all(|b| *b == 4));
}

#[test]
fn writes_reach_the_backend_and_flush_succeeds() {
    let mut d = Driver::new(false);
    d.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    d.header(VIRTIO_BLK_T_OUT, 5);
    let used = d.submit(&[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, F_WRITE)]);
    assert_eq!(used, vec![(0, 1)]);
    assert_eq!(d.status(), VIRTIO_BLK_S_OK);
    assert!(d.dev.backend().0[5 * 512..6 * 512]
        .iter()
        .all(|b| *b == 0xab));
    d.header(VIRTIO_BLK_T_FLUSH, 0);
    d.submit(&[(HDR, 16, 0), (STATUS, 1, F_WRITE)]);
    assert_eq!(d.status(), VIRTIO_BLK_S_OK);
    assert_eq!(d.dev.stats().flushes, 1);
}

#[test]
fn get_id_returns_the_serial() {
    let mut d = Driver::new(false);
    d.header(VIRTIO_BLK_T_GET_ID, 0);
    let used = d.submit(&[(HDR, 16, 0), (DATA, 20, F_WRITE), (STATUS, 1, F_WRITE)]);
    assert_eq!(used[0].1, 21);
    let mut id = [0u8; 6];
    d.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"disk-0");
}

#[test]
fn read_only_disk_refuses_writes() {
    let mut d = Driver::new(true);
    assert_ne!(d.dev.avail_features() & VIRTIO_BLK_F_RO, 0);
    d.header(VIRTIO_BLK_T_OUT, 0);
    d.submit(&[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, F_WRITE)]);
    assert_eq!(d.status(), VIRTIO_BLK_S_IOERR);
    assert_eq!(d.dev.backend().0[0], 0);
}

#[test]
fn out_of_range_sectors_and_odd_lengths_are_ioerr() {
    let mut d = Driver::new(false);
    d.read_req(64, 512);
    assert_eq!(d.status(), VIRTIO_BLK_S_IOERR);
    d.read_req(u64::MAX / 256, 512);
    assert_eq!(d.status(), VIRTIO_BLK_S_IOERR);
    d.read_req(0, 100);
    assert_eq!(d.status(), VIRTIO_BLK_S_IOERR);
    d.header(77, 0);
    d.submit(&[(HDR, 16, 0), (STATUS, 1, F_WRITE)]);
    assert_eq!(d.status(), VIRTIO_BLK_S_UNSUPP);
}

#[test]
fn malformed_chains_complete_without_touching_the_disk() {
    let mut d = Driver::new(false);
    // Header only: no status descriptor.
    d.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(d.submit(&[(HDR, 16, 0)]), vec![(0, 0)]);
    // Status not writable.
    assert_eq!(d.submit(&[(HDR, 16, 0), (STATUS, 1, 0)])[0].1, 0);
    assert_eq!(d.status(), 0xff);
    // Header too short, or device-writable.
    assert_eq!(d.submit(&[(HDR, 8, 0), (STATUS, 1, F_WRITE)])[0].1, 0);
    assert_eq!(
        d.submit(&[(HDR, 16, F_WRITE), (STATUS, 1, F_WRITE)])[0].1,
        0
    );
    // A read whose data buffer is device-readable.
    assert_eq!(
        d.submit(&[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, F_WRITE)])[0].1,
        0
    );
    // A write whose data buffer is device-writable.
    d.header(VIRTIO_BLK_T_OUT, 0);
    d.submit(&[(HDR, 16, 0), (DATA, 512, F_WRITE), (STATUS, 1, F_WRITE)]);
    assert_eq!(d.status(), 0xff);
    // Oversized request.
    d.header(VIRTIO_BLK_T_IN, 0);
    d.submit(&[(HDR, 16, 0), (DATA, 8 << 20, F_WRITE), (STATUS, 1, F_WRITE)]);
    assert_eq!(d.status(), 0xff);
    assert_eq!(d.dev.stats().errors, 7);
    assert!(d.dev.backend().0[..512].iter().all(|b| *b == 0));
}

#[test]
fn out_of_range_guest_addresses_are_errors_not_crashes() {
    let mut d = Driver::new(false);
    // Header outside guest memory.
    d.submit(&[(BAD, 16, 0), (STATUS, 1, F_WRITE)]);
    // Data outside guest memory: IOERR.
    d.read_req(0, 512);
    assert_eq!(d.status(), VIRTIO_BLK_S_OK);
    d.header(VIRTIO_BLK_T_IN, 0);
    d.submit(&[(HDR, 16, 0), (BAD, 512, F_WRITE), (STATUS, 1, F_WRITE)]);
    assert_eq!(d.status(), VIRTIO_BLK_S_IOERR);
    // Data straddling the end of guest memory.
    d.header(VIRTIO_BLK_T_IN, 0);
    d.submit(&[
        (HDR, 16, 0),
        (MEM_SIZE as u64 - 256, 512, F_WRITE),
        (STATUS, 1, F_WRITE),
    ]);
    assert_eq!(d.status(), VIRTIO_BLK_S_IOERR);
    // Status outside guest memory: completed, nothing written.
    d.header(VIRTIO_BLK_T_IN, 0);
    let used = d.submit(&[(HDR, 16, 0), (DATA, 512, F_WRITE), (BAD, 1, F_WRITE)]);
    assert_eq!(used[0].1, 512);
}

#[test]
fn queue_wraps_around_many_times() {
    let mut d = Driver::new(false);
    // 3-descriptor chains in a 16-entry queue: indices and rings wrap repeatedly, and
    // the u16 avail/used indices wrap past 65535.
    for i in 0..70_000u32 {
        let sector = u64::from(i % 64);
        let used = d.read_req(sector, 512);
        assert_eq!(used.len(), 1, "request {i}");
        assert_eq!(d.status(), VIRTIO_BLK_S_OK);
        let b: u8 = d.mem.read_obj(GuestAddress(DATA + 511)).unwrap();
        assert_eq!(b, sector as u8);
    }
    assert_eq!(d.dev.stats().reads, 70_000);
}

#[test]
fn corrupt_avail_index_does_not_spin() {
    let mut d = Driver::new(false);
    // avail.idx far ahead of what the queue can hold.
    d.mem.write_obj(1000u16, GuestAddress(d.avail + 2)).unwrap();
    assert!(!d.dev.process_queue(0, &mut d.queues, &d.mem));
    // Unknown queue index.
    assert!(!d.dev.process_queue(5, &mut d.queues, &d.mem));
}

#[test]
fn config_space_reports_capacity() {
    let d = Driver::new(false);
    let mut cap = [0u8; 8];
    d.dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 64);
    let mut past = [0xffu8; 4];
    d.dev.read_config(100, &mut past);
    assert_eq!(
        past, [0xff; 4],
        "reads past the end leave the buffer to the transport"
    );
}

/// A host disk in a file: sector `i` filled with byte `i`.
fn host_disk(sectors: usize) -> std::fs::File {
    let mut f = tempfile::tempfile().unwrap();
    let bytes: Vec<u8> = (0..sectors).flat_map(|i| [i as u8; 512]).collect();
    std::io::Write::write_all(&mut f, &bytes).unwrap();
    f
}

fn capacity<B: BlockBackend>(d: &Driver<B>) -> u64 {
    let mut cap = [0u8; 8];
    d.dev.read_config(0, &mut cap);
    u64::from_le_bytes(cap)
}

fn get_id<B: BlockBackend>(d: &mut Driver<B>) -> Vec<u8> {
    d.mem.write_slice(&[0u8; 20], GuestAddress(DATA)).unwrap();
    d.header(VIRTIO_BLK_T_GET_ID, 0);
    d.submit(&[(HDR, 16, 0), (DATA, 20, F_WRITE), (STATUS, 1, F_WRITE)]);
    let mut id = [0u8; 20];
    d.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    id.iter().copied().take_while(|b| *b != 0).collect()
}

#[test]
fn an_empty_slot_has_no_capacity_and_fails_every_read() {
    let mut d = Driver::with(Block::slot());
    assert_eq!(capacity(&d), 0);
    assert_eq!(d.dev.avail_features() & VIRTIO_BLK_F_RO, 0);
    assert_eq!(d.dev.serial(), None);
    d.read_req(0, 512);
    assert_eq!(d.status(), VIRTIO_BLK_S_IOERR);
    assert_eq!(get_id(&mut d), b"");
    // A flush of nothing is not an error: the driver flushes on its own schedule.
    d.header(VIRTIO_BLK_T_FLUSH, 0);
    d.submit(&[(HDR, 16, 0), (STATUS, 1, F_WRITE)]);
    assert_eq!(d.status(), VIRTIO_BLK_S_OK);
}

#[test]
fn a_disk_put_in_a_slot_is_read_written_and_named_then_ejected() {
    let mut d = Driver::with(Block::slot());
    let file = host_disk(8);
    let disk = FileBackend::device(file.try_clone().unwrap()).unwrap();
    assert_eq!(d.dev.insert(disk, false, "cocoon-disk7"), Ok(8 * 512));
    assert_eq!(capacity(&d), 8);
    assert_eq!(get_id(&mut d), b"cocoon-disk7");
    assert_eq!(d.dev.serial().as_deref(), Some("cocoon-disk7"));
    d.read_req(6, 512);
    assert_eq!(d.status(), VIRTIO_BLK_S_OK);
    let mut buf = [0u8; 512];
    d.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert!(buf.iter().all(|b| *b == 6));
    d.mem.write_slice(&[0xcd; 512], GuestAddress(DATA)).unwrap();
    d.header(VIRTIO_BLK_T_OUT, 2);
    d.submit(&[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, F_WRITE)]);
    assert_eq!(d.status(), VIRTIO_BLK_S_OK);
    let mut on_host = [0u8; 512];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut on_host, 2 * 512).unwrap();
    assert!(
        on_host.iter().all(|b| *b == 0xcd),
        "the write reached the host's disk"
    );
    // Past the end of this disk, though the slot could take a larger one.
    d.read_req(8, 512);
    assert_eq!(d.status(), VIRTIO_BLK_S_IOERR);

    assert!(d.dev.eject());
    assert!(!d.dev.eject(), "ejecting an empty slot says it was empty");
    assert_eq!(capacity(&d), 0);
    assert_eq!(get_id(&mut d), b"");
    d.read_req(0, 512);
    assert_eq!(d.status(), VIRTIO_BLK_S_IOERR);
}

#[test]
fn a_read_only_disk_in_a_slot_refuses_writes_though_the_slot_offered_none() {
    let mut d = Driver::with(Block::slot());
    let file = host_disk(4);
    let disk = FileBackend::device(file.try_clone().unwrap()).unwrap();
    d.dev.insert(disk, true, "ro").unwrap();
    assert!(d.dev.is_read_only());
    // Features were read at boot: the slot's stay as they were.
    assert_eq!(d.dev.avail_features() & VIRTIO_BLK_F_RO, 0);
    d.mem.write_slice(&[0xee; 512], GuestAddress(DATA)).unwrap();
    d.header(VIRTIO_BLK_T_OUT, 1);
    d.submit(&[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, F_WRITE)]);
    assert_eq!(d.status(), VIRTIO_BLK_S_IOERR);
    let mut on_host = [0u8; 512];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut on_host, 512).unwrap();
    assert!(
        on_host.iter().all(|b| *b == 1),
        "the host's disk is unchanged"
    );
    // The next disk in the slot is writable again.
    d.dev.eject();
    let disk = FileBackend::device(file.try_clone().unwrap()).unwrap();
    d.dev.insert(disk, false, "rw").unwrap();
    d.header(VIRTIO_BLK_T_OUT, 1);
    d.submit(&[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, F_WRITE)]);
    assert_eq!(d.status(), VIRTIO_BLK_S_OK);
}

#[test]
fn a_slot_refuses_a_second_disk_a_bad_serial_and_a_ragged_size() {
    let mut d = Driver::with(Block::slot());
    let disk = || FileBackend::device(host_disk(2)).unwrap();
    for bad in ["", "has space", "a-serial-longer-than-20", "snow\u{2603}"] {
        assert_eq!(
            d.dev.insert(disk(), false, bad),
            Err(SlotError::Serial(bad.into()))
        );
    }
    let mut ragged = host_disk(2);
    std::io::Write::write_all(&mut ragged, &[1; 100]).unwrap();
    assert_eq!(
        d.dev
            .insert(FileBackend::device(ragged).unwrap(), false, "x"),
        Err(SlotError::Size(1124))
    );
    assert_eq!(capacity(&d), 0, "a refused disk changes nothing");
    d.dev.insert(disk(), false, "first").unwrap();
    assert_eq!(
        d.dev.insert(disk(), false, "second"),
        Err(SlotError::Occupied("first".into()))
    );
    assert_eq!(get_id(&mut d), b"first");
}

#[derive(Clone, Default)]
struct Counter(std::sync::Arc<std::sync::atomic::AtomicUsize>);
impl cocoon_vmm::devices::virtio::Interrupt for Counter {
    fn trigger(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn a_slot_on_its_transport_tells_a_running_driver_of_each_change() {
    use cocoon_vmm::devices::bus::BusDevice;
    use cocoon_vmm::devices::virtio::defs::{reg, status};
    use cocoon_vmm::devices::virtio::mmio::MmioTransport;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let irq = Counter::default();
    let mut t = MmioTransport::new(Block::slot(), irq.clone(), mem).unwrap();
    let fired = || irq.0.load(std::sync::atomic::Ordering::SeqCst);
    let r = |t: &mut MmioTransport<_, _>, off: u64| {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    };
    let w = |t: &mut MmioTransport<_, _>, off: u64, v: u32| t.write(off, &v.to_le_bytes());
    w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
    w(&mut t, reg::DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1
    let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    w(&mut t, reg::STATUS, s);
    w(&mut t, reg::STATUS, s | status::DRIVER_OK);
    let generation = r(&mut t, reg::CONFIG_GENERATION);

    let disk = FileBackend::device(host_disk(16)).unwrap();
    assert_eq!(DiskSlot::insert(&mut t, disk, false, "d1"), Ok(16 * 512));
    assert_eq!(fired(), 1, "the configuration-change interrupt");
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS) & 2, 2);
    assert_eq!(r(&mut t, reg::CONFIG_GENERATION), generation + 1);
    assert_eq!(r(&mut t, reg::CONFIG), 16, "the capacity, in sectors");
    assert_eq!(DiskSlot::serial(&t).as_deref(), Some("d1"));

    // A refused disk tells the driver nothing.
    let other = FileBackend::device(host_disk(2)).unwrap();
    assert!(DiskSlot::insert(&mut t, other, false, "d2").is_err());
    assert_eq!(fired(), 1);
    assert_eq!(r(&mut t, reg::CONFIG_GENERATION), generation + 1);

    assert!(DiskSlot::eject(&mut t));
    assert_eq!(fired(), 2);
    assert_eq!(r(&mut t, reg::CONFIG), 0);
    assert!(!DiskSlot::eject(&mut t), "an empty slot");
    assert_eq!(fired(), 2, "nothing changed, nothing told");
}
