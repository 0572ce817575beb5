//! A container's own network namespace gets the guest's first namespace's TCP limits.
//!
//! The host boots the guest with its own values of these (the shim's `host_sysctls`),
//! but they are set in the guest's first network namespace only, and a new namespace
//! computes `tcp_max_tw_buckets` and `tcp_max_syn_backlog` again from the guest's small
//! TCP hash (1 024 and 128 in a 256 MiB guest, where a host gives 131 072 and 2 048).
//! A container on runc in a new namespace reads the host's, so the runtime helper
//! writes the same values once the namespace exists, before the spec's own sysctls (so
//! a value the spec names wins). Unlike the spec's, they are best-effort: a container
//! without a writable `/proc` of its own still starts.

use std::path::Path;

use oci_spec::runtime::{LinuxNamespaceType, Spec};

/// The guest's values (read under `proc_sys`) of `NETNS_COPIED_SYSCTLS`, for a spec
/// that makes a new network namespace; none for one that joins or shares one.
pub fn for_new_netns(spec: &Spec, proc_sys: &Path) -> Vec<(String, String)> {
    let new_netns = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .into_iter()
        .flatten()
        .any(|n| n.typ() == LinuxNamespaceType::Network && n.path().is_none());
    if !new_netns {
        return Vec::new();
    }
    cocoon_protocol::NETNS_COPIED_SYSCTLS
        .iter()
        .filter_map(|name| {
            let path = proc_sys.join(name.replace('.', "/"));
            match std::fs::read_to_string(&path) {
                Ok(value) => Some((name.to_string(), value.trim().to_string())),
                Err(e) => {
                    tracing::debug!("{name} not copied into the new netns: {e}");
                    None
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(namespaces: serde_json::Value, sysctl: serde_json::Value) -> Spec {
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "linux": {"namespaces": namespaces, "sysctl": sysctl}
        }))
        .unwrap()
    }

    #[test]
    fn a_new_netns_gets_the_guests_values() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("net/ipv4")).unwrap();
        std::fs::write(dir.path().join("net/ipv4/tcp_max_tw_buckets"), "131072\n").unwrap();
        std::fs::write(dir.path().join("net/ipv4/tcp_max_syn_backlog"), "2048\n").unwrap();

        let own = serde_json::json!([{"type": "network"}, {"type": "pid"}]);
        let got = for_new_netns(&spec(own, serde_json::json!({})), dir.path());
        assert_eq!(
            got,
            [
                (
                    "net.ipv4.tcp_max_tw_buckets".to_string(),
                    "131072".to_string()
                ),
                (
                    "net.ipv4.tcp_max_syn_backlog".to_string(),
                    "2048".to_string()
                )
            ]
        );
        // Joining a namespace (a CRI pod's, another container's) or having none of its
        // own: nothing.
        let joined = serde_json::json!([{"type": "network", "path": "/proc/1/ns/net"}]);
        for namespaces in [joined, serde_json::json!([{"type": "pid"}])] {
            assert!(for_new_netns(&spec(namespaces, serde_json::json!({})), dir.path()).is_empty());
        }
    }
}
