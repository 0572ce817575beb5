//! One OCI hook run as runc runs it, for both ends: the shim runs the hooks whose path
//! is the host's (`prestart`, `createRuntime`, `createContainer`, `poststart`,
//! `poststop`), the agent the `startContainer` ones, whose path is the container's.
//!
//! As under runc: the program gets the hook's `args` as its argv (its path when there
//! are none) and only the hook's `env`; the container's state arrives as JSON on its
//! stdin; a non-zero exit fails the hook with its output in the error; `timeout`
//! (seconds) ends it with SIGKILL. Its output is kept to [`OUTPUT_KEPT`] bytes each, and
//! a hook that leaves a child holding its output open is not waited for beyond its own
//! exit.

use std::fmt;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Bytes of a hook's stdout and of its stderr kept for an error.
pub const OUTPUT_KEPT: usize = 4096;

/// One hook, as the OCI spec gives it.
#[derive(Debug, Clone, Copy)]
pub struct Hook<'a> {
    pub path: &'a Path,
    pub args: &'a [String],
    pub env: &'a [String],
    pub timeout: Option<Duration>,
}

#[derive(Debug)]
pub enum HookError {
    Spawn(std::io::Error),
    Wait(std::io::Error),
    TimedOut(Duration),
    Failed {
        status: ExitStatus,
        stdout: String,
        stderr: String,
    },
}

impl fmt::Display for HookError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HookError::Spawn(e) => write!(f, "cannot start it: {e}"),
            HookError::Wait(e) => write!(f, "cannot wait for it: {e}"),
            HookError::TimedOut(t) => write!(f, "timed out after {}s", t.as_secs()),
            HookError::Failed {
                status,
                stdout,
                stderr,
            } => write!(f, "{status}, stdout: {stdout}, stderr: {stderr}"),
        }
    }
}

impl std::error::Error for HookError {}

/// Runs the spec's `hook` in `cwd` with `state` on its stdin (`run`).
pub fn run_oci(hook: &oci_spec::runtime::Hook, state: &[u8], cwd: &Path) -> Result<(), HookError> {
    let args = hook.args().clone().unwrap_or_default();
    let env = hook.env().clone().unwrap_or_default();
    let h = Hook {
        path: hook.path(),
        args: &args,
        env: &env,
        timeout: hook
            .timeout()
            .map(|t| Duration::from_secs(t.unsigned_abs())),
    };
    run(&h, state, cwd)
}

/// Runs `hook` in `cwd` with `state` (the container's state, JSON) on its stdin.
pub fn run(hook: &Hook, state: &[u8], cwd: &Path) -> Result<(), HookError> {
    let mut cmd = Command::new(hook.path);
    match hook.args.split_first() {
        Some((argv0, rest)) => {
            cmd.arg0(argv0).args(rest);
        }
        None => {
            cmd.arg0(hook.path);
        }
    }
    cmd.env_clear();
    for (k, v) in hook.env.iter().filter_map(|e| e.split_once('=')) {
        cmd.env(k, v);
    }
    cmd.current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(HookError::Spawn)?;
    let stdout = keep_output(child.stdout.take());
    let stderr = keep_output(child.stderr.take());
    if let Some(mut stdin) = child.stdin.take() {
        // A hook need not read its state: a closed pipe is no error.
        let _ = stdin.write_all(state);
    }
    let status = wait(&mut child, hook.timeout)?;
    if status.success() {
        return Ok(());
    }
    // Its output is whole once it exited, unless a child of its own still holds it.
    let collect = |rx: mpsc::Receiver<String>| {
        rx.recv_timeout(Duration::from_millis(200))
            .unwrap_or_default()
    };
    Err(HookError::Failed {
        status,
        stdout: collect(stdout),
        stderr: collect(stderr),
    })
}

/// Waits for `child`, killing it once `timeout` has passed.
fn wait(child: &mut Child, timeout: Option<Duration>) -> Result<ExitStatus, HookError> {
    let Some(timeout) = timeout else {
        return child.wait().map_err(HookError::Wait);
    };
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait().map_err(HookError::Wait)? {
            return Ok(status);
        }
        let now = Instant::now();
        if now >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(HookError::TimedOut(timeout));
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Reads `pipe` to its end on a thread of its own, keeping the first `OUTPUT_KEPT`
/// bytes.
fn keep_output(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let room = OUTPUT_KEPT.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
            let _ = tx.send(String::from_utf8_lossy(&kept).trim_end().to_string());
        });
    }
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, env: &[&str], timeout: Option<u64>) -> Result<(), HookError> {
        let args: Vec<String> = ["sh", "-c", script].iter().map(|s| s.to_string()).collect();
        let env: Vec<String> = env.iter().map(|s| s.to_string()).collect();
        let hook = Hook {
            path: Path::new("/bin/sh"),
            args: &args,
            env: &env,
            timeout: timeout.map(Duration::from_secs),
        };
        run(&hook, br#"{"id":"c1"}"#, Path::new("/"))
    }

    #[test]
    fn the_state_is_on_stdin_and_only_the_hooks_env_is_set() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = format!("cat > {0}; echo \"$A|$HOME|$0\" >> {0}", out.display());
        sh(&script, &["A=1", "NOEQUALS"], None).unwrap();
        let got = std::fs::read_to_string(&out).unwrap();
        assert_eq!(got, "{\"id\":\"c1\"}1||sh\n");
    }

    #[test]
    fn a_failure_carries_its_status_and_output() {
        let e = sh("echo out; echo err >&2; exit 3", &[], None).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("exit status: 3"), "{text}");
        assert!(text.contains("stdout: out"), "{text}");
        assert!(text.contains("stderr: err"), "{text}");
    }

    #[test]
    fn a_hook_past_its_timeout_is_killed() {
        let started = Instant::now();
        let e = sh("exec sleep 30", &[], Some(1)).unwrap_err();
        assert!(matches!(e, HookError::TimedOut(_)), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_missing_program_is_named() {
        let hook = Hook {
            path: Path::new("/nonexistent/hook"),
            args: &[],
            env: &[],
            timeout: None,
        };
        let e = run(&hook, b"{}", Path::new("/")).unwrap_err();
        assert!(matches!(e, HookError::Spawn(_)), "{e}");
    }
}
