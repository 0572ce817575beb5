//! `ctr run` with runc and with cocoon, on a private containerd, asserting the
//! same observable result: stdout, stderr, exit code. Real containerd, real
//! guest (QEMU; TCG here), real virtiofsd.

use std::process::Output;
use std::time::Duration;

use cocoon_integration::containerd::Containerd;
use cocoon_integration::image::IMAGE_REF;
use cocoon_integration::{leftover_entries, processes_mentioning, test_config, wait_gone};
use cocoon_nested::testing::{hardware_kvm, Place};

struct Env {
    containerd: Containerd,
    run_dir: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Env {
    /// Our shims serving this test's containerd (tests run in parallel).
    fn shims(&self) -> Vec<(u32, String)> {
        let addr = self.containerd.address.to_string_lossy().into_owned();
        processes_mentioning("containerd-shim-cocoon-v2")
            .into_iter()
            .filter(|(_, cmd)| cmd.contains(&addr))
            .collect()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Runs after a failed assertion too: stop containerd, kill its shims
        // (their VMs die with them), undo what they mounted.
        self.containerd.stop_and_kill_shims();
        cocoon_integration::unmount_under(self._dir.path());
    }
}

/// A private containerd with the test image, for one test (nextest runs
/// each test in its own process).
fn env() -> Env {
    env_on(None)
}

/// The same, with the shim's `hypervisor` set (None: the default, auto).
fn env_on(hypervisor: Option<&str>) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let config = test_config(&run_dir, Duration::from_secs(90));
    let config_path = dir.path().join("cocoon.toml");
    let mut toml = toml_of(&config);
    if let Some(h) = hypervisor {
        toml = format!("hypervisor = {h:?}\n{toml}");
    }
    std::fs::write(&config_path, toml).unwrap();
    let containerd = Containerd::start(&dir.path().join("containerd"), &config_path);
    containerd.import_busybox();
    Env {
        containerd,
        run_dir,
        _dir: dir,
    }
}

fn toml_of(c: &cocoon_shim::config::Config) -> String {
    format!(
        "[vm]\nkernel = {:?}\ninitrd = {:?}\nboot_timeout_ms = {}\n[paths]\nrun_dir = {:?}\n",
        c.vm.kernel, c.vm.initrd, c.vm.boot_timeout_ms, c.paths.run_dir
    )
}

const COCOON: &str = "io.containerd.cocoon.v2";
const RUNC: &str = "io.containerd.runc.v2";

fn ctr_run(env: &Env, runtime: &str, id: &str, flags: &[&str], cmd: &[&str]) -> Output {
    let mut args = vec!["run", "--rm", "--runtime", runtime];
    args.extend_from_slice(flags);
    args.push(IMAGE_REF);
    args.push(id);
    args.extend_from_slice(cmd);
    env.containerd.ctr(&args)
}

/// An output for messages: long streams are cut, with their length and hash.
fn show(o: &Output) -> String {
    fn cut(b: &[u8]) -> String {
        use sha2::Digest;
        if b.len() <= 2000 {
            return format!("{:?}", String::from_utf8_lossy(b));
        }
        format!(
            "{} bytes, sha256 {}, starting {:?}",
            b.len(),
            hex::encode(sha2::Sha256::digest(b)),
            String::from_utf8_lossy(&b[..200])
        )
    }
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        cut(&o.stdout),
        cut(&o.stderr)
    )
}

/// Runs `cmd` under runc and cocoon and asserts identical stdout, stderr and exit code.
fn same(name: &str, flags: &[&str], cmd: &[&str]) -> Output {
    let env = env();
    let out = same_in(&env, name, flags, cmd);
    assert_clean(&env);
    out
}

/// `same` on a given containerd.
///
/// containerd 1.6's runc shim sometimes drops the last bytes of a container
/// that exits at once (seen on fresh machines: runc's `echo $?` line missing
/// while cocoon's was there). The baseline is then run again, up to twice;
/// cocoon gets one run and must equal a runc run exactly.
fn same_in(env: &Env, name: &str, flags: &[&str], cmd: &[&str]) -> Output {
    let c = ctr_run(env, COCOON, &format!("{name}-cocoon"), flags, cmd);
    let matches = |r: &Output| {
        r.status.code() == c.status.code() && r.stdout == c.stdout && r.stderr == c.stderr
    };
    let mut runs = Vec::new();
    for attempt in 0..3 {
        let r = ctr_run(env, RUNC, &format!("{name}-runc{attempt}"), flags, cmd);
        let ok = matches(&r);
        runs.push(r);
        if ok {
            return c;
        }
    }
    let runc: Vec<String> = runs.iter().map(show).collect();
    panic!(
        "\nrunc (3 runs):\n{}\ncocoon: {}\ncontainerd log:\n{}",
        runc.join("\n"),
        show(&c),
        env.containerd.log_tail()
    );
}

