//! `ctr run` with runc and with cocoon, on a private containerd, asserting the
//! same observable result: stdout, stderr, exit code. Real containerd, real
//! guest (QEMU; TCG here), real virtiofsd.

mod ctr_common;

use std::time::Duration;

use cocoon_integration::containerd::Containerd;
use cocoon_integration::image::IMAGE_REF;
use cocoon_integration::{processes_mentioning, wait_gone};
use cocoon_nested::testing::{hardware_kvm, Place};
use ctr_common::*;

/// `ctr run` on cocoon-vmm, our own VMM, against runc: streams, the hostname and a
/// container's own cgroup. It needs hardware KVM, so on these hosts it reruns inside an
/// L1 guest (the nested harness), where runc also has a cgroup v2 host like the guest's.
///
/// Two tests of three pods each rather than one of six: TCG's emulated SVM breaks an L1
/// now and then, and the harness's one fresh L1 must fit in what is left of the test's
/// time. A six-pod run took 290 s of L1 on a slow CI machine, which left a fresh L1
/// too little, and nextest's retry then cost the whole test again.
#[test]
fn cocoon_vmm_runs_containers_like_runc() {
    if hardware_kvm("cocoon_vmm_runs_containers_like_runc") == Place::Done {
        return;
    }
    let env = env_on(Some("cocoon-vmm"));
    // Each step says so: inside L1 the output is all a stuck run leaves.
    eprintln!("step: split streams, env and cwd");
    let out = same_in(
        &env,
        "vmm-split",
        &["--env", "FOO=bar", "--cwd", "/tmp"],
        &["sh", "-c", "echo \"$FOO\"; pwd; echo err >&2; exit 3"],
    );
    assert_eq!(out.stdout, b"bar\n/tmp\n");
    assert_eq!(out.status.code(), Some(3));
    eprintln!("step: hostname");
    same_in(&env, "vmm-host", &[], &["hostname"]);
    eprintln!("step: cgroup limits");
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
    let out = same_config(&env, &spec, "vmm-cg");
    assert_eq!(out.stdout, b"67108864\n50000 100000\n0::/\n");
    assert_clean(&env);
}

/// `ctr run` on cocoon-vmm against runc, the second half (see
/// `cocoon_vmm_runs_containers_like_runc`): a terminal's name, capabilities, and that
/// the pod's VM really is a cocoon-vmm process.
#[test]
fn cocoon_vmm_terminals_and_capabilities_like_runc() {
    if hardware_kvm("cocoon_vmm_terminals_and_capabilities_like_runc") == Place::Done {
        return;
    }
    let env = env_on(Some("cocoon-vmm"));
    eprintln!("step: tty");
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
        reap(&env, &mut child);
        String::from_utf8_lossy(&acc).replace('\r', "")
    };
    assert_eq!(tty(RUNC, "vmm-tty-runc"), tty(COCOON, "vmm-tty-cocoon"));
    eprintln!("step: capabilities");
    same_in(
        &env,
        "vmm-caps",
        &["--cap-drop", "CAP_CHOWN"],
        &["sh", "-c", "grep -E '^(Cap|NoNewPrivs)' /proc/self/status"],
    );
    eprintln!("step: the VMM process");
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

