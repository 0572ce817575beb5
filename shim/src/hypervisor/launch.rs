//! Launch steps every backend shares: the per-VM run directory, the `Vm`
//! that owns processes from the first spawn on, virtiofsd, and waiting for a
//! backend's socket.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::process::Command;

use super::process::{configure, VmProcesses};
use super::{tail_lines, HypervisorError, LaunchTimes, SharedDir, Vm, VmSpec};

/// How long a device backend may take to listen on its socket. A backend that exits
/// is seen at once (`wait_for_socket` polls it); this only bounds one that hangs. 5 s
/// was too short for the jailed vsock backend inside the nested harness's L1 (TCG)
/// while a CI run kept the host busy: `jailed_qemu_boots_under_hardware_kvm` failed
/// both its tries there with "no socket", and passes alone in 14 s.
pub const BACKEND_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Every option the shim passes a virtiofsd, here and in `template.rs`. A virtiofsd
/// without one of them fails every pod at its start: QEMU's old C virtiofsd (which
/// older distributions installed as `/usr/libexec/virtiofsd`, where the shim now looks)
/// takes `-o` options instead, and older Rust ones lack the newer options.
pub const VIRTIOFSD_OPTIONS: &[&str] = &[
    "--fd",
    "--socket-path",
    "--shared-dir",
    "--sandbox",
    "--announce-submounts",
    "--cache",
    "--log-level",
    "--rlimit-nofile",
    "--inode-file-handles",
];

/// How long `virtiofsd --help` may take: one that does not answer (a wrapper that
/// serves instead) must not hold `cocoon check`, nor the node installer behind it.
const VIRTIOFSD_HELP_TIMEOUT: Duration = Duration::from_secs(10);

/// The options of [`VIRTIOFSD_OPTIONS`] that `binary --help` does not list, for
/// `cocoon check`'s verdict: asking the binary itself needs no version table. A binary
/// that cannot run (a missing library), fails or does not answer in time is an error
/// saying so, not a list of everything it lacks.
pub fn virtiofsd_lacks(binary: &Path) -> Result<Vec<&'static str>, String> {
    virtiofsd_lacks_within(binary, VIRTIOFSD_HELP_TIMEOUT)
}

/// `virtiofsd_lacks`, with its deadline given.
pub(crate) fn virtiofsd_lacks_within(
    binary: &Path,
    timeout: Duration,
) -> Result<Vec<&'static str>, String> {
    let child = std::process::Command::new(binary)
        .arg("--help")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run it: {e}"))?;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    let out = match rx.recv_timeout(timeout) {
        Ok(out) => out.map_err(|e| format!("cannot run it: {e}"))?,
        Err(_) => {
            // Still our unreaped child, so the pid is its; the thread reaps it.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            return Err(format!("`--help` gave no answer in {:?}", timeout));
        }
    };
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = said.lines().collect();
        let last = &lines[lines.len().saturating_sub(3)..];
        return Err(format!(
            "`--help` failed ({}): {}",
            out.status,
            last.join(" / ")
        ));
    }
    let help = [out.stdout, out.stderr].concat();
    let help = String::from_utf8_lossy(&help);
    // Each option as its line of the help starts it: `--cache <CACHE>`,
    // `--inode-file-handles=<...>`, `--posix-acl[=<...>]`, the C one's `-o opt`.
    let listed: std::collections::HashSet<&str> = help
        .lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .flat_map(|l| l.split(|c: char| c.is_whitespace() || matches!(c, '=' | '[' | ',')))
        .collect();
    Ok(VIRTIOFSD_OPTIONS
        .iter()
        .copied()
        .filter(|o| !listed.contains(o))
        .collect())
}

/// Creates `<run_root>/<id>` (0700); an existing one is an error, never reused.
pub fn create_run_dir(spec: &VmSpec) -> Result<PathBuf, HypervisorError> {
    let run_dir = spec.run_dir();
    std::fs::create_dir_all(&spec.run_root)
        .map_err(|e| HypervisorError::RunDir(spec.run_root.clone(), e))?;
    match std::fs::DirBuilder::new().mode(0o700).create(&run_dir) {
        Ok(()) => Ok(run_dir),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(HypervisorError::RunDirExists(run_dir))
        }
        Err(e) => Err(HypervisorError::RunDir(run_dir, e)),
    }
}

/// The `Vm` that owns the run dir from now on: dropping it (on any early
/// return) kills what was spawned and removes the directory. `vmm_log` is the
/// file (in the run dir) the VMM's own stderr goes to.
pub fn new_vm(
    spec: &VmSpec,
    run_dir: &Path,
    vmm_log: &str,
    accel: &'static str,
    started: Instant,
) -> Vm {
    Vm {
        id: spec.id.clone(),
        run_dir: run_dir.to_path_buf(),
        vsock_uds: run_dir.join("vsock.sock"),
        console_log: run_dir.join("console.log"),
        vmm_log: run_dir.join(vmm_log),
        vmm_log_copy: None,
        console_copy: None,
        accel,
        times: LaunchTimes {
            started,
            backend_ready: started,
            vmm_spawned: started,
        },
        procs: VmProcesses::default(),
        identity: None,
        agent_ready: None,
        template: None,
        memory_control: None,
        qmp: None,
        disk_slots: None,
    }
}

