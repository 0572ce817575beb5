//! Shared helpers for the end-to-end tests: where the built guest image and
//! tools are, a config that keeps every VM's state in a private temp dir, and
//! checks that nothing a test started is left behind.
//!
//! The tests need the guest image (`make image` puts it in `target/image/`,
//! or set COCOON_TEST_IMAGE_DIR) and the `cocoon-vmm` binary built next to
//! the test binaries. A missing image is a test failure with instructions,
//! never a silent skip.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cocoon_shim::config::Config;

pub mod containerd;
pub mod cri;
pub mod image;
pub mod loopdev;
pub mod policy;
pub mod soak;
pub mod streaming;
pub mod stuck;

/// The workspace root (this crate lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

pub fn image_dir() -> PathBuf {
    std::env::var_os("COCOON_TEST_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/image"))
}

/// The `[jail]` table a test's shim config needs on this kernel, unless `tables` has one
/// already: nothing where a pod's virtiofsd can run in a user namespace of its own (the
/// default), `virtiofsd = false` where `cocoon check`'s probe says this kernel cannot
/// (Debian's 6.1, which the nested harness's L1 runs with `COCOON_L1_KERNEL=6.1`: its
/// tmpfs cannot be idmapped), and
/// then said on stderr. The test that checks the namespace asks for it outright.
pub fn jail_table_for_this_kernel(tables: &str) -> String {
    if tables.contains("[jail]") {
        return String::new();
    }
    let probe = cocoon_shim::check::virtiofsd_jail();
    if probe.starts_with("virtiofsd jail: yes") {
        return String::new();
    }
    eprintln!("{probe}\n(this test's pods run virtiofsd as host root: [jail] virtiofsd = false)");
    "[jail]\nvirtiofsd = false\n".into()
}

/// A config for tests: the built image, a private run dir, TCG or KVM as the
/// host allows (auto), and the given boot timeout.
pub fn test_config(run_dir: &Path, boot_timeout: Duration) -> Config {
    let dir = image_dir();
    let mut c = Config::default();
    c.paths.image_dir = dir.clone();
    // The image's own choice, pinned so that every config derived from this one (TOML
    // for containerd's shims, the CLI) boots the same: its PVH ELF where it has one.
    let (kernel, initrd) = (c.kernel_path(), c.initrd_path());
    assert!(
        kernel.is_file() && initrd.is_file(),
        "guest image not found in {}: run `make image` (or set COCOON_TEST_IMAGE_DIR)",
        dir.display()
    );
    c.vm.kernel = kernel;
    c.vm.initrd = initrd;
    c.vm.boot_timeout_ms = boot_timeout.as_millis() as u64;
    c.vm.call_timeout_ms = 10_000;
    c.paths.run_dir = run_dir.to_path_buf();
    c.validate().expect("test config is valid");
    c
}

/// Whether `pid` is still a live (non-zombie) process.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Waits until none of `pids` is alive, up to `deadline`; returns the survivors.
pub fn wait_gone(pids: &[u32], deadline: Duration) -> Vec<u32> {
    let end = Instant::now() + deadline;
    loop {
        let left: Vec<u32> = pids.iter().copied().filter(|p| alive(*p)).collect();
        if left.is_empty() || Instant::now() >= end {
            return left;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Processes whose command line mentions `needle` (e.g. a test's run dir).
pub fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) && alive(pid) {
                out.push((pid, cmd));
            }
        }
    }
    out
}

/// A two-worker tokio runtime for tests that drive the shim's async VM API.
pub fn test_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Launches the VM `name` of `config` and waits for its agent (`boot` for the boot,
/// `call` for each call); a failure panics naming the VM.
pub async fn ready_vm(
    config: &Config,
    name: &str,
    boot: Duration,
    call: Duration,
) -> (
    cocoon_shim::hypervisor::Vm,
    cocoon_shim::agent_client::AgentClient,
) {
    use cocoon_shim::hypervisor::{self, VmSpec};
    let hv = hypervisor::from_config(config).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut vm = hv
        .launch(&VmSpec::from_config(config, name))
        .await
        .unwrap_or_else(|e| panic!("{name}: launch: {e}"));
    let agent = cocoon_shim::agent_client::AgentClient::wait_ready(&mut vm, boot, call)
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    (vm, agent)
}

/// Asks the guest to power off and asserts that its VMM exits within `within`; the
/// VM's processes are reaped either way.
pub async fn power_off(
    mut vm: cocoon_shim::hypervisor::Vm,
    agent: &cocoon_shim::agent_client::AgentClient,
    name: &str,
    within: Duration,
) {
    agent
        .shutdown()
        .await
        .unwrap_or_else(|e| panic!("{name}: Shutdown: {e}"));
    let exited = vm.wait_exit(within).await;
    vm.stop(Duration::ZERO).await;
    assert!(
        exited.is_some(),
        "{name} did not power off within {within:?}"
    );
}

/// The pid of the process named `comm` (its `/proc/<pid>/comm`) among `pids`.
pub fn pid_named(pids: &[u32], comm: &str) -> u32 {
    pids.iter()
        .copied()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .unwrap_or_else(|| panic!("no {comm} among {pids:?}"))
}

/// Entries left in a run root (each VM gets a subdirectory).
pub fn leftover_entries(run_root: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(run_root)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Asserts that nothing of a test's VMs is left: the processes `pids`, anything still
/// mentioning `run_root`, and entries of its own in the run directory.
pub fn assert_vms_gone(run_root: &Path, pids: &[u32]) {
    let survivors = wait_gone(pids, Duration::from_secs(5));
    assert!(survivors.is_empty(), "processes still alive: {survivors:?}");
    let procs = processes_mentioning(&run_root.to_string_lossy());
    assert!(
        procs.is_empty(),
        "processes still using {}: {procs:?}",
        run_root.display()
    );
    let left: Vec<_> = leftover_entries(run_root)
        .into_iter()
        .filter(|p| !is_node_wide(p))
        .collect();
    assert!(left.is_empty(), "left in the run dir: {left:?}");
}

/// What of a pod is left in a shim's run dir once every pod is gone: its entries but
/// the node-wide ones, and anything inside `shares` and `pods` (the node's records of
/// pod VMs; the directories themselves stay).
pub fn pod_leftovers(run_root: &Path) -> Vec<PathBuf> {
    leftover_entries(run_root)
        .into_iter()
        .flat_map(|e| match e.file_name().and_then(|n| n.to_str()) {
            Some("shares" | "pods") => leftover_entries(&e),
            _ if is_node_wide(&e) => vec![],
            _ => vec![e],
        })
        .collect()
}

/// Entries of the shim's run dir that belong to the node, not to a pod, and so stay after
/// every pod is gone: the timing records, kept consoles of failed VMs, the host's TSC rate,
/// the VM templates.
pub fn is_node_wide(entry: &Path) -> bool {
    entry.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
        [
            "timings.jsonl",
            "failed-consoles",
            cocoon_rootfs::tsc::CACHE_FILE,
            cocoon_shim::hypervisor::template::DIR,
        ]
        .contains(&n)
    })
}

