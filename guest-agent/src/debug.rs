//! The debug console (`cocoon debug <pod>`): a shell in the guest outside every
//! container, for an operator who needs to look at the VM itself. It exists only when
//! the kernel command line has `cocoon.debug=1`, which the shim adds only when its
//! config's `[debug] console` is on (off by default, refused for confidential pods).
//! See `cocoon_protocol::DEBUG_PORT` for the exchange.
//!
//! The same switch arms one fault hook for fault injection (`cocoon soak`): SIGUSR2
//! makes the agent exit as if it had crashed, which panics the guest kernel (PID 1
//! died) and ends the VM, as a real agent crash would.
//!
//! Plain threads and blocking fds: a session is rare and long, and the agent's async
//! runtime stays out of it.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use cocoon_protocol::DEBUG_PORT;

/// The guest image's busybox (the image builder adds it for this console).
pub const BUSYBOX: &str = "/bin/busybox";
/// Where the applet links go, made on the first session.
const APPLETS: &str = "/run/cocoon/debug-bin";
/// Sessions at once; more are refused.
const MAX_SESSIONS: usize = 4;
/// The longest command line the host may send.
const MAX_LINE: usize = 64 * 1024;

static SESSIONS: AtomicUsize = AtomicUsize::new(0);

/// Whether the command line turns the console (and the fault hook) on.
pub fn enabled(cmdline: &str) -> bool {
    crate::cmdline::value(cmdline, "cocoon.debug") == Some("1")
}

/// What a session the pod's policy refuses reads before the connection closes.
const REFUSED: &[u8] = b"cocoon: the debug console is refused by the pod's agent policy\n";

/// Listens on `DEBUG_PORT` and arms the crash hook, if enabled. Each session needs the
/// pod's policy to allow `DebugConsoleRequest` (a confidential pod's default does not).
pub fn serve(cmdline: &str, gate: std::sync::Arc<crate::policy::Gate>) -> anyhow::Result<()> {
    if !enabled(cmdline) {
        return Ok(());
    }
    arm_crash_hook()?;
    let addr = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, DEBUG_PORT);
    let listener = tokio_vsock::VsockListener::bind(addr)
        .map_err(|e| anyhow::anyhow!("cannot listen on vsock port {DEBUG_PORT}: {e}"))?;
    tracing::warn!("debug console on vsock port {DEBUG_PORT} (cocoon.debug=1)");
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((mut conn, _))
                    if gate
                        .check("DebugConsole", || serde_json::json!({}))
                        .is_err() =>
                {
                    tracing::warn!("debug console session refused by the pod's policy");
                    tokio::spawn(async move {
                        // The request line first (bounded, with a deadline): closing
                        // with it unread would reset the connection, and the host could
                        // lose the answer below.
                        let read_line = async {
                            let mut line = [0u8; 4096];
                            let mut got = 0;
                            while got < line.len() {
                                match tokio::io::AsyncReadExt::read(&mut conn, &mut line[got..])
                                    .await
                                {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) if line[got..got + n].contains(&b'\n') => break,
                                    Ok(n) => got += n,
                                }
                            }
                        };
                        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), read_line)
                            .await;
                        let _ = tokio::io::AsyncWriteExt::write_all(&mut conn, REFUSED).await;
                        let _ = tokio::io::AsyncWriteExt::shutdown(&mut conn).await;
                    });
                }
                Ok((conn, _)) => match blocking_fd(&conn) {
                    Ok(fd) => {
                        drop(conn);
                        std::thread::spawn(move || session(fd));
                    }
                    Err(e) => tracing::warn!("debug console: {e}"),
                },
                Err(e) => tracing::warn!("debug console accept failed: {e}"),
            }
        }
    });
    Ok(())
}

/// Where root in a debug-armed guest asks the agent to play a compromised agent's part
/// for the hostile-guest tests: while this file exists, every OOM poll is answered at
/// once with the next of the container ids it lists, forged or not, and as fast as the
/// host asks. The host must relay only its own live containers', at a bounded rate.
pub const FORGE_OOM: &str = "/run/cocoon-forge-oom";

