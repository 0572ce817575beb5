//! Boots the real guest image (`make image`: target/image/vmlinuz + initramfs.cpio) on
//! cocoon-vmm and pings the guest agent over hybrid vsock. Needs hardware KVM: on a PVM
//! host (like the dev machines) a stock kernel cannot boot, so the test says SKIPPED.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Why this host cannot boot Linux under KVM, if it cannot.
fn hardware_kvm_missing() -> Option<String> {
    if !Path::new("/dev/kvm").exists() {
        return Some("/dev/kvm does not exist".into());
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Some(
            "/dev/kvm is PVM (kvm_pvm loaded), where a stock Linux guest dies in FPU init; \
             this test needs hardware virtualization"
                .into(),
        );
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    (!hw).then(|| "no vmx/svm in /proc/cpuinfo: no hardware virtualization".into())
}

/// Prints a skip reason past the harness's output capture (straight to fd 2), so it
/// shows in a plain `cargo test`.
fn skip(msg: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED: {msg}");
}

fn image(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/image")
        .join(name)
}

#[test]
fn linux_boots_and_the_agent_answers_over_vsock() {
    if let Some(why) = hardware_kvm_missing() {
        skip(&format!(
            "linux_boots_and_the_agent_answers_over_vsock: {why}"
        ));
        return;
    }
    let (kernel, initrd) = (image("vmlinuz"), image("initramfs.cpio"));
    if !kernel.exists() || !initrd.exists() {
        skip(&format!(
            "linux_boots_and_the_agent_answers_over_vsock: {} or {} missing \
             (run `make image` at the repo root)",
            kernel.display(),
            initrd.display()
        ));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock.sock");
    let serial = dir.path().join("serial.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cocoon-vmm"))
        .arg("run")
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--cmdline", "console=ttyS0 quiet panic=-1 reboot=k pci=off"])
        .args(["--mem-mib", "512", "--vcpus", "2"])
        .arg("--serial-out")
        .arg(&serial)
        .arg("--vsock-uds")
        .arg(&uds)
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let answer = loop {
        if let Some(st) = child.try_wait().unwrap() {
            panic!(
                "VM exited ({st}) before the agent answered; serial:\n{}",
                std::fs::read_to_string(&serial).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "agent never answered; serial:\n{}",
            std::fs::read_to_string(&serial).unwrap_or_default()
        );
        if let Ok(mut s) = UnixStream::connect(&uds) {
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            s.write_all(b"CONNECT 1024\n").unwrap();
            let mut line = String::new();
            if BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with("OK ") {
                break line;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(answer.ends_with('\n') && answer[3..].trim().parse::<u32>().is_ok());
    let _ = child.kill();
    let _ = child.wait();
}
