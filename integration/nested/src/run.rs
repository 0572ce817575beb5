//! Boots L1 and runs one command in it. The host side is two processes: virtiofsd
//! exporting the host's `/` read-only (L1's lower layer) and QEMU with TCG, emulated SVM
//! and nested paging. L1's kernel console goes to `console.log`; the command's output
//! and its exit status come back on a second serial port, so neither depends on a
//! writable share. A third carries L1's heartbeat: an L1 that shows no sign of life on
//! any of the three for `L1::silence` is ended then, not at the timeout.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::image::{command_archive, L1Image};
use crate::{tail, NestedError};

const STATUS_MARK: &str = "COCOON-L1-STATUS ";
const ERROR_MARK: &str = "COCOON-L1-ERROR ";
/// The virtio-fs tag L1's first stage mounts as its lower layer.
const ROOT_TAG: &str = "hostroot";
/// Lines of console and output kept in error messages.
const TAIL_LINES: usize = 40;

/// How to boot L1.
#[derive(Debug, Clone)]
pub struct L1 {
    pub image: L1Image,
    /// QEMU's `-cpu`: a model with SVM and nested paging, or L1 has no KVM.
    pub cpu: String,
    pub cpus: u32,
    /// QEMU's `-accel` for L1: `tcg` (one host thread per vCPU) or `tcg,thread=single`.
    pub accel: String,
    pub mem_mib: u32,
    /// From QEMU's start to L1's power-off; QEMU is killed after it.
    pub timeout: Duration,
    /// Extra kernel command-line words for L1.
    pub cmdline: String,
    /// How long L1 may write nothing at all (console, output, heartbeat) before the run
    /// is ended as `NestedError::L1Silent`. L1's second stage beats every few seconds
    /// whatever the command does, so only a frozen L1 stays this quiet.
    pub silence: Duration,
}

/// What a command printed inside L1 (stdout and stderr together) and how it ended.
#[derive(Debug, Clone)]
pub struct L1Output {
    pub status: i32,
    pub output: Vec<u8>,
    /// L1's kernel console, for diagnosis.
    pub console: String,
    /// QEMU start to exit.
    pub wall: Duration,
}

impl L1Output {
    pub fn output_text(&self) -> String {
        String::from_utf8_lossy(&self.output).into_owned()
    }
}

/// Kills and reaps a child when dropped: no VM outlives its run, whatever failed.
struct Reaped(Child);

