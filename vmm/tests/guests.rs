//! End-to-end tests of `cocoon-vmm` on this host's /dev/kvm with synthetic PVH guests
//! (see `guest/mod.rs`): serial, i8042 reset, triple fault, unknown I/O, ACPI, the PIC,
//! virtio-mmio discovery and feature negotiation, block read/write, kvmclock, SIGTERM and
//! SMP. The API, seccomp and the jail are in `guests_api.rs`; devices against real host
//! backends (vsock, tap, virtiofsd) in `guests_backends.rs`.

mod guest;

use std::os::unix::fs::FileExt;
use std::time::Duration;

use guest::{assemble, can_run, wait_for, SPINNER};

#[test]
fn serial_output_and_i8042_reset_end_the_vm_cleanly() {
    if !can_run("serial_output_and_i8042_reset_end_the_vm_cleanly") {
        return;
    }
    let g = assemble(
        r#"
    PRINT "hello from the guest\n"
    jmp reset
"#,
    );
    let out = g.run(&[]);
    assert!(out.status.success(), "{:?} {}", out.status, out.stderr);
    assert_eq!(out.serial, "hello from the guest\n");
    assert!(out
        .stderr
        .contains("seccomp filter and no_new_privs in place"));
}

/// `--stats` counts every exit by kind: one port write per serial byte, the i8042 reset,
/// and time inside KVM_RUN.
#[test]
fn stats_count_exits_by_kind() {
    if !can_run("stats_count_exits_by_kind") {
        return;
    }
    let g = assemble(
        r#"
    PRINT "0123456789"
    jmp reset
"#,
    );
    let out = g.run(&["--stats"]);
    assert!(out.status.success(), "{:?} {}", out.status, out.stderr);
    let json = out
        .stderr
        .lines()
        .find_map(|l| l.split_once("cocoon-vmm: exit-stats ").map(|(_, j)| j))
        .unwrap_or_else(|| panic!("no exit-stats line in:\n{}", out.stderr));
    let stats: serde_json::Value = serde_json::from_str(json).unwrap();
    let count = |kind: &str| {
        stats["by_kind"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["kind"] == kind)
            .map(|k| k["count"].as_u64().unwrap())
            .unwrap_or(0)
    };
    // PRINT writes each byte to the UART's data port; `reset` writes the i8042.
    assert_eq!(count("io_out 0x3f8"), 10, "{stats}");
    assert_eq!(count("io_out 0x64"), 1, "{stats}");
    assert!(stats["exits"].as_u64().unwrap() >= 11, "{stats}");
    assert!(stats["in_kvm_run_ns"].as_u64().unwrap() > 0, "{stats}");
    // KVM's own counters, where the kernel has binary stats (5.14+; PVM here has them,
    // though it counts no io_exits): every exit that reached us went through KVM first.
    if let Some(kvm_exits) = stats["kvm"]["exits"].as_u64() {
        assert!(kvm_exits >= 11, "{stats}");
    }
    assert!(out.stderr.contains("VM exits:"), "{}", out.stderr);
}

/// The guest finds the RSDP where the PVH start info says (and where Linux scans), then
/// powers off the hardware-reduced ACPI way: `SLP_EN | SLP_TYP=5` to the FADT's sleep
/// control port. That ends the VM with status 0; with `--no-acpi` the port is unknown.
const ACPI_POWER_OFF: &str = r#"
    EXPECT32 32(%ebx), 0xe0000, rsdp_paddr
    EXPECT32 0xe0000, 0x20445352, rsdp_signature
    EXPECT32 0xe0004, 0x20525450, rsdp_signature
    PRINT "rsdp ok\n"
    mov $0x34, %al
    mov $0x600, %dx
    out %al, %dx
    PRINT "still running\n"
    jmp reset
"#;

#[test]
fn acpi_rsdp_is_found_and_s5_powers_off() {
    if !can_run("acpi_rsdp_is_found_and_s5_powers_off") {
        return;
    }
    let g = assemble(ACPI_POWER_OFF);
    let out = g.run(&[]);
    assert!(out.status.success(), "{:?} {}", out.status, out.stderr);
    assert_eq!(out.serial, "rsdp ok\n", "{}", out.stderr);
    assert!(
        out.stderr.contains("ACPI: guest powered off"),
        "{}",
        out.stderr
    );
}

