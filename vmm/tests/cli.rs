//! The `cocoon-vmm vhost-user-vsock` process as the shim uses it: readiness by socket
//! file, one frontend, clean exit and cleanup when it goes away; and what `run` refuses
//! of its flags before it touches KVM.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_cocoon-vmm");

fn wait_for_file(path: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("backend exited early: {status}");
        }
        assert!(Instant::now() < deadline, "socket never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("backend did not exit");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn serves_one_frontend_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vhost.sock");
    let uds = dir.path().join("vsock.sock");
    // A stale socket from an earlier run must not stop us.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let mut child = Command::new(BIN)
        .args(["vhost-user-vsock", "--guest-cid", "7", "--socket"])
        .arg(&socket)
        .arg("--uds-path")
        .arg(&uds)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The stale file exists from the start; wait until the backend accepts on it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut conn = loop {
        wait_for_file(&socket, &mut child);
        if uds.exists() {
            if let Ok(c) = UnixStream::connect(&socket) {
                break c;
            }
        }
        assert!(Instant::now() < deadline, "backend never accepted");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(uds.exists(), "hybrid socket missing");

    // VHOST_USER_GET_FEATURES (1), protocol version 1.
    let mut msg = Vec::new();
    msg.extend_from_slice(&1u32.to_le_bytes());
    msg.extend_from_slice(&1u32.to_le_bytes());
    msg.extend_from_slice(&0u32.to_le_bytes());
    conn.write_all(&msg).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reply = [0u8; 20];
    conn.read_exact(&mut reply).unwrap();
    assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()), 1);
    let features = u64::from_le_bytes(reply[12..20].try_into().unwrap());
    assert_ne!(features & (1 << 32), 0, "VIRTIO_F_VERSION_1");
    assert_ne!(features & (1 << 30), 0, "VHOST_USER_F_PROTOCOL_FEATURES");

    drop(conn);
    let status = wait_exit(&mut child);
    assert!(status.success(), "exit status {status}");
    assert!(!socket.exists(), "vhost-user socket left behind");
    assert!(!uds.exists(), "hybrid socket left behind");
}

/// As the jailed shim runs it: both listeners made by the caller and inherited, so the
/// backend binds nothing (its filter has no `bind`), and leaves them to their maker.
#[test]
fn serves_on_inherited_listeners_and_leaves_them() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vhost.sock");
    let uds = dir.path().join("vsock.sock");
    let vhost = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let hybrid = std::os::unix::net::UnixListener::bind(&uds).unwrap();
    let fds = [vhost.as_raw_fd(), hybrid.as_raw_fd()];
    let mut cmd = Command::new(BIN);
    cmd.args(["vhost-user-vsock", "--jail", "off", "--socket"])
        .arg(&socket)
        .arg("--socket-fd")
        .arg(fds[0].to_string())
        .arg("--uds-path")
        .arg(&uds)
        .arg("--uds-fd")
        .arg(fds[1].to_string())
        .stderr(Stdio::piped());
    // SAFETY: only fcntl between fork and exec, on descriptors this process holds.
    unsafe {
        cmd.pre_exec(move || {
            for fd in fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop((vhost, hybrid));
    // The listener is there already: the connection waits in its backlog.
    let mut conn = UnixStream::connect(&socket).unwrap();
    let mut msg = Vec::new();
    for word in [1u32, 1, 0] {
        msg.extend_from_slice(&word.to_le_bytes());
    }
    conn.write_all(&msg).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reply = [0u8; 20];
    conn.read_exact(&mut reply).unwrap();
    assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()), 1);
    drop(conn);
    let status = wait_exit(&mut child);
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "exit status {status}: {err}");
    assert!(socket.exists(), "the vhost-user socket was removed: {err}");
    assert!(uds.exists(), "the hybrid socket was removed: {err}");
}

/// The backend run with `args` before its two socket paths, to its end.
fn backend_run(args: &[&str], socket: &Path, uds: &Path) -> std::process::Output {
    Command::new(BIN)
        .arg("vhost-user-vsock")
        .args(args)
        .arg("--socket")
        .arg(socket)
        .arg("--uds-path")
        .arg(uds)
        .output()
        .unwrap()
}

#[test]
fn bad_arguments_fail_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let (v, u) = (dir.path().join("v.sock"), dir.path().join("u.sock"));
    let out = backend_run(&["--guest-cid", "2"], &v, &u);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("guest_cid"), "stderr: {stderr}");

    // A standard stream is no listener of ours.
    let out = backend_run(&["--jail", "off", "--socket-fd", "1"], &v, &u);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--socket-fd 1"), "stderr: {stderr}");

    // The hybrid socket path is a regular file: refuse to clobber it.
    let file = dir.path().join("file");
    std::fs::write(&file, b"keep me").unwrap();
    let out = backend_run(&[], &v, &file);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a socket"));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

    // Same for the vhost-user socket path; the hybrid socket is not left behind.
    let out = backend_run(&[], &file, &u);
    assert!(!out.status.success());
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    assert!(!u.exists());
}

#[test]
fn descriptors_named_but_not_open_are_refused_by_flag() {
    // Checked as the flags are read, before the VMM opens descriptors of its own that a
    // stale number could name; no /dev/kvm is needed to get this far.
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, b"not a kernel").unwrap();
    for flag in ["--mem-fd", "--kvm-fd", "--serial-out-fd"] {
        let out = Command::new(BIN)
            .arg("run")
            .arg("--kernel")
            .arg(&kernel)
            .args([flag, "900"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flag}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("{flag} 900: Bad file descriptor")),
            "{flag}: {stderr}"
        );
    }
}
