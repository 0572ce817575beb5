//! The hybrid-vsock backend (Firecracker's convention): a host client connects to the
//! Unix socket `uds_path` and writes `CONNECT <port>\n` to reach guest port `<port>`; a
//! guest connection to host port P is bridged to the Unix socket `<uds_path>_P`. Owns the
//! connection table, the epoll set of host sockets and the deadlines.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{debug, error, info};
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::connection::{ConnState, VsockConnection};
use super::defs::*;
use super::packet::VsockHeader;
use super::{warn_limited, LogLimiter, VsockBackend, VsockConfig};

/// Errors setting up the muxer.
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    #[error("Path {0} exists and is not a socket")]
    PathInUse(PathBuf),
    #[error("Failed to remove stale socket {0}")]
    RemoveStale(PathBuf, #[source] io::Error),
    #[error("Failed to listen on {0}")]
    Bind(PathBuf, #[source] io::Error),
    #[error("Failed to set up the host event set")]
    Epoll(#[source] io::Error),
    #[error("Failed to create the deadline timer")]
    Timer(#[source] nix::Error),
}

const LISTENER_TOKEN: u64 = u64::MAX;
const TIMER_TOKEN: u64 = u64::MAX - 1;
const WAKE_TOKEN: u64 = u64::MAX - 2;
/// Rounds of epoll results handled per call, so a flood cannot starve the queues.
const MAX_EVENT_ROUNDS: usize = 16;

/// A connection is named by its two ports, as the guest names it (§5.10.6.4).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct ConnKey {
    local_port: u32,
    peer_port: u32,
}

enum RxItem {
    /// A connection has packets to send.
    Conn(ConnKey),
    /// A reset for a packet that matched no connection.
    Rst(ConnKey),
}

/// A host client that has not finished its `CONNECT` line yet.
struct PendingHost {
    stream: UnixStream,
    line: [u8; MAX_CONNECT_LINE],
    len: usize,
    deadline: Instant,
}

pub struct VsockMuxer {
    config: VsockConfig,
    listener: UnixListener,
    epoll: Epoll,
    timer: TimerFd,
    /// Written by [`VsockBackend::wake`]; in the epoll set, so the runner comes back.
    wake: EventFd,
    pending_hosts: HashMap<RawFd, PendingHost>,
    conns: HashMap<ConnKey, VsockConnection>,
    fd_keys: HashMap<RawFd, ConnKey>,
    rxq: VecDeque<RxItem>,
    pending_rsts: usize,
    next_host_port: u32,
    log: LogLimiter,
}

/// Takes over an inherited descriptor, after checking it is a listening Unix socket.
pub(crate) fn inherited_listener(fd: std::os::fd::RawFd) -> std::io::Result<UnixListener> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::fs::FileTypeExt;
    // SAFETY: fcntl on a number only checks whether it is an open descriptor.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is open (checked above) and handed to us by our parent for this use;
    // nothing else in this process owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let file = std::fs::File::from(owned);
    let kind = file.metadata()?.file_type();
    if !kind.is_socket() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is not a socket"),
        ));
    }
    let listening = nix::sys::socket::getsockopt(&file, nix::sys::socket::sockopt::AcceptConn)
        .map_err(std::io::Error::from)?;
    if !listening {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is not a listening socket"),
        ));
    }
    Ok(UnixListener::from(std::os::fd::OwnedFd::from(file)))
}

