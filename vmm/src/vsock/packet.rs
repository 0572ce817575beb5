//! The virtio-vsock packet header (§5.10.6) and moving packets between guest descriptor
//! chains and host buffers. Everything read from guest memory is validated here before
//! the rest of the device sees it; nothing is allocated from a guest-provided length.

use std::io::{Read, Write};

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

use super::defs::{MAX_PKT_PAYLOAD, VSOCK_HDR_SIZE};

/// Errors from turning a descriptor chain into a packet or back.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    #[error("Descriptor chain does not map to guest memory")]
    GuestMemory(#[source] virtio_queue::Error),
    #[error("Descriptor chain has {0} readable bytes, less than a packet header")]
    ShortHeader(usize),
    #[error("Header says {hdr_len} payload bytes but the chain holds {available}")]
    LenExceedsChain { hdr_len: u32, available: usize },
    #[error("Header says {0} payload bytes, more than the {MAX_PKT_PAYLOAD} byte limit")]
    LenTooLarge(u32),
    #[error("Descriptor chain has {0} writable bytes, too few for a packet header")]
    ShortRxBuffer(usize),
    #[error("Failed to copy packet to or from guest memory")]
    Copy(#[source] std::io::Error),
}

/// `struct virtio_vsock_hdr` in host byte order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl VsockHeader {
    /// Decodes the little-endian wire layout.
    pub fn from_bytes(b: &[u8; VSOCK_HDR_SIZE]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap_or_default());
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the little-endian wire layout.
    pub fn to_bytes(&self) -> [u8; VSOCK_HDR_SIZE] {
        let mut b = [0u8; VSOCK_HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Reads a guest→host packet from a tx chain: the header, then `hdr.len` payload bytes
/// into `payload` (which must hold [`MAX_PKT_PAYLOAD`] bytes). Returns the header and
/// the payload length.
///
/// The header may share a descriptor with the payload or not; the payload may span
/// descriptors. Trailing bytes beyond `hdr.len` are ignored.
pub fn read_tx_packet(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    payload: &mut [u8],
) -> Result<(VsockHeader, usize), PacketError> {
    let mut reader = chain.reader(mem).map_err(PacketError::GuestMemory)?;
    let available = reader.available_bytes();
    if available < VSOCK_HDR_SIZE {
        return Err(PacketError::ShortHeader(available));
    }
    let mut raw = [0u8; VSOCK_HDR_SIZE];
    reader.read_exact(&mut raw).map_err(PacketError::Copy)?;
    let hdr = VsockHeader::from_bytes(&raw);

    let len = hdr.len as usize;
    if len > MAX_PKT_PAYLOAD || len > payload.len() {
        return Err(PacketError::LenTooLarge(hdr.len));
    }
    let available = reader.available_bytes();
    if len > available {
        return Err(PacketError::LenExceedsChain {
            hdr_len: hdr.len,
            available,
        });
    }
    reader
        .read_exact(&mut payload[..len])
        .map_err(PacketError::Copy)?;
    Ok((hdr, len))
}

/// A host→guest packet being written into an rx chain. Created before the payload is
/// produced so that a chain unusable for a packet is rejected without consuming data.
pub struct RxSlot<'a> {
    writer: virtio_queue::Writer<'a>,
}

impl<'a> RxSlot<'a> {
    /// Checks that `chain` is writable guest memory with room for at least a header.
    pub fn new(
        mem: &'a GuestMemoryMmap,
        chain: DescriptorChain<&'a GuestMemoryMmap>,
    ) -> Result<Self, PacketError> {
        let writer = chain.writer(mem).map_err(PacketError::GuestMemory)?;
        let available = writer.available_bytes();
        if available < VSOCK_HDR_SIZE {
            return Err(PacketError::ShortRxBuffer(available));
        }
        Ok(Self { writer })
    }

    /// How much payload fits after the header, capped at [`MAX_PKT_PAYLOAD`].
    pub fn payload_capacity(&self) -> usize {
        (self.writer.available_bytes() - VSOCK_HDR_SIZE).min(MAX_PKT_PAYLOAD)
    }

    /// Writes `hdr` (with `len` set to `payload.len()`) and the payload; returns the
    /// number of bytes written, for the used ring.
    pub fn write(mut self, hdr: &VsockHeader, payload: &[u8]) -> Result<u32, PacketError> {
        let len = payload.len().min(self.payload_capacity());
        let hdr = VsockHeader {
            len: len as u32,
            ..*hdr
        };
        self.writer
            .write_all(&hdr.to_bytes())
            .and_then(|()| self.writer.write_all(&payload[..len]))
            .map_err(PacketError::Copy)?;
        Ok((VSOCK_HDR_SIZE + len) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_through_wire_layout() {
        let hdr = VsockHeader {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1234_5678,
            dst_port: 9,
            len: 77,
            type_: 1,
            op: 5,
            flags: 3,
            buf_alloc: 0x4_0000,
            fwd_cnt: 0xdead_beef,
        };
        let bytes = hdr.to_bytes();
        assert_eq!(&bytes[0..8], &3u64.to_le_bytes());
        assert_eq!(&bytes[28..30], &1u16.to_le_bytes());
        assert_eq!(VsockHeader::from_bytes(&bytes), hdr);
    }
}
