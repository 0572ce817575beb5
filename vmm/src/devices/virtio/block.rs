//! virtio-blk (virtio 1.2 §5.2): request parsing and execution against a
//! [`BlockBackend`] (a raw file in production, memory in tests), optionally read-only.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::defs::TYPE_BLOCK;
use super::{next_chain, return_used, Budget, VirtioDevice};
use crate::logging::LogLimiter;

/// §5.2.3 feature bits.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// §5.2.6 request types.
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// §5.2.6 status values.
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
pub const SECTOR_SIZE: u64 = 512;
/// §5.2.6: GET_ID answers with up to 20 bytes.
pub const ID_BYTES: usize = 20;
const QUEUE_SIZE: u16 = 256;
/// Largest request accepted; a guest asking for more gets IOERR, not a huge allocation.
pub const MAX_REQUEST_BYTES: u64 = 4 << 20;
const BOUNCE: usize = 64 << 10;

/// Where the bytes behind the disk live.
pub trait BlockBackend: Send {
    /// Size in bytes.
    fn size(&self) -> u64;
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn flush(&mut self) -> io::Result<()>;
}

/// A raw image file.
pub struct FileBackend {
    file: File,
    size: u64,
}

impl FileBackend {
    pub fn new(file: File) -> io::Result<Self> {
        let size = file.metadata()?.len();
        Ok(Self { file, size })
    }

    /// A host block device (or a file): its size is where it ends, which `fstat`
    /// gives as 0 for a device.
    pub fn device(mut file: File) -> io::Result<Self> {
        use std::io::Seek;
        let size = file.seek(io::SeekFrom::End(0))?;
        Ok(Self { file, size })
    }
}

/// The backend of a disk slot ([`DiskSlot`]): empty, 0 bytes, until the host puts a
/// disk in it while the VM runs. A microVM has no bus a device can join after boot, so
/// the slots are made at boot and filled later, as firecracker-containerd does with its
/// stub drives.
#[derive(Default)]
pub struct SlotBackend(Option<FileBackend>);

fn empty_slot() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the slot holds no disk")
}

impl BlockBackend for SlotBackend {
    fn size(&self) -> u64 {
        self.0.as_ref().map_or(0, |b| b.size)
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.as_mut().ok_or_else(empty_slot)?.read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0
            .as_mut()
            .ok_or_else(empty_slot)?
            .write_at(buf, offset)
    }
    fn flush(&mut self) -> io::Result<()> {
        match self.0.as_mut() {
            Some(b) => b.flush(),
            None => Ok(()),
        }
    }
}

impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// A disk in memory, for tests and fuzzing.
pub struct MemBackend(pub Vec<u8>);

