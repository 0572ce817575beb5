//! What runc refuses in a container's spec, Cocoon refuses too, at Create and with the
//! reason, never running the process as something other than asked. Found by a sweep
//! of malformed specs through `ctr run --config`: each of these ran under Cocoon. The
//! uid matters most: 4294967295 is -1 to `setresuid`, "leave it", so the process ran
//! as root.

mod ctr_common;

use ctr_common::*;

type Edit = fn(&mut serde_json::Value);

#[test]
fn what_runc_refuses_in_a_spec_is_refused() {
    let env = env();
    let cases: [(&str, Edit, &str); 5] = [
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
    ];
    for (name, edit, words) in cases {
        let spec = spec_file(&env, name, |s| {
            s["process"]["args"] = serde_json::json!(["sh", "-c", "echo ran as $(id -u)"]);
            edit(s);
        });
        for runtime in [RUNC, COCOON] {
            let id = format!("bad-{name}-{}", runtime.rsplit('.').nth(1).unwrap());
            let o =
                env.containerd
                    .ctr(&["run", "--rm", "--runtime", runtime, "--config", &spec, &id]);
            assert!(
                !o.status.success() && o.stdout.is_empty(),
                "{name}: {runtime} ran it: {}",
                show(&o)
            );
            if runtime == COCOON {
                let err = String::from_utf8_lossy(&o.stderr);
                assert!(
                    err.contains(words) && err.contains("Agent.CreateContainer"),
                    "{name}: wanted {words:?} from Create: {}",
                    show(&o)
                );
            }
            let _ = env.containerd.ctr(&["container", "delete", &id]);
        }
    }
    assert_clean(&env);
}
