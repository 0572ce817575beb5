//! Guest events against a hostile guest: root in a debug-armed guest makes its agent
//! answer every OOM poll at once with forged container ids (`cocoon_agent::debug`'s
//! `FORGE_OOM`), naming another pod's container, a container that never existed and its
//! own. containerd must see no event for the first two, a bounded number for the third,
//! and both pods must go on working and go away cleanly. And a guest that never answers
//! a kill cannot keep its pod alive, nor an oversized reply the connection.

mod ctr_common;

use std::io::Read;
use std::time::Duration;

use ctr_common::*;

/// How long the guest forges events.
const FORGE_SECONDS: u64 = 4;

#[test]
fn forged_oom_events_reach_no_one_else_and_are_rate_limited() {
    let env = env_with("", "[debug]\nconsole = true\n");
    run_detached(&env, "bystander", &[], &["sleep", "1000"]);
    run_detached(&env, "forger", &[], &["sleep", "1000"]);
    let mut events = ctr_events(&env);

    let forge = format!(
        "printf 'bystander\\nnever-existed\\nforger\\n' > /run/cocoon-forge-oom; \
         sleep {FORGE_SECONDS}; rm /run/cocoon-forge-oom"
    );
    in_guest(&env, "forger", &forge, "forged");
    // Both pods still answer.
    for id in ["forger", "bystander"] {
        let out = ctr_ok(
            &env,
            &["task", "exec", "--exec-id", "alive", id, "echo", "ok"],
        );
        assert_eq!(out, "ok\n", "{id}");
    }
    // A marker event after the forging: everything published before it is in.
    ctr_ok(&env, &["task", "pause", "bystander"]);
    ctr_ok(&env, &["task", "resume", "bystander"]);
    let mut out = events.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut seen = String::new();
        let mut buf = [0u8; 4096];
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            match out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
            if seen.contains("/tasks/resumed") {
                break;
            }
        }
        seen
    });
    let seen = reader.join().unwrap();
    let _ = events.kill();
    let _ = events.wait();
    assert!(seen.contains("/tasks/resumed"), "no marker event: {seen}");
    let ooms: Vec<&str> = seen.lines().filter(|l| l.contains("/tasks/oom")).collect();
    for other in ["bystander", "never-existed"] {
        assert!(
            !ooms.iter().any(|l| l.contains(&format!("\"{other}\""))),
            "a forged OOM event for {other} was published: {ooms:?}"
        );
    }
    // Its own container: the burst, then the sustained rate (slack for timing).
    let own = ooms.iter().filter(|l| l.contains("\"forger\"")).count();
    let most = cocoon_shim::shimv2::guest_events::BURST as usize
        + (cocoon_shim::shimv2::guest_events::PER_SECOND * FORGE_SECONDS as f64) as usize
        + 3;
    assert!(
        own >= 1 && own <= most,
        "{own} OOM events for the forger's own container (at most {most}): {ooms:?}"
    );

    kill_delete(&env, "forger");
    kill_delete_clean(&env, "bystander");
}

/// A guest that never answers a kill must not keep its pod from being removed: a
/// SIGKILL of the pod's own container ends the VM instead (the kill has then happened,
/// as runc's would have), while any other signal it does not take is an error.
#[test]
fn a_sigkill_the_guest_does_not_answer_ends_the_pod_vm() {
    let env = env_with("", "[debug]\nconsole = true\n");
    run_detached(&env, "stuck", &[], &["sleep", "1000"]);
    in_guest(&env, "stuck", "touch /run/cocoon-ignore-signals", "stuck");
    let term = env
        .containerd
        .ctr(&["task", "kill", "-s", "SIGTERM", "stuck"]);
    assert!(
        !term.status.success(),
        "a SIGTERM the guest never answered succeeded: {}",
        show(&term)
    );
    assert_eq!(task_status(&env, "stuck"), "RUNNING", "after the SIGTERM");
    kill_delete_clean(&env, "stuck");
}

/// A guest that takes a SIGKILL of the pod's container and never reports the exit
/// cannot keep the pod: within the shim's deadline the VM is ended, the task stops, and
/// it goes away cleanly.
#[test]
fn a_sigkill_the_guest_takes_but_never_reports_ends_the_pod_vm() {
    let env = env_with("", "[debug]\nconsole = true\n");
    run_detached(&env, "faker", &[], &["sleep", "1000"]);
    in_guest(&env, "faker", "touch /run/cocoon-fake-kills", "faking");
    let started = std::time::Instant::now();
    ctr_ok(&env, &["task", "kill", "-s", "SIGKILL", "faker"]);
    wait_status(&env, "faker", "STOPPED");
    let took = started.elapsed();
    assert!(
        took >= cocoon_shim::shimv2::KILL_EXIT_DEADLINE,
        "stopped after {took:?}: the guest should have kept it running until the deadline"
    );
    ctr_ok(&env, &["task", "delete", "faker"]);
    ctr_ok(&env, &["container", "delete", "faker"]);
    assert_clean(&env);
}

/// An oversized reply fails that call alone: `ctr task ps` against a guest that makes up
/// more processes than the bound is an error naming the bound, and the next call, once
/// the guest behaves, works on the same connection.
#[test]
fn an_oversized_reply_fails_that_call_alone() {
    let env = env_with("", "[debug]\nconsole = true\n");
    run_detached(&env, "liar", &[], &["sleep", "1000"]);
    let over = cocoon_shim::agent_reply::MAX_PIDS + 1;
    let forge = format!("echo {over} > /run/cocoon-forge-pids");
    in_guest(&env, "liar", &forge, "forging");
    let ps = env.containerd.ctr(&["task", "ps", "liar"]);
    assert!(!ps.status.success(), "an oversized ListPids was taken");
    let err = String::from_utf8_lossy(&ps.stderr);
    assert!(
        err.contains("out of bounds") && err.contains(&format!("{over} processes")),
        "{}",
        show(&ps)
    );
    in_guest(&env, "liar", "rm /run/cocoon-forge-pids", "honest");
    let ps = ctr_ok(&env, &["task", "ps", "liar"]);
    assert_eq!(ps.lines().count(), 2, "one process after the header: {ps}");
    kill_delete_clean(&env, "liar");
}

/// Runs `line` in the guest of `id`'s pod through the debug console (arming or disarming
/// one of the debug agent's switches), checking that it got there by the `done` it echoes.
fn in_guest(env: &Env, id: &str, line: &str, done: &str) {
    let o = cocoon_debug(env, id, &[format!("{line}; echo {done}").as_str()], b"");
    if !String::from_utf8_lossy(&o.stdout).contains(done) {
        // The guest's side of a session that said nothing is on its console (the
        // agent's "debug session: ..." line).
        let console = cocoon_cli(env)
            .args(["logs", id, "--namespace", "default"])
            .output()
            .map(|c| String::from_utf8_lossy(&c.stdout).into_owned())
            .unwrap_or_default();
        let tail: Vec<&str> = console.lines().rev().take(30).collect();
        panic!(
            "{line}: {}\nthe guest's console ends with:\n{}",
            show(&o),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
}

fn kill_delete(env: &Env, id: &str) {
    ctr_ok(env, &["task", "kill", "-s", "SIGKILL", id]);
    wait_status(env, id, "STOPPED");
    ctr_ok(env, &["task", "delete", id]);
    ctr_ok(env, &["container", "delete", id]);
}
