//! Boot-time benchmark: cocoon-vmm against QEMU microvm (`-accel kvm`) on the same
//! synthetic PVH guest (print "hello", reset through the i8042), interleaved in one run.
//! Measures, from spawn: the guest's first exit (cocoon-vmm only: QEMU cannot report
//! it), the first serial byte, process exit, and the VMM's max RSS. Prints a table and
//! writes JSON to target/bench-results/vmm-boot.json. `COCOON_BENCH_RUNS` sets the runs
//! per VMM (default 20).

#[path = "../tests/guest/mod.rs"]
mod guest;

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

#[derive(Default, Clone)]
struct Sample {
    first_exit_ms: Option<f64>,
    first_byte_ms: f64,
    exit_ms: f64,
    max_rss_kib: f64,
}

fn run_once(mut cmd: Command, cocoon: bool) -> Result<Sample, String> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let spawn_unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let t0 = Instant::now();
    let mut child = cmd.spawn().map_err(|e| e.to_string())?;
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    out.read_exact(&mut first)
        .map_err(|e| format!("no serial output: {e}"))?;
    let first_byte = t0.elapsed();
    let mut rest = Vec::new();
    let _ = out.read_to_end(&mut rest);
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child; both pointers are valid for the call.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    let exit = t0.elapsed();
    if pid < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let st = std::process::ExitStatus::from_raw(status);
    if !st.success() {
        return Err(format!("exited {st}: {err}"));
    }
    let output = [&first[..], &rest[..]].concat();
    if !String::from_utf8_lossy(&output).contains("hello") {
        return Err(format!("unexpected serial output {output:?}"));
    }
    let first_exit_ms = cocoon
        .then(|| {
            err.lines()
                .find_map(|l| l.strip_prefix("cocoon-vmm: first-exit-unix-ns="))
                .and_then(|v| v.trim().parse::<u128>().ok())
                .map(|ns| (ns.saturating_sub(spawn_unix.as_nanos())) as f64 / 1e6)
        })
        .flatten();
    Ok(Sample {
        first_exit_ms,
        first_byte_ms: first_byte.as_secs_f64() * 1e3,
        exit_ms: exit.as_secs_f64() * 1e3,
        max_rss_kib: ru.ru_maxrss as f64,
    })
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((s.len() as f64 - 1.0) * p).round() as usize;
    s[i]
}

fn main() {
    if !guest::can_run("bench boot") {
        return;
    }
    let runs: usize = std::env::var("COCOON_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let g = guest::assemble("    PRINT \"hello\\n\"\n    jmp reset\n");
    let have_qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok();
    let cocoon = || {
        let mut c = Command::new(guest::BIN);
        c.args(["run", "--mem-mib", "32", "--print-first-exit", "--kernel"])
            .arg(&g.elf)
            .args(["--serial-out", "/dev/stdout"])
            .env("RUST_LOG", "error");
        c
    };
    let qemu = || {
        let mut c = Command::new("qemu-system-x86_64");
        c.args([
            "-M",
            "microvm",
            "-accel",
            "kvm",
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-m",
            "32M",
            "-device",
            "i8042",
            "-kernel",
        ])
        .arg(&g.elf);
        c
    };
    let mut results: Vec<(&str, Vec<Sample>)> =
        vec![("cocoon-vmm", vec![]), ("qemu-microvm", vec![])];
    // One warm-up of each, then interleave so both see the same machine noise.
    let _ = run_once(cocoon(), true);
    if have_qemu {
        let _ = run_once(qemu(), false);
    }
    for _ in 0..runs {
        match run_once(cocoon(), true) {
            Ok(s) => results[0].1.push(s),
            Err(e) => eprintln!("cocoon-vmm run failed: {e}"),
        }
        if have_qemu {
            match run_once(qemu(), false) {
                Ok(s) => results[1].1.push(s),
                Err(e) => eprintln!("qemu run failed: {e}"),
            }
        }
    }
    if !have_qemu {
        eprintln!("qemu-system-x86_64 not found: cocoon-vmm only");
    }

    println!(
        "\n{:<14} {:>5} {:>21} {:>21} {:>21} {:>19}",
        "vmm",
        "runs",
        "first exit ms p50/90",
        "first byte ms p50/90",
        "exit ms p50/90",
        "max RSS MiB p50/90"
    );
    let mut json = Vec::new();
    for (name, samples) in &results {
        if samples.is_empty() {
            continue;
        }
        let col = |f: &dyn Fn(&Sample) -> f64| {
            let v: Vec<f64> = samples.iter().map(f).collect();
            (percentile(&v, 0.5), percentile(&v, 0.9))
        };
        let fe: Vec<f64> = samples.iter().filter_map(|s| s.first_exit_ms).collect();
        let fe = (!fe.is_empty()).then(|| (percentile(&fe, 0.5), percentile(&fe, 0.9)));
        let fb = col(&|s| s.first_byte_ms);
        let ex = col(&|s| s.exit_ms);
        let rss = col(&|s| s.max_rss_kib / 1024.0);
        let fe_s = fe.map_or("n/a".to_string(), |(a, b)| format!("{a:.2} / {b:.2}"));
        println!(
            "{:<14} {:>5} {:>21} {:>21} {:>21} {:>19}",
            name,
            samples.len(),
            fe_s,
            format!("{:.2} / {:.2}", fb.0, fb.1),
            format!("{:.2} / {:.2}", ex.0, ex.1),
            format!("{:.1} / {:.1}", rss.0, rss.1)
        );
        json.push(serde_json::json!({
            "vmm": name,
            "runs": samples.len(),
            "first_exit_ms": fe.map(|(a, b)| serde_json::json!({"p50": a, "p90": b})),
            "first_serial_byte_ms": {"p50": fb.0, "p90": fb.1},
            "exit_ms": {"p50": ex.0, "p90": ex.1},
            "max_rss_mib": {"p50": rss.0, "p90": rss.1},
        }));
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-results");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("vmm-boot.json");
    let doc = serde_json::json!({
        "guest": "PVH ELF, 32-bit: print hello on COM1, reset via i8042",
        "memory_mib": 32,
        "results": json,
    });
    std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    println!("\nwrote {}", path.display());
}
