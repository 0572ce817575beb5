//! The legacy PC devices a microVM keeps: a 16550 UART for the console and the i8042,
//! whose only job is the reset line that ends the VM.

pub mod acpi_pm;
pub mod capped;
pub mod i8042;
pub mod serial;

use vmm_sys_util::eventfd::EventFd;

/// A `vm_superio::Trigger` over an eventfd (an irqfd, or the VMM's exit event).
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
