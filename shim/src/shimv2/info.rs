//! `containerd-shim-cocoon-v2 -info`: what the runtime is and can do, asked by
//! containerd 2 before any shim instance exists. Its CRI plugin reads the OCI features
//! document (`features.md` of the runtime spec) to decide what a Kubernetes node may
//! offer on this handler: recursively read-only volumes only where `mountOptions` has
//! `rro`, user-namespaced pods only where the namespaces include `user` and idmapped
//! mounts are enabled. containerd 1.6 never asks.
//!
//! What is listed is what the guest agent does, not what the host could: Cocoon's
//! containers run in the guest's kernel (cgroup v2, no LSM).

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::protos::types::introspection::{RuntimeInfo, RuntimeVersion};

/// The type URL containerd registers for the runtime spec's `features.Features` (a Go
/// struct, so the `Any` holds its JSON).
pub const FEATURES_TYPE_URL: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/features/Features";

/// The OCI features document.
pub fn features() -> serde_json::Value {
    serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.2.0",
        // Every hook the spec names: the host runs all but startContainer, which the
        // agent runs in the container (README).
        "hooks": [
            "prestart",
            "createRuntime",
            "createContainer",
            "startContainer",
            "poststart",
            "poststop"
        ],
        "mountOptions": cocoon_protocol::MOUNT_OPTIONS,
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "time", "user", "uts"],
            "cgroup": {"v1": false, "v2": true, "systemd": false, "systemdUser": false, "rdma": false},
            "seccomp": {"enabled": true},
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false},
            "intelRdt": {"enabled": false},
            // A mount's own id mapping (`uidMappings`, which CRI gives every bind of a
            // `hostUsers: false` pod) is made on the host, composed with the pod's
            // share's (`mounts::share_volumes`): the guest cannot idmap what
            // virtiofsd shows it.
            "mountExtensions": {"idmap": {"enabled": true}}
        }
    })
}

/// The `RuntimeInfo` message `-info` prints.
pub fn runtime_info(name: &str) -> RuntimeInfo {
    let mut version = RuntimeVersion::new();
    version.version = env!("CARGO_PKG_VERSION").to_string();
    let mut features_any = Any::new();
    features_any.type_url = FEATURES_TYPE_URL.to_string();
    features_any.value = features().to_string().into_bytes();
    let mut info = RuntimeInfo::new();
    info.name = name.to_string();
    info.version = MessageField::some(version);
    info.features = MessageField::some(features_any);
    info
}

/// Answers `-info`: reads the runtime options containerd writes on stdin (bounded;
/// Cocoon takes none of them) and prints the encoded `RuntimeInfo`.
pub fn print(name: &str) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let mut options = Vec::new();
    std::io::stdin()
        .take(1 << 20)
        .read_to_end(&mut options)
        .map_err(|e| anyhow::anyhow!("cannot read the runtime options on stdin: {e}"))?;
    let bytes = runtime_info(name)
        .write_to_bytes()
        .map_err(|e| anyhow::anyhow!("cannot encode the runtime info: {e}"))?;
    let mut out = std::io::stdout().lock();
    out.write_all(&bytes)
        .and_then(|()| out.flush())
        .map_err(|e| anyhow::anyhow!("cannot write the runtime info: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_features_offer_rro_and_idmapped_mounts() {
        let info = RuntimeInfo::parse_from_bytes(
            &runtime_info("io.containerd.cocoon.v2")
                .write_to_bytes()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(info.name, "io.containerd.cocoon.v2");
        let any = info.features.as_ref().unwrap();
        assert_eq!(any.type_url, FEATURES_TYPE_URL);
        let f: serde_json::Value = serde_json::from_slice(&any.value).unwrap();
        let options = f["mountOptions"].as_array().unwrap();
        assert!(options.iter().any(|o| o == "rro"), "{options:?}");
        assert!(options.iter().any(|o| o == "rnoexec"), "{options:?}");
        assert!(f["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == "user"));
        assert_eq!(f["linux"]["mountExtensions"]["idmap"]["enabled"], true);
        assert_eq!(f["linux"]["cgroup"]["v2"], true);
    }
}
