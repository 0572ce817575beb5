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
    libc::SYS_ioctl, // KVM_RUN and the socket flags only (`VMM_IOCTLS`)
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
    libc::SYS_ftruncate, // a snapshot's files, opened before the filter
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
    libc::SYS_mmap, // never executable (see `build_filter`)
    libc::SYS_munmap,
    libc::SYS_mprotect, // never executable
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    // clone(2) is allowed for threads only (see `build_filter`); clone3 takes its flags
    // in memory, where a filter cannot look, so it stays open.
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl, // thread names only (`PRCTL_OPS`)
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

/// `_IO(KVMIO, 0x80)`: the one KVM ioctl the running VMM makes. Everything else (vCPU
/// registers, memory slots, irqfds, the stats fd) is set up before the filter goes on,
/// and interrupts are eventfd writes.
pub const KVM_RUN: u64 = 0xAE80;

/// `_IOR(KVMIO, 0x81, struct kvm_regs)` and `_IOR(KVMIO, 0x83, struct kvm_sregs)`: a vCPU
/// thread reads its own registers for the log line when the guest triple-faults. They
/// only read state the VMM set up itself.
pub const KVM_GET_REGS: u64 = 0x8090_AE81;
pub const KVM_GET_SREGS: u64 = 0x8138_AE83;

const fn kvm_ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (0xAE << 8) | nr
}
const fn kvm_iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (0xAE << 8) | nr
}

/// The getters a snapshot makes (`vstate::snapshot`): each vCPU thread reads its own
/// state while paused, the event loop the VM's irqchip, PIT and clock. All only read.
pub const SNAPSHOT_IOCTLS: &[u64] = &[
    kvm_iowr(0x88, std::mem::size_of::<kvm_bindings::kvm_msrs>()),
    kvm_ior(0x98, std::mem::size_of::<kvm_bindings::kvm_mp_state>()),
    kvm_ior(0xa4, std::mem::size_of::<kvm_bindings::kvm_xsave>()),
    kvm_ior(0xa6, std::mem::size_of::<kvm_bindings::kvm_xcrs>()),
    kvm_ior(0xa1, std::mem::size_of::<kvm_bindings::kvm_debugregs>()),
    kvm_ior(0x8e, std::mem::size_of::<kvm_bindings::kvm_lapic_state>()),
    kvm_ior(0x9f, std::mem::size_of::<kvm_bindings::kvm_vcpu_events>()),
    kvm_iowr(0x62, std::mem::size_of::<kvm_bindings::kvm_irqchip>()),
    kvm_ior(0x9f, std::mem::size_of::<kvm_bindings::kvm_pit_state2>()),
    kvm_ior(0x7c, std::mem::size_of::<kvm_bindings::kvm_clock_data>()),
];

/// The ioctls the running VMM makes: KVM_RUN on its vCPUs (and reading their registers
/// when the VM ends badly, or all their state for a snapshot), what the standard
/// library does to the sockets it accepts or connects (non-blocking, close-on-exec),
/// and the logger's "is stderr a terminal" (TCGETS, which only reads).
pub const VMM_IOCTLS: &[u64] = &[
    KVM_RUN,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    SNAPSHOT_IOCTLS[0],
    SNAPSHOT_IOCTLS[1],
    SNAPSHOT_IOCTLS[2],
    SNAPSHOT_IOCTLS[3],
    SNAPSHOT_IOCTLS[4],
    SNAPSHOT_IOCTLS[5],
    SNAPSHOT_IOCTLS[6],
    SNAPSHOT_IOCTLS[7],
    SNAPSHOT_IOCTLS[8],
    SNAPSHOT_IOCTLS[9],
    libc::FIONBIO,
    libc::FIOCLEX,
    libc::FIONCLEX,
    libc::TCGETS,
];

