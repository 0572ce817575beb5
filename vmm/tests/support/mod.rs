//! A fake guest driver for exercising the vsock device: virtqueues in mock guest memory
//! (laid out by `virtio_queue::mock`), a hybrid muxer on real Unix sockets in a temp dir.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cocoon_vmm::vsock::defs::*;
use cocoon_vmm::vsock::{VsockBackend, VsockConfig, VsockDevice, VsockHeader, VsockMuxer};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const GUEST_CID: u64 = 3;
pub const QSIZE: u16 = 64;
pub const MEM_SIZE: usize = 0x100_0000;
const BUF_START: u64 = 0x10_0000;
pub const DEADLINE: Duration = Duration::from_secs(5);
/// A guest address outside guest memory.
pub const BAD_ADDR: u64 = 0x2000_0000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// Addresses of one split virtqueue and the driver's bookkeeping for it.
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    used_seen: u16,
    next_desc: u16,
}

pub struct Packet {
    pub hdr: VsockHeader,
    pub data: Vec<u8>,
}

pub struct TestVm {
    pub mem: GuestMemoryMmap,
    pub rxq: Queue,
    pub txq: Queue,
    pub dev: VsockDevice<VsockMuxer>,
    pub uds_path: PathBuf,
    rx: Ring,
    tx: Ring,
    next_buf: u64,
    /// rx head descriptor index -> buffer address, for buffers the guest posted.
    rx_bufs: HashMap<u16, u64>,
    pub rx_outstanding: usize,
    /// Packets received but not yet claimed by a test.
    pub inbox: Vec<Packet>,
    _dir: tempfile::TempDir,
}

pub fn hdr(op: u16, src_port: u32, dst_port: u32) -> VsockHeader {
    VsockHeader {
        src_cid: GUEST_CID,
        dst_cid: VSOCK_HOST_CID,
        src_port,
        dst_port,
        type_: VSOCK_TYPE_STREAM,
        op,
        buf_alloc: 256 * 1024,
        ..Default::default()
    }
}

impl TestVm {
    pub fn new() -> Self {
        Self::with_config(|_| {})
    }

    pub fn with_config(tweak: impl FnOnce(&mut VsockConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let uds_path = dir.path().join("vsock.sock");
        let mut config = VsockConfig::new(&uds_path);
        config.guest_cid = GUEST_CID;
        tweak(&mut config);
        config.validate().unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let (rxq, rx) = Self::make_queue(&mem, 0);
        let (txq, tx) = Self::make_queue(&mem, 0x1_0000);
        let dev = VsockDevice::new(GUEST_CID, VsockMuxer::new(config).unwrap());
        Self {
            mem,
            rxq,
            txq,
            dev,
            uds_path,
            rx,
            tx,
            next_buf: BUF_START,
            rx_bufs: HashMap::new(),
            rx_outstanding: 0,
            inbox: Vec::new(),
            _dir: dir,
        }
    }

    fn make_queue(mem: &GuestMemoryMmap, start: u64) -> (Queue, Ring) {
        let (queue, [desc, avail, used]) =
            cocoon_vmm::devices::virtio::test_queue(mem, start, QSIZE);
        let ring = Ring {
            desc,
            avail,
            used,
            avail_idx: 0,
            used_seen: 0,
            next_desc: 0,
        };
        (queue, ring)
    }

    /// Guest memory for one buffer; wraps around, buffers are consumed long before.
    pub fn alloc(&mut self, len: usize) -> u64 {
        let len = (len as u64 + 15) & !15;
        if self.next_buf + len > MEM_SIZE as u64 {
            self.next_buf = BUF_START;
        }
        let addr = self.next_buf;
        self.next_buf += len.max(16);
        addr
    }

    /// Posts a chain of `(addr, len, flags)` descriptors; returns the head index.
    fn push_chain(mem: &GuestMemoryMmap, ring: &mut Ring, descs: &[(u64, u32, u16)]) -> u16 {
        let head = ring.next_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = (ring.next_desc + i as u16) % QSIZE;
            let last = i + 1 == descs.len();
            let flags = if last { flags } else { flags | F_NEXT };
            let next = (idx + 1) % QSIZE;
            let at = GuestAddress(ring.desc + u64::from(idx) * 16);
            mem.write_obj(addr.to_le(), at).unwrap();
            mem.write_obj(len.to_le(), GuestAddress(at.0 + 8)).unwrap();
            mem.write_obj(flags.to_le(), GuestAddress(at.0 + 12))
                .unwrap();
            mem.write_obj(next.to_le(), GuestAddress(at.0 + 14))
                .unwrap();
        }
        ring.next_desc = (ring.next_desc + descs.len() as u16) % QSIZE;
        let slot = ring.avail + 4 + u64::from(ring.avail_idx % QSIZE) * 2;
        mem.write_obj(head.to_le(), GuestAddress(slot)).unwrap();
        ring.avail_idx = ring.avail_idx.wrapping_add(1);
        mem.write_obj(ring.avail_idx.to_le(), GuestAddress(ring.avail + 2))
            .unwrap();
        head
    }

