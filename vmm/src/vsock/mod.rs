//! virtio-vsock (virtio spec v1.2 §5.10): the device model that moves packets between the
//! guest's virtqueues and a [`VsockBackend`], and the hybrid Unix-socket backend
//! ([`VsockMuxer`]) that bridges guest stream connections to host Unix sockets.
//!
//! The device is independent of the transport: the vhost-user backend
//! (`crate::vhost_user_vsock`) drives it today, an in-process virtio-mmio device can later.
//!
//! Log levels: `error` the device cannot go on; `warn` a misbehaving guest or host client
//! (rate-limited, as a guest can trigger it at will); `info` lifecycle; `debug` connection
//! events; `trace` per packet.

pub mod connection;
pub mod defs;
pub mod device;
pub mod muxer;
pub mod packet;

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Duration;

pub use device::{DeviceError, VsockDevice, VsockStats};
pub use muxer::{MuxerError, VsockMuxer};
pub use packet::{PacketError, VsockHeader};

/// The host end of the device: consumes the guest's packets and produces packets for it.
///
/// The device has already checked what it can see in the header (addresses and length);
/// the backend owns the connection semantics. `as_raw_fd` is polled for readability by
/// whoever runs the device; when it fires, call [`VsockBackend::process_host_events`] and
/// then fill the rx queue.
pub trait VsockBackend: AsRawFd + Send {
    /// Handles one packet from the guest; `payload` holds exactly `hdr.len` bytes.
    fn send_pkt(&mut self, hdr: &VsockHeader, payload: &[u8]);
    /// Produces the next packet for the guest with at most `payload.len()` payload bytes
    /// written to `payload`; the returned header's `len` says how many.
    fn recv_pkt(&mut self, payload: &mut [u8]) -> Option<VsockHeader>;
    /// Whether `recv_pkt` may have something (it may still return `None`).
    fn has_pending_rx(&self) -> bool;
    /// Handles whatever is ready on the host side, without blocking.
    fn process_host_events(&mut self);
    /// Makes `as_raw_fd` readable, so that whoever runs the device comes back: a pass
    /// over a queue stopped at its budget with work left that no kick will announce.
    /// [`VsockBackend::process_host_events`] clears it.
    fn wake(&self);
}

/// Errors in a [`VsockConfig`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("Invalid guest_cid {0}: it must be between 3 and 4294967294")]
    GuestCid(u64),
    #[error("Invalid uds_path: it must not be empty")]
    EmptyUdsPath,
    #[error("Invalid max_connections: it must be at least 1")]
    MaxConnections,
    #[error("Invalid connect_timeout: it must be non-zero")]
    ConnectTimeout,
}

/// What a vsock device needs to know about its host side.
#[derive(Clone, Debug)]
pub struct VsockConfig {
    /// The guest's CID, exposed in the device config space.
    pub guest_cid: u64,
    /// Host clients connect here; guest connections to port P go to `<uds_path>_P`.
    pub uds_path: PathBuf,
    /// How long the guest has to answer a host connection, a host client to send its
    /// `CONNECT` line, and a closing connection to finish.
    pub connect_timeout: Duration,
    /// Live connections plus host clients still sending `CONNECT`.
    pub max_connections: usize,
    /// An inherited socket already listening at `uds_path`, to accept host clients on
    /// instead of binding one: a backend jailed as an unprivileged uid cannot create
    /// sockets in the root-owned directory its clients trust.
    pub listener_fd: Option<std::os::fd::RawFd>,
}

impl VsockConfig {
    /// A configuration with the default CID, timeout and connection limit.
    pub fn new(uds_path: impl Into<PathBuf>) -> Self {
        Self {
            guest_cid: defs::DEFAULT_GUEST_CID,
            uds_path: uds_path.into(),
            connect_timeout: defs::DEFAULT_CONNECT_TIMEOUT,
            max_connections: defs::DEFAULT_MAX_CONNECTIONS,
            listener_fd: None,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(defs::MIN_GUEST_CID..=defs::MAX_GUEST_CID).contains(&self.guest_cid) {
            return Err(ConfigError::GuestCid(self.guest_cid));
        }
        if self.uds_path.as_os_str().is_empty() {
            return Err(ConfigError::EmptyUdsPath);
        }
        if self.max_connections == 0 {
            return Err(ConfigError::MaxConnections);
        }
        if self.connect_timeout.is_zero() {
            return Err(ConfigError::ConnectTimeout);
        }
        Ok(())
    }
}

pub(crate) use crate::logging::LogLimiter;

/// `warn!` through a [`LogLimiter`].
macro_rules! warn_limited {
    ($limiter:expr, $($arg:tt)+) => {
        if $limiter.allow() {
            log::warn!($($arg)+);
        }
    };
}
pub(crate) use warn_limited;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_rejects_reserved_cids_and_empty_values() {
        let mut cfg = VsockConfig::new("/tmp/x");
        assert!(cfg.validate().is_ok());
        cfg.guest_cid = 2;
        assert!(matches!(cfg.validate(), Err(ConfigError::GuestCid(2))));
        cfg.guest_cid = u64::from(u32::MAX);
        assert!(cfg.validate().is_err());
        cfg = VsockConfig::new("");
        assert!(matches!(cfg.validate(), Err(ConfigError::EmptyUdsPath)));
    }
}
