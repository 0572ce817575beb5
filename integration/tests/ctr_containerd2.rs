//! Cocoon under containerd 2's task service and its `ctr` (containerd 2.1 from Debian,
//! which `scripts/setup-host.sh` keeps in Cocoon's cache; Debian 12's 1.6 runs every other
//! ctr test): the calls a container's life takes, a run compared with runc's under the
//! same containerd.

mod ctr_common;

use cocoon_integration::containerd::use_containerd2;
use ctr_common::*;

/// A container that exits, as runc runs it: its output streams apart, its environment,
/// working directory, capabilities and status.
#[test]
fn a_container_runs_as_under_runc_on_containerd_2() {
    use_containerd2();
    let env = env();
    let script = "echo \"$FOO\"; pwd; echo out; echo err >&2; hostname; \
                  grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs)' /proc/self/status; exit 3";
    let out = same_in(
        &env,
        "c2-run",
        &["--env", "FOO=bar baz", "--cwd", "/tmp"],
        &["sh", "-c", script],
    );
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("bar baz\n/tmp\nout\n"), "{stdout}");
    assert!(stdout.contains("NoNewPrivs"), "{stdout}");
    assert_eq!(out.stderr, b"err\n");
    assert_clean(&env);
}

/// A detached container through containerd 2's task API: exec, pause and resume, kill,
/// delete; then nothing of its pod is left.
#[test]
fn a_detached_container_lives_and_goes_on_containerd_2() {
    use_containerd2();
    let env = env();
    let id = "c2-detached";
    run_detached(
        &env,
        id,
        &[],
        &["sh", "-c", "while true; do sleep 0.1; done"],
    );
    let out = exec_output(
        &env,
        id,
        "hello",
        &["sh", "-c", "echo exec $((6 * 7))"],
        "exec",
    );
    assert_eq!(out, "exec 42\n");
    ctr_ok(&env, &["task", "pause", id]);
    wait_status(&env, id, "PAUSED");
    ctr_ok(&env, &["task", "resume", id]);
    wait_status(&env, id, "RUNNING");
    let out = exec_output(&env, id, "after", &["echo", "resumed"], "resumed");
    assert_eq!(out, "resumed\n");
    kill_delete_clean(&env, id);
}
