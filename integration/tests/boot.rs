//! Boots real Linux guests (the built image) and talks to the agent over our
//! vsock backend. Under TCG each boot takes a few seconds, so the cases are
//! few and each checks several things.

use std::time::{Duration, Instant};

use cocoon_integration::{
    alive, leftover_entries, pid_named as named, power_off, processes_mentioning, ready_vm,
    test_config, wait_gone,
};
use cocoon_nested::testing::{hardware_kvm, Place};
use cocoon_shim::agent_client::{AgentClient, AgentError};
use cocoon_shim::hypervisor::{self, VmSpec};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const BOOT: Duration = Duration::from_secs(60);

/// Asserts that nothing of the test's VMs is left: processes, sockets, dirs.
fn assert_clean(run_root: &std::path::Path, pids: &[u32]) {
    cocoon_integration::assert_vms_gone(run_root, pids);
}

/// Launches VM `id` of `config` and waits for its agent.
async fn boot(
    config: &cocoon_shim::config::Config,
    id: &str,
) -> (cocoon_shim::hypervisor::Vm, AgentClient) {
    ready_vm(config, id, BOOT, Duration::from_secs(10)).await
}

#[test]
fn boot_roundtrip_health_version_details() {
    let run = tempfile::tempdir().unwrap();
    let mut config = test_config(run.path(), BOOT);
    // A word the kernel does not know is passed to init as an argument: the agent
    // ignores it (it used to exit with its usage, and the kernel panicked).
    config.vm.kernel_params = "cocoon.log=debug cocoon-unknown-word".into();
    cocoon_integration::test_runtime().block_on(async {
        let (mut vm, agent) = boot(&config, "rt").await;
        // QEMU and the vsock backend, each PID 1 of its own PID namespace under the
        // waiter the shim started (`jail-exec --pid-ns`).
        let pids = vm.pids();
        let mut names: Vec<String> = pids
            .iter()
            .map(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .unwrap_or_default()
                    .trim()
                    .to_string()
            })
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "cocoon-pid-ns",
                "cocoon-pid-ns",
                "cocoon-vmm",
                "qemu-system-x86"
            ],
            "{pids:?}"
        );

        let health = agent.check().await.unwrap();
        assert_eq!(
            health.status.enum_value_or_default(),
            cocoon_protocol::agent::health_check_response::ServingStatus::SERVING
        );
        let v = agent.version().await.unwrap();
        assert_eq!(v.protocol_version, cocoon_protocol::PROTOCOL_VERSION);
        assert_eq!(v.agent_version, env!("CARGO_PKG_VERSION"));

        // Jailed as a uid of the pod's own (jail-exec), never root (read once the guest
        // answers: jail-exec is root until it has set everything up).
        let vmm = vm.vmm_pid().expect("a VMM pid");
        let status = std::fs::read_to_string(format!("/proc/{vmm}/status")).unwrap();
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .expect("Uid in status")
            .split_whitespace()
            .map(|u| u.parse::<u32>().unwrap())
            .collect::<Vec<_>>();
        let range = config.jail.uid_base..config.jail.uid_base + config.jail.uid_count;
        assert!(
            uid.iter().all(|&u| u == uid[0]) && range.contains(&uid[0]),
            "cocoon-vmm's uids: {uid:?}"
        );
        let d = agent.guest_details().await.unwrap();
        assert!(d.kernel_release.starts_with("6."), "{}", d.kernel_release);
        assert!(
            d.kernel_cmdline.contains("console=ttyS0")
                && d.kernel_cmdline.contains("cocoon-unknown-word"),
            "{}",
            d.kernel_cmdline
        );
        assert_eq!(d.online_cpus, config.vm.vcpus);
        // The kernel keeps some memory for itself; the rest must be there.
        let mem = u64::from(config.vm.memory_mib) << 20;
        assert!(
            d.mem_total_bytes > mem / 2 && d.mem_total_bytes <= mem,
            "{}",
            d.mem_total_bytes
        );
        // Each module the agent needs is either in the kernel (Cocoon's own kernel has
        // them all: the image's manifest says which) or loaded by the agent: the boot
        // critical ones before it serves, the rest after.
        let manifest: cocoon_rootfs::manifest::Manifest = serde_json::from_slice(
            &std::fs::read(cocoon_integration::image_dir().join("manifest.json")).unwrap(),
        )
        .unwrap();
        let builtin = &manifest.initramfs.builtin_modules;
        let missing = |loaded: &[String], names: &[&str]| -> Vec<String> {
            names
                .iter()
                .filter(|m| !builtin.iter().any(|b| b == *m) && !loaded.iter().any(|l| l == *m))
                .map(|m| m.to_string())
                .collect()
        };
        let critical = missing(
            &d.loaded_modules,
            // (vsock itself comes with its transport, loaded or built in)
            &["virtio_mmio", "vmw_vsock_virtio_transport"],
        );
        assert!(
            critical.is_empty(),
            "{critical:?} neither built in nor loaded: {d:?}"
        );
        // Cocoon's own kernel: only the on-demand block driver is a module, and it is
        // not loaded at boot.
        if manifest
            .initramfs
            .modules
            .iter()
            .all(|m| m.name == "virtio_blk")
        {
            assert!(d.loaded_modules.is_empty(), "{:?}", d.loaded_modules);
        }
        assert_eq!(d.cgroup_version, "v2");
        // A kernel that takes its virtio-mmio devices on the command line (Cocoon's,
        // its manifest says) boots QEMU's microvm without ACPI; any other keeps it.
        assert_eq!(
            d.kernel_cmdline.split_whitespace().any(|w| w == "acpi=off"),
            manifest.kernel.virtio_mmio_cmdline,
            "{}",
            d.kernel_cmdline
        );
        // The rest of the image's modules load after the agent is up, but for the
        // block driver: it waits for a container that names a block device
        // (`cri_block.rs`), so a VM's empty disk slots are not probed at boot.
        let deadline = Instant::now() + Duration::from_secs(30);
        let m = loop {
            let m = agent.guest_details().await.unwrap().loaded_modules;
            let late = missing(&m, &["overlay", "virtiofs", "virtio_net", "erofs"]);
            if late.is_empty() {
                break m;
            }
            assert!(
                Instant::now() < deadline,
                "deferred modules not loaded: {late:?} (loaded {m:?})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(
            !m.iter().any(|n| n == "virtio_blk"),
            "the block driver loaded with no block device asked for: {m:?}"
        );

        assert!(d.agent_start_boottime_ns > 0);
        assert!(d.server_ready_boottime_ns >= d.agent_start_boottime_ns);
        assert!(d.boottime_ns >= d.server_ready_boottime_ns);

        // A second connection works alongside the first.
        let second = AgentClient::connect(
            &vm.vsock_uds,
            Duration::from_secs(5),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        second.check().await.unwrap();

        // With `cocoon.log=debug` the agent maps its start on the console, stage by
        // stage (the copy of the console may trail the guest a little).
        let stages = [
            "leave-initramfs=",
            "early-init=",
            "logging=",
            "zygote=",
            "state=",
            "async-runtime=",
            "tasks=",
            "side-listeners=",
            "ttrpc-server=",
        ];
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let console = std::fs::read_to_string(&vm.console_log).unwrap_or_default();
            let line = console.lines().find(|l| l.contains("server listening"));
            if let Some(l) = line.filter(|l| stages.iter().all(|s| l.contains(s))) {
                assert!(l.contains(" stages=leave-initramfs="), "{l}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no map of the agent's start: {console}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // Shutdown powers the guest off by itself: QEMU exits 0.
        agent.shutdown().await.unwrap();
        let status = vm
            .wait_exit(Duration::from_secs(20))
            .await
            .expect("VM powered off");
        assert!(status.success(), "QEMU exit: {status}");
        vm.stop(Duration::ZERO).await;
        assert_clean(run.path(), &pids);
    });
}

/// `cocoon bench boot`'s cycle and both raw baselines, once each: the bench is not
/// in CI otherwise, and its same-initramfs baseline must really boot to its init.
#[test]
fn the_boot_bench_measures_cocoon_and_both_baselines() {
    let run = tempfile::tempdir().unwrap();
    let config = test_config(run.path(), BOOT);
    cocoon_integration::test_runtime().block_on(async {
        let busybox = std::path::Path::new("/bin/busybox");
        let r = cocoon_shim::bench::boot_bench(&config, 1, busybox, None)
            .await
            .unwrap();
        let s = &r.samples[0];
        assert!(s.ready_ms > 0.0 && s.shutdown_ms > 0.0, "{s:?}");
        // The cycle leaves out only the bench's own probes (timer rounding aside).
        assert!(s.probes_ms > 0.0, "{s:?}");
        assert!(s.cycle_ms + 0.01 >= s.ready_ms + s.shutdown_ms, "{s:?}");
        assert_eq!(r.baseline_cycle_ms.len(), 1);
        assert_eq!(r.baseline_image_cycle_ms.len(), 1);
        assert!(r.baseline_image_cycle_ms[0] > 0.0);
        assert!(
            r.table().contains("same kernel and initramfs"),
            "{}",
            r.table()
        );

        // An initramfs with no busybox panics the kernel: an error, never a figure.
        let other = tempfile::tempdir().unwrap();
        let empty = other.path().join("no-busybox.cpio");
        let mut a = cocoon_rootfs::cpio::Archive::new();
        a.add_dir("bin", 0o755).unwrap();
        std::fs::write(&empty, a.to_bytes()).unwrap();
        let mut bad = config.clone();
        bad.vm.initrd = empty.clone();
        let e = cocoon_shim::bench::image_baseline(&bad).await.unwrap_err();
        assert!(e.to_string().contains("no-busybox.cpio"), "{e}");
        assert!(e.to_string().contains("Kernel panic"), "{e}");
    });
    assert_clean(run.path(), &[]);
}

#[test]
fn four_vms_concurrently() {
    let run = tempfile::tempdir().unwrap();
    // Four TCG guests share two cores here: allow for the slowdown.
    let config = test_config(run.path(), Duration::from_secs(120));
    cocoon_integration::test_runtime().block_on(async {
        let mut tasks = Vec::new();
        for i in 0..4 {
            let mut config = config.clone();
            // Two of them from the bzImage, whatever the image's default (its PVH ELF
            // for Cocoon's own kernel): both ways to boot stay tested.
            if i < 2 {
                config.vm.kernel = config.paths.image_dir.join("vmlinuz");
            }
            tasks.push(tokio::spawn(async move {
                let name = format!("vm{i}");
                let (vm, agent) = ready_vm(
                    &config,
                    &name,
                    Duration::from_secs(120),
                    Duration::from_secs(10),
                )
                .await;
                // Once it answers: each jailed program has been forked by its waiter.
                let pids = vm.pids();
                let d = agent.guest_details().await.unwrap();
                power_off(vm, &agent, &name, Duration::from_secs(30)).await;
                (pids, d.boottime_ns)
            }));
        }
        let mut all_pids = Vec::new();
        for t in tasks {
            let (pids, boottime) = t.await.unwrap();
            assert!(boottime > 0);
            all_pids.extend(pids);
        }
        // Per VM: QEMU and the vsock backend, each with its PID-namespace waiter.
        assert_eq!(all_pids.len(), 16);
        all_pids.sort_unstable();
        all_pids.dedup();
        assert_eq!(all_pids.len(), 16, "each VM has its own processes");
        assert_clean(run.path(), &all_pids);
    });
}

/// A pod's stop: the guest syncs and says so, and the host ends the VM with no grace.
/// When the stop returns, nothing of the VM is left, not even a jailed program still
/// dying of its waiter's end (which a SIGKILL of the waiters would leave).
#[test]
fn a_stopped_vm_is_gone_when_the_stop_returns() {
    let run = tempfile::tempdir().unwrap();
    let config = test_config(run.path(), BOOT);
    cocoon_integration::test_runtime().block_on(async {
        let (vm, agent) = boot(&config, "nograce").await;
        let pids = vm.pids();
        assert_eq!(pids.len(), 4, "two waiters and their programs: {pids:?}");
        assert!(agent.sync_for_stop().await.unwrap(), "the guest synced");
        vm.stop(Duration::ZERO).await.expect("the VMM reaped");
        let left: Vec<_> = pids
            .iter()
            .filter(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
            .collect();
        assert!(left.is_empty(), "still there after the stop: {left:?}");
        assert_clean(run.path(), &pids);
    });
}

/// A guest that synced for a host that said it would end the VM, and then did not (it
/// went away, say), powers off by itself a few seconds later.
#[test]
fn a_guest_left_running_after_its_sync_powers_off_by_itself() {
    let run = tempfile::tempdir().unwrap();
    let config = test_config(run.path(), BOOT);
    cocoon_integration::test_runtime().block_on(async {
        let (mut vm, agent) = boot(&config, "backstop").await;
        let pids = vm.pids();
        assert!(agent.sync_for_stop().await.unwrap(), "the guest synced");
        // Still serving until the backstop ends it.
        agent.check().await.unwrap();
        let status = vm
            .wait_exit(Duration::from_secs(60))
            .await
            .expect("the guest powered off by itself");
        assert!(status.success(), "QEMU exit: {status}");
        vm.stop(Duration::ZERO).await;
        assert_clean(run.path(), &pids);
    });
}

/// Puts a long poll (GetOomEvent) in flight, SIGKILLs `victim` (a process of
/// the VM), and returns how the pending call failed, within 10 s.
async fn kill_during_long_poll(agent: &AgentClient, victim: u32) -> AgentError {
    let pending = {
        let agent = agent.clone();
        tokio::spawn(async move { agent.next_oom_event(Duration::from_secs(60)).await })
    };
    // The call must be in the agent's hands before the kill: it still
    // pends after a later call on the same connection has completed.
    agent.check().await.unwrap();
    assert!(!pending.is_finished(), "the long poll returned early");
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("the pending call must fail within 10 s of the kill")
        .unwrap()
        .unwrap_err()
}

#[test]
fn vm_killed_mid_call_fails_fast() {
    let run = tempfile::tempdir().unwrap();
    let config = test_config(run.path(), BOOT);
    cocoon_integration::test_runtime().block_on(async {
        let (vm, agent) = boot(&config, "killed").await;
        let pids = vm.pids();
        let killed_at = Instant::now();
        // QEMU itself, not the waiter the shim started it under.
        let err = kill_during_long_poll(&agent, named(&pids, "qemu-system-x86")).await;
        assert!(matches!(err, AgentError::Disconnected { .. }), "{err}");
        assert!(err.to_string().contains("GetOomEvent"), "{err}");
        assert!(killed_at.elapsed() < Duration::from_secs(10));

        // New calls fail at once too, with a clear error, not a hang.
        let err = tokio::time::timeout(Duration::from_secs(10), agent.check())
            .await
            .expect("a call after the VM died must not hang")
            .unwrap_err();
        assert!(
            matches!(
                err,
                AgentError::Disconnected { .. } | AgentError::CallTimeout { .. }
            ),
            "{err}"
        );
        vm.stop(Duration::ZERO).await;
        assert_clean(run.path(), &pids);
    });
}

#[test]
fn vsock_backend_killed_mid_call_fails_fast() {
    let run = tempfile::tempdir().unwrap();
    let config = test_config(run.path(), BOOT);
    cocoon_integration::test_runtime().block_on(async {
        let (vm, agent) = boot(&config, "backend").await;
        let pids = vm.pids();
        let backend = named(&pids, "cocoon-vmm");
        let err = kill_during_long_poll(&agent, backend).await;
        assert!(matches!(err, AgentError::Disconnected { .. }), "{err}");
        vm.stop(Duration::from_secs(1)).await;
        assert_clean(run.path(), &pids);
    });
}

#[test]
fn guest_that_never_answers_times_out_and_leaves_nothing() {
    let run = tempfile::tempdir().unwrap();
    let mut config = test_config(run.path(), Duration::from_secs(8));
    // No init at all, and panic=0: the kernel panics and then sits there
    // forever, the VM running but silent.
    config.vm.kernel_params = "rdinit=/nonexistent panic=0".into();
    cocoon_integration::test_runtime().block_on(async {
        let hv = hypervisor::from_config(&config).unwrap();
        let mut vm = hv
            .launch(&VmSpec::from_config(&config, "silent"))
            .await
            .unwrap();
        let pids = vm.pids();
        let started = Instant::now();
        let err =
            match AgentClient::wait_ready(&mut vm, Duration::from_secs(8), Duration::from_secs(5))
                .await
            {
                Ok(_) => panic!("a guest without init answered"),
                Err(e) => e,
            };
        let took = started.elapsed();
        assert!(matches!(err, AgentError::BootTimeout { .. }), "{err}");
        assert!(
            err.to_string().contains("did not answer within 8s"),
            "{err}"
        );
        assert!(
            took >= Duration::from_secs(8) && took < Duration::from_secs(20),
            "{took:?}"
        );
        assert!(
            vm.try_exit_status().is_none(),
            "the silent VM should still be running"
        );
        assert!(pids.iter().all(|p| alive(*p)));
        // Dropping the VM (as an error path does) kills and cleans up.
        drop(vm);
        assert_clean(run.path(), &pids);
    });
}

#[test]
fn guest_that_dies_is_reported_at_once() {
    let run = tempfile::tempdir().unwrap();
    let config = {
        let mut c = test_config(run.path(), BOOT);
        // No init, and panic=-1: the kernel resets, QEMU (-no-reboot) exits.
        c.vm.kernel_params = "rdinit=/nonexistent".into();
        c
    };
    cocoon_integration::test_runtime().block_on(async {
        let hv = hypervisor::from_config(&config).unwrap();
        let mut vm = hv
            .launch(&VmSpec::from_config(&config, "dies"))
            .await
            .unwrap();
        let pids = vm.pids();
        let err = match AgentClient::wait_ready(&mut vm, BOOT, Duration::from_secs(5)).await {
            Ok(_) => panic!("a guest without init answered"),
            Err(e) => e,
        };
        assert!(matches!(err, AgentError::VmExited { .. }), "{err}");
        // The console tail explains why.
        assert!(err.to_string().contains("Kernel panic"), "{err}");
        vm.stop(Duration::ZERO).await;
        assert_clean(run.path(), &pids);
    });
}

#[test]
fn missing_kernel_is_a_clear_error_and_creates_nothing() {
    let run = tempfile::tempdir().unwrap();
    let mut config = test_config(run.path(), BOOT);
    config.vm.kernel = "/nonexistent/vmlinuz".into();
    cocoon_integration::test_runtime().block_on(async {
        let hv = hypervisor::from_config(&config).unwrap();
        let err = hv
            .launch(&VmSpec::from_config(&config, "nokernel"))
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("/nonexistent/vmlinuz") && msg.contains("kernel"),
            "{msg}"
        );
        assert!(leftover_entries(run.path()).is_empty());
    });
}

/// The same boot-and-ping through the shim's seam on our own VMM. It needs
/// hardware KVM: elsewhere the backend must refuse with the reason, and the
/// test reruns itself inside an L1 guest that has it (the nested harness).
#[test]
fn cocoon_vmm_backend_boots_or_says_why() {
    use cocoon_shim::check::{kvm_kind, KvmKind};
    use cocoon_shim::config::HypervisorKind;
    let run = tempfile::tempdir().unwrap();
    let mut config = test_config(run.path(), BOOT);
    config.hypervisor = HypervisorKind::CocoonVmm;
    // Two vCPUs: the guest kernel finds the second only through our ACPI MADT.
    config.vm.vcpus = 2;
    let kvm = kvm_kind();
    if kvm != KvmKind::Hardware {
        let err = match hypervisor::from_config(&config) {
            Ok(_) => panic!("cocoon-vmm was accepted on a host with {kvm:?} KVM"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("needs hardware virtualization"), "{err}");
        assert!(
            err.contains(if kvm == KvmKind::Pvm {
                "PVM"
            } else {
                "no /dev/kvm"
            }),
            "{err}"
        );
    }
    if hardware_kvm("cocoon_vmm_backend_boots_or_says_why") == Place::Done {
        return;
    }
    cocoon_integration::test_runtime().block_on(async {
        let (vm, agent) = boot(&config, "own-vmm").await;
        let pids = vm.pids();
        let d = agent.guest_details().await.unwrap();
        assert!(d.kernel_release.starts_with("6."), "{}", d.kernel_release);
        assert_eq!(d.online_cpus, 2, "the guest saw {} vCPUs", d.online_cpus);
        // The jailed VMM cannot mount: its guest RAM is the huge-page tmpfs file the
        // shim made and handed over (vm.huge_pages = auto), in 2 MiB pages though L1
        // leaves shmem THP at `never`.
        let huge: u64 = vm
            .pids()
            .into_iter()
            .map(cocoon_nested::testing::shmem_huge_kb)
            .sum();
        assert!(huge >= 2048, "guest RAM has {huge} kB in huge pages");
        // ACPI S5 through the FADT's sleep control port ends the VMM.
        power_off(vm, &agent, "own-vmm", Duration::from_secs(20)).await;
        assert_clean(run.path(), &pids);

        // A VMM that exits before the agent answers: the error shows the end of
        // the VMM's own log (why it exited), not only an empty guest console.
        let mut bad = config.clone();
        bad.vm.kernel = bad.vm.initrd.clone();
        let hv = hypervisor::from_config(&bad).unwrap();
        let mut vm = hv
            .launch(&VmSpec::from_config(&bad, "bad-kernel"))
            .await
            .unwrap();
        let pids = vm.pids();
        let err = match AgentClient::wait_ready(&mut vm, BOOT, Duration::from_secs(5)).await {
            Ok(_) => panic!("a VM with an initramfs for a kernel booted"),
            Err(e) => e,
        };
        let AgentError::VmExited { vmm_log, .. } = &err else {
            panic!("{err}");
        };
        assert!(vmm_log.to_lowercase().contains("kernel"), "{err}");
        assert!(err.to_string().contains("the VMM's log ends with"), "{err}");
        vm.stop(Duration::ZERO).await;
        assert_clean(run.path(), &pids);
    });
}

/// `cocoon vm boot` stopped by SIGTERM mid-boot kills its VM and removes its
/// run directory instead of leaving them to the next reboot.
#[test]
fn cli_vm_boot_cleans_up_on_sigterm() {
    let run = tempfile::tempdir().unwrap();
    let config = test_config(run.path(), BOOT);
    let cfg = run.path().join("cocoon.toml");
    std::fs::write(
        &cfg,
        format!(
            "[vm]\nkernel = {:?}\ninitrd = {:?}\n[paths]\nrun_dir = {:?}\n",
            config.vm.kernel,
            config.vm.initrd,
            run.path().join("vms")
        ),
    )
    .unwrap();
    let cli = cocoon_integration::workspace_root().join("target/debug/cocoon");
    let child = std::process::Command::new(cli)
        .args([
            "vm",
            "boot",
            "--id",
            "sig",
            "--kernel-params",
            "rdinit=/nonexistent panic=0",
        ])
        .env("COCOON_CONFIG", &cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let vm_dir = run.path().join("vms/sig");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !vm_dir.join("console.log").exists() {
        assert!(Instant::now() < deadline, "the VM never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let vm_procs: Vec<u32> = processes_mentioning(&vm_dir.to_string_lossy())
        .iter()
        .map(|p| p.0)
        .collect();
    assert!(!vm_procs.is_empty());
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("terminated"),
        "{out:?}"
    );
    assert!(wait_gone(&vm_procs, Duration::from_secs(5)).is_empty());
    assert!(!vm_dir.exists(), "run dir left behind");
}

/// QEMU under KVM runs jailed like QEMU under TCG: the pod's uid, no capabilities,
/// seccomp, PID 1 of its own namespace; it reaches `/dev/kvm` through the device's group
/// (`cocoon check` says when it has none). Here that is L1, whose `/dev/kvm` is 0600
/// root, so the test gives it a group there, as an operator would on a host.
#[test]
fn jailed_qemu_boots_under_hardware_kvm() {
    use cocoon_shim::config::{Accel, HypervisorKind};
    use std::os::unix::fs::PermissionsExt;
    if hardware_kvm("jailed_qemu_boots_under_hardware_kvm") == Place::Done {
        return;
    }
    if std::env::var_os(cocoon_nested::testing::IN_L1_ENV).is_some() {
        nix::unistd::chown("/dev/kvm", None, Some(nix::unistd::Gid::from_raw(36))).unwrap();
        std::fs::set_permissions("/dev/kvm", std::fs::Permissions::from_mode(0o660)).unwrap();
    }
    let run = tempfile::tempdir().unwrap();
    let mut config = test_config(run.path(), BOOT);
    config.hypervisor = HypervisorKind::Qemu;
    config.qemu.accel = Accel::Kvm;
    assert!(config.jail.enabled, "the jail is on by default");
    cocoon_integration::test_runtime().block_on(async {
        let (vm, agent) = boot(&config, "kvm-qemu").await;
        assert_eq!(vm.accel, "kvm");
        let pids = vm.pids();
        let qemu = pids
            .iter()
            .copied()
            .find(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|c| c.starts_with("qemu"))
            })
            .expect("the VM's QEMU");
        let status = std::fs::read_to_string(format!("/proc/{qemu}/status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let uid = field("Uid:");
        assert!(!uid.starts_with("0\t"), "QEMU runs as root: {uid}");
        assert_eq!(field("CapEff:"), "0000000000000000");
        assert_eq!(field("Seccomp:"), "2");
        assert_eq!(field("NoNewPrivs:"), "1");
        assert!(
            field("NSpid:").ends_with("\t1"),
            "not PID 1 of its own namespace: {}",
            field("NSpid:")
        );
        let d = agent.guest_details().await.unwrap();
        assert!(d.kernel_release.starts_with("6."), "{}", d.kernel_release);
        power_off(vm, &agent, "kvm-qemu", Duration::from_secs(30)).await;
        assert_clean(run.path(), &pids);
    });
}

/// `scripts/bench-bare-boots.sh` packs this machine's QEMU (binary, libraries, TCG
/// module, firmware), the CLI and the image, and boots pod VMs from the pack alone:
/// one, then two at once. Its figures come from machines lent without QEMU installed.
#[test]
fn the_bare_boots_bench_boots_from_its_pack() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let tmp = tempfile::tempdir().unwrap();
    let (pack, out) = (tmp.path().join("pack"), tmp.path().join("out"));
    let script = root.join("scripts/bench-bare-boots.sh");
    let packed = std::process::Command::new("bash")
        .arg(&script)
        .arg("--pack")
        .arg(&pack)
        .output()
        .unwrap();
    assert!(packed.status.success(), "{packed:?}");
    // Its work dir (mktemp) under the test's, to see that nothing stays there.
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let ran = std::process::Command::new("bash")
        .arg(&script)
        .args([
            pack.as_os_str(),
            "2".as_ref(),
            "1".as_ref(),
            out.as_os_str(),
        ])
        .env("TMPDIR", &work)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&ran.stdout);
    assert!(ran.status.success(), "{ran:?}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("bare-boots.json")).unwrap()).unwrap();
    assert_eq!(report["many_failed"], serde_json::json!([0]), "{text}");
    for key in ["one_ready_ms", "many_slowest_ready_ms"] {
        assert!(report[key][0].as_u64().unwrap() > 0, "{key}: {text}");
    }
    assert!(text.contains("2 at once (slowest)"), "{text}");
    assert_clean(&work, &[]);
    assert_eq!(
        std::fs::read_dir(&work).unwrap().count(),
        0,
        "work dir kept"
    );
}
