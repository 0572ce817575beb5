//! Where a process's output goes when containerd names a URI instead of fifos
//! (`ctr run --log-uri`, nerdctl's log drivers), as containerd's runc shim does it
//! (`pkg/process/io.go`):
//! - `file:///path` appends stdout and stderr to the file, made with its directory if
//!   missing, rotated at `[logs] file_max_kib` (runc's grows without bound);
//! - `binary:///program?key=value&flag` runs the program, with the query's keys and
//!   values as its arguments and nothing in its environment but `CONTAINER_ID` and
//!   `CONTAINER_NAMESPACE`. It reads stdout on descriptor 3 and stderr on 4, and closes
//!   descriptor 5 once it is ready; the process starts only then. After the process's
//!   output has ended the program gets SIGTERM, and SIGKILL 12 s later.
//!
//! The URI comes from containerd's client, never from the guest. Stdin stays a fifo.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::process::{Child, Command};

use crate::hypervisor::console::RotatingFile;

/// How long a logging program may take to close its ready descriptor.
const READY_DEADLINE: Duration = Duration::from_secs(30);
/// How long it may take to exit after SIGTERM (containerd's `binaryIOProcTermTimeout`).
pub const TERM_GRACE: Duration = Duration::from_secs(12);

/// What containerd's stdout path asks for (its stderr names the same).
#[derive(Debug, PartialEq, Eq)]
pub enum Sink {
    /// A fifo path (no scheme, or `fifo://`).
    Fifo(String),
    File(PathBuf),
    Binary {
        program: PathBuf,
        args: Vec<String>,
    },
}

/// Percent-decodes a URI's path (a `+` stays one, as in Go's `url.Parse`).
fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// Decodes a query's key or value (a `+` is a space there, as in Go's `url.Query`).
fn decode_query(s: &str) -> String {
    decode(&s.replace('+', " "))
}

/// Reads a stdio path or URI; an unknown scheme, or a URI without an absolute path, is
/// an error naming it.
pub fn parse(uri: &str) -> Result<Sink, String> {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return Ok(Sink::Fifo(uri.to_owned()));
    };
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let path = decode(path);
    if !path.starts_with('/') {
        return Err(format!(
            "stdio URI {uri:?}: the path must be absolute ({scheme}:///path)"
        ));
    }
    match scheme {
        "fifo" => Ok(Sink::Fifo(path)),
        "file" => Ok(Sink::File(path.into())),
        "binary" => {
            let mut args = Vec::new();
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                args.push(decode_query(k));
                if !v.is_empty() {
                    args.push(decode_query(v));
                }
            }
            Ok(Sink::Binary {
                program: path.into(),
                args,
            })
        }
        other => Err(format!(
            "stdio URI {uri:?}: unknown scheme {other:?} (fifo, file and binary are known)"
        )),
    }
}

/// Opens a `file://` log for appending, making its directory first. It is rotated to
/// `<path>.1` (replacing an older one) when it would grow past `limit`: the guest
/// writes it, and runc's unbounded file would let a container fill the host's disk.
pub fn open_file(path: &std::path::Path, limit: u64) -> std::io::Result<RotatingFile> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    RotatingFile::append(path, limit)
}

/// Copies `stream` into a log file that another stream of the same process may be
/// copied into too, until end-of-file; returns the bytes written. Each chunk is written
/// off the async runtime. A write that fails (a full disk) is logged once and the rest
/// is read and dropped: ending the copy would end the container's output with EPIPE.
pub async fn copy_to_file(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    log: Arc<Mutex<RotatingFile>>,
) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut written = 0;
    let mut failed = false;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(written);
        }
        if failed {
            continue;
        }
        let log = log.clone();
        let wrote = tokio::task::spawn_blocking(move || {
            let mut f = log.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let r = f.write(&buf[..n]);
            (buf, r)
        })
        .await;
        match wrote {
            Ok((b, Ok(()))) => {
                buf = b;
                written += n as u64;
            }
            Ok((b, Err(e))) => {
                buf = b;
                tracing::warn!("the log file failed ({e}); the rest of this output is dropped");
                failed = true;
            }
            Err(e) => {
                buf = vec![0u8; 64 * 1024];
                tracing::warn!("the log write did not finish ({e}); the rest is dropped");
                failed = true;
            }
        }
    }
}

