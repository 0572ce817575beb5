//! The Cocoon guest agent's parts, as a library: the binary (`main.rs`) is PID 1 of the
//! pod VM and uses them all; the library exists so that what the host can send the
//! guest is fuzzed (`fuzz`, and `tests/fuzz_smoke.rs` on stable).

pub mod cgroup;
pub mod clock;
pub mod cmdline;
pub mod container;
pub mod cpus;
pub mod debug;
pub mod details;
pub mod devfilter;
pub mod disks;
pub mod fuzz;
pub mod handlers;
pub mod init;
pub mod modules;
pub mod network;
pub mod oomqueue;
pub mod pause;
pub mod policy;
pub mod portfwd;
pub mod power;
pub mod pull;
pub mod reaper;
pub mod reseed;
pub mod runtime;
pub mod sandbox;
pub mod secrets;
pub mod stdio;
pub mod watched;