impl VsockMuxer {
    /// Listens on `config.uds_path` (replacing a stale socket there). The configuration
    /// must have been validated.
    pub fn new(config: VsockConfig) -> Result<Self, MuxerError> {
        let listener = match config.listener_fd {
            Some(fd) => inherited_listener(fd),
            None => {
                remove_stale_socket(&config.uds_path)?;
                UnixListener::bind(&config.uds_path)
            }
        }
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| MuxerError::Bind(config.uds_path.clone(), e))?;
        let epoll = Epoll::new().map_err(MuxerError::Epoll)?;
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .map_err(MuxerError::Timer)?;
        let wake =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(MuxerError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            )
            .and_then(|()| {
                epoll.ctl(
                    ControlOperation::Add,
                    timer.as_fd().as_raw_fd(),
                    EpollEvent::new(EventSet::IN, TIMER_TOKEN),
                )
            })
            .and_then(|()| {
                epoll.ctl(
                    ControlOperation::Add,
                    wake.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, WAKE_TOKEN),
                )
            })
            .map_err(MuxerError::Epoll)?;
        info!(
            "vsock: listening for host connections on {}",
            config.uds_path.display()
        );
        Ok(Self {
            config,
            listener,
            epoll,
            timer,
            wake,
            pending_hosts: HashMap::new(),
            conns: HashMap::new(),
            fd_keys: HashMap::new(),
            rxq: VecDeque::new(),
            pending_rsts: 0,
            next_host_port: FIRST_EPHEMERAL_HOST_PORT,
            log: LogLimiter::new("vsock"),
        })
    }

    pub fn config(&self) -> &VsockConfig {
        &self.config
    }

    /// Live connections (including ones being set up or torn down).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Turns waiting for the guest's rx buffers (connections with packets, resets).
    pub fn rx_queue_len(&self) -> usize {
        self.rxq.len()
    }

    fn total_connections(&self) -> usize {
        self.conns.len() + self.pending_hosts.len()
    }

    fn handle_event(&mut self, token: u64, evset: EventSet) {
        match token {
            LISTENER_TOKEN => self.accept_hosts(),
            TIMER_TOKEN => {
                // Only drains the expiration count; deadlines are checked after each batch.
                let _ = self.timer.wait();
            }
            // Only drains the count: the runner came back, which was the point.
            WAKE_TOKEN => {
                let _ = self.wake.read();
            }
            _ => {
                let fd = token as RawFd;
                if self.pending_hosts.contains_key(&fd) {
                    self.read_connect_line(fd, evset);
                } else if let Some(&key) = self.fd_keys.get(&fd) {
                    if let Some(conn) = self.conns.get_mut(&key) {
                        if let Err(e) = conn.notify(evset) {
                            debug!(
                                "vsock: connection {}:{}: {e}",
                                key.local_port, key.peer_port
                            );
                            conn.kill();
                        }
                    }
                    self.update_conn(key);
                }
            }
        }
    }

    fn accept_hosts(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: leave the rest in the backlog for later.
                    warn_limited!(self.log, "vsock: accept on host socket failed: {e}");
                    return;
                }
            };
            if self.total_connections() >= self.config.max_connections {
                warn_limited!(
                    self.log,
                    "vsock: connection limit reached, refusing host client"
                );
                continue;
            }
            let fd = stream.as_raw_fd();
            if let Err(e) = stream.set_nonblocking(true).and_then(|()| {
                self.epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, fd as u64),
                )
            }) {
                warn_limited!(self.log, "vsock: cannot watch host client: {e}");
                continue;
            }
            self.pending_hosts.insert(
                fd,
                PendingHost {
                    stream,
                    line: [0; MAX_CONNECT_LINE],
                    len: 0,
                    deadline: Instant::now() + self.config.connect_timeout,
                },
            );
        }
    }

    /// Reads the `CONNECT` line a byte at a time, so nothing after it is consumed: bytes
    /// the client sends early stay in the socket for the guest.
    fn read_connect_line(&mut self, fd: RawFd, evset: EventSet) {
        let Some(ph) = self.pending_hosts.get_mut(&fd) else {
            return;
        };
        loop {
            let mut byte = [0u8; 1];
            match (&ph.stream).read(&mut byte) {
                Ok(0) => break,
                Ok(_) if byte[0] == b'\n' => {
                    let line = ph.line;
                    let len = ph.len;
                    if let Some(ph) = self.remove_pending_host(fd) {
                        self.connect_to_guest(ph.stream, &line[..len]);
                    }
                    return;
                }
                Ok(_) => {
                    // Leave room for the newline within MAX_CONNECT_LINE.
                    if ph.len + 1 >= MAX_CONNECT_LINE {
                        warn_limited!(self.log, "vsock: host client sent an overlong CONNECT line");
                        break;
                    }
                    ph.line[ph.len] = byte[0];
                    ph.len += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !evset.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                        return;
                    }
                    break;
                }
                Err(_) => break,
            }
        }
        self.remove_pending_host(fd);
    }

    fn remove_pending_host(&mut self, fd: RawFd) -> Option<PendingHost> {
        let ph = self.pending_hosts.remove(&fd)?;
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            fd,
            EpollEvent::new(EventSet::empty(), 0),
        );
        Some(ph)
    }

    /// Starts a host-initiated connection: `OP_REQUEST` to the guest, the client waits.
    fn connect_to_guest(&mut self, stream: UnixStream, line: &[u8]) {
        let Some(peer_port) = parse_connect_line(line) else {
            warn_limited!(
                self.log,
                "vsock: bad CONNECT line from host client: {:?}",
                String::from_utf8_lossy(line)
            );
            return;
        };
        let Some(local_port) = self.allocate_host_port(peer_port) else {
            warn_limited!(self.log, "vsock: no free host port");
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port,
        };
        debug!("vsock: host connects to guest port {peer_port} from port {local_port}");
        let fd = stream.as_raw_fd();
        let mut conn = VsockConnection::new_local(
            stream,
            local_port,
            peer_port,
            Instant::now() + self.config.connect_timeout,
        );
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::empty(), fd as u64),
        ) {
            warn_limited!(self.log, "vsock: cannot watch host client: {e}");
            return;
        }
        conn.registered = Some(EventSet::empty());
        self.conns.insert(key, conn);
        self.fd_keys.insert(fd, key);
        self.update_conn(key);
    }

    fn allocate_host_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=self.config.max_connections {
            let port = self.next_host_port;
            self.next_host_port = port.checked_add(1).unwrap_or(FIRST_EPHEMERAL_HOST_PORT);
            let key = ConnKey {
                local_port: port,
                peer_port,
            };
            if !self.conns.contains_key(&key) {
                return Some(port);
            }
        }
        None
    }

    /// Serves a guest `OP_REQUEST` by connecting to `<uds_path>_<port>`.
    fn connect_to_host(&mut self, hdr: &VsockHeader) {
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if self.total_connections() >= self.config.max_connections {
            warn_limited!(
                self.log,
                "vsock: connection limit reached, refusing guest request"
            );
            self.queue_rst(key);
            return;
        }
        let path = host_port_path(&self.config.uds_path, hdr.dst_port);
        let stream = match connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                debug!("vsock: guest connect to {}: {e}", path.display());
                self.queue_rst(key);
                return;
            }
        };
        let fd = stream.as_raw_fd();
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::empty(), fd as u64),
        ) {
            warn_limited!(self.log, "vsock: cannot watch host socket: {e}");
            self.queue_rst(key);
            return;
        }
        debug!(
            "vsock: guest port {} connected to {}",
            hdr.src_port,
            path.display()
        );
        let mut conn = VsockConnection::new_peer(stream, hdr);
        conn.registered = Some(EventSet::empty());
        self.conns.insert(key, conn);
        self.fd_keys.insert(fd, key);
        self.update_conn(key);
    }

    fn queue_rst(&mut self, key: ConnKey) {
        if self.pending_rsts >= MAX_PENDING_RST {
            warn_limited!(self.log, "vsock: too many pending resets, dropping one");
            return;
        }
        self.pending_rsts += 1;
        self.rxq.push_back(RxItem::Rst(key));
    }

    /// Brings the rx queue, epoll registration and deadline of a connection in line with
    /// its state, and drops it once it is done.
    fn update_conn(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let fd = conn.stream().as_raw_fd();
        if conn.is_done() {
            if conn.registered.is_some() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    fd,
                    EpollEvent::new(EventSet::empty(), 0),
                );
            }
            self.fd_keys.remove(&fd);
            if conn.in_rxq {
                // Its turn would find nothing, and a new connection under the same key
                // queues a turn of its own: a guest opening and resetting the same
                // connection while posting no rx buffers would grow the queue forever.
                self.rxq
                    .retain(|item| !matches!(item, RxItem::Conn(k) if *k == key));
            }
            self.conns.remove(&key);
            debug!(
                "vsock: connection {}:{} removed",
                key.local_port, key.peer_port
            );
            return;
        }
        if matches!(conn.state(), ConnState::LocalClosed | ConnState::PeerClosed)
            && conn.deadline.is_none()
        {
            conn.deadline = Some(Instant::now() + self.config.connect_timeout);
        }
        if conn.host_hup() {
            // Epoll would report the hang-up forever; read the rest without it.
            if conn.registered.take().is_some() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    fd,
                    EpollEvent::new(EventSet::empty(), 0),
                );
            }
            conn.poll_after_hup();
        } else if let Some(registered) = conn.registered {
            let want = conn.desired_events();
            if want != registered {
                match self.epoll.ctl(
                    ControlOperation::Modify,
                    fd,
                    EpollEvent::new(want, fd as u64),
                ) {
                    Ok(()) => conn.registered = Some(want),
                    Err(e) => {
                        error!("vsock: cannot update host socket events: {e}");
                        conn.kill();
                    }
                }
            }
        }
        if conn.has_pending_rx() && !conn.in_rxq {
            conn.in_rxq = true;
            self.rxq.push_back(RxItem::Conn(key));
        }
    }

    fn sweep_deadlines(&mut self) {
        let now = Instant::now();
        let late_hosts: Vec<RawFd> = self
            .pending_hosts
            .iter()
            .filter(|(_, ph)| ph.deadline <= now)
            .map(|(&fd, _)| fd)
            .collect();
        for fd in late_hosts {
            warn_limited!(self.log, "vsock: host client did not send CONNECT in time");
            self.remove_pending_host(fd);
        }
        let late_conns: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(&k, _)| k)
            .collect();
        for key in late_conns {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.expire();
            }
            self.update_conn(key);
        }
    }

    fn rearm_timer(&mut self) {
        let next = self
            .pending_hosts
            .values()
            .map(|ph| ph.deadline)
            .chain(self.conns.values().filter_map(|c| c.deadline))
            .min();
        let result = match next {
            Some(deadline) => {
                // Zero would disarm the timer; fire at once instead.
                let wait = deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1));
                self.timer.set(
                    Expiration::OneShot(TimeSpec::from_duration(wait)),
                    TimerSetTimeFlags::empty(),
                )
            }
            None => self.timer.unset(),
        };
        if let Err(e) = result {
            error!("vsock: cannot arm the deadline timer: {e}");
        }
    }

    fn header_for(&self, key: ConnKey, op: u16) -> VsockHeader {
        VsockHeader {
            src_cid: VSOCK_HOST_CID,
            dst_cid: self.config.guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            type_: VSOCK_TYPE_STREAM,
            op,
            ..Default::default()
        }
    }
}

