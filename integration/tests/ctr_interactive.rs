//! Interactive `ctr` with runc and with cocoon, on a private containerd: signals,
//! exec, pause and resume, a terminal and its resizes, asserting the same observable
//! result under both.

mod ctr_common;

use std::time::Duration;

use cocoon_integration::image::IMAGE_REF;
use ctr_common::*;

/// Starts `ctr run` in the foreground, waits for "ready", runs `act`, and
/// returns ctr's exit code and full stdout.
fn interactive(
    env: &Env,
    runtime: &str,
    id: &str,
    cmd: &[&str],
    act: impl Fn(&Env, &str),
) -> (Option<i32>, String) {
    use std::io::Read;
    let mut args = vec!["run", "--rm", "--runtime", runtime, IMAGE_REF, id];
    args.extend_from_slice(cmd);
    let mut child = env
        .containerd
        .ctr_cmd(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut acc = Vec::new();
    read_until(&mut out, &mut acc, |s| s.contains("ready\n"));
    act(env, id);
    let status = reap(env, &mut child);
    out.read_to_end(&mut acc).unwrap();
    (status.code(), String::from_utf8_lossy(&acc).into_owned())
}

/// A signal case: name, command, and what to do once it is ready.
type SignalCase<'a> = (&'a str, &'a [&'a str], &'a dyn Fn(&Env, &str));

#[test]
fn signals_match_runc() {
    let env = env();
    // A shell that traps SIGTERM exits the way its handler says.
    let trap = [
        "sh",
        "-c",
        "trap 'echo got-term; exit 3' TERM; echo ready; while true; do sleep 0.05; done",
    ];
    // SIGKILL: 137.
    let spin = ["sh", "-c", "echo ready; while true; do sleep 0.05; done"];
    // PID 1 without a handler ignores SIGTERM, as under runc: it goes on
    // until told (through exec) to finish. It finishes only once the exec's
    // process is gone: PID 1 leaving ends its PID namespace, and the kernel
    // then kills whatever is still in it, an exec not yet exited included
    // (137 under either runtime, when the exec is slow to exit under load).
    let ignore = [
        "sh",
        "-c",
        "echo ready; while [ ! -e /tmp/go ]; do sleep 0.05; done; \
         p=$(cat /tmp/go); while [ -e /proc/$p ]; do sleep 0.05; done; echo done",
    ];
    // A real-time signal (SIGRTMIN+3, 37, the one that halts systemd) reaches a
    // handler as any other.
    let realtime = [
        "sh",
        "-c",
        "trap 'echo got-rt; exit 4' 37; echo ready; while true; do sleep 0.05; done",
    ];
    let cases: [SignalCase; 4] = [
        ("rt", &realtime, &|e, id| {
            ctr_ok(e, &["task", "kill", "-s", "SIGRTMIN+3", id]);
        }),
        ("trap", &trap, &|e, id| {
            ctr_ok(e, &["task", "kill", "-s", "SIGTERM", id]);
        }),
        ("kill", &spin, &|e, id| {
            ctr_ok(e, &["task", "kill", "-s", "SIGKILL", id]);
        }),
        ("ignore", &ignore, &|e, id| {
            ctr_ok(e, &["task", "kill", "-s", "SIGTERM", id]);
            ctr_ok(
                e,
                &[
                    "task",
                    "exec",
                    "--exec-id",
                    "go",
                    id,
                    "sh",
                    "-c",
                    "echo $$ > /tmp/p; mv /tmp/p /tmp/go",
                ],
            );
        }),
    ];
    for (name, cmd, act) in cases {
        let r = interactive(&env, RUNC, &format!("sig{name}-runc"), cmd, act);
        let c = interactive(&env, COCOON, &format!("sig{name}-cocoon"), cmd, act);
        assert_eq!(r, c, "{name}: runc vs cocoon");
        if name == "rt" {
            assert_eq!(c, (Some(4), "ready\ngot-rt\n".to_string()));
        }
    }
    assert_clean(&env);
}

