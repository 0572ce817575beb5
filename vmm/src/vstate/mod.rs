//! KVM state: the VM file descriptor with its memory slots and in-kernel irqchip
//! ([`vm`]), guest RAM ([`memory`]) and the vCPUs with their run loops ([`vcpu`]).

pub mod memory;
pub mod vcpu;
pub mod vm;