impl VsockBackend for VsockMuxer {
    fn send_pkt(&mut self, hdr: &VsockHeader, payload: &[u8]) {
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if hdr.type_ != VSOCK_TYPE_STREAM {
            // §5.10.6.4: refuse what we do not support with a reset, never answer a reset.
            warn_limited!(
                self.log,
                "vsock: guest used unsupported socket type {}",
                hdr.type_
            );
            if hdr.op != VSOCK_OP_RST {
                self.queue_rst(key);
            }
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            match hdr.op {
                VSOCK_OP_REQUEST => self.connect_to_host(hdr),
                VSOCK_OP_RST => {}
                _ => self.queue_rst(key),
            }
            return;
        };
        if hdr.op == VSOCK_OP_RST {
            debug!(
                "vsock: guest reset connection {}:{}",
                key.local_port, key.peer_port
            );
            conn.drop_silently();
        } else if let Err(e) = conn.send_pkt(hdr, payload) {
            warn_limited!(
                self.log,
                "vsock: resetting connection {}:{}: {e}",
                key.local_port,
                key.peer_port
            );
            conn.kill();
        }
        self.update_conn(key);
    }

    fn recv_pkt(&mut self, payload: &mut [u8]) -> Option<VsockHeader> {
        // Each queued connection gets one turn; a connection that stays pending yet
        // produces nothing cannot keep us here.
        for _ in 0..self.rxq.len() {
            match self.rxq.pop_front()? {
                RxItem::Rst(key) => {
                    self.pending_rsts -= 1;
                    return Some(self.header_for(key, VSOCK_OP_RST));
                }
                RxItem::Conn(key) => {
                    let Some(conn) = self.conns.get_mut(&key) else {
                        continue;
                    };
                    conn.in_rxq = false;
                    let pkt = conn.recv_pkt(payload);
                    self.update_conn(key);
                    if let Some(pkt) = pkt {
                        return Some(VsockHeader {
                            len: pkt.len as u32,
                            flags: pkt.flags,
                            buf_alloc: pkt.buf_alloc,
                            fwd_cnt: pkt.fwd_cnt,
                            ..self.header_for(key, pkt.op)
                        });
                    }
                }
            }
        }
        None
    }

