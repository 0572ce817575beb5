//! The host side of Cocoon: configuration, host checks, launching pod VMs on a
//! hypervisor backend, and talking to the guest agent over hybrid vsock.
//!
//! Log levels (tracing): `error` — an operation failed and a user sees it;
//! `warn` — something degraded but went on (a fallback, a cleanup retry);
//! `info` — one line per lifecycle step of a VM; `debug` — command lines,
//! timings, protocol detail; `trace` — per-message noise.

pub mod agent_client;
pub mod agent_reply;
pub mod bench;
pub mod bench_run;
pub mod bench_vmm;
pub mod check;
pub mod config;
pub mod consolelog;
pub mod debugconsole;
pub mod fuzz;
pub mod hostcgroup;
pub mod hypervisor;
pub mod nodemetrics;
pub mod podnet;
pub mod portfwd;
pub mod ready;
pub mod shimv2;
pub mod telemetry;
pub mod vsock;