/// `ctr run` on cocoon-vmm, our own VMM, against runc. It needs hardware KVM, so
/// on these hosts it reruns inside an L1 guest (the nested harness), where runc
/// also has a cgroup v2 host like the guest's.
#[test]
fn cocoon_vmm_runs_containers_like_runc() {
    if hardware_kvm("cocoon_vmm_runs_containers_like_runc") == Place::Done {
        return;
    }
    let env = env_on(Some("cocoon-vmm"));
    let out = same_in(
        &env,
        "vmm-split",
        &["--env", "FOO=bar", "--cwd", "/tmp"],
        &["sh", "-c", "echo \"$FOO\"; pwd; echo err >&2; exit 3"],
    );
    assert_eq!(out.stdout, b"bar\n/tmp\n");
    assert_eq!(out.status.code(), Some(3));
    same_in(&env, "vmm-host", &[], &["hostname"]);
    // L1 is a cgroup v2 host like the guest: runc can be compared for what a
    // container sees of its own cgroup (namespace root, limits). ctr 1.6 asks
    // for no cgroup namespace (CRI and Docker do on v2), so the spec does.
    let spec = spec_file(&env, "vmm-cg", |spec| {
        spec["process"]["args"] = serde_json::json!([
            "cat",
            "/sys/fs/cgroup/memory.max",
            "/sys/fs/cgroup/cpu.max",
            "/proc/self/cgroup"
        ]);
        let linux = &mut spec["linux"];
        linux["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"type": "cgroup"}));
        linux["resources"]["memory"] = serde_json::json!({"limit": 67108864});
        linux["resources"]["cpu"] = serde_json::json!({"quota": 50000, "period": 100000});
        spec["mounts"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "destination": "/sys/fs/cgroup",
                "type": "cgroup",
                "source": "cgroup",
                "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]
            }));
    });
    let run = |runtime: &str, id: &str| {
        env.containerd
            .ctr(&["run", "--rm", "--runtime", runtime, "--config", &spec, id])
    };
    let (r, c) = (run(RUNC, "vmm-cg-runc"), run(COCOON, "vmm-cg-cocoon"));
    assert_eq!(
        (r.status.code(), &r.stdout, &r.stderr),
        (c.status.code(), &c.stdout, &c.stderr),
        "\nrunc: {}\ncocoon: {}",
        show(&r),
        show(&c)
    );
    let out = c;
    assert_eq!(out.stdout, b"67108864\n50000 100000\n0::/\n");
    // And the terminal's name.
    let tty = |runtime: &str, id: &str| {
        let (mut child, mut master) = ctr_on_a_pty(
            &env,
            &[
                "run",
                "--rm",
                "-t",
                "--runtime",
                runtime,
                IMAGE_REF,
                id,
                "tty",
            ],
        );
        let mut acc = Vec::new();
        read_until(&mut master, &mut acc, |s| {
            s.split_once("/dev/")
                .is_some_and(|(_, rest)| rest.contains('\n'))
        });
        let _ = child.wait();
        String::from_utf8_lossy(&acc).replace('\r', "")
    };
    assert_eq!(tty(RUNC, "vmm-tty-runc"), tty(COCOON, "vmm-tty-cocoon"));
    same_in(
        &env,
        "vmm-caps",
        &["--cap-drop", "CAP_CHOWN"],
        &["sh", "-c", "grep -E '^(Cap|NoNewPrivs)' /proc/self/status"],
    );
    // The pod's VM really is a cocoon-vmm process, not QEMU.
    with_detached(&env, COCOON, "vmm-d", &[], |env, _| {
        let procs = processes_mentioning(&env.run_dir.to_string_lossy());
        assert!(
            procs.iter().any(|(_, c)| c.contains("cocoon-vmm run")),
            "{procs:?}"
        );
        assert!(
            !procs.iter().any(|(_, c)| c.contains("qemu-system")),
            "{procs:?}"
        );
    });
    assert_clean(&env);
}

