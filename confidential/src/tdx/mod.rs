//! Intel TDX: verifying a quote as a relying party does.

pub mod layout;
pub mod verify;