/// A started logging program and the write ends of its stdout and stderr pipes.
pub struct Logger {
    pub child: Child,
    pub stdout: pipe::Sender,
    pub stderr: pipe::Sender,
}

/// Starts `program` as containerd does, and waits until it is ready.
pub async fn start(
    program: &std::path::Path,
    args: &[String],
    container_id: &str,
    namespace: &str,
) -> std::io::Result<Logger> {
    let named = |e: std::io::Error| {
        std::io::Error::new(
            e.kind(),
            format!("logging program {}: {e}", program.display()),
        )
    };
    // Close-on-exec here; the copies made for the program are not.
    let (out_w, out_r) = pipe::pipe()?;
    let (err_w, err_r) = pipe::pipe()?;
    let (ready_w, mut ready) = pipe::pipe()?;
    let fds: [OwnedFd; 3] = [
        out_r.into_blocking_fd()?,
        err_r.into_blocking_fd()?,
        ready_w.into_blocking_fd()?,
    ];
    let raw: [RawFd; 3] = [fds[0].as_raw_fd(), fds[1].as_raw_fd(), fds[2].as_raw_fd()];
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("CONTAINER_ID", container_id)
        .env("CONTAINER_NAMESPACE", namespace)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    // SAFETY: between fork and exec only dup2, an async-signal-safe call, on
    // descriptors this process holds until the spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            // Up to 5 first, from where none of 3..=5 can be overwritten before it is
            // copied: each source is above 5 or already in place.
            for (i, fd) in raw.iter().enumerate() {
                let to = 3 + i as RawFd;
                if *fd == to {
                    // dup2 onto itself keeps close-on-exec: clear it.
                    let flags = libc::fcntl(to, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(to, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(*fd, to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    if raw.iter().any(|&fd| fd <= 5) {
        // A descriptor this low means the shim's own 0-2 were closed; the copies above
        // could then clobber one another.
        return Err(named(std::io::Error::other(
            "the shim's pipe descriptors are too low to pass on",
        )));
    }
    let mut child = cmd.spawn().map_err(named)?;
    drop(fds);
    let mut b = [0u8; 1];
    match tokio::time::timeout(READY_DEADLINE, ready.read(&mut b)).await {
        // A byte, or end-of-file: ready.
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            let _ = child.start_kill();
            return Err(named(e));
        }
        Err(_) => {
            let _ = child.start_kill();
            return Err(named(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("did not close its ready descriptor (5) within {READY_DEADLINE:?}"),
            )));
        }
    }
    Ok(Logger {
        child,
        stdout: out_w,
        stderr: err_w,
    })
}

/// Ends a logging program whose input has ended: SIGTERM, then SIGKILL after `grace`.
pub async fn stop(mut child: Child, grace: Duration) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        tracing::warn!("the logging program outlived SIGTERM by {grace:?}; killing it");
        let _ = child.kill().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_are_read_as_containerd_reads_them() {
        assert_eq!(
            parse("/run/x/stdout"),
            Ok(Sink::Fifo("/run/x/stdout".into()))
        );
        assert_eq!(parse("fifo:///run/x"), Ok(Sink::Fifo("/run/x".into())));
        assert_eq!(
            parse("file:///var/log/a%20b+c.log"),
            Ok(Sink::File("/var/log/a b+c.log".into()))
        );
        assert_eq!(
            parse("binary:///usr/bin/logger?_NERDCTL_INTERNAL_LOGGING=%2Fvar%2Flib&-v&k=a+b"),
            Ok(Sink::Binary {
                program: "/usr/bin/logger".into(),
                args: vec![
                    "_NERDCTL_INTERNAL_LOGGING".into(),
                    "/var/lib".into(),
                    "-v".into(),
                    "k".into(),
                    "a b".into()
                ],
            })
        );
    }

    #[test]
    fn bad_uris_are_named() {
        assert!(parse("syslog:///x").unwrap_err().contains("unknown scheme"));
        assert!(parse("file://relative/x").unwrap_err().contains("absolute"));
    }

    /// Both streams of one process go into one `file://` log through one handle: it
    /// keeps what was there, rotates when full, and holds the newest bytes, in order,
    /// never more than the limit in either file.
    #[tokio::test]
    async fn a_log_file_is_shared_by_both_streams_and_rotated_at_its_limit() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/c.log");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "earlier run\n").unwrap();
        let log = Arc::new(Mutex::new(open_file(&path, 4096).unwrap()));
        let mut written = String::from("earlier run\n");
        for tag in ["out", "err"] {
            let (mut w, mut r) = tokio::io::duplex(1024);
            let shared = log.clone();
            let copy = tokio::spawn(async move { copy_to_file(&mut r, shared).await });
            let lines: String = (0..600).map(|i| format!("{tag}-{i:04}\n")).collect();
            w.write_all(lines.as_bytes()).await.unwrap();
            drop(w);
            assert_eq!(copy.await.unwrap().unwrap(), lines.len() as u64);
            written += &lines;
        }
        let new = std::fs::read_to_string(&path).unwrap();
        let old = std::fs::read_to_string(dir.path().join("logs/c.log.1")).unwrap();
        assert_eq!(old.len(), 4096, "rotated only when full");
        assert_eq!(new.len(), written.len() % 4096);
        assert!(
            written.ends_with(&(old + &new)),
            "the newest bytes, in order"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640);
    }

    /// A log that cannot be written (`/dev/full`: no space) does not end the copy: the
    /// output is read to its end and dropped, so the process never sees EPIPE.
    #[tokio::test]
    async fn a_failing_log_is_drained_not_abandoned() {
        use tokio::io::AsyncWriteExt;
        let log = Arc::new(Mutex::new(open_file("/dev/full".as_ref(), 4096).unwrap()));
        let (mut w, mut r) = tokio::io::duplex(1024);
        let copy = tokio::spawn(async move { copy_to_file(&mut r, log).await });
        let all = vec![b'x'; 256 * 1024];
        tokio::time::timeout(Duration::from_secs(30), w.write_all(&all))
            .await
            .expect("the writer was left blocked")
            .unwrap();
        drop(w);
        assert_eq!(copy.await.unwrap().unwrap(), 0, "nothing was written");
    }

    /// A link where the log file should be is refused, not followed.
    #[test]
    fn a_link_in_place_of_the_log_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, "keep").unwrap();
        let link = dir.path().join("c.log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(open_file(&link, 4096).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    }

    /// A program that copies fd 3 and fd 4 into files, closes 5 once ready, and is
    /// ended by SIGTERM after its input ends: what it got, and what it was told.
    #[tokio::test]
    async fn a_logging_program_gets_the_streams_the_args_and_the_env() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        let script = dir.path().join("logger");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\ntrap 'exit 0' TERM\necho \"$@\" > {d}/args; env | sort > {d}/env\n\
                 exec 5>&-\ncat <&3 > {d}/out & cat <&4 > {d}/err &\nwait\n\
                 while :; do sleep 0.05; done\n"
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut l = start(&script, &["--tag".into(), "x y".into()], "c1", "ns1")
            .await
            .unwrap();
        l.stdout.write_all(b"to stdout\n").await.unwrap();
        l.stderr.write_all(b"to stderr\n").await.unwrap();
        drop((l.stdout, l.stderr));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap_or_default();
        while read("err").is_empty() || read("out").is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the streams never arrived"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop(l.child, TERM_GRACE).await;
        assert_eq!(read("out"), "to stdout\n");
        assert_eq!(read("err"), "to stderr\n");
        assert_eq!(read("args"), "--tag x y\n");
        let env = read("env");
        assert!(
            env.contains("CONTAINER_ID=c1\n") && env.contains("CONTAINER_NAMESPACE=ns1\n"),
            "{env}"
        );
        assert!(
            !env.contains("HOME="),
            "nothing of the shim's environment: {env}"
        );
    }
}