/// The prctl operations the running VMM makes: naming threads (and reading a name or
/// no_new_privs back, or setting it before a stacked filter). Not dumpable, not
/// PR_SET_MM, not PR_SET_SECCOMP.
const PRCTL_OPS: &[i32] = &[
    libc::PR_SET_NAME,
    libc::PR_GET_NAME,
    libc::PR_GET_NO_NEW_PRIVS,
    // Setting it again (seccompiler does before each filter it adds) only restricts.
    libc::PR_SET_NO_NEW_PRIVS,
];

/// A rule per value of argument `index` (compared as 32 bits: ioctl's request and
/// prctl's option are ints to the kernel).
fn one_of(
    index: u8,
    values: impl IntoIterator<Item = u64>,
) -> Result<Vec<SeccompRule>, SeccompError> {
    values
        .into_iter()
        .map(|v| {
            SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)
                .and_then(|c| SeccompRule::new(vec![c]))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(SeccompError::Build)
}

/// Memory protections without PROT_EXEC (argument 2 of mmap and mprotect): a VMM
/// that runs guest-fed code paths never needs to make memory executable after start,
/// so an exploit cannot map its own code. (The shim's pod janitor uses it too.)
pub fn never_executable() -> Result<SeccompRule, SeccompError> {
    let exec = libc::PROT_EXEC as u64;
    SeccompCondition::new(2, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(exec), 0)
        .and_then(|c| SeccompRule::new(vec![c]))
        .map_err(SeccompError::Build)
}

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
    rules.insert(libc::SYS_ioctl, one_of(1, VMM_IOCTLS.iter().copied())?);
    rules.insert(
        libc::SYS_prctl,
        one_of(0, PRCTL_OPS.iter().map(|&o| o as u64))?,
    );
    // Only to add a filter (which can only take away): the event loop's, once the
    // vCPUs run.
    rules.insert(
        libc::SYS_seccomp,
        one_of(0, [u64::from(libc::SECCOMP_SET_MODE_FILTER)])?,
    );
    rules.insert(libc::SYS_mmap, vec![never_executable()?]);
    rules.insert(libc::SYS_mprotect, vec![never_executable()?]);
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

/// Appends `v` to `buf` at `*at` in decimal (`radix` 10) or hex; no allocation.
fn put_num(buf: &mut [u8], at: &mut usize, mut v: u64, radix: u64) {
    let mut digits = [0u8; 20];
    let mut n = 0;
    loop {
        let d = (v % radix) as u8;
        digits[n] = if d < 10 { b'0' + d } else { b'a' + d - 10 };
        n += 1;
        v /= radix;
        if v == 0 {
            break;
        }
    }
    while n > 0 && *at < buf.len() {
        n -= 1;
        buf[*at] = digits[n];
        *at += 1;
    }
}

fn put(buf: &mut [u8], at: &mut usize, s: &[u8]) {
    for &c in s {
        if *at < buf.len() {
            buf[*at] = c;
            *at += 1;
        }
    }
}

extern "C" fn sigsys_handler(_: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // Only async-signal-safe calls here: format by hand into the stack, write, _exit.
    // SAFETY: the kernel passes a valid siginfo for SIGSYS; for SECCOMP traps the syscall
    // number is the i32 right after the pointer-sized si_call_addr in the union, at the
    // fixed offset 24 on x86_64 (siginfo header 16 bytes + 8-byte address).
    let nr = unsafe { *(info.cast::<u8>().add(24).cast::<i32>()) };
    // SAFETY: an SA_SIGINFO handler's third argument is the interrupted ucontext; the
    // syscall's arguments are in its saved registers (rdi, rsi, rdx).
    let args = unsafe {
        let g = &(*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs;
        [
            g[libc::REG_RDI as usize],
            g[libc::REG_RSI as usize],
            g[libc::REG_RDX as usize],
        ]
    };
    let mut buf = [0u8; 128];
    let mut at = 0;
    put(&mut buf, &mut at, b"cocoon-vmm: seccomp blocked syscall ");
    put_num(&mut buf, &mut at, u64::from(nr.unsigned_abs()), 10);
    put(&mut buf, &mut at, b" (args");
    for a in args {
        put(&mut buf, &mut at, b" 0x");
        put_num(&mut buf, &mut at, a as u64, 16);
    }
    put(&mut buf, &mut at, b")\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is valid.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), at);
        libc::_exit(31);
    }
}

/// Sets no_new_privs and installs the filter on every thread of the process.
pub fn apply() -> Result<(), SeccompError> {
    // Stacked under the allowlist: clone3 answers ENOSYS, so the C library makes
    // threads with clone(2), whose flags the allowlist checks (clone3's are in memory,
    // out of a filter's reach).
    seccompiler::apply_filter_all_threads(&build_no_clone3_filter()?)
        .map_err(SeccompError::Apply)?;
    install(&build_filter(SeccompAction::Trap)?)
}

/// A filter that only answers `clone3` with ENOSYS and allows everything else (it goes
/// on top of the allowlist, which decides the rest).
pub fn build_no_clone3_filter() -> Result<BpfProgram, SeccompError> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> = [(libc::SYS_clone3, Vec::new())].into();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(SeccompError::Build)?;
    filter.try_into().map_err(SeccompError::Compile)
}

/// Stacked on the event-loop thread once the vCPUs run: it serves devices and the API
/// and never runs a vCPU, so KVM_RUN from it traps (`mismatch` for tests).
pub fn build_event_loop_filter(matched: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> = [(libc::SYS_ioctl, one_of(1, [KVM_RUN])?)].into();
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, matched, TargetArch::x86_64)
        .map_err(SeccompError::Build)?;
    filter.try_into().map_err(SeccompError::Compile)
}

