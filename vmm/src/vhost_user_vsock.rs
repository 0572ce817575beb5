//! The vsock device as a vhost-user backend process, for QEMU's
//! `vhost-user-vsock-device`. The frontend owns the virtqueues' memory and notifications;
//! we run [`VsockDevice`] over them with the hybrid Unix-socket [`VsockMuxer`] as host side.
//! The muxer's epoll fd is watched by the daemon's worker thread, so everything runs on
//! that one thread.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use log::{error, info};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::vsock::defs::{EVENT_QUEUE, NUM_QUEUES, RX_QUEUE, TX_QUEUE, VSOCK_CONFIG_SIZE};
use crate::vsock::muxer::remove_stale_socket;
use crate::vsock::{
    ConfigError, DeviceError, MuxerError, VsockBackend, VsockConfig, VsockDevice, VsockMuxer,
};

/// Largest virtqueue we accept from the frontend.
pub const MAX_QUEUE_SIZE: usize = 1024;

/// Epoll id of the muxer's fd in the daemon's event loop; ids up to `NUM_QUEUES` are the
/// daemon's own (queues and exit event).
pub const BACKEND_EVENT: u16 = NUM_QUEUES as u16 + 1;

/// Errors of the vhost-user vsock backend.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserVsockError {
    #[error("Invalid vsock configuration")]
    Config(#[from] ConfigError),
    #[error("Failed to set up the host side")]
    Muxer(#[from] MuxerError),
    #[error("Failed to create the exit event")]
    ExitEvent(#[source] io::Error),
    #[error("Failed to register the host side with the event loop")]
    RegisterListener(#[source] io::Error),
    #[error("Vhost-user daemon failed")]
    Daemon(#[source] DaemonError),
    #[error("Failed to process the {0} queue")]
    Queue(&'static str, #[source] DeviceError),
    #[error("Failed to jail the backend (--jail off to run without)")]
    Jail(#[from] crate::jail::JailError),
    #[error("Failed to install the backend's seccomp filter")]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("Failed to listen for the frontend")]
    Listen(#[source] vhost::vhost_user::Error),
    #[error("--socket-fd {0} is not an inherited descriptor (it must be above 2)")]
    SocketFd(RawFd),
}

/// `vhost_user_backend::Error` implements neither `std::error::Error` nor `Sync` (it can
/// hold a thread's panic payload); this carries its message.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DaemonError(String);

impl From<vhost_user_backend::Error> for DaemonError {
    fn from(e: vhost_user_backend::Error) -> Self {
        Self(e.to_string())
    }
}

pub struct VhostUserVsockBackend {
    device: VsockDevice<VsockMuxer>,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    event_idx: bool,
    exit_consumer: EventConsumer,
    exit_notifier: EventNotifier,
}

impl VhostUserVsockBackend {
    /// Validates `config` and starts listening on its `uds_path`.
    pub fn new(config: VsockConfig) -> Result<Self, VhostUserVsockError> {
        config.validate()?;
        let guest_cid = config.guest_cid;
        let muxer = VsockMuxer::new(config)?;
        let (exit_consumer, exit_notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
                .map_err(VhostUserVsockError::ExitEvent)?;
        Ok(Self {
            device: VsockDevice::new(guest_cid, muxer),
            mem: None,
            event_idx: false,
            exit_consumer,
            exit_notifier,
        })
    }

    pub fn device(&self) -> &VsockDevice<VsockMuxer> {
        &self.device
    }

    /// The fd to watch with id [`BACKEND_EVENT`].
    pub fn backend_fd(&self) -> std::os::fd::RawFd {
        self.device.backend().as_raw_fd()
    }

    /// Whether the frontend negotiated `VIRTIO_RING_F_EVENT_IDX`.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    fn process_queue(
        &mut self,
        vrings: &[VringRwLock],
        index: u16,
    ) -> Result<(), VhostUserVsockError> {
        let Some(atomic) = &self.mem else {
            return Ok(());
        };
        let mem = atomic.memory();
        let Some(vring) = vrings.get(usize::from(index)) else {
            return Ok(());
        };
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return Ok(());
        }
        let notify = if index == TX_QUEUE {
            self.device
                .process_tx(state.get_queue_mut(), &mem)
                .map_err(|e| VhostUserVsockError::Queue("tx", e))?
        } else {
            self.device
                .process_rx(state.get_queue_mut(), &mem)
                .map_err(|e| VhostUserVsockError::Queue("rx", e))?
        };
        if notify {
            if let Err(e) = state.signal_used_queue() {
                error!("vsock: cannot signal the guest: {e}");
            }
        }
        Ok(())
    }
}

impl VhostUserBackendMut for VhostUserVsockBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    /// `struct virtio_vsock_config` (§5.10.4): the little-endian guest CID. Bytes past it
    /// read as zero.
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.device.guest_cid().to_le_bytes();
        let size = (size as usize).min(256);
        (0..size)
            .map(|i| {
                let at = (offset as usize).saturating_add(i);
                if at < VSOCK_CONFIG_SIZE {
                    config[at]
                } else {
                    0
                }
            })
            .collect()
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((
            self.exit_consumer.try_clone().ok()?,
            self.exit_notifier.try_clone().ok()?,
        ))
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        match device_event {
            RX_QUEUE | EVENT_QUEUE => {}
            TX_QUEUE => {
                if let Err(e) = self.process_queue(vrings, TX_QUEUE) {
                    error!("vsock: {e}: {:?}", std::error::Error::source(&e));
                }
            }
            BACKEND_EVENT => {
                self.device.backend_mut().process_host_events();
                // A tx pass that stopped at its budget woke the backend to come back.
                if self.device.tx_backlog() {
                    if let Err(e) = self.process_queue(vrings, TX_QUEUE) {
                        error!("vsock: {e}: {:?}", std::error::Error::source(&e));
                    }
                }
            }
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("unknown vsock event id {other}"),
                ))
            }
        }
        // Whatever happened may have produced packets for the guest.
        if let Err(e) = self.process_queue(vrings, RX_QUEUE) {
            error!("vsock: {e}: {:?}", std::error::Error::source(&e));
        }
        Ok(())
    }
}

/// Removes the sockets this process created when it is done with them.
struct SocketCleanup(Vec<PathBuf>);

impl Drop for SocketCleanup {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Serves one vhost-user frontend on `socket` until it disconnects, then removes the
/// sockets it made (`socket` and `config.uds_path`, unless they were handed over).
///
/// With `socket_fd`, the frontend's listener is that inherited descriptor, already
/// listening at `socket` (the caller made it, in a directory this process may not
/// write). Otherwise `socket` is bound here and appears on disk once the backend is
/// ready to accept the frontend, so a caller can wait for the file before starting QEMU.
/// Either way every listener exists before the seccomp filter goes on, which therefore
/// has no `bind` or `listen`.
///
/// This process parses guest-controlled data, so before anything else (and before any
/// thread exists) it jails itself like the VMM does ([`crate::jail`]): own namespaces,
/// an empty read-only root keeping only the directories of its two sockets, and no
/// capabilities. The frontend hands guest memory over as file descriptors, and host
/// clients arrive on the Unix socket, so nothing else is needed.
pub fn serve(
    socket: &Path,
    socket_fd: Option<RawFd>,
    mut config: VsockConfig,
    jail: crate::jail::JailMode,
) -> Result<(), VhostUserVsockError> {
    // Taken over first, before this process opens descriptors of its own a wrong
    // number could name.
    let inherited = match socket_fd {
        Some(fd) if fd <= 2 => return Err(VhostUserVsockError::SocketFd(fd)),
        Some(fd) => Some(
            crate::vsock::muxer::inherited_listener(fd)
                .map(Listener::from)
                .map_err(|e| {
                    VhostUserVsockError::Listen(vhost::vhost_user::Error::SocketError(e))
                })?,
        ),
        None => None,
    };
    let mut socket = socket.to_path_buf();
    // A self-jailed backend keeps the directory of a socket it binds, only.
    let mut keep_dirs: Vec<&mut PathBuf> = vec![&mut config.uds_path];
    if inherited.is_none() {
        keep_dirs.push(&mut socket);
    }
    if let Some(keep) = crate::jail::prepare(jail, &mut keep_dirs)? {
        crate::jail::enter_as(jail, &keep)?;
    }
    let socket = socket.as_path();
    // Refuse to clobber anything but a stale socket before creating files of our own.
    if socket_fd.is_none() {
        remove_stale_socket(socket)?;
    }
    // An inherited listener's socket is its maker's to remove.
    let mut ours = Vec::new();
    if socket_fd.is_none() {
        ours.push(socket.to_path_buf());
    }
    if config.listener_fd.is_none() {
        ours.push(config.uds_path.clone());
    }
    let backend = VhostUserVsockBackend::new(config)?;
    let _cleanup = SocketCleanup(ours);
    let backend_fd = backend.backend_fd();
    let backend = Arc::new(RwLock::new(backend));
    let mut daemon = VhostUserDaemon::new(
        "cocoon-vsock".to_string(),
        backend,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| VhostUserVsockError::Daemon(e.into()))?;
    let handlers = daemon.get_epoll_handlers();
    for handler in &handlers {
        handler
            .register_listener(backend_fd, EventSet::IN, u64::from(BACKEND_EVENT))
            .map_err(VhostUserVsockError::RegisterListener)?;
    }
    let mut listener = match inherited {
        Some(l) => l,
        None => {
            remove_stale_socket(socket)?;
            Listener::new(socket, false).map_err(VhostUserVsockError::Listen)?
        }
    };
    // Guest data is parsed from here on: only the syscalls the backend needs.
    crate::seccomp::apply_backend()?;
    info!(
        "vhost-user-vsock: waiting for the frontend on {}",
        socket.display()
    );
    let served = daemon.start(&mut listener).and_then(|()| daemon.wait());
    // The workers end with the frontend's connection, whatever ended it.
    for handler in &handlers {
        handler.send_exit_event();
    }
    match served {
        // A frontend that quits (its guest stopped) may leave a message half sent.
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => {
            info!("vhost-user-vsock: frontend disconnected");
            Ok(())
        }
        Err(e) => Err(VhostUserVsockError::Daemon(e.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(dir: &Path) -> VhostUserVsockBackend {
        let mut config = VsockConfig::new(dir.join("v.sock"));
        config.guest_cid = 0x1234_5678;
        VhostUserVsockBackend::new(config).unwrap()
    }

    #[test]
    fn config_space_is_the_little_endian_guest_cid() {
        let dir = tempfile::tempdir().unwrap();
        let b = backend(dir.path());
        assert_eq!(b.get_config(0, 8), 0x1234_5678u64.to_le_bytes());
        assert_eq!(b.get_config(2, 2), [0x34, 0x12]);
        assert_eq!(b.get_config(6, 4), [0, 0, 0, 0]);
        assert_eq!(b.get_config(u32::MAX, 2), [0, 0]);
    }

    #[test]
    fn advertises_the_features_qemu_needs() {
        let dir = tempfile::tempdir().unwrap();
        let b = backend(dir.path());
        assert_eq!(b.num_queues(), 3);
        assert_ne!(b.features() & (1 << VIRTIO_F_VERSION_1), 0);
        assert_ne!(
            b.features() & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            0
        );
        assert!(b
            .protocol_features()
            .contains(VhostUserProtocolFeatures::CONFIG));
    }

    #[test]
    fn invalid_config_is_rejected_before_binding() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = VsockConfig::new(dir.path().join("v.sock"));
        config.guest_cid = 1;
        assert!(matches!(
            VhostUserVsockBackend::new(config),
            Err(VhostUserVsockError::Config(_))
        ));
        assert!(!dir.path().join("v.sock").exists());
    }
}
