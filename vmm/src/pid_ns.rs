//! A PID namespace for a jailed program (`jail-exec --pid-ns`): the program (QEMU,
//! cocoon-vmm) runs as PID 1 of a namespace of its own, where no host process exists
//! to be signalled, traced or looked at through `/proc`, whatever its uid.
//!
//! A process cannot enter a new PID namespace itself; only its children are born there.
//! So `jail-exec` forks once everything else is set up: the child execs the program, and
//! the parent stays behind as a *waiter* in the host's namespace, the process the shim
//! started and knows. The waiter does nothing but:
//! - forward the signals the shim may send (TERM, INT, HUP, QUIT, USR1, USR2) to the
//!   program;
//! - end as the program ended: the same exit code, or death by the same signal, so the
//!   shim reads the VM's end exactly as without the namespace.
//!
//! It runs as the pod's uid with no capabilities, and under a seccomp filter that allows
//! only those few calls; `kill` only towards the program or itself. If the waiter dies
//! (SIGKILL from the shim), the program gets SIGKILL from its parent-death signal. The
//! shim puts both in one process group and kills the group, so neither outlives a pod.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::jail::JailError;

/// The signals the waiter passes on; SIGCHLD tells it the program ended.
const FORWARDED: &[libc::c_int] = &[
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

fn step(what: &'static str) -> impl FnOnce(nix::Error) -> JailError {
    move |source| JailError::Step {
        step: what.to_string(),
        source,
    }
}

fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a local sigset_t.
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// `[arg_start, arg_end)` of this process's command line (`/proc/self/stat`), read
/// before the jail hides `/proc`: where the waiter writes its own name.
pub fn args_area() -> Option<(usize, usize)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces), counted from field 3.
    let rest = stat.rsplit_once(") ")?.1;
    let mut fields = rest.split_whitespace().skip(48 - 3);
    let start = fields.next()?.parse().ok()?;
    let end = fields.next()?.parse().ok()?;
    (start < end).then_some((start, end))
}

/// The name (`comm`, and the command line) a waiter takes once its program runs.
pub const WAITER_NAME: &str = "cocoon-pid-ns";

/// Makes `/proc/<pid>/cmdline` read `cocoon-pid-ns`: the name, then NULs to the end.
fn rename(args: Option<(usize, usize)>) {
    // SAFETY: PR_SET_NAME with a NUL-terminated name of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"cocoon-pid-ns".as_ptr()) };
    let Some((start, end)) = args else {
        return;
    };
    let name = WAITER_NAME.as_bytes();
    let len = end - start;
    if len <= name.len() {
        return;
    }
    // SAFETY: `start..end` is this process's own argument area on its initial stack
    // (read from /proc/self/stat), writable and never read again by this process,
    // which only waits from here on.
    unsafe {
        std::ptr::write_bytes(start as *mut u8, 0, len);
        std::ptr::copy_nonoverlapping(name.as_ptr(), start as *mut u8, name.len());
    }
}

/// Forks into the PID namespace made by an earlier `unshare(CLONE_NEWPID)`. Returns in
/// the child (PID 1 there, parent-death signal armed, signal mask as before), which
/// goes on to exec; the parent becomes the waiter and never returns. Must run while
/// the process is single-threaded.
/// `args`: this process's argument area ([`args_area`]), renamed in the waiter.
pub fn fork_and_wait(args: Option<(usize, usize)>) -> Result<(), JailError> {
    let mut waited: Vec<libc::c_int> = FORWARDED.to_vec();
    waited.push(libc::SIGCHLD);
    let set = signal_set(&waited);
    // SAFETY: a zeroed sigset_t is a valid out-parameter for sigprocmask.
    let mut old = unsafe { std::mem::zeroed::<libc::sigset_t>() };
    // Blocked before the fork, so a signal sent in between waits for the waiter.
    // SAFETY: valid sets; this thread's mask only.
    if unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old) } != 0 {
        return Err(step("block signals for the waiter")(nix::Error::last()));
    }
    // The waiter holds the write end: the child sees EOF only if the waiter is gone.
    let (alive_r, alive_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(step("make a pipe"))?;
    // SAFETY: the process is single-threaded (checked by the jail), so the child may
    // run any code.
    match unsafe { nix::unistd::fork() }.map_err(step("fork into the PID namespace"))? {
        nix::unistd::ForkResult::Child => {
            drop(alive_w);
            // SAFETY: restores the mask saved above.
            if unsafe { libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) } != 0 {
                return Err(step("restore the signal mask")(nix::Error::last()));
            }
            // SAFETY: plain prctl with integer arguments.
            if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
                return Err(step("set the parent-death signal")(nix::Error::last()));
            }
            waiter_still_there(&alive_r)
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(alive_r);
            let filter = waiter_filter(child.as_raw()).map_err(|e| JailError::Step {
                step: format!("build the waiter's seccomp filter ({e})"),
                source: nix::Error::EINVAL,
            })?;
            rename(args);
            seccompiler::apply_filter(&filter).map_err(|e| JailError::Step {
                step: format!("install the waiter's seccomp filter ({e})"),
                source: nix::Error::EPERM,
            })?;
            wait_for(child.as_raw(), &set, alive_w)
        }
    }
}

