//! The process's terminal, allocated as runc does: from the container's own
//! devpts instance (after its mounts and pivot_root, or after setns for an
//! exec), so `tty` names `/dev/pts/N` inside the container. The master goes
//! back to the agent over the sync socket; the slave becomes stdio and the
//! controlling terminal.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use nix::fcntl::OFlag;
use nix::mount::MsFlags;
use oci_spec::runtime::Process;

use super::{mounts, send_with_fd, Context, HelperMessage, RuntimeError};

/// Opens a pty in the devpts that `/dev/ptmx` leads to (the container's, as
/// the spec mounts `/dev/pts` with `newinstance`) and makes it this process's
/// terminal. `mount_console` binds the slave over `/dev/console`, which only
/// the container's init does. Needs a new session (setsid) already.
pub fn setup(
    sock: &UnixStream,
    process: &Process,
    mount_console: bool,
) -> Result<(), RuntimeError> {
    use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .ctx(|| "cannot open /dev/ptmx in the container".into())?;
    grantpt(&master).ctx(|| "grantpt".into())?;
    unlockpt(&master).ctx(|| "unlockpt".into())?;
    let name = ptsname_r(&master).ctx(|| "cannot name the pty".into())?;
    let slave = nix::fcntl::open(
        name.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .ctx(|| format!("cannot open {name}"))?;
    if let Some(size) = process.console_size() {
        // Before the process runs, so it never sees a 0x0 terminal.
        let clamp = |v: u64| v.min(u16::MAX.into()) as u16;
        resize(master.as_fd(), clamp(size.height()), clamp(size.width()))?;
    }
    if mount_console {
        let console = Path::new("/dev/console");
        mounts::make_mount_point(console, true)?;
        mounts::do_mount(
            Some(Path::new(&name)),
            console,
            None,
            MsFlags::MS_BIND,
            None,
        )?;
    }
    send_with_fd(sock, &HelperMessage::Console, master.as_fd())?;
    drop(master);
    for fd in 0..=2 {
        // SAFETY: dup2 onto the standard descriptors, which this process
        // owns; the slave stays open until the loop is done.
        let rc = unsafe { libc::dup2(slave.as_raw_fd(), fd) };
        nix::errno::Errno::result(rc).ctx(|| format!("cannot make the pty fd {fd}"))?;
    }
    drop(slave);
    set_controlling_terminal()?;
    fix_owner(process.user().uid());
    Ok(())
}

/// TIOCSCTTY on fd 0, which must be a terminal of this session.
fn set_controlling_terminal() -> Result<(), RuntimeError> {
    // SAFETY: TIOCSCTTY's argument is an integer, not a pointer.
    let rc = unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) };
    nix::errno::Errno::result(rc).ctx(|| "cannot make the pty the controlling terminal".into())?;
    Ok(())
}

fn resize(master: BorrowedFd<'_>, rows: u16, cols: u16) -> Result<(), RuntimeError> {
    set_window_size(master, rows, cols).ctx(|| "cannot set the terminal size".into())
}

/// TIOCSWINSZ on a pty master: the one place the agent sizes a terminal (the initial
/// consoleSize here, later resizes from the host in `stdio`).
pub(crate) fn set_window_size(master: BorrowedFd<'_>, rows: u16, cols: u16) -> nix::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize struct from a valid pointer.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    nix::errno::Errno::result(rc).map(drop)
}

/// The process's user owns its terminal, as with runc, so that a non-root
/// process can reopen it by name. The group stays devpts's (`gid=5`). Like
/// runc, a refusal is not fatal: the open descriptors work regardless.
fn fix_owner(uid: u32) {
    let _ = nix::unistd::fchown(
        std::io::stdin().as_fd(),
        Some(nix::unistd::Uid::from_raw(uid)),
        None,
    );
}