/// With `cocoon.debug=1`, the next forged OOM event, if the hostile-guest switch is on.
pub fn forged_oom(cmdline: &str, turn: usize) -> Option<String> {
    if !enabled(cmdline) {
        return None;
    }
    let ids = std::fs::read_to_string(FORGE_OOM).ok()?;
    let ids: Vec<&str> = ids.lines().filter(|l| !l.is_empty()).collect();
    (!ids.is_empty()).then(|| ids[turn % ids.len()].to_string())
}

/// While this file exists in a debug-armed guest, the agent never answers a
/// SignalProcess call: a guest stuck (or refusing) at the worst moment, for the tests of
/// what the host does then.
pub const IGNORE_SIGNALS: &str = "/run/cocoon-ignore-signals";

/// With `cocoon.debug=1`, whether the stuck-guest switch is on.
pub fn ignoring_signals(cmdline: &str) -> bool {
    enabled(cmdline) && std::path::Path::new(IGNORE_SIGNALS).exists()
}

/// While this file exists in a debug-armed guest, the agent answers every SignalProcess
/// call as done and signals nothing: a guest that takes a kill and never reports the
/// exit, for the test that the host ends such a pod itself.
pub const FAKE_KILLS: &str = "/run/cocoon-fake-kills";

/// With `cocoon.debug=1`, whether the fake-kill switch is on.
pub fn faking_kills(cmdline: &str) -> bool {
    enabled(cmdline) && std::path::Path::new(FAKE_KILLS).exists()
}

/// While this file exists in a debug-armed guest, `ListPids` answers with as many
/// made-up processes as the number it holds (at most 1 000 000): an oversized reply, which
/// the host must refuse for that call alone.
pub const FORGE_PIDS: &str = "/run/cocoon-forge-pids";

/// With `cocoon.debug=1`, how many processes to make up for `ListPids`, if any.
pub fn forged_pids(cmdline: &str) -> Option<usize> {
    if !enabled(cmdline) {
        return None;
    }
    let n = std::fs::read_to_string(FORGE_PIDS).ok()?;
    n.trim().parse::<usize>().ok().map(|n| n.min(1_000_000))
}

/// SIGUSR2: exit as a crashed agent would.
fn arm_crash_hook() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut usr2 = signal(SignalKind::user_defined2())
        .map_err(|e| anyhow::anyhow!("cannot watch SIGUSR2: {e}"))?;
    tokio::spawn(async move {
        if usr2.recv().await.is_some() {
            eprintln!("cocoon-agent: SIGUSR2 with cocoon.debug=1: exiting as if crashed");
            std::process::exit(70);
        }
    });
    Ok(())
}

/// A blocking duplicate of the connection's fd (the async one is dropped). Close-on-exec
/// like every fd of the agent: a plain `dup` handed the connection to every process the
/// agent started while the session lasted, so a shell's background job (or a container
/// started meanwhile) held the host's session open after the shell had ended.
fn blocking_fd(conn: &impl std::os::fd::AsFd) -> std::io::Result<OwnedFd> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::os::fd::FromRawFd;
    let raw = fcntl(conn.as_fd(), FcntlArg::F_DUPFD_CLOEXEC(0))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // O_NONBLOCK lives on the shared open file: clear it for the blocking copies.
    let flags = OFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GETFL)?);
    fcntl(&fd, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK))?;
    Ok(fd)
}

/// Reads the request line, byte by byte so nothing after it is consumed.
fn read_line(conn: &mut std::fs::File) -> Result<String, String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match conn.read(&mut b) {
            Ok(0) => return Err("the host closed before its request".into()),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => line.push(b[0]),
            Err(e) => return Err(format!("reading the request: {e}")),
        }
        if line.len() > MAX_LINE {
            return Err("request line too long".into());
        }
    }
    String::from_utf8(line).map_err(|_| "request is not text".into())
}

struct SessionSlot;

