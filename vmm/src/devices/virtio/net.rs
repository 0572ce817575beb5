//! virtio-net (virtio 1.2 §5.1) without offloads: Ethernet frames between the guest's
//! rx/tx queues and a [`NetBackend`] (a tap device in production, a socketpair in
//! tests). Frames from the host wait in a bounded queue while the guest has no rx
//! buffers, and are dropped beyond it, as a NIC with a full ring would.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::defs::TYPE_NET;
use super::{next_chain, return_used, Budget, VirtioDevice};
use crate::logging::LogLimiter;

/// §5.1.3: the device has a MAC address in config space.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// §5.1.6: `virtio_net_hdr` with VIRTIO_F_VERSION_1 (num_buffers included).
pub const NET_HDR_LEN: usize = 12;
/// Largest frame: 64 KiB plus an Ethernet header, the most a tap hands over.
pub const MAX_FRAME: usize = 65_562;
/// Host frames held while the guest posts no rx buffers.
pub const MAX_PENDING_RX: usize = 256;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const QUEUE_SIZE: u16 = 256;

/// Where frames go and come from.
pub trait NetBackend: AsRawFd + Send {
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// One frame into `buf`; `Ok(None)` when nothing is ready.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;
}

/// Errors opening a tap device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("Failed to open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    #[error("Tap name {0:?} is empty or longer than 15 bytes")]
    Name(String),
    #[error("Failed to attach to tap {0}")]
    SetIff(String, #[source] io::Error),
    #[error("Inherited fd {0} is not an open tap device")]
    NotATap(RawFd, #[source] io::Error),
}

/// A tap device (IFF_TAP | IFF_NO_PI), non-blocking.
pub struct Tap {
    file: File,
    name: String,
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tap {
    /// Opens (creating if needed) the tap interface `name`.
    pub fn open(name: &str) -> Result<Self, NetError> {
        if name.is_empty() || name.len() > 15 || name.contains('\0') {
            return Err(NetError::Name(name.into()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(NetError::OpenTun)?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an `ifreq`, which `IfReq` lays out (40 bytes,
        // name then flags); the fd is a freshly opened tun device we own.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
        if rc < 0 {
            return Err(NetError::SetIff(name.into(), io::Error::last_os_error()));
        }
        Ok(Self {
            file,
            name: name.into(),
        })
    }

    /// Takes over a tap fd inherited from the parent (open on /dev/net/tun and attached):
    /// it is checked to be a tap, then made non-blocking and close-on-exec.
    pub fn inherited(fd: RawFd) -> Result<Self, NetError> {
        let not_tap = |e| NetError::NotATap(fd, e);
        // SAFETY: F_GETFD only asks whether `fd` is open; nothing is touched.
        if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(not_tap(io::Error::from_raw_os_error(libc::EBADF)));
        }
        let mut req = IfReq {
            name: [0; 16],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF fills an `ifreq`, which `IfReq` lays out; on anything but an
        // attached tun/tap fd it fails (EBADFD/ENOTTY) without writing.
        if unsafe { libc::ioctl(fd, TUNGETIFF, &mut req) } < 0 {
            return Err(not_tap(io::Error::last_os_error()));
        }
        if req.flags & IFF_TAP == 0 || req.flags & IFF_NO_PI == 0 {
            return Err(not_tap(io::Error::other("not a tap with IFF_NO_PI")));
        }
        // SAFETY: `fd` is open (checked above), was handed to this process to own, and
        // nothing else here holds it.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: plain fcntl flag changes on the fd we now own.
        unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
        let len = req.name.iter().position(|&b| b == 0).unwrap_or(16);
        Ok(Self {
            file,
            name: String::from_utf8_lossy(&req.name[..len]).into_owned(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl NetBackend for Tap {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.file.write(frame).map(|_| ())
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.file.read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Counters for what the device did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    pub tx_frames: u64,
    pub tx_malformed: u64,
    pub rx_frames: u64,
    /// Host frames dropped: no room in the pending queue or in the guest's buffer.
    pub rx_dropped: u64,
}

pub struct Net<B: NetBackend> {
    backend: B,
    config: [u8; 6],
    queue_sizes: [u16; 2],
    pending: VecDeque<Vec<u8>>,
    buf: Box<[u8]>,
    stats: NetStats,
    log: LogLimiter,
}

impl<B: NetBackend> Net<B> {
    pub fn new(backend: B, mac: [u8; 6]) -> Self {
        Self {
            backend,
            config: mac,
            queue_sizes: [QUEUE_SIZE; 2],
            pending: VecDeque::new(),
            buf: vec![0u8; NET_HDR_LEN + MAX_FRAME].into_boxed_slice(),
            stats: NetStats::default(),
            log: LogLimiter::new("virtio-net"),
        }
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    fn warn(&mut self, msg: std::fmt::Arguments) {
        if self.log.allow() {
            log::warn!("virtio-net: {msg}");
        }
    }

    /// Gathers a tx chain into `buf`; returns the frame length after the header.
    fn gather(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Option<usize> {
        let mut len = 0usize;
        for d in chain {
            if d.is_write_only() {
                return None;
            }
            let n = d.len() as usize;
            let dst = self.buf.get_mut(len..len.checked_add(n)?)?;
            mem.read_slice(dst, d.addr()).ok()?;
            len += n;
        }
        len.checked_sub(NET_HDR_LEN)
    }

    fn process_tx(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        let mut budget = Budget::of(q);
        while let Some(chain) = next_chain(q, mem, &mut self.log, &mut budget) {
            let head = chain.head_index();
            match self.gather(mem, chain) {
                Some(n) => {
                    let frame = &self.buf[NET_HDR_LEN..NET_HDR_LEN + n];
                    match self.backend.send(frame) {
                        Ok(()) => self.stats.tx_frames += 1,
                        Err(e) => self.warn(format_args!("tx to host failed: {e}")),
                    }
                }
                None => {
                    self.stats.tx_malformed += 1;
                    self.warn(format_args!("dropping a malformed tx chain"));
                }
            }
            if !return_used(q, mem, head, 0, &mut self.log) {
                break;
            }
            used = true;
        }
        used && q.needs_notification(mem).unwrap_or(true)
    }

    /// Reads whatever the host has into the pending queue.
    fn drain_backend(&mut self) {
        let mut frame = vec![0u8; MAX_FRAME];
        loop {
            match self.backend.recv(&mut frame) {
                Ok(Some(n)) => {
                    if self.pending.len() >= MAX_PENDING_RX {
                        self.stats.rx_dropped += 1;
                    } else {
                        self.pending.push_back(frame[..n].to_vec());
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    self.warn(format_args!("rx from host failed: {e}"));
                    break;
                }
            }
        }
    }

    /// Writes header + frame across a device-writable chain; returns bytes written.
    fn scatter(
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        frame: &[u8],
    ) -> Option<u32> {
        let mut hdr = [0u8; NET_HDR_LEN];
        hdr[10] = 1; // num_buffers
        let total = NET_HDR_LEN + frame.len();
        let mut written = 0usize;
        for d in chain {
            if written == total {
                break;
            }
            if !d.is_write_only() {
                return None;
            }
            let n = (d.len() as usize).min(total - written);
            let mut off = 0usize;
            while off < n {
                let pos = written + off;
                let (src, m) = if pos < NET_HDR_LEN {
                    let m = (NET_HDR_LEN - pos).min(n - off);
                    (&hdr[pos..pos + m], m)
                } else {
                    let p = pos - NET_HDR_LEN;
                    let m = n - off;
                    (&frame[p..p + m], m)
                };
                mem.write_slice(src, d.addr().unchecked_add_off(off as u64))
                    .ok()?;
                off += m;
            }
            written += n;
        }
        (written == total).then_some(total as u32)
    }

    fn fill_rx(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        let mut budget = Budget::of(q);
        while !self.pending.is_empty() {
            let Some(chain) = next_chain(q, mem, &mut self.log, &mut budget) else {
                break;
            };
            let head = chain.head_index();
            let frame = self.pending.pop_front().unwrap_or_default();
            let len = match Self::scatter(mem, chain, &frame) {
                Some(n) => {
                    self.stats.rx_frames += 1;
                    n
                }
                None => {
                    self.stats.rx_dropped += 1;
                    self.warn(format_args!(
                        "rx buffer unusable for a {}-byte frame",
                        frame.len()
                    ));
                    0
                }
            };
            if !return_used(q, mem, head, len, &mut self.log) {
                break;
            }
            used = true;
        }
        used && q.needs_notification(mem).unwrap_or(true)
    }
}

trait AddOff {
    fn unchecked_add_off(self, n: u64) -> vm_memory::GuestAddress;
}
impl AddOff for vm_memory::GuestAddress {
    fn unchecked_add_off(self, n: u64) -> vm_memory::GuestAddress {
        vm_memory::GuestAddress(self.0.wrapping_add(n))
    }
}

impl<B: NetBackend> VirtioDevice for Net<B> {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_NET_F_MAC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let start = (offset as usize).min(self.config.len());
        let end = (start + data.len()).min(self.config.len());
        data[..end - start].copy_from_slice(&self.config[start..end]);
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let mut notify = false;
        if index == TX_QUEUE {
            if let Some(q) = queues.get_mut(TX_QUEUE) {
                notify |= self.process_tx(q, mem);
            }
        }
        if let Some(q) = queues.get_mut(RX_QUEUE) {
            notify |= self.fill_rx(q, mem);
        }
        notify
    }

    fn host_fd(&self) -> Option<RawFd> {
        Some(self.backend.as_raw_fd())
    }

    fn process_host(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        self.drain_backend();
        queues
            .get_mut(RX_QUEUE)
            .is_some_and(|q| self.fill_rx(q, mem))
    }

    fn reset(&mut self) {
        self.pending.clear();
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parsing() {
        assert_eq!(parse_mac("02:00:00:00:00:01"), Some([2, 0, 0, 0, 0, 1]));
        assert_eq!(parse_mac("02:00:00:00:00"), None);
        assert_eq!(parse_mac("02:00:00:00:00:01:02"), None);
        assert_eq!(parse_mac("zz:00:00:00:00:01"), None);
    }

    #[test]
    fn tap_names_are_checked_before_opening() {
        assert!(matches!(Tap::open(""), Err(NetError::Name(_))));
        // An fd that is open but no tap (a pipe) is refused with its number.
        let (r, _w) = nix::unistd::pipe().unwrap();
        let raw = std::os::fd::IntoRawFd::into_raw_fd(r);
        assert!(matches!(Tap::inherited(raw), Err(NetError::NotATap(fd, _)) if fd == raw));
        assert!(matches!(Tap::inherited(1), Err(NetError::NotATap(1, _))));
        assert!(matches!(
            Tap::open("a-name-that-is-too-long"),
            Err(NetError::Name(_))
        ));
    }
}
