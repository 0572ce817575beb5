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

/// `e` with its sources, outermost first: what failed and why, down to the errno.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        // thiserror's transparent variants repeat their inner error.
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        next = cause.source();
    }
    s
}
