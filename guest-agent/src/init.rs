//! Early init: everything PID 1 must do before it can serve — the pseudo
//! filesystems, a working console, and the kernel modules listed in the image.

use std::fs;
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::mount::{mount, MsFlags};
use thiserror::Error;

use crate::modules;

/// Where the image builder lists the modules to load, in dependency order.
pub const MODULES_LIST: &str = "/etc/cocoon/modules";

#[derive(Debug, Error)]
pub enum InitError {
    #[error("cannot create mount point {0}")]
    MountPoint(String, #[source] std::io::Error),
    #[error("cannot mount {fstype} on {target}")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("cannot read the kernel command line")]
    Cmdline(#[source] std::io::Error),
    #[error(transparent)]
    Modules(#[from] modules::ModuleError),
}

/// What early init learned, for the agent's later reports.
#[derive(Debug, Default)]
pub struct EarlyInit {
    pub cmdline: String,
    /// Modules loaded before the server starts.
    pub modules: Vec<String>,
    /// Listed modules not needed to reach the agent, loaded right after it serves.
    pub deferred: Vec<modules::ModuleEntry>,
    /// Listed modules loaded only when first needed (`modules::ON_DEMAND`).
    pub on_demand: Vec<modules::ModuleEntry>,
}

struct Mnt {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// Mounted in this order; later entries live under earlier ones.
const MOUNTS: &[Mnt] = &[
    Mnt {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    Mnt {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mnt {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mnt {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
    Mnt {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    Mnt {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("newinstance,ptmxmode=0666,mode=0620"),
    },
    Mnt {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: Some("mode=1777"),
    },
    // Mounted without `favordynmods`: [`favor_dynmods`] turns it on off the boot path.
    Mnt {
        source: "cgroup2",
        target: crate::cgroup::CGROUP_ROOT,
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
];

/// cgroup2's `favordynmods` (Linux 6.0+): the kernel stops waiting out an RCU grace
/// period at every task migration and controller change. Each container's helper is
/// moved into its cgroup, and on a one-vCPU TCG guest that wait was 12-15 ms of every
/// create and exec. Forks and exits take a slightly slower lock path instead.
const CGROUP2_FAVOR_DYNMODS: &str = "favordynmods";

/// Turns on `favordynmods` on the guest's cgroup2 by a remount. Turning it on costs
/// itself: mounted with the option, cgroup2 took 10-12 ms of every boot under TCG
/// (against 1 ms without). The boot does not need it, only containers do, so the agent
/// remounts once the sandbox is created, while the host prepares the first container
/// and the guest would be idle. A create that comes before it is done is only slower.
/// A kernel that refuses the option (before 6.0) keeps the mount as it is. Only the
/// option is named: a cgroup2 remount resets the others, and the boot mount has none.
pub fn favor_dynmods() -> nix::Result<()> {
    mount(
        None::<&str>,
        crate::cgroup::CGROUP_ROOT,
        None::<&str>,
        MsFlags::MS_REMOUNT | NOSUID_NODEV_NOEXEC,
        Some(CGROUP2_FAVOR_DYNMODS),
    )
}

/// Mounts the guest's file systems, reads the command line, and loads the boot-critical
/// modules (Cocoon's kernel has them built in).
pub fn early_init() -> Result<EarlyInit, InitError> {
    for m in MOUNTS {
        fs::create_dir_all(m.target).map_err(|e| InitError::MountPoint(m.target.into(), e))?;
        match mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data) {
            // Already mounted (e.g. devtmpfs auto-mounted by the kernel).
            Ok(()) | Err(nix::Error::EBUSY) => {}
            Err(source) => {
                return Err(InitError::Mount {
                    fstype: m.fstype,
                    target: m.target,
                    source,
                })
            }
        }
        if m.target == "/dev" {
            attach_console();
        }
    }
    // Subreaper for any future sub-inits; as PID 1 we reap orphans anyway.
    let _ = nix::sys::prctl::set_child_subreaper(true);

    let cmdline = fs::read_to_string("/proc/cmdline").map_err(InitError::Cmdline)?;
    let cmdline = cmdline.trim().to_string();
    free_the_rtc_irq(Path::new("/sys"));
    let (critical, rest): (Vec<_>, Vec<_>) = if Path::new(MODULES_LIST).exists() {
        let list = modules::read_list(Path::new(MODULES_LIST))?;
        // The bus is looked at only when it decides something: Cocoon's kernel has
        // the transports built in, and its list holds only the block driver.
        let has_pci = modules::needs_pci_check(&list) && modules::has_pci_devices();
        list.into_iter()
            .partition(|e| modules::is_boot_critical(&e.name, has_pci))
    } else {
        (Vec::new(), Vec::new())
    };
    let (on_demand, deferred) = rest
        .into_iter()
        .partition(|e| modules::ON_DEMAND.contains(&e.name.as_str()));
    let modules = modules::load(critical, &cmdline)?;
    Ok(EarlyInit {
        cmdline,
        modules,
        deferred,
        on_demand,
    })
}

/// The RTC driver's platform device, and how to let it go.
const RTC_CMOS: &str = "bus/platform/drivers/rtc_cmos";

/// A QEMU microvm without ACPI (how Cocoon runs it) wires its virtio-mmio transports to
/// the legacy IRQs 5-12, the fifth on IRQ 8, the RTC's. A kernel with an RTC driver
/// (Debian's) holds IRQ 8 for it, exclusively, and that device's driver would then fail
/// to start. The RTC has done its one job by now (the boot's wall clock; the host's is
/// stepped in with CreateSandbox), so it is let go before the virtio transport loads.
/// Cocoon's kernel has no RTC driver, and where there is ACPI the transports have IRQs
/// of their own: nothing to do. Under `sys` (sysfs).
pub fn free_the_rtc_irq(sys: &Path) {
    let driver = sys.join(RTC_CMOS);
    if sys.join("firmware/acpi").exists() || !driver.join("rtc_cmos").exists() {
        return;
    }
    if let Err(e) = fs::write(driver.join("unbind"), "rtc_cmos") {
        eprintln!("cocoon-agent: cannot unbind the RTC driver from IRQ 8: {e}");
    }
}

/// Makes sure fds 0-2 are the console: the kernel only opens it for init when
/// the initramfs has /dev/console, so do it here if it did not.
fn attach_console() {
    // SAFETY: fcntl(F_GETFD) on a plain integer fd only queries flags.
    let stdout_ok = unsafe { libc::fcntl(1, libc::F_GETFD) } >= 0;
    if stdout_ok {
        return;
    }
    let Ok(console) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    else {
        return;
    };
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors, which are not open
        // (stdout was checked above) and owned by no Rust object.
        unsafe { libc::dup2(console.as_raw_fd(), fd) };
    }
}

/// Logs go to the console (stderr). `cocoon.log=<level>` on the kernel
/// command line sets the level: error, warn, info (default), debug, trace.
/// Keep info quiet: every console byte is a VM exit under emulation.
pub fn setup_logging(cmdline: &str) {
    let level = crate::cmdline::value(cmdline, "cocoon.log").unwrap_or("info");
    let fmt = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time();
    // A plain level, the usual case, needs no directive parser: under TCG that code,
    // run once at every boot, cost about as much as the rest of the logging set-up.
    let _ = match level.parse::<tracing::level_filters::LevelFilter>() {
        Ok(max) => fmt.with_max_level(max).try_init(),
        Err(_) => fmt
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_new(level)
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
            )
            .try_init(),
    };
}

/// Mounts configfs at `/sys/kernel/config`, where the kernel's TSM reports (the guest's
/// hardware evidence) live. Already mounted is fine; a failure is logged and left for
/// the evidence check to report with its path.
pub fn mount_configfs() {
    let target = "/sys/kernel/config";
    match mount(
        Some("configfs"),
        target,
        Some("configfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    ) {
        Ok(()) | Err(nix::Error::EBUSY) => {}
        Err(e) => tracing::warn!("cannot mount configfs on {target}: {e}"),
    }
}

#[derive(Debug, Error)]
#[error("cannot {what} while leaving the initramfs root")]
pub struct SwitchRootError {
    what: &'static str,
    #[source]
    source: nix::Error,
}

/// The initramfs is the kernel's initial root mount, which has no parent, and
/// `pivot_root` refuses such a root (EINVAL): containers could then only be
/// entered by chroot, which a process with CAP_SYS_CHROOT can escape. A bind
/// mount of `/` moved over `/` is the same tree with a parent mount, which
/// `pivot_root` accepts; nothing is copied. Run once, first thing, as PID 1.
pub fn leave_initramfs() -> Result<(), SwitchRootError> {
    use nix::unistd::{chdir, chroot};
    let err = |what| move |source| SwitchRootError { what, source };
    let new_root = Path::new("/newroot");
    if let Err(e) = fs::create_dir(new_root) {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(SwitchRootError {
                what: "create /newroot",
                source: nix::Error::from_raw(e.raw_os_error().unwrap_or(0)),
            });
        }
    }
    mount(
        Some("/"),
        new_root,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(err("bind / on /newroot"))?;
    chdir(new_root).map_err(err("enter /newroot"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(err("move /newroot over /"))?;
    chroot(".").map_err(err("chroot into the new root"))?;
    chdir("/").map_err(err("enter the new root"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sysfs with the RTC driver bound, and ACPI or not.
    fn sysfs(acpi: bool, rtc: bool) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        if acpi {
            fs::create_dir_all(d.path().join("firmware/acpi")).unwrap();
        }
        let driver = d.path().join(RTC_CMOS);
        fs::create_dir_all(&driver).unwrap();
        if rtc {
            fs::create_dir(driver.join("rtc_cmos")).unwrap();
        }
        d
    }

    #[test]
    fn the_rtc_lets_go_of_irq_8_only_without_acpi() {
        let unbound =
            |d: &tempfile::TempDir| fs::read_to_string(d.path().join(RTC_CMOS).join("unbind")).ok();
        let d = sysfs(false, true);
        free_the_rtc_irq(d.path());
        assert_eq!(unbound(&d).as_deref(), Some("rtc_cmos"));
        for (acpi, rtc) in [(true, true), (false, false)] {
            let d = sysfs(acpi, rtc);
            free_the_rtc_irq(d.path());
            assert_eq!(unbound(&d), None, "acpi {acpi}, rtc {rtc}");
        }
    }
}
