//! Process stdio and the stream connections that carry it to the host.
//!
//! Each connection on the stdio port starts with one header line,
//! `<stdin|stdout|stderr> <container_id>[ <exec_id>]\n`, then raw bytes.
//! Output is copied from the process's pipe (or pty master) to the stream,
//! which is shut down for writing at EOF. Nothing is buffered beyond one
//! read: until the host connects, output waits in the pipe and the writer
//! blocks. Input is copied from the stream to the pipe; the stream's EOF
//! closes the process's stdin (or sends VEOF on a terminal).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cocoon_protocol::agent::StdioStreams;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use thiserror::Error;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::watch;

/// Longest accepted header line, newline included.
pub const MAX_HEADER: usize = 512;
/// How long a new connection may take to send its header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum StdioError {
    #[error("bad stream header {0:?}")]
    Header(String),
    #[error("cannot create the process's stdio")]
    Create(#[source] nix::Error),
    #[error("cannot open /dev/null")]
    DevNull(#[source] io::Error),
    #[error("the process has no terminal")]
    NoTerminal,
    #[error("the process's terminal is not set up yet")]
    TerminalPending,
    #[error("cannot resize the terminal")]
    Resize(#[source] nix::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Stdin,
    Stdout,
    Stderr,
}

#[derive(Debug, PartialEq, Eq)]
pub struct StreamHeader {
    pub kind: StreamKind,
    pub container_id: String,
    pub exec_id: String,
}

pub fn parse_header(line: &[u8]) -> Result<StreamHeader, StdioError> {
    let bad = || StdioError::Header(String::from_utf8_lossy(line).into_owned());
    let text = std::str::from_utf8(line).map_err(|_| bad())?;
    let text = text.strip_suffix('\n').ok_or_else(bad)?;
    let mut parts = text.split(' ');
    let kind = match parts.next() {
        Some("stdin") => StreamKind::Stdin,
        Some("stdout") => StreamKind::Stdout,
        Some("stderr") => StreamKind::Stderr,
        _ => return Err(bad()),
    };
    let container_id = parts.next().filter(|s| !s.is_empty()).ok_or_else(bad)?;
    let exec_id = parts.next().unwrap_or("");
    if parts.next().is_some() || (text.ends_with(' ')) {
        return Err(bad());
    }
    Ok(StreamHeader {
        kind,
        container_id: container_id.to_string(),
        exec_id: exec_id.to_string(),
    })
}

/// The process's ends, handed to the runtime helper as fds 0-2.
#[derive(Debug)]
pub struct ChildStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// The agent's ends of one process's stdio.
#[derive(Debug)]
pub struct ProcessIo {
    terminal: bool,
    /// Streams the host asked for, filled in when a terminal's master
    /// arrives.
    want_stdin: bool,
    want_stdout: bool,
    stdin: Mutex<Option<OwnedFd>>,
    stdout: Mutex<Option<OwnedFd>>,
    stderr: Mutex<Option<OwnedFd>>,
    /// The pty master, for resizing. The container allocates the pty from
    /// its own devpts, so this is set after the process exists.
    master: OnceLock<OwnedFd>,
    /// For a terminal: false until the master arrived or its setup failed.
    /// Streams that connect earlier wait for it.
    settled: watch::Sender<bool>,
    /// Output streams requested by the host and not yet copied to EOF.
    pending: watch::Sender<usize>,
    close_stdin: watch::Sender<bool>,
}

fn pipe() -> Result<(OwnedFd, OwnedFd), StdioError> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(StdioError::Create)
}

fn dev_null() -> Result<OwnedFd, StdioError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map(OwnedFd::from)
        .map_err(StdioError::DevNull)
}

fn dup(fd: &OwnedFd) -> Result<OwnedFd, StdioError> {
    fd.try_clone()
        .map_err(|e| StdioError::Create(nix::Error::from_raw(e.raw_os_error().unwrap_or(0))))
}

