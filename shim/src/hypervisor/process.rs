//! The host processes of one VM (the VMM and its device backends): spawning
//! them so they cannot outlive us by accident, and taking them down.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use super::HypervisorError;

/// Prepares `cmd` so the child dies with the thread that spawned it, gets no
/// stdin, and sends its output (stdout and stderr) through a pipe the shim copies into
/// `log`, bounded ([`super::console::log_to_pipe`]): the process holds no file it could
/// grow. The returned handle tells when the copy has caught up with a process that
/// exited.
pub(crate) fn configure(cmd: &mut Command, log: &Path) -> std::io::Result<super::console::Copied> {
    cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
    die_with_parent(cmd);
    super::console::log_to_pipe(cmd, log)
}

/// Has `cmd`'s child SIGKILLed when the thread that spawned it dies: a VM's processes
/// never outlive their shim (`shim delete` relies on it to spare a live shim's VM).
pub(crate) fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only calls prctl,
    // which is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Makes `cmd` start with no capabilities it could ever regain: its bounding and
/// ambient sets emptied and no_new_privs set, before exec. As root, exec then grants
/// nothing (root's file capabilities are masked by the empty bounding set). The
/// parent-death signal set by `configure` survives: losing capabilities is no
/// credential change that clears it.
pub(crate) fn drop_capabilities(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only calls prctl, which is
    // async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            for cap in 0..64 {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                    let e = std::io::Error::last_os_error();
                    // Past the last capability this kernel knows.
                    if e.raw_os_error() == Some(libc::EINVAL) {
                        break;
                    }
                    return Err(e);
                }
            }
            if libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ) != 0
                || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Where distributions install helper programs that are not meant to be on `$PATH`:
/// Debian 13's and Ubuntu's `virtiofsd` packages, and Fedora's, install
/// `/usr/libexec/virtiofsd`. Searched after `$PATH`, so an install prefix or a
/// `$PATH` entry still wins, and only for a bare name.
const HELPER_DIRS: &[&str] = &["/usr/libexec"];

/// Finds an executable: `configured` if set, else next to the current executable, else
/// on `$PATH`, else in the distributions' helper directory (`/usr/libexec`).
pub fn find_binary(name: &str, configured: &Path) -> Result<PathBuf, HypervisorError> {
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf));
    let helper_dirs: Vec<&Path> = HELPER_DIRS.iter().map(Path::new).collect();
    find_in(
        name,
        configured,
        exe_dir.as_deref(),
        std::env::var_os("PATH").as_deref(),
        &helper_dirs,
    )
}

