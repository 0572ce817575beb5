//! A pod's janitor: a small process the shim starts beside each pod VM, which undoes
//! the pod if the shim dies before its teardown ended.
//!
//! The VM's processes die with the shim (`PR_SET_PDEATHSIG`); its share and mounts, run
//! directory and host cgroup do not. containerd's `shim delete` cleans up only for
//! tasks it still knows, so a shim killed after the Delete of the pod's last container
//! (before or during Shutdown) used to leave them until the next shim's sweep
//! (`podrecord::sweep`), which may never come on an idle node. runc's shim leaves
//! nothing in that case; neither do we now.
//!
//! The janitor blocks on a pipe whose only writer is the shim (close-on-exec, so no VM
//! process inherits it). The shim closes it once the pod's record is released, or the
//! kernel does as the shim dies. The janitor watches the record it was given as a
//! descriptor, not a path (a new pod of the same id would have a new record there).
//! Then: the record unlinked, the pod was torn down; still linked and nobody holds it,
//! the shim died first, and the janitor undoes the pod as a sweep would
//! (`podrecord::undo_if_abandoned`) and exits. It is the shim binary again (`/proc/self/exe`,
//! so an upgrade in place does not matter), named `cocoon-janitor`, in a session of its
//! own (a signal to the shim's group does not take it), not killed with the shim, with
//! only the capabilities undoing needs (removing what the jailed VM processes own,
//! killing what is left of them; not CAP_SYS_ADMIN: the share's mounts went with the
//! pod's mount namespace, `podns`), and no_new_privs. It reads nothing
//! the guest wrote but the share tree it removes (as the shim would: not following
//! links, not crossing mounts).

use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::podrecord::{self, AfterOwner};

/// argv[0] of a janitor, as process listings show it.
pub const NAME: &str = "cocoon-janitor";
/// The same, as the process's comm (`ps`, the pod metrics).
const NAME_C: &std::ffi::CStr = c"cocoon-janitor";
/// The action (argv[1]) that makes the shim binary a janitor.
pub const ACTION: &str = "janitor";
/// The janitor's descriptor of its pod's record (`Held::watch_copy`).
const RECORD_FD: RawFd = 3;
/// How long a dying shim's descriptors (its lock on the record) may take to close.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// The shim's end of a janitor.
pub struct Janitor {
    /// The pipe's only writer: closed, the janitor wakes.
    watch: OwnedFd,
    child: Child,
}

impl std::fmt::Debug for Janitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Janitor")
            .field("pid", &self.child.id())
            .finish()
    }
}

