//! Loading a guest: a PVH ELF (entry from the XEN_ELFNOTE_PHYS32_ENTRY note) or a bzImage
//! (64-bit boot protocol), its initramfs and command line, and the boot information each
//! protocol expects (`hvm_start_info` or the zero page, both carrying the e820 map).

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, BzImage, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::layout;
use super::regs::BootEntry;

/// Errors while loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("Failed to open {0}")]
    Open(String, #[source] std::io::Error),
    #[error("The kernel is neither a PVH ELF nor a bzImage (ELF: {elf}; bzImage: {bzimage})")]
    UnknownFormat {
        elf: linux_loader::loader::Error,
        bzimage: linux_loader::loader::Error,
    },
    #[error("The ELF kernel has no PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY)")]
    NoPvhEntry,
    #[error(
        "The initramfs ({0} bytes) does not fit in guest memory above the kernel's \
         decompression area; give the VM more memory"
    )]
    InitrdTooBig(u64),
    #[error("Failed to read the initramfs into guest memory")]
    InitrdLoad(#[source] vm_memory::GuestMemoryError),
    #[error("Invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("Failed to write the command line into guest memory")]
    CmdlineLoad(#[source] linux_loader::loader::Error),
    #[error("Failed to write the boot information into guest memory")]
    BootInfo(#[source] linux_loader::configurator::Error),
}

/// What the vCPU setup needs to know about the loaded guest.
#[derive(Clone, Copy, Debug)]
pub struct LoadedGuest {
    pub entry: BootEntry,
    /// `hvm_start_info` (PVH) or zero page (Linux64) address for EBX / RSI.
    pub boot_info: u64,
}

/// Builds the command line: the devices the VMM announces, then the user's. In that
/// order because everything after a ` -- ` in the user's line goes to init, not the
/// kernel.
pub fn build_cmdline(base: &str, extra: &[String]) -> Result<Cmdline, BootError> {
    let mut cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    for e in extra {
        cmdline.insert_str(e).map_err(BootError::Cmdline)?;
    }
    if !base.is_empty() {
        cmdline.insert_str(base).map_err(BootError::Cmdline)?;
    }
    Ok(cmdline)
}

/// Loads `kernel` (and `initrd`) into `mem`, writes the command line and boot info.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &Cmdline,
    rsdp: Option<u64>,
) -> Result<LoadedGuest, BootError> {
    let open = |p: &Path| File::open(p).map_err(|e| BootError::Open(p.display().to_string(), e));
    let mut image = open(kernel)?;
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let (entry, setup_header, kernel_end) = match Elf::load(mem, None, &mut image, himem) {
        Ok(res) => match res.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => (
                BootEntry::Pvh {
                    entry: addr.raw_value(),
                },
                None,
                res.kernel_end,
            ),
            _ => return Err(BootError::NoPvhEntry),
        },
        Err(elf) => match BzImage::load(mem, None, &mut image, himem) {
            // The 64-bit entry point sits 0x200 past the protected-mode code start.
            Ok(res) => (
                BootEntry::Linux64 {
                    entry: res.kernel_load.raw_value() + 0x200,
                },
                res.setup_header,
                res.kernel_end,
            ),
            Err(bzimage) => return Err(BootError::UnknownFormat { elf, bzimage }),
        },
    };

    load_cmdline(mem, GuestAddress(layout::CMDLINE_START), cmdline)
        .map_err(BootError::CmdlineLoad)?;
    let cmdline_size = cmdline
        .as_cstring()
        .map(|c| c.as_bytes_with_nul().len())
        .unwrap_or(1);

    let floor = setup_header.map_or(kernel_end, |h| kernel_end.max(decompress_end(&h)));
    let initrd_range = match initrd {
        Some(p) => Some(load_initrd(mem, mem_size, &mut open(p)?, floor)?),
        None => None,
    };

    let e820 = layout::e820_map(mem_size);
    let boot_info = match entry {
        BootEntry::Pvh { .. } => write_pvh_info(mem, &e820, initrd_range, rsdp)?,
        BootEntry::Linux64 { .. } => write_zero_page(
            mem,
            &e820,
            setup_header.unwrap_or_default(),
            cmdline_size,
            initrd_range,
            rsdp,
        )?,
    };
    Ok(LoadedGuest { entry, boot_info })
}