impl ProcessIo {
    /// Creates the pipes the host asked for; the rest is /dev/null. A
    /// terminal's pty comes later, from the container
    /// ([`Self::attach_terminal`]); until then its stdio is /dev/null.
    pub fn new(req: &StdioStreams) -> Result<(Arc<ProcessIo>, ChildStdio), StdioError> {
        let (close_stdin, _) = watch::channel(false);
        if req.terminal {
            let io = ProcessIo {
                terminal: true,
                want_stdin: req.stdin,
                want_stdout: req.stdout,
                stdin: Mutex::new(None),
                stdout: Mutex::new(None),
                stderr: Mutex::new(None),
                master: OnceLock::new(),
                settled: watch::channel(false).0,
                pending: watch::channel(usize::from(req.stdout)).0,
                close_stdin,
            };
            let child = ChildStdio {
                stdin: dev_null()?,
                stdout: dev_null()?,
                stderr: dev_null()?,
            };
            return Ok((Arc::new(io), child));
        }
        let (child_in, our_in) = if req.stdin {
            let (r, w) = pipe()?;
            (r, Some(w))
        } else {
            (dev_null()?, None)
        };
        let out = |wanted: bool| -> Result<(OwnedFd, Option<OwnedFd>), StdioError> {
            if wanted {
                let (r, w) = pipe()?;
                Ok((w, Some(r)))
            } else {
                Ok((dev_null()?, None))
            }
        };
        let (child_out, our_out) = out(req.stdout)?;
        let (child_err, our_err) = out(req.stderr)?;
        let io = ProcessIo {
            terminal: false,
            want_stdin: req.stdin,
            want_stdout: req.stdout,
            stdin: Mutex::new(our_in),
            stdout: Mutex::new(our_out),
            stderr: Mutex::new(our_err),
            master: OnceLock::new(),
            settled: watch::channel(true).0,
            pending: watch::channel(usize::from(req.stdout) + usize::from(req.stderr)).0,
            close_stdin,
        };
        Ok((
            Arc::new(io),
            ChildStdio {
                stdin: child_in,
                stdout: child_out,
                stderr: child_err,
            },
        ))
    }

    /// Takes the pty master the container allocated: the streams the host
    /// asked for read and write it from now on.
    pub fn attach_terminal(&self, master: OwnedFd) -> Result<(), StdioError> {
        if !self.terminal || self.master.get().is_some() {
            return Err(StdioError::NoTerminal);
        }
        let stdout = dup(&master)?;
        {
            // Under the lock close_stdin takes too, so that a CloseStdin
            // which came first is not lost.
            let mut stdin = self.stdin.lock().unwrap_or_else(|e| e.into_inner());
            if self.want_stdin {
                if *self.close_stdin.borrow() {
                    send_veof(&master);
                } else {
                    *stdin = Some(dup(&master)?);
                }
            }
        }
        if self.want_stdout {
            *self.stdout.lock().unwrap_or_else(|e| e.into_inner()) = Some(stdout);
        } else {
            // Nobody reads the terminal: drain it so the process never blocks.
            tokio::spawn(copy_out(stdout, tokio::io::sink()));
        }
        let _ = self.master.set(master);
        self.settled.send_replace(true);
        Ok(())
    }

    /// The process's setup failed: streams waiting for its terminal give up.
    pub fn abandon(&self) {
        self.settled.send_replace(true);
    }

    /// Claims a stream like [`Self::take`], first waiting for a terminal's
    /// master to arrive.
    pub async fn claim(&self, kind: StreamKind) -> Option<OwnedFd> {
        let mut rx = self.settled.subscribe();
        let _ = rx.wait_for(|s| *s).await;
        self.take(kind)
    }

    /// Claims the agent's end of a stream; only the first claim gets it.
    pub fn take(&self, kind: StreamKind) -> Option<OwnedFd> {
        let slot = match kind {
            StreamKind::Stdin => &self.stdin,
            StreamKind::Stdout => &self.stdout,
            StreamKind::Stderr => &self.stderr,
        };
        slot.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), StdioError> {
        if !self.terminal {
            return Err(StdioError::NoTerminal);
        }
        let master = self.master.get().ok_or(StdioError::TerminalPending)?;
        crate::runtime::console::set_window_size(master.as_fd(), rows, cols)
            .map_err(StdioError::Resize)
    }

    /// Closes the process's stdin: now if no stream carries it, else once
    /// the stream's copy notices. A terminal not attached yet gets VEOF
    /// when it is.
    pub fn close_stdin(&self) {
        let mut slot = self.stdin.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(fd) = slot.take() {
            if self.terminal {
                send_veof(&fd);
            }
            drop(fd);
        }
        self.close_stdin.send_replace(true);
    }

    /// Waits until every requested output stream reached EOF, or `deadline`.
    pub async fn drained(&self, deadline: Instant) {
        let mut rx = self.pending.subscribe();
        let until = tokio::time::Instant::from_std(deadline);
        let _ = tokio::time::timeout_at(until, rx.wait_for(|n| *n == 0)).await;
    }

