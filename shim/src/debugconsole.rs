//! Host end of the debug console (`cocoon debug <pod>`): finds the pod's VM, opens the
//! agent's `DEBUG_PORT` through the VM's hybrid vsock socket and joins it to this
//! terminal. The guest side is `guest-agent/src/debug.rs`; it exists only in pods
//! started with `[debug] console = true`.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cocoon_protocol::DEBUG_PORT;

/// How long the guest may take to accept.
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);

/// The hybrid vsock socket of pod `id`'s running VM.
pub fn find_vsock(run_root: &Path, id: &str, namespaces: &[&str]) -> Option<PathBuf> {
    crate::consolelog::vm_ids(id, namespaces)
        .into_iter()
        .map(|vm| run_root.join(vm).join("vsock.sock"))
        .find(|p| p.exists())
}

/// The request line for `command` (words joined for `sh -c`), empty for a shell.
pub fn request_line(command: &[String]) -> Result<String> {
    let line = command.join(" ");
    if line.contains('\n') {
        bail!("the command must be a single line");
    }
    if command.is_empty() {
        return Ok("\n".into());
    }
    if line.trim().is_empty() {
        bail!("the command is empty");
    }
    Ok(format!("{line}\n"))
}

/// Opens a session: `command` run by `sh -c` in the guest, or a shell when empty.
pub async fn open(uds: &Path, command: &[String]) -> Result<std::os::unix::net::UnixStream> {
    let line = request_line(command)?;
    let mut stream = crate::vsock::connect(uds, DEBUG_PORT, CONNECT_DEADLINE)
        .await
        .map_err(|e| match e {
            crate::vsock::VsockError::Refused { .. } => anyhow::anyhow!(
                "this pod's guest has no debug console: set `[debug] console = true` in \
                 the Cocoon config (it applies to pods started after)"
            ),
            e => anyhow::Error::new(e).context("reaching the guest's debug console"),
        })?;
    // A guest that refuses the session (its agent policy) says why and closes at once,
    // maybe before our request arrives: the write then fails, but what the guest said
    // is still there to be read, and is the answer.
    match tokio::io::AsyncWriteExt::write_all(&mut stream, line.as_bytes()).await {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) => {}
        r => r?,
    }
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Copies the session to stdout and stdin to it until the guest closes it. A terminal
/// on stdin is put in raw mode for an interactive shell, and restored after.
pub fn join_terminal(stream: std::os::unix::net::UnixStream, interactive: bool) -> Result<()> {
    let stdin = std::io::stdin();
    let saved = if interactive { raw_mode(&stdin) } else { None };
    let mut to_guest = stream.try_clone().context("cloning the session")?;
    // Not joined: it may sit in a read of stdin after the guest is gone.
    std::thread::spawn(move || {
        let mut input = std::io::stdin().lock();
        let _ = std::io::copy(&mut input, &mut to_guest);
        let _ = to_guest.shutdown(std::net::Shutdown::Write);
    });
    let mut from_guest = stream;
    let mut out = std::io::stdout().lock();
    let mut buf = [0u8; 16 * 1024];
    let result = loop {
        match from_guest.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if let Err(e) = out.write_all(&buf[..n]).and_then(|_| out.flush()) {
                    break Err(e);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    if let Some(t) = saved {
        let _ = nix::sys::termios::tcsetattr(stdin.as_fd(), nix::sys::termios::SetArg::TCSANOW, &t);
    }
    result.context("copying the session")
}

/// Raw mode for a terminal on stdin; the old settings to restore, or None when stdin is
/// not a terminal.
fn raw_mode(stdin: &std::io::Stdin) -> Option<nix::sys::termios::Termios> {
    use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
    let saved = tcgetattr(stdin.as_fd()).ok()?;
    let mut raw = saved.clone();
    cfmakeraw(&mut raw);
    tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
    Some(saved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_line() {
        assert_eq!(request_line(&[]).unwrap(), "\n");
        let cmd = vec!["ps".to_string(), "-ef".to_string()];
        assert_eq!(request_line(&cmd).unwrap(), "ps -ef\n");
        assert!(request_line(&["a\nb".to_string()]).is_err());
        assert!(request_line(&[" ".to_string()]).is_err());
    }

    #[test]
    fn only_running_pods_have_a_socket() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(find_vsock(root.path(), "abc", &["k8s.io"]), None);
        let vm = crate::shimv2::sandbox_vm_id("k8s.io", "abc");
        std::fs::create_dir_all(root.path().join(&vm)).unwrap();
        std::fs::write(root.path().join(&vm).join("vsock.sock"), "").unwrap();
        assert_eq!(
            find_vsock(root.path(), "abc", &["k8s.io"]),
            Some(root.path().join(&vm).join("vsock.sock"))
        );
        assert_eq!(find_vsock(root.path(), "pod-..", &[]), None);
    }
}
