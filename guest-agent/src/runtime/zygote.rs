//! The runtime zygote: a single-threaded copy of the agent, forked in `main` before the
//! async runtime starts, that forks a runtime helper whenever the agent asks.
//!
//! Without it the agent starts each helper by exec'ing `/proc/self/exe __cocoon-runtime`
//! (still the path taken when no zygote runs). Two things make a fork of a zygote better:
//! - Under TCG (QEMU 7.2) translated guest code is found by its virtual address, and a
//!   static PIE's exec lands at a new random base, so every helper translated std, serde
//!   and the runtime again: 50-90 ms from spawning to the helper's main per container
//!   (`container-helper-main` in the timeline), against 5-10 ms per exec of the same code
//!   built non-PIE. A zygote's child runs at the agent's own addresses, code the agent and
//!   earlier helpers already ran. The agent keeps its ASLR: the kernel placed it at random
//!   before the zygote was forked (building the agent non-PIE was the other way to get the
//!   same saving, and would have given that up).
//! - Everywhere: no exec and no start-up of a 15 MB static binary per container or exec.
//!
//! A fork is safe to run Rust code in only from a single-threaded process; the zygote is
//! forked before any thread exists and never starts one. The helper it forks runs
//! `runtime::helper_main`, which resets signal dispositions and the mask and closes every
//! descriptor but its stdio and the sync socket, as after an exec.
//!
//! What a helper inherits besides: the zygote's memory, a copy of the agent's from before
//! it served anything (the kernel command line, the logger's set-up). No request, spec or
//! init-data is in it, so a container's init, which a helper forks and which waits for
//! its execve in that memory, can hold nothing of another container's.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use nix::sys::signal::{signal, SigHandler, Signal};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use nix::unistd::{fork, ForkResult};

use super::SYNC_FD;

/// Descriptors per request: the helper's stdin, stdout, stderr and sync socket.
const FDS: usize = 4;

/// The zygote's `oom_score_adj`: never chosen by the OOM killer.
const OOM_PROTECTED: &str = "-1000";
/// Each helper's (and so each container process's unless its spec says otherwise): the
/// agent's own, as when helpers were exec'd from it.
const HELPER_OOM_SCORE_ADJ: &str = "0";

/// How long a fork may take the zygote before the agent stops waiting.
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

static ZYGOTE: OnceLock<Zygote> = OnceLock::new();

/// The agent's end of the zygote.
struct Zygote {
    /// One request and its answer at a time.
    sock: Mutex<UnixStream>,
    /// Set when a request failed: later ones take the exec path.
    lost: AtomicBool,
}

/// Forks the zygote. Call it only while the process has a single thread: it checks
/// `/proc/self/task` and refuses otherwise.
pub fn start() -> io::Result<()> {
    let threads = threads()?;
    if threads != 1 {
        return Err(io::Error::other(format!(
            "the zygote must be forked from a single-threaded process; this one has {threads}"
        )));
    }
    let (ours, theirs) = UnixStream::pair()?;
    // A zygote that stops answering fails the call (the agent then execs the helper)
    // instead of holding it.
    ours.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    // SAFETY: the process has one thread (checked above), so the child may run any code.
    match unsafe { fork() }.map_err(io::Error::from)? {
        ForkResult::Child => {
            // Out of the agent's way until the guest's CPU is idle: see `set_policy`.
            // Only as root (the guest's agent), who can always come back: an
            // unprivileged agent (tests) could not leave the idle class again.
            let yielded = nix::unistd::geteuid().is_root() && set_policy(libc::SCHED_IDLE);
            drop(ours);
            serve(theirs, yielded)
        }
        ForkResult::Parent { child } => {
            drop(theirs);
            tracing::debug!(pid = child.as_raw(), "runtime zygote started");
            ZYGOTE
                .set(Zygote {
                    sock: Mutex::new(ours),
                    lost: AtomicBool::new(false),
                })
                .map_err(|_| io::Error::other("the zygote was already started"))
        }
    }
}

/// This process's threads: procfs gives `/proc/self/task` a link count of 2 plus the
/// threads. One stat, where reading the directory cost 1.6 ms of every boot under TCG
/// (first-run code). A count that came out otherwise could only refuse the zygote.
fn threads() -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata("/proc/self/task")?
        .nlink()
        .saturating_sub(2))
}

/// Forks a helper with these descriptors as its stdin, stdout, stderr and sync socket.
/// `None`: no zygote was started, or it failed once (that error was returned then). The
/// helper is the zygote's child: the kernel reaps it (the zygote ignores SIGCHLD), and
/// the processes it forks are re-parented to the agent.
pub fn spawn(fds: [&OwnedFd; FDS]) -> Option<io::Result<i32>> {
    let zygote = ZYGOTE.get()?;
    let sock = zygote.sock.lock().unwrap_or_else(|e| e.into_inner());
    if zygote.lost.load(Ordering::Relaxed) {
        return None;
    }
    let r = request(&sock, fds);
    if r.is_err() {
        // A late answer must never be read as the next request's: stop using it. The
        // zygote sees the end of the stream and exits.
        zygote.lost.store(true, Ordering::Relaxed);
        let _ = sock.shutdown(std::net::Shutdown::Both);
    }
    Some(r)
}

