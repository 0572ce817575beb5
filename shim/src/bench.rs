//! `cocoon bench boot`: how long a pod VM takes from launch to a ready agent,
//! split into host launch, kernel boot (guest clock) and agent start, against
//! a baseline measured in the same run: raw QEMU with the same kernel and
//! machine options booting a trivial init that powers off at once. Runs of the
//! two alternate so noise on a shared host hits both alike.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;

use crate::agent_client::{AgentClient, AgentError};
use crate::config::Config;
use crate::hypervisor::{self, HypervisorError, VmSpec};

#[derive(Debug, Error)]
pub enum BenchError {
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("cannot read {0} for the baseline initramfs")]
    Busybox(PathBuf, #[source] std::io::Error),
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("the VM did not exit within {0:?} after Shutdown")]
    NoExit(Duration),
    #[error("the baseline QEMU run failed: {0}")]
    Baseline(String),
}

/// One boot of a Cocoon VM, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct BootSample {
    /// Launch to the first answered health check.
    pub ready_ms: f64,
    /// Host side: vsock backend up and QEMU spawned.
    pub vmm_launch_ms: f64,
    /// Guest clock (CLOCK_BOOTTIME) when the agent's main() began: kernel boot.
    pub kernel_boot_ms: f64,
    /// Guest clock from agent main() to its server listening (mounts, modules).
    pub agent_start_ms: f64,
    /// The guest's TSC at agent main(), at the host's TSC rate: the VM's start
    /// (its first instruction under TCG, the vCPU's creation under KVM) to agent main,
    /// firmware and kernel, all of it. Under TCG the guest clock misses part of the
    /// kernel's boot (jiffies lose ticks until the TSC clocksource takes over), so this
    /// exceeds `kernel_boot_ms` by more than the firmware.
    pub tsc_to_agent_ms: f64,
    /// What neither side's clock covers: QEMU set-up, firmware, kernel
    /// decompression before the guest clock starts, the first connection.
    pub unaccounted_ms: f64,
    /// Shutdown call (the guest syncs) to the VMM ended and reaped, as for a pod.
    pub shutdown_ms: f64,
    /// Launch to VMM exit less `probes_ms`: the whole cycle, comparable to the baseline.
    pub cycle_ms: f64,
    /// The bench's own probes between ready and shutdown (the host processes' memory
    /// read from `/proc`, a guest-details call for the guest's clocks): left out of
    /// `cycle_ms`, since nothing in a pod's life or in the baseline's matches them.
    pub probes_ms: f64,
    /// Resident memory of the VM's host processes (VMM, backends) when the
    /// agent first answered, in KiB; guest RAM the guest touched included.
    pub host_rss_kib: u64,
    /// What the VM's host processes hold beyond guest RAM when the agent first
    /// answered, in KiB: their proportional set size less its shared-memory part (guest
    /// RAM is a memfd or tmpfs file); the VMM's own heap, its copies of the kernel and
    /// initramfs, code, TCG's translation cache.
    pub host_pss_beyond_ram_kib: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub median: f64,
    pub p90: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(values: &[f64]) -> Stats {
        let mut v = values.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        if v.is_empty() {
            return Stats {
                median: 0.0,
                p90: 0.0,
                min: 0.0,
                max: 0.0,
            };
        }
        let pick = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
        Stats {
            median: pick(0.5),
            p90: pick(0.9),
            min: v[0],
            max: v[v.len() - 1],
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BootReport {
    pub runs: usize,
    pub accel: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub samples: Vec<BootSample>,
    /// Raw QEMU, same kernel and options, trivial init that powers off:
    /// process start to exit, in milliseconds.
    pub baseline_cycle_ms: Vec<f64>,
    /// The same, booting Cocoon's own initramfs (its agent unpacked, not run) with
    /// busybox as the trivial init: the baseline of #12's "own overhead" goal.
    pub baseline_image_cycle_ms: Vec<f64>,
    /// Another guest image booted by Cocoon in the same run, alternating (Debian's cloud
    /// kernel against our own), if asked for.
    pub compare_kernel: Option<PathBuf>,
    /// The config file the compared boots used, where it was one of its own
    /// (`--compare-config`); set by the caller.
    pub compare_config: Option<PathBuf>,
    pub compare_samples: Vec<BootSample>,
    pub summary: Vec<(String, Stats)>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Boots one VM, measures it, shuts it down.
pub async fn boot_once(
    hv: &dyn hypervisor::Hypervisor,
    config: &Config,
    id: &str,
) -> Result<(BootSample, cocoon_protocol::agent::GuestDetailsResponse), BenchError> {
    let spec = VmSpec::from_config(config, id);
    let mut vm = hv.launch(&spec).await?;
    let boot_timeout = Duration::from_millis(config.vm.boot_timeout_ms);
    let call_timeout = Duration::from_millis(config.vm.call_timeout_ms);
    let agent = AgentClient::wait_ready(&mut vm, boot_timeout, call_timeout).await?;
    let ready = vm.times.started.elapsed();
    let probing = Instant::now();
    let host_rss_kib = vm.pids().iter().map(|p| rss_kib(*p)).sum();
    let host_pss_beyond_ram_kib = vm.pids().iter().map(|p| pss_beyond_ram_kib(*p)).sum();
    let details = agent.guest_details().await?;
    let probes = probing.elapsed();
    // Stopped as a pod's VM is: the guest syncs and replies, the host ends the VMM.
    let t_shutdown = Instant::now();
    let synced = agent.sync_for_stop().await?;
    let exit_deadline = Duration::from_secs(10);
    if !synced && vm.wait_exit(exit_deadline).await.is_none() {
        vm.stop(Duration::ZERO).await;
        return Err(BenchError::NoExit(exit_deadline));
    }
    let (started, vmm_spawned) = (vm.times.started, vm.times.vmm_spawned);
    vm.stop(Duration::ZERO).await;
    let shutdown = t_shutdown.elapsed();
    let cycle = started.elapsed();
    let vmm_launch = vmm_spawned - started;
    let kernel_boot = details.agent_start_boottime_ns as f64 / 1e6;
    let tsc_to_agent = tsc_ms(details.agent_start_tsc, &spec.run_root);
    let agent_start =
        (details.server_ready_boottime_ns - details.agent_start_boottime_ns) as f64 / 1e6;
    let sample = BootSample {
        ready_ms: ms(ready),
        vmm_launch_ms: ms(vmm_launch),
        kernel_boot_ms: kernel_boot,
        agent_start_ms: agent_start,
        tsc_to_agent_ms: tsc_to_agent,
        unaccounted_ms: ms(ready) - ms(vmm_launch) - kernel_boot - agent_start,
        shutdown_ms: ms(shutdown),
        cycle_ms: ms(cycle) - ms(probes),
        probes_ms: ms(probes),
        host_rss_kib,
        host_pss_beyond_ram_kib,
    };
    Ok((sample, details))
}

/// A guest TSC reading in ms since the guest's TSC 0, at the host's TSC rate (which the
/// guest's TSC counts at under TCG, and under KVM without TSC scaling).
pub fn tsc_ms(tsc: u64, run_root: &std::path::Path) -> f64 {
    tsc as f64 / cocoon_rootfs::tsc::host_khz(Some(run_root)) as f64
}

/// VmRSS of a process in KiB (0 if it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Pss less Pss_Shmem of a process in KiB (0 if it is gone).
pub fn pss_beyond_ram_kib(pid: u32) -> u64 {
    crate::telemetry::Rollup::of(pid).map_or(0, |r| r.pss_beyond_shmem())
}

/// A one-file initramfs whose /init (busybox sh) resets the VM at once (which ends it:
/// `-no-reboot`).
pub fn baseline_initrd(busybox: &Path, out: &Path) -> Result<(), BenchError> {
    let bb = std::fs::read(busybox).map_err(|e| BenchError::Busybox(busybox.into(), e))?;
    let mut a = cocoon_rootfs::cpio::Archive::new();
    let script = b"#!/bin/busybox sh\nexec /bin/busybox reboot -f\n".to_vec();
    let add = |a: &mut cocoon_rootfs::cpio::Archive| -> Result<(), cocoon_rootfs::cpio::CpioError> {
        a.add_dir("bin", 0o755)?;
        a.add_file("bin/busybox", 0o755, bb)?;
        a.add_file("init", 0o755, script)
    };
    add(&mut a).map_err(|e| BenchError::Baseline(e.to_string()))?;
    std::fs::write(out, a.to_bytes()).map_err(|e| BenchError::Write(out.into(), e))
}

/// What a baseline VM boots as its init.
#[derive(Clone, Copy)]
enum BaselineInit<'a> {
    /// A one-file initramfs of its own ([`baseline_initrd`]).
    Tiny(&'a Path),
    /// Cocoon's initramfs, with its `/bin/busybox` as the init instead of the agent.
    Image(&'a Path),
}

/// Raw QEMU: same binary, machine, kernel and command line as Cocoon's, no
/// devices, trivial init. Process start to exit.
async fn baseline_once(
    config: &Config,
    accel: &str,
    init: BaselineInit<'_>,
) -> Result<f64, BenchError> {
    let mut cmdline = String::from("console=ttyS0 quiet panic=-1 reboot=t");
    if accel != "kvm" {
        cmdline.push(' ');
        cmdline.push_str(&cocoon_rootfs::tsc::tcg_kernel_param(Some(
            &config.paths.run_dir,
        )));
        for p in crate::hypervisor::qemu::TCG_KERNEL_PARAMS {
            cmdline.push(' ');
            cmdline.push_str(p);
        }
    }
    let machine = match config.qemu.machine {
        crate::config::Machine::Microvm => {
            use crate::hypervisor::qemu::{self, microvm_kernel_params, microvm_machine};
            // The machine the bench's pod VMs boot (`Qemu::microvm_acpi`).
            let spec = VmSpec::from_config(config, "baseline");
            let devices = qemu::virtio_mmio_devices(
                &spec,
                config.vm.free_page_reporting,
                &config.qemu.extra_args,
            );
            let acpi = !config.kernel_takes_virtio_mmio_cmdline()
                || devices > qemu::MICROVM_LEGACY_TRANSPORTS;
            for p in microvm_kernel_params(acpi) {
                cmdline.push(' ');
                cmdline.push_str(p);
            }
            format!("{},accel={accel}", microvm_machine(acpi))
        }
        crate::config::Machine::Pc => format!("pc,accel={accel}"),
    };
    let initrd = match init {
        BaselineInit::Tiny(p) => p,
        BaselineInit::Image(p) => {
            // Everything after `--` is the init's argv. A reset ends the VM on every
            // machine (`-no-reboot`); a microvm has no ACPI to power off with.
            cmdline.push_str(" rdinit=/bin/busybox -- reboot -f");
            p
        }
    };
    let mem = format!("{}M", config.vm.memory_mib);
    let start = Instant::now();
    let out = tokio::process::Command::new(&config.qemu.binary)
        .args([
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-display",
            "none",
        ])
        .args([
            "-machine",
            &machine,
            "-cpu",
            if accel == "kvm" { "host" } else { "max" },
        ])
        .args(["-smp", &config.vm.vcpus.to_string(), "-m", &mem])
        .arg("-kernel")
        .arg(config.kernel_path())
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &cmdline, "-serial", "stdio"])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), out)
        .await
        .map_err(|_| BenchError::Baseline("no exit within 120 s".into()))?
        .map_err(|e| BenchError::Baseline(e.to_string()))?;
    let elapsed = ms(start.elapsed());
    let console = String::from_utf8_lossy(&out.stdout);
    // A missing init panics the kernel, which `panic=-1 -no-reboot` also ends: not a
    // boot to compare with. Name the panic (or the console's end) and QEMU's stderr.
    let panic = console.lines().find(|l| l.contains("Kernel panic"));
    if !out.status.success() || panic.is_some() {
        let why = panic.map_or_else(
            || {
                let lines: Vec<&str> = console.lines().collect();
                lines[lines.len().saturating_sub(5)..].join("\n")
            },
            |l| l.trim().to_string(),
        );
        return Err(BenchError::Baseline(format!(
            "{} booting {}: {why} {}",
            out.status,
            initrd.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(elapsed)
}

/// One raw QEMU boot of `config`'s kernel and initramfs, busybox as the init:
/// process start to exit. An initramfs without `/bin/busybox` is an error.
pub async fn image_baseline(config: &Config) -> Result<f64, BenchError> {
    let image = config.initrd_path();
    baseline_once(
        config,
        &hypervisor_accel(config),
        BaselineInit::Image(&image),
    )
    .await
}

/// What the compared boots differ in, for the table: templates, the image, or other
/// settings.
fn compared_what(config: &Config, compare: &Config) -> &'static str {
    if compare.vm.templates != config.vm.templates {
        "compared: from a VM template"
    } else if (compare.kernel_path(), compare.initrd_path())
        != (config.kernel_path(), config.initrd_path())
    {
        "compared image"
    } else {
        "compared config"
    }
}

/// Runs the benchmark: `runs` Cocoon boots alternating with `runs` baselines.
pub async fn boot_bench(
    config: &Config,
    runs: usize,
    busybox: &Path,
    compare: Option<&Config>,
) -> Result<BootReport, BenchError> {
    let hv = hypervisor::from_config(config)?;
    let scratch = tempfile::tempdir().map_err(|e| BenchError::Write("temp dir".into(), e))?;
    let initrd = scratch.path().join("baseline.cpio");
    baseline_initrd(busybox, &initrd)?;
    let mut samples = Vec::new();
    let mut compare_samples = Vec::new();
    let mut baseline = Vec::new();
    let mut baseline_image = Vec::new();
    let mut accel = String::new();
    let image = config.initrd_path();
    // The compared config gets its own VMM backend: its `[vm] templates` may differ.
    let compare_hv = compare.map(hypervisor::from_config).transpose()?;
    if let (Some(hv), Some(other)) = (&compare_hv, compare) {
        if other.vm.templates {
            // The first pod of a shape makes its template: not a restore, left out.
            let id = format!("bench-{}-warm", std::process::id());
            boot_once(hv.as_ref(), other, &id).await?;
        }
    }
    for i in 0..runs {
        let id = format!("bench-{}-{i}", std::process::id());
        let (s, _) = boot_once(hv.as_ref(), config, &id).await?;
        if accel.is_empty() {
            accel = hypervisor_accel(config);
        }
        samples.push(s);
        baseline.push(baseline_once(config, &accel, BaselineInit::Tiny(&initrd)).await?);
        baseline_image.push(baseline_once(config, &accel, BaselineInit::Image(&image)).await?);
        if let (Some(chv), Some(other)) = (&compare_hv, compare) {
            let id = format!("bench-{}-{i}-cmp", std::process::id());
            compare_samples.push(boot_once(chv.as_ref(), other, &id).await?.0);
        }
    }
    let col = |f: fn(&BootSample) -> f64| samples.iter().map(f).collect::<Vec<_>>();
    let mut summary = vec![
        (
            "cocoon: launch -> agent ready".to_string(),
            Stats::of(&col(|s| s.ready_ms)),
        ),
        (
            "  vmm launch (host)".to_string(),
            Stats::of(&col(|s| s.vmm_launch_ms)),
        ),
        (
            "  kernel boot (guest clock)".to_string(),
            Stats::of(&col(|s| s.kernel_boot_ms)),
        ),
        (
            "  agent start (guest clock)".to_string(),
            Stats::of(&col(|s| s.agent_start_ms)),
        ),
        (
            "  unaccounted (qemu init, fw, decompress)".to_string(),
            Stats::of(&col(|s| s.unaccounted_ms)),
        ),
        (
            "cocoon: shutdown -> exit".to_string(),
            Stats::of(&col(|s| s.shutdown_ms)),
        ),
        (
            "cocoon: full cycle launch -> exit, less probes".to_string(),
            Stats::of(&col(|s| s.cycle_ms)),
        ),
        (
            "  bench's probes at ready (memory, details)".to_string(),
            Stats::of(&col(|s| s.probes_ms)),
        ),
        (
            "baseline: raw qemu, trivial init, start -> exit".to_string(),
            Stats::of(&baseline),
        ),
        (
            "baseline: same, cocoon's initramfs, busybox init".to_string(),
            Stats::of(&baseline_image),
        ),
        (
            "cocoon: host memory beyond guest RAM (MiB)".to_string(),
            Stats::of(&col(|s| s.host_pss_beyond_ram_kib as f64 / 1024.0)),
        ),
    ];
    if !compare_samples.is_empty() {
        let of = |f: fn(&BootSample) -> f64| {
            Stats::of(&compare_samples.iter().map(f).collect::<Vec<_>>())
        };
        let templates = compare.is_some_and(|c| c.vm.templates != config.vm.templates);
        let what = compare.map_or("compared", |c| compared_what(config, c));
        summary.push((format!("{what}: launch -> agent ready"), of(|s| s.ready_ms)));
        summary.push(("  vmm launch (host)".into(), of(|s| s.vmm_launch_ms)));
        // A restored guest's kernel and agent started in the template: its boot times
        // are the template's, the same in every sample.
        if !templates {
            summary.push((
                "  kernel boot (guest clock)".into(),
                of(|s| s.kernel_boot_ms),
            ));
            summary.push((
                "  agent start (guest clock)".into(),
                of(|s| s.agent_start_ms),
            ));
            summary.push((
                "  unaccounted (qemu init, fw, decompress)".into(),
                of(|s| s.unaccounted_ms),
            ));
        }
        summary.push((
            "  host memory beyond guest RAM (MiB)".into(),
            of(|s| s.host_pss_beyond_ram_kib as f64 / 1024.0),
        ));
    }
    Ok(BootReport {
        runs,
        accel,
        kernel: config.kernel_path(),
        initrd: config.initrd_path(),
        samples,
        baseline_cycle_ms: baseline,
        baseline_image_cycle_ms: baseline_image,
        compare_kernel: compare.map(Config::kernel_path),
        compare_config: None,
        compare_samples,
        summary,
    })
}

fn hypervisor_accel(config: &Config) -> String {
    match hypervisor::resolve_accel(config.qemu.accel, crate::check::kvm_kind()) {
        Ok((crate::config::Accel::Kvm, _)) => "kvm".into(),
        _ => "tcg".into(),
    }
}

impl BootReport {
    pub fn table(&self) -> String {
        let mut s = format!(
            "boot benchmark: {} runs, accel {}\n{:<48} {:>9} {:>9} {:>9} {:>9}\n",
            self.runs, self.accel, "metric (ms unless named)", "median", "p90", "min", "max"
        );
        for (name, st) in &self.summary {
            s.push_str(&format!(
                "{name:<48} {:>9.1} {:>9.1} {:>9.1} {:>9.1}\n",
                st.median, st.p90, st.min, st.max
            ));
        }
        let base = Stats::of(&self.baseline_cycle_ms).median;
        let cycle = Stats::of(&self.samples.iter().map(|s| s.cycle_ms).collect::<Vec<_>>()).median;
        if base > 0.0 {
            s.push_str(&format!(
                "ratio cocoon full cycle / raw qemu baseline (medians): {:.2}\n",
                cycle / base
            ));
        }
        let image = Stats::of(&self.baseline_image_cycle_ms).median;
        if image > 0.0 {
            s.push_str(&format!(
                "ratio cocoon full cycle / raw qemu, same kernel and initramfs (medians): {:.2}\n",
                cycle / image
            ));
        }
        let ready =
            |v: &[BootSample]| Stats::of(&v.iter().map(|s| s.ready_ms).collect::<Vec<_>>()).median;
        if let Some(k) = self
            .compare_config
            .as_ref()
            .or(self.compare_kernel.as_ref())
        {
            let other = ready(&self.compare_samples);
            if other > 0.0 {
                s.push_str(&format!(
                    "ratio launch -> agent ready, this config / the compared one ({}) (medians): {:.2}\n",
                    k.display(),
                    ready(&self.samples) / other
                ));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_pick_quantiles() {
        let s = Stats::of(&[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!((s.median, s.min, s.max), (3.0, 1.0, 5.0));
        assert_eq!(s.p90, 5.0);
        assert_eq!(Stats::of(&[]).median, 0.0);
    }

    #[test]
    fn the_table_names_what_the_compared_boots_differ_in() {
        let config = Config::default();
        let mut c = config.clone();
        c.vm.block_slots = 0;
        assert_eq!(compared_what(&config, &c), "compared config");
        c.paths.image_dir = "/elsewhere".into();
        assert_eq!(compared_what(&config, &c), "compared image");
        c.vm.templates = !config.vm.templates;
        assert_eq!(compared_what(&config, &c), "compared: from a VM template");
    }

    #[test]
    fn baseline_initrd_holds_busybox_and_init() {
        let d = tempfile::tempdir().unwrap();
        let bb = d.path().join("bb");
        std::fs::write(&bb, b"\x7fELF fake").unwrap();
        let out = d.path().join("i.cpio");
        baseline_initrd(&bb, &out).unwrap();
        let entries = cocoon_rootfs::cpio::parse(&std::fs::read(&out).unwrap()).unwrap();
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        assert!(
            names.contains(&"init") && names.contains(&"bin/busybox"),
            "{names:?}"
        );
        let err = baseline_initrd(Path::new("/nonexistent/busybox"), &out).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/busybox"), "{err}");
    }
}