impl Janitor {
    /// Starts the janitor of the pod VM `vm_id` under `run_root`, whose record this shim
    /// holds; `record` is a descriptor of that record of the janitor's own
    /// (`Held::watch_copy`), which it gets as its fd 3.
    pub fn spawn(run_root: &Path, vm_id: &str, record: std::fs::File) -> std::io::Result<Janitor> {
        // Only the shim binary knows the janitor's action (a test harness would take it
        // for a filter and run tests).
        let exe = std::env::current_exe()?;
        let name = exe.file_name().unwrap_or_default().to_string_lossy();
        if !name.starts_with("containerd-shim-cocoon") {
            return Err(std::io::Error::other(format!(
                "{} is not the shim binary",
                exe.display()
            )));
        }
        let (read, watch) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let mut cmd = Command::new("/proc/self/exe");
        cmd.arg0(NAME)
            .arg(ACTION)
            .arg(run_root)
            .arg(vm_id)
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::from(read))
            .stdout(Stdio::null())
            .stderr(log_fifo());
        if let Some(filter) = std::env::var_os("COCOON_LOG") {
            cmd.env("COCOON_LOG", filter);
        }
        let fd = record.as_raw_fd();
        // SAFETY: setsid, dup2 and fcntl between fork and exec are async-signal-safe and
        // touch no memory of the parent; `record` outlives the spawn.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // dup2 onto itself would keep close-on-exec: clear it instead.
                let r = if fd == RECORD_FD {
                    libc::fcntl(fd, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, RECORD_FD)
                };
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        drop(record);
        Ok(Janitor { watch, child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The pod was torn down and its record removed: the janitor finds none and exits.
    pub fn dismiss(self) {
        drop(self.watch);
        let mut child = self.child;
        // Reaped off the caller's path; it exits at once.
        std::thread::spawn(move || child.wait());
    }
}

/// The bundle's `log` fifo (the shim's cwd), which containerd copies into its log, as
/// the shim's own logs: what the janitor undid is said where the shim would have.
fn log_fifo() -> Stdio {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("log")
        .map_or_else(|_| Stdio::null(), Stdio::from)
}

/// The janitor process: `cocoon-janitor janitor <run root> <vm id>`. Returns the exit
/// code.
pub fn main(args: &[OsString]) -> i32 {
    let filter = tracing_subscriber::EnvFilter::try_from_env("COCOON_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .try_init();
    let (run_root, vm_id) = match args {
        [_, root, id] if Path::new(root).is_absolute() => {
            (PathBuf::from(root), id.to_string_lossy().into_owned())
        }
        _ => {
            tracing::error!("{NAME}: usage: {NAME} {ACTION} <absolute run root> <vm id>");
            return 2;
        }
    };
    if !podrecord::is_vm_id(&vm_id) {
        tracing::error!("{NAME}: {vm_id:?} is not a pod VM id");
        return 2;
    }
    // `ps` and the pod's metrics show it by this name, not the binary's.
    let _ = nix::sys::prctl::set_name(NAME_C);
    let Some(record) = inherited_record() else {
        tracing::error!(vm = %vm_id, "{NAME}: fd {RECORD_FD} is not a pod record, not watching");
        return 2;
    };
    if let Err(e) = confine().and_then(|()| filter_syscalls()) {
        tracing::error!(vm = %vm_id, "{NAME}: cannot confine itself, not watching: {e}");
        return 1;
    }
    wait_for_close(std::io::stdin());
    match podrecord::undo_if_abandoned(&run_root, &vm_id, record, LOCK_WAIT) {
        AfterOwner::Released => {}
        AfterOwner::Undone => tracing::warn!(
            vm = %vm_id,
            "the pod's shim died before tearing it down: undid its share, run dir and cgroup"
        ),
        AfterOwner::StillHeld => tracing::info!(
            vm = %vm_id,
            "the pod's record is held by another process after its shim let go: theirs"
        ),
    }
    0
}

/// The record the shim gave this janitor: fd 3, a regular file. Taken only once.
fn inherited_record() -> Option<std::fs::File> {
    // SAFETY: a zeroed stat is a valid buffer for fstat to fill.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat only writes into `st`, which outlives the call.
    let open = unsafe { libc::fstat(RECORD_FD, &mut st) } == 0;
    if !open || st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return None;
    }
    // SAFETY: fd 3 is open and a regular file, and nothing else in this process owns
    // it (the shim put it there for this; `main` takes it once).
    Some(unsafe { std::fs::File::from_raw_fd(RECORD_FD) })
}

/// Blocks until every writer of `pipe` has closed it.
fn wait_for_close(mut pipe: impl std::io::Read) {
    let mut buf = [0u8; 64];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Keeps the capabilities undoing a pod needs, and no others, for good.
fn confine() -> Result<(), String> {
    use caps::{CapSet, Capability};
    // No CAP_SYS_ADMIN: the share's mounts are in the pod's own mount namespace
    // (`podns`), which ended with the shim and the VM's processes; removing the
    // share's directories is all that is left of it.
    let keep: caps::CapsHashSet = [
        // Removing what the jailed VM processes own and killing what is left of them.
        Capability::CAP_DAC_OVERRIDE,
        Capability::CAP_DAC_READ_SEARCH,
        Capability::CAP_FOWNER,
        Capability::CAP_KILL,
    ]
    .into_iter()
    .collect();
    for cap in caps::runtime::thread_all_supported() {
        if !keep.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap).map_err(|e| format!("bounding set: {e}"))?;
        }
    }
    let have = caps::read(None, CapSet::Permitted).map_err(|e| e.to_string())?;
    let keep: caps::CapsHashSet = keep.intersection(&have).copied().collect();
    caps::clear(None, CapSet::Ambient).map_err(|e| format!("ambient set: {e}"))?;
    caps::clear(None, CapSet::Inheritable).map_err(|e| format!("inheritable set: {e}"))?;
    caps::set(None, CapSet::Effective, &keep).map_err(|e| format!("effective set: {e}"))?;
    caps::set(None, CapSet::Permitted, &keep).map_err(|e| format!("permitted set: {e}"))?;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(format!("no_new_privs: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The syscalls a janitor makes once confined: waiting on its pipe, locking and reading
/// its record, reading `/proc/<pid>/cmdline` and killing what is left of the VM,
/// removing the share, run dir and cgroup directories, logging, and what
/// the Rust runtime needs for memory, time and exit. Anything else fails with EPERM (the
/// call is not made; the undoing goes on with what it can do, as it would after any
/// other error, rather than leaving everything behind). No exec, no mount, no socket,
/// no ptrace, no `open_by_handle_at` (which CAP_DAC_READ_SEARCH would otherwise open).
const ALLOWED: &[i64] = &[
    // Files and directories.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_openat,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fcntl,
    libc::SYS_flock,
    libc::SYS_getdents64,
    libc::SYS_unlinkat,
    libc::SYS_unlink,
    libc::SYS_rmdir,
    // What is left of the VM.
    libc::SYS_kill,
    // Memory (no PROT_EXEC: see `filter_syscalls`), time, signals, exit.
    libc::SYS_brk,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Installs the janitor's allow-list (`ALLOWED`; mmap and mprotect only without
/// PROT_EXEC). Needs no_new_privs, which `confine` set.
fn filter_syscalls() -> Result<(), String> {
    use seccompiler::{SeccompAction, SeccompFilter, SeccompRule, TargetArch};
    let no_exec =
        cocoon_vmm::seccomp::never_executable().map_err(|e| format!("seccomp rule: {e}"))?;
    let mut rules: std::collections::BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|s| (*s, Vec::new())).collect();
    rules.insert(libc::SYS_mmap, vec![no_exec.clone()]);
    rules.insert(libc::SYS_mprotect, vec![no_exec]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| format!("seccomp filter: {e}"))?;
    let program: seccompiler::BpfProgram = filter
        .try_into()
        .map_err(|e| format!("seccomp filter: {e}"))?;
    seccompiler::apply_filter(&program).map_err(|e| format!("seccomp filter: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watch_ends_when_every_writer_is_gone() {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let waiter = std::thread::spawn(move || wait_for_close(std::fs::File::from(read)));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "woke while the writer was open");
        drop(write);
        waiter.join().unwrap();
    }

    #[test]
    fn bad_arguments_are_refused_before_anything_is_touched() {
        let a = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(main(&a(&[ACTION])), 2);
        assert_eq!(main(&a(&[ACTION, "relative", "pod-ab"])), 2);
        assert_eq!(main(&a(&[ACTION, "/run/cocoon", "../etc"])), 2);
    }
}
