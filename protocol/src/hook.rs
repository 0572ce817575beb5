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
    /// Its whole environment; `None` (the spec names none): the caller's, as runc's
    /// hooks get runc's.
    pub env: Option<&'a [String]>,
    pub timeout: Option<Duration>,
}

#[derive(Debug)]
pub enum HookError {
    Spawn(std::io::Error),
    Thread(std::io::Error),
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
            HookError::Thread(e) => write!(f, "cannot start a thread for its pipes: {e}"),
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

/// Runs the spec's `hook` in `cwd` with `state` on its stdin (`run`); a hook that
/// names no environment gets `env_otherwise` (`None`: the caller's own).
pub fn run_oci(
    hook: &oci_spec::runtime::Hook,
    state: &[u8],
    cwd: &Path,
    env_otherwise: Option<&[String]>,
) -> Result<(), HookError> {
    let args = hook.args().clone().unwrap_or_default();
    let h = Hook {
        path: hook.path(),
        args: &args,
        env: hook.env().as_deref().or(env_otherwise),
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
    if let Some(env) = hook.env {
        cmd.env_clear();
        for (k, v) in env.iter().filter_map(|e| e.split_once('=')) {
            cmd.env(k, v);
        }
    }
    cmd.current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(HookError::Spawn)?;
    let fed = feed_and_wait(&mut child, state, hook.timeout);
    if fed.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let (status, stdout, stderr) = fed?;
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

type Outputs = (ExitStatus, mpsc::Receiver<String>, mpsc::Receiver<String>);

/// Writes `state` to the child's stdin and reads its output on threads of their own
/// (so a hook that reads nothing cannot outlast its timeout), then waits for it.
fn feed_and_wait(
    child: &mut Child,
    state: &[u8],
    timeout: Option<Duration>,
) -> Result<Outputs, HookError> {
    let stdout = keep_output(child.stdout.take())?;
    let stderr = keep_output(child.stderr.take())?;
    if let Some(mut stdin) = child.stdin.take() {
        let state = state.to_vec();
        // A hook need not read its state: a closed pipe is no error (a caller whose
        // SIGPIPE is not ignored ignores it meanwhile).
        std::thread::Builder::new()
            .spawn(move || drop(stdin.write_all(&state)))
            .map_err(HookError::Thread)?;
    }
    Ok((wait(child, timeout)?, stdout, stderr))
}

/// Waits for `child` until `timeout` has passed (the caller kills it then).
fn wait(child: &mut Child, timeout: Option<Duration>) -> Result<ExitStatus, HookError> {
    // A timeout too large for the clock is none.
    let Some((timeout, deadline)) = timeout.and_then(|t| Some((t, Instant::now().checked_add(t)?)))
    else {
        return child.wait().map_err(HookError::Wait);
    };
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait().map_err(HookError::Wait)? {
            return Ok(status);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(HookError::TimedOut(timeout));
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Reads `pipe` to its end on a thread of its own, keeping the first `OUTPUT_KEPT`
/// bytes.
fn keep_output(
    pipe: Option<impl Read + Send + 'static>,
) -> Result<mpsc::Receiver<String>, HookError> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        let reader = move || {
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
        };
        std::thread::Builder::new()
            .spawn(reader)
            .map_err(HookError::Thread)?;
    }
    Ok(rx)
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
            env: Some(&env),
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
    fn a_hook_that_reads_nothing_and_runs_on_is_still_timed() {
        // More state than a pipe holds, never read.
        let args: Vec<String> = vec!["sleep".into(), "30".into()];
        let hook = Hook {
            path: Path::new("/bin/sleep"),
            args: &args,
            env: None,
            timeout: Some(Duration::from_secs(1)),
        };
        let started = Instant::now();
        let e = run(&hook, &vec![b' '; 1 << 20], Path::new("/")).unwrap_err();
        assert!(matches!(e, HookError::TimedOut(_)), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10));
        // A timeout beyond the clock's range waits as none would.
        let quick = Hook {
            path: Path::new("/bin/true"),
            timeout: Some(Duration::MAX),
            ..hook
        };
        run(&quick, b"{}", Path::new("/")).unwrap();
    }

    #[test]
    fn without_an_env_of_its_own_a_hook_gets_the_callers() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = format!("echo \"$PATH\" > {}", out.display());
        let args: Vec<String> = ["sh", "-c", &script]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let hook = Hook {
            path: Path::new("/bin/sh"),
            args: &args,
            env: None,
            timeout: None,
        };
        run(&hook, b"{}", Path::new("/")).unwrap();
        let path = std::env::var("PATH").unwrap_or_default();
        assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), path);
    }

    #[test]
    fn a_missing_program_is_named() {
        let hook = Hook {
            path: Path::new("/nonexistent/hook"),
            args: &[],
            env: None,
            timeout: None,
        };
        let e = run(&hook, b"{}", Path::new("/")).unwrap_err();
        assert!(matches!(e, HookError::Spawn(_)), "{e}");
    }
}