/// Nothing of ours is left once the tasks are gone.
fn assert_clean(env: &Env) {
    let procs = processes_mentioning(&env.run_dir.to_string_lossy());
    let pids: Vec<u32> = procs.iter().map(|p| p.0).collect();
    let left = wait_gone(&pids, Duration::from_secs(10));
    assert!(left.is_empty(), "processes left: {procs:?}");
    let shims = env.shims();
    let shim_pids: Vec<u32> = shims.iter().map(|p| p.0).collect();
    assert!(
        wait_gone(&shim_pids, Duration::from_secs(10)).is_empty(),
        "shims left: {shims:?}"
    );
    let vm_dirs: Vec<_> = leftover_entries(&env.run_dir)
        .into_iter()
        .filter(|p| !p.ends_with("shares") && !p.ends_with("timings.jsonl"))
        .collect();
    assert!(vm_dirs.is_empty(), "left in run dir: {vm_dirs:?}");
    assert!(
        leftover_entries(&env.run_dir.join("shares")).is_empty(),
        "shares left"
    );
    let mounts = cocoon_integration::mounts_under(&env.run_dir);
    assert!(mounts.is_empty(), "mounts left: {mounts:?}");
}

#[test]
fn echo() {
    let out = same("echo", &[], &["echo", "hello from a cocoon"]);
    assert_eq!(out.stdout, b"hello from a cocoon\n");
}

#[test]
fn hostname_matches() {
    same("hostname", &[], &["hostname"]);
}

#[test]
fn exit_codes() {
    for code in [0, 1, 42] {
        let out = same(
            &format!("exit{code}"),
            &[],
            &["sh", "-c", &format!("echo bye; exit {code}")],
        );
        assert_eq!(out.status.code(), Some(code));
    }
}

#[test]
fn env_and_cwd() {
    let out = same(
        "envcwd",
        &["--env", "FOO=bar baz", "--cwd", "/tmp"],
        &["sh", "-c", "echo \"$FOO\"; pwd; echo $PATH"],
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("bar baz\n/tmp\n"));
}

#[test]
fn stdout_and_stderr_stay_apart() {
    let out = same(
        "split",
        &[],
        &[
            "sh",
            "-c",
            "echo out1; echo err1 >&2; echo out2; echo err2 >&2; exit 3",
        ],
    );
    assert_eq!(out.stdout, b"out1\nout2\n");
    assert_eq!(out.stderr, b"err1\nerr2\n");
}

#[test]
fn twenty_megabytes_of_stdout_byte_exact() {
    // 20 MB of a repeating, position-revealing pattern: loss or reordering
    // changes the bytes, not just the count.
    let out = same(
        "bulk",
        &[],
        &["sh", "-c", "seq 1 3000000 | head -c 20000000"],
    );
    assert_eq!(out.stdout.len(), 20_000_000);
}

#[test]
fn capabilities_and_no_new_privs() {
    let out = same(
        "caps",
        &[],
        &[
            "sh",
            "-c",
            "grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs)' /proc/self/status",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("CapEff") && text.contains("NoNewPrivs"),
        "{text}"
    );
    let out = same(
        "capdrop",
        &["--cap-drop", "CAP_CHOWN"],
        &[
            "sh",
            "-c",
            "grep CapEff /proc/self/status; chown 1 /tmp; echo $?",
        ],
    );
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("1\n"));
}