/// Installs [`build_event_loop_filter`] on the calling thread only.
pub fn apply_event_loop() -> Result<(), SeccompError> {
    seccompiler::apply_filter(&build_event_loop_filter(SeccompAction::Trap)?)
        .map_err(SeccompError::Apply)
}

/// What a vCPU thread never does, though the process's allowlist has it: starting
/// threads, waiting on or making an epoll set, accepting connections, making timers,
/// renaming itself, removing files. A vCPU runs the guest and the device code its exits
/// reach (MMIO and port I/O, queue notifications: disk reads and writes, tap and socket
/// I/O, vsock connects with their epoll and timer updates, vhost-user messages); the
/// event loop does the rest. Stacked on each vCPU thread before its first KVM_RUN.
pub const VCPU_DENIED: &[i64] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_accept4,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_timerfd_create,
    libc::SYS_prctl,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
];

/// The vCPU threads' own filter: [`VCPU_DENIED`] gets `matched` (a trap, or an errno
/// for tests), everything else goes on to the process's allowlist.
pub fn build_vcpu_filter(matched: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> =
        VCPU_DENIED.iter().map(|s| (*s, Vec::new())).collect();
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, matched, TargetArch::x86_64)
        .map_err(SeccompError::Build)?;
    filter.try_into().map_err(SeccompError::Compile)
}

/// Installs [`build_vcpu_filter`] on the calling thread only.
pub fn apply_vcpu() -> Result<(), SeccompError> {
    seccompiler::apply_filter(&build_vcpu_filter(SeccompAction::Trap)?).map_err(SeccompError::Apply)
}

fn install(bpf: &BpfProgram) -> Result<(), SeccompError> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, sigsys_handler)
        .map_err(SeccompError::Signal)?;
    // seccompiler sets PR_SET_NO_NEW_PRIVS before installing.
    seccompiler::apply_filter_all_threads(bpf).map_err(SeccompError::Apply)
}

