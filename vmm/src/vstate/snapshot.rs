//! Snapshots of a paused VM and VMs restored from them: the base of VM templates
//! (issue #12). A snapshot is a directory of two files:
//!
//! - `vm.json`: the VM's configuration and every piece of state that is not guest RAM:
//!   each vCPU's registers, FPU/SSE/AVX state, LAPIC, MSRs, pending events and run
//!   state; the in-kernel irqchip (both PICs, the IOAPIC), PIT and kvmclock; the serial
//!   port; and each virtio-mmio transport's registers and queues.
//! - `memory`: guest RAM as one file, laid out like the RAM file of a running VM
//!   ([`crate::vstate::memory`]), with all-zero pages left as holes.
//!
//! A restored VM maps `memory` copy-on-write (`MAP_PRIVATE`) where nothing outside the
//! VMM needs to see guest RAM, so clones of one template share the pages none of them
//! wrote. A vhost-user backend (virtiofsd) maps guest RAM itself and would not see a
//! private copy, so with one the restored VM gets its own RAM file, filled from the
//! template's data ranges (its holes are zero pages already).
//!
//! The files are the host's own (written by a VMM the host started for the template
//! and read by the next one); what the guest controls in them is guest RAM and the
//! guest-visible registers, which KVM and the devices check as they would live values.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::config::VmConfig;
use crate::devices::virtio::mmio::TransportState;

/// Bumped whenever a field changes meaning; a snapshot of another version is refused.
pub const FORMAT_VERSION: u32 = 1;
pub const STATE_FILE: &str = "vm.json";
pub const MEMORY_FILE: &str = "memory";

/// Errors while taking or restoring a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("Failed to {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("Failed to {0}")]
    Io(&'static str, #[source] std::io::Error),
    #[error("The snapshot's state file is not valid")]
    Parse(#[source] serde_json::Error),
    #[error("The snapshot is format {found}; this VMM reads format {FORMAT_VERSION}")]
    Version { found: u32 },
    #[error("The snapshot does not fit this VM: {0}")]
    Mismatch(String),
    #[error("vCPU {0} did not save its state: {1}")]
    Vcpu(u8, String),
}

/// One vCPU, as KVM holds it.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// (index, value) of every MSR KVM would read back.
    pub msrs: Vec<(u32, u64)>,
    pub events: kvm_vcpu_events,
}

/// The VM-wide in-kernel devices and clock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// The 16550's registers (vm-superio's state, mirrored for serde).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// Everything but guest RAM.
#[derive(Serialize, Deserialize)]
pub struct Snapshot {
    pub version: u32,
    pub config: VmConfig,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub serial: SerialState,
    /// One per virtio-mmio device, in the order the builder placed them.
    pub virtio: Vec<TransportState>,
}

/// The MSRs worth saving: those KVM lists and will read back on this vCPU. Some listed
/// ones are refused on some hosts (and under PVM), and KVM_GET_MSRS stops at the first
/// refusal, so each is tried alone once.
pub fn readable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, SnapshotError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(|e| SnapshotError::Kvm("list the MSRs", e))?;
    Ok(list
        .as_slice()
        .iter()
        .copied()
        .filter(|&index| {
            let Ok(mut one) = Msrs::from_entries(&[kvm_msr_entry {
                index,
                ..Default::default()
            }]) else {
                return false;
            };
            vcpu.get_msrs(&mut one).is_ok_and(|n| n == 1)
        })
        .collect())
}