fn request(sock: &UnixStream, fds: [&OwnedFd; FDS]) -> io::Result<i32> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let iov = [io::IoSlice::new(&[1])];
    loop {
        match sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None) {
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(io::Error::other(format!("the zygote is gone: {e}"))),
            Ok(_) => break,
        }
    }
    let mut answer = [0u8; 4];
    (&*sock)
        .read_exact(&mut answer)
        .map_err(|e| io::Error::other(format!("the zygote did not answer: {e}")))?;
    match i32::from_le_bytes(answer) {
        pid if pid > 0 => Ok(pid),
        errno => Err(io::Error::other(format!(
            "the zygote could not fork a helper: {}",
            io::Error::from_raw_os_error(-errno)
        ))),
    }
}

/// Sets this process's scheduling policy (`SCHED_IDLE` or `SCHED_OTHER`, priority 0);
/// whether it took.
///
/// The zygote's set-up (its name, signals, OOM score, closing descriptors) is the first
/// run of that code, which costs time under TCG, and nobody needs the zygote before the
/// agent's first container. At the agent's priority the kernel may give it the guest's
/// only vCPU in the middle of the agent's start, delaying the ready line; as `SCHED_IDLE`
/// it runs while the agent waits for the host instead. It goes back to `SCHED_OTHER`
/// before it waits for its first request, so neither it nor a helper it forks (which
/// inherits the policy, and so every container process) is ever starved by busy
/// containers: `ctr_limits.rs::scheduling_as_under_runc` checks a container's policy.
fn set_policy(policy: libc::c_int) -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param; pid 0 is this process.
    unsafe { libc::sched_setscheduler(0, policy, &param) == 0 }
}

/// The zygote's loop: one fork per request, until the agent's end closes. `yielded`: it
/// runs as `SCHED_IDLE` until its set-up is done.
fn serve(sock: UnixStream, yielded: bool) -> ! {
    // The agent's hook powers the VM off on a panic; nothing here may do that.
    let _ = std::panic::take_hook();
    // SAFETY: PR_SET_NAME and PR_SET_PDEATHSIG only set attributes of this process.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, c"cocoon-zygote".as_ptr());
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    // SAFETY: SIG_IGN for SIGCHLD installs no handler; the kernel reaps the helpers.
    let _ = unsafe { signal(Signal::SIGCHLD, SigHandler::SigIgn) };
    // The kernel's OOM killer never takes PID 1 (the agent), and must not take its
    // zygote either; each helper goes back to the agent's 0 (`fork_helper`).
    let _ = std::fs::write("/proc/self/oom_score_adj", OOM_PROTECTED);
    close_all_but(sock.as_raw_fd());
    if yielded && !set_policy(libc::SCHED_OTHER) {
        // Root in the guest can always go back. If it could not, a helper would inherit
        // the idle class: no helper at all is better (the agent execs one instead).
        let _ = std::io::stderr().write_all(b"cocoon-zygote: cannot leave SCHED_IDLE\n");
        std::process::exit(1);
    }
    loop {
        let fds = match receive(&sock) {
            Ok(Some(fds)) => fds,
            // The agent's end closed (or broke): nothing more will come.
            Ok(None) | Err(_) => std::process::exit(0),
        };
        let answer = match fds.try_into() {
            Ok(fds) => fork_helper(fds),
            Err(_) => -libc::EINVAL,
        };
        if (&sock).write_all(&answer.to_le_bytes()).is_err() {
            std::process::exit(0);
        }
    }
}

/// One request: its descriptors, or `None` at the end of the stream.
fn receive(sock: &UnixStream) -> io::Result<Option<Vec<OwnedFd>>> {
    let mut byte = [0u8; 1];
    let mut space = nix::cmsg_space!([RawFd; FDS]);
    let (bytes, fds) = loop {
        let mut iov = [io::IoSliceMut::new(&mut byte)];
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(e.into()),
            Ok(msg) => {
                let mut fds = Vec::new();
                for c in msg.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(rs) = c {
                        // SAFETY: SCM_RIGHTS gave this process these new descriptors,
                        // owned by nothing else.
                        fds.extend(rs.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
                    }
                }
                break (msg.bytes, fds);
            }
        }
    };
    Ok((bytes > 0).then_some(fds))
}

/// Forks a helper; the parent's answer is its pid, or -errno.
fn fork_helper(fds: [OwnedFd; FDS]) -> i32 {
    // SAFETY: the zygote is single-threaded, so the child may run any code.
    match unsafe { fork() } {
        Err(e) => -(e as i32),
        Ok(ForkResult::Parent { child }) => match unprotect(child.as_raw()) {
            Ok(()) => child.as_raw(),
            Err(e) => {
                let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
                -e.raw_os_error().unwrap_or(libc::EIO)
            }
        },
        Ok(ForkResult::Child) => {
            // SAFETY: PR_SET_NAME only names this process.
            unsafe { libc::prctl(libc::PR_SET_NAME, c"cocoon-runtime".as_ptr()) };
            if place(fds).is_err() {
                std::process::exit(1);
            }
            // It closes the zygote's socket with every descriptor above SYNC_FD.
            super::helper_main()
        }
    }
}

