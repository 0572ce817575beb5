//! Intel TDX: the firmware's layout and MRTD (what a launch measures), the RTMRs a
//! direct boot extends, and verifying a quote as a relying party does.

#[cfg(feature = "verify")]
pub mod layout;
pub mod rtmr;
pub mod tdvf;
#[cfg(feature = "verify")]
pub mod verify;