/// Reads one paused vCPU's state. Call on its own thread, out of KVM_RUN.
pub fn save_vcpu(fd: &mut VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, SnapshotError> {
    // An I/O or MMIO exit the VMM answered is completed by the next KVM_RUN; entering
    // with immediate_exit completes it without running the guest (KVM's API docs).
    fd.set_kvm_immediate_exit(1);
    let r = fd.run().map(|_| ());
    fd.set_kvm_immediate_exit(0);
    match r {
        Err(e) if e.errno() == libc::EINTR => {}
        Ok(()) => {}
        Err(e) => return Err(SnapshotError::Kvm("complete the pending exit", e)),
    }
    let entries: Vec<kvm_msr_entry> = msr_indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries)
        .map_err(|_| SnapshotError::Mismatch(format!("{} MSRs", entries.len())))?;
    let n = fd
        .get_msrs(&mut msrs)
        .map_err(|e| SnapshotError::Kvm("read the MSRs", e))?;
    if n != entries.len() {
        return Err(SnapshotError::Mismatch(format!(
            "KVM read {n} of {} MSRs",
            entries.len()
        )));
    }
    Ok(VcpuState {
        mp_state: fd
            .get_mp_state()
            .map_err(|e| SnapshotError::Kvm("read the MP state", e))?,
        regs: fd
            .get_regs()
            .map_err(|e| SnapshotError::Kvm("read the registers", e))?,
        sregs: fd
            .get_sregs()
            .map_err(|e| SnapshotError::Kvm("read the system registers", e))?,
        xsave: fd
            .get_xsave()
            .map_err(|e| SnapshotError::Kvm("read the XSAVE area", e))?,
        // Absent without XSAVE in the guest's CPUID; nothing to restore then.
        xcrs: fd.get_xcrs().ok(),
        debugregs: fd
            .get_debug_regs()
            .map_err(|e| SnapshotError::Kvm("read the debug registers", e))?,
        lapic: fd
            .get_lapic()
            .map_err(|e| SnapshotError::Kvm("read the LAPIC", e))?,
        msrs: msrs.as_slice().iter().map(|e| (e.index, e.data)).collect(),
        events: fd
            .get_vcpu_events()
            .map_err(|e| SnapshotError::Kvm("read the pending events", e))?,
    })
}

/// Loads a saved state into a vCPU created with the same CPUID. The order is KVM's:
/// the run state first, the LAPIC before the MSRs (the TSC deadline lives in both), the
/// pending events last.
pub fn restore_vcpu(fd: &VcpuFd, s: &VcpuState) -> Result<(), SnapshotError> {
    fd.set_mp_state(s.mp_state)
        .map_err(|e| SnapshotError::Kvm("set the MP state", e))?;
    fd.set_regs(&s.regs)
        .map_err(|e| SnapshotError::Kvm("set the registers", e))?;
    fd.set_sregs(&s.sregs)
        .map_err(|e| SnapshotError::Kvm("set the system registers", e))?;
    // SAFETY: `s.xsave` is a whole legacy 4 KiB kvm_xsave as KVM_GET_XSAVE wrote it, and
    // this VMM never enables the dynamic XSAVE features (AMX) that make the area larger.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(|e| SnapshotError::Kvm("set the XSAVE area", e))?;
    if let Some(x) = &s.xcrs {
        fd.set_xcrs(x)
            .map_err(|e| SnapshotError::Kvm("set the XCRs", e))?;
    }
    fd.set_debug_regs(&s.debugregs)
        .map_err(|e| SnapshotError::Kvm("set the debug registers", e))?;
    fd.set_lapic(&s.lapic)
        .map_err(|e| SnapshotError::Kvm("set the LAPIC", e))?;
    let entries: Vec<kvm_msr_entry> = s
        .msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries)
        .map_err(|_| SnapshotError::Mismatch(format!("{} MSRs", entries.len())))?;
    let n = fd
        .set_msrs(&msrs)
        .map_err(|e| SnapshotError::Kvm("set the MSRs", e))?;
    if n != entries.len() {
        let refused = entries.get(n).map_or(0, |e| e.index);
        return Err(SnapshotError::Mismatch(format!(
            "KVM refused MSR {refused:#x} ({n} of {} set)",
            entries.len()
        )));
    }
    fd.set_vcpu_events(&s.events)
        .map_err(|e| SnapshotError::Kvm("set the pending events", e))?;
    Ok(())
}

fn chip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip, SnapshotError> {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut c)
        .map_err(|e| SnapshotError::Kvm("read the irqchip", e))?;
    Ok(c)
}