/// Has `cmd`'s child SIGKILLed when the thread that started it ends, so that a harness
/// killed outright (a test runner's timeout, ^C) leaves no L1 QEMU or virtiofsd
/// running on: `Reaped`'s drop never runs then.
fn dies_with_parent(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec, only prctl(2), which is async-signal-safe and
    // touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl L1 {
    /// Two vCPUs and 3 GiB: room for L2 guests, virtiofsd and containerd inside.
    pub fn new(image: L1Image) -> L1 {
        L1 {
            image,
            cpu: "EPYC,+svm,+npt".into(),
            cpus: 2,
            accel: "tcg".into(),
            mem_mib: 3072,
            timeout: Duration::from_secs(300),
            cmdline: String::new(),
            // In CI, frozen L1s went quiet about 10 s into boot and stayed so until
            // the 540 s limit; a live one beats every 5 s.
            silence: Duration::from_secs(120),
        }
    }

    /// Runs `script` with `/bin/sh` inside L1, in `cwd`, with `env` exported, and returns
    /// its output and exit status. An error means L1 itself failed (or this host cannot
    /// run it); a failing command is an `Ok` with a non-zero status.
    pub fn run(
        &self,
        script: &str,
        cwd: &Path,
        env: &[(String, String)],
    ) -> Result<L1Output, NestedError> {
        let qemu = which("qemu-system-x86_64", "apt-get install qemu-system-x86")?;
        let virtiofsd = which("virtiofsd", "cargo install virtiofsd")?;
        let dir = tempfile::Builder::new()
            .prefix("cocoon-l1-")
            .tempdir()
            .map_err(NestedError::io("create the L1 run directory"))?;
        let initrd = dir.path().join("initrd.cpio");
        let mut bytes = std::fs::read(&self.image.initrd).map_err(NestedError::io(format!(
            "read {}",
            self.image.initrd.display()
        )))?;
        bytes.extend_from_slice(&command_archive(&wrap(script, cwd, env))?);
        std::fs::write(&initrd, bytes).map_err(NestedError::io("write the L1 initramfs"))?;

        let sock = dir.path().join("root.sock");
        let fs_log = file(&dir.path().join("virtiofsd.log"))?;
        let _fsd = Reaped(
            dies_with_parent(&mut Command::new(&virtiofsd))
                .arg("--shared-dir=/")
                .arg(format!("--socket-path={}", sock.display()))
                // The host's own root, read-only: nothing in L1 can change the host.
                .args([
                    "--readonly",
                    "--sandbox=none",
                    "--cache=auto",
                    "--no-announce-submounts",
                ])
                .stdin(Stdio::null())
                .stdout(
                    fs_log
                        .try_clone()
                        .map_err(NestedError::io("dup a log fd"))?,
                )
                .stderr(fs_log)
                .spawn()
                .map_err(NestedError::io("start virtiofsd"))?,
        );
        wait_for(&sock, Duration::from_secs(10))?;

        let console = dir.path().join("console.log");
        let out = dir.path().join("out.log");
        let heartbeat = dir.path().join("heartbeat.log");
        let qemu_log = dir.path().join("qemu.log");
        let started = Instant::now();
        let mut vm = Reaped(
            dies_with_parent(&mut Command::new(qemu))
                .args(["-M", "q35", "-accel", &self.accel])
                .args(["-cpu", &self.cpu])
                .args(["-smp", &self.cpus.to_string()])
                .args(["-m", &format!("{}M", self.mem_mib)])
                .args(["-nodefaults", "-no-user-config", "-display", "none"])
                .arg("-no-reboot")
                .arg("-kernel")
                .arg(&self.image.kernel)
                .arg("-initrd")
                .arg(&initrd)
                .arg("-append")
                .arg(format!(
                    // TCG cannot calibrate the TSC reliably; say its rate (the host's:
                    // the guest's TSC counts at it).
                    "console=ttyS0 {} panic=-1 quiet {}",
                    cocoon_rootfs::tsc::tcg_kernel_param(None),
                    self.cmdline
                ))
                .arg("-serial")
                .arg(format!("file:{}", console.display()))
                .arg("-serial")
                .arg(format!("file:{}", out.display()))
                .arg("-serial")
                .arg(format!("file:{}", heartbeat.display()))
                // vhost-user needs the guest's RAM shared with virtiofsd.
                .args([
                    "-object",
                    &format!(
                        "memory-backend-memfd,id=mem,size={}M,share=on",
                        self.mem_mib
                    ),
                    "-numa",
                    "node,memdev=mem",
                ])
                .args([
                    "-chardev",
                    &format!("socket,id=root,path={}", sock.display()),
                ])
                .args([
                    "-device",
                    &format!("vhost-user-fs-pci,chardev=root,tag={ROOT_TAG}"),
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(file(&qemu_log)?)
                .spawn()
                .map_err(NestedError::io("start QEMU for L1"))?,
        );
        let deadline = started + self.timeout;
        let mut liveness = Liveness::new(started);
        let mut next_look = Instant::now();
        let exited = loop {
            match vm.0.try_wait() {
                Ok(Some(_)) => break true,
                Ok(None) if Instant::now() >= deadline => break false,
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => return Err(NestedError::io("wait for QEMU")(e)),
            }
            // Every few seconds, L1's console: a CPU stalled for good ends the run now.
            if Instant::now() >= next_look {
                next_look = Instant::now() + Duration::from_secs(3);
                let console_text = read_lossy(&console);
                if let Some(stall) = l1_stall(&console_text) {
                    let output = std::fs::read(&out).unwrap_or_default();
                    return Err(NestedError::L1Stall {
                        stall,
                        output: tail(&String::from_utf8_lossy(&output), TAIL_LINES),
                        console: tail(&console_text, TAIL_LINES),
                    });
                }
                let written = [&console, &out, &heartbeat]
                    .iter()
                    .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
                    .sum();
                if let Some(quiet) = liveness.silent(written, Instant::now(), self.silence) {
                    let output = std::fs::read(&out).unwrap_or_default();
                    return Err(NestedError::L1Silent {
                        seconds: quiet.as_secs(),
                        after: started.elapsed().as_secs(),
                        output: tail(&String::from_utf8_lossy(&output), TAIL_LINES),
                        console: tail(&(console_text + &qemu_stderr(&qemu_log)), TAIL_LINES),
                    });
                }
            }
        };
        let wall = started.elapsed();
        let console_text = read_lossy(&console) + &qemu_stderr(&qemu_log);
        let output = std::fs::read(&out).unwrap_or_default();
        let text = String::from_utf8_lossy(&output);
        if !exited {
            return Err(NestedError::Timeout {
                seconds: self.timeout.as_secs(),
                output: tail(&text, TAIL_LINES),
                console: tail(&console_text, TAIL_LINES),
            });
        }
        if let Some(err) = text.lines().find_map(|l| l.strip_prefix(ERROR_MARK)) {
            let (kind, why) = err.split_once(": ").unwrap_or(("setup", err));
            return Err(match kind {
                "no-svm" => NestedError::NoSvm(why.to_owned()),
                "no-kvm" => NestedError::NoKvm(why.to_owned()),
                _ => NestedError::Setup {
                    message: why.to_owned(),
                    console: tail(&console_text, TAIL_LINES),
                },
            });
        }
        // The status line is the last thing stage 2 writes; the command's own output
        // cannot forge it because it comes after the command has ended.
        let no_status = || match l1_panic(&console_text) {
            Some(panic) => NestedError::L1Panic {
                panic,
                output: tail(&text, TAIL_LINES),
                console: tail(&console_text, TAIL_LINES),
            },
            None => NestedError::NoStatus {
                output: tail(&text, TAIL_LINES),
                console: tail(&console_text, TAIL_LINES),
            },
        };
        let mark = STATUS_MARK.as_bytes();
        let pos = output
            .windows(mark.len())
            .rposition(|w| w == mark)
            .ok_or_else(no_status)?;
        let status = std::str::from_utf8(&output[pos + mark.len()..])
            .ok()
            .and_then(|s| s.lines().next())
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(no_status)?;
        Ok(L1Output {
            status,
            output: output[..pos].to_vec(),
            console: console_text,
            wall,
        })
    }
}

/// When L1 last wrote anything, from the total length of what it has written.
struct Liveness {
    written: u64,
    since: Instant,
}

impl Liveness {
    fn new(now: Instant) -> Liveness {
        Liveness {
            written: 0,
            since: now,
        }
    }

    /// How long L1 has been quiet, once that is `limit` or more; `written` is the total
    /// length of its serial files at `now`.
    fn silent(&mut self, written: u64, now: Instant, limit: Duration) -> Option<Duration> {
        if written != self.written {
            self.written = written;
            self.since = now;
            return None;
        }
        let quiet = now.saturating_duration_since(self.since);
        (quiet >= limit).then_some(quiet)
    }
}

/// A soft lockup of `STALL_SECS` or more on L1's console: the kernel's watchdog line,
/// e.g. `watchdog: BUG: soft lockup - CPU#1 stuck for 130s! [cocoon-vmm:479]`.
fn l1_stall(console: &str) -> Option<String> {
    const STALL_SECS: u64 = 60;
    console.lines().find_map(|l| {
        let (_, rest) = l.split_once("soft lockup - ")?;
        let secs: u64 = rest
            .split_once("stuck for ")?
            .1
            .split_once('s')?
            .0
            .parse()
            .ok()?;
        (secs >= STALL_SECS).then(|| rest.trim().to_owned())
    })
}

/// The reason L1's kernel gave for panicking, if its console shows a panic.
fn l1_panic(console: &str) -> Option<String> {
    console.lines().find_map(|l| {
        l.split_once("Kernel panic - not syncing: ")
            .map(|(_, why)| why.trim().to_owned())
    })
}

/// The command script: the caller's environment and directory, then the script.
fn wrap(script: &str, cwd: &Path, env: &[(String, String)]) -> String {
    let mut s = String::from("# Written by the cocoon-nested harness.\n");
    for (k, v) in env {
        s.push_str(&format!("export {k}={}\n", quote(v)));
    }
    s.push_str(&format!(
        "cd {} || exit 125\n",
        quote(&cwd.to_string_lossy())
    ));
    s.push_str(script);
    s.push('\n');
    s
}

/// Single-quotes a word for `sh`.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `name` on PATH, or else in `/usr/libexec`, where distributions' virtiofsd packages put
/// it (as the shim's own lookup does).
fn which(name: &str, hint: &'static str) -> Result<PathBuf, NestedError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/libexec")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(NestedError::Missing {
            what: format!("`{name}`"),
            hint,
        })
}

