//! A pod's footprint on the host: guest memory the guest has freed goes back to the host
//! (a virtio balloon with free page reporting, `vm.free_page_reporting`: QEMU's, and
//! cocoon-vmm's own, which runs in the nested harness's L1 here), so a container's
//! transient use does not stay charged to the pod for its life.

mod ctr_common;

use std::time::{Duration, Instant};

use cocoon_integration::image::IMAGE_REF;
use cocoon_nested::testing::{hardware_kvm, Place, NOTE_PREFIX};
use ctr_common::*;

/// The part of a process's proportional set size that is shared memory, in KiB: for
/// QEMU, the guest RAM the guest has touched (a file on a huge-page tmpfs, or a memfd).
fn pss_shmem_kib(pid: u32) -> u64 {
    cocoon_shim::telemetry::Rollup::of(pid).map_or(0, |r| r.pss_shmem)
}

#[test]
fn guest_memory_a_container_frees_goes_back_to_the_host() {
    let env = env_with("hypervisor = \"qemu\"\n", "");
    freed_memory_goes_back(&env, "qemu-system");
}

/// The same on cocoon-vmm (its own balloon), which needs hardware KVM: here inside L1.
#[test]
fn guest_memory_a_container_frees_goes_back_to_the_host_on_cocoon_vmm() {
    if hardware_kvm("guest_memory_a_container_frees_goes_back_to_the_host_on_cocoon_vmm")
        == Place::Done
    {
        return;
    }
    let env = env_on(Some("cocoon-vmm"));
    // The VMM itself, not its PID-namespace waiter (whose command line is renamed).
    freed_memory_goes_back(&env, "--free-page-reporting");
}

/// Runs a container that writes 96 MiB to the guest's /dev/shm (guest RAM) and frees
/// it, and watches the guest RAM the VMM process (the one whose command line holds
/// `vmm_mark`) has touched rise and fall back.
fn freed_memory_goes_back(env: &Env, vmm_mark: &str) {
    run_detached(
        env,
        "transient",
        &[],
        &[
            "sh",
            "-c",
            "head -c 100663296 /dev/zero > /dev/shm/x; rm /dev/shm/x; sleep 1000",
        ],
    );
    let vmm = cocoon_integration::processes_mentioning(&env.run_dir.to_string_lossy())
        .into_iter()
        .find(|(_, c)| c.contains(vmm_mark))
        .unwrap_or_else(|| panic!("no process of the pod's VMM ({vmm_mark})"))
        .0;
    // Seen every 200 ms: the rise by the container's write, then the fall once the
    // guest has reported the freed pages (it reports every 2 s, a part each time).
    let (mut first, mut peak, mut seen) = (None, 0u64, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(90);
    let given_back = loop {
        let now = pss_shmem_kib(vmm);
        let base = *first.get_or_insert(now);
        peak = peak.max(now);
        if seen.last() != Some(&now) {
            seen.push(now);
        }
        if peak >= base + 32 * 1024 && now + 32 * 1024 <= peak {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        given_back,
        "guest RAM on the host (KiB, each change): {seen:?}: it should rise with the 96 MiB \
         written (by 32 MiB at least: part lands on pages the boot touched) and fall back by \
         32 MiB at least once freed"
    );
    eprintln!("guest RAM on the host (KiB, each change): {seen:?}");
    kill_delete_clean(env, "transient");
}

/// `cocoon bench run` against runc through one containerd: its latencies, each
/// process of one idle pod, and the per-pod footprint of several idle pods, in the
/// JSON it writes; every pod it started is gone afterwards.
#[test]
fn the_run_bench_measures_each_pod_process_and_the_shared_footprint() {
    let env = env_with("hypervisor = \"qemu\"\n", "");
    run_bench_measures(
        &env,
        &[
            "containerd-shim-cocoon-v2",
            "cocoon-janitor",
            "qemu-system-x86_64",
            "virtiofsd",
            // The jailed VMM's and vsock backend's PID-namespace waiters, which name
            // nothing of the pod on their command line: found below the shim.
            "cocoon-pid-ns",
        ],
    );
}

/// The same for cocoon-vmm pods (#12's footprint goal is set for them), which need
/// hardware KVM: here inside L1. Also prints what each pod costs, as measured there.
#[test]
fn the_run_bench_measures_cocoon_vmm_pods() {
    if hardware_kvm("the_run_bench_measures_cocoon_vmm_pods") == Place::Done {
        return;
    }
    let env = env_with("hypervisor = \"cocoon-vmm\"\n", "");
    let report = run_bench_measures(
        &env,
        &[
            "containerd-shim-cocoon-v2",
            "cocoon-janitor",
            "cocoon-vmm",
            "virtiofsd",
            "cocoon-pid-ns",
        ],
    );
    let f = &report["cocoon_footprint"];
    eprintln!(
        "{NOTE_PREFIX}cocoon-vmm pods, Pss beyond guest RAM per pod of {} idle (kB): {} in all, {}",
        f["pods"], f["total_pss_kb_per_pod"], f["pss_kb_per_pod"]
    );
}

/// Runs `cocoon bench run` once through `env`'s containerd with 2 idle pods, checks
/// that each of `cocoon_kinds` (and runc's shim) was measured and that nothing is
/// left, and returns the report.
fn run_bench_measures(env: &Env, cocoon_kinds: &[&str]) -> serde_json::Value {
    let out = env.run_dir.with_file_name("bench-run.json");
    let o = cocoon_cli(env)
        .args(["bench", "run", "--address"])
        .arg(&env.containerd.address)
        .args([
            "--image",
            IMAGE_REF,
            "--runs",
            "1",
            "--idle-pods",
            "2",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "cocoon bench run failed: {stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let ms = |k: &str| report[k][0].as_f64().unwrap_or(0.0);
    assert!(ms("cocoon_ms") > 0.0 && ms("runc_ms") > 0.0, "{report}");
    let pss_of = |list: &serde_json::Value, kind: &str| -> u64 {
        list.as_array()
            .unwrap()
            .iter()
            .filter(|m| m["process"] == kind)
            .map(|m| m["pss_kb"].as_u64().unwrap())
            .sum()
    };
    for &kind in cocoon_kinds {
        assert!(
            pss_of(&report["cocoon_memory"], kind) > 0,
            "no Pss for {kind} of one idle pod: {stdout}"
        );
    }
    // runc's container is found below its shim, as cocoon's processes are.
    for kind in ["containerd-shim-runc-v2", "sleep"] {
        assert!(pss_of(&report["runc_memory"], kind) > 0, "{kind}: {stdout}");
    }
    for (runtime, shim) in [
        ("cocoon", "containerd-shim-cocoon-v2"),
        ("runc", "containerd-shim-runc-v2"),
    ] {
        let f = &report[format!("{runtime}_footprint")];
        assert_eq!(f["pods"], 2, "{f}");
        let per_pod: u64 = f["pss_kb_per_pod"]
            .as_array()
            .unwrap()
            .iter()
            .map(|kv| kv[1].as_u64().unwrap())
            .sum();
        assert!(per_pod > 0 && per_pod == f["total_pss_kb_per_pod"], "{f}");
        assert!(
            f["pss_kb_per_pod"]
                .as_array()
                .unwrap()
                .iter()
                .any(|kv| kv[0] == shim),
            "{f}"
        );
    }
    assert!(
        stdout.contains("host memory per pod with 2 idle pods"),
        "{stdout}"
    );
    eprintln!("{stdout}");
    assert_clean(env);
    report
}