pub fn save_vm(fd: &VmFd) -> Result<VmState, SnapshotError> {
    Ok(VmState {
        pic_master: chip(fd, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(fd, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(fd, KVM_IRQCHIP_IOAPIC)?,
        pit: fd
            .get_pit2()
            .map_err(|e| SnapshotError::Kvm("read the PIT", e))?,
        clock: fd
            .get_clock()
            .map_err(|e| SnapshotError::Kvm("read kvmclock", e))?,
    })
}

/// Loads the VM-wide state into a VM made like the saved one (irqchip and PIT created).
pub fn restore_vm(fd: &VmFd, s: &VmState) -> Result<(), SnapshotError> {
    for c in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        fd.set_irqchip(c)
            .map_err(|e| SnapshotError::Kvm("set the irqchip", e))?;
    }
    fd.set_pit2(&s.pit)
        .map_err(|e| SnapshotError::Kvm("set the PIT", e))?;
    // kvmclock goes on from where the template stood: the guest sees no time pass
    // while it was saved (its wall clock is set again by whoever restores it). Only
    // the clock value is given; the flags KVM reported are not settable.
    let clock = kvm_clock_data {
        clock: s.clock.clock,
        ..Default::default()
    };
    fd.set_clock(&clock)
        .map_err(|e| SnapshotError::Kvm("set kvmclock", e))?;
    Ok(())
}

const PAGE: usize = 4096;

/// Writes guest RAM to `out` at the same offsets as its RAM file, skipping pages that
/// are all zero (they stay holes). Regions from `ram_end` up (a virtio-mem region,
/// which a snapshot is taken of only while none of it is plugged) are left out: read
/// to look for zeroes, its unplugged shmem holes would be backed. Returns the bytes
/// written.
pub fn write_memory(
    mem: &GuestMemoryMmap,
    out: &File,
    ram_end: Option<u64>,
) -> Result<u64, SnapshotError> {
    let mut offset = 0u64;
    let mut written = 0u64;
    let ram = |r: &&vm_memory::GuestRegionMmap| ram_end.is_none_or(|end| r.start_addr().0 < end);
    for region in mem.iter().filter(ram) {
        let len = region.len() as usize;
        // SAFETY: the region is a live mapping of `len` bytes for the VM's whole life
        // (vstate::memory), and every vCPU is paused, so nothing writes it meanwhile.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr(), len) };
        let mut at = 0;
        while at < len {
            let is_zero = |p: &[u8]| {
                // SAFETY: any bytes are valid u64s; align_to splits off what is not
                // aligned (nothing, for page-aligned guest RAM).
                let (head, words, tail) = unsafe { p.align_to::<u64>() };
                head.iter().all(|b| *b == 0)
                    && words.iter().all(|w| *w == 0)
                    && tail.iter().all(|b| *b == 0)
            };
            if is_zero(&bytes[at..at + PAGE]) {
                at += PAGE;
                continue;
            }
            let start = at;
            while at < len && !is_zero(&bytes[at..at + PAGE]) {
                at += PAGE;
            }
            out.write_all_at(&bytes[start..at], offset + start as u64)
                .map_err(|e| SnapshotError::Io("write guest memory", e))?;
            written += (at - start) as u64;
        }
        offset += len as u64;
    }
    out.set_len(offset)
        .map_err(|e| SnapshotError::Io("size the memory file", e))?;
    out.sync_all()
        .map_err(|e| SnapshotError::Io("sync the memory file", e))?;
    Ok(written)
}

/// Reads the data ranges of `template` (its holes are zero pages, which fresh guest
/// RAM already is) straight into guest RAM: one copy, no buffer. (`copy_file_range`
/// between the template's filesystem and the RAM file's tmpfs is refused with EXDEV.)
pub fn copy_memory(template: &File, mem: &GuestMemoryMmap) -> Result<u64, SnapshotError> {
    let len = template
        .metadata()
        .map_err(|e| SnapshotError::Io("read the memory file's size", e))?
        .len() as i64;
    let src = template.as_raw_fd();
    // Each region's place in the file: the regions laid end to end, as written.
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for r in mem.iter() {
        regions.push((offset, r));
        offset += r.len();
    }
    let mut pos = 0i64;
    let mut copied = 0u64;
    while pos < len {
        // SAFETY: lseek on a descriptor we hold; the result is checked.
        let data = unsafe { libc::lseek(src, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole is left
            }
            return Err(SnapshotError::Io("find data in the memory file", e));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(src, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(SnapshotError::Io(
                "find a hole in the memory file",
                std::io::Error::last_os_error(),
            ));
        }
        let (data, hole) = (data as u64, hole as u64);
        for (start, r) in &regions {
            let (from, to) = (data.max(*start), hole.min(start + r.len()));
            if from >= to {
                continue;
            }
            // SAFETY: `from - start .. to - start` lies inside the region, a live
            // mapping for the VM's whole life (vstate::memory); no vCPU runs yet.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(
                    r.as_ptr().add((from - start) as usize),
                    (to - from) as usize,
                )
            };
            template
                .read_exact_at(dst, from)
                .map_err(|e| SnapshotError::Io("copy the template's memory", e))?;
            copied += to - from;
        }
        pos = hole as i64;
    }
    Ok(copied)
}

/// The two files of a snapshot being written, opened (created, truncated) before the
/// VMM confines itself, so that taking the snapshot needs no new descriptor.
pub struct SnapshotFiles {
    pub state: File,
    pub memory: File,
}

