//! Fuzz entry points, one per parser a guest can reach: virtio-blk requests, vsock tx
//! packets, virtio-net chains, free page reports, virtio-mem requests and the
//! virtio-mmio register file. `vmm/fuzz` (cargo-fuzz, nightly) and the
//! stable `tests/fuzz_smoke.rs` both drive these, so they stay built and exercised.
//!
//! Each input describes a descriptor table, an avail ring and raw guest memory bytes;
//! the device must complete or drop every chain without panicking.

use std::os::fd::{AsRawFd, RawFd};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;
use crate::devices::virtio::balloon::{Balloon, Discard, VIRTIO_BALLOON_F_REPORTING};
use crate::devices::virtio::block::{Block, MemBackend};
use crate::devices::virtio::mem::{Mem, BLOCK_SIZE};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::{Net, NetBackend};
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::vsock::{VsockBackend, VsockDevice, VsockHeader};

const MEM_SIZE: usize = 0x10_0000;
const QSIZE: u16 = 16;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const DATA: u64 = 0x1_0000;

/// Reads fields off the front of the input, zero-filled when it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
}

/// Builds guest memory and a ready queue from the input: up to 16 descriptors with
/// arbitrary addresses (some beyond guest memory), lengths, flags and next indices, an
/// avail ring, and the rest of the input as data at `DATA`.
fn queue_from(data: &[u8]) -> (GuestMemoryMmap, Queue) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mut inp = Input(data);
    let ndesc = (inp.u8() % (QSIZE as u8 + 1)) as u64;
    for i in 0..ndesc {
        // Mostly inside the data area, sometimes anywhere in (and past) memory.
        let raw = inp.u32();
        let addr = if raw & 1 == 0 {
            DATA + u64::from(raw >> 1) % 0x1_0000
        } else {
            u64::from(raw) * 16
        };
        let len = u32::from(inp.u16());
        let flags = u16::from(inp.u8() & 0x7);
        let next = u16::from(inp.u8()) % (QSIZE + 2);
        let at = DESC + i * 16;
        let _ = mem.write_obj(addr, GuestAddress(at));
        let _ = mem.write_obj(len, GuestAddress(at + 8));
        let _ = mem.write_obj(flags, GuestAddress(at + 12));
        let _ = mem.write_obj(next, GuestAddress(at + 14));
    }
    let navail = inp.u8() % (QSIZE as u8 + 1);
    for i in 0..u64::from(navail) {
        let head = u16::from(inp.u8()) % (QSIZE + 2);
        let _ = mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * i));
    }
    let idx = if inp.u8() == 0xff {
        inp.u16()
    } else {
        u16::from(navail)
    };
    let _ = mem.write_obj(idx, GuestAddress(AVAIL + 2));
    let _ = mem.write_slice(&inp.0[..inp.0.len().min(0x1_0000)], GuestAddress(DATA));

    let mut q = Queue::new(QSIZE).unwrap();
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    (mem, q)
}

/// virtio-blk: parse and execute whatever chains the input describes.
pub fn block_request(data: &[u8]) {
    let (mem, q) = queue_from(data);
    let mut queues = vec![q];
    let mut dev = Block::new(
        MemBackend(vec![0u8; 16 * 512]),
        data.first() == Some(&0),
        "f",
    );
    dev.process_queue(0, &mut queues, &mem);
    // Run twice: the second pass sees the ring state the first one left.
    dev.process_queue(0, &mut queues, &mem);
}

/// A backend that accepts everything and answers every packet with one of its own.
struct EchoBackend {
    evt: EventFd,
    pending: Vec<VsockHeader>,
}

impl AsRawFd for EchoBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }
}

impl VsockBackend for EchoBackend {
    fn send_pkt(&mut self, hdr: &VsockHeader, payload: &[u8]) {
        assert_eq!(
            hdr.len as usize,
            payload.len(),
            "backend got a short payload"
        );
        if self.pending.len() < 64 {
            self.pending.push(*hdr);
        }
    }
    fn recv_pkt(&mut self, payload: &mut [u8]) -> Option<VsockHeader> {
        let mut h = self.pending.pop()?;
        h.len = h.len.min(payload.len() as u32);
        Some(h)
    }
    fn has_pending_rx(&self) -> bool {
        !self.pending.is_empty()
    }
    fn process_host_events(&mut self) {
        let _ = self.evt.read();
    }
    fn wake(&self) {
        let _ = self.evt.write(1);
    }
}

/// virtio-vsock: the input's chains as tx packets, then again as rx buffers.
pub fn vsock_tx(data: &[u8]) {
    let backend = EchoBackend {
        evt: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        pending: Vec::new(),
    };
    let mut dev = VsockDevice::new(3, backend);
    let (mem, mut q) = queue_from(data);
    let _ = dev.process_tx(&mut q, &mem);
    let (mem, mut q) = queue_from(data);
    let _ = dev.process_rx(&mut q, &mem);
}