impl BlockBackend for MemBackend {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let s = self
            .0
            .get(offset as usize..offset as usize + buf.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(s);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let s = self
            .0
            .get_mut(offset as usize..offset as usize + buf.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        s.copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Why a request was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlockError {
    #[error("The request chain has no room for a header and a status byte")]
    ShortChain,
    #[error("The request header is not readable guest memory")]
    Header,
    #[error("The status byte is not a 1-byte device-writable descriptor")]
    Status,
    #[error("A {0} request has a data descriptor in the wrong direction")]
    Direction(&'static str),
    #[error("The request moves {0} bytes, over the limit")]
    TooBig(u64),
    #[error("The request length {0} is not a whole number of sectors")]
    Unaligned(u64),
    #[error("Sectors {sector}+{len} bytes lie beyond the end of the disk")]
    OutOfRange { sector: u64, len: u64 },
    #[error("Write to a read-only disk")]
    ReadOnly,
    #[error("Request type {0} is not supported")]
    Unsupported(u32),
    #[error("Guest memory at {0:#x} is not accessible")]
    Memory(u64),
    #[error("Backend I/O failed: {0}")]
    Io(String),
}

/// One parsed request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub type_: u32,
    pub sector: u64,
    /// Data buffers (guest address, length) in chain order.
    pub data: Vec<(u64, u32)>,
    pub data_len: u64,
    pub status_addr: u64,
}

/// Splits a descriptor chain into header, data and status (§5.2.6), checking directions
/// and sizes but not the disk. The fuzz target drives this.
pub fn parse_request(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<Request, BlockError> {
    let descs: Vec<_> = chain.collect();
    let (first, rest) = descs.split_first().ok_or(BlockError::ShortChain)?;
    let (last, middle) = rest.split_last().ok_or(BlockError::ShortChain)?;
    if first.is_write_only() || first.len() < 16 {
        return Err(BlockError::Header);
    }
    let type_: u32 = mem.read_obj(first.addr()).map_err(|_| BlockError::Header)?;
    let sector: u64 = mem
        .read_obj(first.addr().unchecked_add_u64(8))
        .map_err(|_| BlockError::Header)?;
    if !last.is_write_only() || last.len() < 1 {
        return Err(BlockError::Status);
    }
    let data: Vec<(u64, u32)> = middle.iter().map(|d| (d.addr().0, d.len())).collect();
    let data_len: u64 = middle.iter().map(|d| u64::from(d.len())).sum();
    let want_write_only = match type_ {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID => Some(true),
        VIRTIO_BLK_T_OUT => Some(false),
        _ => None,
    };
    if let Some(w) = want_write_only {
        if middle.iter().any(|d| d.is_write_only() != w) {
            return Err(BlockError::Direction(if w { "read" } else { "write" }));
        }
    }
    if data_len > MAX_REQUEST_BYTES {
        return Err(BlockError::TooBig(data_len));
    }
    Ok(Request {
        type_,
        sector,
        data,
        data_len,
        status_addr: last.addr().0,
    })
}

/// `id` as GET_ID answers it: at most [`ID_BYTES`], zero-padded.
fn id_bytes(id: &str) -> [u8; ID_BYTES] {
    let mut bytes = [0u8; ID_BYTES];
    let n = id.len().min(ID_BYTES);
    bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
    bytes
}

trait AddrExt {
    fn unchecked_add_u64(self, n: u64) -> GuestAddress;
}
impl AddrExt for GuestAddress {
    fn unchecked_add_u64(self, n: u64) -> GuestAddress {
        GuestAddress(self.0.wrapping_add(n))
    }
}

/// Counters for what the device did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub errors: u64,
}

pub struct Block<B: BlockBackend> {
    backend: B,
    read_only: bool,
    /// Whether VIRTIO_BLK_F_RO is offered: fixed when the device is made (the driver
    /// reads it once, at its probe). A slot's disk put in read-only later is refused
    /// writes by [`Self::read_only`] alone.
    offer_ro: bool,
    id: [u8; ID_BYTES],
    config: [u8; 8],
    queue_sizes: [u16; 1],
    stats: BlockStats,
    log: LogLimiter,
}

impl<B: BlockBackend> Block<B> {
    pub fn new(backend: B, read_only: bool, id: &str) -> Self {
        let capacity = backend.size() / SECTOR_SIZE;
        Self {
            backend,
            read_only,
            offer_ro: read_only,
            id: id_bytes(id),
            config: capacity.to_le_bytes(),
            queue_sizes: [QUEUE_SIZE],
            stats: BlockStats::default(),
            log: LogLimiter::new("virtio-blk"),
        }
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Whether the disk refuses writes.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    pub fn stats(&self) -> BlockStats {
        self.stats
    }

    /// Executes `req`; returns the status and how many bytes were written to the guest
    /// before the status byte.
    fn execute(&mut self, mem: &GuestMemoryMmap, req: &Request) -> Result<u32, BlockError> {
        let in_range = |len: u64| {
            if !len.is_multiple_of(SECTOR_SIZE) {
                return Err(BlockError::Unaligned(len));
            }
            req.sector
                .checked_mul(SECTOR_SIZE)
                .and_then(|o| o.checked_add(len))
                .filter(|end| *end <= self.backend.size())
                .map(|_| req.sector * SECTOR_SIZE)
                .ok_or(BlockError::OutOfRange {
                    sector: req.sector,
                    len,
                })
        };
        let io = |e: io::Error| BlockError::Io(e.to_string());
        let mut bounce = vec![0u8; BOUNCE.min(req.data_len as usize)];
        match req.type_ {
            VIRTIO_BLK_T_IN => {
                let mut off = in_range(req.data_len)?;
                for &(addr, len) in &req.data {
                    let mut done = 0u64;
                    while done < u64::from(len) {
                        let n = (u64::from(len) - done).min(BOUNCE as u64) as usize;
                        self.backend.read_at(&mut bounce[..n], off).map_err(io)?;
                        mem.write_slice(&bounce[..n], GuestAddress(addr + done))
                            .map_err(|_| BlockError::Memory(addr + done))?;
                        done += n as u64;
                        off += n as u64;
                    }
                }
                self.stats.reads += 1;
                Ok(req.data_len as u32)
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return Err(BlockError::ReadOnly);
                }
                let mut off = in_range(req.data_len)?;
                for &(addr, len) in &req.data {
                    let mut done = 0u64;
                    while done < u64::from(len) {
                        let n = (u64::from(len) - done).min(BOUNCE as u64) as usize;
                        mem.read_slice(&mut bounce[..n], GuestAddress(addr + done))
                            .map_err(|_| BlockError::Memory(addr + done))?;
                        self.backend.write_at(&bounce[..n], off).map_err(io)?;
                        done += n as u64;
                        off += n as u64;
                    }
                }
                self.stats.writes += 1;
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                self.backend.flush().map_err(io)?;
                self.stats.flushes += 1;
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let mut written = 0usize;
                for &(addr, len) in &req.data {
                    let n = (len as usize).min(ID_BYTES - written);
                    mem.write_slice(&self.id[written..written + n], GuestAddress(addr))
                        .map_err(|_| BlockError::Memory(addr))?;
                    written += n;
                }
                Ok(written as u32)
            }
            t => Err(BlockError::Unsupported(t)),
        }
    }

    /// Handles one chain; returns the used length.
    fn handle_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> u32 {
        let req = match parse_request(mem, chain) {
            Ok(r) => r,
            Err(e) => {
                // No trustworthy status byte: complete the chain with nothing written.
                self.stats.errors += 1;
                if self.log.allow() {
                    log::warn!("virtio-blk: malformed request: {e}");
                }
                return 0;
            }
        };
        let (status, len) = match self.execute(mem, &req) {
            Ok(n) => (VIRTIO_BLK_S_OK, n),
            Err(e) => {
                self.stats.errors += 1;
                if self.log.allow() {
                    log::warn!("virtio-blk: request failed: {e}");
                }
                let s = if matches!(e, BlockError::Unsupported(_)) {
                    VIRTIO_BLK_S_UNSUPP
                } else {
                    VIRTIO_BLK_S_IOERR
                };
                (s, 0)
            }
        };
        match mem.write_obj(status, GuestAddress(req.status_addr)) {
            Ok(()) => len + 1,
            Err(_) => len,
        }
    }
}

impl<B: BlockBackend> VirtioDevice for Block<B> {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_BLK_F_FLUSH | if self.offer_ro { VIRTIO_BLK_F_RO } else { 0 }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let start = (offset as usize).min(self.config.len());
        let end = (start + data.len()).min(self.config.len());
        data[..end - start].copy_from_slice(&self.config[start..end]);
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let Some(queue) = queues.get_mut(index) else {
            return false;
        };
        let mut used = false;
        let mut budget = Budget::of(queue);
        while let Some(chain) = next_chain(queue, mem, &mut self.log, &mut budget) {
            let head = chain.head_index();
            let len = self.handle_chain(mem, chain);
            if !return_used(queue, mem, head, len, &mut self.log) {
                break;
            }
            used = true;
        }
        used && queue.needs_notification(mem).unwrap_or(true)
    }
}

/// Why a disk cannot go into a slot.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SlotError {
    #[error("the slot holds a disk already (serial {0:?})")]
    Occupied(String),
    #[error("serial {0:?} is empty, longer than 20 bytes or not [A-Za-z0-9-]")]
    Serial(String),
    #[error("the disk's size ({0} bytes) is not a whole number of 512-byte sectors")]
    Size(u64),
}

impl Block<SlotBackend> {
    /// An empty slot: no disk, capacity 0, writable when a disk comes.
    pub fn slot() -> Self {
        Block::new(SlotBackend::default(), false, "")
    }

