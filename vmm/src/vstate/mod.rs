//! KVM state: the VM file descriptor with its memory slots and in-kernel irqchip
//! ([`vm`]), guest RAM ([`memory`]), the vCPUs with their run loops ([`vcpu`]) and what
//! those loops count ([`exit_stats`]).

pub mod exit_stats;
pub mod kvm_stats;
pub mod memory;
pub mod ram_file;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
