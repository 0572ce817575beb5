//! What the ctr test files share: a private containerd per test with the busybox image,
//! running a case under runc and cocoon, and checking that nothing was left behind.
#![allow(dead_code)]

use std::process::Output;
use std::time::Duration;

use cocoon_integration::containerd::Containerd;
use cocoon_integration::image::IMAGE_REF;
use cocoon_integration::{processes_mentioning, stuck, test_config, wait_gone};

pub struct Env {
    pub containerd: Containerd,
    pub run_dir: std::path::PathBuf,
    /// The shim's config (COCOON_CONFIG).
    pub config: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Env {
    /// Our shims serving this test's containerd (tests run in parallel).
    pub fn shims(&self) -> Vec<(u32, String)> {
        let addr = self.containerd.address.to_string_lossy().into_owned();
        processes_mentioning("containerd-shim-cocoon-v2")
            .into_iter()
            .filter(|(_, cmd)| cmd.contains(&addr))
            .collect()
    }
}

/// A private containerd with the test image, for one test (nextest runs
/// each test in its own process).
pub fn env() -> Env {
    env_on(None)
}

/// The same, with the shim's `hypervisor` set (None: the default, auto).
pub fn env_on(hypervisor: Option<&str>) -> Env {
    let top = hypervisor.map(|h| format!("hypervisor = {h:?}\n"));
    env_with(top.as_deref().unwrap_or(""), "")
}

/// The same, with `top` before the shim config's tables and `tables` after them.
pub fn env_with(top: &str, tables: &str) -> Env {
    env_edited(top, tables, |_| {})
}

/// The same, with the shim's config edited first.
pub fn env_edited(
    top: &str,
    tables: &str,
    edit: impl FnOnce(&mut cocoon_shim::config::Config),
) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let mut config = test_config(&run_dir, Duration::from_secs(90));
    edit(&mut config);
    let config_path = dir.path().join("cocoon.toml");
    let toml = format!(
        "{top}{}{tables}{}",
        toml_of(&config),
        cocoon_integration::jail_table_for_this_kernel(tables)
    );
    std::fs::write(&config_path, toml).unwrap();
    let containerd = Containerd::start(&dir.path().join("containerd"), &config_path);
    containerd.import_busybox();
    Env {
        containerd,
        run_dir,
        config: config_path,
        _dir: dir,
    }
}

pub fn toml_of(c: &cocoon_shim::config::Config) -> String {
    format!(
        "[vm]\nkernel = {:?}\ninitrd = {:?}\nboot_timeout_ms = {}\nkernel_params = {:?}\ntemplates = {}\n[paths]\nrun_dir = {:?}\n",
        c.vm.kernel, c.vm.initrd, c.vm.boot_timeout_ms, c.vm.kernel_params, c.vm.templates, c.paths.run_dir
    )
}

pub const COCOON: &str = "io.containerd.cocoon.v2";
pub const RUNC: &str = "io.containerd.runc.v2";

pub fn ctr_run(env: &Env, runtime: &str, id: &str, flags: &[&str], cmd: &[&str]) -> Output {
    let mut args = vec!["run", "--rm", "--runtime", runtime];
    args.extend_from_slice(flags);
    args.push(IMAGE_REF);
    args.push(id);
    args.extend_from_slice(cmd);
    env.containerd.ctr(&args)
}