#[test]
fn exec_pids_pause_resume() {
    let env = env();
    let mut events = ctr_events(&env);
    let mut limits = Vec::new();
    for rt in [RUNC, COCOON] {
        let id = if rt == RUNC {
            "live-runc"
        } else {
            "live-cocoon"
        };
        with_detached(&env, rt, id, &[], |e, id| {
            assert_eq!(task_status(e, id), "RUNNING");
            // An exec inherits the limits its spec leaves out as runc's does. containerd
            // 1.6 sometimes loses the output of an exec that ends at once (under either
            // runtime, see ctr_common::same_in): such a reading is taken again.
            limits.push(exec_output(e, id, "e0", &["sh", "-c", "ulimit -a"], "(-u)"));
            let out = ctr_ok(
                e,
                &[
                    "task",
                    "exec",
                    "--exec-id",
                    "e1",
                    id,
                    "sh",
                    "-c",
                    "echo exec-out; echo exec-err >&2",
                ],
            );
            assert_eq!(out, "exec-out\n");
            let o =
                e.containerd
                    .ctr(&["task", "exec", "--exec-id", "e2", id, "sh", "-c", "exit 7"]);
            assert_eq!(o.status.code(), Some(7));
            // A running exec is listed by its id, as runc's shim lists it.
            ctr_ok(
                e,
                &[
                    "task",
                    "exec",
                    "--detach",
                    "--exec-id",
                    "e3",
                    id,
                    "sleep",
                    "1000",
                ],
            );
            let ps = ctr_ok(e, &["task", "ps", id]);
            // A header line, the container's init (its sleep may come and go) and e3.
            assert!(ps.lines().count() >= 3, "{rt}: {ps}");
            // ctr 1.6 prints the details as `ExecID:e3`, ctr 2 as `exec_id:"e3"`.
            let described: Vec<&str> = ps
                .lines()
                .filter(|l| l.contains("ExecID:") || l.contains("exec_id:"))
                .collect();
            assert!(
                described.len() == 1
                    && (described[0].contains("ExecID:e3")
                        || described[0].contains("exec_id:\"e3\"")),
                "{rt}: only the exec e3 has details:\n{ps}"
            );
            ctr_ok(e, &["task", "pause", id]);
            assert_eq!(task_status(e, id), "PAUSED", "{rt}");
            ctr_ok(e, &["task", "resume", id]);
            assert_eq!(task_status(e, id), "RUNNING", "{rt}");
        });
    }
    assert_eq!(
        limits[0], limits[1],
        "an exec's limits: runc's, then cocoon's"
    );
    // Every task event of the cocoon container reached containerd, like runc's.
    let _ = events.kill();
    let out = events.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for rt_id in ["live-runc", "live-cocoon"] {
        for topic in [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exec-added",
            "/tasks/exec-started",
            "/tasks/paused",
            "/tasks/resumed",
            "/tasks/exit",
            "/tasks/delete",
        ] {
            assert!(
                text.lines().any(|l| l.contains(topic) && l.contains(rt_id)),
                "no {topic} for {rt_id} in:\n{text}"
            );
        }
    }
    assert_clean(&env);
}

