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
    /// Listed modules not needed to reach the agent, for `load_deferred`.
    pub deferred: Vec<modules::ModuleEntry>,
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
    Mnt {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
];

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
    let has_pci = modules::has_pci_devices();
    let (critical, deferred) = if Path::new(MODULES_LIST).exists() {
        modules::read_list(Path::new(MODULES_LIST))?
            .into_iter()
            .partition(|e| modules::is_boot_critical(&e.name, has_pci))
    } else {
        (Vec::new(), Vec::new())
    };
    let modules = modules::load(critical, &cmdline)?;
    Ok(EarlyInit {
        cmdline,
        modules,
        deferred,
    })
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
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .try_init();
}

/// Set in the environment of the re-executed agent once `/` is a tmpfs.
const SWITCHED_ENV: &str = "COCOON_SWITCHED_ROOT";
/// Carries the first start's boot time across the re-exec, for the reports.
pub const START_NS_ENV: &str = "COCOON_AGENT_START_NS";

#[derive(Debug, Error)]
pub enum SwitchRootError {
    #[error("cannot {what} while leaving the initramfs")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot {what} while leaving the initramfs")]
    Sys {
        what: &'static str,
        #[source]
        source: nix::Error,
    },
}

/// The initramfs is the kernel's initial root mount, which `pivot_root`
/// refuses (EINVAL): containers could only be entered by chroot, which a
/// process with CAP_SYS_CHROOT can escape. So PID 1 moves the image onto a
/// tmpfs first, as `switch_root` does: copy, free the old files, move the
/// tmpfs over `/`, chroot into it, and re-execute itself from there.
/// Returns only if already switched.
pub fn leave_initramfs(start_boottime_ns: i64) -> Result<(), SwitchRootError> {
    use nix::unistd::{chdir, chroot, execve};
    if std::env::var_os(SWITCHED_ENV).is_some() {
        return Ok(());
    }
    let io = |what: String| move |source| SwitchRootError::Io { what, source };
    let sys = |what: &'static str| move |source| SwitchRootError::Sys { what, source };
    let new_root = Path::new("/newroot");
    fs::create_dir_all(new_root).map_err(io("create /newroot".into()))?;
    mount(Some("tmpfs"), new_root, Some("tmpfs"), MsFlags::empty(), Some("mode=0755"))
        .map_err(sys("mount a tmpfs on /newroot"))?;
    for entry in fs::read_dir("/").map_err(io("list /".into()))? {
        let entry = entry.map_err(io("list /".into()))?;
        if entry.file_name() == "newroot" {
            continue;
        }
        let to = new_root.join(entry.file_name());
        copy_tree(&entry.path(), &to)?;
        // Free the initramfs copy as we go: it stays in RAM otherwise.
        let _ = if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            fs::remove_dir_all(entry.path())
        } else {
            fs::remove_file(entry.path())
        };
    }
    chdir(new_root).map_err(sys("enter /newroot"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(sys("move /newroot over /"))?;
    chroot(".").map_err(sys("chroot into the new root"))?;
    chdir("/").map_err(sys("enter the new root"))?;
    let prog = std::ffi::CString::new("/init").expect("no NUL");
    let mut env: Vec<std::ffi::CString> = std::env::vars()
        .filter_map(|(k, v)| std::ffi::CString::new(format!("{k}={v}")).ok())
        .collect();
    env.push(std::ffi::CString::new(format!("{SWITCHED_ENV}=1")).expect("no NUL"));
    env.push(std::ffi::CString::new(format!("{START_NS_ENV}={start_boottime_ns}")).expect("no NUL"));
    let err = execve(&prog, &[prog.clone()], &env).unwrap_err();
    Err(SwitchRootError::Sys { what: "re-execute /init", source: err })
}

/// Copies a file tree, keeping modes, symlinks and device nodes.
fn copy_tree(from: &Path, to: &Path) -> Result<(), SwitchRootError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let io = |what: String| move |source| SwitchRootError::Io { what, source };
    let meta = fs::symlink_metadata(from).map_err(io(format!("stat {}", from.display())))?;
    let ft = meta.file_type();
    if ft.is_dir() {
        fs::create_dir(to).map_err(io(format!("create {}", to.display())))?;
        for e in fs::read_dir(from).map_err(io(format!("list {}", from.display())))? {
            let e = e.map_err(io(format!("list {}", from.display())))?;
            copy_tree(&e.path(), &to.join(e.file_name()))?;
        }
        fs::set_permissions(to, fs::Permissions::from_mode(meta.mode() & 0o7777))
            .map_err(io(format!("chmod {}", to.display())))?;
    } else if ft.is_symlink() {
        let target = fs::read_link(from).map_err(io(format!("read link {}", from.display())))?;
        std::os::unix::fs::symlink(target, to).map_err(io(format!("link {}", to.display())))?;
    } else if ft.is_file() {
        fs::copy(from, to).map_err(io(format!("copy {}", from.display())))?;
    } else {
        // Device nodes (the image's /dev/console), fifos, sockets.
        let kind = nix::sys::stat::SFlag::from_bits_truncate(meta.mode());
        let perm = nix::sys::stat::Mode::from_bits_truncate(meta.mode());
        nix::sys::stat::mknod(to, kind, perm, meta.rdev())
            .map_err(|e| SwitchRootError::Io { what: format!("mknod {}", to.display()), source: e.into() })?;
    }
    Ok(())
}

#[cfg(test)]
mod switch_tests {
    use super::*;

    #[test]
    fn copy_tree_keeps_modes_and_links() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        fs::create_dir_all(src.join("lib/modules")).unwrap();
        fs::write(src.join("init"), b"agent").unwrap();
        fs::set_permissions(src.join("init"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(src.join("lib/modules/a.ko"), b"ko").unwrap();
        std::os::unix::fs::symlink("init", src.join("sbin-init")).unwrap();
        copy_tree(&src, &d.path().join("dst")).unwrap();
        let dst = d.path().join("dst");
        assert_eq!(fs::read(dst.join("init")).unwrap(), b"agent");
        assert_eq!(fs::metadata(dst.join("init")).unwrap().permissions().mode() & 0o777, 0o755);
        assert_eq!(fs::read(dst.join("lib/modules/a.ko")).unwrap(), b"ko");
        assert_eq!(fs::read_link(dst.join("sbin-init")).unwrap(), Path::new("init"));
    }
}
