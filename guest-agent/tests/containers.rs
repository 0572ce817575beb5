//! End-to-end tests of the container RPCs and stdio streams against the
//! agent binary in its dev mode, with a busybox rootfs. They need root (they
//! create namespaces and mounts) and are skipped otherwise.
//!
//! The agent here runs containers without cgroups; `cgroups.rs` gives it a
//! v2 hierarchy. Limits, stats and OOM events are covered by unit tests of
//! `cgroup.rs` and in-guest by the end-to-end tests.

mod common;

use std::time::Duration;

use cocoon_protocol::agent::{ContainerRequest, ProcessRequest, TtyWinResizeRequest};
use common::*;
use serde_json::json;
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn exit_codes_and_separate_streams() {
    require_root!();
    let agent = Agent::start().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    for code in [0, 1, 42] {
        let script = format!("echo out; echo err >&2; exit {code}");
        let (status, out, err) = agent
            .run(&format!("c{code}"), &spec(&rootfs, &sh(&script)))
            .await;
        assert_eq!(status, code);
        assert_eq!(out, b"out\n");
        assert_eq!(err, b"err\n");
    }
}

#[tokio::test]
async fn stdin_env_cwd_and_user() {
    require_root!();
    let agent = Agent::start().await;
    let rootfs = busybox_rootfs(agent.dir.path());

    // stdin is piped, and its EOF ends `cat`.
    let s = spec(&rootfs, &["cat"]);
    agent
        .create("cat", &s, streams(true, true, false))
        .await
        .unwrap();
    let mut input = agent.stream("stdin", "cat", "").await;
    let mut out = agent.stream("stdout", "cat", "").await;
    agent.start_container("cat").await.unwrap();
    input.write_all(b"hello through stdin").await.unwrap();
    input.shutdown().await.unwrap();
    assert_eq!(read_all(&mut out).await, b"hello through stdin");
    assert_eq!(agent.wait("cat", "").await.unwrap().status, 0);
    agent.remove("cat").await.unwrap();

    let mut s = spec(
        &rootfs,
        &sh("echo $FOO; pwd; id -u; id -g; id -G; hostname"),
    );
    s["process"]["env"] = json!(["PATH=/bin", "FOO=bar baz"]);
    s["process"]["cwd"] = json!("/tmp");
    s["process"]["user"] = json!({"uid": 1000, "gid": 1000, "additionalGids": [10, 20]});
    let (status, out, err) = agent.run("who", &s).await;
    assert_eq!(String::from_utf8_lossy(&err), "");
    assert_eq!(status, 0);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "bar baz\n/tmp\n1000\n1000\n1000 10 20\ncocoon-test\n"
    );
}

#[tokio::test]
async fn capabilities_no_new_privs_and_masked_paths() {
    require_root!();
    let agent = Agent::start().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    let s = spec(
        &rootfs,
        &sh("grep -E '^(Cap|NoNewPrivs)' /proc/self/status; \
             wc -c < /proc/timer_list; \
             echo 1 > /proc/sys/kernel/domainname 2>/dev/null && echo sys-rw || echo sys-ro; \
             echo fds $(ls /proc/self/fd)"),
    );
    let (status, out, _) = agent.run("caps", &s).await;
    assert_eq!(status, 0);
    let out = String::from_utf8(out).unwrap();
    // CAP_KILL (5), CAP_NET_BIND_SERVICE (10), CAP_AUDIT_WRITE (29).
    for set in ["CapPrm", "CapEff", "CapBnd"] {
        assert!(
            out.contains(&format!("{set}:\t0000000020000420")),
            "{set} in {out}"
        );
    }
    // Ambient needs inheritable, which the runc default spec leaves empty.
    for set in ["CapInh", "CapAmb"] {
        assert!(
            out.contains(&format!("{set}:\t0000000000000000")),
            "{set} in {out}"
        );
    }
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    // /proc/timer_list is /dev/null, /proc/sys is read-only.
    assert!(out.contains("\n0\n"), "{out}");
    assert!(out.contains("sys-ro"), "{out}");
    // Signals start at their defaults (Rust ignores SIGPIPE in the agent);
    // asked of the init itself, as busybox sh changes its own.
    let s = spec(
        &rootfs,
        &["grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"],
    );
    let (status, sigs, _) = agent.run("sigs", &s).await;
    assert_eq!(status, 0);
    assert_eq!(
        String::from_utf8(sigs).unwrap(),
        "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n"
    );
    // Nothing of the agent's leaks in: stdio, plus the one `ls` opened.
    assert!(out.contains("fds 0 1 2 3\n"), "{out}");
}