#[test]
fn no_acpi_means_no_rsdp() {
    if !can_run("no_acpi_means_no_rsdp") {
        return;
    }
    let g = assemble(ACPI_POWER_OFF);
    let out = g.run(&["--no-acpi"]);
    assert!(out.status.success(), "{:?} {}", out.status, out.stderr);
    assert_eq!(out.serial, "FAIL rsdp_paddr\n", "{}", out.stderr);
}

/// The 8259 pair starts masked with its vectors out of the exception range, as firmware
/// leaves it: the guest reads the masks (port 0x21/0xa1, served by KVM's in-kernel PIC).
#[test]
fn legacy_pic_starts_masked() {
    if !can_run("legacy_pic_starts_masked") {
        return;
    }
    let g = assemble(
        r#"
    inb $0x21, %al
    cmp $0xff, %al
    je 1f
    PRINT "FAIL master imr\n"
    jmp reset
1:  inb $0xa1, %al
    cmp $0xff, %al
    je 2f
    PRINT "FAIL slave imr\n"
    jmp reset
2:  PRINT "masked\n"
    jmp reset
"#,
    );
    let out = g.run(&[]);
    assert!(out.status.success(), "{:?} {}", out.status, out.stderr);
    assert_eq!(out.serial, "masked\n", "{}", out.stderr);
}

#[test]
fn top_level_one_shot_form_works_too() {
    if !can_run("top_level_one_shot_form_works_too") {
        return;
    }
    let g = assemble("    PRINT \"hi\"\n    jmp reset\n");
    let status = std::process::Command::new(guest::BIN)
        .arg("--kernel")
        .arg(&g.elf)
        .arg("--serial-out")
        .arg(g.path("serial.log"))
        .args(["--mem-mib", "8"])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(g.serial(), "hi");
}

#[test]
fn triple_fault_is_reported_not_a_crash() {
    if !can_run("triple_fault_is_reported_not_a_crash") {
        return;
    }
    // An empty IDT: the #UD cannot be delivered, nor the #DF, so the CPU shuts down.
    let g = assemble(
        r#"
    PRINT "before\n"
    lidt (zero_idt)
    ud2
zero_idt:
    .word 0
    .long 0
"#,
    );
    let out = g.run(&[]);
    assert_eq!(out.status.code(), Some(3), "{}", out.stderr);
    assert_eq!(out.serial, "before\n");
    assert!(out.stderr.contains("triple fault"), "{}", out.stderr);
    // With where the vCPU stood, read under the running VMM's seccomp filter: the
    // empty IDT the guest loaded.
    assert!(out.stderr.contains("idt=0x0+0x0"), "{}", out.stderr);
}

#[test]
fn unknown_ports_and_mmio_are_logged_and_survived() {
    if !can_run("unknown_ports_and_mmio_are_logged_and_survived") {
        return;
    }
    // A burst of bad accesses: reads return all-ones, the log is rate-limited.
    let g = assemble(
        r#"
    mov $100, %ebx
1:  mov $0x1234, %dx
    in %dx, %al
    out %al, %dx
    movl $1, 0xe0000000
    mov 0xe0000000, %eax
    dec %ebx
    jnz 1b
    EXPECT32 0xe0000010, 0xffffffff, unknown_mmio_reads_ones
    mov $0x1234, %dx
    in %dx, %al
    cmp $0xff, %al
    je 2f
    PRINT "FAIL port\n"
2:  PRINT "survived\n"
    jmp reset
"#,
    );
    let out = g.run(&[]);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.serial, "survived\n");
    let warnings = out.stderr.matches("unknown").count();
    assert!(
        (1..=20).contains(&warnings),
        "log not rate-limited: {warnings} lines"
    );
}

fn disk(g: &guest::Guest, sectors: usize) -> std::path::PathBuf {
    let path = g.path("disk.img");
    let mut data = vec![0u8; 512 * sectors];
    data[..16].copy_from_slice(b"SECTOR-ZERO-DATA");
    std::fs::write(&path, data).unwrap();
    path
}

