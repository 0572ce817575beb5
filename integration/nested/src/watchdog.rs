//! A watchdog for a test running inside L1: if the test is still running after a while,
//! it prints, on the test's stderr (which comes back to the host), what each process of
//! ours is doing: state, command line, and each thread's wait channel and kernel stack,
//! then the end of every VM log under /tmp. Whatever the test's own thread is stuck on,
//! the report gets out before the harness gives up on L1 and only says "did not finish".

use std::path::Path;
use std::time::Duration;

/// Processes whose name (`comm`, 15 characters at most) starts with one of these are
/// reported. Names, not command lines: reading `/proc/<pid>/cmdline` takes the process's
/// memory lock, and a VMM stuck in the kernel holding it would hang the report too.
const OURS: &[&str] = &[
    "containerd",
    "cocoon",
    "qemu-system",
    "virtiofsd",
    "ctr",
    "runc",
];

const LOGS: &[&str] = &[
    "console.log",
    "vmm.log",
    "vsock-backend.log",
    "containerd.log",
];

/// Starts the watchdog for `test`: after `after`, it reports once.
pub fn arm(test: &str, after: Duration) {
    let test = test.to_owned();
    let _ = std::thread::Builder::new()
        .name("l1-watchdog".into())
        .spawn(move || {
            std::thread::sleep(after);
            eprintln!(
                "\n=== watchdog: {test} still running after {} s inside L1 ===\n{}",
                after.as_secs(),
                report()
            );
        });
}

/// The report: our processes, then the ends of the logs under /tmp.
pub fn report() -> String {
    let mut out = String::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return "cannot read /proc".into();
    };
    let me = std::process::id();
    let mut pids: Vec<u32> = rd
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|p| *p != me)
        .collect();
    pids.sort();
    for pid in pids {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let comm = comm.trim();
        if !OURS.iter().any(|o| comm.starts_with(o)) {
            continue;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap_or("")
                .trim()
                .to_owned()
        };
        out.push_str(&format!(
            "--- pid {pid} {comm} [{}] ppid {}\n",
            field("State:"),
            field("PPid:")
        ));
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let p = t.path();
            let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
            let stack: Vec<String> = read("stack")
                .lines()
                .take(8)
                .map(|l| l.split_whitespace().last().unwrap_or("").to_owned())
                .collect();
            out.push_str(&format!(
                "    {} {}: {} [{}]\n",
                t.file_name().to_string_lossy(),
                read("comm").trim(),
                read("wchan").trim(),
                stack.join(" < ")
            ));
        }
    }
    for log in logs_below(Path::new("/tmp"), 8, LOGS) {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        out.push_str(&format!(
            "--- {} (end):\n{}\n",
            log.display(),
            lines[lines.len().saturating_sub(25)..].join("\n")
        ));
    }
    out
}

/// Files named one of `names` at most `depth` directories below `dir`.
pub fn logs_below(dir: &Path, depth: u32, names: &[&str]) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return found;
    };
    for e in rd.flatten() {
        let Ok(kind) = e.file_type() else { continue };
        let path = e.path();
        if kind.is_dir() && depth > 0 {
            found.extend(logs_below(&path, depth - 1, names));
        } else if kind.is_file() && names.iter().any(|n| e.file_name().to_str() == Some(*n)) {
            found.push(path);
        }
    }
    found
}