    /// New used-ring entries `(head, len)` of a queue.
    fn take_used(mem: &GuestMemoryMmap, ring: &mut Ring) -> Vec<(u16, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(ring.used + 2)).unwrap();
        let mut out = Vec::new();
        while ring.used_seen != idx {
            let at = ring.used + 4 + u64::from(ring.used_seen % QSIZE) * 8;
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id as u16, len));
            ring.used_seen = ring.used_seen.wrapping_add(1);
        }
        out
    }

    /// Puts a raw chain on the tx queue and lets the device process it. Returns how many
    /// tx chains the device completed.
    pub fn send_raw(&mut self, descs: &[(u64, u32, u16)]) -> usize {
        Self::push_chain(&self.mem, &mut self.tx, descs);
        self.dev.process_tx(&mut self.txq, &self.mem).unwrap();
        Self::take_used(&self.mem, &mut self.tx).len()
    }

    /// Sends a well-formed packet from the guest: header and payload in separate
    /// descriptors, as Linux does.
    pub fn send(&mut self, mut h: VsockHeader, payload: &[u8]) {
        h.len = payload.len() as u32;
        let haddr = self.alloc(VSOCK_HDR_SIZE);
        self.mem
            .write_slice(&h.to_bytes(), GuestAddress(haddr))
            .unwrap();
        let mut descs = vec![(haddr, VSOCK_HDR_SIZE as u32, 0)];
        if !payload.is_empty() {
            let daddr = self.alloc(payload.len());
            self.mem.write_slice(payload, GuestAddress(daddr)).unwrap();
            descs.push((daddr, payload.len() as u32, 0));
        }
        assert_eq!(self.send_raw(&descs), 1, "tx chain not completed");
    }

    /// Posts one device-writable rx buffer.
    pub fn post_rx(&mut self, len: u32) {
        let addr = self.alloc(len as usize);
        self.post_rx_at(addr, len);
    }

    pub fn post_rx_at(&mut self, addr: u64, len: u32) {
        let head = Self::push_chain(&self.mem, &mut self.rx, &[(addr, len, F_WRITE)]);
        self.rx_bufs.insert(head, addr);
        self.rx_outstanding += 1;
    }

    /// Runs host events and fills rx buffers, keeping `min_bufs` posted; collects
    /// delivered packets into the inbox.
    pub fn pump_with(&mut self, min_bufs: usize) {
        while self.rx_outstanding < min_bufs {
            self.post_rx(4096);
        }
        self.dev.backend_mut().process_host_events();
        self.dev.process_rx(&mut self.rxq, &self.mem).unwrap();
        for (head, len) in Self::take_used(&self.mem, &mut self.rx) {
            self.rx_outstanding -= 1;
            let addr = self
                .rx_bufs
                .remove(&head)
                .expect("used an unknown rx buffer");
            if len == 0 {
                continue;
            }
            assert!(
                len as usize >= VSOCK_HDR_SIZE,
                "rx packet shorter than a header"
            );
            let mut raw = [0u8; VSOCK_HDR_SIZE];
            self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
            let hdr = VsockHeader::from_bytes(&raw);
            assert_eq!(hdr.len as usize + VSOCK_HDR_SIZE, len as usize);
            let mut data = vec![0u8; hdr.len as usize];
            self.mem
                .read_slice(&mut data, GuestAddress(addr + VSOCK_HDR_SIZE as u64))
                .unwrap();
            self.inbox.push(Packet { hdr, data });
        }
    }

    pub fn pump(&mut self) {
        self.pump_with(8);
    }

    /// Waits for host-side readiness (or a short timeout), then pumps.
    fn wait_and_pump(&mut self) {
        let fd = self.dev.backend().as_raw_fd();
        // SAFETY: the muxer owns `fd` and outlives this call.
        let bfd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let mut fds = [PollFd::new(bfd.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(20u8));
        self.pump();
    }

    /// Pumps until a packet matching `pred` arrives; returns it and removes it from the
    /// inbox.
    pub fn expect_pkt(&mut self, what: &str, pred: impl Fn(&Packet) -> bool) -> Packet {
        let deadline = Instant::now() + DEADLINE;
        loop {
            self.pump();
            if let Some(i) = self.inbox.iter().position(&pred) {
                return self.inbox.remove(i);
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            self.wait_and_pump();
        }
    }

    /// Pumps until the device has nothing more to say; returns all packets collected.
    pub fn drain(&mut self) -> Vec<Packet> {
        for _ in 0..4 {
            self.pump();
        }
        std::mem::take(&mut self.inbox)
    }

    pub fn expect_op(&mut self, op: u16) -> Packet {
        self.expect_pkt(&format!("op {op}"), |p| p.hdr.op == op)
    }

    /// Connects a host client and sends its CONNECT line.
    pub fn host_connect(&self, port: u32) -> UnixStream {
        let mut s = UnixStream::connect(&self.uds_path).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        writeln!(s, "CONNECT {port}").unwrap();
        s
    }

    /// Host connect + guest accept; returns the client stream and the host port.
    pub fn establish(&mut self, guest_port: u32, guest_buf_alloc: u32) -> (UnixStream, u32) {
        let mut s = self.host_connect(guest_port);
        let req = self.expect_op(VSOCK_OP_REQUEST);
        assert_eq!(req.hdr.dst_port, guest_port);
        let host_port = req.hdr.src_port;
        let mut resp = hdr(VSOCK_OP_RESPONSE, guest_port, host_port);
        resp.buf_alloc = guest_buf_alloc;
        self.send(resp, &[]);
        let line = read_line(&mut s);
        assert_eq!(line, format!("OK {host_port}\n"));
        (s, host_port)
    }
}

/// Reads one `\n`-terminated line byte by byte (so nothing after it is consumed).
pub fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 {
        line.push(b[0]);
        if b[0] == b'\n' {
            break;
        }
    }
    String::from_utf8(line).unwrap()
}

/// Whether the peer closed `s` (EOF) within the deadline.
pub fn sees_eof(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// Reads exactly `n` bytes (with the stream's timeout).
pub fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    buf
}