#[tokio::test]
async fn signals_exec_and_pids() {
    require_root!();
    let agent = Agent::start().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    let init = agent
        .create(
            "sig",
            &spec(&rootfs, &["sleep", "1000"]),
            streams(false, false, false),
        )
        .await
        .unwrap();
    agent.start_container("sig").await.unwrap();

    // An exec shares the container's pid namespace and reports its output.
    // It also sees the container's files, not the agent's.
    let p = process(&[
        "sh",
        "-c",
        "echo from-exec; echo $$; grep ^user: /etc/passwd",
    ]);
    agent
        .exec("sig", "e1", &p, streams(false, true, false))
        .await
        .unwrap();
    let mut out = agent.stream("stdout", "sig", "e1").await;
    assert_eq!(
        String::from_utf8(read_all(&mut out).await).unwrap(),
        "from-exec\n2\nuser:x:1000:1000::/tmp:/bin/sh\n"
    );
    assert_eq!(agent.wait("sig", "e1").await.unwrap().status, 0);

    // SIGKILL to a plain process: 128 + 9.
    let sleeper = agent
        .exec(
            "sig",
            "e2",
            &process(&["sleep", "1000"]),
            streams(false, false, false),
        )
        .await
        .unwrap();
    let mut req = ContainerRequest::new();
    req.container_id = "sig".into();
    let pids = agent.client.list_pids(ctx(), &req).await.unwrap();
    let listed: Vec<(u32, String)> = pids
        .processes
        .iter()
        .map(|p| (p.pid, p.exec_id.clone()))
        .collect();
    assert!(listed.contains(&(init, String::new())), "{listed:?}");
    assert!(listed.contains(&(sleeper, "e2".into())), "{listed:?}");
    // With `all` (containerd's WithProcessKill sends it for an exec too): that exec
    // alone, never the container's other processes.
    agent
        .signal("sig", "e2", libc::SIGKILL, true)
        .await
        .unwrap();
    assert_eq!(agent.wait("sig", "e2").await.unwrap().status, 137);
    assert!(alive(init as i32), "a signal to an exec reached the init");
    // Signalling it again: it is gone.
    let err = agent
        .signal("sig", "e2", libc::SIGTERM, false)
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("NOT_FOUND"), "{err:?}");

    // SIGKILL to the init: 128 + 9; the container is stopped.
    agent.signal("sig", "", libc::SIGKILL, false).await.unwrap();
    assert_eq!(agent.wait("sig", "").await.unwrap().status, 137);
    let err = agent
        .exec(
            "sig",
            "e3",
            &process(&["true"]),
            streams(false, false, false),
        )
        .await
        .unwrap_err();
    assert!(
        format!("{err:?}").contains("FAILED_PRECONDITION"),
        "{err:?}"
    );
    agent.remove("sig").await.unwrap();
    assert!(!alive(init as i32));
}