/// virtio-net: the input's chains as tx frames, then as rx buffers for a host frame.
pub fn net_chains(data: &[u8]) {
    let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    let mut dev = Net::new(DatagramBackend(a), [2, 0, 0, 0, 0, 1]);
    let (mem, q) = queue_from(data);
    let mut queues = vec![Queue::new(QSIZE).unwrap(), q];
    dev.process_queue(1, &mut queues, &mem);
    let (mem, q) = queue_from(data);
    queues[0] = q;
    let _ = b.send(&data[..data.len().min(1500)]);
    dev.process_host(&mut queues, &mem);
}

struct DatagramBackend(std::os::unix::net::UnixDatagram);

impl AsRawFd for DatagramBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl NetBackend for DatagramBackend {
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        // A full socket buffer is the host dropping frames, which is allowed.
        let _ = self.0.send(frame);
        Ok(())
    }
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        Ok(self.0.recv(buf).ok())
    }
}

struct NoIrq;
impl Interrupt for NoIrq {
    fn trigger(&self) {}
}

/// virtio-mmio: a sequence of register reads and writes of any width and offset.
pub fn mmio_registers(data: &[u8]) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let dev = Block::new(MemBackend(vec![0u8; 4096]), false, "f");
    let mut t = MmioTransport::new(dev, NoIrq, mem).unwrap();
    let mut inp = Input(data);
    while !inp.0.is_empty() {
        let op = inp.u8();
        let offset = u64::from(inp.u16() & 0x1ff);
        let width = [1usize, 2, 4, 8][usize::from(op >> 6)];
        let value = inp.u32().to_le_bytes();
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&value);
        if op & 1 == 0 {
            t.write(offset, &buf[..width]);
        } else {
            t.read(offset, &mut buf[..width]);
        }
    }
}

/// virtio-balloon: the input's chains as free page reports on the reporting queue. Only
/// whole pages inside guest memory may reach the discard (which checks, and panics
/// otherwise: a finding).
pub fn balloon_reports(data: &[u8]) {
    let (mem, q) = queue_from(data);
    let base = mem
        .get_host_address(GuestAddress(0))
        .map(|p| p as usize)
        .unwrap();
    let mut dev = Balloon::new(InsideGuestRam {
        base,
        size: MEM_SIZE,
    });
    let mut queues = vec![Queue::new(QSIZE).unwrap(), Queue::new(QSIZE).unwrap(), q];
    let _ = dev.activate(VIRTIO_BALLOON_F_REPORTING, &queues, &mem);
    dev.process_queue(2, &mut queues, &mem);
}

/// virtio-mem: the input's chains as requests to a 16-block region the host has asked
/// some of (the input's first byte). Whatever the guest asks, it never has more plugged
/// than the host asked for.
pub fn mem_requests(data: &[u8]) {
    let (asked, rest) = data.split_first().map_or((0, data), |(b, r)| (*b, r));
    let (mem, q) = queue_from(rest);
    // Past the fuzz guest's RAM: a give-back finds no memory there and is logged.
    let mut dev = Mem::new(0x20_0000, 16 * BLOCK_SIZE, NoDiscard).unwrap();
    dev.request(u64::from(asked % 17) * BLOCK_SIZE).unwrap();
    let mut queues = vec![q];
    let _ = dev.activate(0, &queues, &mem);
    dev.process_queue(0, &mut queues, &mem);
    let s = dev.status();
    assert!(
        s.plugged_bytes <= s.requested_bytes,
        "{} bytes plugged, {} asked",
        s.plugged_bytes,
        s.requested_bytes
    );
}

/// A discard that must never be reached (nothing of the device's region is mapped).
struct NoDiscard;

impl Discard for NoDiscard {
    fn discard(&mut self, _: *mut u8, len: usize) -> Result<(), String> {
        panic!("a discard of {len} bytes outside guest memory");
    }
}

/// A discard that only checks what it is given: whole pages of the guest RAM mapping.
struct InsideGuestRam {
    base: usize,
    size: usize,
}

impl Discard for InsideGuestRam {
    fn discard(&mut self, host: *mut u8, len: usize) -> Result<(), String> {
        let at = host as usize;
        assert!(
            at >= self.base
                && at + len <= self.base + self.size
                && (at - self.base).is_multiple_of(4096)
                && len.is_multiple_of(4096)
                && len > 0,
            "a discard of {len} bytes at offset {:#x} of guest RAM",
            at.wrapping_sub(self.base)
        );
        Ok(())
    }
}

/// One fuzz entry point.
pub type Target = fn(&[u8]);

/// All targets, by name, for the smoke test and the fuzz crate.
pub const TARGETS: &[(&str, Target)] = &[
    ("block_request", block_request),
    ("vsock_tx", vsock_tx),
    ("mmio_registers", mmio_registers),
    ("net_chains", net_chains),
    ("balloon_reports", balloon_reports),
    ("mem_requests", mem_requests),
];