/// A full spec for `ctr run --config` (which takes the rootfs from the spec
/// too): `ctr oci spec` with a busybox rootfs of its own, `PATH=/bin`, a cgroup
/// of its own, then `edit`. Returns the file's path.
fn spec_file(env: &Env, name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let spec = env.containerd.ctr(&["oci", "spec"]);
    assert!(spec.status.success(), "{}", show(&spec));
    let mut spec: serde_json::Value = serde_json::from_slice(&spec.stdout).unwrap();
    let rootfs = env.containerd.dir.join(format!("{name}-rootfs"));
    cocoon_integration::image::write_rootfs(std::path::Path::new("/bin/busybox"), &rootfs);
    spec["root"] = serde_json::json!({"path": rootfs, "readonly": false});
    spec["process"]["env"] = serde_json::json!(["PATH=/bin"]);
    // `ctr oci spec` puts every container in the cgroup `/default` itself, the
    // parent of every other test's `/default/<id>`. On this host's cgroup v1,
    // runc then rewrites the devices list of a cgroup that has children, which
    // the kernel refuses (EINVAL), and narrows what the siblings may allow:
    // tests running in parallel failed each other. A cgroup of its own.
    spec["linux"]["cgroupsPath"] =
        serde_json::json!(format!("/cocoon-test-{name}-{}", std::process::id()));
    edit(&mut spec);
    let path = env.containerd.dir.join(format!("{name}-spec.json"));
    std::fs::write(&path, serde_json::to_vec(&spec).unwrap()).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn user_and_groups_from_the_spec() {
    let env = env();
    let p = spec_file(&env, "user", |spec| {
        spec["process"]["args"] = serde_json::json!(["id"]);
        // This host's nested cgroup v1 devices controller rejects the default
        // device rules runc would write; they are not what this test is about.
        spec["linux"].as_object_mut().unwrap().remove("resources");
        spec["process"]["user"] =
            serde_json::json!({"uid": 1000, "gid": 1000, "additionalGids": [2000, 3000]});
    });
    let run = |runtime: &str, id: &str| {
        env.containerd
            .ctr(&["run", "--rm", "--runtime", runtime, "--config", &p, id])
    };
    let r = run(RUNC, "user-runc");
    let c = run(COCOON, "user-cocoon");
    assert_eq!(
        (r.status.code(), &r.stdout, &r.stderr),
        (c.status.code(), &c.stdout, &c.stderr),
        "\nrunc: {}\ncocoon: {}",
        show(&r),
        show(&c)
    );
    assert!(
        String::from_utf8_lossy(&c.stdout).contains("uid=1000"),
        "{}",
        show(&c)
    );
    assert_clean(&env);
}

#[test]
fn stdin_is_piped_in() {
    let env = env();
    let run = |runtime: &str, id: &str| {
        use std::io::Write;
        let mut child = env
            .containerd
            .ctr_cmd(&[
                "run",
                "--rm",
                "--runtime",
                runtime,
                IMAGE_REF,
                id,
                "head",
                "-n",
                "2",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        // ctr does not close stdin at EOF; `head -n 2` stops by itself.
        stdin
            .write_all(b"first line\nsecond line\nthird line\n")
            .unwrap();
        let out = child.wait_with_output().unwrap();
        drop(stdin);
        out
    };
    let r = run(RUNC, "stdin-runc");
    let c = run(COCOON, "stdin-cocoon");
    assert_eq!(show(&r), show(&c));
    assert_eq!(
        String::from_utf8_lossy(&c.stdout),
        "first line\nsecond line\n"
    );
    assert_clean(&env);
}

#[test]
fn readonly_rootfs() {
    let out = same(
        "ro",
        &["--read-only"],
        &[
            "sh",
            "-c",
            "touch /newfile; echo $?; touch /tmp/x 2>/dev/null; echo $?",
        ],
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("1\n"));
}

#[test]
fn bind_mounts_ro_and_rw() {
    let env = env();
    let host = env.containerd.dir.join("bind");
    std::fs::create_dir_all(&host).unwrap();
    std::fs::write(host.join("f"), "from the host\n").unwrap();
    let h = host.to_string_lossy().into_owned();
    let ro = format!("type=bind,src={h},dst=/data,options=rbind:ro");
    let rw = format!("type=bind,src={h},dst=/data,options=rbind:rw");
    for (name, m, cmd) in [
        (
            "bro",
            &ro,
            "cat /data/f; echo x > /data/new 2>/dev/null; echo $?",
        ),
        (
            "brw",
            &rw,
            "cat /data/f; echo written-$0 > /data/out-$0; echo $?",
        ),
    ] {
        let r = ctr_run(
            &env,
            RUNC,
            &format!("{name}-runc"),
            &["--mount", m],
            &["sh", "-c", cmd, "runc"],
        );
        let c = ctr_run(
            &env,
            COCOON,
            &format!("{name}-cocoon"),
            &["--mount", m],
            &["sh", "-c", cmd, "runc"],
        );
        assert_eq!(
            (r.status.code(), &r.stdout),
            (c.status.code(), &c.stdout),
            "\nrunc: {}\ncocoon: {}",
            show(&r),
            show(&c)
        );
    }
    assert!(
        !host.join("new").exists(),
        "a read-only bind mount was written"
    );
    assert_eq!(
        std::fs::read_to_string(host.join("out-runc")).unwrap(),
        "written-runc\n"
    );
    assert_clean(&env);
}

/// Waits until `pred` holds for the output read so far from `r`, with a deadline.
fn read_until(r: &mut impl std::io::Read, acc: &mut Vec<u8>, pred: impl Fn(&str) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut buf = [0u8; 4096];
    while !pred(&String::from_utf8_lossy(acc)) {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out; got {:?}",
            String::from_utf8_lossy(acc)
        );
        let n = r.read(&mut buf).unwrap();
        assert!(n > 0, "EOF; got {:?}", String::from_utf8_lossy(acc));
        acc.extend_from_slice(&buf[..n]);
    }
}

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
    out.read_to_end(&mut acc).unwrap();
    let status = child.wait().unwrap();
    (status.code(), String::from_utf8_lossy(&acc).into_owned())
}

fn ctr_ok(env: &Env, args: &[&str]) -> String {
    let o = env.containerd.ctr(args);
    assert!(o.status.success(), "ctr {args:?}: {}", show(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
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
    // until told (through exec) to finish.
    let ignore = [
        "sh",
        "-c",
        "echo ready; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo done",
    ];
    let cases: [SignalCase; 3] = [
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
                &["task", "exec", "--exec-id", "go", id, "touch", "/tmp/go"],
            );
        }),
    ];
    for (name, cmd, act) in cases {
        let r = interactive(&env, RUNC, &format!("sig{name}-runc"), cmd, act);
        let c = interactive(&env, COCOON, &format!("sig{name}-cocoon"), cmd, act);
        assert_eq!(r, c, "{name}: runc vs cocoon");
    }
    assert_clean(&env);
}

