//! What a pod's host processes may do, checked while a pod runs: QEMU and the vsock
//! backend confined (seccomp, no capabilities, no_new_privs), and a guest that floods its console
//! cannot grow the host's copy past its bound.

mod ctr_common;

use std::time::Duration;

use ctr_common::*;

fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

#[test]
fn qemu_runs_confined_and_its_console_is_bounded() {
    let env = env_with("hypervisor = \"qemu\"\n", "[debug]\nconsole = true\n");
    run_detached(&env, "confined", &[], &["sleep", "1000"]);
    let qemu = cocoon_integration::processes_mentioning(&env.run_dir.to_string_lossy())
        .into_iter()
        .find(|(_, c)| c.contains("qemu-system"))
        .expect("no QEMU for the pod")
        .0;
    assert_eq!(
        status_field(qemu, "Seccomp"),
        "2",
        "QEMU has no seccomp filter"
    );
    assert_eq!(status_field(qemu, "NoNewPrivs"), "1");
    assert_eq!(status_field(qemu, "CapEff"), "0000000000000000");
    assert_eq!(status_field(qemu, "CapBnd"), "0000000000000000");
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

    // The console copy works, and a guest writing 5 MB to it leaves at most two
    // rotated files of the limit on the host.
    let vm_dir = std::fs::read_dir(&env.run_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("console.log").exists())
        .expect("no console.log");
    let console = vm_dir.join("console.log");
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

    kill_delete_clean(&env, "confined");
}
