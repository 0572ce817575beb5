//! A container's own network namespace gets the guest's first namespace's TCP limits.
//!
//! The host boots the guest with its own values of these (the shim's `host_sysctls`),
//! but they are set in the guest's first network namespace only, and a new namespace
//! computes `tcp_max_tw_buckets` and `tcp_max_syn_backlog` again from the guest's small
//! TCP hash (1 024 and 128 in a 256 MiB guest, where a host gives 131 072 and 2 048).
//! A container on runc in a new namespace reads the host's, so the same values go into
//! the spec's sysctls here, for the runtime helper to write once the namespace exists.
//! A value the spec names itself wins.

use std::path::Path;

use oci_spec::runtime::{LinuxNamespaceType, Spec};

/// Adds the guest's values (read under `proc_sys`) of `NETNS_COPIED_SYSCTLS` to a spec
/// that makes a new network namespace and does not name them.
pub fn copy_into_new_netns(spec: &mut Spec, proc_sys: &Path) {
    let Some(linux) = spec.linux_mut() else {
        return;
    };
    let new_netns = linux
        .namespaces()
        .iter()
        .flatten()
        .any(|n| n.typ() == LinuxNamespaceType::Network && n.path().is_none());
    if !new_netns {
        return;
    }
    let mut sysctls = linux.sysctl().clone().unwrap_or_default();
    for name in cocoon_protocol::NETNS_COPIED_SYSCTLS {
        if sysctls.contains_key(*name) {
            continue;
        }
        let path = proc_sys.join(name.replace('.', "/"));
        match std::fs::read_to_string(&path) {
            Ok(value) => {
                sysctls.insert(name.to_string(), value.trim().to_string());
            }
            Err(e) => tracing::debug!("{name} not copied into the new netns: {e}"),
        }
    }
    linux.set_sysctl(Some(sysctls));
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

    fn sysctls(spec: &Spec) -> std::collections::HashMap<String, String> {
        spec.linux()
            .as_ref()
            .unwrap()
            .sysctl()
            .clone()
            .unwrap_or_default()
    }

    #[test]
    fn a_new_netns_gets_the_guests_values_and_the_spec_wins() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("net/ipv4")).unwrap();
        std::fs::write(dir.path().join("net/ipv4/tcp_max_tw_buckets"), "131072\n").unwrap();
        std::fs::write(dir.path().join("net/ipv4/tcp_max_syn_backlog"), "2048\n").unwrap();

        let own = serde_json::json!([{"type": "network"}, {"type": "pid"}]);
        let mut s = spec(own.clone(), serde_json::json!({}));
        copy_into_new_netns(&mut s, dir.path());
        let got = sysctls(&s);
        assert_eq!(got["net.ipv4.tcp_max_tw_buckets"], "131072");
        assert_eq!(got["net.ipv4.tcp_max_syn_backlog"], "2048");

        let named = serde_json::json!({"net.ipv4.tcp_max_syn_backlog": "64"});
        let mut s = spec(own, named);
        copy_into_new_netns(&mut s, dir.path());
        assert_eq!(sysctls(&s)["net.ipv4.tcp_max_syn_backlog"], "64");

        // Joining a namespace (a CRI pod's, another container's) or having none of its
        // own: nothing added.
        let joined = serde_json::json!([{"type": "network", "path": "/proc/1/ns/net"}]);
        for namespaces in [joined, serde_json::json!([{"type": "pid"}])] {
            let mut s = spec(namespaces, serde_json::json!({}));
            copy_into_new_netns(&mut s, dir.path());
            assert!(sysctls(&s).is_empty());
        }
    }
}
