//! `cocoon debug`: a shell in a pod's guest outside its containers, only where the
//! config turns it on; and the agent's fault hook it arms, which ends the pod's VM the
//! way an agent crash would, with the task reported dead and nothing left behind.

mod ctr_common;

use ctr_common::*;

fn debug_env() -> Env {
    env_with("", "[debug]\nconsole = true\n")
}

#[test]
fn the_debug_shell_runs_in_the_guest_outside_the_containers() {
    let env = debug_env();
    run_detached(&env, "dbg", &[], &["sleep", "1000"]);
    // PID 1 of the guest is the agent (`init`); in the container it would be `sleep`.
    let cmd = ["cat /proc/1/comm; ls /run/cocoon/shared"];
    let o = cocoon_debug(&env, "dbg", &cmd, b"");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", show(&o));
    assert!(out.starts_with("init\n"), "{}", show(&o));
    assert!(
        out.contains("dbg"),
        "the pod's share is not visible: {}",
        show(&o)
    );
    // No command: an interactive shell on a guest pty (here fed from a pipe).
    let o = cocoon_debug(&env, "dbg", &[], b"tty; echo sum-$((40+2)); exit\n");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("/dev/pts/"), "no pty: {}", show(&o));
    assert!(out.contains("sum-42"), "{}", show(&o));
    kill_delete_clean(&env, "dbg");
}

#[test]
fn without_the_config_there_is_no_debug_console() {
    let env = env();
    run_detached(&env, "nodbg", &[], &["sleep", "1000"]);
    let o = cocoon_debug(&env, "nodbg", &["true"], b"");
    assert!(!o.status.success(), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no debug console"),
        "{}",
        show(&o)
    );
    kill_delete_clean(&env, "nodbg");
}

#[test]
fn an_agent_that_crashes_ends_its_pod_cleanly() {
    let env = debug_env();
    run_detached(&env, "crash", &[], &["sleep", "1000"]);
    // The agent's fault hook: it exits, the guest kernel panics, the VM resets.
    let _ = cocoon_debug(&env, "crash", &["kill -USR2 1"], b"");
    wait_status(&env, "crash", "STOPPED");
    ctr_ok(&env, &["task", "delete", "crash"]);
    ctr_ok(&env, &["container", "delete", "crash"]);
    assert_clean(&env);
}
