//! `cocoon bench vmm`: our own VMM against QEMU with KVM, booting the same guest image
//! to a ready agent, runs alternating so that noise hits both alike. It needs hardware
//! KVM (QEMU's TCG would compare an emulator with a hypervisor); on hosts without it,
//! `make bench` runs it inside the nested harness's L1 guest, where the ratios still hold
//! though every time is inflated by TCG.

use serde::Serialize;

use crate::bench::{boot_once, BenchError, BootSample, Stats};
use crate::config::{Accel, Config, HypervisorKind};
use crate::hypervisor;

/// A reported figure and how to read it off one boot.
type Metric = (&'static str, fn(&BootSample) -> f64);

#[derive(Debug, Clone, Serialize)]
pub struct VmmReport {
    pub runs: usize,
    pub cocoon_vmm: Vec<BootSample>,
    pub qemu_kvm: Vec<BootSample>,
    /// `(metric, cocoon-vmm median, QEMU median, ratio)`.
    pub summary: Vec<(String, f64, f64, f64)>,
}

pub async fn vmm_bench(config: &Config, runs: usize) -> Result<VmmReport, BenchError> {
    let mut own = config.clone();
    own.hypervisor = HypervisorKind::CocoonVmm;
    let mut qemu = config.clone();
    qemu.hypervisor = HypervisorKind::Qemu;
    qemu.qemu.accel = Accel::Kvm;
    let (own_hv, qemu_hv) = (
        hypervisor::from_config(&own)?,
        hypervisor::from_config(&qemu)?,
    );
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let id = |who: &str| format!("bench-{who}-{}-{i}", std::process::id());
        a.push(boot_once(own_hv.as_ref(), &own, &id("vmm")).await?.0);
        b.push(boot_once(qemu_hv.as_ref(), &qemu, &id("qemu")).await?.0);
    }
    let metrics: [Metric; 5] = [
        ("launch -> agent ready (ms)", |s| s.ready_ms),
        ("kernel boot, guest clock (ms)", |s| s.kernel_boot_ms),
        ("launch -> VMM exit (ms)", |s| s.cycle_ms),
        ("host RSS at ready (MiB)", |s| {
            s.host_rss_kib as f64 / 1024.0
        }),
        ("host memory beyond guest RAM (MiB)", |s| {
            s.host_pss_beyond_ram_kib as f64 / 1024.0
        }),
    ];
    let summary = metrics
        .iter()
        .map(|(name, f)| {
            let m = |v: &[BootSample]| Stats::of(&v.iter().map(f).collect::<Vec<_>>()).median;
            let (x, y) = (m(&a), m(&b));
            let ratio = if y > 0.0 { x / y } else { 0.0 };
            ((*name).to_owned(), x, y, ratio)
        })
        .collect();
    Ok(VmmReport {
        runs,
        cocoon_vmm: a,
        qemu_kvm: b,
        summary,
    })
}

impl VmmReport {
    pub fn table(&self) -> String {
        let mut s = format!(
            "cocoon-vmm vs QEMU (KVM), same guest image, {} alternating runs, medians\n{:<32} {:>12} {:>12} {:>8}\n",
            self.runs, "metric", "cocoon-vmm", "qemu-kvm", "ratio"
        );
        for (name, x, y, r) in &self.summary {
            s.push_str(&format!("{name:<32} {x:>12.1} {y:>12.1} {r:>8.2}\n"));
        }
        s
    }
}
