//! KVM's own per-vCPU counters (binary statistics, `KVM_GET_STATS_FD`, Linux 5.14+): the
//! exits KVM handles in the kernel without returning to the VMM (interrupt windows, MSRs
//! it emulates, halts, instruction emulation, page faults), which `exit_stats` cannot see.
//! Under nested virtualization these are the expensive ones.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use kvm_ioctls::VcpuFd;

/// `_IO(KVMIO, 0xce)`: returns a file descriptor for the vCPU's binary statistics.
const KVM_GET_STATS_FD: libc::c_ulong = 0xae_ce;
/// `kvm_stats_header`: flags, name_size, num_desc, id_offset, desc_offset, data_offset.
const HEADER_SIZE: usize = 24;
/// `kvm_stats_desc` before its name: flags, exponent, size, offset, bucket_size.
const DESC_FIXED: usize = 16;
const TYPE_MASK: u32 = 0xf;
const TYPE_CUMULATIVE: u32 = 0;
const UNIT_MASK: u32 = 0xf0;
const UNIT_NONE: u32 = 0;
/// Sanity bounds on what the kernel describes.
const MAX_DESCS: usize = 1024;
const MAX_NAME: usize = 256;

/// One vCPU's statistics file and the plain counters it holds.
#[derive(Debug)]
pub struct KvmStatsFd {
    file: File,
    /// Name and byte offset in the file of each cumulative, unit-less counter.
    counters: Vec<(String, u64)>,
}

impl KvmStatsFd {
    /// Opens the vCPU's statistics, or None where KVM has none (older kernels).
    pub fn open(vcpu: &VcpuFd) -> Option<KvmStatsFd> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new descriptor or -1.
        let fd = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_GET_STATS_FD as _) };
        if fd < 0 {
            return None;
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        let counters = parse_descriptors(&file)?;
        Some(KvmStatsFd { file, counters })
    }

    /// Current values of the counters.
    pub fn read(&self) -> Vec<(String, u64)> {
        let mut buf = [0u8; 8];
        self.counters
            .iter()
            .filter_map(|(name, off)| {
                self.file.read_exact_at(&mut buf, *off).ok()?;
                Some((name.clone(), u64::from_le_bytes(buf)))
            })
            .collect()
    }
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn parse_descriptors(file: &File) -> Option<Vec<(String, u64)>> {
    let mut header = [0u8; HEADER_SIZE];
    file.read_exact_at(&mut header, 0).ok()?;
    let name_size = u32_at(&header, 4)? as usize;
    let num_desc = u32_at(&header, 8)? as usize;
    let desc_offset = u64::from(u32_at(&header, 16)?);
    let data_offset = u64::from(u32_at(&header, 20)?);
    if num_desc > MAX_DESCS || name_size > MAX_NAME {
        return None;
    }
    let desc_size = DESC_FIXED + name_size;
    let mut descs = vec![0u8; desc_size * num_desc];
    file.read_exact_at(&mut descs, desc_offset).ok()?;
    Some(parse_descs(&descs, desc_size, data_offset))
}

/// The cumulative, unit-less single-value counters among `descs`, with the byte offset
/// of each value.
fn parse_descs(descs: &[u8], desc_size: usize, data_offset: u64) -> Vec<(String, u64)> {
    descs
        .chunks_exact(desc_size)
        .filter_map(|d| {
            let flags = u32_at(d, 0)?;
            let size = u16::from_le_bytes(d.get(6..8)?.try_into().ok()?);
            let offset = u64::from(u32_at(d, 8)?);
            if flags & TYPE_MASK != TYPE_CUMULATIVE || flags & UNIT_MASK != UNIT_NONE || size != 1 {
                return None;
            }
            let name = &d[DESC_FIXED..];
            let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
            let name = std::str::from_utf8(&name[..end]).ok()?.to_owned();
            Some((name, data_offset + offset))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(flags: u32, size: u16, offset: u32, name: &str, name_size: usize) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&0i16.to_le_bytes());
        d.extend_from_slice(&size.to_le_bytes());
        d.extend_from_slice(&offset.to_le_bytes());
        d.extend_from_slice(&0u32.to_le_bytes());
        let mut n = name.as_bytes().to_vec();
        n.resize(name_size, 0);
        d.extend_from_slice(&n);
        d
    }

    #[test]
    fn only_plain_counters_are_kept() {
        let mut descs = desc(0, 1, 0, "exits", 32);
        descs.extend(desc(1, 1, 8, "instant_thing", 32)); // instant: skipped
        descs.extend(desc(0x20, 1, 16, "halt_poll_ns", 32)); // seconds: skipped
        descs.extend(desc(0, 32, 24, "histogram", 32)); // several values: skipped
        descs.extend(desc(0, 1, 280, "irq_window_exits", 32));
        assert_eq!(
            parse_descs(&descs, 48, 1000),
            vec![("exits".into(), 1000), ("irq_window_exits".into(), 1280)]
        );
    }
}
