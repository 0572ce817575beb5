//! The architectural state a vCPU starts in: segment registers and GDT for the PVH
//! 32-bit entry or the Linux 64-bit entry, boot MSRs, FPU and LAPIC wiring.

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;

/// Errors while setting up vCPU registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("Failed to {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("Failed to write the {0} into guest memory")]
    Memory(&'static str, #[source] vm_memory::GuestMemoryError),
    #[error("KVM accepted only {0} of {1} boot MSRs")]
    Msrs(usize, usize),
}

/// How the guest is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh { entry: u64 },
    /// Linux 64-bit boot protocol: long mode, identity-mapped first GiB, RSI = zero page.
    Linux64 { entry: u64 },
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// A GDT entry from flags (in the 0xf0ff layout of bytes 5-6), base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | (((limit as u64 & 0x000f_0000) >> 16) << 48)
        | ((flags as u64 & 0xf0ff) << 40)
}

fn segment(entry: u64, selector_index: u16) -> kvm_segment {
    let flag = |shift: u32, mask: u64| ((entry >> shift) & mask) as u8;
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = (entry & 0xffff) | ((entry >> 32) & 0xf_0000);
    let g = flag(55, 1);
    kvm_segment {
        base,
        // The limit register holds bytes; with G set the descriptor counts 4 KiB pages.
        limit: if g == 1 {
            ((limit_raw as u32) << 12) | 0xfff
        } else {
            limit_raw as u32
        },
        selector: selector_index * 8,
        type_: flag(40, 0xf),
        present: flag(47, 1),
        dpl: flag(45, 0x3),
        db: flag(54, 1),
        s: flag(44, 1),
        l: flag(53, 1),
        g,
        avl: flag(52, 1),
        unusable: u8::from(flag(47, 1) == 0),
        padding: 0,
    }
}

/// Sets the special registers for `entry` and writes the GDT (and, for long mode, the
/// page tables) into guest memory.
pub fn setup_sregs(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: BootEntry,
) -> Result<(), RegsError> {
    let long = matches!(entry, BootEntry::Linux64 { .. });
    let code = if long {
        gdt_entry(0xa09b, 0, 0xfffff) // 64-bit code, L=1
    } else {
        gdt_entry(0xc09b, 0, 0xfffff) // 32-bit code, D=1
    };
    let gdt = [
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff), // flat read/write data
        gdt_entry(0x808b, 0, 0xfffff), // busy 32-bit TSS; VMX insists on a usable TR
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::BOOT_GDT_START + 8 * i as u64))
            .map_err(|e| RegsError::Memory("GDT", e))?;
    }
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT_START))
        .map_err(|e| RegsError::Memory("IDT", e))?;

    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| RegsError::Kvm("get special registers", e))?;
    sregs.gdt.base = layout::BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = layout::BOOT_IDT_START;
    sregs.idt.limit = 7;
    let code_seg = segment(code, 1);
    let data_seg = segment(gdt[2], 2);
    sregs.cs = code_seg;
    sregs.ds = data_seg;
    sregs.es = data_seg;
    sregs.fs = data_seg;
    sregs.gs = data_seg;
    sregs.ss = data_seg;
    sregs.tr = segment(gdt[3], 3);
    if long {
        setup_page_tables(mem, &mut sregs)?;
        sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
        sregs.cr4 = X86_CR4_PAE;
        sregs.efer = EFER_LME | EFER_LMA;
    } else {
        // PVH §"32-bit entry": protected mode, paging off, CR4 clear.
        sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
        sregs.cr4 = 0;
        sregs.efer = 0;
    }
    vcpu.set_sregs(&sregs)
        .map_err(|e| RegsError::Kvm("set special registers", e))
}

/// Identity-maps the first GiB with 2 MiB pages: enough for the 64-bit entry, the kernel
/// builds its own tables right away.
fn setup_page_tables(mem: &GuestMemoryMmap, sregs: &mut kvm_sregs) -> Result<(), RegsError> {
    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|e| RegsError::Memory("page tables", e))
    };
    w(layout::PDPTE_START | 0x03, layout::PML4_START)?;
    w(layout::PDE_START | 0x03, layout::PDPTE_START)?;
    for i in 0..512u64 {
        w((i << 21) | 0x83, layout::PDE_START + i * 8)?;
    }
    sregs.cr3 = layout::PML4_START;
    Ok(())
}

/// Sets the general registers for `entry`; `boot_info` is the start info / zero page.
pub fn setup_regs(vcpu: &VcpuFd, entry: BootEntry, boot_info: u64) -> Result<(), RegsError> {
    let regs = match entry {
        BootEntry::Pvh { entry } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rbx: boot_info,
            ..Default::default()
        },
        BootEntry::Linux64 { entry } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: layout::BOOT_STACK_POINTER,
            rbp: layout::BOOT_STACK_POINTER,
            rsi: boot_info,
            ..Default::default()
        },
    };
    vcpu.set_regs(&regs)
        .map_err(|e| RegsError::Kvm("set general registers", e))
}

/// x87 and SSE in their reset state.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
        .map_err(|e| RegsError::Kvm("set FPU state", e))
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

/// Boot MSRs: syscall entry points cleared, fast strings on, MTRRs enabled with
/// write-back default (without this Linux maps all RAM uncached).
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, 1),
        (MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::Msrs(0, entries.len()))?;
    let n = vcpu
        .set_msrs(&msrs)
        .map_err(|e| RegsError::Kvm("set MSRs", e))?;
    if n != entries.len() {
        return Err(RegsError::Msrs(n, entries.len()));
    }
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(state: &kvm_lapic_state, off: usize) -> u32 {
    let b = &state.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(state: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        state.regs[off + i] = *b as _;
    }
}

/// Wires LINT0 to the PIC (ExtINT) and LINT1 to NMI, as a BIOS would for virtual wire
/// mode; the kernel reprograms both once it takes over the IOAPIC.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut state = vcpu
        .get_lapic()
        .map_err(|e| RegsError::Kvm("get LAPIC state", e))?;
    let delivery = |v: u32, mode: u32| (v & !0x700) | (mode << 8);
    let lvt0 = lapic_reg(&state, APIC_LVT0);
    set_lapic_reg(&mut state, APIC_LVT0, delivery(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(&state, APIC_LVT1);
    set_lapic_reg(&mut state, APIC_LVT1, delivery(lvt1, APIC_MODE_NMI));
    vcpu.set_lapic(&state)
        .map_err(|e| RegsError::Kvm("set LAPIC state", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code = segment(gdt_entry(0xc09b, 0, 0xfffff), 1);
        assert_eq!((code.base, code.limit, code.selector), (0, 0xffff_ffff, 8));
        assert_eq!(
            (code.type_, code.db, code.l, code.g, code.present),
            (0xb, 1, 0, 1, 1)
        );
        let code64 = segment(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!((code64.l, code64.db), (1, 0));
        let tss = segment(gdt_entry(0x808b, 0, 0xfffff), 3);
        assert_eq!((tss.type_, tss.s, tss.unusable), (0xb, 0, 0));
    }
}
