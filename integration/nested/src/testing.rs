//! For tests: where a test that needs hardware KVM runs, and what a test does when its
//! host lacks a prerequisite. On a host with hardware KVM (or inside L1) such a test runs
//! in place; elsewhere it reruns itself inside L1 and passes or fails with what it did
//! there. A prerequisite that is missing fails the test under `CI=true` and prints
//! `SKIPPED: <why>` otherwise: a skip is never a silent pass in CI.

use std::path::Path;

use crate::run::say;
use crate::{L1Image, L1Kernel, NestedError, L1};

/// Set inside L1 for reruns, so a test there can never recurse into another L1.
pub const IN_L1_ENV: &str = "COCOON_IN_L1";

/// How long L1 may run one test (the harness's limit, under nextest's 600 s).
const L1_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(540);
/// When a test inside L1 prints what every process of ours is doing: well before the
/// harness gives up on L1, so the report makes it out.
const L1_WATCHDOG: std::time::Duration = std::time::Duration::from_secs(420);

/// Whether this run is CI's (`CI` set to anything but `false` or `0`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// A prerequisite of `test` is missing: under CI that fails the test; elsewhere the test
/// says SKIPPED with the reason and the caller returns.
#[track_caller]
pub fn missing(test: &str, why: &str) {
    if in_ci() {
        panic!("{test}: cannot run here, and CI=true does not allow skipping: {why}");
    }
    say(&format!("SKIPPED: {test}: {why}"));
}

