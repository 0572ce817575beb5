//! Bounded waits for the end-to-end tests, and what to print when one runs out.
//!
//! A `ctr` call that never returns used to hang its test until the harness killed it
//! (inside L1: 540 s with nothing said about where). Here every such wait has a
//! deadline, and running past it fails the test with a report: the command, what it
//! printed, containerd's log, the VMs' own logs and where each of our processes sleeps.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long one `ctr` call may take before the test fails as stuck. A pod's boot
/// (90 s in the tests) plus a container's run fits well inside it, also in L1.
pub const CTR_DEADLINE: Duration = Duration::from_secs(240);

/// Runs `cmd` (stdin null) to completion, or kills it at `deadline` and panics with
/// `report()` after what it printed so far.
pub fn output_within(
    mut cmd: Command,
    deadline: Duration,
    report: impl FnOnce() -> String,
) -> Output {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let end = Instant::now() + deadline;
    // Neither waiting for the process nor reading its pipes may outlast the deadline
    // (a process stuck in the kernel does not die of SIGKILL; a pipe another process
    // inherited never ends).
    let status = wait_within(&mut child, deadline);
    let grace = Duration::from_secs(5);
    let rest = |end: Instant| end.saturating_duration_since(Instant::now()).max(grace);
    let (stdout, stderr) = (out.recv_timeout(rest(end)), err.recv_timeout(grace));
    match (status, stdout, stderr) {
        (Some(status), Ok(stdout), Ok(stderr)) => Output {
            status,
            stdout,
            stderr,
        },
        (status, stdout, stderr) => {
            let _ = child.kill();
            let dead = wait_within(&mut child, grace).is_some();
            panic!(
                "stuck: {what} {} within {} s{}\nstdout: {:?}\nstderr: {:?}\n{}",
                if status.is_some() {
                    "exited but its output did not end"
                } else {
                    "did not finish"
                },
                deadline.as_secs(),
                if dead {
                    ""
                } else {
                    " (and did not die of SIGKILL)"
                },
                String::from_utf8_lossy(&stdout.unwrap_or_default()),
                String::from_utf8_lossy(&stderr.unwrap_or_default()),
                report()
            )
        }
    }
}

/// Waits for `child` up to `deadline`; None if it is still running then.
pub fn wait_within(child: &mut Child, deadline: Duration) -> Option<std::process::ExitStatus> {
    let end = Instant::now() + deadline;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads `pipe` to its end on a thread; the bytes arrive on the channel.
fn drain(pipe: Option<impl Read + Send + 'static>) -> std::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        let _ = tx.send(buf);
    });
    rx
}

/// Reads from `fd` (a pty master, a pipe) into `acc` until `pred` holds for what was
/// read, failing at `deadline` or at end of input. Each read waits with poll, so a
/// silent peer cannot outlast the deadline.
pub fn read_until(
    fd: &impl std::os::fd::AsFd,
    acc: &mut Vec<u8>,
    deadline: Duration,
    pred: impl Fn(&str) -> bool,
) -> Result<(), String> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let end = Instant::now() + deadline;
    let mut buf = [0u8; 4096];
    while !pred(&String::from_utf8_lossy(acc)) {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "nothing matched within {} s; got {:?}",
                deadline.as_secs(),
                String::from_utf8_lossy(acc)
            ));
        }
        let ms = PollTimeout::from(left.as_millis().min(1000) as u16);
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, ms) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(format!("poll: {e}")),
        }
        match nix::unistd::read(fd.as_fd(), &mut buf) {
            Ok(0) | Err(nix::errno::Errno::EIO) => {
                return Err(format!(
                    "end of input; got {:?}",
                    String::from_utf8_lossy(acc)
                ))
            }
            Ok(n) => acc.extend_from_slice(&buf[..n]),
            Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    Ok(())
}

/// What a stuck test prints: the tail of every VM log below `root` (a test's temp dir)
/// and, for each of our processes, its state and where each thread sleeps. Built on a
/// thread of its own and given 10 s: reading `/proc` of a process stuck in the kernel
/// can block, and the report must not hang the test it explains.
pub fn report(root: &Path) -> String {
    let root = root.to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(report_now(&root));
    });
    rx.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| {
            "(the report itself got stuck reading /proc: some process is stuck in the kernel)"
                .into()
        })
}

fn report_now(root: &Path) -> String {
    let mut out = String::new();
    for log in cocoon_nested::watchdog::logs_below(root, 6, &LOG_NAMES) {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        out.push_str(&format!(
            "--- {} (end):\n{}\n",
            log.display(),
            crate::tail_lines(&text, 40)
        ));
    }
    out.push_str("--- our processes (pid state comm: threads' wait channels):\n");
    for needle in [
        "containerd-shim-cocoon",
        "cocoon-vmm",
        "qemu-system",
        "virtiofsd",
        "ctr ",
    ] {
        for (pid, cmd) in crate::processes_mentioning(needle) {
            out.push_str(&format!("{pid} {}: {}\n", short(&cmd), threads(pid)));
        }
    }
    out
}

/// The kernel's last lines about killed processes (the OOM killer, seccomp, a
/// hung task), for a test that saw a process die with no reason of its own.
pub fn kernel_kills() -> String {
    let out = Command::new("dmesg").stdin(Stdio::null()).output();
    let text = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(o) => return format!("(dmesg failed: {})", String::from_utf8_lossy(&o.stderr)),
        Err(e) => return format!("(dmesg: {e})"),
    };
    let hits: Vec<&str> = text
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            [
                "oom-kill:",
                "killed process",
                "type=1326",
                "blocked for more than",
                "segfault",
            ]
            .iter()
            .any(|k| l.contains(k))
        })
        .collect();
    let from = hits.len().saturating_sub(15);
    format!(
        "--- kernel log (kills, last {}):\n{}",
        hits.len() - from,
        hits[from..].join("\n")
    )
}

fn short(cmd: &str) -> &str {
    let end = cmd.char_indices().nth(160).map_or(cmd.len(), |(i, _)| i);
    &cmd[..end]
}

/// Each thread's name and wait channel, e.g. `vcpu0:kvm_vcpu_block`.
fn threads(pid: u32) -> String {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return "gone".into();
    };
    let mut seen: Vec<String> = rd
        .flatten()
        .map(|t| {
            let p = t.path();
            let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
            let wchan = std::fs::read_to_string(p.join("wchan")).unwrap_or_default();
            format!("{}:{}", comm.trim(), wchan.trim())
        })
        .collect();
    seen.sort();
    seen.join(" ")
}

const LOG_NAMES: [&str; 4] = [
    "console.log",
    "vmm.log",
    "vsock-backend.log",
    "virtiofsd.log",
];
