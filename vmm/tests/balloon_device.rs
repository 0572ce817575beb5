//! virtio-balloon's free page reporting against a fake driver: descriptor chains in
//! guest memory (`virtio_queue::mock`) over real guest RAM (the VMM's shared memfd), so a
//! reported range must really read back as zeros, and a hostile report is refused.

use cocoon_vmm::devices::virtio::balloon::*;
use cocoon_vmm::devices::virtio::VirtioDevice;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: u64 = 16 << 20;
const QSIZE: u16 = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
/// Where the "freed" pages are.
const FREED: u64 = 4 << 20;
const FREED_LEN: u32 = 2 << 20;

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

/// A balloon with its three queues in guest memory, the reporting one at index 2.
fn setup(mem: &GuestMemoryMmap) -> (MockSplitQueue<'_, GuestMemoryMmap>, Vec<Queue>) {
    let mock = MockSplitQueue::create(mem, GuestAddress(0x1_0000), QSIZE);
    let q = mock.create_queue::<Queue>().unwrap();
    let idle = |at: u64| {
        MockSplitQueue::create(mem, GuestAddress(at), QSIZE)
            .create_queue::<Queue>()
            .unwrap()
    };
    (mock, vec![idle(0x2_0000), idle(0x3_0000), q])
}

fn used_len(mem: &GuestMemoryMmap, mock: &MockSplitQueue<'_, GuestMemoryMmap>) -> (u16, u32) {
    let used = mock.used_addr().0;
    let idx: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
    let len: u32 = mem.read_obj(GuestAddress(used + 4 + 4)).unwrap();
    (idx, len)
}

#[test]
fn reported_pages_are_given_back_and_bad_ranges_refused() {
    let mem = cocoon_vmm::builder::test_memory(MEM).unwrap();
    mem.write_slice(&vec![0xAB; FREED_LEN as usize], GuestAddress(FREED))
        .unwrap();
    mem.write_obj(0xCDu8, GuestAddress(FREED + u64::from(FREED_LEN)))
        .unwrap();
    let (mock, mut queues) = setup(&mem);
    // One report: the freed range, an unaligned one, one past the end of guest RAM.
    mock.add_desc_chains(
        &[
            desc(FREED, FREED_LEN, F_WRITE | F_NEXT, 1),
            desc(FREED + u64::from(FREED_LEN) + 1, 4096, F_WRITE | F_NEXT, 2),
            desc(MEM, 4096, F_WRITE, 0),
        ],
        0,
    )
    .unwrap();
    let mut dev = Balloon::new(RemovePages);
    assert_eq!(dev.avail_features(), VIRTIO_BALLOON_F_REPORTING);
    dev.activate(VIRTIO_BALLOON_F_REPORTING, &queues, &mem)
        .unwrap();
    dev.process_queue(2, &mut queues, &mem);

    let mut back = vec![0xFFu8; FREED_LEN as usize];
    mem.read_slice(&mut back, GuestAddress(FREED)).unwrap();
    assert!(
        back.iter().all(|b| *b == 0),
        "the freed range still holds data"
    );
    let next: u8 = mem
        .read_obj(GuestAddress(FREED + u64::from(FREED_LEN)))
        .unwrap();
    assert_eq!(next, 0xCD, "a page next to the range was lost");
    assert_eq!(
        dev.stats(),
        BalloonStats {
            reported_bytes: u64::from(FREED_LEN),
            refused: 2
        }
    );
    // The report comes back to the driver, which waits for it.
    assert_eq!(used_len(&mem, &mock), (1, 0));
}

#[test]
fn without_the_feature_acked_nothing_is_given_back() {
    let mem = cocoon_vmm::builder::test_memory(MEM).unwrap();
    mem.write_slice(&[0xAB; 4096], GuestAddress(FREED)).unwrap();
    let (mock, mut queues) = setup(&mem);
    mock.add_desc_chains(&[desc(FREED, 4096, F_WRITE, 0)], 0)
        .unwrap();
    let mut dev = Balloon::new(RemovePages);
    dev.activate(0, &queues, &mem).unwrap();
    assert!(!dev.process_queue(2, &mut queues, &mem));
    let b: u8 = mem.read_obj(GuestAddress(FREED)).unwrap();
    assert_eq!(b, 0xAB);
    assert_eq!(dev.stats(), BalloonStats::default());
}

#[test]
fn the_device_never_asks_for_pages_and_keeps_what_the_driver_writes() {
    let mut dev = Balloon::new(RemovePages);
    let mut cfg = [0xFFu8; 8];
    dev.read_config(0, &mut cfg);
    assert_eq!(cfg, [0; 8], "num_pages and actual start at 0");
    dev.write_config(0, &[9, 9, 9, 9, 1, 2, 3, 4]);
    dev.read_config(0, &mut cfg);
    assert_eq!(
        cfg,
        [0, 0, 0, 0, 1, 2, 3, 4],
        "only `actual` is the driver's"
    );
    assert_eq!(dev.queue_max_sizes().len(), 3);
    assert_eq!(dev.device_type(), TYPE_BALLOON);
}