/// virtiofsd's descriptor limit: one O_PATH descriptor per inode the guest holds a
/// lookup on, and one per open file (its own default, kept as a documented bound).
const VIRTIOFSD_NOFILE: u64 = 1_000_000;

/// Starts virtiofsd for `shared` and waits until it listens on `socket`.
///
/// The shim makes its listening socket and passes it with `--fd`. With the pod's user
/// namespace (`shared.userns`), virtiofsd is root of that namespace only: the shim
/// starts it in the share and sets the descriptor limit before the child enters the
/// namespace, where it could no longer raise it.
pub async fn spawn_virtiofsd(
    vm: &mut Vm,
    shared: &SharedDir,
    socket: &Path,
) -> Result<(), HypervisorError> {
    let log = vm.run_dir.join("virtiofsd.log");
    let mut fs = Command::new(&shared.virtiofsd);
    // Own mount namespace, pivoted into the shared dir: the daemon cannot
    // reach host paths outside the pod's share, whatever the guest asks.
    // Submounts (each container's rootfs) are announced so the guest sees
    // them as separate filesystems.
    fs.args([
        "--sandbox",
        "namespace",
        "--announce-submounts",
        "--cache",
        "auto",
    ]);
    fs.args(["--log-level", "warn"]);
    let spawn_err = |source| HypervisorError::Spawn {
        what: "virtiofsd",
        source,
    };
    enter_share_ns(&mut fs, shared).map_err(spawn_err)?;
    let copied = configure(&mut fs, &log).map_err(spawn_err)?;
    // The listening socket is made here and passed with `--fd`, listening before
    // virtiofsd starts: one it bound itself would exist a moment before it listens,
    // and the VMM, started once the file shows, would be refused in that moment. With
    // the pod's user namespace, it is also the only way: the socket directory is
    // root's, which the namespace's root cannot write.
    let listener = std::os::unix::net::UnixListener::bind(socket)
        .map_err(|e| HypervisorError::RunDir(socket.into(), e))?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
    fs.arg("--fd").arg(fd.to_string());
    super::inherit_fd(&mut fs, fd);
    match &shared.userns {
        Some(ns) => {
            fs.args(["--rlimit-nofile", "0"]);
            // The share's parents are root's and closed to the namespace's root: it
            // starts in the share (entered while still host root, `enter_share_ns`)
            // and exports that.
            fs.args(["--shared-dir", "."]);
            // So `ps` still tells whose it is (and tests and operators can find it).
            fs.arg0(format!("virtiofsd@{}", shared.path.display()));
            // Opening by handle needs CAP_DAC_READ_SEARCH on the host; without
            // this it tries, warns and falls back to the same.
            fs.arg("--inode-file-handles=never");
            let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(VIRTIOFSD_NOFILE);
            ns.enter_as_root(&mut fs, VIRTIOFSD_NOFILE.min(nr_open));
        }
        None => {
            fs.arg("--shared-dir").arg(&shared.path);
        }
    }
    let child = fs.spawn().map_err(spawn_err)?;
    // Its copies of the log pipe's write end: the copy ends when virtiofsd's do.
    drop(fs);
    vm.procs.push_backend(child, "virtiofsd", &log, copied);
    // virtiofsd holds the listener now.
    drop(listener);
    wait_for_socket(&mut vm.procs, socket, &log).await
}

/// Makes virtiofsd start in the pod's mount namespace, where the share's mounts are
/// (`shimv2::podns`), and, when it will run in the pod's user namespace, in the share
/// itself. Registered before any other step of the child's: entering a mount
/// namespace takes host root, and resets the directory the child is in (so it is
/// changed here, after, rather than by `current_dir`, which runs before these steps).
fn enter_share_ns(fs: &mut Command, shared: &SharedDir) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let ns = shared.mount_ns.as_ref().map(|ns| ns.fd().as_raw_fd());
    let cwd = match &shared.userns {
        Some(_) => Some(
            std::ffi::CString::new(shared.path.as_os_str().as_bytes())
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?,
        ),
        None => None,
    };
    // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
    // functions (setns, chdir); the namespace's descriptor outlives the spawn (the
    // caller holds `shared`, whose handle keeps it open).
    unsafe {
        fs.pre_exec(move || {
            if let Some(fd) = ns {
                if libc::setns(fd, libc::CLONE_NEWNS) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(dir) = &cwd {
                if libc::chdir(dir.as_ptr()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(())
}

/// Waits for the last-spawned backend's socket: a VMM started before it
/// exists fails, and one started against a socket nobody serves waits forever.
pub async fn wait_for_socket(
    procs: &mut VmProcesses,
    socket: &Path,
    log: &Path,
) -> Result<(), HypervisorError> {
    let deadline = Instant::now() + BACKEND_READY_TIMEOUT;
    loop {
        if socket.exists() {
            return Ok(());
        }
        let exited = procs.backends.last_mut().map(|b| b.try_wait());
        if let Some(Ok(Some(status))) = exited {
            return Err(HypervisorError::BackendNotReady {
                after: BACKEND_READY_TIMEOUT,
                detail: format!(
                    "it exited with {status}: {}",
                    procs.last_backend_log(5).await
                ),
            });
        }
        if Instant::now() >= deadline {
            return Err(HypervisorError::BackendNotReady {
                after: BACKEND_READY_TIMEOUT,
                detail: format!(
                    "no socket at {}; its log says: {}",
                    socket.display(),
                    tail_lines(log, 5)
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