/// An open-file limit above the guest kernel's default `fs.nr_open` (a node whose
/// containerd runs with `LimitNOFILE=infinity` passes on the host's, often 2^30): the
/// agent raises `fs.nr_open` to it, as the host's must be, and the container gets it.
/// runc here cannot be compared: this machine's root may not go above 20 000.
#[test]
fn an_open_file_limit_above_the_guests_default_is_given() {
    let env = env();
    let spec = spec_file(&env, "nofile", |s| {
        s["process"]["args"] = serde_json::json!([
            "sh",
            "-c",
            "ulimit -n; ulimit -Hn; cat /proc/sys/fs/nr_open"
        ]);
        s["process"]["rlimits"] =
            serde_json::json!([{"type": "RLIMIT_NOFILE", "soft": 1048577, "hard": 1073741816}]);
    });
    let o = env.containerd.ctr(&[
        "run",
        "--rm",
        "--runtime",
        COCOON,
        "--config",
        &spec,
        "nofile",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "1048577\n1073741816\n1073741816\n",
        "{}",
        show(&o)
    );
    assert_clean(&env);
}

/// The device cgroup: root in the container may make any device node (runc allows
/// mknod of every one) but opens only those the spec and runc's defaults allow, so
/// `/dev/kmsg`'s numbers under another name stay shut, `/dev/null` open.
#[test]
fn device_nodes_outside_the_allowed_ones_cannot_be_opened() {
    let out = same(
        "devices",
        &[],
        &[
            "sh",
            "-c",
            "mknod /dev/kmsg2 c 1 11; echo mknod=$?; (exec 3</dev/kmsg2) 2>/dev/null; \
             echo open=$?; (exec 3</dev/null); echo null=$?",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("mknod=0") && !text.contains("open=0") && text.contains("null=0"),
        "{text}"
    );
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
    let c = same_config(&env, &p, "user");
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

/// A working directory the image lacks is made, 0755 and root's, as runc makes it;
/// also under a read-only root, where it is made before the root turns read-only.
#[test]
fn a_missing_working_directory_is_made_as_under_runc() {
    let script = "pwd; stat -c '%a %u:%g %n' /nope /nope/x";
    let out = same("cwd", &["--cwd", "/nope/x"], &["sh", "-c", script]);
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("/nope/x\n755 0:0 /nope\n"),
        "{}",
        show(&out)
    );
    same("cwd-ro", &["--read-only", "--cwd", "/nope/x"], &["pwd"]);
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

#[test]
fn oom_kill_exits_137_with_an_oom_event() {
    let env = env();
    let mut events = ctr_events(&env);
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

/// A container may use the memory its limit allows, as under runc: its VM grows by its
/// limit (`[vm] size_from_pod_limits`), where the default 256 MiB VM could not hold the
/// 300 MiB that dd's one block takes here.
#[test]
fn memory_up_to_its_limit_as_under_runc() {
    let flags = ["--memory-limit", "419430400"];
    let alloc = [
        "sh",
        "-c",
        "dd if=/dev/zero of=/dev/null bs=300M count=1 2>/dev/null && echo allocated",
    ];
    let c = same("limit", &flags, &alloc);
    assert_eq!(
        (c.status.code(), String::from_utf8_lossy(&c.stdout).as_ref()),
        (Some(0), "allocated\n"),
        "{}",
        show(&c)
    );
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
    // Only the prefix, the system, and wherever virtiofsd was installed (a
    // distribution's package puts it in /usr/libexec, which the shim looks in itself).
    let virtiofsd = cocoon_integration::containerd::tool_path()
        .split(':')
        .find(|d| std::path::Path::new(d).join("virtiofsd").is_file())
        .map(|d| format!("{d}:"))
        .or_else(|| {
            std::path::Path::new("/usr/libexec/virtiofsd")
                .is_file()
                .then(String::new)
        })
        .expect("virtiofsd installed (scripts/setup-host.sh)");
    let path = format!(
        "{}:{virtiofsd}/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
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
            "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max; cat /proc/self/cgroup; \
             grep -c 'cgroup2 .*favordynmods' /proc/mounts",
        ],
    );
    // The guest's hierarchy favours task migrations (`init.rs`), which every helper makes.
    assert_eq!(
        (c.status.code(), String::from_utf8_lossy(&c.stdout).as_ref()),
        (Some(0), "67108864\n50000 100000\n0::/\n1\n"),
        "{}",
        show(&c)
    );
    assert_clean(&env);
}

/// `ctr run --uidmap/--gidmap`: the container runs in a user namespace of its own whose
/// root is host uid 100000, over a rootfs ctr remapped to those ids, as under runc; a
/// volume's host owners it does not map show as the overflow id, as under runc.
#[test]
fn user_namespace_from_uidmap() {
    use std::os::unix::fs::PermissionsExt;
    let host = tempfile::tempdir().unwrap();
    // Both runtimes walk to a volume's source as the container's root.
    std::fs::set_permissions(host.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(host.path().join("f"), "from the host\n").unwrap();
    let volume = format!(
        "type=bind,src={},dst=/v,options=rbind:rw",
        host.path().display()
    );
    let out = same(
        "userns",
        &[
            "--uidmap",
            "0:100000:65536",
            "--gidmap",
            "0:100000:65536",
            "--mount",
            &volume,
        ],
        &[
            "sh",
            "-c",
            "cat /proc/self/uid_map /proc/self/gid_map; id; \
             stat -c '%u:%g %n' / /bin /etc /root; \
             touch /root/w && stat -c '%u:%g %n' /root/w; grep CapEff /proc/self/status; \
             mknod /dev/n2 c 1 3; echo mknod=$?; \
             cat /v/f; stat -c '%u:%g %a %n' /v /v/f; touch /v/g; echo volume-write=$?",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("0     100000      65536"), "{text}");
    assert!(text.contains("0:0 /root/w"), "{text}");
    assert!(text.contains("from the host\n65534:65534 755 /v"), "{text}");
    // Its cgroup namespace belongs to its user namespace, so it may mount cgroup2 and
    // reads its own limits there (this host's runc runs on cgroup v1: this half is
    // Cocoon's alone).
    let env = env();
    let o = ctr_run(
        &env,
        COCOON,
        "userns-cgroup",
        &[
            "--uidmap",
            "0:100000:65536",
            "--gidmap",
            "0:100000:65536",
            "--memory-limit",
            "200000000",
            "--mount",
            "type=cgroup,src=cgroup,dst=/sys/fs/cgroup,options=nosuid:noexec:nodev:ro",
        ],
        &["cat", "/sys/fs/cgroup/memory.max"],
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "199999488\n",
        "{}",
        show(&o)
    );
    assert_clean(&env);
}

/// `ctr run --log-uri`: a `file://` URI gets both streams appended, and a `binary://`
/// one starts the logging program with the streams on descriptors 3 and 4, the URI's
/// query as its arguments and the container's id and namespace in its environment
/// (how nerdctl logs every container), the same under both runtimes.
#[test]
fn log_uris_file_and_binary_as_under_runc() {
    use std::os::unix::fs::PermissionsExt;
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let logger = dir.path().join("logger");
    std::fs::write(
        &logger,
        "#!/bin/sh\n\
         out=\"$2/$CONTAINER_ID\"\n\
         { echo \"args: $*\"; echo \"ns: $CONTAINER_NAMESPACE\"; } > \"$out.meta\"\n\
         exec 5>&-\n\
         cat <&3 > \"$out.out\" & cat <&4 > \"$out.err\" & wait\n",
    )
    .unwrap();
    std::fs::set_permissions(&logger, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cmd = ["sh", "-c", "echo to-out; echo to-err >&2; echo more-out"];
    // Both are written once the task has exited, but not necessarily when ctr returns.
    // Until every one of `want` is there: the two streams are copied apart.
    let settled = |path: &std::path::Path, want: &[&str]| -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if want.iter().all(|w| text.contains(w)) || std::time::Instant::now() > deadline {
                return text;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let mut seen = Vec::new();
    for (rt, name) in [(RUNC, "runc"), (COCOON, "cocoon")] {
        // runc's shim once left stderr's line out of its file for good (CI, 30 s of
        // waiting): it is given three tries; Cocoon's one.
        let tries = if rt == RUNC { 3 } else { 1 };
        let mut lines = Vec::new();
        for t in 0..tries {
            let file = format!("{d}/files/{name}-{t}.log");
            let id = format!("logfile-{name}-{t}");
            let uri = format!("file://{file}");
            let o = ctr_run(&env, rt, &id, &["--log-uri", &uri], &cmd);
            assert!(o.status.success(), "{name}: {}", show(&o));
            // The two streams are copied apart: their lines may interleave either way.
            lines = settled(file.as_ref(), &["to-out", "to-err", "more-out"])
                .lines()
                .map(String::from)
                .collect();
            lines.sort();
            if lines.len() == 3 {
                break;
            }
            eprintln!("{name}, try {t}: {lines:?} in the log file");
        }
        let id = format!("logbin-{name}");
        let uri = format!("binary://{}?--dir={d}", logger.display());
        let o = ctr_run(&env, rt, &id, &["--log-uri", &uri], &cmd);
        assert!(o.status.success(), "{name}: {}", show(&o));
        // runc's shim ends the program with SIGTERM before it closes the pipes; Cocoon's
        // closes them first: either way the program has read everything.
        let out = settled(
            &dir.path().join(format!("{id}.out")),
            &["to-out", "more-out"],
        );
        let err = settled(&dir.path().join(format!("{id}.err")), &["to-err"]);
        let meta = std::fs::read_to_string(dir.path().join(format!("{id}.meta"))).unwrap();
        seen.push((lines, meta.replace(name, "RT"), out, err));
    }
    assert_eq!(seen[0], seen[1], "runc, then cocoon");
    let (lines, meta, out, err) = &seen[1];
    assert_eq!(lines, &["more-out", "to-err", "to-out"]);
    assert!(meta.contains("ns: default"), "{meta}");
    assert_eq!(
        (out.as_str(), err.as_str()),
        ("to-out\nmore-out\n", "to-err\n")
    );
    assert_clean(&env);
}

/// A `file://` log is bounded (`[logs] file_max_kib`), since the guest writes it: a
/// container that writes three times the limit leaves the newest bytes in the file and
/// the ones before them in `<file>.1`, exactly the limit there, in order. runc's file
/// would hold all of it: this is Cocoon's alone.
#[test]
fn a_file_log_is_rotated_at_its_limit() {
    let env = env_with("", "[logs]\nfile_max_kib = 64\n");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big.log");
    let uri = format!("file://{}", file.display());
    let pad = "0123456789".repeat(4);
    // 4000 lines of 51 bytes: 204 000 bytes, past three files of 64 KiB.
    let script = format!("i=1000; while [ $i -lt 5000 ]; do echo line-$i-{pad}; i=$((i+1)); done");
    let o = ctr_run(
        &env,
        COCOON,
        "biglog",
        &["--log-uri", &uri],
        &["sh", "-c", &script],
    );
    assert!(o.status.success(), "{}", show(&o));
    let written: String = (1000..5000).map(|i| format!("line-{i}-{pad}\n")).collect();
    let last = format!("line-4999-{pad}\n");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    while !read(&file).ends_with(&last) {
        assert!(
            std::time::Instant::now() < deadline,
            "the log never got the last line: {} bytes",
            read(&file).len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let old = read(&dir.path().join("big.log.1"));
    let new = read(&file);
    assert_eq!(old.len(), 64 * 1024, "rotated only when full");
    assert_eq!(new.len(), written.len() % (64 * 1024));
    assert!(
        written.ends_with(&(old + &new)),
        "the newest bytes, in order"
    );
    assert!(!dir.path().join("big.log.2").exists());
    assert_clean(&env);
}
