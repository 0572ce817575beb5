//! End-to-end tests of `cocoon-vmm`'s control surface on this host's /dev/kvm with
//! synthetic PVH guests (see `guest/mod.rs`): the API socket (boot, pause, resume,
//! shutdown, a VM configured from JSON), the seccomp filters of its threads, and the jail
//! (its own namespaces, an empty root, refused shared socket directories).

mod guest;

use std::time::Duration;

use guest::{assemble, can_run, is_root, ns, wait_for, SPINNER};

#[test]
fn api_boots_pauses_resumes_and_shuts_down_under_seccomp() {
    if !can_run("api_boots_pauses_resumes_and_shuts_down_under_seccomp") {
        return;
    }
    use cocoon_vmm::vmm::{api_call, VmState};
    let g = assemble(SPINNER);
    let api = g.path("api.sock");
    let child = g.spawn(&["--api-sock", api.to_str().unwrap(), "--no-boot"]);
    wait_for("api socket", || api.exists());
    let r = api_call(&api, r#"{"action":"state"}"#).unwrap();
    assert_eq!(r.state, VmState::Configured);
    let r = api_call(&api, r#"{"action":"pause"}"#).unwrap();
    assert!(!r.ok, "pause before boot must be refused");
    let r = api_call(&api, r#"{"action":"bogus"}"#).unwrap();
    assert!(!r.ok && r.error.unwrap().contains("bogus"));
    let r = api_call(&api, r#"{"action":"memory"}"#).unwrap();
    assert!(!r.ok, "memory before boot must be refused");
    let r = api_call(&api, r#"{"action":"boot"}"#).unwrap();
    assert!(r.ok && r.state == VmState::Running, "{r:?}");

    // Sandboxed: seccomp in filter mode and no_new_privs, on every thread.
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert!(status.contains("Seccomp:\t2"), "{status}");
    // Every thread has the process's two filters (clone3 answered ENOSYS, the
    // allowlist); the vCPU thread stacks one of its own on them.
    // (A just-spawned vCPU thread names itself, then stacks its filter: wait for both.)
    let vcpu_filters = || {
        thread_filters(child.id())
            .into_iter()
            .find(|(comm, _)| comm == "vcpu0")
            .map(|t| t.1)
    };
    wait_for("vcpu0 under its own filter", || vcpu_filters() == Some(3));
    let threads = thread_filters(child.id());
    assert!(threads.iter().all(|t| t.1 >= 2), "{threads:?}");

    let len = || g.serial().len();
    wait_for("guest output", || len() > 2);
    let r = api_call(&api, r#"{"action":"pause"}"#).unwrap();
    assert!(r.ok && r.state == VmState::Paused, "{r:?}");
    let paused_at = len();
    std::thread::sleep(Duration::from_millis(300));
    assert!(len() <= paused_at + 1, "guest ran while paused");
    let r = api_call(&api, r#"{"action":"resume"}"#).unwrap();
    assert!(r.ok && r.state == VmState::Running);
    wait_for("output after resume", || len() > paused_at + 2);
    // Exit accounting over the API, under seccomp: the guest's serial writes.
    let r = api_call(&api, r#"{"action":"stats"}"#).unwrap();
    let stats = r.stats.expect("stats in the response");
    let serial_writes = stats["by_kind"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kind"] == "io_out 0x3f8")
        .map(|k| k["count"].as_u64().unwrap())
        .unwrap_or(0);
    assert!(serial_writes as usize >= paused_at, "{stats}");
    let r = api_call(&api, r#"{"action":"memory"}"#).unwrap();
    assert!(
        !r.ok && r.error.as_deref().unwrap().contains("no virtio-mem device"),
        "{r:?}"
    );
    let r = api_call(&api, r#"{"action":"shutdown"}"#).unwrap();
    assert!(r.ok);
    let out = g.finish(child, Duration::from_secs(10));
    assert!(out.status.success(), "{}", out.stderr);
    assert!(!api.exists(), "api socket left behind");
}

/// A VMM serving its API on a socket its parent bound (as the shim does for a jailed
/// VMM) sizes its virtio-mem device on request, under seccomp and the jail, and leaves
/// the socket to its maker. (This guest has no driver: nothing gets plugged.)
#[test]
fn an_inherited_api_socket_resizes_virtio_mem() {
    const TEST: &str = "an_inherited_api_socket_resizes_virtio_mem";
    if !can_run(TEST) {
        return;
    }
    use cocoon_vmm::vmm::{api_call, MemoryReport, VmState};
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let g = assemble(SPINNER);
    let api = g.path("api.sock");
    let listener = std::os::unix::net::UnixListener::bind(&api).unwrap();
    let fd = listener.as_raw_fd();
    let mut cmd = std::process::Command::new(guest::BIN);
    cmd.args(["run", "--mem-mib", "32", "--kernel"])
        .arg(&g.elf)
        .arg("--serial-out")
        .arg(g.path("serial.log"))
        .args(["--hotplug-mib", "256", "--api-sock-fd", &fd.to_string()])
        .arg("--snapshot-to")
        .arg(g.path("template"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: between fork and exec the closure only makes one async-signal-safe
    // fcntl(2) call on a descriptor this process owns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    g.track(&child);
    // Only the VMM holds the listener now.
    drop(listener);
    wait_for("guest output", || g.serial().len() > 2);

    let call = |req: &str| api_call(&api, req).unwrap();
    let r = call(r#"{"action":"memory"}"#);
    assert!(r.ok && r.state == VmState::Running, "{r:?}");
    let report = |requested_mib| MemoryReport {
        region_mib: 256,
        requested_mib,
        plugged_mib: 0,
    };
    assert_eq!(r.memory, Some(report(0)));
    // Nothing plugged or asked yet: a template may be taken (how pods restored from one
    // get a device that starts as the template's), and its memory file holds guest RAM
    // only, never the region, none of which the guest has.
    assert!(call(r#"{"action":"pause"}"#).ok);
    let r = call(r#"{"action":"snapshot"}"#);
    assert!(r.ok, "{r:?}");
    let saved = std::fs::metadata(g.path("template").join("memory")).unwrap();
    assert_eq!(
        saved.len(),
        32 << 20,
        "guest RAM's 32 MiB, not the region's 256"
    );
    assert!(call(r#"{"action":"resume"}"#).ok);
    let r = call(r#"{"action":"resize_memory","requested_mib":128}"#);
    assert!(r.ok, "{r:?}");
    assert_eq!(r.memory, Some(report(128)));
    for (req, why) in [
        (
            r#"{"action":"resize_memory","requested_mib":3}"#,
            "2 MiB blocks",
        ),
        (
            r#"{"action":"resize_memory","requested_mib":512}"#,
            "larger than the region",
        ),
        (
            r#"{"action":"resize_memory","requested_mib":18446744073709551615}"#,
            "too large",
        ),
    ] {
        let r = call(req);
        assert!(!r.ok && r.memory.is_none(), "{req}: {r:?}");
        assert!(r.error.as_deref().unwrap().contains(why), "{req}: {r:?}");
    }
    assert_eq!(call(r#"{"action":"memory"}"#).memory, Some(report(128)));
    // Paused: still answered; a template of it, with memory asked for, is refused.
    assert!(call(r#"{"action":"pause"}"#).ok);
    assert!(call(r#"{"action":"resize_memory","requested_mib":64}"#).ok);
    let r = call(r#"{"action":"snapshot"}"#);
    assert!(
        !r.ok && r.error.as_deref().unwrap().contains("64 MiB requested"),
        "{r:?}"
    );
    assert!(call(r#"{"action":"shutdown"}"#).ok);
    let out = g.finish(child, Duration::from_secs(10));
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stderr.contains("virtio-mem: 256 MiB at 0x100000000"),
        "{}",
        out.stderr
    );
    assert!(
        api.exists(),
        "the inherited socket is its maker's to remove"
    );
}

/// Whether the test runs as root (the jail needs it); prints why not.
/// Each thread of `pid`: its name and how many seccomp filters it runs under.
fn thread_filters(pid: u32) -> Vec<(String, u32)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .filter_map(|t| {
            let dir = t.ok()?.path();
            let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
            let status = std::fs::read_to_string(dir.join("status")).ok()?;
            let n = status
                .lines()
                .find_map(|l| l.strip_prefix("Seccomp_filters:"))?
                .trim()
                .parse()
                .ok()?;
            Some((comm.trim().to_string(), n))
        })
        .collect()
}

/// Every path under `root`, relative to it, sorted.
fn tree(root: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(root).unwrap().display().to_string());
            if p.is_dir() && !p.is_symlink() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn jail_gives_the_vmm_its_own_namespaces_and_an_empty_root() {
    if !can_run("jail_gives_the_vmm_its_own_namespaces_and_an_empty_root") {
        return;
    }
    if !is_root("jail_gives_the_vmm_its_own_namespaces_and_an_empty_root") {
        return;
    }
    use cocoon_vmm::vmm::api_call;
    let g = assemble(SPINNER);
    let dir = std::fs::canonicalize(g.dir.path()).unwrap();
    let api = dir.join("api.sock");
    let uds = dir.join("vsock.sock");
    let child = g.spawn(&[
        "--jail",
        "on",
        "--api-sock",
        api.to_str().unwrap(),
        "--vsock-uds",
        uds.to_str().unwrap(),
    ]);
    wait_for("guest output", || g.serial().len() > 2);
    let pid = child.id().to_string();
    for kind in ["mnt", "net", "ipc", "uts"] {
        assert_ne!(ns(&pid, kind), ns("self", kind), "{kind} namespace shared");
    }
    // Its root holds only the directory of its sockets, at the same path.
    let root = std::path::PathBuf::from(format!("/proc/{pid}/root"));
    let outside: Vec<String> = tree(&root)
        .into_iter()
        .filter(|p| !std::path::Path::new("/").join(p).starts_with(&dir))
        .collect();
    let mut ancestors: Vec<String> = dir
        .ancestors()
        .skip(1)
        .filter_map(|a| a.strip_prefix("/").ok())
        .filter(|a| !a.as_os_str().is_empty())
        .map(|a| a.display().to_string())
        .collect();
    ancestors.sort();
    assert_eq!(
        outside, ancestors,
        "the jail root holds more than the kept directory"
    );
    assert!(root.join(uds.strip_prefix("/").unwrap()).exists());
    // The root is read-only; the kept directory is not.
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    // Field 5 of a mountinfo line is the mount point, field 6 its options.
    let opts_at = |point: &std::path::Path| {
        mountinfo
            .lines()
            .map(|l| l.split(' ').collect::<Vec<_>>())
            .find(|f| std::path::Path::new(f[4]) == point)
            .map(|f| f[5].to_string())
            .unwrap_or_default()
    };
    let root_opts = opts_at(std::path::Path::new("/"));
    assert!(
        root_opts.starts_with("ro,"),
        "root mount: {root_opts}\n{mountinfo}"
    );
    let kept_opts = opts_at(&dir);
    assert!(
        kept_opts.starts_with("rw,nosuid,nodev,noexec"),
        "kept dir mount: {kept_opts}\n{mountinfo}"
    );
    // No capabilities left, none to regain.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert!(
            status.contains(&format!("{set}:\t0000000000000000")),
            "{set} not empty:\n{status}"
        );
    }
    // Its network namespace has nothing but a loopback device.
    let dev = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).unwrap();
    let ifaces: Vec<&str> = dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .collect();
    assert_eq!(ifaces.iter().map(|s| s.trim()).collect::<Vec<_>>(), ["lo"]);

    // Sockets in the kept directory still work and are removed at exit from inside.
    let r = api_call(&api, r#"{"action":"shutdown"}"#).unwrap();
    assert!(r.ok, "{r:?}");
    let out = g.finish(child, Duration::from_secs(10));
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stderr.contains("jail: own mount"), "{}", out.stderr);
    assert!(!api.exists() && !uds.exists(), "sockets left behind");
}

/// A vsock socket in a world-writable directory cannot be kept: `auto` runs without the
/// jail and says so, `on` refuses to boot and says why.
#[test]
fn jail_refuses_shared_socket_directories() {
    if !can_run("jail_refuses_shared_socket_directories") {
        return;
    }
    if !is_root("jail_refuses_shared_socket_directories") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let g = assemble("    PRINT \"up\\n\"\n    jmp reset\n");
    let shared = g.path("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let uds = shared.join("vsock.sock");
    let uds = uds.to_str().unwrap();
    let out = g.run(&["--vsock-uds", uds]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stderr.contains("jail: off") && out.stderr.contains("world-writable"));
    let out = g.run(&["--jail", "on", "--vsock-uds", uds]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("world-writable"), "{}", out.stderr);
}

#[test]
fn jail_off_leaves_the_namespaces_alone() {
    if !can_run("jail_off_leaves_the_namespaces_alone") {
        return;
    }
    use cocoon_vmm::vmm::api_call;
    let g = assemble(SPINNER);
    let api = g.path("api.sock");
    let child = g.spawn(&["--jail", "off", "--api-sock", api.to_str().unwrap()]);
    wait_for("guest output", || g.serial().len() > 2);
    let pid = child.id().to_string();
    for kind in ["mnt", "net"] {
        assert_eq!(ns(&pid, kind), ns("self", kind), "{kind} namespace");
    }
    api_call(&api, r#"{"action":"shutdown"}"#).unwrap();
    let out = g.finish(child, Duration::from_secs(10));
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stderr.contains("jail: off by configuration"),
        "{}",
        out.stderr
    );
}

#[test]
fn api_configures_a_vm_from_json() {
    if !can_run("api_configures_a_vm_from_json") {
        return;
    }
    use cocoon_vmm::vmm::{api_call, VmState};
    let g = assemble("    PRINT \"configured\\n\"\n    jmp reset\n");
    let api = g.path("api.sock");
    let child = std::process::Command::new(guest::BIN)
        .args(["run", "--api-sock"])
        .arg(&api)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    g.track(&child);
    wait_for("api socket", || api.exists());
    let r = api_call(&api, r#"{"action":"state"}"#).unwrap();
    assert_eq!(r.state, VmState::NotConfigured);
    let bad = r#"{"action":"configure","config":{"kernel":"/nope","mem_mb":1}}"#;
    let r = api_call(&api, bad).unwrap();
    assert!(
        !r.ok && r.error.as_deref().unwrap_or("").contains("mem_mb"),
        "{r:?}"
    );
    let cfg = serde_json::json!({
        "action": "configure",
        "config": {"kernel": g.elf, "mem_mib": 16, "serial_out": g.path("serial.log")},
    });
    let r = api_call(&api, &cfg.to_string()).unwrap();
    assert!(r.ok && r.state == VmState::Configured, "{r:?}");
    let r = api_call(&api, r#"{"action":"boot"}"#).unwrap();
    assert!(r.ok, "{r:?}");
    let out = g.finish(child, Duration::from_secs(10));
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.serial, "configured\n");
}