/// `find_binary`, with where it looks given.
fn find_in(
    name: &str,
    configured: &Path,
    exe_dir: Option<&Path>,
    path: Option<&std::ffi::OsStr>,
    helper_dirs: &[&Path],
) -> Result<PathBuf, HypervisorError> {
    if !configured.as_os_str().is_empty() {
        if configured.is_file() {
            return Ok(configured.to_path_buf());
        }
        return Err(HypervisorError::MissingBinary {
            name: name.into(),
            looked: configured.display().to_string(),
        });
    }
    let mut looked = Vec::new();
    if let Some(dir) = exe_dir {
        // Test binaries live in target/<profile>/deps; the tools one level up.
        for d in [dir.to_path_buf(), dir.join("..")] {
            let p = d.join(name);
            if p.is_file() {
                return Ok(p);
            }
            looked.push(p.display().to_string());
        }
    }
    if let Some(path) = path {
        for d in std::env::split_paths(path) {
            let p = d.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
        looked.push("$PATH".into());
    }
    // A path (`/opt/qemu/bin/qemu-system-x86_64`, `bin/x`) is not looked up further.
    if !name.contains('/') {
        for d in helper_dirs {
            let p = d.join(name);
            if p.is_file() {
                return Ok(p);
            }
            looked.push(p.display().to_string());
        }
    }
    Err(HypervisorError::MissingBinary {
        name: name.into(),
        looked: looked.join(", "),
    })
}

/// The processes of one VM. The VMM is the one whose exit ends the VM; the
/// backends exit when it disconnects, and are killed if they do not.
#[derive(Debug, Default)]
pub struct VmProcesses {
    pub(crate) vmm: Option<Child>,
    pub(crate) backends: Vec<Child>,
    /// For each of `backends`, what it is, the file its output goes to and the copy
    /// into it.
    backend_logs: Vec<(&'static str, PathBuf, super::console::Copied)>,
    vmm_status: Option<ExitStatus>,
}

impl VmProcesses {
    /// Adds a device backend, named `what`, whose output is `copied` into `log`.
    pub(crate) fn push_backend(
        &mut self,
        child: Child,
        what: &'static str,
        log: &Path,
        copied: super::console::Copied,
    ) {
        self.backends.push(child);
        self.backend_logs.push((what, log.to_path_buf(), copied));
    }

    /// The last `lines` of the last-added backend's log, once its copy caught up
    /// (bounded): it has exited.
    pub(crate) async fn last_backend_log(&self, lines: usize) -> String {
        let Some((_, log, copied)) = self.backend_logs.last() else {
            return String::new();
        };
        copied
            .settled(std::time::Instant::now() + super::console::COPY_SETTLE)
            .await;
        super::tail_lines(log, lines)
    }

    /// Lets the log copies of the backends that have exited catch up, until `until`.
    pub(crate) async fn settle_exited_backends(&mut self, until: std::time::Instant) {
        let mut exited = Vec::new();
        for (b, (_, _, copied)) in self.backends.iter_mut().zip(&self.backend_logs) {
            if matches!(b.try_wait(), Ok(Some(_))) {
                exited.push(copied.clone());
            }
        }
        for c in exited {
            c.settled(until).await;
        }
    }

    /// Every backend's log copy.
    pub(crate) fn backend_copies(&self) -> impl Iterator<Item = &super::console::Copied> {
        self.backend_logs.iter().map(|(_, _, c)| c)
    }

    /// A device backend that has exited, if any: what it is, its pid, how it ended and
    /// the last `lines` of its log.
    pub fn backend_exit_report(&mut self, lines: usize) -> Option<String> {
        let (i, pid, status) = self.backends.iter_mut().enumerate().find_map(|(i, b)| {
            let pid = b.id()?;
            let status = b.try_wait().ok().flatten()?;
            Some((i, pid, status))
        })?;
        let (what, log) = self
            .backend_logs
            .get(i)
            .map(|(w, l, _)| (*w, super::tail_lines(l, lines)))
            .unwrap_or(("device backend", String::new()));
        Some(format!(
            "{what} (pid {pid}) exited ({status}); its log ends with:\n{log}"
        ))
    }

    pub fn vmm_pid(&self) -> Option<u32> {
        self.vmm.as_ref().and_then(Child::id)
    }

    /// The VMM program's own pid: a jailed one's, not its waiter's.
    pub fn vmm_program_pid(&self) -> Option<u32> {
        let pid = self.vmm_pid()?;
        Some(program_of_waiter(pid).first().copied().unwrap_or(pid))
    }

    /// The VM's host processes: each we started and, for a jailed one, the program its
    /// waiter runs in a PID namespace of its own (`jail-exec --pid-ns`).
    pub fn pids(&self) -> Vec<u32> {
        self.vmm
            .iter()
            .chain(self.backends.iter())
            .filter_map(Child::id)
            .flat_map(|pid| std::iter::once(pid).chain(program_of_waiter(pid)))
            .collect()
    }

    pub fn try_vmm_exit(&mut self) -> Option<ExitStatus> {
        if self.vmm_status.is_none() {
            if let Some(c) = self.vmm.as_mut() {
                self.vmm_status = c.try_wait().ok().flatten();
            }
        }
        self.vmm_status
    }

    pub async fn wait_vmm_exit(&mut self, deadline: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.try_vmm_exit() {
            return Some(s);
        }
        let c = self.vmm.as_mut()?;
        let s = tokio::time::timeout(deadline, c.wait()).await.ok()?.ok();
        self.vmm_status = s;
        s
    }

    /// Gives the VMM `grace` to exit, then ends everything (SIGTERM, [`finish`]) and
    /// reaps it.
    /// Reaping is bounded too: a process stuck in the kernel (uninterruptible, e.g.
    /// inside KVM) does not die of SIGKILL, and the pod's teardown must not hang on it.
    /// Such a process is logged and left to tokio's orphan reaping.
    pub async fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut status = self.wait_vmm_exit(grace).await;
        // The VM is over from here: it exited, or it is ended now. Its backends serve
        // nothing more and are ended alongside the VMM. Each would exit by itself once
        // it saw the VMM gone, but only after the VMM's own exit, which put 4-28 ms
        // more on every pod's stop under TCG.
        let vmm = self.vmm.as_mut().filter(|_| status.is_none());
        let pids = vmm
            .iter()
            .map(|c| c.id())
            .chain(self.backends.iter().map(Child::id));
        for pid in pids.flatten() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        if let Some(c) = vmm {
            status = finish(c, "the VMM").await;
        }
        for b in &mut self.backends {
            let _ = finish(b, "a backend").await;
        }
        self.vmm = None;
        self.backends.clear();
        self.backend_logs.clear();
        status
    }

    /// SIGKILLs the VMM without reaping it: its exit is then seen as any other (the
    /// VM watcher's pidfd), and the pid stays ours until `stop` reaps it.
    pub fn kill_vmm(&self) {
        if let Some(pid) = self.vmm.as_ref().and_then(Child::id) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }

    /// For `Drop`, which may run on an async worker: SIGKILL everything and never
    /// sleep. A child not yet reaped goes to tokio's orphan queue, which reaps it on a
    /// later SIGCHLD, so no zombie stays behind.
    pub fn kill_now(&mut self) {
        for c in self.vmm.iter_mut().chain(self.backends.iter_mut()) {
            if let Some(pid) = c.id() {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            let _ = c.try_wait();
        }
        self.vmm = None;
        self.backends.clear();
        self.backend_logs.clear();
    }
}

/// The program a PID-namespace waiter runs (its one child), if `pid` is such a waiter
/// (it renames itself `cocoon-pid-ns` once the program is forked). Other processes'
/// children (virtiofsd's sandbox helpers) are theirs to manage.
fn program_of_waiter(pid: u32) -> Vec<u32> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() == cocoon_vmm::pid_ns::WAITER_NAME {
        crate::telemetry::children_of(pid)
    } else {
        Vec::new()
    }
}

/// How long a SIGTERMed child may take before it gets SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(2);

/// Waits up to `TERM_GRACE` for a child sent SIGTERM, then SIGKILLs and reaps it. A
/// jailed VMM runs as PID 1 of its own PID namespace under a waiter (`cocoon-vmm
/// jail-exec --pid-ns`): SIGTERM makes the waiter SIGKILL the VMM and reap it before it
/// exits, so once the waiter is reaped here nothing of the VM is left. A SIGKILLed waiter
/// would leave the VMM to die of its parent-death signal a moment later, after we had
/// moved on.
async fn finish(child: &mut tokio::process::Child, what: &str) -> Option<ExitStatus> {
    if child.id().is_some() {
        if let Ok(r) = tokio::time::timeout(TERM_GRACE, child.wait()).await {
            return r.ok();
        }
    }
    let _ = child.start_kill();
    reap(child, what).await
}

/// How long a SIGKILLed child may take to be reaped.
const REAP_AFTER_KILL: Duration = Duration::from_secs(10);

/// Waits for a SIGKILLed `child` up to `REAP_AFTER_KILL`; says so if it is still there,
/// with its kernel state.
async fn reap(child: &mut tokio::process::Child, what: &str) -> Option<ExitStatus> {
    match tokio::time::timeout(REAP_AFTER_KILL, child.wait()).await {
        Ok(r) => r.ok(),
        Err(_) => {
            let pid = child.id().unwrap_or(0);
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(") ")
                        .map(|(_, r)| r.chars().take(1).collect())
                })
                .unwrap_or_else(|| "?".to_string());
            let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
            tracing::error!(
                pid,
                state,
                wchan,
                "{what} did not die of SIGKILL within {} s (stuck in the kernel); leaving it",
                REAP_AFTER_KILL.as_secs()
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn executable(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        p
    }

    /// Debian 13's and Ubuntu's virtiofsd is in /usr/libexec, on no `$PATH`: found
    /// there, but only after the install prefix and `$PATH`, which stay in charge.
    #[test]
    fn a_helper_is_found_in_libexec_after_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let (exe, bin, libexec) = (
            dir.path().join("exe/deps"),
            dir.path().join("bin"),
            dir.path().join("libexec"),
        );
        for d in [&exe, &bin, &libexec] {
            std::fs::create_dir_all(d).unwrap();
        }
        let path = std::env::join_paths([&bin]).unwrap();
        let find = || {
            find_in(
                "virtiofsd",
                Path::new(""),
                Some(&exe),
                Some(&path),
                &[libexec.as_path()],
            )
        };

        let err = find().unwrap_err().to_string();
        assert!(err.contains("virtiofsd"), "{err}");
        assert!(
            err.contains(&libexec.join("virtiofsd").display().to_string()),
            "{err}"
        );

        let in_libexec = executable(&libexec, "virtiofsd");
        assert_eq!(find().unwrap(), in_libexec);
        let on_path = executable(&bin, "virtiofsd");
        assert_eq!(find().unwrap(), on_path);
        let beside = executable(&exe, "virtiofsd");
        assert_eq!(find().unwrap(), beside);

        // A configured path is the only one tried.
        let missing = dir.path().join("nowhere/virtiofsd");
        let err = find_in("virtiofsd", &missing, Some(&exe), Some(&path), &[&libexec])
            .unwrap_err()
            .to_string();
        assert!(err.contains(&missing.display().to_string()), "{err}");
    }

    /// A name with a directory in it is not looked for in the helper directory.
    #[test]
    fn a_path_is_not_looked_up_in_libexec() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sub")).unwrap();
        executable(&dir.path().join("sub"), "tool");
        let found = find_in("sub/tool", Path::new(""), None, None, &[dir.path()]);
        assert!(found.is_err(), "{found:?}");
    }

    /// A child that, sent SIGTERM, leaves `marker` behind and exits 0, as a VMM's own
    /// shutdown would. (Short sleeps: a killed shell's last one outlives it briefly.)
    /// Returned once its trap is set: a SIGTERM before that would kill the shell
    /// outright (a loaded CI machine once got there first).
    async fn graceful(marker: &Path) -> Child {
        trapped(&format!("touch {}; exit 0", marker.display())).await
    }

    /// A child that runs `on_term` when sent SIGTERM; returned once its trap is set.
    async fn trapped(on_term: &str) -> Child {
        use tokio::io::AsyncReadExt;
        let script = format!("trap '{on_term}' TERM; echo trapped; while :; do sleep 0.1; done");
        let mut child = Command::new("sh")
            .args(["-c", &script])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let mut line = [0u8; 8];
        tokio::time::timeout(Duration::from_secs(30), out.read_exact(&mut line))
            .await
            .expect("the shell set its trap within 30 s")
            .unwrap();
        assert_eq!(&line, b"trapped\n");
        child
    }

    /// Even with no grace to exit by itself, a VMM is asked to shut down (SIGTERM)
    /// before it is killed, and so is a backend that outlives it.
    #[tokio::test]
    async fn a_stop_lets_the_vmm_and_backends_shut_down_by_themselves() {
        let dir = tempfile::tempdir().unwrap();
        let (vmm_mark, backend_mark) = (dir.path().join("vmm"), dir.path().join("backend"));
        let mut procs = VmProcesses {
            vmm: Some(graceful(&vmm_mark).await),
            backends: vec![graceful(&backend_mark).await],
            ..Default::default()
        };
        let pids = procs.pids();
        let status = procs.stop(Duration::ZERO).await.expect("reaped");
        assert!(status.success(), "{status}");
        assert!(vmm_mark.exists() && backend_mark.exists());
        for pid in pids {
            assert!(!Path::new(&format!("/proc/{pid}")).exists(), "{pid} left");
        }
        assert!(procs.vmm.is_none() && procs.backends.is_empty());
    }

    /// A stop ends the backends alongside the VMM, not after it: here the VMM exits
    /// cleanly on SIGTERM only once its backend has had SIGTERM too, which a backend
    /// ended only after the VMM never gets before the VMM's own grace runs out.
    #[tokio::test]
    async fn a_stop_ends_the_backends_with_the_vmm() {
        let dir = tempfile::tempdir().unwrap();
        let backend_mark = dir.path().join("backend");
        let vmm_waits = format!(
            "until [ -e {} ]; do sleep 0.05; done; exit 0",
            backend_mark.display()
        );
        let mut procs = VmProcesses {
            vmm: Some(trapped(&vmm_waits).await),
            backends: vec![graceful(&backend_mark).await],
            ..Default::default()
        };
        let status = procs.stop(Duration::ZERO).await.expect("reaped");
        assert!(
            status.success(),
            "the VMM was killed, not ended cleanly: {status}"
        );
        assert!(backend_mark.exists());
    }
}
