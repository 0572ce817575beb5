//! Cocoon's VMM. `cocoon-vmm` runs one microVM per process on KVM: guest memory
//! ([`vstate`]), x86_64 boot ([`arch`]), legacy and virtio-mmio devices ([`devices`]),
//! built from a validated [`config`] by [`builder`] and driven by [`vmm`]. The
//! virtio-vsock device model with its hybrid Unix-socket host side ([`vsock`]) is also
//! served to QEMU as a vhost-user backend ([`vhost_user_vsock`]).

pub mod api_conn;
pub mod api_socket;
pub mod arch;
pub mod builder;
pub mod choice;
pub mod config;
pub mod devices;
#[doc(hidden)]
pub mod fuzz;
pub mod jail;
pub mod jail_exec;
pub mod logging;
pub mod pid_ns;
pub mod seccomp;
pub mod snp;
pub mod tdx;
pub mod vhost_user_vsock;
pub mod vmm;
pub mod vsock;
pub mod vstate;
