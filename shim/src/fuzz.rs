//! Fuzz entry points for what the guest sends the host, as the shim reads it: every
//! agent reply (decoded, then used as the shim uses it: stats converted for
//! containerd, OOM events filtered), the vsock backend's handshake reply, and the
//! operator's config. The guest is hostile: a reply must be an error for that call
//! only, never a panic of the shim (which would end the pod for every container in it).
//! `tests/fuzz_smoke.rs` runs them on stable in every `cargo test`; `make fuzz` runs a
//! million inputs each.

use cocoon_protocol::agent as pb;
use protobuf::Message;

use crate::agent_reply::Bounded;

/// A fuzz entry point: any bytes, never a panic.
pub type Target = fn(&[u8]);

/// Every target, by name.
pub const TARGETS: &[(&str, Target)] = &[
    ("agent_replies", agent_replies),
    ("vsock_reply", vsock_reply),
    ("config", config),
];

/// Decodes `body` as `T` and checks it against the shim's bounds, as every call does.
fn decoded<T: Message + Bounded>(body: &[u8]) -> Option<T> {
    let r = T::parse_from_bytes(body).ok()?;
    r.check().ok().map(|()| r)
}

/// The first byte picks a reply type; the rest is its wire bytes.
pub fn agent_replies(data: &[u8]) {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    match kind % 12 {
        0 => {
            if let Some(r) = decoded::<pb::StatsContainerResponse>(body) {
                let _ = crate::shimv2::metrics::to_cgroups_v2(&r);
            }
        }
        1 => {
            if let Some(e) = decoded::<pb::OomEvent>(body) {
                let mut filter = crate::shimv2::guest_events::OomFilter::default();
                let live = ["c1".to_string()];
                for _ in 0..8 {
                    let _ = filter.admit(&e.container_id, live.iter(), std::time::Instant::now());
                }
            }
        }
        2 => drop(decoded::<pb::CreateContainerResponse>(body)),
        3 => drop(decoded::<pb::ExecProcessResponse>(body)),
        4 => drop(decoded::<pb::WaitProcessResponse>(body)),
        5 => drop(decoded::<pb::ListPidsResponse>(body)),
        6 => drop(decoded::<pb::GuestDetailsResponse>(body)),
        7 => drop(decoded::<pb::Interface>(body)),
        8 => drop(decoded::<pb::Interfaces>(body)),
        9 => drop(decoded::<pb::Routes>(body)),
        10 => drop(decoded::<pb::GetEvidenceResponse>(body)),
        _ => drop(decoded::<pb::VersionCheckResponse>(body)),
    }
    // An error's text, as the shim keeps it.
    let _ = crate::agent_reply::error_message(&String::from_utf8_lossy(body));
}

/// The vsock backend's reply line to `CONNECT`.
pub fn vsock_reply(data: &[u8]) {
    let _ = crate::vsock::parse_reply(data, 1024);
}

/// The operator's config file.
pub fn config(data: &[u8]) {
    let _ = crate::config::Config::parse(&String::from_utf8_lossy(data));
}
