//! Everything the guest can touch besides RAM: the port-I/O and MMIO buses, the legacy
//! PC devices and the virtio devices with their MMIO transport.

pub mod bus;
pub mod legacy;
pub mod virtio;
