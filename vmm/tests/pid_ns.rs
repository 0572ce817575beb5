//! `cocoon-vmm jail-exec --pid-ns`: the program runs as PID 1 of a PID namespace of its
//! own, under a confined waiter that ends as it ends (`cocoon_vmm::pid_ns`).

use std::process::Stdio;
use std::time::{Duration, Instant};

mod guest;

use guest::jailed;

fn status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// Gone, or a zombie waiting for whoever inherited it.
fn dead(pid: u32) -> bool {
    let state = status_field(pid, "State");
    state.is_empty() || state.starts_with('Z')
}

fn child_of(pid: u32) -> u32 {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let c =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        if let Some(c) = c.split_whitespace().next() {
            // Forked, and past the exec (the uid change comes before it).
            let c: u32 = c.parse().unwrap();
            if status_field(c, "Name") == "sleep" {
                return c;
            }
        }
        assert!(Instant::now() < end, "the waiter never started its program");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A waiter running `sleep` in its namespace, and the host pid of that `sleep`.
fn sleeping() -> (std::process::Child, u32) {
    let waiter = jailed(&["/bin/sleep", "1000"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let program = child_of(waiter.id());
    (waiter, program)
}

fn root_or_skip(test: &str) -> bool {
    if !guest::euid_is_root() {
        guest::skip(&format!("{test}: jail-exec needs root"));
        return false;
    }
    true
}

#[test]
fn the_program_is_pid_1_and_its_end_is_the_waiters() {
    if !root_or_skip("the_program_is_pid_1_and_its_end_is_the_waiters") {
        return;
    }
    let out = jailed(&["/bin/sh", "-c", "echo pid=$$; exit 7"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "pid=1\n", "{out:?}");
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    // A program killed by a signal (from the host: inside, PID 1 ignores even its own
    // SIGKILL): the waiter dies of the same one.
    let (mut waiter, program) = sleeping();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(program as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    use std::os::unix::process::ExitStatusExt;
    let status = waiter.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
}

#[test]
fn the_waiter_is_confined_and_sigterm_ends_both() {
    if !root_or_skip("the_waiter_is_confined_and_sigterm_ends_both") {
        return;
    }
    let (mut waiter, program) = sleeping();
    let w = waiter.id();
    // The waiter: the pod's uid, no capabilities, its own filter, and a command line
    // that is not the program's.
    assert_eq!(
        status_field(w, "Uid").split_whitespace().next(),
        Some(guest::JAIL_UID)
    );
    assert_eq!(status_field(w, "CapEff"), "0000000000000000");
    assert_eq!(status_field(w, "Seccomp"), "2");
    assert_eq!(status_field(w, "NoNewPrivs"), "1");
    let cmdline = std::fs::read(format!("/proc/{w}/cmdline")).unwrap();
    assert!(cmdline.starts_with(b"cocoon-pid-ns\0"), "{cmdline:?}");
    assert!(!String::from_utf8_lossy(&cmdline).contains("sleep"));
    // The program: PID 1 of another PID namespace.
    assert_eq!(status_field(program, "NSpid"), format!("{program}\t1"));
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/pid")).unwrap();
    assert_ne!(ns(&program.to_string()), ns("self"));

    // SIGTERM (which PID 1 `sleep` would ignore): the program is killed and reaped
    // before the waiter ends, the same way.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(w as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = waiter.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "the waiter did not end on SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    };
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    assert!(
        status_field(program, "State").is_empty(),
        "the program is still there"
    );
}

#[test]
fn a_killed_waiter_takes_the_program_with_it() {
    if !root_or_skip("a_killed_waiter_takes_the_program_with_it") {
        return;
    }
    let (mut waiter, program) = sleeping();
    waiter.kill().unwrap();
    waiter.wait().unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while !dead(program) {
        assert!(Instant::now() < end, "the program outlived its waiter");
        std::thread::sleep(Duration::from_millis(10));
    }
}