/// An output for messages: long streams are cut, with their length and hash. The end of
/// a long stream is kept (that is where an error says why: the VMM's last log lines, a
/// register dump), with its start.
pub fn show(o: &Output) -> String {
    fn cut(b: &[u8]) -> String {
        use sha2::Digest;
        if b.len() <= 2000 {
            return format!("{:?}", String::from_utf8_lossy(b));
        }
        format!(
            "{} bytes, sha256 {}, starting {:?}, ending {:?}",
            b.len(),
            hex::encode(sha2::Sha256::digest(b)),
            String::from_utf8_lossy(&b[..200]),
            String::from_utf8_lossy(&b[b.len() - 1500..])
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
pub fn same(name: &str, flags: &[&str], cmd: &[&str]) -> Output {
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
pub fn same_in(env: &Env, name: &str, flags: &[&str], cmd: &[&str]) -> Output {
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
        "\nrunc (3 runs):\n{}\ncocoon: {}\n{}\ncontainerd log:\n{}",
        runc.join("\n"),
        show(&c),
        kept_console(env, &format!("{name}-cocoon")),
        env.containerd.log_tail()
    );
}

/// The end of the console the shim kept for container `id`'s pod if its VM failed (a
/// lost agent: whether the guest panicked or its VMM died is there), for a message.
pub fn kept_console(env: &Env, id: &str) -> String {
    let Some(path) = cocoon_shim::consolelog::find(&env.run_dir, id, &["default"]) else {
        return format!("no console kept for {id}");
    };
    let text = std::fs::read(&path).unwrap_or_default();
    format!(
        "console kept in {} (its end):\n{}",
        path.display(),
        cocoon_integration::tail_lines(&String::from_utf8_lossy(&text), 50)
    )
}

/// Nothing of ours is left once the tasks are gone.
pub fn assert_clean(env: &Env) {
    let procs = processes_mentioning(&env.run_dir.to_string_lossy());
    let pids: Vec<u32> = procs.iter().map(|p| p.0).collect();
    let left = wait_gone(&pids, Duration::from_secs(10));
    assert!(left.is_empty(), "processes left: {procs:?}");
    let shims = env.shims();
    let shim_pids: Vec<u32> = shims.iter().map(|p| p.0).collect();
    // A shim exits once containerd has shut it down after the last delete; inside a
    // loaded L1 (emulated, nested) that took over 10 s once in CI.
    // Seen once in CI (a shim still there 30 s after its pod's delete, while an L1
    // test loaded the host): say where it and containerd stand, not only that.
    let shims_left = wait_gone(&shim_pids, Duration::from_secs(30));
    assert!(
        shims_left.is_empty(),
        "shims left: {shims:?}\n{}",
        env.containerd.stuck_report()
    );
    // The kept consoles of failed pods (`cocoon logs`) stay on purpose, bounded.
    let left = cocoon_integration::pod_leftovers(&env.run_dir);
    assert!(
        left.is_empty(),
        "left in run dir (shares, pod records): {left:?}"
    );
    let mounts = cocoon_integration::mounts_under(&env.run_dir);
    assert!(mounts.is_empty(), "mounts left: {mounts:?}");
}

/// A full spec for `ctr run --config` (which takes the rootfs from the spec
/// too): `ctr oci spec` with a busybox rootfs of its own, `PATH=/bin`, a cgroup
/// of its own, then `edit`. Returns the file's path.
pub fn spec_file(env: &Env, name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
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

/// `ctr run --rm` of the spec file `spec` (`spec_file`) as container `id` under
/// `runtime`.
pub fn run_config(env: &Env, runtime: &str, spec: &str, id: &str) -> Output {
    env.containerd
        .ctr(&["run", "--rm", "--runtime", runtime, "--config", spec, id])
}

/// `<name>-runc` or `<name>-cocoon`: an id of `name`'s own under `runtime`.
pub fn runtime_id(name: &str, runtime: &str) -> String {
    format!("{name}-{}", runtime.rsplit('.').nth(1).unwrap_or(runtime))
}

/// Runs the spec file `spec` (`spec_file`) under runc and cocoon, as `<name>-runc` and
/// `<name>-cocoon`; asserts the same exit code, stdout and stderr. Returns cocoon's.
pub fn same_config(env: &Env, spec: &str, name: &str) -> Output {
    let r = run_config(env, RUNC, spec, &runtime_id(name, RUNC));
    let c = run_config(env, COCOON, spec, &runtime_id(name, COCOON));
    assert_eq!(
        (r.status.code(), &r.stdout, &r.stderr),
        (c.status.code(), &c.stdout, &c.stderr),
        "\nrunc: {}\ncocoon: {}",
        show(&r),
        show(&c)
    );
    c
}

pub fn ctr_ok(env: &Env, args: &[&str]) -> String {
    let o = env.containerd.ctr(args);
    assert!(
        o.status.success(),
        "ctr {args:?}: {}\n--- containerd log (end):\n{}\n{}",
        show(&o),
        env.containerd.log_tail(),
        cocoon_integration::stuck::kernel_kills()
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs a detached task, runs `f`, then kills and deletes it.
pub fn with_detached(
    env: &Env,
    runtime: &str,
    id: &str,
    flags: &[&str],
    f: impl FnOnce(&Env, &str),
) {
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

/// The output of an exec of `cmd` that ends at once, holding `marker`. containerd 1.6
/// sometimes loses such an exec's output (under either runtime, see `same_in`): it is
/// run again, up to three times in all, as `<prefix>-<n>`.
pub fn exec_output(env: &Env, id: &str, prefix: &str, cmd: &[&str], marker: &str) -> String {
    exec_output_with(env, &[], id, prefix, cmd, marker)
}

/// `exec_output` with ctr's exec `flags` (`--user`, `--cwd`).
pub fn exec_output_with(
    env: &Env,
    flags: &[&str],
    id: &str,
    prefix: &str,
    cmd: &[&str],
    marker: &str,
) -> String {
    (0..3)
        .map(|n| {
            let exec_id = format!("{prefix}-{n}");
            let mut args = vec!["task", "exec", "--exec-id", &exec_id];
            args.extend_from_slice(flags);
            args.push(id);
            args.extend_from_slice(cmd);
            ctr_ok(env, &args)
        })
        .find(|out| out.contains(marker))
        .unwrap_or_else(|| panic!("{id}: no output of {cmd:?} came back"))
}

pub fn task_status(env: &Env, id: &str) -> String {
    let ls = ctr_ok(env, &["task", "ls"]);
    ls.lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("")
        .to_string()
}

pub fn wait_status(env: &Env, id: &str, want: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while task_status(env, id) != want {
        assert!(
            std::time::Instant::now() < deadline,
            "{id} never became {want}"
        );
        std::thread::sleep(Duration::from_millis(50));
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

/// `ctr run -d` of a cocoon task `id` running `cmd`, with extra `flags`; checks it runs.
pub fn run_detached(env: &Env, id: &str, flags: &[&str], cmd: &[&str]) {
    let mut args = vec!["run", "-d", "--runtime", COCOON];
    args.extend_from_slice(flags);
    args.push(IMAGE_REF);
    args.push(id);
    args.extend_from_slice(cmd);
    ctr_ok(env, &args);
    assert_eq!(task_status(env, id), "RUNNING");
}

/// SIGKILLs task `id`, waits for it to stop, deletes it and its container, and checks
/// that nothing of the pod is left.
pub fn kill_delete_clean(env: &Env, id: &str) {
    ctr_ok(env, &["task", "kill", "-s", "SIGKILL", id]);
    wait_status(env, id, "STOPPED");
    ctr_ok(env, &["task", "delete", id]);
    ctr_ok(env, &["container", "delete", id]);
    assert_clean(env);
}

/// The `cocoon` CLI (the workspace's build) with this env's config.
pub fn cocoon_cli(env: &Env) -> std::process::Command {
    let mut cmd = std::process::Command::new(
        cocoon_integration::workspace_root().join("target/debug/cocoon"),
    );
    cmd.env("COCOON_CONFIG", &env.config);
    cmd
}

/// `cocoon debug <id>` in the default namespace with this env's config: `command` after
/// `--` (none: the interactive shell), `stdin` fed to it.
pub fn cocoon_debug(env: &Env, id: &str, command: &[&str], stdin: &[u8]) -> Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut cmd = cocoon_cli(env);
    cmd.args(["debug", id, "--namespace", "default"]);
    if !command.is_empty() {
        cmd.arg("--").args(command);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("target/debug/cocoon (cargo build first)");
    let mut input = child.stdin.take().expect("piped");
    input.write_all(stdin).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

/// Runs `ctr args` on a thread; its output arrives on the channel (for calls that must
/// not hang: the caller waits with a deadline).
pub fn ctr_in_background(
    env: &Env,
    args: &[&str],
) -> std::sync::mpsc::Receiver<std::io::Result<Output>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let mut cmd = env.containerd.ctr_cmd(args);
    std::thread::spawn(move || {
        let _ = tx.send(cmd.output());
    });
    rx
}

/// Waits until `pred` holds for the output read so far from `r`, with a deadline
/// that a silent peer cannot outlast.
pub fn read_until(r: &mut impl std::os::fd::AsFd, acc: &mut Vec<u8>, pred: impl Fn(&str) -> bool) {
    if let Err(e) = stuck::read_until(r, acc, Duration::from_secs(120), pred) {
        panic!("{e}");
    }
}

/// Waits for a `ctr` started in the background to exit, with a deadline.
pub fn reap(env: &Env, child: &mut std::process::Child) -> std::process::ExitStatus {
    stuck::wait_within(child, stuck::CTR_DEADLINE).unwrap_or_else(|| {
        let _ = child.kill();
        panic!(
            "stuck: ctr did not exit within {} s\n{}",
            stuck::CTR_DEADLINE.as_secs(),
            env.containerd.stuck_report()
        )
    })
}

/// Starts `ctr <args>` on a fresh pty, as a terminal user would, and hands
/// back the child and the pty's master. `ctr run -t` and `ctr task exec -t`
/// need a terminal on their stdin.
pub fn ctr_on_a_pty(env: &Env, args: &[&str]) -> (std::process::Child, std::fs::File) {
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

/// `ctr events`, running: containerd's events from now on, one a line, on its stdout.
pub fn ctr_events(env: &Env) -> std::process::Child {
    env.containerd
        .ctr_cmd(&["events"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// A small tmpfs the test mounted on a host directory (a mount nested in a volume),
/// unmounted when dropped.
pub struct TmpfsMount(std::path::PathBuf);

impl TmpfsMount {
    pub fn on(dir: &std::path::Path) -> Self {
        nix::mount::mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=1m"),
        )
        .unwrap_or_else(|e| panic!("cannot mount a tmpfs on {}: {e}", dir.display()));
        Self(dir.to_path_buf())
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// The field `field` of `/proc/<pid>/status`.
pub fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// As root of a container, under runc and then cocoon: the owners of the image's files
/// and of a volume's (a host file of 4321:4322), files made in the rootfs and the volume
/// and given away, and the volume's files on the host's disk: the same under both.
pub fn owners_match_runc(env: &Env) {
    use std::os::unix::fs::MetadataExt;
    let vol = env.containerd.dir.join("owners");
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::write(vol.join("theirs"), "x").unwrap();
    std::os::unix::fs::lchown(vol.join("theirs"), Some(4321), Some(4322)).unwrap();
    let m = format!("type=bind,src={},dst=/data,options=rbind:rw", vol.display());
    let script = "stat -c %u:%g /bin/busybox /data/theirs; touch /data/a-$0 /b && \
                  chown 1234:5678 /data/a-$0 /b && mkdir /data/d-$0 && \
                  stat -c %u:%g /data/a-$0 /data/d-$0 /b";
    for (runtime, tag) in [(RUNC, "runc"), (COCOON, "cocoon")] {
        let o = ctr_run(
            env,
            runtime,
            &format!("own-{tag}"),
            &["--mount", &m],
            &["sh", "-c", script, tag],
        );
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            "0:0\n4321:4322\n1234:5678\n0:0\n1234:5678\n",
            "{tag}: {}",
            show(&o)
        );
        let on_disk = |f: &str| {
            let m = std::fs::metadata(vol.join(format!("{f}-{tag}"))).unwrap();
            (m.uid(), m.gid())
        };
        assert_eq!(on_disk("a"), (1234, 5678), "{tag}");
        assert_eq!(on_disk("d"), (0, 0), "{tag}");
    }
}

/// While a container of a pod runs: its virtiofsd (the waiter and the server) is root
/// of a user namespace of the pod's own only, a host uid from the pod's share range, no
/// group, in its own namespaces, seccomp, no_new_privs, its process limit.
pub fn virtiofsd_is_jailed(env: &Env) {
    run_detached(env, "fsd", &[], &["sleep", "1000"]);
    let config = cocoon_shim::config::JailConfig::default();
    let fsds: Vec<u32> = processes_mentioning(&env.run_dir.to_string_lossy())
        .into_iter()
        .filter(|(_, c)| c.starts_with("virtiofsd@"))
        .map(|(pid, _)| pid)
        .collect();
    // virtiofsd's waiter, and the server in a PID namespace of its own.
    assert_eq!(fsds.len(), 2, "{fsds:?}");
    let range = config.share_id_base..config.share_id_base + config.share_ranges * 65_536;
    let host_userns = std::fs::read_link("/proc/self/ns/user").unwrap();
    for &pid in &fsds {
        let uid = status_field(pid, "Uid");
        let ids: Vec<u32> = uid.split_whitespace().map(|u| u.parse().unwrap()).collect();
        assert!(
            ids.iter().all(|u| *u == ids[0] && range.contains(u)),
            "virtiofsd {pid} runs as {uid}"
        );
        assert_eq!(status_field(pid, "Groups"), "");
        let userns = std::fs::read_link(format!("/proc/{pid}/ns/user")).unwrap();
        assert_ne!(
            userns, host_userns,
            "virtiofsd {pid} is in the host's user namespace"
        );
        let map = std::fs::read_to_string(format!("/proc/{pid}/uid_map")).unwrap();
        let map: Vec<&str> = map.split_whitespace().collect();
        assert_eq!(map, ["0", &ids[0].to_string(), "65536"], "uid_map of {pid}");
    }
    let server = *fsds
        .iter()
        .find(|p| status_field(**p, "NSpid").split_whitespace().count() == 2)
        .expect("no virtiofsd in a PID namespace of its own");
    assert_eq!(status_field(server, "Seccomp"), "2");
    assert_eq!(status_field(server, "NoNewPrivs"), "1");
    for ns in ["mnt", "net", "ipc", "uts", "pid"] {
        let link = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/{ns}")).unwrap();
        assert_ne!(
            link(&server.to_string()),
            link("self"),
            "virtiofsd shares the host's {ns} namespace"
        );
    }
    let limits = std::fs::read_to_string(format!("/proc/{server}/limits")).unwrap();
    let nproc = limits
        .lines()
        .find(|l| l.starts_with("Max processes"))
        .unwrap();
    assert!(nproc.split_whitespace().any(|w| w == "512"), "{limits}");
    kill_delete_clean(env, "fsd");
}
