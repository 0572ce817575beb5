//! virtio-net against a fake driver (mock guest memory and queues) and a socketpair
//! standing in for the tap: frames both ways, pending and dropped host frames, and
//! malformed or out-of-range chains.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;

use cocoon_vmm::devices::virtio::net::*;
use cocoon_vmm::devices::virtio::VirtioDevice;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const QSIZE: u16 = 16;
const F_WRITE: u16 = 2;
const F_NEXT: u16 = 1;

/// One end of a datagram socketpair: frame boundaries survive, like a tap's.
struct Pair(UnixDatagram);

impl AsRawFd for Pair {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl NetBackend for Pair {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.0.send(frame).map(|_| ())
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.0.recv(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    used_seen: u16,
    next: u16,
}

struct Driver {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    rings: Vec<Ring>,
    dev: Net<Pair>,
    host: UnixDatagram,
}

impl Driver {
    fn new() -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let mut queues = Vec::new();
        let mut rings = Vec::new();
        for base in [0u64, 0x1_0000] {
            let (q, [desc, avail, used]) =
                cocoon_vmm::devices::virtio::test_queue(&mem, base, QSIZE);
            queues.push(q);
            rings.push(Ring {
                desc,
                avail,
                used,
                avail_idx: 0,
                used_seen: 0,
                next: 0,
            });
        }
        let (a, b) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        Self {
            mem,
            queues,
            rings,
            dev: Net::new(Pair(a), [2, 0, 0, 0, 0, 1]),
            host: b,
        }
    }

    fn post(&mut self, q: usize, descs: &[(u64, u32, u16)]) {
        let r = &mut self.rings[q];
        let head = r.next;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = (r.next + i as u16) % QSIZE;
            let flags = if i + 1 == descs.len() {
                flags
            } else {
                flags | F_NEXT
            };
            let at = r.desc + u64::from(idx) * 16;
            self.mem.write_obj(addr, GuestAddress(at)).unwrap();
            self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            self.mem
                .write_obj((idx + 1) % QSIZE, GuestAddress(at + 14))
                .unwrap();
        }
        r.next = (r.next + descs.len() as u16) % QSIZE;
        let slot = r.avail + 4 + u64::from(r.avail_idx % QSIZE) * 2;
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        r.avail_idx = r.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(r.avail_idx, GuestAddress(r.avail + 2))
            .unwrap();
    }

    fn used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let r = &mut self.rings[q];
        let idx: u16 = self.mem.read_obj(GuestAddress(r.used + 2)).unwrap();
        let mut out = Vec::new();
        while r.used_seen != idx {
            let at = r.used + 4 + u64::from(r.used_seen % QSIZE) * 8;
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id as u16, len));
            r.used_seen = r.used_seen.wrapping_add(1);
        }
        out
    }

    fn notify(&mut self, q: usize) -> bool {
        self.dev.process_queue(q, &mut self.queues, &self.mem)
    }

    fn host_ready(&mut self) -> bool {
        self.dev.process_host(&mut self.queues, &self.mem)
    }
}

#[test]
fn tx_strips_the_header_and_sends_the_frame() {
    let mut d = Driver::new();
    d.mem
        .write_slice(&[0xee; 12], GuestAddress(0x10_0000))
        .unwrap();
    d.mem
        .write_slice(b"frame-one", GuestAddress(0x10_000c))
        .unwrap();
    d.mem
        .write_slice(b"+tail", GuestAddress(0x20_0000))
        .unwrap();
    // Header and frame in one descriptor, the rest in a second.
    d.post(1, &[(0x10_0000, 21, 0), (0x20_0000, 5, 0)]);
    assert!(d.notify(1));
    assert_eq!(d.used(1), vec![(0, 0)]);
    let mut buf = [0u8; 64];
    let n = d.host.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"frame-one+tail");
    assert_eq!(d.dev.stats().tx_frames, 1);
}

