//! QEMU's microvm machine as Cocoon boots it: with or without ACPI, and what that
//! takes on the kernel command line.

use super::VmSpec;

/// QEMU's microvm as Cocoon runs it (and `cocoon bench boot`'s baseline, which must boot
/// the same machine). Without ACPI where the kernel takes its virtio-mmio devices from
/// the command line (`virtio_mmio.device=`, which QEMU writes when ACPI is off; Cocoon's
/// kernel does, Debian's does not: `Config::kernel_takes_virtio_mmio_cmdline`). A
/// microvm has nothing to hotplug through ACPI (disk slots are filled over QMP, memory
/// grows on `pc`), and without ACPI tables the kernel skips its AML interpreter,
/// namespace and PnP scan: a raw TCG boot of Cocoon's kernel reached `reboot` in 390
/// against 420 ms (medians of 12 alternating). The agent ends such a VM with a reset,
/// which `-no-reboot` makes QEMU's exit (`guest-agent/src/power.rs`).
///
/// The RTC stays: without it the kernel waits a second for a clock that never ticks.
/// Without ACPI there is no second IOAPIC, so the virtio-mmio transports take the legacy
/// IRQs 5-12, and the fifth device (a pod's first disk slot) shares IRQ 8 with the RTC.
/// The RTC drives that line only if the guest enables its interrupts or reads its
/// status register C, which Cocoon's kernel (no RTC driver) never does; a privileged
/// container poking its ports could only upset its own pod's disk. (A kernel with an RTC
/// driver holds IRQ 8; the agent lets it go: `free_the_rtc_irq`.)
pub fn microvm_machine(acpi: bool) -> &'static str {
    if acpi {
        "microvm,rtc=on"
    } else {
        "microvm,rtc=on,acpi=off"
    }
}

/// The virtio-mmio transports of a microvm without ACPI: one IOAPIC, legacy IRQs 5-12.
/// With ACPI it has 24. QEMU refuses a ninth device ("No 'virtio-bus' bus found").
pub const MICROVM_LEGACY_TRANSPORTS: usize = 8;

/// The virtio-mmio devices of a microvm for `spec`: vsock, the share, the network, the
/// balloon, the disk slots, and (counted as such) every `-device` of `extra_args`.
pub fn virtio_mmio_devices(spec: &VmSpec, balloon: bool, extra_args: &[String]) -> usize {
    1 + usize::from(spec.shared_dir.is_some())
        + usize::from(spec.net.is_some())
        + usize::from(balloon)
        + usize::from(spec.block_slots)
        + extra_args.iter().filter(|a| *a == "-device").count()
}

/// Kernel parameters for a microvm guest: no PCI bus, and without ACPI no search for
/// the tables there are none of (the search's error would be a console line per boot).
pub fn microvm_kernel_params(acpi: bool) -> &'static [&'static str] {
    if acpi {
        &["pci=off"]
    } else {
        &["pci=off", "acpi=off"]
    }
}
