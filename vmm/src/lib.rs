//! Cocoon's VMM-side devices. Today: virtio-vsock with a hybrid Unix-socket host side
//! ([`vsock`]), served to QEMU as a vhost-user backend ([`vhost_user_vsock`]).

pub mod vhost_user_vsock;
pub mod vsock;