/// The mount tables a pod's mounts can be in: this process's (the node's namespace)
/// and each Cocoon pod's own (the `pod-mount-ns` thread of its shim, which holds the
/// share's mounts: `cocoon_shim::shimv2::podns`).
pub fn mount_tables() -> Vec<String> {
    let mut tables = vec![std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default()];
    for task in pod_namespace_tasks() {
        // Gone meanwhile: its namespace may be too.
        if let Ok(t) = std::fs::read_to_string(task.join("mountinfo")) {
            tables.push(t);
        }
    }
    tables
}

/// The `/proc/<pid>/task/<tid>` of every thread that holds a pod's mount namespace.
pub fn pod_namespace_tasks() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        if !p
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let Ok(tasks) = std::fs::read_dir(p.path().join("task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.trim_end() == "pod-mount-ns" {
                out.push(t.path());
            }
        }
    }
    out
}

/// The mount namespaces (as `/proc/.../ns/mnt` names them, `mnt:[inode]`) of process
/// `pid`'s `pod-mount-ns` threads: the pods' own namespaces a shim holds.
pub fn pod_namespaces_of(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.trim_end() == "pod-mount-ns")
        })
        .filter_map(|t| std::fs::read_link(t.path().join("ns/mnt")).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .collect()
}

/// The pids of processes that hold mount namespace `ns` (`mnt:[inode]`): a thread in it,
/// or a descriptor of it.
pub fn namespace_holders(ns: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    let is = |p: PathBuf| std::fs::read_link(p).is_ok_and(|l| l.as_os_str() == ns);
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let tasks = std::fs::read_dir(p.path().join("task"))
            .into_iter()
            .flatten()
            .flatten();
        let fds = std::fs::read_dir(p.path().join("fd"))
            .into_iter()
            .flatten()
            .flatten();
        if tasks
            .map(|t| t.path().join("ns/mnt"))
            .chain(fds.map(|f| f.path()))
            .any(is)
        {
            out.push(pid);
        }
    }
    out
}

/// Every mount point of `mount_tables`, as the tables spell them.
pub fn mount_points_everywhere() -> Vec<String> {
    mount_tables()
        .iter()
        .flat_map(|t| {
            t.lines()
                .filter_map(|l| l.split(' ').nth(4))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Mount points at or below `dir`, deepest first: the node's and those in any pod's
/// own namespace.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let prefix = dir.to_string_lossy().into_owned();
    let mut out: Vec<PathBuf> = mount_points_everywhere()
        .into_iter()
        .filter(|m| m.starts_with(&prefix))
        .map(PathBuf::from)
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out
}

/// Lazily unmounts everything below `dir` (after a failed test), in the node's
/// namespace (a pod's own goes with its shim and virtiofsd).
pub fn unmount_under(dir: &Path) {
    for m in mounts_under(dir) {
        let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// The last `n` lines of `text`.
pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Writes `body` as the executable file `path` (a stand-in tool for a test: a script
/// with its `#!` line).
pub fn write_executable(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, body).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// Builds the C program `source` as the static executable `dir/name` (test images have no
/// C library), or says why it cannot.
pub fn build_static_c(dir: &Path, name: &str, source: &str) -> Result<PathBuf, String> {
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, source).map_err(|e| e.to_string())?;
    let exe = dir.join(name);
    let out = std::process::Command::new("gcc")
        .args(["-static", "-O1", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .map_err(|e| format!("gcc: {e} (apt-get install gcc libc6-dev)"))?;
    if !out.status.success() {
        return Err(format!(
            "gcc -static failed (apt-get install libc6-dev): {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(exe)
}
