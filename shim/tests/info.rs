//! `containerd-shim-cocoon-v2 -info`, as containerd 2 runs it: the runtime options on
//! stdin, the encoded `RuntimeInfo` on stdout, with the OCI features document.

use std::io::Write;
use std::process::{Command, Stdio};

use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::types::introspection::RuntimeInfo;

#[test]
fn info_prints_the_runtime_and_its_features() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_containerd-shim-cocoon-v2"))
        .arg("-info")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Options containerd might send (an Any); the shim takes none of them.
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"\x0a\x05x/y/z\x12\x00")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info = RuntimeInfo::parse_from_bytes(&out.stdout).unwrap();
    assert_eq!(info.name, "io.containerd.cocoon.v2");
    assert_eq!(info.version.version, env!("CARGO_PKG_VERSION"));
    let features = info.features.as_ref().expect("features");
    assert_eq!(
        features.type_url,
        "types.containerd.io/opencontainers/runtime-spec/1/features/Features"
    );
    let f: serde_json::Value = serde_json::from_slice(&features.value).unwrap();
    assert!(f["mountOptions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|o| o == "rro"));
}