impl SessionSlot {
    fn take() -> Option<Self> {
        let n = SESSIONS.fetch_add(1, Ordering::SeqCst);
        if n >= MAX_SESSIONS {
            SESSIONS.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(SessionSlot)
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        SESSIONS.fetch_sub(1, Ordering::SeqCst);
    }
}

fn session(fd: OwnedFd) {
    let mut conn = std::fs::File::from(fd);
    let Some(_slot) = SessionSlot::take() else {
        let _ = conn.write_all(b"cocoon: too many debug sessions\n");
        return;
    };
    let result = read_line(&mut conn).and_then(|line| {
        install_applets()?;
        if line.is_empty() {
            interactive(conn)
        } else {
            command(conn, &line)
        }
    });
    if let Err(e) = result {
        tracing::warn!("debug session: {e}");
    }
}

/// Links busybox's applets into `APPLETS` once, so the shell finds `ls`, `ps`, `cat`.
fn install_applets() -> Result<(), String> {
    if std::path::Path::new(APPLETS).join("sh").exists() {
        return Ok(());
    }
    if !std::path::Path::new(BUSYBOX).exists() {
        return Err(format!("{BUSYBOX} is not in this guest image"));
    }
    std::fs::create_dir_all(APPLETS).map_err(|e| format!("cannot create {APPLETS}: {e}"))?;
    let status = Command::new(BUSYBOX)
        .args(["--install", "-s", APPLETS])
        .status()
        .map_err(|e| format!("busybox --install: {e}"))?;
    if !status.success() {
        return Err(format!("busybox --install: {status}"));
    }
    Ok(())
}

fn shell() -> Command {
    let mut cmd = Command::new(BUSYBOX);
    cmd.arg("sh")
        .env_clear()
        .env("PATH", format!("{APPLETS}:/bin:/sbin"))
        .env("HOME", "/")
        .env("TERM", "linux")
        .env("PS1", "cocoon-guest# ")
        .current_dir("/");
    cmd
}

/// `sh -c line` with the connection as its stdio; the host reads to EOF.
fn command(conn: std::fs::File, line: &str) -> Result<(), String> {
    let io = |f: &std::fs::File| f.try_clone().map(Stdio::from);
    let (stdin, stdout, stderr) = (io(&conn), io(&conn), io(&conn));
    let mut child = shell()
        .arg("-c")
        .arg(line)
        .stdin(stdin.map_err(|e| e.to_string())?)
        .stdout(stdout.map_err(|e| e.to_string())?)
        .stderr(stderr.map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("cannot start the shell: {e}"))?;
    drop(conn);
    // PID 1's reaper may collect it first; either way it is gone.
    let _ = child.wait();
    Ok(())
}

/// A login-style shell on a new pty, copied both ways until the shell exits.
fn interactive(conn: std::fs::File) -> Result<(), String> {
    let winsize = libc::winsize {
        ws_row: 24,
        ws_col: 80,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&winsize), None).map_err(|e| format!("openpty: {e}"))?;
    let slave = std::fs::File::from(pty.slave);
    let io = |f: &std::fs::File| f.try_clone().map(Stdio::from).map_err(|e| e.to_string());
    let mut cmd = shell();
    cmd.arg("-i")
        .stdin(io(&slave)?)
        .stdout(io(&slave)?)
        .stderr(io(&slave)?);
    // SAFETY: setsid and ioctl(TIOCSCTTY) are async-signal-safe and touch no memory
    // of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start the shell: {e}"))?;
    // The builder holds copies of the slave: all must close, or the master never sees
    // the shell end (EIO).
    drop(cmd);
    drop(slave);
    let mut master = std::fs::File::from(pty.master);
    let mut to_shell = master.try_clone().map_err(|e| e.to_string())?;
    let mut from_host = conn.try_clone().map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_host, &mut to_shell);
    });
    let mut to_host = conn;
    // Ends with EIO once the shell (and everything on its tty) is gone.
    let _ = std::io::copy(&mut master, &mut to_host);
    let _ = child.wait();
    // SAFETY: shutdown on a socket fd we own; wakes the copy thread's read.
    unsafe { libc::shutdown(to_host.as_raw_fd(), libc::SHUT_RDWR) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_cocoon_debug_1_enables_it() {
        assert!(enabled("console=ttyS0 cocoon.debug=1"));
        assert!(!enabled("console=ttyS0"));
        assert!(!enabled("cocoon.debug=0"));
        assert!(!enabled("cocoon.debug=1 cocoon.debug=0"));
        assert!(!enabled("xcocoon.debug=1"));
    }

    #[test]
    fn sessions_are_bounded() {
        let slots: Vec<_> = (0..MAX_SESSIONS).map(|_| SessionSlot::take()).collect();
        assert!(slots.iter().all(Option::is_some));
        assert!(SessionSlot::take().is_none());
        drop(slots);
        assert!(SessionSlot::take().is_some());
    }
}
