//! The KVM VM: memory slots over guest RAM, the in-kernel irqchip (PIC + IOAPIC +
//! LAPICs) and PIT, so interrupts and the timer never exit to user space.

use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, kvm_userspace_memory_region, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::layout;

/// Errors while creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("Failed to open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not 12")]
    ApiVersion(i32),
    #[error("Failed to {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error(
        "guest memory ends at {end:#x}, beyond the {bits}-bit guest-physical addresses \
         KVM offers on this host: give the VM less memory (hotplug room included)"
    )]
    BeyondPhysBits { end: u64, bits: u8 },
}

/// Fails when guest memory reaches past what the guest may address: KVM would take the
/// memory slot, but the guest could never use the memory above its width (Linux's
/// virtio-mem refuses a region outside its pluggable range), so the VM would start
/// short of what it was asked for. Most of all a virtio-mem region, which begins at
/// 4 GiB or above: on a 39-bit host the largest one would end past 512 GiB.
pub fn check_phys_bits(mem: &GuestMemoryMmap, bits: u8) -> Result<(), VmError> {
    let end = mem.last_addr().0;
    if bits < 64 && end >> bits != 0 {
        return Err(VmError::BeyondPhysBits {
            end: end.saturating_add(1),
            bits,
        });
    }
    Ok(())
}

pub struct Vm {
    pub kvm: Kvm,
    pub fd: VmFd,
}

impl Vm {
    /// A VM on `/dev/kvm`, or on the inherited descriptor `kvm_fd` of it.
    pub fn new(mem: &GuestMemoryMmap, kvm_fd: Option<i32>) -> Result<Self, VmError> {
        let kvm = match kvm_fd {
            // SAFETY: the config's validation checked it is an open descriptor above
            // stdio, handed to us for this use; nothing else here owns it.
            Some(fd) => unsafe { <Kvm as std::os::fd::FromRawFd>::from_raw_fd(fd) },
            None => Kvm::new().map_err(VmError::OpenKvm)?,
        };
        let v = kvm.get_api_version();
        if v != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(VmError::ApiVersion(v));
        }
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Kvm("get the supported CPUID", e))?;
        check_phys_bits(mem, crate::arch::cpuid::guest_phys_bits(&cpuid))?;
        let fd = kvm
            .create_vm()
            .map_err(|e| VmError::Kvm("create the VM", e))?;
        fd.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
            .map_err(|e| VmError::Kvm("set the TSS address", e))?;
        // Only VMX needs the identity map, and only for real mode; a refusal elsewhere
        // (PVM, SVM) is harmless.
        if let Err(e) = fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS) {
            log::debug!("vm: identity map address not set: {e}");
        }
        for (slot, region) in mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping of `len` bytes that is never unmapped
            // (see vstate::memory), so KVM may access it for the VM's whole life.
            unsafe { fd.set_user_memory_region(r) }
                .map_err(|e| VmError::Kvm("register guest memory", e))?;
        }
        fd.create_irq_chip()
            .map_err(|e| VmError::Kvm("create the in-kernel irqchip", e))?;
        mask_legacy_pic(&fd)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(|e| VmError::Kvm("create the in-kernel PIT", e))?;
        Ok(Self { kvm, fd })
    }
}

/// Leaves the 8259 pair the way firmware does: initialized, vectors at 0x20/0x28 and
/// every line masked. KVM creates it uninitialized (vector base 0, nothing masked), and
/// a guest that never touches it (Linux with hardware-reduced ACPI drops the legacy PIC,
/// yet keeps the boot CPU's LINT0 in ExtINT mode) would take a virtio interrupt on GSI
/// 5..15 a second time through it as vector 5..15: CPU exceptions (#BR for 5). A guest
/// that does use the PIC programs it anew.
fn mask_legacy_pic(fd: &VmFd) -> Result<(), VmError> {
    for (chip_id, vector_base) in [
        (KVM_IRQCHIP_PIC_MASTER, 0x20),
        (KVM_IRQCHIP_PIC_SLAVE, 0x28),
    ] {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        fd.get_irqchip(&mut chip)
            .map_err(|e| VmError::Kvm("read the PIC state", e))?;
        // SAFETY: for the two PIC chip ids KVM fills (and reads) the `pic` member of the
        // union; every bit pattern is a valid kvm_pic_state.
        let pic = unsafe { &mut chip.chip.pic };
        pic.imr = 0xff;
        pic.irq_base = vector_base;
        pic.init4 = 1;
        fd.set_irqchip(&chip)
            .map_err(|e| VmError::Kvm("mask the PIC", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn memory_past_the_guests_address_width_is_refused() {
        let gib = 1u64 << 30;
        let mem = |start: u64| {
            GuestMemoryMmap::<()>::from_ranges(&[
                (GuestAddress(0), 1 << 20),
                (GuestAddress(start), 1 << 20),
            ])
            .unwrap()
        };
        // Ends exactly at 512 GiB: the last byte is still addressable with 39 bits.
        assert!(check_phys_bits(&mem(512 * gib - (1 << 20)), 39).is_ok());
        let err = check_phys_bits(&mem(512 * gib), 39).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("0x8000100000") && text.contains("39-bit"),
            "{text}"
        );
        assert!(check_phys_bits(&mem(512 * gib), 46).is_ok());
    }
}
