//! The guest physical address map of an x86_64 cocoon VM: where boot structures, the
//! kernel, RAM, the MMIO gap and each device live. Everything else reads these constants.

/// Start of the 32-bit MMIO gap; RAM above this moves to [`HIGH_RAM_START`].
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End (exclusive) of the MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Where RAM that did not fit below the gap continues.
pub const HIGH_RAM_START: u64 = MMIO_GAP_END;

/// Real-mode RAM ends where the EBDA begins (the MP floating pointer lives there).
pub const EBDA_START: u64 = 0x9_fc00;
/// The legacy VGA/BIOS hole; never reported as RAM.
pub const LEGACY_HOLE_END: u64 = 0x10_0000;

/// GDT for the boot vCPU state (four 8-byte entries).
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT: the guest installs its own before enabling interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, followed by its module list and memory map.
pub const PVH_INFO_START: u64 = 0x6000;
/// Linux `boot_params` ("zero page") for the 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Stack for the 64-bit boot protocol (grows down from here).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables for the 64-bit entry: PML4, PDPT, PD.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Longest command line accepted (Linux's COMMAND_LINE_SIZE on x86_64).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Kernels load at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;

/// The in-kernel IOAPIC and the LAPIC, at their architectural addresses.
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;

/// virtio-mmio device windows, one 4 KiB page each, from here up.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First IRQ (IOAPIC pin) handed to virtio-mmio devices; 0-4 are taken by PIT, i8042,
/// cascade and serial.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// IOAPIC pins the in-kernel irqchip has.
pub const IOAPIC_PINS: u32 = 24;

/// Legacy ports.
pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_IRQ: u32 = 4;
pub const I8042_PORT: u16 = 0x60;

/// KVM needs three pages for the TSS and one for the identity map on Intel; put them
/// just below the IOAPIC, inside the MMIO gap where no RAM lives.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Guest address of the n-th virtio-mmio window.
pub fn virtio_mmio_addr(index: usize) -> u64 {
    VIRTIO_MMIO_START + VIRTIO_MMIO_SIZE * index as u64
}

/// IRQ of the n-th virtio-mmio device.
pub fn virtio_mmio_irq(index: usize) -> u32 {
    VIRTIO_IRQ_BASE + index as u32
}

/// Most virtio-mmio devices: one IRQ each, up to the last IOAPIC pin.
pub const MAX_VIRTIO_DEVICES: usize = (IOAPIC_PINS - VIRTIO_IRQ_BASE) as usize;

/// RAM ranges (start, size) for `mem_size` bytes of guest memory: below the MMIO gap,
/// and whatever is left above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (HIGH_RAM_START, mem_size - MMIO_GAP_START),
        ]
    }
}

/// Alignment of the virtio-mem region (`devices::virtio::mem`). Linux hot-adds memory
/// in whole memory blocks, and on x86_64 a memory block is 128 MiB up to 2 GiB
/// (`MAX_BLOCK_SIZE`, chosen at boot from the RAM's size and alignment); a region that
/// does not start on one of the guest's block boundaries loses the memory below the
/// first. Aligning to the largest possible block costs only guest-physical address
/// space, which is free.
pub const HOTPLUG_ALIGN: u64 = 2 << 30;

/// Where the virtio-mem region of a VM with `mem_size` bytes of RAM starts: the first
/// [`HOTPLUG_ALIGN`] boundary at or above both the end of RAM and 4 GiB (never in the
/// 32-bit MMIO gap). The region is not RAM to the boot protocol: neither [`ram_ranges`]
/// nor [`e820_map`] has it, the guest learns of it from the device alone.
pub fn hotplug_region_start(mem_size: u64) -> u64 {
    let ram_end = ram_ranges(mem_size)
        .last()
        .map_or(0, |(start, size)| start + size);
    ram_end.max(MMIO_GAP_END).next_multiple_of(HOTPLUG_ALIGN)
}

/// One e820 entry (type 1 = usable RAM, 2 = reserved).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// The e820 map matching [`ram_ranges`]: low RAM up to the EBDA, the legacy hole left
/// out, RAM from 1 MiB, and high RAM. The MMIO gap is not RAM, so it is simply absent.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: LEGACY_HOLE_END - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for (start, size) in ram_ranges(mem_size) {
        let start = start.max(LEGACY_HOLE_END);
        let end = if start >= HIGH_RAM_START {
            start + size
        } else {
            size.min(MMIO_GAP_START)
        };
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_covers_ram_and_skips_holes() {
        let map = e820_map(256 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(map[2].addr, LEGACY_HOLE_END);
        assert_eq!(map[2].addr + map[2].size, 256 << 20);

        let big = e820_map(5 << 30);
        let last = big.last().unwrap();
        assert_eq!(last.addr, HIGH_RAM_START);
        assert_eq!(last.size, (5u64 << 30) - MMIO_GAP_START);
        assert!(big
            .iter()
            .all(|e| e.addr + e.size <= MMIO_GAP_START || e.addr >= MMIO_GAP_END));
    }

    #[test]
    fn the_hotplug_region_starts_aligned_above_all_ram_and_4_gib() {
        let gib = 1u64 << 30;
        // Small guests: the first 2 GiB boundary above the gap, i.e. 4 GiB.
        assert_eq!(hotplug_region_start(256 << 20), 4 * gib);
        assert_eq!(hotplug_region_start(MMIO_GAP_START), 4 * gib);
        // 4 GiB of RAM ends at 5 GiB (1 GiB of it above the gap): next boundary, 6 GiB.
        assert_eq!(hotplug_region_start(4 * gib), 6 * gib);
        // RAM ending right on a boundary: the region starts there.
        assert_eq!(hotplug_region_start(5 * gib), 6 * gib);
        for mib in [2u64, 128, 3072, 3073, 4096, 65_536, 256 << 10] {
            let mem = mib << 20;
            let start = hotplug_region_start(mem);
            assert_eq!(start % HOTPLUG_ALIGN, 0, "{mib} MiB");
            assert!(start >= MMIO_GAP_END, "{mib} MiB");
            for (s, len) in ram_ranges(mem) {
                assert!(s + len <= start, "{mib} MiB: RAM overlaps the region");
            }
            assert!(e820_map(mem).iter().all(|e| e.addr + e.size <= start));
        }
    }

    #[test]
    fn virtio_windows_fit_in_the_gap_below_the_ioapic() {
        let last = virtio_mmio_addr(MAX_VIRTIO_DEVICES - 1) + VIRTIO_MMIO_SIZE;
        assert!(VIRTIO_MMIO_START >= MMIO_GAP_START && last <= IOAPIC_START);
        assert_eq!(virtio_mmio_irq(MAX_VIRTIO_DEVICES - 1), IOAPIC_PINS - 1);
    }
}