/// Why this host cannot run a stock Linux guest under its own KVM, if it cannot.
pub fn hardware_kvm_missing() -> Option<String> {
    if !Path::new("/dev/kvm").exists() {
        return Some("/dev/kvm does not exist".into());
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Some("/dev/kvm is PVM (kvm_pvm), where a stock Linux guest cannot boot".into());
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    (!hw).then(|| "no vmx/svm in /proc/cpuinfo".into())
}

/// Where a test that needs hardware KVM should run its body.
#[derive(Debug, PartialEq, Eq)]
pub enum Place {
    /// This host has hardware KVM: run the body now.
    Here,
    /// The test already ran inside L1 and passed there, or was skipped (outside CI only)
    /// with a printed reason: return.
    Done,
}

/// The guest image the tests use (`make image`), for finding the kernel package.
pub fn guest_image_dir() -> std::path::PathBuf {
    std::env::var_os("COCOON_TEST_IMAGE_DIR")
        .map(Into::into)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/image"))
}

/// For a test that needs hardware KVM. `test` is its full name as the test harness knows
/// it (for `--exact`). Where this host lacks hardware KVM, boots L1, reruns this same
/// test binary there with only that test, and panics with its output unless exactly that
/// one test passed.
#[track_caller]
pub fn hardware_kvm(test: &str) -> Place {
    hardware_kvm_in(test, default_l1_kernel())
}

/// The variable that picks L1's kernel for the tests that do not name one: `6.12` (the
/// default) or `image` (also spelt `6.1`: the guest image's kernel package, else Debian
/// 12's cloud kernel).
pub const L1_KERNEL_ENV: &str = "COCOON_L1_KERNEL";

#[track_caller]
fn default_l1_kernel() -> L1Kernel {
    match std::env::var(L1_KERNEL_ENV).as_deref() {
        Err(_) | Ok("") => L1Kernel::default(),
        Ok("6.12") => L1Kernel::Linux612,
        Ok("image") | Ok("6.1") => L1Kernel::Image,
        Ok(other) => panic!("{L1_KERNEL_ENV}={other}: use `6.12`, `image` or `6.1`"),
    }
}

/// `hardware_kvm`, with L1 (where one is needed) running `kernel`.
#[track_caller]
pub fn hardware_kvm_in(test: &str, kernel: L1Kernel) -> Place {
    let Some(why) = hardware_kvm_missing() else {
        if std::env::var_os(IN_L1_ENV).is_some() {
            crate::watchdog::arm(test, L1_WATCHDOG);
        }
        return Place::Here;
    };
    if std::env::var_os(IN_L1_ENV).is_some() {
        panic!("{test}: inside L1 but without hardware-style KVM: {why}");
    }
    let mut l1 = match L1Image::build_with(&guest_image_dir(), None, kernel) {
        Ok(image) => {
            let mut l1 = L1::new(image);
            // Two such tests may share the 2 cores (nextest runs two at a time): the
            // ctr comparison on cocoon-vmm took 120 s alone and over 300 s beside the
            // CRI one in CI. Under nextest's own 600 s limit, so the reason is ours.
            l1.timeout = L1_TIMEOUT;
            l1
        }
        Err(e) if e.is_unavailable() => {
            missing(
                test,
                &format!("{why}, and the nested harness cannot run: {e}"),
            );
            return Place::Done;
        }
        Err(e) => panic!("{test}: cannot build the L1 image: {}", crate::chain(&e)),
    };
    let exe = std::env::current_exe().expect("the test binary's path");
    let cwd = std::env::current_dir().expect("the test's directory");
    let script = format!(
        "exec {} --exact {} --nocapture --test-threads=1",
        crate::run::quote(&exe.to_string_lossy()),
        crate::run::quote(test)
    );
    let run = run_in_a_sound_l1(&mut l1, test, &script, &cwd, &forwarded_env());
    let out = match run {
        Ok(out) => out,
        Err(e) if e.is_unavailable() => {
            missing(
                test,
                &format!("{why}, and the nested harness cannot run: {e}"),
            );
            return Place::Done;
        }
        Err(e) => panic!("{test}: L1 failed: {e}"),
    };
    let text = out.output_text();
    // libtest's summary: anything but exactly one pass (a renamed test matching nothing
    // passes zero tests with status 0) is a failure.
    let passed = text.contains("test result: ok. 1 passed;");
    if out.status != 0 || !passed {
        panic!(
            "{test} failed inside L1 (exit {}), output:\n{text}\nL1 console (end):\n{}",
            out.status,
            crate::tail(&out.console, 30)
        );
    }
    // What the test reported for people (timings), passed on.
    for line in text.lines().filter(|l| l.starts_with(NOTE_PREFIX)) {
        say(line);
    }
    say(&format!(
        "{test}: ran inside an L1 guest (QEMU/TCG with emulated SVM: {why} here); L1 run {:.1} s",
        out.wall.as_secs_f64()
    ));
    Place::Done
}

/// What broke L1 itself, when `err` says its own kernel died, locked up or froze (rather
/// than anything the command did).
pub fn l1_broke(err: &NestedError) -> Option<String> {
    match err {
        NestedError::L1Panic { panic, .. } => Some(format!("L1's kernel panicked ({panic})")),
        NestedError::L1Stall { stall, .. } => Some(format!("L1's kernel stalled ({stall})")),
        NestedError::L1Silent { seconds, after, .. } => Some(format!(
            "L1 froze (silent for {seconds} s, {after} s after start)"
        )),
        _ => None,
    }
}

/// `l1.run`, given one fresh L1 when the first one broke under it (`l1_broke`): see
/// `once_more_if_l1_broke`.
pub fn run_in_a_sound_l1(
    l1: &mut L1,
    test: &str,
    script: &str,
    cwd: &Path,
    env: &[(String, String)],
) -> Result<crate::L1Output, NestedError> {
    once_more_if_l1_broke(l1, test, |l1| l1.run(script, cwd, env))
}

/// Runs `run` on `l1`, and once more (a fresh L1, within what is left of `l1.timeout`)
/// when L1 itself broke under the first (`l1_broke`); a second break is returned as it is.
///
/// L1's own kernel dies, locks up or freezes under TCG now and then, and that says nothing
/// about the command. Seen in CI: a stack-guard hit in KVM's vCPU thread; a CPU stuck in
/// KVM running an L2 guest for minutes; an L1 silent from 10 s into its boot; an `int3`
/// oops in an idle L1 kernel during its boot (TCG racing the kernel's live patching of
/// its own code across vCPUs) before the command had started.
pub fn once_more_if_l1_broke<T>(
    l1: &mut L1,
    test: &str,
    run: impl FnMut(&L1) -> Result<T, NestedError>,
) -> Result<T, NestedError> {
    once_more_if(l1, test, l1_broke, run)
}

/// `once_more_if_l1_broke` for a test that counts fewer errors as L1's own breaks (one
/// that makes L1 fall silent on purpose, say): `broke` names the break, or `None`.
pub fn once_more_if<T>(
    l1: &mut L1,
    test: &str,
    broke: impl Fn(&NestedError) -> Option<String>,
    mut run: impl FnMut(&L1) -> Result<T, NestedError>,
) -> Result<T, NestedError> {
    let started = std::time::Instant::now();
    let timeout = l1.timeout;
    let first = run(l1);
    let Some(why) = first.as_ref().err().and_then(broke) else {
        return first;
    };
    say(&format!("{test}: {why}; rerunning once in a fresh L1"));
    l1.timeout = timeout.saturating_sub(started.elapsed());
    let again = run(l1);
    l1.timeout = timeout;
    again
}

/// Lines a test run inside L1 prints with this prefix are repeated on the host's
/// output when it passes (measurements worth seeing without a failure).
pub const NOTE_PREFIX: &str = "NOTE: ";

/// The variables a rerun inside L1 keeps: CI's, logging, and the project's own.
fn forwarded_env() -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| {
            k == "CI" || k == "RUST_BACKTRACE" || k == "RUST_LOG" || k.starts_with("COCOON_")
        })
        .collect();
    env.push((IN_L1_ENV.into(), "1".into()));
    env
}

/// How much of process `pid`'s shared memory is mapped with 2 MiB pages (kB, over all
/// its mappings): a running VMM's guest RAM where it got huge pages.
pub fn shmem_huge_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("ShmemPmdMapped:"))
        .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}
