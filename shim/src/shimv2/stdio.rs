//! A process's stdio: containerd's fifos on the host, vsock streams to the
//! agent (port `STDIO_PORT`, one header line, then raw bytes). Copies are
//! plain `tokio::io::copy` loops, so a slow reader slows the writer down
//! (back-pressure) and nothing is buffered without bound. The exit of a
//! process is reported only after its output has fully reached the fifos.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cocoon_protocol::STDIO_PORT;
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::logsink::{self, Sink};
use crate::hypervisor::console::RotatingFile;
use crate::vsock;

/// How long one stdio stream may take to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum StdioError {
    #[error("cannot open the {kind} fifo {path}")]
    Fifo {
        kind: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the {kind} stream to the guest")]
    Stream {
        kind: &'static str,
        #[source]
        source: vsock::VsockError,
    },
    #[error("{0}")]
    Uri(String),
    #[error("cannot open the output file {path}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the logging program")]
    Logger(#[source] std::io::Error),
    #[error("cannot send the {kind} stream header")]
    Header {
        kind: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// containerd's view of a process's stdio.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl StdioPaths {
    pub fn streams(&self) -> cocoon_protocol::agent::StdioStreams {
        let mut s = cocoon_protocol::agent::StdioStreams::new();
        s.terminal = self.terminal;
        s.stdin = !self.stdin.is_empty();
        s.stdout = !self.stdout.is_empty();
        // With a terminal, stderr goes to the pty too.
        s.stderr = !self.stderr.is_empty() && !self.terminal;
        s.stream_port = STDIO_PORT;
        s
    }
}

/// The running copies for one process.
#[derive(Debug)]
pub struct StdioCopies {
    output: Vec<JoinHandle<()>>,
    close_stdin: Option<oneshot::Sender<()>>,
    /// The `binary://` logging program, ended once the output has reached it.
    logger: Option<tokio::process::Child>,
}

impl StdioCopies {
    /// Waits for stdout and stderr to be fully copied (the agent closes its
    /// end after the process's pipes reach EOF), up to `grace`.
    pub async fn drained(&mut self, grace: Duration) {
        for h in self.output.drain(..) {
            let abort = h.abort_handle();
            if tokio::time::timeout(grace, h).await.is_err() {
                tracing::warn!("output still flowing {grace:?} after exit; stopping the copy");
                abort.abort();
            }
        }
        // The program has had all the output; its end must not hold up the exit.
        if let Some(child) = self.logger.take() {
            tokio::spawn(super::logsink::stop(child, super::logsink::TERM_GRACE));
        }
    }

    /// Closes the process's stdin (containerd's CloseIO).
    pub fn close_stdin(&mut self) {
        if let Some(tx) = self.close_stdin.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for StdioCopies {
    fn drop(&mut self) {
        for h in &self.output {
            h.abort();
        }
    }
}

/// How long the client may take to read what is left in an output fifo once the
/// process's output ended, before its exit is reported anyway (`read_out`).
const READ_OUT_GRACE: Duration = Duration::from_secs(2);

/// Waits until the client has read everything written to the output fifo `fifo`, up to
/// `grace`. containerd 1.6's client closes its ends of a task's fifos *before* it waits
/// for its copies, as soon as it deletes the task after its exit (`task.Delete`:
/// `io.Close()`, then `io.Wait()`), so output still in a fifo when the exit is reported
/// is lost (`ctr run` printed nothing for a container that had printed one line). So the
/// exit waits until the fifo is empty: bytes the client has not read show in `FIONREAD`.
async fn read_out(fifo: &pipe::Sender, grace: Duration) {
    use std::os::fd::AsRawFd;
    let unread = || {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int to `n`; the fd is the open fifo we hold.
        let r = unsafe { libc::ioctl(fifo.as_raw_fd(), libc::FIONREAD, &mut n) };
        if r < 0 {
            0
        } else {
            n
        }
    };
    let deadline = tokio::time::Instant::now() + grace;
    while unread() > 0 {
        if tokio::time::Instant::now() >= deadline {
            tracing::debug!(
                "the client left {} bytes unread in an output fifo",
                unread()
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// How long containerd may take to open the reading end of an output fifo.
const FIFO_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

fn header(kind: &str, container_id: &str, exec_id: &str) -> String {
    if exec_id.is_empty() {
        format!("{kind} {container_id}\n")
    } else {
        format!("{kind} {container_id} {exec_id}\n")
    }
}

async fn open_stream(
    uds: &Path,
    kind: &'static str,
    container_id: &str,
    exec_id: &str,
) -> Result<tokio::net::UnixStream, StdioError> {
    let mut s = vsock::connect(uds, STDIO_PORT, CONNECT_TIMEOUT)
        .await
        .map_err(|source| StdioError::Stream { kind, source })?;
    s.write_all(header(kind, container_id, exec_id).as_bytes())
        .await
        .map_err(|source| StdioError::Header { kind, source })?;
    Ok(s)
}

/// Opens a fifo once containerd has the other end open (opening without a peer
/// would read EOF at once, or fail for a writer), then hands it to the reactor.
///
/// An output fifo is opened without blocking, again every 20 ms until `FIFO_DEADLINE`:
/// containerd opens its end before it calls Start, so this is normally at once, and a
/// fifo nobody reads fails the call instead of holding a thread for good. An input
/// fifo is opened blocking, on a task of its own that nothing waits on.
async fn open_fifo(
    path: &str,
    write: bool,
    kind: &'static str,
) -> Result<std::fs::File, StdioError> {
    let p = PathBuf::from(path);
    let err = |source| StdioError::Fifo {
        kind,
        path: p.clone(),
        source,
    };
    if write {
        use std::os::unix::fs::OpenOptionsExt;
        let deadline = tokio::time::Instant::now() + FIFO_DEADLINE;
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&p)
            {
                Ok(f) => return Ok(f),
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!(
                                "nobody opened it for reading within {FIFO_DEADLINE:?} ({})",
                                super::fifo_holders::describe(&p)
                            ),
                        )));
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => return Err(err(e)),
            }
        }
    }
    let path2 = p.clone();
    tokio::task::spawn_blocking(move || {
        std::fs::OpenOptions::new()
            .read(!write)
            .write(write)
            .open(path2)
    })
    .await
    .map_err(|e| err(std::io::Error::other(e)))?
    .map_err(err)
}

/// Opens the stdin fifo for reading (once the client has its end open) and a writer of
/// our own on it, as runc's shim does: a fifo reads EOF whenever no writer has it open,
/// and a client's library may open and close its end more than once (containerd's fifo
/// package does, around a non-blocking open), so without a writer of ours the process
/// could see EOF before any input. With it, stdin ends only at CloseIO, as under runc.
async fn open_stdin(path: &str) -> Result<(pipe::Receiver, std::fs::File), Option<StdioError>> {
    let fifo = open_fifo(path, false, "stdin").await.map_err(Some)?;
    let err = |source| {
        Some(StdioError::Fifo {
            kind: "stdin",
            path: path.into(),
            source,
        })
    };
    // We have it open for reading, so a non-blocking write open cannot fail for want
    // of a reader.
    use std::os::unix::fs::OpenOptionsExt;
    let keeper = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(err)?;
    let fifo = pipe::Receiver::from_file(fifo).map_err(err)?;
    Ok((fifo, keeper))
}

/// Copies stdin into the guest until EOF, which comes once CloseIO has dropped our
/// writer (`keeper`) and the client has closed its own.
async fn copy_stdin(
    mut fifo: pipe::Receiver,
    keeper: std::fs::File,
    w: &mut tokio::net::unix::OwnedWriteHalf,
    mut close_io: oneshot::Receiver<()>,
) {
    let mut keeper = Some(keeper);
    let copy = tokio::io::copy(&mut fifo, w);
    tokio::pin!(copy);
    loop {
        tokio::select! {
            r = &mut copy => {
                if let Err(e) = r {
                    tracing::debug!("stdin copy ended: {e}");
                }
                return;
            }
            _ = &mut close_io, if keeper.is_some() => keeper = None,
        }
    }
}

/// Where one output stream is copied to.
enum Out {
    /// containerd's fifo: the client's unread bytes are waited for at the end.
    Fifo(pipe::Sender),
    /// A `binary://` logging program's pipe.
    Pipe(pipe::Sender),
    /// A `file://` path, appended to by both streams, bounded.
    File(Arc<Mutex<RotatingFile>>),
}

/// A fifo's path from containerd's stdio path (plain or `fifo://`).
fn fifo_path(path: &str) -> Result<String, String> {
    match logsink::parse(path)? {
        Sink::Fifo(p) => Ok(p),
        _ => Err(format!(
            "stdio {path:?}: a URI where stdout names a fifo (both must name the same kind)"
        )),
    }
}

/// Connects the process's streams and starts copying. Call before the
/// process starts, so no early output is waiting on the guest side.
pub async fn attach(
    uds: &Path,
    namespace: &str,
    container_id: &str,
    exec_id: &str,
    paths: &StdioPaths,
    file_limit: u64,
) -> Result<StdioCopies, StdioError> {
    let mut copies = StdioCopies {
        output: Vec::new(),
        close_stdin: None,
        logger: None,
    };
    let wanted = paths.streams();
    // containerd's stdout names where both streams go (`logsink`).
    let sink = if paths.stdout.is_empty() {
        Sink::Fifo(String::new())
    } else {
        logsink::parse(&paths.stdout).map_err(StdioError::Uri)?
    };
    let mut logger_pipes = None;
    // One handle for both streams, so the size that rotation counts is the file's.
    let mut log_file = None;
    if let Sink::Binary { program, args } = &sink {
        let l = logsink::start(program, args, container_id, namespace)
            .await
            .map_err(StdioError::Logger)?;
        copies.logger = Some(l.child);
        logger_pipes = Some((l.stdout, l.stderr));
    }
    let (mut log_out, mut log_err) = match logger_pipes {
        Some((o, e)) => (Some(o), Some(e)),
        None => (None, None),
    };
    for (kind, path, on) in [
        ("stdout", &paths.stdout, wanted.stdout),
        ("stderr", &paths.stderr, wanted.stderr),
    ] {
        // A stream that is not copied (stderr with a terminal) drops its end of the
        // logger's pipe here, so that the program reads end-of-file there.
        let to_logger = match kind {
            "stdout" => log_out.take(),
            _ => log_err.take(),
        };
        if !on {
            continue;
        }
        let mut stream = open_stream(uds, kind, container_id, exec_id).await?;
        let out = match (&sink, to_logger) {
            (_, Some(p)) => Out::Pipe(p),
            (Sink::File(file), _) => {
                let shared = match &log_file {
                    Some(f) => Arc::clone(f),
                    None => {
                        let f = logsink::open_file(file, file_limit).map_err(|source| {
                            StdioError::File {
                                path: file.clone(),
                                source,
                            }
                        })?;
                        let f = Arc::new(Mutex::new(f));
                        log_file = Some(Arc::clone(&f));
                        f
                    }
                };
                Out::File(shared)
            }
            _ => {
                let fifo = fifo_path(path).map_err(StdioError::Uri)?;
                let f = open_fifo(&fifo, true, kind).await?;
                Out::Fifo(
                    pipe::Sender::from_file(f).map_err(|source| StdioError::Fifo {
                        kind,
                        path: fifo.into(),
                        source,
                    })?,
                )
            }
        };
        copies.output.push(tokio::spawn(async move {
            let copied = match out {
                Out::Fifo(mut fifo) => {
                    let r = tokio::io::copy(&mut stream, &mut fifo).await;
                    read_out(&fifo, READ_OUT_GRACE).await;
                    r
                }
                Out::Pipe(mut p) => tokio::io::copy(&mut stream, &mut p).await,
                Out::File(f) => logsink::copy_to_file(&mut stream, f).await,
            };
            if let Err(e) = copied {
                tracing::debug!("{kind} copy ended: {e}");
            }
        }));
    }
    if wanted.stdin {
        let stream = open_stream(uds, "stdin", container_id, exec_id).await?;
        let path = paths.stdin.clone();
        let (tx, rx) = oneshot::channel();
        copies.close_stdin = Some(tx);
        tokio::spawn(async move {
            let (_, mut w) = stream.into_split();
            let mut rx = rx;
            let opened = tokio::select! {
                r = open_stdin(&path) => r,
                // CloseIO before the client ever opened its end: nothing to copy.
                _ = &mut rx => Err(None),
            };
            match opened {
                Ok((fifo, keeper)) => copy_stdin(fifo, keeper, &mut w, rx).await,
                Err(Some(e)) => tracing::warn!("stdin: {e}"),
                Err(None) => {}
            }
            // EOF for the process: the agent closes its stdin.
            let _ = w.shutdown().await;
        });
    }
    Ok(copies)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that opens and closes its end before it writes (as containerd's fifo
    /// package may) does not end the process's stdin: it ends at CloseIO, once the
    /// client's writer is gone too, with every byte through.
    #[tokio::test]
    async fn stdin_ends_at_close_io_not_at_a_writer_gap() {
        use std::io::Write;
        use tokio::io::AsyncReadExt;
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("stdin");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let p = path.to_str().unwrap().to_owned();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let client = {
            let path = path.clone();
            std::thread::spawn(move || {
                // A first writer that goes away at once: the gap.
                drop(std::fs::OpenOptions::new().write(true).open(&path).unwrap());
                go_rx.recv().unwrap();
                let mut w = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                w.write_all(b"first line\n").unwrap();
                w
            })
        };
        let (fifo, keeper) = open_stdin(&p).await.unwrap();
        let (guest, host) = tokio::net::UnixStream::pair().unwrap();
        let (_, mut w) = host.into_split();
        let (close_tx, close_rx) = oneshot::channel();
        let copy = tokio::spawn(async move { copy_stdin(fifo, keeper, &mut w, close_rx).await });
        // Past the gap: still open.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!copy.is_finished(), "stdin ended at a writer gap");
        go_tx.send(()).unwrap();
        let writer = client.join().unwrap();
        let mut guest = guest;
        let mut got = vec![0u8; 11];
        guest.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"first line\n");
        close_tx.send(()).unwrap();
        drop(writer);
        tokio::time::timeout(std::time::Duration::from_secs(5), copy)
            .await
            .expect("stdin ends after CloseIO and the client's close")
            .unwrap();
    }

    /// The copy of an output stream ends only once the client has read the fifo empty
    /// (or the grace ran out), so that its exit is never reported while output still
    /// waits in the fifo for a client that closes it at the exit.
    #[tokio::test]
    async fn output_waits_in_the_fifo_until_the_client_read_it() {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        use std::os::unix::fs::OpenOptionsExt;
        let mut reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        let fifo = open_fifo(path.to_str().unwrap(), true, "stdout")
            .await
            .unwrap();
        let mut fifo = pipe::Sender::from_file(fifo).unwrap();
        fifo.write_all(b"uid=1000\n").await.unwrap();
        let t = std::time::Instant::now();
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let mut b = [0u8; 64];
            (reader.read(&mut b).unwrap(), reader)
        });
        read_out(&fifo, Duration::from_secs(5)).await;
        let waited = t.elapsed();
        let (n, _reader) = late.join().unwrap();
        assert_eq!(n, 9);
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(4),
            "waited {waited:?} for a reader that read after 300 ms"
        );
        // Nobody reads: the wait ends at the grace.
        fifo.write_all(b"more").await.unwrap();
        let t = std::time::Instant::now();
        read_out(&fifo, Duration::from_millis(200)).await;
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    #[test]
    fn headers_follow_the_contract() {
        assert_eq!(header("stdout", "c1", ""), "stdout c1\n");
        assert_eq!(header("stdin", "c1", "e2"), "stdin c1 e2\n");
    }

    #[test]
    fn terminal_merges_stderr() {
        let p = StdioPaths {
            stdin: "i".into(),
            stdout: "o".into(),
            stderr: "e".into(),
            terminal: true,
        };
        let s = p.streams();
        assert!(s.terminal && s.stdin && s.stdout && !s.stderr);
        let p = StdioPaths {
            stdin: "".into(),
            stdout: "o".into(),
            stderr: "e".into(),
            terminal: false,
        };
        let s = p.streams();
        assert!(!s.stdin && s.stdout && s.stderr);
        assert_eq!(s.stream_port, STDIO_PORT);
    }
}
