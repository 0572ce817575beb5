//! A container's `oom_score_adj` in the pod VM: what its spec says, as under runc, and
//! otherwise the agent's own 0, never the -1000 that keeps the agent's runtime zygote out
//! of the guest OOM killer's reach (`guest-agent/src/runtime/zygote.rs`).

mod ctr_common;

use ctr_common::*;

#[test]
fn a_containers_oom_score_adj_is_its_specs_or_the_agents() {
    let env = env();
    let adj = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).into_owned();
    // ctr's spec names no oomScoreAdj.
    let o = ctr_run(
        &env,
        COCOON,
        "oom-default",
        &[],
        &["cat", "/proc/self/oom_score_adj"],
    );
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(adj(&o), "0\n", "{}", show(&o));

    let p = spec_file(&env, "oom", |spec| {
        spec["process"]["args"] = serde_json::json!(["cat", "/proc/self/oom_score_adj"]);
        spec["process"]["oomScoreAdj"] = serde_json::json!(500);
        // This host's nested cgroup v1 devices controller rejects the default device
        // rules runc would write; they are not what this test is about.
        spec["linux"].as_object_mut().unwrap().remove("resources");
    });
    for (runtime, id) in [(RUNC, "oom-runc"), (COCOON, "oom-cocoon")] {
        let o = env
            .containerd
            .ctr(&["run", "--rm", "--runtime", runtime, "--config", &p, id]);
        assert!(o.status.success(), "{runtime}: {}", show(&o));
        assert_eq!(adj(&o), "500\n", "{runtime}: {}", show(&o));
    }
    assert_clean(&env);
}

/// A memory limit below what starting the container takes fails its Create under both
/// runtimes; Cocoon's error names the limit, where the runtime helper, killed by the
/// guest's OOM killer before it could report, would otherwise say nothing. Cocoon is
/// asked three times: a helper moved into the cgroup before it lost the zygote's OOM
/// protection hung its create, in about one try in four (`runtime::zygote::unprotect`).
#[test]
fn a_memory_limit_too_small_to_start_is_named() {
    let env = env();
    let tries = [
        (RUNC, "tiny-runc"),
        (COCOON, "tiny-cocoon-1"),
        (COCOON, "tiny-cocoon-2"),
        (COCOON, "tiny-cocoon-3"),
    ];
    for (runtime, id) in tries {
        let o = ctr_run(&env, runtime, id, &["--memory-limit", "4096"], &["true"]);
        assert!(!o.status.success(), "{runtime}: {}", show(&o));
        if runtime == COCOON {
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                err.contains("out-of-memory killer") && err.contains("memory limit (4096 bytes)"),
                "{}",
                show(&o)
            );
        }
        let _ = env.containerd.ctr(&["container", "delete", id]);
    }
    assert_clean(&env);
}

/// An OOM kill that does not end the container (a child of its init) is reported while
/// the container runs on, as under runc: the agent hears of it from the kernel
/// (inotify on the cgroup's `memory.events`), not from an exit.
#[test]
fn an_oom_kill_the_container_survives_is_reported_while_it_runs() {
    let env = env();
    let mut events = ctr_events(&env);
    let hog = "awk 'BEGIN { s = \"x\"; while (1) s = s s }'; echo survived; sleep 600";
    run_detached(
        &env,
        "oom-child",
        &["--memory-limit", "33554432"],
        &["sh", "-c", hog],
    );
    let mut out = events.stdout.take().unwrap();
    let mut seen = Vec::new();
    read_until(&mut out, &mut seen, |s| {
        s.lines()
            .any(|l| l.contains("/tasks/oom") && l.contains("oom-child"))
    });
    assert_eq!(task_status(&env, "oom-child"), "RUNNING");
    let _ = events.kill();
    let _ = events.wait();
    kill_delete_clean(&env, "oom-child");
}
