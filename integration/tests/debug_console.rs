//! `cocoon debug`: a shell in a pod's guest outside its containers, only where the
//! config turns it on; and the agent's fault hook it arms, which ends the pod's VM the
//! way an agent crash would, with the task reported dead and nothing left behind.

mod ctr_common;

use std::process::{Command, Output};

use cocoon_integration::image::IMAGE_REF;
use ctr_common::*;

fn debug_env() -> Env {
    env_with("", "[debug]\nconsole = true\n")
}

fn cocoon_debug(env: &Env, id: &str, command: &[&str]) -> Output {
    Command::new(cocoon_integration::workspace_root().join("target/debug/cocoon"))
        .args(["debug", id, "--namespace", "default", "--"])
        .args(command)
        .env("COCOON_CONFIG", &env.config)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("target/debug/cocoon (cargo build first)")
}

fn run_sleeper(env: &Env, id: &str) {
    ctr_ok(
        env,
        &[
            "run",
            "-d",
            "--runtime",
            COCOON,
            IMAGE_REF,
            id,
            "sleep",
            "1000",
        ],
    );
    assert_eq!(task_status(env, id), "RUNNING");
}

#[test]
fn the_debug_shell_runs_in_the_guest_outside_the_containers() {
    let env = debug_env();
    run_sleeper(&env, "dbg");
    // PID 1 of the guest is the agent (`init`); in the container it would be `sleep`.
    let o = cocoon_debug(&env, "dbg", &["cat /proc/1/comm; ls /run/cocoon/shared"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", show(&o));
    assert!(out.starts_with("init\n"), "{}", show(&o));
    assert!(
        out.contains("dbg"),
        "the pod's share is not visible: {}",
        show(&o)
    );
    // No command: an interactive shell on a guest pty (here fed from a pipe).
    let mut shell = Command::new(cocoon_integration::workspace_root().join("target/debug/cocoon"))
        .args(["debug", "dbg", "--namespace", "default"])
        .env("COCOON_CONFIG", &env.config)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        shell.stdin.as_mut().unwrap(),
        b"tty; echo sum-$((40+2)); exit\n",
    )
    .unwrap();
    let o = shell.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("/dev/pts/"), "no pty: {}", show(&o));
    assert!(out.contains("sum-42"), "{}", show(&o));
    ctr_ok(&env, &["task", "kill", "-s", "SIGKILL", "dbg"]);
    wait_status(&env, "dbg", "STOPPED");
    ctr_ok(&env, &["task", "delete", "dbg"]);
    ctr_ok(&env, &["container", "delete", "dbg"]);
    assert_clean(&env);
}

#[test]
fn without_the_config_there_is_no_debug_console() {
    let env = env();
    run_sleeper(&env, "nodbg");
    let o = cocoon_debug(&env, "nodbg", &["true"]);
    assert!(!o.status.success(), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no debug console"),
        "{}",
        show(&o)
    );
    ctr_ok(&env, &["task", "kill", "-s", "SIGKILL", "nodbg"]);
    wait_status(&env, "nodbg", "STOPPED");
    ctr_ok(&env, &["task", "delete", "nodbg"]);
    ctr_ok(&env, &["container", "delete", "nodbg"]);
    assert_clean(&env);
}

#[test]
fn an_agent_that_crashes_ends_its_pod_cleanly() {
    let env = debug_env();
    run_sleeper(&env, "crash");
    // The agent's fault hook: it exits, the guest kernel panics, the VM resets.
    let _ = cocoon_debug(&env, "crash", &["kill -USR2 1"]);
    wait_status(&env, "crash", "STOPPED");
    ctr_ok(&env, &["task", "delete", "crash"]);
    ctr_ok(&env, &["container", "delete", "crash"]);
    assert_clean(&env);
}
