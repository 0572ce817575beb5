//! OCI hooks through `ctr run --config`, against runc. The host's hooks (`prestart`,
//! `createRuntime`, `createContainer`, `poststart`, `poststop`) run on the host in runc's
//! order with the state runc gives them; `startContainer` runs in the container, as the
//! container's user, before its process. The state's pid under Cocoon is the VMM's,
//! a live process whose network namespace a hook can enter (`shimv2::hooks`).

mod ctr_common;

use ctr_common::*;

/// A host hook that appends `<stage> <live|gone> <state>` to `log`: whether the state's
/// pid names a process whose network namespace can be opened.
fn logging(stage: &str, log: &std::path::Path) -> serde_json::Value {
    let script = format!(
        "s=$(cat); pid=$(echo \"$s\" | sed -n 's/.*\"pid\":\\([0-9]*\\).*/\\1/p'); \
         if [ -n \"$pid\" ] && [ -e /proc/$pid/ns/net ]; then l=live; else l=gone; fi; \
         echo \"{stage} $l $s\" >> {}",
        log.display()
    );
    serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c", script], "env": ["PATH=/usr/bin:/bin"]})
}

/// The lines of `log` for container `id`: (stage, live or gone, status).
fn stages_of(log: &str, id: &str) -> Vec<(String, String, String)> {
    log.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ' ');
            let (stage, live, state) = (parts.next()?, parts.next()?, parts.next()?);
            let state: serde_json::Value = serde_json::from_str(state).ok()?;
            if state["id"] != id {
                return None;
            }
            let bundle = state["bundle"].as_str().unwrap_or_default();
            assert!(bundle.ends_with(&format!("/{id}")), "{l}");
            let status = state["status"].as_str().unwrap_or_default();
            Some((stage.into(), live.into(), status.into()))
        })
        .collect()
}

#[test]
fn hooks_run_where_and_when_runc_runs_them() {
    let env = env();
    let log = env.containerd.dir.join("hooks.log");
    let spec = spec_file(&env, "hooks", |s| {
        s["process"]["args"] = serde_json::json!(["sh", "-c", "cat /hooktmp/started"]);
        s["process"]["cwd"] = serde_json::json!("/hooktmp");
        s["process"]["user"] = serde_json::json!({"uid": 1000, "gid": 1000});
        s["mounts"].as_array_mut().unwrap().push(serde_json::json!({
            "destination": "/hooktmp", "type": "tmpfs", "source": "tmpfs", "options": ["mode=1777"]
        }));
        let mut hooks = serde_json::json!({});
        for stage in [
            "prestart",
            "createRuntime",
            "createContainer",
            "poststart",
            "poststop",
        ] {
            hooks[stage] = serde_json::json!([logging(stage, &log)]);
        }
        // In the container, as its user, with only its own environment; its program
        // is the container's (busybox's sh).
        hooks["startContainer"] = serde_json::json!([{
            "path": "/bin/sh",
            "args": ["sh", "-c", "echo started $(id -u) $V $(cat | grep -c '\"status\":\"created\"') > /hooktmp/started"],
            "env": ["V=from-the-hook"],
            "timeout": 10
        }, {
            // No env of its own: the process's; and the process's working directory.
            "path": "/bin/sh",
            "args": ["sh", "-c", "echo \"$PATH $(pwd)\" >> /hooktmp/started"]
        }]);
        s["hooks"] = hooks;
    });
    let out = same_config(&env, &spec, "hooks");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "started 1000 from-the-hook 1\n/bin /hooktmp"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let runc = stages_of(&text, "hooks-runc");
    let cocoon = stages_of(&text, "hooks-cocoon");
    let names: Vec<&str> = runc.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "prestart",
            "createRuntime",
            "createContainer",
            "poststart",
            "poststop"
        ],
        "{text}"
    );
    // The same stages with the same statuses; a live pid wherever runc's is live
    // (after Delete runc's container is gone, Cocoon's VMM may not be yet).
    let without_liveness = |v: &[(String, String, String)]| -> Vec<(String, String)> {
        v.iter().map(|(s, _, st)| (s.clone(), st.clone())).collect()
    };
    assert_eq!(without_liveness(&cocoon), without_liveness(&runc), "{text}");
    for (r, c) in runc.iter().zip(&cocoon) {
        if r.1 == "live" {
            assert_eq!(c.1, "live", "{}: the state's pid under Cocoon\n{text}", c.0);
        }
    }
    assert_clean(&env);
}

#[test]
fn a_failing_hook_fails_the_create_and_runs_poststop() {
    let env = env();
    let log = env.containerd.dir.join("hookfails.log");
    let spec = spec_file(&env, "hookfails", |s| {
        s["process"]["args"] = serde_json::json!(["echo", "ran"]);
        s["hooks"] = serde_json::json!({
            "createRuntime": [{
                "path": "/bin/sh",
                "args": ["sh", "-c", "echo refused-by-the-hook >&2; exit 3"]
            }],
            "poststop": [logging("poststop", &log)]
        });
    });
    for runtime in [RUNC, COCOON] {
        let id = runtime_id("hookfails", runtime);
        let o = run_config(&env, runtime, &spec, &id);
        assert!(
            !o.status.success() && o.stdout.is_empty(),
            "{runtime} ran it: {}",
            show(&o)
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("refused-by-the-hook"),
            "{runtime}: {}",
            show(&o)
        );
        if runtime == COCOON {
            assert!(
                err.contains("createRuntime hook #0 (/bin/sh)"),
                "{}",
                show(&o)
            );
        }
        // ctr leaves the container record of a task that never started.
        let _ = env.containerd.ctr(&["container", "rm", &id]);
        // The poststop hooks still ran, as runc's destroy runs them.
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let stages = stages_of(&text, &id);
        assert_eq!(stages.len(), 1, "{runtime}: {text}");
        assert_eq!(stages[0].0, "poststop", "{runtime}: {text}");
    }
    assert_clean(&env);
}

/// A failing startContainer hook: the process never runs, under either runtime.
#[test]
fn a_failing_start_container_hook_keeps_the_process_from_running() {
    let env = env();
    let spec = spec_file(&env, "startfails", |s| {
        s["process"]["args"] = serde_json::json!(["echo", "ran"]);
        s["hooks"] = serde_json::json!({"startContainer": [{
            "path": "/bin/sh",
            "args": ["sh", "-c", "exit 7"]
        }]});
    });
    for runtime in [RUNC, COCOON] {
        let id = runtime_id("startfails", runtime);
        let o = run_config(&env, runtime, &spec, &id);
        assert!(
            !o.status.success() && o.stdout.is_empty(),
            "{runtime} ran it: {}",
            show(&o)
        );
        if runtime == COCOON {
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                err.contains("startContainer hook #0 (/bin/sh)"),
                "{}",
                show(&o)
            );
        }
        let _ = env.containerd.ctr(&["task", "rm", "-f", &id]);
        let _ = env.containerd.ctr(&["container", "rm", &id]);
    }
    assert_clean(&env);
}
