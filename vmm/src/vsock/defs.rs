//! Constants of the virtio-vsock device (virtio spec v1.2 §5.10) and the limits this
//! implementation puts on what an untrusted guest can make us hold.

use std::time::Duration;

/// Virtio device id of a socket device (§5, "Device ID" table).
pub const VIRTIO_ID_VSOCK: u32 = 19;

/// Virtqueue indices (§5.10.2).
pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
pub const EVENT_QUEUE: u16 = 2;
pub const NUM_QUEUES: usize = 3;

/// Well-known CIDs (§5.10.4): 0 and 1 are reserved, 2 is the host.
pub const VSOCK_HOST_CID: u64 = 2;
/// Smallest CID a guest may use (§5.10.4).
pub const MIN_GUEST_CID: u64 = 3;
/// Linux treats `u32::MAX` as `VMADDR_CID_ANY`; a guest cannot have it.
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;
/// CID handed to the guest when none is configured.
pub const DEFAULT_GUEST_CID: u64 = 3;

/// Size of `struct virtio_vsock_hdr` (§5.10.6): packed, little endian.
pub const VSOCK_HDR_SIZE: usize = 44;
/// Size of `struct virtio_vsock_config` (§5.10.4): one le64 `guest_cid`.
pub const VSOCK_CONFIG_SIZE: usize = 8;

/// Socket types (§5.10.6).
pub const VSOCK_TYPE_STREAM: u16 = 1;

/// Operations (§5.10.6).
pub const VSOCK_OP_REQUEST: u16 = 1;
pub const VSOCK_OP_RESPONSE: u16 = 2;
pub const VSOCK_OP_RST: u16 = 3;
pub const VSOCK_OP_SHUTDOWN: u16 = 4;
pub const VSOCK_OP_RW: u16 = 5;
pub const VSOCK_OP_CREDIT_UPDATE: u16 = 6;
pub const VSOCK_OP_CREDIT_REQUEST: u16 = 7;

/// `flags` of `VSOCK_OP_SHUTDOWN` (§5.10.6.5).
pub const VSOCK_FLAGS_SHUTDOWN_RCV: u32 = 1;
pub const VSOCK_FLAGS_SHUTDOWN_SEND: u32 = 2;
pub const VSOCK_FLAGS_SHUTDOWN_BOTH: u32 = VSOCK_FLAGS_SHUTDOWN_RCV | VSOCK_FLAGS_SHUTDOWN_SEND;

/// Largest payload accepted in or produced for one packet. Linux never sends more
/// (`VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`); a larger `len` from the guest is malformed.
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;

/// Receive buffer we advertise per connection (`buf_alloc`, §5.10.6.3). The guest must not
/// have more unacknowledged bytes in flight towards us, so it also caps the per-connection
/// buffer of guest data not yet written to the host socket.
pub const CONN_TX_BUF_SIZE: u32 = 256 * 1024;

/// Send an unsolicited `OP_CREDIT_UPDATE` once the guest's view of our free buffer space
/// drops below this and we have freed space since the last update.
pub const CREDIT_UPDATE_THRESHOLD: u32 = MAX_PKT_PAYLOAD as u32;

/// Default for how long a host-initiated connection waits for the guest's `OP_RESPONSE`,
/// a host client has to send its `CONNECT` line, and a closing connection waits for the
/// final `OP_RST` or for its buffer to drain.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Default limit on live connections plus host clients still sending `CONNECT`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// Longest accepted `CONNECT <port>\n` line, newline included.
pub const MAX_CONNECT_LINE: usize = 32;

/// `OP_RST` replies to packets without a connection that may wait for rx buffers;
/// beyond this they are dropped (the guest times out on its own).
pub const MAX_PENDING_RST: usize = 1024;

/// First local port handed out to host-initiated connections; high to stay clear of
/// ports that guest-initiated connections name.
pub const FIRST_EPHEMERAL_HOST_PORT: u32 = 1 << 30;
