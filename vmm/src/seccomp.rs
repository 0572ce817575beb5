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
    libc::SYS_clone,
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
    libc::SYS_tgkill, // kicking vCPUs out of KVM_RUN
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
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(SeccompError::Build)?;
    filter.try_into().map_err(SeccompError::Compile)
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
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, sigsys_handler)
        .map_err(SeccompError::Signal)?;
    let bpf = build_filter(SeccompAction::Trap)?;
    // seccompiler sets PR_SET_NO_NEW_PRIVS before installing.
    seccompiler::apply_filter_all_threads(&bpf).map_err(SeccompError::Apply)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        })
        .join()
        .unwrap();
    }
}