#[test]
fn virtio_mmio_discovery_and_feature_negotiation() {
    if !can_run("virtio_mmio_discovery_and_feature_negotiation") {
        return;
    }
    let g = assemble(
        r#"
    VIRTIO_INIT 0xd0000000, 2
    /* A driver acking a feature the device did not offer must not get FEATURES_OK. */
    MMIO_W 0xd0000000, 0x070, 0
    MMIO_W 0xd0000000, 0x070, 3
    MMIO_W 0xd0000000, 0x024, 0
    MMIO_W 0xd0000000, 0x020, 0x80000000
    MMIO_W 0xd0000000, 0x070, 11
    EXPECT32 0xd0000070, 3, refused_features
    /* Capacity (config space) is 8 sectors. */
    EXPECT32 0xd0000100, 8, capacity
    PRINT "virtio ok\n"
    jmp reset
"#,
    );
    let img = disk(&g, 8);
    let out = g.run(&["--disk", img.to_str().unwrap()]);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.serial, "virtio ok\n");
}

/// Reads sector 0 and prints it, then writes sector 1 from guest memory.
const BLOCK_GUEST: &str = r#"
    VIRTIO_INIT 0xd0000000, 2
    QUEUE 0xd0000000, 0, 0x200000, 0x201000, 0x202000
    MMIO_W 0xd0000000, 0x070, 15
    /* Request 1: IN sector 0 into 0x204000. */
    movl $0, 0x203000
    movl $0, 0x203004
    movl $0, 0x203008
    movl $0, 0x20300c
    movb $0xaa, 0x205000
    DESC 0x200000, 0, 0x203000, 16, 1, 1
    DESC 0x200000, 1, 0x204000, 512, 3, 2
    DESC 0x200000, 2, 0x205000, 1, 2, 0
    AVAIL 0x201000, 0, 0, 1
    MMIO_W 0xd0000000, 0x050, 0
    WAIT16 0x202002, 1, read
    cmpb $0, 0x205000
    je 1f
    PRINT "FAIL read status\n"
    jmp reset
1:  mov $0x204000, %esi
    mov $16, %ecx
    call putn
    PRINT "\n"
    /* Request 2: OUT sector 1 from 0x206000. */
    mov $0x206000, %edi
    mov $128, %ecx
    mov $0x54495257, %eax /* "WRIT" */
    rep stosl
    movl $1, 0x203100
    movl $0, 0x203104
    movl $1, 0x203108
    movl $0, 0x20310c
    DESC 0x200000, 3, 0x203100, 16, 1, 4
    DESC 0x200000, 4, 0x206000, 512, 1, 5
    DESC 0x200000, 5, 0x205000, 1, 2, 0
    AVAIL 0x201000, 1, 3, 2
    MMIO_W 0xd0000000, 0x050, 0
    WAIT16 0x202002, 2, write
    movzbl 0x205000, %eax
    add $0x30, %al
    mov %al, 0x207000
    movb $0, 0x207001
    PRINT "write status "
    mov $0x207000, %esi
    call puts
    PRINT "\n"
    jmp reset
"#;

#[test]
fn block_read_and_write_reach_the_file() {
    if !can_run("block_read_and_write_reach_the_file") {
        return;
    }
    let g = assemble(BLOCK_GUEST);
    let img = disk(&g, 8);
    let out = g.run(&["--disk", img.to_str().unwrap()]);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.serial, "SECTOR-ZERO-DATA\nwrite status 0\n");
    let mut sector1 = [0u8; 512];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut sector1, 512)
        .unwrap();
    assert_eq!(&sector1[..8], b"WRITWRIT");
    assert!(sector1.chunks(4).all(|c| c == b"WRIT"));
}

#[test]
fn read_only_disk_refuses_the_write() {
    if !can_run("read_only_disk_refuses_the_write") {
        return;
    }
    let g = assemble(BLOCK_GUEST);
    let img = disk(&g, 8);
    let arg = format!("{},ro", img.display());
    let out = g.run(&["--disk", &arg]);
    assert!(out.status.success(), "{}", out.stderr);
    // VIRTIO_BLK_S_IOERR, and the file is untouched.
    assert_eq!(out.serial, "SECTOR-ZERO-DATA\nwrite status 1\n");
    let data = std::fs::read(&img).unwrap();
    assert!(data[512..1024].iter().all(|b| *b == 0));
}

