//! Ending the VM. PID 1 must never return or exit (the kernel would panic), so
//! every way out goes through here.

use nix::sys::reboot::{reboot, RebootMode};

/// Syncs and powers the VM off. Without ACPI (cocoon-vmm has none) the
/// kernel's power-off only halts the CPUs and the VM would linger, so there
/// the VM is reset instead: every VMM we run treats a reset as the end
/// (QEMU with `-no-reboot`, cocoon-vmm on the i8042 reset of `reboot=k`).
/// A refused power-off falls back to a reset too.
pub fn power_off() -> ! {
    nix::unistd::sync();
    if !std::path::Path::new("/sys/firmware/acpi").exists() {
        let err = reboot(RebootMode::RB_AUTOBOOT);
        eprintln!("cocoon-agent: reset failed ({err:?})");
        std::process::exit(1)
    }
    let err = reboot(RebootMode::RB_POWER_OFF);
    eprintln!("cocoon-agent: power-off failed ({err:?}), resetting");
    let err = reboot(RebootMode::RB_AUTOBOOT);
    eprintln!("cocoon-agent: reset failed ({err:?})");
    // Nothing else can end the VM from here; exiting panics the kernel,
    // which `panic=-1` on the command line turns into a reset.
    std::process::exit(1)
}

/// Prints why the guest gives up and ends the VM (only when running as PID 1;
/// elsewhere, such as in tests, it just exits).
pub fn fatal(why: &str) -> ! {
    eprintln!("cocoon-agent: fatal: {why}; powering off");
    if std::process::id() == 1 {
        power_off();
    }
    std::process::exit(1)
}