#[test]
fn tty_and_resize() {
    use nix::pty::{openpty, Winsize};
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let env = env();
    let run = |runtime: &str, id: &str| -> String {
        let size = Winsize {
            ws_row: 30,
            ws_col: 100,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = openpty(Some(&size), None).unwrap();
        let slave: std::fs::File = pty.slave.into();
        let mut child = env
            .containerd
            .ctr_cmd(&[
                "run",
                "--rm",
                "-t",
                "--runtime",
                runtime,
                IMAGE_REF,
                id,
                "sh",
                "-c",
                // ctr 1.6 puts no consoleSize in the spec: the terminal
                // starts at 0x0 under both runtimes until ctr's first resize
                // lands. Wait for it, then report; the race is ctr's.
                "until [ \"$(stty size 2>/dev/null)\" = '30 100' ]; do sleep 0.05; done; \
                 stty size; echo ready; read x; stty size",
            ])
            .stdin(slave.try_clone().unwrap())
            .stdout(slave.try_clone().unwrap())
            .stderr(slave)
            .spawn()
            .unwrap();
        let mut master: std::fs::File = pty.master.into();
        let mut acc = Vec::new();
        read_until(&mut master, &mut acc, |s| s.contains("ready"));
        let bigger = Winsize {
            ws_row: 40,
            ws_col: 120,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ on a pty master we own, with a valid Winsize.
        unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &bigger) };
        // ctr forwards the resize asynchronously; give the guest the newline
        // once the size is visible to a second process in the container. ctr
        // sends its first resize before it starts listening for SIGWINCH, so
        // a signal sent then is lost (the container can already print "ready"):
        // each round signals again, as a terminal would on every change.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGWINCH,
            )
            .unwrap();
            let o = env.containerd.ctr(&[
                "task",
                "exec",
                "--exec-id",
                "sz",
                id,
                "sh",
                "-c",
                "stty size < /proc/1/fd/0",
            ]);
            if String::from_utf8_lossy(&o.stdout).contains("40 120") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "resize never arrived: {}; tty so far: {:?}",
                show(&o),
                String::from_utf8_lossy(&acc)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        master.write_all(b"\n").unwrap();
        read_until(&mut master, &mut acc, |s| {
            s.matches(" ").count() >= 2 && s.contains("40 120")
        });
        reap(&env, &mut child);
        let text = String::from_utf8_lossy(&acc).replace('\r', "");
        text.lines()
            .filter(|l| l.contains(' ') && l.chars().all(|c| c.is_ascii_digit() || c == ' '))
            .collect::<Vec<_>>()
            .join("|")
    };
    let r = run(RUNC, "tty-runc");
    let c = run(COCOON, "tty-cocoon");
    // ctr's first resize reaches the process (the wait above has a deadline:
    // the test's), and a later one does too, the same under both runtimes.
    assert_eq!(r, "30 100|40 120", "runc");
    assert_eq!(c, "30 100|40 120", "cocoon");
    assert_clean(&env);
}

