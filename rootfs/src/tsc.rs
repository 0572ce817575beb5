//! The host's TSC rate, for guest kernels that run under TCG.
//!
//! Under TCG a guest's TSC is the host's own counter (QEMU reads it), but the guest
//! kernel cannot calibrate it reliably against the emulated PIT (about half the boots on
//! microvm hung), so it is given the rate with `tsc_early_khz=`. That number must be the
//! host's real rate: any other makes every clock in the guest run fast or slow by the
//! ratio. A fixed 2 GHz on this 2.6 GHz host ran guest time 1.30× too fast (`sleep 10`
//! in a container took 7.7 s), and placed the guest's boot stages 60 ms off the host's.

use std::path::Path;
use std::time::{Duration, Instant};

/// What a guest is told when the host's rate cannot be measured.
pub const FALLBACK_KHZ: u64 = 2_000_000;
/// Long enough for a few ppm of error from the two clock readings at its ends.
const WINDOW: Duration = Duration::from_millis(25);
/// The cache file in the directory given to [`host_khz`] (the shim's run directory).
pub const CACHE_FILE: &str = "host-tsc-khz";

/// One end of a measurement: a clock reading and the TSC read on both sides of it, the
/// tightest pair of several. A thread preempted between the two TSC reads would pair the
/// clock with a TSC value milliseconds off: in a CI run under load that told guests a
/// rate 15 % high, and their clocks ran that much slow.
fn end() -> (u64, Instant) {
    let mut best = (u64::MAX, 0, Instant::now());
    for _ in 0..16 {
        // SAFETY: RDTSC has no preconditions on x86_64.
        let a = unsafe { core::arch::x86_64::_rdtsc() };
        let t = Instant::now();
        // SAFETY: as above.
        let b = unsafe { core::arch::x86_64::_rdtsc() };
        let spread = b.wrapping_sub(a);
        if spread < best.0 {
            best = (spread, a / 2 + b / 2, t);
        }
    }
    (best.1, best.2)
}

/// The TSC's rate in kHz, counted against the monotonic clock over `window`; None on a
/// host without a TSC that makes sense (under 100 MHz or over 10 GHz).
pub fn measure_khz(window: Duration) -> Option<u64> {
    let (c0, t0) = end();
    std::thread::sleep(window);
    let (c1, t1) = end();
    let ns = t1.duration_since(t0).as_nanos();
    let cycles = u128::from(c1.checked_sub(c0)?);
    let khz = u64::try_from(cycles * 1_000_000 / ns.max(1)).ok()?;
    (100_000..=10_000_000).contains(&khz).then_some(khz)
}

/// The host's TSC rate in kHz: measured once per host boot and kept in `cache_dir` (when
/// given) under the boot's id, so that a pod start does not pay for the measurement.
pub fn host_khz(cache_dir: Option<&Path>) -> u64 {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let cache = cache_dir.map(|d| d.join(CACHE_FILE));
    if let Some(text) = cache.as_ref().and_then(|c| std::fs::read_to_string(c).ok()) {
        if let Some(khz) = cached(&text, &boot_id) {
            return khz;
        }
    }
    // The median of three windows: one the host's load stretched unevenly is outvoted.
    let mut runs: Vec<u64> = (0..3).filter_map(|_| measure_khz(WINDOW)).collect();
    runs.sort_unstable();
    let Some(&khz) = runs.get(runs.len() / 2).filter(|_| runs.len() == 3) else {
        log::warn!("cannot measure the host's TSC rate; guests under TCG are told {FALLBACK_KHZ} kHz and their clocks will be off");
        return FALLBACK_KHZ;
    };
    if let Some(c) = cache.filter(|_| !boot_id.is_empty()) {
        // Written whole and renamed: a reader never sees half a line.
        let tmp = c.with_extension(format!("{}.tmp", std::process::id()));
        if std::fs::write(&tmp, format!("{boot_id} {khz}\n")).is_ok()
            && std::fs::rename(&tmp, &c).is_err()
        {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    khz
}

/// The rate a cache line holds, if it was measured in this boot.
fn cached(text: &str, boot_id: &str) -> Option<u64> {
    let (id, khz) = text.trim().split_once(' ')?;
    let khz: u64 = khz.parse().ok()?;
    (!boot_id.is_empty() && id == boot_id && (100_000..=10_000_000).contains(&khz)).then_some(khz)
}

/// The kernel parameters that give a TCG guest the host's TSC rate, and keep it on the
/// TSC: with `tsc=reliable` the kernel skips its clocksource watchdog, which checks the
/// TSC against `refined-jiffies`. Under TCG it is the jiffies that are wrong: a vCPU
/// thread starved on a loaded host loses ticks, so a CI run under load saw the guest
/// call its TSC "skewed 103 ms over 512 ms", mark it unstable and switch to jiffies, and
/// its clock then ran 9 % slow. The TSC here is the host's own invariant counter.
pub fn tcg_kernel_param(cache_dir: Option<&Path>) -> String {
    format!("tsc_early_khz={} tsc=reliable", host_khz(cache_dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two measurements agree within 0.5 % (the machine's load can only stretch the
    /// window, which both ends see alike).
    #[test]
    fn the_rate_is_measured_consistently() {
        let a = measure_khz(WINDOW).expect("this host has a TSC");
        let b = measure_khz(Duration::from_millis(50)).expect("this host has a TSC");
        let diff = a.abs_diff(b) as f64 / a as f64;
        assert!(diff < 0.005, "{a} kHz then {b} kHz");
    }

    #[test]
    fn the_cache_holds_only_for_its_boot() {
        let d = tempfile::tempdir().unwrap();
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
        std::fs::write(
            d.path().join(CACHE_FILE),
            format!("{} 1234567\n", boot_id.trim()),
        )
        .unwrap();
        assert_eq!(host_khz(Some(d.path())), 1_234_567);
        // Another boot's rate is measured again and replaced.
        std::fs::write(d.path().join(CACHE_FILE), "another-boot 1234567\n").unwrap();
        let measured = host_khz(Some(d.path()));
        assert_ne!(measured, 1_234_567);
        let line = std::fs::read_to_string(d.path().join(CACHE_FILE)).unwrap();
        assert_eq!(line, format!("{} {measured}\n", boot_id.trim()));
        assert_eq!(cached("garbage", "x"), None);
        assert_eq!(cached("x 99", "x"), None, "out of range");
    }
}