    fn output_done(&self) {
        self.pending.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// The terminal's end-of-file character (^D unless changed).
fn send_veof(master: &OwnedFd) {
    let veof = nix::sys::termios::tcgetattr(master.as_fd())
        .map(|t| t.control_chars[libc::VEOF])
        .unwrap_or(4);
    let _ = nix::unistd::write(master, &[veof]);
}

/// Non-blocking async access to a pipe or pty end.
struct AsyncPipe(AsyncFd<OwnedFd>);

impl AsyncPipe {
    fn new(fd: OwnedFd) -> io::Result<Self> {
        let flags = fcntl(&fd, FcntlArg::F_GETFL).map_err(io::Error::from)?;
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        fcntl(&fd, FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
        // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it open
        // (and its number unchanged) until the AsyncFd is dropped.
        Ok(AsyncPipe(unsafe { AsyncFd::register(fd) }?))
    }

    /// Reads some bytes; 0 at EOF. A pty master reports EIO once the
    /// slave side is gone, which is its EOF.
    async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.0.readable().await?;
            match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), buf).map_err(io::Error::from)) {
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let mut guard = self.0.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), buf).map_err(io::Error::from))
            {
                Ok(Ok(n)) => buf = &buf[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }
}

/// Copies process output to `dst` until EOF, then shuts `dst` down.
async fn copy_out<W: AsyncWrite + Unpin>(fd: OwnedFd, mut dst: W) {
    let Ok(src) = AsyncPipe::new(fd) else {
        return;
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match src.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if dst.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = dst.flush().await;
    let _ = dst.shutdown().await;
}

/// Copies host input to the process until the stream ends or CloseStdin.
async fn copy_in<R: AsyncRead + Unpin>(
    mut src: R,
    fd: OwnedFd,
    terminal: bool,
    mut close: watch::Receiver<bool>,
) {
    let veof_fd = if terminal { fd.try_clone().ok() } else { None };
    let Ok(dst) = AsyncPipe::new(fd) else {
        return;
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let step = async {
            let n = src.read(&mut buf).await?;
            if n > 0 {
                dst.write_all(&buf[..n]).await?;
            }
            io::Result::Ok(n)
        };
        tokio::select! {
            r = step => match r {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            },
            _ = close.wait_for(|c| *c) => break,
        }
    }
    if let Some(m) = veof_fd {
        send_veof(&m);
    }
    // Dropping `dst` closes the pipe: the process reads EOF.
}

/// Finds the stdio of a process by its ids (the container registry).
pub trait ProcessLookup: Send + Sync + 'static {
    fn process_io(&self, container_id: &str, exec_id: &str) -> Option<Arc<ProcessIo>>;

    /// Whether the host may have this stream (the pod's policy: `ReadStream` for output,
    /// `WriteStream` for input). A refused output is still drained in the guest, so the
    /// process never blocks on a pipe nobody reads.
    fn allow_stream(&self, _header: &StreamHeader) -> bool {
        true
    }
}

