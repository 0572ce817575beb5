//! Fuzz entry points for what the host sends the guest, as the guest parses it: every
//! request message, the OCI spec and process in them and how the agent reads them
//! (mount options, paths joined under the root, the seccomp profile compiled), the
//! stdio stream header and the port-forward request. `tests/fuzz_smoke.rs` runs them on
//! stable in every `cargo test`; `make fuzz` runs a million inputs each. None may panic:
//! a bad request is an error for that call only.
//!
//! In confidential mode the host is the attacker; otherwise this is the agent's own
//! robustness, and a malformed request must never take PID 1 (and the VM) down.

use std::path::Path;

use cocoon_protocol::agent as pb;
use protobuf::Message;

/// A fuzz entry point: any bytes, never a panic.
pub type Target = fn(&[u8]);

/// Every target, by name.
pub const TARGETS: &[(&str, Target)] = &[
    ("request_messages", request_messages),
    ("oci_spec", oci_spec),
    ("oci_process", oci_process),
    ("stdio_header", stdio_header),
    ("forward_request", forward_request),
    ("interface", interface),
];

/// The first byte picks a request type; the rest is its wire bytes.
pub fn request_messages(data: &[u8]) {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    match kind % 10 {
        0 => {
            if let Ok(r) = pb::CreateContainerRequest::parse_from_bytes(body) {
                oci_spec(&r.oci_spec_json);
                for s in &r.storages {
                    let _ = crate::runtime::mounts::parse_options(&s.options);
                }
            }
        }
        1 => {
            if let Ok(r) = pb::ExecProcessRequest::parse_from_bytes(body) {
                oci_process(&r.process_json);
            }
        }
        2 => {
            let _ = pb::SignalProcessRequest::parse_from_bytes(body);
        }
        3 => {
            let _ = pb::UpdateContainerRequest::parse_from_bytes(body);
        }
        4 => {
            if let Ok(r) = pb::UpdateInterfaceRequest::parse_from_bytes(body) {
                let _ = crate::network::parse_mac(&r.current_hw_addr);
                if let Some(i) = r.interface.as_ref() {
                    let _ = crate::network::parse_mac(&i.hw_addr);
                    for a in &i.addresses {
                        let prefix = format!("{}/{}", a.address, a.prefix_len);
                        let _ = crate::network::parse_prefix(&prefix);
                    }
                }
            }
        }
        5 => {
            let _ = pb::UpdateRoutesRequest::parse_from_bytes(body);
        }
        6 => {
            let _ = pb::CreateSandboxRequest::parse_from_bytes(body);
        }
        7 => {
            let _ = pb::TtyWinResizeRequest::parse_from_bytes(body);
        }
        8 => {
            let _ = pb::RemoveContainerRequest::parse_from_bytes(body);
        }
        _ => {
            let _ = pb::SetDnsRequest::parse_from_bytes(body);
        }
    }
}

/// The OCI spec of a CreateContainer, and the parts of it the agent interprets before
/// any side effect.
pub fn oci_spec(data: &[u8]) {
    let Ok(spec) = serde_json::from_slice::<oci_spec::runtime::Spec>(data) else {
        return;
    };
    for m in spec.mounts().iter().flatten() {
        if let Some(opts) = m.options() {
            let _ = crate::runtime::mounts::parse_options(opts);
            for o in opts {
                let _ = crate::runtime::mounts::propagation_flags(o);
            }
        }
        let _ = crate::runtime::mounts::secure_join(Path::new("/rootfs"), m.destination());
    }
    if let Some(seccomp) = spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
        let _ = crate::runtime::seccomp::compile(seccomp);
    }
}

/// The OCI process of an ExecProcess.
pub fn oci_process(data: &[u8]) {
    let _ = serde_json::from_slice::<oci_spec::runtime::Process>(data);
}

/// A stdio stream's header line.
pub fn stdio_header(data: &[u8]) {
    let _ = crate::stdio::parse_header(data);
}

/// A port-forward request line.
pub fn forward_request(data: &[u8]) {
    let _ = crate::portfwd::parse_request(data);
}

/// An interface's MAC and addresses as text.
pub fn interface(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = crate::network::parse_mac(&text);
    let _ = crate::network::parse_prefix(&text);
}
