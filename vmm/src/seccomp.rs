//! Defense in depth for the VMM process: no_new_privs and a seccomp allowlist of the
//! syscalls the running VMM makes (after the VM is built: KVM, epoll, sockets for vsock,
//! file I/O for disks and the serial log, threads). Anything else traps with SIGSYS and
//! the process exits after naming the syscall on stderr.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Errors while installing the filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("Failed to build the seccomp filter")]
    Build(#[source] seccompiler::BackendError),
    #[error("Failed to compile the seccomp filter")]
    Compile(#[source] seccompiler::BackendError),
    #[error("Failed to install the seccomp filter")]
    Apply(#[source] seccompiler::Error),
    #[error("Failed to install the SIGSYS handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
}

/// Syscalls the VMM makes once the VM is built. Grouped by who needs them.
pub const ALLOWED: &[i64] = &[
    // vCPUs and the event loop.
    libc::SYS_ioctl, // KVM_RUN and friends on the vCPU and VM fds
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_create1,
    libc::SYS_eventfd2,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_unlink, // removing our own sockets at exit
    libc::SYS_unlinkat,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_timerfd_create,
    // Hybrid vsock and the API socket: Unix sockets only (socket(2) is allowed for
    // AF_UNIX alone, see `build_filter`).
    // Both listeners are bound before the filter goes on: no bind(2) or listen(2).
    libc::SYS_connect,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    // Threads, memory, signals, time: the Rust runtime.
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    // clone(2) is allowed for threads only (see `build_filter`); clone3 takes its flags
    // in memory, where a filter cannot look, so it stays open.
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl, // thread names
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction, // std sets up per-thread stack-overflow handling
    libc::SYS_rt_sigreturn,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Builds the filter with `mismatch` as the action for anything not allowed.
pub fn build_filter(mismatch: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|s| (*s, Vec::new())).collect();
    // The VMM only ever opens Unix sockets after boot (guest-initiated vsock connects).
    let unix_only = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::AF_UNIX as u64,
    )
    .and_then(|c| SeccompRule::new(vec![c]))
    .map_err(SeccompError::Build)?;
    rules.insert(libc::SYS_socket, vec![unix_only]);
    rules.insert(libc::SYS_clone, vec![threads_only()?]);
    rules.insert(libc::SYS_tgkill, own_signals()?);
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(SeccompError::Build)?;
    filter.try_into().map_err(SeccompError::Compile)
}

/// clone(2) only to make a thread of this process (CLONE_THREAD set), never a new one.
fn threads_only() -> Result<SeccompRule, SeccompError> {
    let thread = libc::CLONE_THREAD as u64;
    SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(thread),
        thread,
    )
    .and_then(|c| SeccompRule::new(vec![c]))
    .map_err(SeccompError::Build)
}

/// tgkill(2) only to this process's own threads, and only with the vCPU kick signal or
/// SIGABRT (a panic's abort): a compromised VMM cannot signal any other process.
fn own_signals() -> Result<Vec<SeccompRule>, SeccompError> {
    // SAFETY: getpid has no arguments and cannot fail.
    let pid = unsafe { libc::getpid() } as u64;
    [crate::vstate::vcpu::kick_signal(), libc::SIGABRT]
        .iter()
        .map(|sig| {
            let own = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, pid)?;
            let signal =
                SeccompCondition::new(2, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, *sig as u64)?;
            SeccompRule::new(vec![own, signal])
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(SeccompError::Build)
}

extern "C" fn sigsys_handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe calls here: format the number by hand, write, _exit.
    // SAFETY: the kernel passes a valid siginfo for SIGSYS; for SECCOMP traps the syscall
    // number is the i32 right after the pointer-sized si_call_addr in the union, at the
    // fixed offset 24 on x86_64 (siginfo header 16 bytes + 8-byte address).
    let nr = unsafe { *(info.cast::<u8>().add(24).cast::<i32>()) };
    let mut buf = *b"cocoon-vmm: seccomp blocked syscall           \n";
    let mut n = nr.unsigned_abs();
    let mut i = 45;
    loop {
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 36 {
            break;
        }
        i -= 1;
    }
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is valid.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), buf.len());
        libc::_exit(31);
    }
}

/// Sets no_new_privs and installs the filter on every thread of the process.
pub fn apply() -> Result<(), SeccompError> {
    install(&build_filter(SeccompAction::Trap)?)
}

fn install(bpf: &BpfProgram) -> Result<(), SeccompError> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, sigsys_handler)
        .map_err(SeccompError::Signal)?;
    // seccompiler sets PR_SET_NO_NEW_PRIVS before installing.
    seccompiler::apply_filter_all_threads(bpf).map_err(SeccompError::Apply)
}

