//! Our ACPI tables read by a real Linux kernel (the guest image's Debian kernel), which
//! cannot boot on cocoon-vmm on this PVM host: QEMU microvm with its own ACPI off, under
//! TCG, gets our tables loaded where Linux scans for the RSDP. The guest's init reports
//! what the kernel made of them: the vCPUs from the MADT (this kernel has no MP table
//! support, so without our MADT it sees one), the `LNRO0005` devices from the DSDT, and
//! S5 support from `\_S5`, and the console working for a process (init's own output on
//! the serial port needs the UART's interrupt, which only the DSDT's COM1 entry maps). The only difference from what cocoon-vmm writes is one
//! interrupt source override, because QEMU wires the PIT to IOAPIC pin 2.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cocoon_vmm::arch::acpi::{self, AcpiConfig, MmioDevice};

/// A prerequisite is missing: a failure under `CI=true`, else `SKIPPED: <msg>`.
#[track_caller]
fn skip(msg: &str) {
    let (test, why) = msg.split_once(": ").unwrap_or(("test", msg));
    cocoon_nested::testing::missing(test, why);
}

const BUSYBOX: &str = "/bin/busybox";

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
echo "cpus=$(/bin/busybox grep -c ^processor /proc/cpuinfo)"
echo "acpi=$(/bin/busybox ls /sys/bus/acpi/devices | /bin/busybox tr '\n' ' ')"
echo "platform=$(/bin/busybox ls /sys/bus/platform/devices | /bin/busybox tr '\n' ' ')"
echo "tables=$(/bin/busybox ls /sys/firmware/acpi/tables | /bin/busybox tr '\n' ' ')"
echo cocoon-acpi-done
exec /bin/busybox sleep 1000
"#;

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn image(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/image")
        .join(name)
}

#[test]
fn linux_reads_our_acpi_tables() {
    let kernel = image("vmlinuz");
    if !kernel.exists() {
        skip(&format!(
            "linux_reads_our_acpi_tables: {} missing (run `make image`)",
            kernel.display()
        ));
        return;
    }
    for (what, ok) in [
        (
            "qemu-system-x86_64",
            Command::new("qemu-system-x86_64")
                .arg("--version")
                .output()
                .is_ok(),
        ),
        (BUSYBOX, Path::new(BUSYBOX).exists()),
    ] {
        if !ok {
            skip(&format!(
                "linux_reads_our_acpi_tables: {what} is not installed"
            ));
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cpio = cocoon_rootfs::cpio::Archive::new();
    cpio.add_file("bin/busybox", 0o755, std::fs::read(BUSYBOX).unwrap())
        .unwrap();
    cpio.add_file("init", 0o755, INIT.as_bytes().to_vec())
        .unwrap();
    // The initramfs gets no devtmpfs: init's output needs a console node.
    cpio.add_char_device("dev/console", 0o600, 5, 1).unwrap();
    let initrd = dir.path().join("init.cpio");
    std::fs::write(&initrd, cpio.to_bytes()).unwrap();

    let tables = AcpiConfig {
        vcpus: 2,
        ioapic_addr: 0xfec0_0000,
        lapic_addr: 0xfee0_0000,
        // Windows no device answers at: Linux still creates their platform devices.
        devices: (0..2).map(MmioDevice::virtio).collect(),
        overrides: vec![(0, 2)],
    };
    let blob = dir.path().join("acpi.bin");
    std::fs::write(&blob, acpi::build(acpi::ACPI_START, &tables).unwrap()).unwrap();
    let serial = dir.path().join("serial.log");
    let qemu = Command::new("qemu-system-x86_64")
        .args([
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-display",
            "none",
        ])
        .args([
            "-machine",
            "microvm,acpi=off,rtc=on,auto-kernel-cmdline=off",
        ])
        .args([
            "-accel",
            "tcg,tb-size=64",
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
            "256M",
        ])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args([
            "-append",
            &format!(
                "console=ttyS0 {} panic=-1",
                cocoon_rootfs::tsc::tcg_kernel_param(None)
            ),
        ])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-device")
        .arg(format!(
            "loader,file={},addr={:#x},force-raw=on",
            blob.display(),
            acpi::ACPI_START
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut qemu = Kill(qemu);
    let deadline = Instant::now() + Duration::from_secs(120);
    let log = loop {
        let log = std::fs::read_to_string(&serial).unwrap_or_default();
        if log.contains("cocoon-acpi-done") || log.contains("Kernel panic") {
            break log;
        }
        if let Some(st) = qemu.0.try_wait().unwrap() {
            panic!("QEMU exited ({st}) early; serial:\n{log}");
        }
        assert!(
            Instant::now() < deadline,
            "guest never reported; serial:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let field = |name: &str| {
        log.lines()
            .find_map(|l| l.trim_end().strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name}= in the serial log:\n{log}"))
            .to_string()
    };
    assert_eq!(
        field("cpus"),
        "2",
        "the MADT's second vCPU is missing:\n{log}"
    );
    let acpi_devs = field("acpi");
    assert!(
        acpi_devs.contains("LNRO0005:00") && acpi_devs.contains("LNRO0005:01"),
        "{acpi_devs}\n{log}"
    );
    assert!(field("platform").contains("LNRO0005:01"), "{log}");
    assert!(
        acpi_devs.contains("PNP0501:00"),
        "COM1 missing: {acpi_devs}"
    );
    let t = field("tables");
    for sig in ["APIC", "DSDT", "FACP"] {
        assert!(
            t.contains(sig),
            "{sig} not in /sys/firmware/acpi/tables: {t}"
        );
    }
    assert!(log.contains("ACPI: PM: (supports S0 S5)"), "{log}");
    for bad in ["ACPI Error", "ACPI BIOS Error", "ACPI Warning", "AE_"] {
        assert!(!log.contains(bad), "kernel complained ({bad}):\n{log}");
    }
}
