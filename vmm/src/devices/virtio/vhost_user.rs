//! A virtio device whose queues are served by a vhost-user backend process
//! (virtiofsd for virtio-fs, or `cocoon-vmm vhost-user-vsock`): the VMM keeps the
//! virtio-mmio transport and config space, shares guest memory (the memfd) with the
//! backend, and turns queue notifications into kick eventfds and the backend's call
//! eventfd into interrupts.

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::defs::TYPE_FS;
use super::VirtioDevice;
use crate::logging::LogLimiter;

/// Errors connecting to a backend.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error("Failed to connect to the vhost-user backend at {0}")]
    Connect(String, #[source] vhost::Error),
    #[error("Vhost-user handshake failed: {0}")]
    Handshake(&'static str, #[source] vhost::Error),
    #[error("Failed to create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("virtio-fs tag {0:?} is empty or longer than 36 bytes")]
    Tag(String),
}

/// §5.11.4: `struct virtio_fs_config`: a 36-byte tag and the request queue count.
pub fn fs_config(tag: &str, request_queues: u32) -> Result<Vec<u8>, VhostUserError> {
    if tag.is_empty() || tag.len() > 36 {
        return Err(VhostUserError::Tag(tag.into()));
    }
    let mut c = vec![0u8; 40];
    c[..tag.len()].copy_from_slice(tag.as_bytes());
    c[36..].copy_from_slice(&request_queues.to_le_bytes());
    Ok(c)
}

pub struct VhostUserDevice {
    device_type: u32,
    frontend: Frontend,
    backend_features: u64,
    protocol: bool,
    config: Vec<u8>,
    queue_sizes: Vec<u16>,
    kicks: Vec<EventFd>,
    /// One call eventfd for every queue: any of them means "look at the used rings".
    call: EventFd,
    active: bool,
    log: LogLimiter,
}

impl VhostUserDevice {
    /// Connects to the backend at `socket` and agrees on protocol features. `config` is
    /// the device config space the guest reads.
    pub fn connect(
        socket: &Path,
        device_type: u32,
        queue_sizes: Vec<u16>,
        config: Vec<u8>,
    ) -> Result<Self, VhostUserError> {
        let hs = |what| move |e| VhostUserError::Handshake(what, e);
        let mut frontend = Frontend::connect(socket, queue_sizes.len() as u64)
            .map_err(|e| VhostUserError::Connect(socket.display().to_string(), e))?;
        frontend.set_owner().map_err(hs("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(hs("GET_FEATURES"))?;
        let protocol = backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        if protocol {
            let offered = frontend
                .get_protocol_features()
                .map_err(hs("GET_PROTOCOL_FEATURES"))?;
            // MQ only: we drive every queue ourselves and read config locally.
            frontend
                .set_protocol_features(offered & VhostUserProtocolFeatures::MQ)
                .map_err(hs("SET_PROTOCOL_FEATURES"))?;
        }
        let kicks = queue_sizes
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<_, _>>()
            .map_err(VhostUserError::EventFd)?;
        Ok(Self {
            device_type,
            frontend,
            backend_features,
            protocol,
            config,
            queue_sizes,
            kicks,
            call: EventFd::new(libc::EFD_NONBLOCK).map_err(VhostUserError::EventFd)?,
            active: false,
            log: LogLimiter::new("vhost-user"),
        })
    }

    /// A virtio-fs device (§5.11) on a virtiofsd socket: one hiprio and one request
    /// queue.
    pub fn fs(socket: &Path, tag: &str, queue_size: u16) -> Result<Self, VhostUserError> {
        Self::connect(socket, TYPE_FS, vec![queue_size; 2], fs_config(tag, 1)?)
    }

    fn hand_over(
        &mut self,
        acked: u64,
        queues: &[Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<(), vhost::Error> {
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.frontend
            .set_features(acked | if self.protocol { protocol_bit } else { 0 })?;
        let regions: Vec<VhostUserMemoryRegionInfo> = mem
            .iter()
            .filter_map(|r| {
                let fo = r.file_offset()?;
                Some(VhostUserMemoryRegionInfo {
                    guest_phys_addr: r.start_addr().0,
                    memory_size: r.len(),
                    userspace_addr: r.as_ptr() as u64,
                    mmap_offset: fo.start(),
                    mmap_handle: fo.file().as_raw_fd(),
                })
            })
            .collect();
        self.frontend.set_mem_table(&regions)?;
        let hva = |a: u64| {
            mem.get_host_address(GuestAddress(a))
                .map(|p| p as u64)
                .map_err(|_| vhost::Error::InvalidGuestMemory)
        };
        for (i, q) in queues.iter().enumerate().filter(|(_, q)| q.ready()) {
            self.frontend.set_vring_num(i, q.size())?;
            let cfg = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: hva(q.desc_table())?,
                used_ring_addr: hva(q.used_ring())?,
                avail_ring_addr: hva(q.avail_ring())?,
                log_addr: None,
            };
            self.frontend.set_vring_addr(i, &cfg)?;
            // Where the ring stands: 0 after a reset, the saved position in a VM
            // restored from a snapshot.
            self.frontend.set_vring_base(i, q.next_avail())?;
            self.frontend.set_vring_call(i, &self.call)?;
            self.frontend.set_vring_kick(i, &self.kicks[i])?;
            if self.protocol {
                self.frontend.set_vring_enable(i, true)?;
            }
        }
        Ok(())
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.device_type
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.backend_features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let start = (offset as usize).min(self.config.len());
        let end = (start + data.len()).min(self.config.len());
        data[..end - start].copy_from_slice(&self.config[start..end]);
    }

    fn activate(
        &mut self,
        acked: u64,
        queues: &[Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<(), String> {
        self.hand_over(acked, queues, mem)
            .map_err(|e| format!("vhost-user backend refused the queues: {e}"))?;
        self.active = true;
        Ok(())
    }

    fn process_queue(&mut self, index: usize, _: &mut [Queue], _: &GuestMemoryMmap) -> bool {
        match self.kicks.get(index) {
            Some(k) if self.active => {
                if let Err(e) = k.write(1) {
                    if self.log.allow() {
                        log::warn!("vhost-user: kick for queue {index} failed: {e}");
                    }
                }
            }
            _ => {}
        }
        // The backend signals completions through the call eventfd.
        false
    }

    fn host_fd(&self) -> Option<RawFd> {
        Some(self.call.as_raw_fd())
    }

    fn process_host(&mut self, _: &mut [Queue], _: &GuestMemoryMmap) -> bool {
        self.call.read().is_ok()
    }

    fn save_queues(&mut self, queues: &mut [virtio_queue::QueueState]) -> Result<bool, String> {
        if !self.active {
            return Ok(false);
        }
        for (i, q) in queues.iter_mut().enumerate().filter(|(_, q)| q.ready) {
            // GET_VRING_BASE stops the ring and says where the backend stands in it;
            // requests complete in order on both devices we serve this way, so the
            // used index is the same.
            let base = self.frontend.get_vring_base(i).map_err(|e| {
                format!("vhost-user backend did not give queue {i}'s position: {e}")
            })?;
            q.next_avail = base as u16;
            q.next_used = base as u16;
        }
        self.active = false;
        Ok(true)
    }

    fn reset(&mut self) {
        if self.active {
            // Stop the backend touching the rings; a later DRIVER_OK hands them over anew.
            for i in 0..self.queue_sizes.len() {
                let _ = self.frontend.get_vring_base(i);
            }
            self.active = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fs_config_layout() {
        let c = fs_config("myfs", 1).unwrap();
        assert_eq!(&c[..4], b"myfs");
        assert_eq!(c[4], 0);
        assert_eq!(&c[36..], &[1, 0, 0, 0]);
        assert!(fs_config("", 1).is_err());
        assert!(fs_config(&"x".repeat(37), 1).is_err());
    }
}