impl SnapshotFiles {
    pub fn create(dir: &std::path::Path) -> Result<Self, SnapshotError> {
        std::fs::create_dir_all(dir).map_err(|e| SnapshotError::Io("create the directory", e))?;
        let open = |name: &str| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.join(name))
        };
        Ok(Self {
            state: open(STATE_FILE).map_err(|e| SnapshotError::Io("create vm.json", e))?,
            memory: open(MEMORY_FILE).map_err(|e| SnapshotError::Io("create memory", e))?,
        })
    }

    /// Writes the state and the memory. The state goes last, so a snapshot whose
    /// writing failed halfway has no valid `vm.json`.
    pub fn write(&self, snap: &Snapshot, mem: &GuestMemoryMmap) -> Result<u64, SnapshotError> {
        self.state
            .set_len(0)
            .map_err(|e| SnapshotError::Io("truncate vm.json", e))?;
        let ram_end = (snap.config.hotplug_mib > 0)
            .then(|| crate::arch::layout::hotplug_region_start(snap.config.mem_bytes()));
        let bytes = write_memory(mem, &self.memory, ram_end)?;
        let text = serde_json::to_vec(snap).map_err(SnapshotError::Parse)?;
        self.state
            .write_all_at(&text, 0)
            .map_err(|e| SnapshotError::Io("write vm.json", e))?;
        self.state
            .sync_all()
            .map_err(|e| SnapshotError::Io("sync vm.json", e))?;
        Ok(bytes)
    }
}

/// Reads a snapshot directory: its state, and its memory file opened read-only.
pub fn load(dir: &std::path::Path) -> Result<(Snapshot, File), SnapshotError> {
    let text = std::fs::read(dir.join(STATE_FILE))
        .map_err(|e| SnapshotError::Io("read the snapshot's vm.json", e))?;
    let snap: Snapshot = serde_json::from_slice(&text).map_err(SnapshotError::Parse)?;
    if snap.version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            found: snap.version,
        });
    }
    let memory = File::open(dir.join(MEMORY_FILE))
        .map_err(|e| SnapshotError::Io("open the snapshot's memory", e))?;
    let len = memory
        .metadata()
        .map_err(|e| SnapshotError::Io("read the memory file's size", e))?
        .len();
    if len != snap.config.mem_bytes() {
        return Err(SnapshotError::Mismatch(format!(
            "the memory file holds {len} bytes, the VM has {}",
            snap.config.mem_bytes()
        )));
    }
    if snap.vcpus.len() != usize::from(snap.config.vcpus) {
        return Err(SnapshotError::Mismatch(format!(
            "{} vCPU states for {} vCPUs",
            snap.vcpus.len(),
            snap.config.vcpus
        )));
    }
    Ok((snap, memory))
}

impl Snapshot {
    /// Checks that `clone` (the restored VM's config: the template's with per-VM paths
    /// changed) has the template's shape: the same RAM, vCPUs and devices in the same
    /// order. Each key that differs is named.
    pub fn check_clone(&self, clone: &VmConfig) -> Result<(), SnapshotError> {
        let t = &self.config;
        let mut diff = Vec::new();
        let mut same = |key: &str, a: String, b: String| {
            if a != b {
                diff.push(format!("{key}: template {a}, this VM {b}"));
            }
        };
        same("mem_mib", t.mem_mib.to_string(), clone.mem_mib.to_string());
        same("vcpus", t.vcpus.to_string(), clone.vcpus.to_string());
        same("acpi", t.acpi.to_string(), clone.acpi.to_string());
        same(
            "vsock",
            t.vsock.is_some().to_string(),
            clone.vsock.is_some().to_string(),
        );
        same(
            "block",
            t.block.len().to_string(),
            clone.block.len().to_string(),
        );
        same("net", t.net.len().to_string(), clone.net.len().to_string());
        same("fs", t.fs.len().to_string(), clone.fs.len().to_string());
        same(
            "vhost_user_vsock",
            t.vhost_user_vsock.is_some().to_string(),
            clone.vhost_user_vsock.is_some().to_string(),
        );
        same(
            "free_page_reporting",
            t.free_page_reporting.to_string(),
            clone.free_page_reporting.to_string(),
        );
        same(
            "hotplug_mib",
            t.hotplug_mib.to_string(),
            clone.hotplug_mib.to_string(),
        );
        if self.virtio.len() != clone.virtio_device_count() {
            diff.push(format!(
                "{} virtio devices saved, {} configured",
                self.virtio.len(),
                clone.virtio_device_count()
            ));
        }
        if diff.is_empty() {
            Ok(())
        } else {
            Err(SnapshotError::Mismatch(diff.join("; ")))
        }
    }
}
