//! Which of a container's mounts the agent mirrors into the guest so that inotify sees
//! kubelet's updates (the agent's `watched`): kubelet's ConfigMap, Secret, projected
//! and downward-API volumes, which its atomic writer updates in place. kubelet keeps
//! them at `<root>/pods/<uid>/volumes/kubernetes.io~<plugin>/<name>` (its root is
//! `/var/lib/kubelet` unless set otherwise), so they are known by that path, and always
//! mounted read-only. A volume with mount propagation (the host's later mounts reach
//! it), or a writable one, stays shared as it is: a copy would not take its writes.

use oci_spec::runtime::Spec;

/// kubelet's volume plugins whose volumes its atomic writer fills and updates.
const PLUGINS: &[&str] = &[
    "/volumes/kubernetes.io~configmap/",
    "/volumes/kubernetes.io~secret/",
    "/volumes/kubernetes.io~projected/",
    "/volumes/kubernetes.io~downward-api/",
];

/// The destinations of `spec`'s mounts to mirror.
pub fn watched_mounts(spec: &Spec) -> Vec<String> {
    let Some(mounts) = spec.mounts() else {
        return Vec::new();
    };
    mounts
        .iter()
        .filter(|m| {
            let options = m.options().as_deref().unwrap_or_default();
            let bind = m.typ().as_deref() == Some("bind")
                || options.iter().any(|o| o == "bind" || o == "rbind");
            let propagated = options
                .iter()
                .any(|o| matches!(o.as_str(), "shared" | "rshared" | "slave" | "rslave"));
            let source = m
                .source()
                .as_ref()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let read_only = cocoon_protocol::read_only(options);
            bind && read_only && !propagated && PLUGINS.iter().any(|p| source.contains(p))
        })
        .map(|m| m.destination().to_string_lossy().into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelets_configmap_like_volumes_are_watched_and_no_other() {
        let pod = "/var/lib/kubelet/pods/0a1b/volumes";
        let spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/cfg", "type": "bind",
                 "source": format!("{pod}/kubernetes.io~configmap/cfg"), "options": ["rbind", "ro"]},
                {"destination": "/var/run/secrets/kubernetes.io/serviceaccount",
                 "source": format!("{pod}/kubernetes.io~projected/kube-api-access-x"),
                 "options": ["rbind", "rprivate", "ro"]},
                {"destination": "/etc/tls", "type": "bind",
                 "source": format!("{pod}/kubernetes.io~secret/tls"), "options": ["rbind", "rslave"]},
                {"destination": "/data", "type": "bind",
                 "source": format!("{pod}/kubernetes.io~empty-dir/data"), "options": ["rbind"]},
                {"destination": "/rw", "type": "bind",
                 "source": format!("{pod}/kubernetes.io~configmap/cfg"), "options": ["rbind"]},
                {"destination": "/etc/hosts", "type": "bind",
                 "source": "/var/lib/kubelet/pods/0a1b/etc-hosts", "options": ["rbind"]},
            ]
        }))
        .unwrap();
        assert_eq!(
            watched_mounts(&spec),
            ["/etc/cfg", "/var/run/secrets/kubernetes.io/serviceaccount"]
        );
    }
}