#[tokio::test]
async fn signal_all_and_remove_kill_everything() {
    require_root!();
    let agent = Agent::start().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    // The init ignores SIGTERM (pid 1 without a handler); its children do not.
    let init = agent
        .create(
            "all",
            &spec(&rootfs, &sh("sleep 1000 & sleep 1000 & wait")),
            streams(false, false, false),
        )
        .await
        .unwrap();
    agent.start_container("all").await.unwrap();
    let mut req = ContainerRequest::new();
    req.container_id = "all".into();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let pids = loop {
        let r = agent.client.list_pids(ctx(), &req).await.unwrap();
        if r.processes.len() == 3 {
            break r.processes;
        }
        assert!(std::time::Instant::now() < deadline, "{r:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let children: Vec<i32> = pids
        .iter()
        .map(|p| p.pid as i32)
        .filter(|p| *p != init as i32)
        .collect();
    agent.signal("all", "", libc::SIGTERM, true).await.unwrap();
    // The children die; the init survives SIGTERM, and its `wait` returns.
    assert_eq!(agent.wait("all", "").await.unwrap().status, 0);
    for c in children {
        assert!(!alive(c));
    }
    agent.remove("all").await.unwrap();

    // Remove of a running container kills it.
    let pid = agent
        .create(
            "rm",
            &spec(&rootfs, &["sleep", "1000"]),
            streams(false, false, false),
        )
        .await
        .unwrap();
    agent.start_container("rm").await.unwrap();
    agent.remove("rm").await.unwrap();
    assert!(!alive(pid as i32));
    // And of a created, never started one.
    let pid = agent
        .create(
            "rm2",
            &spec(&rootfs, &["sleep", "1000"]),
            streams(false, false, false),
        )
        .await
        .unwrap();
    agent.remove("rm2").await.unwrap();
    assert!(!alive(pid as i32));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_output_is_byte_exact_with_back_pressure() {
    require_root!();
    let agent = Agent::start().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    let n = 800_000;
    let s = spec(&rootfs, &["seq", "1", &n.to_string()]);
    agent
        .create("big", &s, streams(false, true, false))
        .await
        .unwrap();
    agent.start_container("big").await.unwrap();
    // Nobody reads yet: the pipe fills and `seq` blocks instead of the
    // agent buffering, so it cannot finish.
    let waiting = tokio::time::timeout(Duration::from_millis(500), agent.wait("big", "")).await;
    assert!(waiting.is_err(), "seq finished without a reader");
    let mut out = agent.stream("stdout", "big", "").await;
    let got = read_all(&mut out).await;
    let want: String = (1..=n).map(|i| format!("{i}\n")).collect();
    assert!(want.len() > 5 << 20);
    assert_eq!(got.len(), want.len());
    assert!(got == want.as_bytes());
    assert_eq!(agent.wait("big", "").await.unwrap().status, 0);
    agent.remove("big").await.unwrap();
}

#[tokio::test]
async fn waiters_see_the_same_status_before_and_after_exit() {
    require_root!();
    let agent = Agent::start().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    agent
        .create(
            "w",
            &spec(&rootfs, &sh("read x; exit 7")),
            streams(true, false, false),
        )
        .await
        .unwrap();
    agent.start_container("w").await.unwrap();
    let (a, b, close) = tokio::join!(agent.wait("w", ""), agent.wait("w", ""), async {
        // stdin was requested but never connected: CloseStdin ends `read`.
        let mut req = ProcessRequest::new();
        req.container_id = "w".into();
        agent.client.close_stdin(ctx(), &req).await
    });
    close.unwrap();
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!((a.status, b.status), (7, 7));
    assert_eq!(a.exited_at_ns, b.exited_at_ns);
    let late = agent.wait("w", "").await.unwrap();
    assert_eq!((late.status, late.exited_at_ns), (7, a.exited_at_ns));
    assert!(a.exited_at_ns > 1_600_000_000_000_000_000);
    agent.remove("w").await.unwrap();
}

#[tokio::test]
async fn terminal_resize_reaches_the_process() {
    require_root!();
    let agent = Agent::start().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    let mut stdio = streams(true, true, false);
    stdio.terminal = true;
    let mut s = spec(&rootfs, &sh("stty size; read x; stty size; tty"));
    s["process"]["terminal"] = json!(true);
    s["process"]["consoleSize"] = json!({"height": 20, "width": 70});
    agent.create("tty", &s, stdio).await.unwrap();
    let mut input = agent.stream("stdin", "tty", "").await;
    let mut out = agent.stream("stdout", "tty", "").await;
    agent.start_container("tty").await.unwrap();
    let mut got = Vec::new();
    // consoleSize applies from the start...
    read_until(&mut out, &mut got, "20 70\r\n").await;
    let mut req = TtyWinResizeRequest::new();
    req.container_id = "tty".into();
    req.rows = 33;
    req.columns = 101;
    agent.client.tty_win_resize(ctx(), &req).await.unwrap();
    input.write_all(b"go\n").await.unwrap();
    // ...and the resize once the process reads on.
    read_until(&mut out, &mut got, "/dev/").await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("go\r\n33 101\r\n"), "{text:?}");
    // The terminal is the controlling tty, from the container's devpts.
    assert!(text.contains("/dev/pts/0"), "{text:?}");
    assert_eq!(agent.wait("tty", "").await.unwrap().status, 0);
    agent.remove("tty").await.unwrap();
}

#[tokio::test]
async fn exec_with_a_terminal() {
    require_root!();
    let agent = Agent::start().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    agent
        .create(
            "et",
            &spec(&rootfs, &["sleep", "1000"]),
            streams(false, false, false),
        )
        .await
        .unwrap();
    agent.start_container("et").await.unwrap();
    let mut stdio = streams(true, true, false);
    stdio.terminal = true;
    let mut p = process(&["sh", "-c", "read x; echo got-$x; stty size"]);
    p["terminal"] = json!(true);
    agent.exec("et", "sh", &p, stdio).await.unwrap();
    let mut req = TtyWinResizeRequest::new();
    req.container_id = "et".into();
    req.exec_id = "sh".into();
    req.rows = 12;
    req.columns = 34;
    agent.client.tty_win_resize(ctx(), &req).await.unwrap();
    let mut input = agent.stream("stdin", "et", "sh").await;
    let mut out = agent.stream("stdout", "et", "sh").await;
    input.write_all(b"abc\n").await.unwrap();
    let text = String::from_utf8(read_all(&mut out).await).unwrap();
    assert!(text.contains("got-abc\r\n12 34\r\n"), "{text:?}");
    assert_eq!(agent.wait("et", "sh").await.unwrap().status, 0);
    agent.remove("et").await.unwrap();
}

/// kubelet's exec probes run every few seconds for the life of a pod: once its exit is
/// collected, an exec (its process record, its terminal) must be forgotten, or the guest
/// runs out of fds and memory. A second wait still gets the status.
#[tokio::test]
async fn exec_processes_are_forgotten_once_waited() {
    require_root!();
    let agent = Agent::start().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    agent
        .create(
            "probe",
            &spec(&rootfs, &["sleep", "1000"]),
            streams(false, false, false),
        )
        .await
        .unwrap();
    agent.start_container("probe").await.unwrap();
    let mut fds = Vec::new();
    for i in 0..40 {
        let id = format!("probe-{i}");
        let mut stdio = streams(false, true, false);
        stdio.terminal = true;
        let mut p = process(&["true"]);
        p["terminal"] = json!(true);
        agent.exec("probe", &id, &p, stdio).await.unwrap();
        let mut out = agent.stream("stdout", "probe", &id).await;
        read_all(&mut out).await;
        assert_eq!(agent.wait("probe", &id).await.unwrap().status, 0);
        assert_eq!(
            agent.wait("probe", &id).await.unwrap().status,
            0,
            "a second wait"
        );
        fds.push(agent.open_fds());
    }
    // The first few execs may grow lazily made state (a thread, a cached fd); after that
    // the count must stay flat.
    assert!(
        fds[39] <= fds[9] + 2,
        "the agent's fds grow with each exec: {fds:?}"
    );
    let e = agent
        .signal("probe", "probe-0", 15, false)
        .await
        .unwrap_err();
    assert!(format!("{e:?}").contains("NOT_FOUND"), "{e:?}");
    agent.remove("probe").await.unwrap();
}

#[tokio::test]
async fn terminal_comes_from_the_containers_own_devpts() {
    require_root!();
    let agent = Agent::start().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    let mut stdio = streams(true, true, false);
    stdio.terminal = true;
    // As with runc: the init's terminal is /dev/pts/0 of the container's own
    // devpts instance (the only pty in it), bound over /dev/console, and
    // owned by the process's user.
    let mut s = spec(
        &rootfs,
        &sh("tty; echo pts: /dev/pts/*; \
             stat -c 'owner %u dev %t:%T' $(tty) /dev/console; echo ready; read x"),
    );
    s["process"]["terminal"] = json!(true);
    s["process"]["user"] = json!({"uid": 1000, "gid": 1000});
    agent.create("pts", &s, stdio).await.unwrap();
    let mut input = agent.stream("stdin", "pts", "").await;
    let mut out = agent.stream("stdout", "pts", "").await;
    agent.start_container("pts").await.unwrap();
    let mut got = Vec::new();
    read_until(&mut out, &mut got, "ready").await;
    let text = String::from_utf8_lossy(&got).replace('\r', "");
    assert_eq!(
        text,
        "/dev/pts/0\npts: /dev/pts/0 /dev/pts/ptmx\n\
         owner 1000 dev 88:0\nowner 1000 dev 88:0\nready\n"
    );

    // An exec with a terminal gets the next pty of the same instance.
    let mut stdio = streams(false, true, false);
    stdio.terminal = true;
    let mut p = process(&["tty"]);
    p["terminal"] = json!(true);
    agent.exec("pts", "t", &p, stdio).await.unwrap();
    let mut exec_out = agent.stream("stdout", "pts", "t").await;
    assert_eq!(
        String::from_utf8(read_all(&mut exec_out).await).unwrap(),
        "/dev/pts/1\r\n"
    );
    assert_eq!(agent.wait("pts", "t").await.unwrap().status, 0);

    input.write_all(b"\n").await.unwrap();
    assert_eq!(agent.wait("pts", "").await.unwrap().status, 0);
    agent.remove("pts").await.unwrap();
}

#[tokio::test]
async fn readonly_root_and_bind_mounts() {
    require_root!();
    let agent = Agent::start().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    let rw = agent.dir.path().join("rw");
    let ro = agent.dir.path().join("ro");
    std::fs::create_dir_all(&rw).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::write(ro.join("given"), "from the host\n").unwrap();
    let mut s = spec(
        &rootfs,
        &sh("touch /x 2>/dev/null && echo root-rw || echo root-ro; \
             echo hi > /data-rw/f && echo rw-ok; \
             cat /data-ro/given; \
             touch /data-ro/f 2>/dev/null && echo ro-bad || echo ro-ok; \
             touch /tmp/x && echo tmp-ok"),
    );
    s["root"]["readonly"] = json!(true);
    let mounts = s["mounts"].as_array_mut().unwrap();
    mounts.push(json!({"destination": "/data-rw", "type": "bind", "source": rw, "options": ["rbind", "rw"]}));
    mounts.push(json!({"destination": "/data-ro", "type": "bind", "source": ro, "options": ["rbind", "ro"]}));
    // The rootfs is read-only: mount points must already exist.
    std::fs::create_dir_all(rootfs.join("data-rw")).unwrap();
    std::fs::create_dir_all(rootfs.join("data-ro")).unwrap();
    let (status, out, err) = agent.run("mnt", &s).await;
    assert_eq!(String::from_utf8_lossy(&err), "");
    assert_eq!(status, 0);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "root-ro\nrw-ok\nfrom the host\nro-ok\ntmp-ok\n"
    );
    assert_eq!(std::fs::read_to_string(rw.join("f")).unwrap(), "hi\n");
    assert!(!ro.join("f").exists());
    assert!(!rootfs.join("x").exists());
}

#[tokio::test]
async fn sysctls_are_set_before_proc_sys_turns_read_only() {
    require_root!();
    let agent = Agent::start().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    // containerd's CRI sets this one for every pod; /proc/sys is among the
    // spec's read-only paths, so runc writes sysctls before applying those.
    let mut s = spec(
        &rootfs,
        &["cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start"],
    );
    s["linux"]["sysctl"] = json!({"net.ipv4.ip_unprivileged_port_start": "0"});
    let (status, out, err) = agent.run("sysctl", &s).await;
    assert_eq!(String::from_utf8_lossy(&err), "");
    assert_eq!((status, String::from_utf8(out).unwrap()), (0, "0\n".into()));
}

#[tokio::test]
async fn seccomp_profile_is_enforced() {
    require_root!();
    let agent = Agent::start().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    let mut s = spec(
        &rootfs,
        &sh("mkdir /tmp/d 2>/dev/null && echo mkdir-ok || echo mkdir-denied; touch /tmp/f && echo touch-ok"),
    );
    s["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    let (status, out, _) = agent.run("sec", &s).await;
    assert_eq!(status, 0);
    assert_eq!(String::from_utf8(out).unwrap(), "mkdir-denied\ntouch-ok\n");
}

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    require_root!();
    let agent = Agent::start().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    let code = |e: ttrpc::Error| format!("{e:?}");

    let err = agent.start_container("nope").await.unwrap_err();
    assert!(code(err).contains("NOT_FOUND"));
    let err = agent
        .create(
            "bad",
            &json!({"ociVersion": "1.0.2"}),
            streams(false, false, false),
        )
        .await
        .unwrap_err();
    assert!(code(err).contains("INVALID_ARGUMENT"));
    let err = agent
        .create(
            "../x",
            &spec(&rootfs, &["true"]),
            streams(false, false, false),
        )
        .await
        .unwrap_err();
    assert!(code(err).contains("INVALID_ARGUMENT"));

    // A missing executable fails at start, with the name in the message.
    agent
        .create(
            "noexe",
            &spec(&rootfs, &["/bin/does-not-exist"]),
            streams(false, false, false),
        )
        .await
        .unwrap();
    let err = agent.start_container("noexe").await.unwrap_err();
    assert!(code(err).contains("does-not-exist"));
    agent.remove("noexe").await.unwrap();

    // A rootfs that does not exist fails at create.
    let err = agent
        .create(
            "noroot",
            &spec(&agent.dir.path().join("missing"), &["true"]),
            streams(false, false, false),
        )
        .await
        .unwrap_err();
    assert!(code(err).contains("rootfs"), "{}", "rootfs");

    // A bad stream header is closed without a reply.
    let mut s = tokio::net::UnixStream::connect(agent.stdio_path())
        .await
        .unwrap();
    s.write_all(b"bogus header\n").await.unwrap();
    assert!(read_all(&mut s).await.is_empty());
}

#[tokio::test]
async fn no_pivot_root_switch_as_from_an_initramfs() {
    require_root!();
    // In the guest the agent's root is the initramfs, where pivot_root is
    // refused; the agent then moves the rootfs over / and chroots.
    let agent = Agent::start_with(&["--no-pivot"]).await;
    let rootfs = busybox_rootfs(agent.dir.path());
    let mut s = spec(
        &rootfs,
        &sh("echo $(ls /); wc -c < /proc/timer_list; touch /x 2>/dev/null || echo root-ro"),
    );
    s["root"]["readonly"] = json!(true);
    let (status, out, err) = agent.run("np", &s).await;
    assert_eq!(String::from_utf8_lossy(&err), "");
    assert_eq!(status, 0);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "bin dev etc proc root sys tmp\n0\nroot-ro\n"
    );

    // An exec's terminal comes from the container's devpts here too: setns
    // into the mount namespace lands on the rootfs moved over /.
    agent
        .create(
            "npx",
            &spec(&rootfs, &["sleep", "1000"]),
            streams(false, false, false),
        )
        .await
        .unwrap();
    agent.start_container("npx").await.unwrap();
    let mut stdio = streams(false, true, false);
    stdio.terminal = true;
    let mut p = process(&["sh", "-c", "tty; echo $(ls /)"]);
    p["terminal"] = json!(true);
    agent.exec("npx", "t", &p, stdio).await.unwrap();
    let mut out = agent.stream("stdout", "npx", "t").await;
    assert_eq!(
        String::from_utf8(read_all(&mut out).await).unwrap(),
        "/dev/pts/0\r\nbin dev etc proc root sys tmp\r\n"
    );
    agent.remove("npx").await.unwrap();
}
