//! One vsock stream connection bridged to a host Unix stream: its state machine
//! (§5.10.6.4–6), credit accounting (§5.10.6.3) and the bounded buffer of guest data the
//! host has not read yet. It never touches guest memory or the epoll set; the muxer
//! drives it and asks what it wants to send and to poll for.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use log::{debug, trace};
use nix::sys::socket::{send, MsgFlags};
use vmm_sys_util::epoll::EventSet;

use super::defs::*;
use super::packet::VsockHeader;

/// Errors that end a connection; the muxer logs them and resets the connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("Guest sent {len} bytes with only {free} bytes of credit left")]
    CreditExceeded { len: usize, free: usize },
    #[error("Guest sent op {op} in state {state:?}")]
    UnexpectedOp { op: u16, state: ConnState },
    #[error("Host stream failed")]
    Stream(#[source] io::Error),
}

/// Where a connection is in its life (§5.10.6.4–6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Host client asked to connect; `OP_REQUEST` queued or sent, awaiting `OP_RESPONSE`.
    LocalInit,
    /// Guest asked to connect and the host socket accepted; `OP_RESPONSE` queued.
    PeerInit,
    /// Data flows; either side may have shut down one direction.
    Established,
    /// The host stream hung up; we sent `OP_SHUTDOWN` (both) and await the guest's `OP_RST`.
    LocalClosed,
    /// The guest shut down both directions; flushing buffered data, then `OP_RST`.
    PeerClosed,
    /// Finished; an `OP_RST` may still be queued. The host stream is shut down.
    Killed,
}

/// Packets a connection wants to send, one bit each; at most one of each kind is ever
/// outstanding, so the amount of queued control traffic is bounded per connection.
mod pending {
    pub const RST: u8 = 1 << 0;
    pub const REQUEST: u8 = 1 << 1;
    pub const RESPONSE: u8 = 1 << 2;
    pub const RW: u8 = 1 << 3;
    pub const CREDIT_UPDATE: u8 = 1 << 4;
}

/// A packet the connection produced for the guest; the muxer fills in addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxPacket {
    pub op: u16,
    pub flags: u32,
    pub len: usize,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

pub struct VsockConnection {
    stream: UnixStream,
    pub local_port: u32,
    pub peer_port: u32,
    state: ConnState,
    pending: u8,
    /// Guest data accepted but not yet written to the host stream; never longer than
    /// `CONN_TX_BUF_SIZE` because the guest must respect the credit we advertise.
    tx_buf: VecDeque<u8>,
    /// Bytes of guest data received / forwarded to the host stream (§5.10.6.3 `fwd_cnt`).
    recv_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Bytes sent to the guest, and the guest's last advertised buffer state.
    sent_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// `OP_SHUTDOWN` flags the guest has sent so far.
    peer_shutdown: u32,
    /// `OP_SHUTDOWN` flags we have sent so far.
    local_shutdown: u32,
    /// The host stream hung up completely (EPOLLHUP), as opposed to a half close.
    host_hup: bool,
    /// When the muxer should give up on this connection's current state.
    pub deadline: Option<Instant>,
    /// Whether the muxer has this connection in its rx queue.
    pub in_rxq: bool,
    /// What the muxer has registered in epoll for the stream; `None` once removed.
    pub registered: Option<EventSet>,
}

impl VsockConnection {
    /// A connection a host client asked for; the guest has not been asked yet.
    pub fn new_local(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        deadline: Instant,
    ) -> Self {
        let mut conn = Self::new(stream, local_port, peer_port, ConnState::LocalInit);
        conn.pending = pending::REQUEST;
        conn.deadline = Some(deadline);
        conn
    }

    /// A connection the guest asked for, already connected to the host socket.
    pub fn new_peer(stream: UnixStream, hdr: &VsockHeader) -> Self {
        let mut conn = Self::new(stream, hdr.dst_port, hdr.src_port, ConnState::PeerInit);
        conn.pending = pending::RESPONSE;
        conn.update_peer_credit(hdr);
        conn
    }

    fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: ConnState) -> Self {
        Self {
            stream,
            local_port,
            peer_port,
            state,
            pending: 0,
            tx_buf: VecDeque::new(),
            recv_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            sent_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            peer_shutdown: 0,
            local_shutdown: 0,
            host_hup: false,
            deadline: None,
            in_rxq: false,
            registered: None,
        }
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    pub fn state(&self) -> ConnState {
        self.state
    }

    pub fn has_pending_rx(&self) -> bool {
        self.pending != 0
    }

    /// Nothing left to do: the muxer may drop the connection (closing the stream).
    pub fn is_done(&self) -> bool {
        self.state == ConnState::Killed && self.pending & pending::RST == 0
    }

    /// Resets the connection: the host stream is shut down now, the guest gets `OP_RST`.
    pub fn kill(&mut self) {
        self.close_host();
        self.pending = pending::RST;
    }

    /// Ends the connection without telling the guest (it sent `OP_RST` itself).
    pub fn drop_silently(&mut self) {
        self.close_host();
        self.pending = 0;
    }

    fn close_host(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
        self.state = ConnState::Killed;
        self.deadline = None;
        self.tx_buf = VecDeque::new();
    }

    /// Free space in the guest's receive buffer as last advertised (§5.10.6.3).
    /// Bogus counters from the guest yield zero, never a huge credit.
    pub fn peer_credit(&self) -> usize {
        let in_flight = (self.sent_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight) as usize
    }

    fn update_peer_credit(&mut self, hdr: &VsockHeader) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    /// Handles a packet the guest sent on this connection. An error means the connection
    /// must be reset.
    pub fn send_pkt(&mut self, hdr: &VsockHeader, data: &[u8]) -> Result<(), ConnectionError> {
        self.update_peer_credit(hdr);
        let unexpected = ConnectionError::UnexpectedOp {
            op: hdr.op,
            state: self.state,
        };
        match hdr.op {
            VSOCK_OP_RESPONSE => {
                if self.state != ConnState::LocalInit || self.pending & pending::REQUEST != 0 {
                    return Err(unexpected);
                }
                self.state = ConnState::Established;
                self.deadline = None;
                // Tell the host client which port it got. A fresh socket's send buffer
                // always has room for this line, so a short write means the client is gone.
                let line = format!("OK {}\n", self.local_port);
                match self.write_host(line.as_bytes()) {
                    Ok(n) if n == line.len() => Ok(()),
                    Ok(_) => Err(ConnectionError::Stream(io::ErrorKind::WriteZero.into())),
                    Err(e) => Err(ConnectionError::Stream(e)),
                }
            }
            VSOCK_OP_RW => {
                if self.state != ConnState::Established
                    || self.peer_shutdown & VSOCK_FLAGS_SHUTDOWN_SEND != 0
                {
                    return Err(unexpected);
                }
                self.push_guest_data(data)
            }
            VSOCK_OP_CREDIT_UPDATE => Ok(()),
            VSOCK_OP_CREDIT_REQUEST => {
                self.pending |= pending::CREDIT_UPDATE;
                Ok(())
            }
            VSOCK_OP_SHUTDOWN => {
                if !matches!(self.state, ConnState::Established | ConnState::LocalClosed) {
                    return Err(unexpected);
                }
                self.peer_shutdown |= hdr.flags & VSOCK_FLAGS_SHUTDOWN_BOTH;
                if self.peer_shutdown == VSOCK_FLAGS_SHUTDOWN_BOTH
                    || self.state == ConnState::LocalClosed
                {
                    // Both sides are done: flush what the host has not read, then reset.
                    self.state = ConnState::PeerClosed;
                    self.pending &= !pending::RW;
                }
                self.after_flush();
                Ok(())
            }
            _ => Err(unexpected),
        }
    }

    /// Accepts guest data, writing straight to the host stream when nothing is queued.
    fn push_guest_data(&mut self, data: &[u8]) -> Result<(), ConnectionError> {
        let free = CONN_TX_BUF_SIZE as usize - self.tx_buf.len();
        if data.len() > free {
            return Err(ConnectionError::CreditExceeded {
                len: data.len(),
                free,
            });
        }
        self.recv_cnt += data.len() as u32;
        let mut written = 0;
        if self.tx_buf.is_empty() {
            written = match self.write_host(data) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(ConnectionError::Stream(e)),
            };
            self.fwd_cnt += written as u32;
        }
        self.tx_buf.extend(&data[written..]);
        self.check_credit_update();
        Ok(())
    }

    fn write_host(&self, buf: &[u8]) -> io::Result<usize> {
        // MSG_NOSIGNAL: a host client that went away must not kill us with SIGPIPE.
        send(self.stream.as_raw_fd(), buf, MsgFlags::MSG_NOSIGNAL).map_err(io::Error::from)
    }

    /// Writes as much buffered guest data to the host stream as it takes.
    fn flush(&mut self) -> Result<(), ConnectionError> {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.write_host(front) {
                Ok(0) => break,
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += n as u32;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(ConnectionError::Stream(e)),
            }
        }
        if self.tx_buf.is_empty() {
            // Give back the memory of a buffer a slow reader made grow.
            self.tx_buf.shrink_to(0);
        }
        self.check_credit_update();
        self.after_flush();
        Ok(())
    }

    /// Acts on guest shutdowns once everything before them reached the host.
    fn after_flush(&mut self) {
        if !self.tx_buf.is_empty() {
            return;
        }
        if self.peer_shutdown & VSOCK_FLAGS_SHUTDOWN_SEND != 0 {
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        if self.state == ConnState::PeerClosed {
            debug!(
                "vsock: connection {}:{} closed",
                self.local_port, self.peer_port
            );
            self.kill();
        }
    }

    /// Queues a credit update if the guest may be running out of credit and we have
    /// freed space it does not know about.
    fn check_credit_update(&mut self) {
        let peer_view_free =
            CONN_TX_BUF_SIZE.saturating_sub((self.recv_cnt - self.last_fwd_cnt_sent).0);
        if self.fwd_cnt != self.last_fwd_cnt_sent && peer_view_free < CREDIT_UPDATE_THRESHOLD {
            self.pending |= pending::CREDIT_UPDATE;
        }
    }

    /// Handles readiness of the host stream.
    pub fn notify(&mut self, evset: EventSet) -> Result<(), ConnectionError> {
        if evset.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            self.host_hup = true;
            if self.state == ConnState::LocalInit {
                // The client gave up before the guest answered.
                self.kill();
                return Ok(());
            }
            // Read what is left; the read of EOF produces our OP_SHUTDOWN.
            if self.wants_host_data() {
                self.pending |= pending::RW;
            }
        }
        if evset.contains(EventSet::IN) && self.wants_host_data() {
            self.pending |= pending::RW;
        }
        if evset.contains(EventSet::OUT) {
            self.flush()?;
        }
        Ok(())
    }

    fn wants_host_data(&self) -> bool {
        self.state == ConnState::Established
            && self.local_shutdown & VSOCK_FLAGS_SHUTDOWN_SEND == 0
            && self.peer_shutdown & VSOCK_FLAGS_SHUTDOWN_RCV == 0
    }

    /// The events the muxer should poll the host stream for.
    pub fn desired_events(&self) -> EventSet {
        let mut ev = EventSet::empty();
        if self.state == ConnState::Killed {
            return ev;
        }
        // Wait for the guest to take what we already read before reading more, and
        // for credit before reading at all: the guest paces the host.
        if self.wants_host_data() && self.pending & pending::RW == 0 && self.peer_credit() > 0 {
            ev |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            ev |= EventSet::OUT;
        }
        ev
    }

    /// The host stream hung up; epoll would report it forever, so stop polling it.
    pub fn host_hup(&self) -> bool {
        self.host_hup
    }

    /// With the stream out of epoll after a hang-up, keep reading what is left (up to
    /// EOF) whenever the guest has credit.
    pub fn poll_after_hup(&mut self) {
        if self.wants_host_data() && self.peer_credit() > 0 {
            self.pending |= pending::RW;
        }
    }

    /// Gives up on the current state after its deadline passed.
    pub fn expire(&mut self) {
        debug!(
            "vsock: connection {}:{} timed out in state {:?}",
            self.local_port, self.peer_port, self.state
        );
        self.kill();
    }

    /// Produces the next packet for the guest, reading host data into `buf` for
    /// `OP_RW`. Returns `None` if nothing is ready after all.
    pub fn recv_pkt(&mut self, buf: &mut [u8]) -> Option<RxPacket> {
        let (op, flags, len) = self.next_rx(buf)?;
        // Every header carries our credit, so this doubles as a credit update.
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending &= !pending::CREDIT_UPDATE;
        self.sent_cnt += len as u32;
        Some(RxPacket {
            op,
            flags,
            len,
            buf_alloc: CONN_TX_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        })
    }

    fn next_rx(&mut self, buf: &mut [u8]) -> Option<(u16, u32, usize)> {
        if self.pending & pending::RST != 0 {
            self.pending = 0;
            return Some((VSOCK_OP_RST, 0, 0));
        }
        if self.pending & pending::REQUEST != 0 {
            self.pending &= !pending::REQUEST;
            return Some((VSOCK_OP_REQUEST, 0, 0));
        }
        if self.pending & pending::RESPONSE != 0 {
            self.pending &= !pending::RESPONSE;
            self.state = ConnState::Established;
            return Some((VSOCK_OP_RESPONSE, 0, 0));
        }
        if self.pending & pending::RW != 0 {
            self.pending &= !pending::RW;
            if let Some(pkt) = self.read_host(buf) {
                return Some(pkt);
            }
        }
        if self.pending & pending::CREDIT_UPDATE != 0 {
            return Some((VSOCK_OP_CREDIT_UPDATE, 0, 0));
        }
        None
    }

    fn read_host(&mut self, buf: &mut [u8]) -> Option<(u16, u32, usize)> {
        let max = buf.len().min(self.peer_credit());
        if !self.wants_host_data() || max == 0 {
            return None;
        }
        match (&self.stream).read(&mut buf[..max]) {
            Ok(0) => {
                // The host closed its write side. If it hung up entirely it cannot
                // receive either, so the connection is over once the guest agrees.
                self.local_shutdown |= VSOCK_FLAGS_SHUTDOWN_SEND;
                if self.host_hup {
                    self.local_shutdown |= VSOCK_FLAGS_SHUTDOWN_RCV;
                    self.state = ConnState::LocalClosed;
                    self.tx_buf = VecDeque::new();
                }
                trace!(
                    "vsock: host side of {}:{} shut down (flags {})",
                    self.local_port,
                    self.peer_port,
                    self.local_shutdown
                );
                Some((VSOCK_OP_SHUTDOWN, self.local_shutdown, 0))
            }
            Ok(n) => Some((VSOCK_OP_RW, 0, n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => {
                debug!("vsock: read from host stream failed: {e}");
                self.kill();
                self.pending = 0;
                Some((VSOCK_OP_RST, 0, 0))
            }
        }
    }
}
