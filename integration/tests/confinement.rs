//! What a pod's host processes may do, checked while a pod runs: QEMU and the vsock
//! backend confined (seccomp, no capabilities, no_new_privs), and a guest that floods its console
//! cannot grow the host's copy past its bound.

mod ctr_common;

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use ctr_common::*;

/// `pid` has mount, network, IPC, UTS and PID namespaces of its own, not the host's,
/// and is PID 1 in the last.
fn assert_own_namespaces(pid: u32, what: &str) {
    let nspid = status_field(pid, "NSpid");
    assert_eq!(
        nspid.split_whitespace().collect::<Vec<_>>(),
        [pid.to_string().as_str(), "1"],
        "{what}'s NSpid"
    );
    for ns in ["mnt", "net", "ipc", "uts", "pid"] {
        let link = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/{ns}")).unwrap();
        assert_ne!(
            link(&pid.to_string()),
            link("self"),
            "{what} shares the host's {ns} namespace"
        );
    }
}

#[test]
fn qemu_runs_confined_and_its_console_is_bounded() {
    let env = env_with("hypervisor = \"qemu\"\n", "[debug]\nconsole = true\n");
    run_detached(&env, "confined", &[], &["sleep", "1000"]);
    let qemu = pod_qemu(&env);
    // The image's kernel as its manifest says: Cocoon's own kernel boots from its PVH
    // ELF (no real-mode setup, no decompression), a distribution kernel from its bzImage.
    let manifest: cocoon_rootfs::Manifest = serde_json::from_slice(
        &std::fs::read(cocoon_integration::image_dir().join("manifest.json")).unwrap(),
    )
    .unwrap();
    let cmdline = std::fs::read(format!("/proc/{qemu}/cmdline")).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let kernel = args
        .windows(2)
        .find(|w| w[0] == "-kernel")
        .map(|w| w[1].clone())
        .expect("-kernel");
    let want = manifest.kernel.pvh_file.as_deref().unwrap_or("vmlinuz");
    assert!(kernel.ends_with(&format!("/{want}")), "QEMU boots {kernel}");
    assert_eq!(
        status_field(qemu, "Seccomp"),
        "2",
        "QEMU has no seccomp filter"
    );
    assert_eq!(status_field(qemu, "NoNewPrivs"), "1");
    assert_eq!(status_field(qemu, "CapEff"), "0000000000000000");
    assert_eq!(status_field(qemu, "CapBnd"), "0000000000000000");
    // Jailed: a uid and gid of its own, no other group, its own namespaces, a root
    // holding only what it needs, resource limits.
    let uid = status_field(qemu, "Uid");
    let ids: Vec<u32> = uid.split_whitespace().map(|u| u.parse().unwrap()).collect();
    assert!(
        ids.len() == 4 && ids.iter().all(|&u| u == ids[0]) && ids[0] >= 2_000_000_000,
        "QEMU's uids: {uid}"
    );
    let gids = status_field(qemu, "Gid");
    assert!(
        gids.split_whitespace().all(|g| g == ids[0].to_string()),
        "gids {gids}"
    );
    assert_eq!(status_field(qemu, "Groups"), "");
    assert_own_namespaces(qemu, "QEMU");
    let mut root: Vec<String> = std::fs::read_dir(format!("/proc/{qemu}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    root.sort();
    for host_only in ["home", "root", "proc", "sys", "var", "run"] {
        assert!(
            !root.contains(&host_only.to_string()),
            "QEMU sees /{host_only}: {root:?}"
        );
    }
    assert!(root.contains(&"usr".to_string()), "{root:?}");
    let in_jail = |p: &std::path::Path| {
        let p = format!("/proc/{qemu}/root{}", p.display());
        let mut names: Vec<String> = std::fs::read_dir(&p)
            .unwrap_or_else(|e| panic!("{p}: {e}"))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(in_jail("/etc".as_ref()), ["ld.so.cache"]);
    // Of the pod's run directory, only the directory of the sockets it connects to.
    let vm_run_dir = std::fs::read_dir(&env.run_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("vhost").is_dir())
        .expect("no VM run directory");
    assert_eq!(in_jail(&vm_run_dir), ["vhost"]);
    let limits = std::fs::read_to_string(format!("/proc/{qemu}/limits")).unwrap();
    let limit = |name: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in {limits}"))
            .split_whitespace()
            .rev()
            .nth(1)
            .unwrap()
            .to_string()
    };
    assert_eq!(limit("Max open files"), "4096", "{limits}");
    assert_eq!(limit("Max processes"), "512", "{limits}");
    // Another pod's QEMU gets another uid.
    run_detached(&env, "confined2", &[], &["sleep", "1000"]);
    let qemus: Vec<u32> = cocoon_integration::processes_mentioning(&env.run_dir.to_string_lossy())
        .into_iter()
        .filter(|(_, c)| c.contains("qemu-system"))
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(qemus.len(), 2, "{qemus:?}");
    assert_ne!(
        status_field(qemus[0], "Uid"),
        status_field(qemus[1], "Uid"),
        "two pods' QEMUs share a uid"
    );
    ctr_ok(&env, &["task", "kill", "-s", "SIGKILL", "confined2"]);
    wait_status(&env, "confined2", "STOPPED");
    ctr_ok(&env, &["task", "delete", "confined2"]);
    ctr_ok(&env, &["container", "delete", "confined2"]);
    // The vsock backend parses guest data too: jailed, and its own seccomp filter.
    let backend = cocoon_integration::processes_mentioning(&env.run_dir.to_string_lossy())
        .into_iter()
        .find(|(_, c)| c.contains("cocoon-vmm vhost-user-vsock"))
        .expect("no vsock backend for the pod")
        .0;
    assert_eq!(
        status_field(backend, "Seccomp"),
        "2",
        "the backend has no filter"
    );
    assert_eq!(status_field(backend, "NoNewPrivs"), "1");
    assert_eq!(status_field(backend, "CapEff"), "0000000000000000");
    // Jailed like QEMU, as the same pod uid (they serve the same guest), never root.
    assert_eq!(status_field(backend, "Uid"), uid, "the backend's uids");
    assert_own_namespaces(backend, "the backend");
    // Nothing of the host is writable for it: the shim made both its listeners, so no
    // part of the run directory is in its root, and the socket directory QEMU connects
    // in is root's, not writable by the pod's uid.
    let backend_sees = format!("/proc/{backend}/root{}", vm_run_dir.display());
    assert!(
        !std::path::Path::new(&backend_sees).exists(),
        "the backend sees the run directory"
    );
    let socket_dir = std::fs::metadata(vm_run_dir.join("vhost")).unwrap();
    assert_eq!(
        (socket_dir.uid(), socket_dir.mode() & 0o777),
        (0, 0o750),
        "the socket directory"
    );
    // Its messages, like QEMU's and cocoon-vmm's, go to a pipe the shim copies, bounded.
    for (pid, who) in [(backend, "the backend"), (qemu, "QEMU")] {
        let stderr = std::fs::read_link(format!("/proc/{pid}/fd/2")).unwrap();
        assert!(
            stderr.to_string_lossy().starts_with("pipe:"),
            "{who}'s stderr is {}",
            stderr.display()
        );
    }

    // The console copy works, and a guest writing 5 MB to it leaves at most two
    // rotated files of the limit on the host.
    let vm_dir = std::fs::read_dir(&env.run_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("console.log").exists())
        .expect("no console.log");
    let console = vm_dir.join("console.log");
    // The host's memory holds too: the shim copies the console, and neither it nor the
    // vsock backend may grow with what the guest writes.
    let shim = env
        .shims()
        .into_iter()
        .find(|(_, cmd)| cmd.split_whitespace().any(|w| w == "confined"))
        .unwrap_or_else(|| panic!("no shim of the pod among {:?}", env.shims()))
        .0;
    let rss_before = [rss_kib(shim), rss_kib(backend)];
    let flood = ["head -c 5000000 /dev/zero | tr '\\0' x > /dev/ttyS0; echo flooded"];
    let o = cocoon_debug(&env, "confined", &flood, b"");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("flooded"),
        "{}",
        show(&o)
    );
    let limit = cocoon_shim::hypervisor::console::CONSOLE_LIMIT;
    // The copy trails the guest a little: wait for the rotation, bounded.
    let rotated = vm_dir.join("console.log.1");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !rotated.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    assert!(rotated.exists(), "5 MB never rotated the console");
    assert!(size(&console) <= limit && size(&rotated) <= limit);
    // The pod is still alive after the flood.
    assert_eq!(task_status(&env, "confined"), "RUNNING");
    for (what, pid, before) in [
        ("shim", shim, rss_before[0]),
        ("backend", backend, rss_before[1]),
    ] {
        let grown = rss_kib(pid).saturating_sub(before);
        assert!(
            grown < FLOOD_RSS_KIB,
            "the {what}'s memory grew {grown} KiB while the guest flooded its console"
        );
    }

    kill_delete_clean(&env, "confined");
}

/// virtiofsd, which parses what the guest sends over virtio-fs, runs as root of a user
/// namespace of the pod's own only: a host uid from the pod's share range, no capability
/// on the host, its own seccomp filter; and the guest still sees and writes the owners
/// runc's containers do, through the idmapped share.
#[test]
fn virtiofsd_is_root_of_the_pods_namespace_only_and_owners_match_runc() {
    // Asked for outright: on a kernel that cannot, the pod fails to start with why.
    let env = env_with("hypervisor = \"qemu\"\n", "[jail]\nvirtiofsd = true\n");
    owners_match_runc(&env);
    virtiofsd_is_jailed(&env);
}

/// `[jail] enabled = false` is a first-class choice, not a broken path: pods run, QEMU
/// keeps its seccomp filter and empty capability sets, and nothing is left.
#[test]
fn without_the_jail_pods_still_run_confined_by_seccomp() {
    let env = env_with("hypervisor = \"qemu\"\n", "[jail]\nenabled = false\n");
    let out = ctr_run(&env, COCOON, "unjailed", &[], &["echo", "ok"]);
    assert_eq!(out.stdout, b"ok\n", "{}", show(&out));
    run_detached(&env, "unjailed-d", &[], &["sleep", "1000"]);
    let qemu = pod_qemu(&env);
    assert_eq!(
        status_field(qemu, "Uid").split_whitespace().next(),
        Some("0")
    );
    assert_eq!(status_field(qemu, "Seccomp"), "2");
    assert_eq!(status_field(qemu, "CapEff"), "0000000000000000");
    kill_delete_clean(&env, "unjailed-d");
}

/// The pid of the QEMU serving this env's pod.
fn pod_qemu(env: &Env) -> u32 {
    cocoon_integration::processes_mentioning(&env.run_dir.to_string_lossy())
        .into_iter()
        .find(|(_, c)| c.contains("qemu-system"))
        .expect("no QEMU for the pod")
        .0
}

/// How much a host process's resident memory may grow while the guest writes 5 MB to
/// its console: far less than the flood, so nothing of it is held in memory.
const FLOOD_RSS_KIB: u64 = 2048;

/// `pid`'s resident memory in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS for {pid}: {status}"))
}
