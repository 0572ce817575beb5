//! The agent's fuzz targets (`cocoon_agent::fuzz`: what the host sends the guest) on
//! stable, seeded with valid examples to mutate. `make fuzz` runs a million each.

use cocoon_agent::fuzz::TARGETS;
use protobuf::Message;

/// A CreateContainer request with a realistic spec, a seccomp profile included.
fn create_request() -> Vec<u8> {
    let spec = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
        "root": {"path": "/run/cocoon/shared/c1/rootfs"},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/data", "type": "bind", "source": "/run/cocoon/shared/c1/mounts/1",
             "options": ["rbind", "ro", "rslave", "nosuid"]}
        ],
        "linux": {"seccomp": {"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
                         {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                          "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]}]}}
    });
    let mut r = cocoon_protocol::agent::CreateContainerRequest::new();
    r.container_id = "c1".into();
    r.oci_spec_json = serde_json::to_vec(&spec).unwrap();
    let mut bytes = vec![0u8];
    bytes.extend(r.write_to_bytes().unwrap());
    bytes
}

#[test]
fn fuzz_targets_survive_random_inputs() {
    let create = create_request();
    let spec = &create[1..];
    let seeds: &[&[u8]] = &[
        &create,
        spec,
        b"stdout c1\n",
        b"stdin c1 e2\n",
        b"TCP 8080\n",
        b"02:42:ac:11:00:02",
        b"10.88.0.5/16",
        br#"{"args":["sh","-c","true"],"cwd":"/","user":{"uid":1000,"gid":1000}}"#,
    ];
    let iters = cocoon_nested::fuzzing::iterations();
    for (name, target) in TARGETS {
        cocoon_nested::fuzzing::run(name, *target, seeds, iters);
    }
}
