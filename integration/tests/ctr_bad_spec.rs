//! Malformed specs through `ctr run --config`, against runc. What runc refuses, Cocoon
//! refuses too, at Create and with the reason, never running the process as something
//! other than asked; what runc skips with a warning, Cocoon skips. Found by a sweep:
//! each refused case ran under Cocoon, and the skipped one failed. The uid matters most:
//! 4294967295 is -1 to `setresuid`, "leave it", so the process ran as root.

mod ctr_common;

use ctr_common::*;

type Edit = fn(&mut serde_json::Value);

/// `o` failed without running anything under `runtime`; under Cocoon, the agent's
/// `call` said why, in `words`.
fn refused(o: &std::process::Output, runtime: &str, words: &str, call: &str) {
    assert!(
        !o.status.success() && o.stdout.is_empty(),
        "{runtime} ran it: {}",
        show(o)
    );
    if runtime == COCOON {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(words) && err.contains(call),
            "wanted {words:?} from {call}: {}",
            show(o)
        );
    }
}

#[test]
fn what_runc_refuses_in_a_spec_is_refused() {
    let env = env();
    let cases: [(&str, Edit, &str); 6] = [
        (
            "uid",
            |s| s["process"]["user"] = serde_json::json!({"uid": 4294967295u32, "gid": 0}),
            "uid 4294967295 is out of range",
        ),
        (
            "cwd",
            |s| s["process"]["cwd"] = serde_json::json!("relative"),
            "\"relative\" is not an absolute path",
        ),
        (
            "env",
            |s| s["process"]["env"] = serde_json::json!(["PATH=/bin", "NOEQUALS"]),
            "\"NOEQUALS\" has no '='",
        ),
        (
            "ns",
            |s| {
                s["linux"]["namespaces"]
                    .as_array_mut()
                    .unwrap()
                    .push(serde_json::json!({"type": "pid"}))
            },
            "namespace is named twice",
        ),
        (
            "args",
            |s| s["process"]["args"] = serde_json::json!([]),
            "the process has no args",
        ),
        (
            // This host has no resctrl, nor has a pod VM.
            "rdt",
            |s| s["linux"]["intelRdt"] = serde_json::json!({"l3CacheSchema": "L3:0=ff"}),
            "intelRdt.l3CacheSchema is specified in config, but Intel RDT",
        ),
    ];
    for (name, edit, words) in cases {
        let spec = spec_file(&env, name, |s| {
            s["process"]["args"] = serde_json::json!(["sh", "-c", "echo ran as $(id -u)"]);
            edit(s);
        });
        for runtime in [RUNC, COCOON] {
            let id = runtime_id(&format!("bad-{name}"), runtime);
            let o = run_config(&env, runtime, &spec, &id);
            refused(&o, runtime, words, "Agent.CreateContainer");
            let _ = env.containerd.ctr(&["container", "delete", &id]);
        }
    }
    assert_clean(&env);
}

/// A capability name runc does not know (a newer kernel's, a misspelt one in a pod's
/// `capabilities.add`) is skipped with a warning, and the container runs: the same
/// under Cocoon, whose spec parser would have refused the whole spec.
#[test]
fn an_unknown_capability_is_skipped_as_under_runc() {
    let env = env();
    let spec = spec_file(&env, "unknown-cap", |s| {
        s["process"]["args"] = serde_json::json!(["grep", "CapEff", "/proc/self/status"]);
        let caps = serde_json::json!(["CAP_NET_RAW", "CAP_NO_SUCH_THING"]);
        for set in ["bounding", "effective", "permitted"] {
            s["process"]["capabilities"][set] = caps.clone();
        }
    });
    let c = same_config(&env, &spec, "cap");
    assert!(c.status.success(), "{}", show(&c));
    // CAP_NET_RAW alone.
    assert_eq!(
        String::from_utf8_lossy(&c.stdout),
        "CapEff:\t0000000000002000\n"
    );
    assert_clean(&env);
}

/// An exec is held to the same: `ctr task exec --cwd` with a relative directory fails
/// under both runtimes, and Cocoon's error names it (ExecProcess, not Start).
#[test]
fn an_exec_with_a_relative_working_directory_is_refused() {
    let env = env();
    for runtime in [RUNC, COCOON] {
        let id = runtime_id("exec-cwd", runtime);
        with_detached(&env, runtime, &id, &[], |e, id| {
            let o = e.containerd.ctr(&[
                "task",
                "exec",
                "--exec-id",
                "rel",
                "--cwd",
                "tmp",
                id,
                "sh",
                "-c",
                "echo ran",
            ]);
            refused(
                &o,
                runtime,
                "\"tmp\" is not an absolute path",
                "Agent.ExecProcess",
            );
        });
    }
    assert_clean(&env);
}

/// A container with a user namespace of its own whose image the guest would pull
/// (`io.cocoon.guest-image`, as guest pulls and confidential pods name it) is refused at
/// Create with the reason, before any VM starts: its rootfs would not be idmapped with
/// the container's mapping, and the guest's pulls run outside a user-namespaced pod's
/// network namespace. (runc has no guest to pull in: Cocoon only.)
#[test]
fn a_guest_pulled_container_with_a_user_namespace_is_refused() {
    let env = env();
    let spec = spec_file(&env, "userns-guest-pull", |s| {
        s["process"]["args"] = serde_json::json!(["true"]);
        s["annotations"] = serde_json::json!({
            "io.cocoon.guest-image": format!("registry.invalid/app@sha256:{}", "ab".repeat(32)),
        });
        s["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"type": "user"}));
        let map = serde_json::json!([{"containerID": 0, "hostID": 100_000, "size": 65_536}]);
        s["linux"]["uidMappings"] = map.clone();
        s["linux"]["gidMappings"] = map;
    });
    let id = runtime_id("userns-guest-pull", COCOON);
    let o = run_config(&env, COCOON, &spec, &id);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("cannot have its image pulled in the guest"),
        "{}",
        show(&o)
    );
    let _ = env.containerd.ctr(&["container", "delete", &id]);
    assert_clean(&env);
}