/// runc allocates the terminal inside the container, from its own devpts:
/// `tty` names /dev/pts/0 for the init and the next one for an exec.
/// Cocoon's agent did it outside and printed /dev/console.
#[test]
fn tty_is_a_pts_like_runc() {
    use std::io::Write;
    let env = env();
    let run = |runtime: &str, id: &str| -> String {
        let (mut init, mut master) = ctr_on_a_pty(
            &env,
            &[
                "run",
                "--rm",
                "-t",
                "--runtime",
                runtime,
                IMAGE_REF,
                id,
                "sh",
                "-c",
                "tty; echo ready; read x",
            ],
        );
        let mut acc = Vec::new();
        read_until(&mut master, &mut acc, |s| s.contains("ready"));
        let (mut exec, mut exec_master) =
            ctr_on_a_pty(&env, &["task", "exec", "-t", "--exec-id", "tty", id, "tty"]);
        let mut exec_acc = Vec::new();
        read_until(&mut exec_master, &mut exec_acc, |s| {
            s.split_once("/dev/")
                .is_some_and(|(_, rest)| rest.contains('\n'))
        });
        reap(&env, &mut exec);
        master.write_all(b"\n").unwrap();
        reap(&env, &mut init);
        let lines = |b: &[u8]| -> Vec<String> {
            String::from_utf8_lossy(b)
                .lines()
                .map(|l| l.trim().to_string())
                .filter(|l| l.starts_with('/'))
                .collect()
        };
        format!("init {:?} exec {:?}", lines(&acc), lines(&exec_acc))
    };
    let r = run(RUNC, "pts-runc");
    let c = run(COCOON, "pts-cocoon");
    assert_eq!(r, c, "runc vs cocoon");
    assert_eq!(c, r#"init ["/dev/pts/0"] exec ["/dev/pts/1"]"#);
    assert_clean(&env);
}

/// An exec in a container with a user namespace of its own (`ctr run --uidmap`) joins
/// that namespace first, as runc's does: it is root of the container's ids only, and
/// what it writes lands with them.
#[test]
fn exec_joins_the_containers_user_namespace() {
    let env = env();
    let maps = ["--uidmap", "0:100000:65536", "--gidmap", "0:100000:65536"];
    let script = "cat /proc/self/uid_map /proc/self/gid_map; id; touch /root/e; \
                  stat -c '%u:%g %n' /root/e; grep CapEff /proc/self/status; echo done";
    let mut seen = Vec::new();
    for (rt, id) in [(RUNC, "uns-exec-runc"), (COCOON, "uns-exec-cocoon")] {
        with_detached(&env, rt, id, &maps, |e, id| {
            seen.push(exec_output(e, id, "u", &["sh", "-c", script], "done"));
        });
    }
    assert_eq!(seen[0], seen[1], "runc, then cocoon");
    assert!(seen[1].contains("0     100000      65536"), "{}", seen[1]);
    assert!(seen[1].contains("0:0 /root/e"), "{}", seen[1]);
    assert_clean(&env);
}

/// A terminal in a container with a user namespace of its own: its pty comes from the
/// container's devpts and belongs to the container's root, as under runc.
#[test]
fn terminal_in_a_user_namespace() {
    let env = env();
    let run = |runtime: &str, id: &str| -> String {
        let (mut child, mut master) = ctr_on_a_pty(
            &env,
            &[
                "run",
                "--rm",
                "-t",
                "--uidmap",
                "0:100000:65536",
                "--gidmap",
                "0:100000:65536",
                "--runtime",
                runtime,
                IMAGE_REF,
                id,
                "sh",
                "-c",
                "t=$(tty); echo tty=$t; stat -c 'owner=%u:%g mode=%a' $t; echo done",
            ],
        );
        let mut acc = Vec::new();
        read_until(&mut master, &mut acc, |s| s.contains("done"));
        assert!(child.wait().unwrap().success());
        // Up to the marker: what follows it may still be on its way.
        let text = String::from_utf8_lossy(&acc).replace('\r', "");
        text[..text.find("done").unwrap()].to_string()
    };
    let r = run(RUNC, "uns-tty-runc");
    let c = run(COCOON, "uns-tty-cocoon");
    assert_eq!(r, c, "runc, then cocoon");
    assert!(c.contains("owner=0:"), "{c}");
    assert_clean(&env);
}

/// A process whose environment names no `HOME` gets its user's home from the
/// container's `/etc/passwd` (or `/`), as runc gives it; one it names is kept. The same
/// for an exec as another user.
#[test]
fn home_is_set_from_passwd_as_under_runc() {
    let out = same("home", &[], &["sh", "-c", "echo $HOME"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "/root\n",
        "{}",
        show(&out)
    );
    same(
        "home-kept",
        &["--env", "HOME=/custom"],
        &["sh", "-c", "echo $HOME"],
    );
    let env = env();
    let mut seen = Vec::new();
    for (rt, name) in [(RUNC, "runc"), (COCOON, "cocoon")] {
        with_detached(&env, rt, &format!("home-exec-{name}"), &[], |e, id| {
            let user = ["--user", "1000:1000"];
            let cmd = ["sh", "-c", "echo home=$HOME"];
            let out = exec_output_with(e, &user, id, "h", &cmd, "home=");
            seen.push(out);
        });
    }
    assert_eq!(seen[0], seen[1], "runc, then cocoon");
    assert_eq!(seen[1], "home=/home\n");
}