    /// What the slot holds: its serial, or `None`.
    pub fn serial(&self) -> Option<String> {
        self.backend.0.as_ref().map(|_| {
            let end = self.id.iter().position(|b| *b == 0).unwrap_or(ID_BYTES);
            String::from_utf8_lossy(&self.id[..end]).into_owned()
        })
    }

    /// Puts `disk` in the empty slot, answering GET_ID with `serial`; its size becomes
    /// the capacity. The transport tells the driver ([`DiskSlot::insert`]).
    pub fn insert(
        &mut self,
        disk: FileBackend,
        read_only: bool,
        serial: &str,
    ) -> Result<u64, SlotError> {
        if let Some(s) = self.serial() {
            return Err(SlotError::Occupied(s));
        }
        let ok = !serial.is_empty()
            && serial.len() <= ID_BYTES
            && serial
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            return Err(SlotError::Serial(serial.to_owned()));
        }
        if !disk.size.is_multiple_of(SECTOR_SIZE) {
            return Err(SlotError::Size(disk.size));
        }
        let size = disk.size;
        self.backend = SlotBackend(Some(disk));
        self.read_only = read_only;
        self.id = id_bytes(serial);
        self.config = (size / SECTOR_SIZE).to_le_bytes();
        Ok(size)
    }

    /// Empties the slot: the disk is written back and closed, and every request after
    /// fails. Whether there was one.
    pub fn eject(&mut self) -> bool {
        let had = match self.backend.0.take() {
            Some(mut disk) => {
                // What the guest wrote reaches the device before the host has it back.
                if let Err(e) = disk.flush() {
                    log::warn!("virtio-blk: a disk taken out of its slot was not synced: {e}");
                }
                true
            }
            None => false,
        };
        self.read_only = false;
        self.id = [0; ID_BYTES];
        self.config = 0u64.to_le_bytes();
        had
    }
}

/// A disk slot on its transport, for the API: the driver learns of each change
/// through the configuration-change interrupt (the capacity moves; Linux's virtio-blk
/// re-reads it and the serial is asked afresh on each read of `serial`).
pub trait DiskSlot: Send {
    fn serial(&self) -> Option<String>;
    fn read_only(&self) -> bool;
    fn insert(
        &mut self,
        disk: FileBackend,
        read_only: bool,
        serial: &str,
    ) -> Result<u64, SlotError>;
    fn eject(&mut self) -> bool;
}

impl<I: super::Interrupt> DiskSlot for super::mmio::MmioTransport<Block<SlotBackend>, I> {
    fn serial(&self) -> Option<String> {
        self.device().serial()
    }

    fn read_only(&self) -> bool {
        self.device().is_read_only()
    }

    fn insert(
        &mut self,
        disk: FileBackend,
        read_only: bool,
        serial: &str,
    ) -> Result<u64, SlotError> {
        self.change_config(|b| b.insert(disk, read_only, serial))
    }

    fn eject(&mut self) -> bool {
        match self.change_config(|b| if b.eject() { Ok(()) } else { Err(()) }) {
            Ok(()) => true,
            Err(()) => false,
        }
    }
}