/// Runs a detached task, runs `f`, then kills and deletes it.
fn with_detached(env: &Env, runtime: &str, id: &str, flags: &[&str], f: impl FnOnce(&Env, &str)) {
    let mut args = vec!["run", "-d", "--runtime", runtime];
    args.extend_from_slice(flags);
    args.extend_from_slice(&[IMAGE_REF, id, "sh", "-c", "while true; do sleep 0.1; done"]);
    ctr_ok(env, &args);
    f(env, id);
    let _ = env.containerd.ctr(&["task", "kill", "-s", "SIGKILL", id]);
    wait_status(env, id, "STOPPED");
    ctr_ok(env, &["task", "delete", id]);
    ctr_ok(env, &["container", "delete", id]);
}

fn task_status(env: &Env, id: &str) -> String {
    let ls = ctr_ok(env, &["task", "ls"]);
    ls.lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("")
        .to_string()
}

fn wait_status(env: &Env, id: &str, want: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while task_status(env, id) != want {
        assert!(
            std::time::Instant::now() < deadline,
            "{id} never became {want}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn exec_pids_pause_resume() {
    let env = env();
    let mut events = env
        .containerd
        .ctr_cmd(&["events"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    for rt in [RUNC, COCOON] {
        let id = if rt == RUNC {
            "live-runc"
        } else {
            "live-cocoon"
        };
        with_detached(&env, rt, id, &[], |e, id| {
            assert_eq!(task_status(e, id), "RUNNING");
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
            let ps = ctr_ok(e, &["task", "ps", id]);
            // A header line and the container's init (its sleep may come and go).
            assert!(ps.lines().count() >= 2, "{rt}: {ps}");
            ctr_ok(e, &["task", "pause", id]);
            assert_eq!(task_status(e, id), "PAUSED", "{rt}");
            ctr_ok(e, &["task", "resume", id]);
            assert_eq!(task_status(e, id), "RUNNING", "{rt}");
        });
    }
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
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGWINCH,
        )
        .unwrap();
        // ctr forwards the resize asynchronously; give the guest the newline
        // once the size is visible to a second process in the container.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
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
        let _ = child.wait();
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

#[test]
fn oom_kill_exits_137_with_an_oom_event() {
    let env = env();
    let mut events = env
        .containerd
        .ctr_cmd(&["events"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // PID 1 itself grows without bound (awk doubling a string), so it is
    // what the OOM killer takes, and the container exits 137.
    let hog = [
        "sh",
        "-c",
        "echo start; exec awk 'BEGIN { s = \"x\"; while (1) s = s s }'",
    ];
    let flags = ["--memory-limit", "33554432"];
    let r = ctr_run(&env, RUNC, "oom-runc", &flags, &hog);
    let c = ctr_run(&env, COCOON, "oom-cocoon", &flags, &hog);
    assert_eq!(c.status.code(), Some(137), "{}", show(&c));
    assert_eq!(
        (r.status.code(), &r.stdout),
        (c.status.code(), &c.stdout),
        "\nrunc: {}\ncocoon: {}",
        show(&r),
        show(&c)
    );
    // The TaskOOM event for the cocoon container reached containerd.
    let _ = events.kill();
    let out = events.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains("/tasks/oom") && l.contains("oom-cocoon")),
        "no TaskOOM for oom-cocoon in:\n{text}"
    );
    assert_clean(&env);
}

#[test]
fn task_metrics() {
    let env = env();
    with_detached(
        &env,
        COCOON,
        "metrics",
        &["--memory-limit", "67108864"],
        |e, id| {
            let m = ctr_ok(e, &["task", "metrics", "--format", "json", id]);
            let v: serde_json::Value =
                serde_json::from_str(&m).unwrap_or_else(|err| panic!("{err}: {m}"));
            let data = &v;
            assert!(data["memory"]["usage"].as_u64().unwrap_or(0) > 0, "{m}");
            assert_eq!(
                data["memory"]["usage_limit"].as_u64(),
                Some(67108864),
                "{m}"
            );
            assert!(data["pids"]["current"].as_u64().unwrap_or(0) >= 1, "{m}");
            assert!(data["cpu"]["usage_usec"].as_u64().is_some(), "{m}");
        },
    );
    assert_clean(&env);
}

#[test]
fn shim_killed_then_task_delete_cleans_up() {
    let env = env();
    ctr_ok(
        &env,
        &[
            "run",
            "-d",
            "--runtime",
            COCOON,
            IMAGE_REF,
            "victim",
            "sh",
            "-c",
            "while true; do sleep 0.1; done",
        ],
    );
    assert_eq!(task_status(&env, "victim"), "RUNNING");
    let shims = env.shims();
    assert_eq!(shims.len(), 1, "{shims:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shims[0].0 as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // containerd notices the dead shim and runs `shim delete` on its own, or
    // when asked to delete the task.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let o = env.containerd.ctr(&["task", "delete", "--force", "victim"]);
        let gone = !ctr_ok(&env, &["task", "ls"]).contains("victim");
        if gone {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "task never deleted: {}",
            show(&o)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    ctr_ok(&env, &["container", "delete", "victim"]);
    assert_clean(&env);
}

#[test]
fn containerd_restart_keeps_the_task_reachable() {
    let mut env = env();
    ctr_ok(
        &env,
        &[
            "run",
            "-d",
            "--runtime",
            COCOON,
            IMAGE_REF,
            "survivor",
            "sh",
            "-c",
            "while true; do sleep 0.1; done",
        ],
    );
    env.containerd.restart();
    assert_eq!(task_status(&env, "survivor"), "RUNNING");
    let out = ctr_ok(
        &env,
        &[
            "task",
            "exec",
            "--exec-id",
            "after",
            "survivor",
            "echo",
            "still here",
        ],
    );
    assert_eq!(out, "still here\n");
    ctr_ok(&env, &["task", "kill", "-s", "SIGKILL", "survivor"]);
    wait_status(&env, "survivor", "STOPPED");
    ctr_ok(&env, &["task", "delete", "survivor"]);
    ctr_ok(&env, &["container", "delete", "survivor"]);
    assert_clean(&env);
}

/// The layout `make install PREFIX=<dir>` produces works with no config at
/// all: containerd finds the shim on its PATH, the shim finds cocoon-vmm next
/// to itself and the guest image in <prefix>/share/cocoon.
#[test]
fn installed_layout_needs_no_config() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("prefix");
    let bin = prefix.join("bin");
    let share = prefix.join("share/cocoon");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&share).unwrap();
    let root = cocoon_integration::workspace_root();
    for b in ["cocoon", "cocoon-vmm", "containerd-shim-cocoon-v2"] {
        std::fs::copy(root.join("target/debug").join(b), bin.join(b)).unwrap();
    }
    let image = cocoon_integration::image_dir();
    for f in ["vmlinuz", "initramfs.cpio"] {
        std::fs::copy(image.join(f), share.join(f)).unwrap();
    }
    // Only the prefix, the system, and wherever virtiofsd was installed.
    let virtiofsd = cocoon_integration::containerd::tool_path()
        .split(':')
        .find(|d| std::path::Path::new(d).join("virtiofsd").is_file())
        .expect("virtiofsd installed (scripts/setup-host.sh)")
        .to_string();
    let path = format!(
        "{}:{virtiofsd}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        bin.display()
    );
    let containerd = Containerd::start_with(&dir.path().join("containerd"), None, path);
    containerd.import_busybox();
    let out = containerd.ctr(&[
        "run",
        "--rm",
        "--runtime",
        COCOON,
        IMAGE_REF,
        "installed",
        "echo",
        "installed ok",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "installed ok\n",
        "{}\n{}",
        show(&out),
        containerd.log_tail()
    );
    // The default run dir (/run/cocoon) holds nothing of this pod afterwards.
    let vm = cocoon_shim::shimv2::sandbox_vm_id("default", "installed");
    let left = processes_mentioning(&vm);
    let pids: Vec<u32> = left.iter().map(|p| p.0).collect();
    assert!(
        wait_gone(&pids, Duration::from_secs(10)).is_empty(),
        "{left:?}"
    );
    assert!(!std::path::Path::new("/run/cocoon").join(&vm).exists());
    assert!(!std::path::Path::new("/run/cocoon/shares")
        .join(&vm)
        .exists());
}

/// A create that fails halfway (the VM is up, the spec names a bind source
/// that does not exist) fails like runc's, with the path named, and leaves
/// no shim, VM, mount or run directory behind.
#[test]
fn failed_create_fails_cleanly() {
    let env = env();
    let m = "type=bind,src=/nonexistent/cocoon-src,dst=/data,options=rbind:ro";
    let r = ctr_run(&env, RUNC, "badmount-runc", &["--mount", m], &["true"]);
    let c = ctr_run(&env, COCOON, "badmount-cocoon", &["--mount", m], &["true"]);
    assert!(!r.status.success(), "runc: {}", show(&r));
    assert!(!c.status.success(), "cocoon: {}", show(&c));
    assert!(
        String::from_utf8_lossy(&c.stderr).contains("/nonexistent/cocoon-src"),
        "the error should name the missing path: {}",
        show(&c)
    );
    // ctr leaves the container record after a failed create under both runtimes.
    for id in ["badmount-runc", "badmount-cocoon"] {
        let _ = env.containerd.ctr(&["container", "delete", id]);
    }
    assert_clean(&env);
}

/// Starts `ctr <args>` on a fresh pty, as a terminal user would, and hands
/// back the child and the pty's master. `ctr run -t` and `ctr task exec -t`
/// need a terminal on their stdin.
fn ctr_on_a_pty(env: &Env, args: &[&str]) -> (std::process::Child, std::fs::File) {
    let pty = nix::pty::openpty(None, None).unwrap();
    let slave: std::fs::File = pty.slave.into();
    let child = env
        .containerd
        .ctr_cmd(args)
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave)
        .spawn()
        .unwrap();
    (child, pty.master.into())
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
        let _ = exec.wait();
        master.write_all(b"\n").unwrap();
        let _ = init.wait();
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

/// A container reads its own limits: the guest is cgroup v2, so the agent
/// gives it a cgroup namespace rooted at its group, as runc does on a v2
/// host. runc on this cgroup v1 host cannot be compared: there the files are
/// per-controller v1 ones (memory.limit_in_bytes, cpu.cfs_quota_us).
/// `ctr run`'s default spec has no cgroup mount (under runc too, /sys/fs/cgroup
/// is then an empty directory of the fresh sysfs); the one CRI and Docker
/// put in every spec is given here.
#[test]
fn container_reads_its_own_cgroup_limits() {
    let env = env();
    let c = ctr_run(
        &env,
        COCOON,
        "cglimits-cocoon",
        &[
            "--memory-limit",
            "67108864",
            "--cpus",
            "0.5",
            "--mount",
            "type=cgroup,src=cgroup,dst=/sys/fs/cgroup,options=nosuid:noexec:nodev:relatime:ro",
        ],
        &[
            "sh",
            "-c",
            "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max; cat /proc/self/cgroup",
        ],
    );
    assert_eq!(
        (c.status.code(), String::from_utf8_lossy(&c.stdout).as_ref()),
        (Some(0), "67108864\n50000 100000\n0::/\n"),
        "{}",
        show(&c)
    );
    assert_clean(&env);
}