    fn has_pending_rx(&self) -> bool {
        !self.rxq.is_empty()
    }

    fn wake(&self) {
        if let Err(e) = self.wake.write(1) {
            error!("vsock: cannot wake the device's runner: {e}");
        }
    }

    fn process_host_events(&mut self) {
        let mut events = [EpollEvent::new(EventSet::empty(), 0); 64];
        for _ in 0..MAX_EVENT_ROUNDS {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!("vsock: waiting for host events failed: {e}");
                    break;
                }
            };
            for ev in &events[..n] {
                self.handle_event(ev.data(), ev.event_set());
            }
            if n < events.len() {
                break;
            }
        }
        self.sweep_deadlines();
        self.rearm_timer();
    }
}

impl AsRawFd for VsockMuxer {
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

impl Drop for VsockMuxer {
    fn drop(&mut self) {
        // An inherited listener's socket is its maker's.
        if self.config.listener_fd.is_none() {
            let _ = std::fs::remove_file(&self.config.uds_path);
        }
    }
}

/// Parses `CONNECT <port>` (the newline already stripped; a trailing `\r` is allowed).
fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let port = line.strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

/// `<uds_path>_<port>`, where guest connections to host port `port` go.
pub fn host_port_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut path = OsString::from(uds_path.as_os_str());
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

/// Connects without blocking: a full listen backlog fails (EAGAIN) instead of stalling
/// the device thread.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    connect(fd.as_raw_fd(), &addr)?;
    Ok(UnixStream::from(fd))
}

/// Removes a socket left behind by an earlier run; refuses to touch anything else.
pub(crate) fn remove_stale_socket(path: &Path) -> Result<(), MuxerError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|e| MuxerError::RemoveStale(path.to_path_buf(), e))
        }
        Ok(_) => Err(MuxerError::PathInUse(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(MuxerError::RemoveStale(path.to_path_buf(), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_line_parsing() {
        assert_eq!(parse_connect_line(b"CONNECT 1024"), Some(1024));
        assert_eq!(parse_connect_line(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect_line(b"CONNECT"), None);
        assert_eq!(parse_connect_line(b"CONNECT "), None);
        assert_eq!(parse_connect_line(b"CONNECT +5"), None);
        assert_eq!(parse_connect_line(b"CONNECT 99999999999"), None);
        assert_eq!(parse_connect_line(b"connect 5"), None);
        assert_eq!(parse_connect_line(b"LISTEN 5"), None);
    }

    #[test]
    fn host_port_path_appends_port() {
        assert_eq!(
            host_port_path(Path::new("/run/v.sock"), 52),
            PathBuf::from("/run/v.sock_52")
        );
    }
}