/// Whether the waiter is still there after the parent-death signal was armed (in the
/// namespace, `getppid` is 0 whoever the parent is, so the pipe tells).
fn waiter_still_there(alive: &OwnedFd) -> Result<(), JailError> {
    let fd = alive.as_raw_fd();
    // SAFETY: fcntl on our own descriptor.
    unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) };
    let mut b = [0u8; 1];
    // SAFETY: reads at most one byte into a local buffer.
    let n = unsafe { libc::read(fd, b.as_mut_ptr().cast(), 1) };
    if n == 0 {
        return Err(step("outlive the waiter")(nix::Error::ESRCH));
    }
    Ok(())
}

/// The waiter's loop: only async-signal-safe libc calls, no allocation (the filter is
/// on). Never returns.
fn wait_for(child: libc::pid_t, set: &libc::sigset_t, _alive: OwnedFd) -> ! {
    loop {
        // SAFETY: waits for one of the blocked signals in `set`.
        let sig = unsafe { libc::sigwaitinfo(set, std::ptr::null_mut()) };
        if sig == libc::SIGCHLD {
            let mut status = 0;
            // SAFETY: reaps our only child if it ended.
            let r = unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) };
            if r == child {
                end_like(status);
            }
        } else if sig == libc::SIGTERM {
            // SAFETY: kills our own child (see the module docs).
            unsafe { libc::kill(child, libc::SIGKILL) };
        } else if sig > 0 {
            // SAFETY: forwards a signal to our own child.
            unsafe { libc::kill(child, sig) };
        }
    }
}

/// Ends this process as the child ended: its exit code, or its fatal signal.
fn end_like(status: libc::c_int) -> ! {
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        // SAFETY: resets the signal to its default action, unblocks it and sends it to
        // ourselves; the filter allows exactly these.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            let one = signal_set(&[sig]);
            libc::sigprocmask(libc::SIG_UNBLOCK, &one, std::ptr::null_mut());
            libc::kill(libc::getpid(), sig);
            libc::_exit(128 + sig)
        }
    }
    // SAFETY: _exit ends the process without running anything else.
    unsafe { libc::_exit(libc::WEXITSTATUS(status)) }
}

/// The waiter's filter: waiting for signals and its child, `kill` only towards the
/// child or itself, and exiting. Anything else kills it (and so, by the parent-death
/// signal, the program).
pub fn waiter_filter(child: libc::pid_t) -> Result<BpfProgram, seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = [
        libc::SYS_rt_sigtimedwait,
        libc::SYS_wait4,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigreturn,
        libc::SYS_getpid,
        libc::SYS_restart_syscall,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ]
    .into_iter()
    .map(|s| (s, Vec::new()))
    .collect();
    // SAFETY: getpid has no arguments and cannot fail.
    let own = unsafe { libc::getpid() };
    let to = |pid: libc::pid_t| {
        SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, pid as u64)
            .and_then(|c| SeccompRule::new(vec![c]))
    };
    rules.insert(libc::SYS_kill, vec![to(child)?, to(own)?]);
    SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?
    .try_into()
}