#[test]
fn misprogrammed_queue_sets_needs_reset_and_vmm_survives() {
    if !can_run("misprogrammed_queue_sets_needs_reset_and_vmm_survives") {
        return;
    }
    // Descriptor table outside guest memory (32 MiB): QUEUE_READY must not stick, the
    // device must flag DEVICE_NEEDS_RESET, and a notify must be ignored.
    let g = assemble(
        r#"
    VIRTIO_INIT 0xd0000000, 2
    MMIO_W 0xd0000000, 0x030, 0
    MMIO_W 0xd0000000, 0x038, 8
    MMIO_W 0xd0000000, 0x080, 0x7f000000
    MMIO_W 0xd0000000, 0x090, 0x201000
    MMIO_W 0xd0000000, 0x0a0, 0x202000
    MMIO_W 0xd0000000, 0x044, 1
    EXPECT32 0xd0000044, 0, queue_not_ready
    EXPECT32 0xd0000070, 0x4b, needs_reset
    MMIO_W 0xd0000000, 0x050, 0
    PRINT "ok\n"
    jmp reset
"#,
    );
    let img = disk(&g, 8);
    let out = g.run(&["--disk", img.to_str().unwrap()]);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.serial, "ok\n");
    assert!(out.stderr.contains("misprogrammed"), "{}", out.stderr);
}

#[test]
fn kvmclock_is_advertised_and_published_on_pvm() {
    if !can_run("kvmclock_is_advertised_and_published_on_pvm") {
        return;
    }
    // CPUID 0x40000000 must say "KVMKVMKVM" (the template passes the KVM leaves),
    // 0x40000001 must offer CLOCKSOURCE2 (bit 3); then enabling kvmclock through
    // MSR_KVM_SYSTEM_TIME_NEW must make KVM publish a pvclock page (TSC scale and a
    // consistent snapshot): time from rdtsc without calibration. (With KVM's master clock
    // the snapshot's system_time stays fixed; the guest extrapolates from the TSC.)
    let g = assemble(
        r#"
    mov $0x40000000, %eax
    cpuid
    cmp $0x4b4d564b, %ebx
    je 1f
    PRINT "FAIL no KVM signature\n"
    jmp reset
1:  mov $0x40000001, %eax
    cpuid
    test $8, %eax
    jnz 2f
    PRINT "FAIL no CLOCKSOURCE2\n"
    jmp reset
2:  mov $0x4b564d01, %ecx
    mov $0x300001, %eax
    xor %edx, %edx
    wrmsr
    /* pvclock: version @0, tsc_timestamp @8, system_time @16, mul @24, shift @28 */
    cmpl $0, 0x300018
    jne 3f
    PRINT "FAIL pvclock not filled\n"
    jmp reset
    /* A published, consistent snapshot: version non-zero and even. */
3:  mov 0x300000, %eax
    test %eax, %eax
    jz 4f
    test $1, %eax
    jz 5f
4:  PRINT "FAIL pvclock version\n"
    jmp reset
5:  PRINT "kvmclock ok\n"
    jmp reset
"#,
    );
    let out = g.run(&[]);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.serial, "kvmclock ok\n");
}

#[test]
fn sigterm_shuts_down_and_cleans_up_sockets() {
    if !can_run("sigterm_shuts_down_and_cleans_up_sockets") {
        return;
    }
    let g = assemble(SPINNER);
    let uds = g.path("vsock.sock");
    let api = g.path("api.sock");
    let child = g.spawn(&[
        "--vsock-uds",
        uds.to_str().unwrap(),
        "--api-sock",
        api.to_str().unwrap(),
    ]);
    wait_for("guest output", || g.serial().len() > 2);
    assert!(uds.exists() && api.exists());
    // SAFETY: kill(2) on the child we just spawned and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = g.finish(child, Duration::from_secs(10));
    assert!(out.status.success(), "{:?} {}", out.status, out.stderr);
    assert!(out.stderr.contains("shutting down"), "{}", out.stderr);
    assert!(!uds.exists(), "vsock socket left behind");
    assert!(!api.exists(), "api socket left behind");
}

#[test]
fn smp_vm_with_waiting_aps_boots_and_exits() {
    if !can_run("smp_vm_with_waiting_aps_boots_and_exits") {
        return;
    }
    // vCPUs 1-3 sit in wait-for-SIPI inside KVM_RUN; the VMM must still stop them.
    let g = assemble("    PRINT \"bsp\\n\"\n    jmp reset\n");
    let out = g.run(&["--vcpus", "4"]);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.serial, "bsp\n");
}