#[test]
fn rx_delivers_header_and_frame_across_descriptors() {
    let mut d = Driver::new();
    d.post(0, &[(0x10_0000, 8, F_WRITE), (0x20_0000, 100, F_WRITE)]);
    d.host.send(b"hello-guest").unwrap();
    assert!(d.host_ready());
    assert_eq!(d.used(0), vec![(0, 12 + 11)]);
    let mut hdr = [0u8; 12];
    d.mem
        .read_slice(&mut hdr[..8], GuestAddress(0x10_0000))
        .unwrap();
    d.mem
        .read_slice(&mut hdr[8..], GuestAddress(0x20_0000))
        .unwrap();
    assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 1, "num_buffers");
    let mut frame = [0u8; 11];
    d.mem
        .read_slice(&mut frame, GuestAddress(0x20_0004))
        .unwrap();
    assert_eq!(&frame, b"hello-guest");
}

#[test]
fn host_frames_wait_for_buffers_then_overflow_is_dropped() {
    let mut d = Driver::new();
    for i in 0..(MAX_PENDING_RX + 10) {
        if d.host.send(&[i as u8; 60]).is_err() {
            // The socket buffer filled first: drain into the device and go on.
            d.dev.process_host(&mut d.queues, &d.mem);
            d.host.send(&[i as u8; 60]).unwrap();
        }
    }
    assert!(!d.host_ready(), "no buffers yet: nothing to signal");
    assert!(d.dev.stats().rx_dropped >= 10);
    // Buffers arrive: the oldest pending frame goes first.
    d.post(0, &[(0x10_0000, 2048, F_WRITE)]);
    assert!(d.notify(0));
    let b: u8 = d.mem.read_obj(GuestAddress(0x10_000c)).unwrap();
    assert_eq!(b, 0);
}

#[test]
fn malformed_chains_are_dropped_and_completed() {
    let mut d = Driver::new();
    // tx: shorter than the header, and a device-writable descriptor.
    d.post(1, &[(0x10_0000, 4, 0)]);
    d.post(1, &[(0x10_0000, 64, F_WRITE)]);
    // tx: out of guest memory.
    d.post(1, &[(0x1000_0000, 64, 0)]);
    // tx: bigger than any frame.
    d.post(1, &[(0x10_0000, 0x20_0000, 0)]);
    d.notify(1);
    assert_eq!(d.used(1).len(), 4);
    assert_eq!(d.dev.stats().tx_malformed, 4);
    // rx: device-readable, too small, out of memory.
    d.post(0, &[(0x10_0000, 2048, 0)]);
    d.post(0, &[(0x10_0000, 16, F_WRITE)]);
    d.post(0, &[(0x1000_0000, 2048, F_WRITE)]);
    for _ in 0..3 {
        d.host.send(&[7u8; 100]).unwrap();
    }
    d.host_ready();
    assert_eq!(d.used(0), vec![(0, 0), (1, 0), (2, 0)]);
    assert_eq!(d.dev.stats().rx_dropped, 3);
    let mut buf = [0u8; 8];
    assert!(
        d.host.recv(&mut buf).is_err(),
        "nothing was sent to the host"
    );
}

#[test]
fn queue_wraps_around() {
    let mut d = Driver::new();
    for i in 0..70_000u32 {
        d.post(0, &[(0x10_0000, 256, F_WRITE)]);
        d.host.send(&i.to_le_bytes()).unwrap();
        d.host_ready();
        assert_eq!(d.used(0).len(), 1, "frame {i}");
        let got: u32 = d.mem.read_obj(GuestAddress(0x10_000c)).unwrap();
        assert_eq!(got, i);
    }
}

#[test]
fn config_space_is_the_mac() {
    let d = Driver::new();
    let mut mac = [0u8; 6];
    d.dev.read_config(0, &mut mac);
    assert_eq!(mac, [2, 0, 0, 0, 0, 1]);
    assert_ne!(d.dev.avail_features() & VIRTIO_NET_F_MAC, 0);
}