fn file(path: &Path) -> Result<std::fs::File, NestedError> {
    std::fs::File::create(path).map_err(NestedError::io(format!("create {}", path.display())))
}

fn wait_for(sock: &Path, limit: Duration) -> Result<(), NestedError> {
    let end = Instant::now() + limit;
    while !sock.exists() {
        if Instant::now() >= end {
            return Err(NestedError::Io {
                what: format!("wait for virtiofsd's socket {}", sock.display()),
                source: std::io::ErrorKind::TimedOut.into(),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn read_lossy(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

/// QEMU's own messages, without TCG's warnings about EPYC features it does not emulate.
fn qemu_stderr(path: &Path) -> String {
    let text = read_lossy(path);
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains("TCG doesn't support requested feature"))
        .collect();
    if kept.is_empty() {
        return String::new();
    }
    format!("\nQEMU: {}", kept.join("\nQEMU: "))
}

/// Writes `text` to stderr unbuffered, past any test harness's capture.
pub fn say(text: &str) {
    let _ = writeln!(std::io::stderr(), "{text}");
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{l1_panic, l1_stall, Liveness};

    /// Any growth restarts the quiet period; only an unbroken one of the limit counts.
    #[test]
    fn only_an_unbroken_quiet_period_is_silence() {
        let start = Instant::now();
        let limit = Duration::from_secs(120);
        let at = |s| start + Duration::from_secs(s);
        let mut l = Liveness::new(start);
        assert_eq!(l.silent(0, at(119), limit), None);
        assert_eq!(l.silent(10, at(119), limit), None);
        assert_eq!(l.silent(10, at(200), limit), None);
        assert_eq!(l.silent(10, at(239), limit), Some(limit));
        assert_eq!(l.silent(11, at(240), limit), None);
        assert_eq!(l.silent(11, at(300), limit), None);
        assert_eq!(
            l.silent(0, at(301), limit),
            None,
            "a shrunk file is a change too"
        );
    }

    #[test]
    fn a_kernel_panic_on_the_console_is_named() {
        let console = "[   27.5] BUG: TASK stack guard page was hit\n\
                       [   28.5] Kernel panic - not syncing: corrupted stack end detected inside scheduler\n\
                       [   28.5] Kernel Offset: 0x1600000";
        assert_eq!(
            l1_panic(console).as_deref(),
            Some("corrupted stack end detected inside scheduler")
        );
        assert_eq!(l1_panic("[ 1.0] reboot: Power down\n"), None);
    }

    /// A lockup of a minute or more is a stall; a shorter one (TCG is slow) is not.
    #[test]
    fn a_lasting_soft_lockup_is_a_stall() {
        let short = "[  47.1] watchdog: BUG: soft lockup - CPU#1 stuck for 26s! [cocoon-vmm:479]\n";
        assert_eq!(l1_stall(short), None);
        let long = format!(
            "{short}[ 225.0] watchdog: BUG: soft lockup - CPU#1 stuck for 130s! [cocoon-vmm:479]\n"
        );
        assert_eq!(
            l1_stall(&long).as_deref(),
            Some("CPU#1 stuck for 130s! [cocoon-vmm:479]")
        );
        assert_eq!(l1_stall("[ 1.0] reboot: Power down\n"), None);
    }
}