/// The ioctls the vsock backend makes: setting a socket (non-)blocking and
/// close-on-exec. It has no KVM or vhost-kernel fd; the vhost-user protocol is messages.
const BACKEND_IOCTLS: &[u64] = &[libc::FIONBIO, libc::FIOCLEX, libc::FIONCLEX];

/// The vhost-user vsock backend's filter: the VMM's list less what only vCPUs need
/// (no `tgkill` at all), `ioctl` only for `BACKEND_IOCTLS`, plus `bind` and `listen` for
/// its two Unix listeners (it starts serving after the filter is on). Sockets: AF_UNIX
/// only; clone for threads only.
pub fn build_backend_filter(mismatch: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED
        .iter()
        .filter(|s| **s != libc::SYS_ioctl)
        .chain([libc::SYS_bind, libc::SYS_listen].iter())
        .map(|s| (*s, Vec::new()))
        .collect();
    let arg_is = |index: u8, len: SeccompCmpArgLen, value: u64| {
        SeccompCondition::new(index, len, SeccompCmpOp::Eq, value)
            .and_then(|c| SeccompRule::new(vec![c]))
            .map_err(SeccompError::Build)
    };
    let ioctls = BACKEND_IOCTLS
        .iter()
        .map(|req| arg_is(1, SeccompCmpArgLen::Dword, *req))
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_ioctl, ioctls);
    rules.insert(
        libc::SYS_socket,
        vec![arg_is(0, SeccompCmpArgLen::Dword, libc::AF_UNIX as u64)?],
    );
    rules.insert(libc::SYS_clone, vec![threads_only()?]);
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(SeccompError::Build)?;
    filter.try_into().map_err(SeccompError::Compile)
}

/// Installs the backend's filter on every thread of the process.
pub fn apply_backend() -> Result<(), SeccompError> {
    install(&build_backend_filter(SeccompAction::Trap)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backend_filter_allows_only_its_ioctls_and_no_signals_to_threads() {
        let bpf = build_backend_filter(SeccompAction::Errno(libc::EPERM as u32)).unwrap();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            seccompiler::apply_filter(&bpf).unwrap();
            // FIONBIO (set_nonblocking) passes.
            a.set_nonblocking(true).unwrap();
            // Any other ioctl does not (TIOCGWINSZ on a socket would be ENOTTY).
            let mut ws = libc::winsize {
                ws_row: 0,
                ws_col: 0,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: ioctl with a valid fd and a valid out pointer.
            let r = unsafe {
                libc::ioctl(
                    std::os::fd::AsRawFd::as_raw_fd(&a),
                    libc::TIOCGWINSZ,
                    &mut ws,
                )
            };
            assert_eq!(r, -1);
            assert_eq!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::EPERM)
            );
            // SAFETY: tgkill with signal 0 only checks; no pointers.
            let r = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::gettid(), 0) };
            assert_eq!(r, -1, "tgkill is the VMM's, not the backend's");
            // A network socket is refused; a Unix one is not.
            // SAFETY: socket(2) with integer arguments.
            let inet = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            assert_eq!(inet, -1);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn filter_allows_listed_and_refuses_others() {
        let bpf = build_filter(SeccompAction::Errno(libc::EPERM as u32)).unwrap();
        // Install on a scratch thread only (no TSYNC), so the test process is unaffected.
        std::thread::spawn(move || {
            seccompiler::apply_filter(&bpf).unwrap();
            // SAFETY: plain syscalls with no pointer arguments.
            let (pid, uid) = unsafe {
                (
                    libc::syscall(libc::SYS_getpid),
                    libc::syscall(libc::SYS_getuid),
                )
            };
            assert!(pid > 0, "getpid is allowed");
            assert_eq!(uid, -1, "getuid is not");
            assert_eq!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::EPERM)
            );
            // SAFETY: prctl with an integer option and no pointers.
            let nnp = unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) };
            assert_eq!(nnp, 1);
            // Signals: not another process, and not another signal to our own threads.
            // SAFETY: tgkill and getppid take integers only.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_tgkill,
                    libc::getppid(),
                    libc::getppid(),
                    libc::SIGTERM,
                )
            };
            assert_eq!(r, -1, "tgkill of another process passed");
            // SAFETY: as above; were it let through, SIGUSR1 would end the test process.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_tgkill,
                    libc::getpid(),
                    libc::gettid(),
                    libc::SIGUSR1,
                )
            };
            assert_eq!(r, -1, "tgkill with another signal passed");
            assert_eq!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::EPERM)
            );
            // Threads can still be made.
            std::thread::spawn(|| ()).join().unwrap();
        })
        .join()
        .unwrap();
    }
}