/// Where a bzImage's decompressor stops writing: it copies itself to the end of, then
/// decompresses into, `init_size` bytes from its aligned load address (at least
/// `pref_address`), before KASLR knows where the initramfs is. Anything below this is
/// overwritten during boot.
fn decompress_end(h: &linux_loader::loader::bootparam::setup_header) -> u64 {
    let align = u64::from(h.kernel_alignment).max(1);
    let load = u64::from(h.code32_start).div_ceil(align) * align;
    load.max(h.pref_address) + u64::from(h.init_size)
}

/// Puts the initramfs page-aligned at the top of low RAM (below the MMIO gap and 4 GiB,
/// where every boot protocol can reach it), above the kernel.
fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    file: &mut File,
    floor: u64,
) -> Result<(u64, u64), BootError> {
    let size = file
        .metadata()
        .map_err(|e| BootError::Open("initrd".into(), e))?
        .len();
    let top = mem_size.min(layout::MMIO_GAP_START);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= floor.max(layout::HIMEM_START))
        .ok_or(BootError::InitrdTooBig(size))?;
    mem.read_exact_volatile_from(GuestAddress(addr), file, size as usize)
        .map_err(BootError::InitrdLoad)?;
    Ok((addr, size))
}

fn write_pvh_info(
    mem: &GuestMemoryMmap,
    e820: &[layout::E820Entry],
    initrd: Option<(u64, u64)>,
    rsdp: Option<u64>,
) -> Result<u64, BootError> {
    const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
    let modlist_addr = layout::PVH_INFO_START + std::mem::size_of::<hvm_start_info>() as u64;
    let memmap_addr = modlist_addr + std::mem::size_of::<hvm_modlist_entry>() as u64;
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() { modlist_addr } else { 0 },
        cmdline_paddr: layout::CMDLINE_START,
        memmap_paddr: memmap_addr,
        memmap_entries: e820.len() as u32,
        rsdp_paddr: rsdp.unwrap_or(0),
        ..Default::default()
    };
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let mut params = BootParams::new(&start_info, GuestAddress(layout::PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(memmap_addr));
    if let Some((paddr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(modlist_addr));
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(BootError::BootInfo)?;
    Ok(layout::PVH_INFO_START)
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    e820: &[layout::E820Entry],
    hdr: linux_loader::loader::bootparam::setup_header,
    cmdline_size: usize,
    initrd: Option<(u64, u64)>,
    rsdp: Option<u64>,
) -> Result<u64, BootError> {
    const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
    const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
    const KERNEL_LOADER_OTHER: u8 = 0xff;
    const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
    let mut params = boot_params {
        hdr,
        // Boot protocol 2.14+; older kernels scan for the RSDP, which is also there.
        acpi_rsdp_addr: rsdp.unwrap_or(0),
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    for (slot, e) in params.e820_table.iter_mut().zip(e820) {
        slot.addr = e.addr;
        slot.size = e.size;
        slot.r#type = e.kind;
    }
    params.e820_entries = e820.len().min(params.e820_table.len()) as u8;
    let bp = BootParams::new(&params, GuestAddress(layout::ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams(&bp, mem).map_err(BootError::BootInfo)?;
    debug_assert!(mem.address_in_range(GuestAddress(layout::ZERO_PAGE_START)));
    Ok(layout::ZERO_PAGE_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use linux_loader::loader::bootparam::setup_header;

    #[test]
    fn initramfs_stays_above_the_decompression_area() {
        // Debian 6.1 cloud kernel: loaded at 1 MiB, 2 MiB alignment, runs from 16 MiB,
        // needs 51.5 MiB there.
        let h = setup_header {
            code32_start: 0x10_0000,
            kernel_alignment: 0x20_0000,
            pref_address: 0x100_0000,
            init_size: 0x337_8000,
            ..Default::default()
        };
        assert_eq!(decompress_end(&h), 0x437_8000);
        // A kernel loaded above its preferred address decompresses from there.
        let high = setup_header {
            code32_start: 0x210_0001,
            ..h
        };
        assert_eq!(decompress_end(&high), 0x220_0000 + 0x337_8000);
    }
}
