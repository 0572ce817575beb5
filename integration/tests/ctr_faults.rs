//! Faults through `ctr`: a shim or a per-pod host process killed, containerd restarted,
//! a create that fails; each must end cleanly, with nothing left behind.

mod ctr_common;

use std::time::Duration;

use cocoon_integration::image::IMAGE_REF;
use ctr_common::*;

#[test]
fn shim_killed_then_task_delete_cleans_up() {
    let env = env();
    run_detached(
        &env,
        "victim",
        &[],
        &["sh", "-c", "while true; do sleep 0.1; done"],
    );
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
    run_detached(
        &env,
        "survivor",
        &[],
        &["sh", "-c", "while true; do sleep 0.1; done"],
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

/// A virtiofsd that cannot start (here a stand-in that says why and exits): the pod
/// fails, and the error names virtiofsd and its last words. The shim makes its listener,
/// so QEMU alone would only have seen a refused connection.
#[test]
fn a_virtiofsd_that_fails_at_start_is_named_with_its_last_words() {
    let bin = tempfile::tempdir().unwrap();
    // Reachable by virtiofsd's uid, which is not root's.
    std::fs::set_permissions(
        bin.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let fake = bin.path().join("virtiofsd");
    cocoon_integration::write_executable(
        &fake,
        "#!/bin/sh\necho 'cannot serve the share: simulated' >&2\nexit 3\n",
    );
    // The shim config's last table is [paths]: this key lands there.
    let env = env_with(
        "",
        &format!("virtiofsd = {:?}\n", fake.display().to_string()),
    );
    let c = ctr_run(&env, COCOON, "nofs", &[], &["true"]);
    assert!(!c.status.success(), "{}", show(&c));
    let err = String::from_utf8_lossy(&c.stderr);
    assert!(
        err.contains("virtiofsd (pid") && err.contains("cannot serve the share: simulated"),
        "the error should name virtiofsd and what it said: {}",
        show(&c)
    );
    let _ = env.containerd.ctr(&["container", "delete", "nofs"]);
    assert_clean(&env);
}

/// What a user saw: after virtiofsd was killed, `ctr task delete -f` hung for good (the
/// shim, QEMU and the share stayed). Now the pod's VM ends with it: the task stops (as a
/// killed process, 137), calls that need the VM say why they cannot, and a forced delete
/// leaves nothing.
#[test]
fn virtiofsd_killed_then_delete_force_cleans_up() {
    host_process_killed_then_delete_force_cleans_up("virtiofsd", "virtiofsd");
}

/// The same for the vsock backend: the agent's connection goes with it.
#[test]
fn vsock_backend_killed_then_delete_force_cleans_up() {
    host_process_killed_then_delete_force_cleans_up("cocoon-vmm vhost-user-vsock", "cocoon-vmm");
}

fn host_process_killed_then_delete_force_cleans_up(pattern: &str, named: &str) {
    let env = env();
    run_detached(
        &env,
        "fsvictim",
        &[],
        &["sh", "-c", "while true; do sleep 0.1; done"],
    );
    let fsd = cocoon_integration::processes_mentioning(&env.run_dir.to_string_lossy())
        .into_iter()
        .filter(|(_, cmd)| cmd.contains(pattern))
        .collect::<Vec<_>>();
    assert!(!fsd.is_empty(), "no {pattern} for the pod");
    for (pid, _) in &fsd {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    wait_status(&env, "fsvictim", "STOPPED");
    let exec = env
        .containerd
        .ctr(&["task", "exec", "--exec-id", "late", "fsvictim", "true"]);
    let err = String::from_utf8_lossy(&exec.stderr);
    assert!(
        !exec.status.success() && err.contains("pod VM is gone") && err.contains(named),
        "an exec into a pod whose {pattern} died must say so: {}",
        show(&exec)
    );
    let rx = ctr_in_background(&env, &["task", "delete", "--force", "fsvictim"]);
    let deleted = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("ctr task delete --force hung")
        .expect("ctr");
    assert!(deleted.status.success(), "delete: {}", show(&deleted));
    ctr_ok(&env, &["container", "delete", "fsvictim"]);
    // A failed VM's console stays for `cocoon logs`, and for `same_in`'s messages.
    let kept = kept_console(&env, "fsvictim");
    assert!(
        kept.starts_with("console kept in ") && kept.lines().count() > 2,
        "{kept}"
    );
    assert_clean(&env);
}

/// Whether a `/proc/<pid>/maps` holds guest RAM: a shared mapping of 64 MiB or more
/// (a memfd or the huge-page tmpfs file, whatever its name shows as).
fn maps_guest_ram(maps: &str) -> bool {
    maps.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            return false;
        };
        let size = range.split_once('-').and_then(|(a, b)| {
            Some(u64::from_str_radix(b, 16).ok()? - u64::from_str_radix(a, 16).ok()?)
        });
        perms.ends_with('s') && size.is_some_and(|n| n >= 64 << 20)
    })
}

/// Found by the soak: the vsock backend killed while the guest booted left the start
/// waiting out the whole boot timeout (90 s here, 300 s in the soak), since only the
/// VMM's exit was watched before the agent answered. Now any dead host process of the
/// VM fails the boot at once, saying which.
#[test]
fn a_backend_killed_during_boot_fails_the_start_at_once() {
    let env = env();
    let rx = ctr_in_background(
        &env,
        &["run", "-d", "--runtime", COCOON, IMAGE_REF, "early", "true"],
    );
    let started = std::time::Instant::now();
    // Once the guest's driver has started the device (the guest kernel is booting), not
    // before: a backend that dies while the VMM sets it up takes the VMM with it, which
    // was always caught. A started vhost-user device has the guest's memory mapped.
    let backend = loop {
        let procs = cocoon_integration::processes_mentioning(&env.run_dir.to_string_lossy());
        let found = procs.iter().find(|(pid, c)| {
            c.contains("cocoon-vmm vhost-user-vsock")
                && std::fs::read_to_string(format!("/proc/{pid}/maps"))
                    .is_ok_and(|m| maps_guest_ram(&m))
        });
        if let Some((pid, _)) = found {
            break *pid;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the vsock backend never appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(backend as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let run = rx
        .recv_timeout(Duration::from_secs(45))
        .expect("ctr run still waiting 45 s after the vsock backend died")
        .expect("ctr");
    assert!(!run.status.success(), "{}", show(&run));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("a host process of the VM exited before its agent answered"),
        "the error should say a VM process died: {}",
        show(&run)
    );
    let _ = env.containerd.ctr(&["task", "delete", "--force", "early"]);
    let _ = env.containerd.ctr(&["container", "delete", "early"]);
    assert_clean(&env);
}
