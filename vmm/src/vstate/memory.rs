//! Guest RAM: one shared file (so a vhost-user backend can map the same pages; see
//! [`ram_file`] for which file), or a template's memory file mapped copy-on-write
//! ([`RamSource::Template`]), mapped into the VMM with a PROT_NONE guard page on each
//! side of every region, so a device that walks off the end of guest memory faults
//! instead of reading VMM heap. A virtio-mem region, where the VM has one, is one more
//! region on a shared file of its own ([`GuestMemory::add_hotplug_region`]).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use super::ram_file::{self, HugePages};
use crate::arch::layout;

/// Errors while creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("Failed to create the guest memory memfd")]
    Memfd(#[source] std::io::Error),
    #[error("Failed to size the guest memory memfd")]
    Truncate(#[source] std::io::Error),
    #[error("Failed to reserve address space for guest memory")]
    Reserve(#[source] std::io::Error),
    #[error("Failed to map guest memory")]
    Map(#[source] std::io::Error),
    #[error("Failed to describe a guest memory region")]
    Region(#[source] vm_memory::mmap::MmapRegionError),
    #[error("Guest memory regions overlap")]
    Collection(#[source] vm_memory::GuestRegionCollectionError),
    #[error("Guest memory size {0} is not a multiple of 4 KiB")]
    Unaligned(u64),
    #[error(transparent)]
    HugeTmpfs(#[from] ram_file::HugeTmpfsError),
    #[error("The inherited guest RAM descriptor {0} is not a regular file")]
    NotAFile(i32),
    #[error("The template's memory file holds {0} bytes; the VM has {1}")]
    TemplateSize(u64, u64),
}

/// Where guest RAM comes from.
#[derive(Debug)]
pub enum RamSource {
    /// Made here, with huge pages as asked.
    Make(HugePages),
    /// A file handed over by whoever started us (the shim, which can mount where a
    /// jailed VMM cannot); it is sized here.
    Inherited(File),
    /// A snapshot's memory file (`vstate::snapshot`), mapped copy-on-write: what the
    /// guest writes stays in this process, the file is never changed, and VMs restored
    /// from the same file share every page none of them wrote.
    Template(File),
}

const PAGE_SIZE: usize = 4096;

/// Guest memory plus the file behind it.
pub struct GuestMemory {
    pub mem: GuestMemoryMmap,
    /// RAM's file, shared with vhost-user backends; the offset of a RAM region in this
    /// file is its offset in the concatenation of [`layout::ram_ranges`]. (The virtio-mem
    /// region's file is its own region's `file_offset`.)
    pub memfd: File,
}

/// Creates `mem_size` bytes of guest RAM on a memfd (tests, and tools that need memory
/// without a VM).
pub fn create(mem_size: u64) -> Result<GuestMemory, MemoryError> {
    create_from(mem_size, RamSource::Make(HugePages::Off))
}

fn memfd(name: &std::ffi::CStr) -> Result<File, MemoryError> {
    // SAFETY: the name is a valid NUL-terminated string and the flags are valid; the
    // returned fd is checked and then owned by `File`.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// What a RAM file is for (its memfd's name and the log line).
#[derive(Clone, Copy)]
enum RamUse {
    /// The RAM the guest boots with.
    Boot,
    /// The virtio-mem region.
    Hotplug,
}

/// The file for `source`, and whether to ask for huge pages on it; logs the choice.
fn ram_file(what: RamUse, mem_size: u64, source: RamSource) -> Result<(File, bool), MemoryError> {
    let mib = mem_size >> 20;
    let (name, what) = match what {
        RamUse::Boot => (c"cocoon-guest-ram", "guest RAM"),
        RamUse::Hotplug => (c"cocoon-hotplug-ram", "virtio-mem region"),
    };
    match source {
        RamSource::Template(file) => {
            log::info!("{what}: {mib} MiB copy-on-write over the template's memory");
            Ok((file, false))
        }
        RamSource::Inherited(file) => {
            let meta = file.metadata().map_err(MemoryError::Memfd)?;
            if !meta.file_type().is_file() {
                return Err(MemoryError::NotAFile(file.as_raw_fd()));
            }
            log::info!("{what}: {mib} MiB on the inherited file");
            Ok((file, true))
        }
        RamSource::Make(HugePages::Off) => {
            log::info!("{what}: {mib} MiB on a memfd, huge pages off");
            Ok((memfd(name)?, false))
        }
        RamSource::Make(mode) => match ram_file::huge_tmpfs_file(mem_size) {
            Ok(file) => {
                log::info!("{what}: {mib} MiB on a huge-page tmpfs of its own");
                Ok((file, true))
            }
            Err(e) if mode == HugePages::Auto => {
                let cause = std::error::Error::source(&e)
                    .map(|c| format!(": {c}"))
                    .unwrap_or_default();
                log::info!(
                    "{what}: {mib} MiB on a memfd, huge pages only as the host's shmem \
                     THP allows ({e}{cause})"
                );
                Ok((memfd(name)?, true))
            }
            Err(e) => Err(e.into()),
        },
    }
}

/// Creates `mem_size` bytes of guest RAM laid out by [`layout::ram_ranges`], on the file
/// `source` says.
///
/// The mappings live until the process exits: guest memory is handed to vCPU and device
/// threads by clone, and one VM is one process, so unmapping early could only turn a
/// stale clone into a use-after-free.
pub fn create_from(mem_size: u64, source: RamSource) -> Result<GuestMemory, MemoryError> {
    if !mem_size.is_multiple_of(PAGE_SIZE as u64) {
        return Err(MemoryError::Unaligned(mem_size));
    }
    let private = matches!(source, RamSource::Template(_));
    let (memfd, huge) = ram_file(RamUse::Boot, mem_size, source)?;
    if private {
        let len = memfd.metadata().map_err(MemoryError::Memfd)?.len();
        if len != mem_size {
            return Err(MemoryError::TemplateSize(len, mem_size));
        }
    } else {
        memfd.set_len(mem_size).map_err(MemoryError::Truncate)?;
    }
    let flags = if private {
        libc::MAP_PRIVATE
    } else {
        libc::MAP_SHARED
    };

    let mut regions = Vec::new();
    let mut file_offset = 0u64;
    for (start, size) in layout::ram_ranges(mem_size) {
        regions.push(map_region(&memfd, file_offset, start, size, huge, flags)?);
        file_offset += size;
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Collection)?;
    Ok(GuestMemory { mem, memfd })
}

impl GuestMemory {
    /// Adds the virtio-mem region (`devices::virtio::mem`): `size` bytes at guest address
    /// `start`, on a shared file of its own made as `huge` says. It is guest memory like
    /// RAM from the start (a KVM memory slot, in the table vhost-user backends map), so
    /// plugging a block needs nothing from KVM or a backend; pages the guest never
    /// touches cost the host nothing. Call before anything clones `mem`.
    pub fn add_hotplug_region(
        &mut self,
        start: u64,
        size: u64,
        huge: HugePages,
    ) -> Result<(), MemoryError> {
        if !size.is_multiple_of(PAGE_SIZE as u64) {
            return Err(MemoryError::Unaligned(size));
        }
        let (file, huge) = ram_file(RamUse::Hotplug, size, RamSource::Make(huge))?;
        file.set_len(size).map_err(MemoryError::Truncate)?;
        let region = map_region(&file, 0, start, size, huge, libc::MAP_SHARED)?;
        self.mem = self
            .mem
            .insert_region(std::sync::Arc::new(region))
            .map_err(MemoryError::Collection)?;
        Ok(())
    }
}

/// Maps `size` bytes of `file` from `file_offset` (between guards, see
/// [`map_with_guards`]) as the guest region at `start`.
fn map_region(
    file: &File,
    file_offset: u64,
    start: u64,
    size: u64,
    huge: bool,
    flags: libc::c_int,
) -> Result<GuestRegionMmap, MemoryError> {
    let len = usize::try_from(size).map_err(|_| MemoryError::Unaligned(size))?;
    let host = map_with_guards(file, file_offset, len, huge, flags)?;
    let fo = FileOffset::new(file.try_clone().map_err(MemoryError::Memfd)?, file_offset);
    // SAFETY: `host` points at `len` bytes of a live mapping (`flags`) of the file at
    // `file_offset` that is never unmapped (see `create_from`).
    let builder = unsafe {
        MmapRegionBuilder::new(len)
            .with_file_offset(fo)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .with_raw_mmap_pointer(host)
    };
    let region = builder.build().map_err(MemoryError::Region)?;
    GuestRegionMmap::new(region, GuestAddress(start)).ok_or(MemoryError::Unaligned(start))
}

/// Guest RAM is placed at 2 MiB-aligned host addresses, so that where the host backs it
/// with transparent huge pages (shmem THP: `shmem_enabled` = `advise` or better) KVM can
/// map the guest with 2 MiB pages: far fewer nested page faults and TLB misses, which
/// under nested virtualization dominate a boot.
const HUGE_PAGE_SIZE: usize = 2 << 20;

/// Reserves `size` plus a 2 MiB margin each side as PROT_NONE, then maps the memfd over
/// a 2 MiB-aligned part of the middle; what is left each side (at least one page) stays
/// PROT_NONE as a guard. Returns the start of the usable part.
fn map_with_guards(
    memfd: &File,
    offset: u64,
    size: usize,
    huge: bool,
    flags: libc::c_int,
) -> Result<*mut u8, MemoryError> {
    let total = size + 2 * HUGE_PAGE_SIZE;
    // SAFETY: an anonymous PROT_NONE reservation at an address the kernel picks; the
    // result is checked before use.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(MemoryError::Reserve(std::io::Error::last_os_error()));
    }
    // The first 2 MiB boundary at least one page into the reservation: it leaves a guard
    // below, and since the margin is 2 MiB each side, at least 2 MiB above `size`.
    let start = (base as usize + PAGE_SIZE).next_multiple_of(HUGE_PAGE_SIZE);
    // SAFETY: `start .. start + size` lies inside the reservation we just made and own
    // (start - base <= 2 MiB, and the reservation is size + 4 MiB), so MAP_FIXED replaces
    // only our own PROT_NONE pages.
    let addr = unsafe {
        libc::mmap(
            start as *mut libc::c_void,
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            flags | libc::MAP_FIXED | libc::MAP_NORESERVE,
            memfd.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    if addr == libc::MAP_FAILED {
        let err = std::io::Error::last_os_error();
        // SAFETY: unmapping the reservation made above, which nothing else references.
        unsafe { libc::munmap(base, total) };
        return Err(MemoryError::Map(err));
    }
    // A hint: on a memfd it takes effect only where the host allows shmem THP (`cocoon
    // check` says), and failing it changes nothing else, so its result is ignored.
    if huge {
        // SAFETY: madvise on the mapping made just above, which we own.
        let _ = unsafe { libc::madvise(addr, size, libc::MADV_HUGEPAGE) };
    }
    Ok(addr.cast())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, GuestMemoryBackend as _};

    #[test]
    fn memory_is_the_memfd() {
        let gm = create(16 << 20).unwrap();
        gm.mem
            .write_obj(0xdead_beefu32, GuestAddress(0x1000))
            .unwrap();
        let mut buf = [0u8; 4];
        gm.memfd.read_exact_at(&mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        assert_eq!(gm.mem.last_addr(), GuestAddress((16 << 20) - 1));
    }

    #[test]
    fn out_of_range_access_is_an_error_not_a_fault() {
        let gm = create(1 << 20).unwrap();
        assert!(gm.mem.write_obj(1u64, GuestAddress(1 << 20)).is_err());
        assert!(gm.mem.read_obj::<u64>(GuestAddress((1 << 20) - 4)).is_err());
    }

    /// Each region starts at a 2 MiB-aligned host address (huge pages possible) with an
    /// inaccessible page right below and right above it (the guards).
    #[test]
    fn regions_are_huge_page_aligned_between_guards() {
        let gm = create(6 << 20).unwrap();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        for region in gm.mem.iter() {
            let start = region.as_ptr() as usize;
            let end = start + vm_memory::GuestMemoryRegion::len(region) as usize;
            assert_eq!(start % HUGE_PAGE_SIZE, 0, "{start:#x}");
            let prot_at = |addr: usize| {
                maps.lines()
                    .find_map(|l| {
                        let (range, rest) = l.split_once(' ')?;
                        let (a, b) = range.split_once('-')?;
                        let (a, b) = (
                            usize::from_str_radix(a, 16).ok()?,
                            usize::from_str_radix(b, 16).ok()?,
                        );
                        (a <= addr && addr < b).then(|| rest[..4].to_owned())
                    })
                    .unwrap_or_else(|| "none".into())
            };
            assert_eq!(prot_at(start - 1), "---p", "guard below");
            assert_eq!(prot_at(end), "---p", "guard above");
            assert_eq!(prot_at(start), "rw-s");
        }
    }

    /// The virtio-mem region is guest memory of its own file, shared (a vhost-user
    /// backend gets its descriptor from the region's file offset), apart from RAM.
    #[test]
    fn the_hotplug_region_is_shared_memory_on_its_own_file() {
        use vm_memory::GuestMemoryRegion;
        let mut gm = create(16 << 20).unwrap();
        let start = layout::hotplug_region_start(16 << 20);
        gm.add_hotplug_region(start, 8 << 20, HugePages::Off)
            .unwrap();
        assert_eq!(gm.mem.num_regions(), 2);
        let region = gm.mem.find_region(GuestAddress(start)).unwrap();
        assert_eq!(region.len(), 8 << 20);
        let fo = region.file_offset().expect("a file behind the region");
        assert_eq!(fo.start(), 0);
        gm.mem
            .write_obj(0x5a5a_u16, GuestAddress(start + (4 << 20)))
            .unwrap();
        let mut buf = [0u8; 2];
        fo.file().read_exact_at(&mut buf, 4 << 20).unwrap();
        assert_eq!(u16::from_le_bytes(buf), 0x5a5a);
        // RAM's own file is untouched, and nothing lies between RAM and the region.
        assert_eq!(gm.memfd.metadata().unwrap().len(), 16 << 20);
        assert!(gm.mem.read_obj::<u8>(GuestAddress(start - 1)).is_err());
    }

    #[test]
    fn rejects_unaligned_sizes() {
        assert!(matches!(create(4097), Err(MemoryError::Unaligned(4097))));
    }
}