/// The ioctls the vsock backend makes: setting a socket (non-)blocking and
/// close-on-exec. It has no KVM or vhost-kernel fd; the vhost-user protocol is messages.
/// TCGETS: the logger asks whether stderr is a terminal when it first writes, which
/// the backend may do only after the filter is on (a warning about a connection).
const BACKEND_IOCTLS: &[u64] = &[libc::FIONBIO, libc::FIOCLEX, libc::FIONCLEX, libc::TCGETS];

/// The vhost-user vsock backend's filter: the VMM's list less what only vCPUs need
/// (no `tgkill` at all), `ioctl` only for `BACKEND_IOCTLS`. Like the VMM's, no `bind` or
/// `listen`: both its Unix listeners exist before the filter goes on, so an escaped
/// backend cannot make socket files. Sockets: AF_UNIX only (to connect to the host's
/// per-port sockets); clone for threads only.
pub fn build_backend_filter(mismatch: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED
        .iter()
        .filter(|s| **s != libc::SYS_ioctl)
        .map(|s| (*s, Vec::new()))
        .collect();
    let arg_is = |index: u8, len: SeccompCmpArgLen, value: u64| {
        SeccompCondition::new(index, len, SeccompCmpOp::Eq, value)
            .and_then(|c| SeccompRule::new(vec![c]))
            .map_err(SeccompError::Build)
    };
    rules.insert(libc::SYS_ioctl, one_of(1, BACKEND_IOCTLS.iter().copied())?);
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
    seccompiler::apply_filter_all_threads(&build_no_clone3_filter()?)
        .map_err(SeccompError::Apply)?;
    install(&build_backend_filter(SeccompAction::Trap)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errno() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    /// The register ioctls' numbers carry the structs' sizes (`_IOR`): a wrong size
    /// would allow some other ioctl and refuse the real one.
    #[test]
    fn register_ioctl_numbers_match_the_structs() {
        let ior = |nr: u64, size: usize| (2 << 30) | ((size as u64) << 16) | (0xAE << 8) | nr;
        assert_eq!(
            KVM_GET_REGS,
            ior(0x81, std::mem::size_of::<kvm_bindings::kvm_regs>())
        );
        assert_eq!(
            KVM_GET_SREGS,
            ior(0x83, std::mem::size_of::<kvm_bindings::kvm_sregs>())
        );
        // Spot checks against the numbers in <linux/kvm.h>, as built for x86_64.
        assert!(SNAPSHOT_IOCTLS.contains(&0xC008_AE88), "KVM_GET_MSRS");
        assert!(SNAPSHOT_IOCTLS.contains(&0x9000_AEA4), "KVM_GET_XSAVE");
        assert!(SNAPSHOT_IOCTLS.contains(&0x8400_AE8E), "KVM_GET_LAPIC");
        assert!(SNAPSHOT_IOCTLS.contains(&0xC208_AE62), "KVM_GET_IRQCHIP");
        assert!(SNAPSHOT_IOCTLS.iter().all(|n| VMM_IOCTLS.contains(n)));
    }

    #[test]
    fn clone3_is_answered_enosys_and_threads_still_start() {
        let bpf = build_no_clone3_filter().unwrap();
        std::thread::spawn(move || {
            seccompiler::apply_filter(&bpf).unwrap();
            // SAFETY: clone3 with a null argument; refused before the kernel reads it.
            let r = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0) };
            assert_eq!((r, errno()), (-1, libc::ENOSYS));
            // The C library falls back to clone(2).
            std::thread::spawn(|| ()).join().unwrap();
        })
        .join()
        .unwrap();
    }

    #[test]
    fn the_event_loop_cannot_run_a_vcpu() {
        let bpf = build_event_loop_filter(SeccompAction::Errno(libc::EPERM as u32)).unwrap();
        let (sock, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            seccompiler::apply_filter(&bpf).unwrap();
            sock.set_nonblocking(true).unwrap();
            let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
            // SAFETY: KVM_RUN takes no pointer; refused before the kernel sees it.
            let r = unsafe { libc::ioctl(fd, KVM_RUN as _, 0) };
            assert_eq!((r, errno()), (-1, libc::EPERM));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_vcpu_thread_cannot_start_threads_wait_on_epoll_or_rename_itself() {
        let bpf = build_vcpu_filter(SeccompAction::Errno(libc::EPERM as u32)).unwrap();
        let (mut a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            seccompiler::apply_filter(&bpf).unwrap();
            // SAFETY: each call takes no pointer the kernel reads before the filter
            // refuses it (clone3's null argument, a null thread name).
            unsafe {
                assert_eq!(libc::epoll_create1(0), -1);
                assert_eq!(errno(), libc::EPERM);
                let r = libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0);
                assert_eq!((r, errno()), (-1, libc::EPERM));
                let r = libc::prctl(libc::PR_SET_NAME, std::ptr::null::<u8>());
                assert_eq!((r, errno()), (-1, libc::EPERM));
            }
            // What device code does still works: socket I/O, flags, the clock.
            std::io::Write::write_all(&mut a, b"ok").unwrap();
            a.set_nonblocking(true).unwrap();
            let _ = std::time::Instant::now();
        })
        .join()
        .unwrap();
    }

    #[test]
    fn numbers_are_written_without_allocating() {
        let mut buf = [0u8; 16];
        let mut at = 0;
        put_num(&mut buf, &mut at, 16, 10);
        put(&mut buf, &mut at, b" ");
        put_num(&mut buf, &mut at, 0xae80, 16);
        put_num(&mut buf, &mut at, u64::MAX, 16);
        assert_eq!(&buf[..at], b"16 ae80fffffffff");
    }

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
            // No socket files: bind and listen are refused, even on a Unix socket.
            let dir = std::env::temp_dir().join(format!("cocoon-bf-{}", std::process::id()));
            let bound = std::os::unix::net::UnixListener::bind(&dir);
            assert_eq!(
                bound.map(|_| ()).map_err(|e| e.raw_os_error()),
                Err(Some(libc::EPERM))
            );
            assert!(!dir.exists());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn filter_allows_listed_and_refuses_others() {
        let bpf = build_filter(SeccompAction::Errno(libc::EPERM as u32)).unwrap();
        let (sock, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
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
            // ioctl: KVM_RUN and the socket flags, nothing else.
            sock.set_nonblocking(true).unwrap();
            let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
            // SAFETY: ioctl with a valid fd and no pointer it writes through (FIONREAD
            // would write an int, but is refused before the kernel sees it).
            let r = unsafe { libc::ioctl(fd, libc::FIONREAD, std::ptr::null_mut::<i32>()) };
            assert_eq!((r, errno()), (-1, libc::EPERM), "FIONREAD passed");
            // No executable memory, new or changed.
            // SAFETY: an anonymous private mapping, unmapped below; no pointers read.
            let m = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_eq!(m, libc::MAP_FAILED, "an executable mapping was made");
            // SAFETY: as above, readable and writable this time.
            let m = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(m, libc::MAP_FAILED);
            // SAFETY: m is the page just mapped.
            let r = unsafe { libc::mprotect(m, 4096, libc::PROT_READ | libc::PROT_EXEC) };
            assert_eq!(
                (r, errno()),
                (-1, libc::EPERM),
                "mprotect made it executable"
            );
            // SAFETY: m is ours, mapped above.
            assert_eq!(unsafe { libc::munmap(m, 4096) }, 0);
            // prctl: thread names, not dumpability.
            // SAFETY: prctl with integer arguments.
            let r = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) };
            assert_eq!((r, errno()), (-1, libc::EPERM), "PR_SET_DUMPABLE passed");
            // Threads can still be made (and named).
            std::thread::Builder::new()
                .name("after".into())
                .spawn(|| ())
                .unwrap()
                .join()
                .unwrap();
        })
        .join()
        .unwrap();
    }
}