/// Serves one stream connection: header, then the copy in its direction.
pub async fn serve_connection<S, L>(conn: S, lookup: Arc<L>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    L: ProcessLookup + ?Sized,
{
    let mut reader = BufReader::new(conn);
    let mut line = Vec::new();
    let read = async {
        (&mut reader)
            .take(MAX_HEADER as u64)
            .read_until(b'\n', &mut line)
            .await
    };
    match tokio::time::timeout(HEADER_TIMEOUT, read).await {
        Ok(Ok(_)) => {}
        _ => return,
    }
    let header = match parse_header(&line) {
        Ok(h) => h,
        Err(e) => {
            tracing::debug!("stream refused: {e}");
            return;
        }
    };
    let Some(io) = lookup.process_io(&header.container_id, &header.exec_id) else {
        tracing::debug!(container = %header.container_id, exec = %header.exec_id, "stream for an unknown process");
        return;
    };
    let Some(fd) = io.claim(header.kind).await else {
        tracing::debug!(container = %header.container_id, exec = %header.exec_id, kind = ?header.kind, "stream not requested or already connected");
        return;
    };
    if !lookup.allow_stream(&header) {
        if header.kind != StreamKind::Stdin {
            copy_out(fd, tokio::io::sink()).await;
            io.output_done();
        }
        return;
    }
    match header.kind {
        StreamKind::Stdin => {
            copy_in(reader, fd, io.terminal, io.close_stdin.subscribe()).await;
        }
        StreamKind::Stdout | StreamKind::Stderr => {
            copy_out(fd, reader.into_inner()).await;
            io.output_done();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn headers_parse_and_garbage_is_refused() {
        assert_eq!(
            parse_header(b"stdout c1\n").unwrap(),
            StreamHeader {
                kind: StreamKind::Stdout,
                container_id: "c1".into(),
                exec_id: String::new()
            }
        );
        assert_eq!(parse_header(b"stdin c1 e2\n").unwrap().exec_id, "e2");
        for bad in [
            &b"stdout c1"[..],
            b"stdio c1\n",
            b"stdout\n",
            b"stdout  c1\n",
            b"stdout c1 e2 x\n",
            b"stdout c1 \n",
            b"\xff c1\n",
        ] {
            assert!(parse_header(bad).is_err(), "{bad:?}");
        }
    }

    struct One(Arc<ProcessIo>);
    impl ProcessLookup for One {
        fn process_io(&self, c: &str, e: &str) -> Option<Arc<ProcessIo>> {
            (c == "c" && e.is_empty()).then(|| self.0.clone())
        }
    }

    fn streams(stdin: bool, stdout: bool, stderr: bool) -> StdioStreams {
        let mut s = StdioStreams::new();
        s.stdin = stdin;
        s.stdout = stdout;
        s.stderr = stderr;
        s
    }

    #[tokio::test]
    async fn output_is_copied_to_eof_and_counted() {
        let (io, child) = ProcessIo::new(&streams(false, true, false)).unwrap();
        let lookup = Arc::new(One(io.clone()));
        let (host, agent) = tokio::net::UnixStream::pair().unwrap();
        let task = tokio::spawn(serve_connection(agent, lookup.clone()));
        let mut host = host;
        host.write_all(b"stdout c\n").await.unwrap();
        nix::unistd::write(&child.stdout, b"hello").unwrap();
        drop(child);
        let mut got = Vec::new();
        host.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
        task.await.unwrap();
        io.drained(Instant::now() + Duration::from_secs(5)).await;
        assert_eq!(*io.pending.borrow(), 0);

        // A second stdout stream and an unknown process are both closed.
        for header in [&b"stdout c\n"[..], b"stderr c\n", b"stdout other\n"] {
            let (mut host, agent) = tokio::net::UnixStream::pair().unwrap();
            let t = tokio::spawn(serve_connection(agent, lookup.clone()));
            host.write_all(header).await.unwrap();
            let mut rest = Vec::new();
            host.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
            t.await.unwrap();
        }
    }

    #[tokio::test]
    async fn terminal_streams_wait_for_the_master_from_the_container() {
        let mut req = streams(true, true, false);
        req.terminal = true;
        let (io, _child) = ProcessIo::new(&req).unwrap();
        let lookup = Arc::new(One(io.clone()));
        // The host connects before the container sent its pty master.
        let (mut host, agent) = tokio::net::UnixStream::pair().unwrap();
        let task = tokio::spawn(serve_connection(agent, lookup));
        host.write_all(b"stdout c\n").await.unwrap();
        // Let the connection get as far as waiting for the master.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(matches!(io.resize(1, 1), Err(StdioError::TerminalPending)));
        // A CloseStdin before the master arrives is not lost: VEOF follows.
        io.close_stdin();

        let pty = nix::pty::openpty(None, None).unwrap();
        let mut tio = nix::sys::termios::tcgetattr(&pty.slave).unwrap();
        nix::sys::termios::cfmakeraw(&mut tio);
        nix::sys::termios::tcsetattr(&pty.slave, nix::sys::termios::SetArg::TCSANOW, &tio).unwrap();
        io.attach_terminal(pty.master).unwrap();
        io.resize(12, 34).unwrap();
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one winsize struct to a valid pointer.
        let rc = unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
        assert_eq!((rc, ws.ws_row, ws.ws_col), (0, 12, 34));
        let mut veof = [0u8; 1];
        assert_eq!(nix::unistd::read(&pty.slave, &mut veof).unwrap(), 1);
        assert_eq!(veof[0], 4);

        nix::unistd::write(&pty.slave, b"hi").unwrap();
        let mut got = [0u8; 2];
        host.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hi");
        drop(pty.slave);
        task.await.unwrap();
        // Stdin was closed, so nobody may claim it any more.
        assert!(io.take(StreamKind::Stdin).is_none());
    }

    #[tokio::test]
    async fn terminal_streams_give_up_when_the_setup_fails() {
        let mut req = streams(false, true, false);
        req.terminal = true;
        let (io, _child) = ProcessIo::new(&req).unwrap();
        let lookup = Arc::new(One(io.clone()));
        let (mut host, agent) = tokio::net::UnixStream::pair().unwrap();
        let task = tokio::spawn(serve_connection(agent, lookup));
        host.write_all(b"stdout c\n").await.unwrap();
        io.abandon();
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        task.await.unwrap();
    }

    #[tokio::test]
    async fn stdin_reaches_the_process_and_eof_closes_it() {
        let (io, child) = ProcessIo::new(&streams(true, false, false)).unwrap();
        let lookup = Arc::new(One(io));
        let (mut host, agent) = tokio::net::UnixStream::pair().unwrap();
        let task = tokio::spawn(serve_connection(agent, lookup));
        host.write_all(b"stdin c\nabc").await.unwrap();
        host.shutdown().await.unwrap();
        task.await.unwrap();
        let mut got = Vec::new();
        let mut f = std::fs::File::from(child.stdin);
        std::io::Read::read_to_end(&mut f, &mut got).unwrap();
        assert_eq!(got, b"abc");
    }
}