/// Gives a new helper the agent's own `oom_score_adj`, as its exec'd helpers had: a
/// container without `oomScoreAdj` in its spec must not inherit the zygote's protection.
/// The zygote does it before it answers with the pid, not the helper itself: the agent
/// moves the helper into the container's cgroup as soon as it has the pid, and a helper
/// still at -1000 there, under a memory limit too small for it, is a memcg OOM with no
/// task to kill, so its page fault retries forever (the create hung to its deadline
/// once cgroup2's `favordynmods` made the move fast enough to win that race).
fn unprotect(pid: i32) -> io::Result<()> {
    std::fs::write(format!("/proc/{pid}/oom_score_adj"), HELPER_OOM_SCORE_ADJ)
}

/// Puts the request's descriptors at 0, 1, 2 and SYNC_FD (without close-on-exec). Each
/// goes through a copy above them first, and the originals are closed before any
/// placement, so none overwrites or closes one still to come.
fn place(fds: [OwnedFd; FDS]) -> io::Result<()> {
    let targets = [0, 1, 2, SYNC_FD];
    let mut copies = Vec::with_capacity(FDS);
    for fd in &fds {
        // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor, owned by `copies` from here.
        let c = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, SYNC_FD + 1) };
        if c < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `c` was just created and is owned by nothing else.
        copies.push(unsafe { OwnedFd::from_raw_fd(c) });
    }
    drop(fds);
    for (copy, target) in copies.iter().zip(targets) {
        // SAFETY: dup2 onto a standard or sync slot this child means to replace.
        if unsafe { libc::dup2(copy.as_raw_fd(), target) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Closes every descriptor above stderr except `keep` (the agent's, inherited by fork).
fn close_all_but(keep: RawFd) {
    let close = |from: RawFd, to: libc::c_uint| {
        if from as libc::c_uint <= to {
            // SAFETY: close_range only closes descriptors; this process owns no Rust
            // object over any of them but `keep`, which is outside the range.
            unsafe { libc::syscall(libc::SYS_close_range, from as libc::c_uint, to, 0) };
        }
    };
    close(3, (keep - 1).max(2) as libc::c_uint);
    close(keep + 1, libc::c_uint::MAX);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The link count the zygote reads is the number of entries in `/proc/self/task`.
    #[test]
    fn the_thread_count_is_the_task_directorys() {
        let hold = std::sync::Arc::new(std::sync::Barrier::new(3));
        let others: Vec<_> = (0..2)
            .map(|_| {
                let hold = hold.clone();
                std::thread::spawn(move || {
                    hold.wait();
                })
            })
            .collect();
        // Other tests' threads come and go: the two counts agree at some moment.
        let agree = (0..100).any(|_| {
            let listed = std::fs::read_dir("/proc/self/task").unwrap().count() as u64;
            threads().unwrap() == listed && listed >= 3
        });
        hold.wait();
        for t in others {
            t.join().unwrap();
        }
        assert!(
            agree,
            "the link count never matched /proc/self/task's entries"
        );
    }

    /// The test harness runs tests on threads of its own, so a fork here would be unsafe:
    /// the zygote refuses, naming why, and nothing is forked.
    #[test]
    fn a_multithreaded_process_gets_no_zygote() {
        let other = std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_secs(1)));
        let err = start().unwrap_err().to_string();
        assert!(err.contains("single-threaded"), "{err}");
        assert!(ZYGOTE.get().is_none());
        other.join().unwrap();
    }

    /// The zygote resets a helper's score from outside, so it is the agent's before the
    /// agent learns the pid, whether or not the helper has run yet.
    #[test]
    fn a_helper_has_the_agents_oom_score_before_it_runs() {
        // SAFETY: the child only calls pause and _exit, both async-signal-safe, so
        // forking from the test harness's threads is sound.
        let child = match unsafe { fork() }.unwrap() {
            // SAFETY: pause and _exit take no pointers; see the fork above.
            ForkResult::Child => unsafe {
                libc::pause();
                libc::_exit(0)
            },
            ForkResult::Parent { child } => child,
        };
        let path = format!("/proc/{child}/oom_score_adj");
        // Any score other than the agent's stands in for the zygote's inherited one.
        std::fs::write(&path, "500").unwrap();
        let r = unprotect(child.as_raw());
        let score = std::fs::read_to_string(&path);
        let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(child, None);
        r.unwrap();
        assert_eq!(score.unwrap().trim(), HELPER_OOM_SCORE_ADJ);
        // A pid that is gone is an error the zygote answers with, not a helper.
        let e = unprotect(child.as_raw()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
    }
}
