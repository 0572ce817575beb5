//! QEMU's guest RAM in 2 MiB pages (`hypervisor/guest_ram.rs`): jailed, on the tmpfs
//! `jail-exec --huge-tmpfs` mounts in its jail; unjailed, on the shim's file; a memfd
//! with `vm.huge_pages = "off"`.

use std::time::Duration;

use cocoon_integration::{assert_vms_gone, pid_named as named, power_off, ready_vm, test_config};
use cocoon_nested::testing::shmem_huge_kb;

/// QEMU's guest RAM is in 2 MiB pages whatever the node's shmem THP policy (this host's
/// is `never`): jailed, on the tmpfs `jail-exec` mounts in its jail; unjailed, on the
/// shim's file. `vm.huge_pages = "off"` keeps the memfd. No mount is left on the host.
#[test]
fn qemu_guest_ram_is_in_huge_pages_jailed_or_not() {
    let run = tempfile::tempdir().unwrap();
    let config = test_config(run.path(), Duration::from_secs(120));
    let host_mounts = || {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains("huge=") || l.contains("guest-ram"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let before = host_mounts();
    let shmem_thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
        .unwrap_or_default();
    cocoon_integration::test_runtime().block_on(async {
        let mut tasks = Vec::new();
        for (name, jail, huge) in [
            ("jailed", true, cocoon_shim::config::HugePages::Auto),
            ("unjailed", false, cocoon_shim::config::HugePages::On),
            ("off", true, cocoon_shim::config::HugePages::Off),
        ] {
            let mut config = config.clone();
            config.jail.enabled = jail;
            config.vm.huge_pages = huge;
            tasks.push(tokio::spawn(async move {
                let (vm, agent) = ready_vm(
                    &config,
                    name,
                    Duration::from_secs(120),
                    Duration::from_secs(60),
                )
                .await;
                // QEMU itself (jailed: the child of its PID namespace's waiter).
                let pids = vm.pids();
                let qemu = named(&pids, "qemu-system-x86");
                let cmdline = std::fs::read_to_string(format!("/proc/{qemu}/cmdline")).unwrap();
                let backend = cmdline
                    .split('\0')
                    .find(|a| a.contains("id=mem,"))
                    .unwrap_or_else(|| panic!("{name}: no guest RAM in {cmdline:?}"))
                    .to_string();
                let pmd = shmem_huge_kb(qemu);
                power_off(vm, &agent, name, Duration::from_secs(30)).await;
                (name, backend, pmd, pids)
            }));
        }
        let mut all_pids = Vec::new();
        for t in tasks {
            let (name, backend, pmd, pids) = t.await.unwrap();
            all_pids.extend(pids);
            match name {
                "jailed" => assert!(
                    backend.contains("mem-path=/guest-ram,align=2M") && pmd > 0,
                    "{name}: {backend}, ShmemPmdMapped {pmd} kB"
                ),
                "unjailed" => assert!(
                    backend.contains("mem-path=/proc/self/fd/") && pmd > 0,
                    "{name}: {backend}, ShmemPmdMapped {pmd} kB"
                ),
                _ => {
                    assert!(backend.starts_with("memory-backend-memfd,"), "{backend}");
                    // A memfd follows the host's policy: none where it allows none.
                    if shmem_thp.contains("[never]") || shmem_thp.contains("[deny]") {
                        assert_eq!(pmd, 0, "{name}: {backend} under {shmem_thp}");
                    }
                }
            }
        }
        assert_vms_gone(run.path(), &all_pids);
    });
    assert_eq!(host_mounts(), before, "a guest-RAM tmpfs left on the host");
}
