//! End-to-end tests of `cocoon-vmm` on this host's /dev/kvm with synthetic PVH guests
//! (see `guest/mod.rs`): serial, i8042 reset, triple fault, unknown I/O, virtio-mmio
//! discovery and feature negotiation, block read/write, a vsock round trip, the API and
//! the seccomp sandbox.

mod guest;

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use guest::{assemble, can_run};

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

/// A guest that opens a stream to host port 5000, sends "ping\n", and prints the first
/// data packet it gets back.
const VSOCK_GUEST: &str = r#"
    VIRTIO_INIT 0xd0000000, 19
    QUEUE 0xd0000000, 0, 0x210000, 0x211000, 0x212000
    QUEUE 0xd0000000, 1, 0x220000, 0x221000, 0x222000
    MMIO_W 0xd0000000, 0x070, 15
    /* Four 4 KiB rx buffers. */
    DESC 0x210000, 0, 0x213000, 4096, 2, 0
    DESC 0x210000, 1, 0x214000, 4096, 2, 0
    DESC 0x210000, 2, 0x215000, 4096, 2, 0
    DESC 0x210000, 3, 0x216000, 4096, 2, 0
    movw $0, 0x211004
    movw $1, 0x211006
    movw $2, 0x211008
    movw $3, 0x21100a
    movw $4, 0x211002
    MMIO_W 0xd0000000, 0x050, 0
    /* REQUEST: cid 3 port 1234 -> cid 2 port 5000. */
    mov $0x223000, %edi
    call vsock_hdr
    movw $1, 0x22301e
    DESC 0x220000, 0, 0x223000, 44, 0, 0
    AVAIL 0x221000, 0, 0, 1
    MMIO_W 0xd0000000, 0x050, 1
    WAIT16 0x212002, 1, response
    cmpw $2, 0x21301e
    je 1f
    PRINT "FAIL no RESPONSE\n"
    jmp reset
    /* RW "ping\n", header and payload in one descriptor. */
1:  mov $0x224000, %edi
    call vsock_hdr
    movw $5, 0x22401e
    movl $5, 0x224018
    movl $0x676e6970, 0x22402c
    movb $0x0a, 0x224030
    DESC 0x220000, 1, 0x224000, 49, 0, 0
    AVAIL 0x221000, 1, 1, 2
    MMIO_W 0xd0000000, 0x050, 1
    /* Wait for rx packets until one is RW; print its payload. */
    mov $2, %ebx
2:  cmp $5, %ebx
    jae 4f
    mov $50000000, %ecx
3:  movzwl 0x212002, %eax
    cmp %ebx, %eax
    jae 5f
    loop 3b
4:  PRINT "TIMEOUT data\n"
    jmp reset
5:  movl 0x212000 + 4 - 8(,%ebx,8), %eax /* used.ring[ebx-1].id */
    shl $12, %eax
    add $0x213000, %eax
    inc %ebx
    cmpw $5, 0x1e(%eax)
    jne 2b
    mov 0x18(%eax), %ecx
    lea 44(%eax), %esi
    call putn
    jmp reset

/* A stream header at EDI with op 0, len 0. */
vsock_hdr:
    push %edi
    push %ecx
    xor %eax, %eax
    mov $11, %ecx
    rep stosl
    pop %ecx
    pop %edi
    movl $3, 0(%edi)
    movl $2, 8(%edi)
    movl $1234, 16(%edi)
    movl $5000, 20(%edi)
    movw $1, 28(%edi)
    movl $65536, 36(%edi)
    ret
"#;

/// The host side of `VSOCK_GUEST`: listens on `<dir>/vsock.sock_5000` (where the guest's
/// connection to host port 5000 lands), reads the guest's 5 bytes and answers "pong\n".
fn pong_on_host_port_5000(g: &guest::Guest) -> std::thread::JoinHandle<[u8; 5]> {
    let listener = UnixListener::bind(g.path("vsock.sock_5000")).unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut s = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => panic!("the guest never connected: {e}"),
            }
        };
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        s.write_all(b"pong\n").unwrap();
        // Keep the stream open until the guest has had time to read.
        std::thread::sleep(Duration::from_millis(500));
        buf
    })
}

#[test]
fn vsock_round_trip_to_a_host_unix_socket() {
    if !can_run("vsock_round_trip_to_a_host_unix_socket") {
        return;
    }
    let g = assemble(VSOCK_GUEST);
    let uds = g.path("vsock.sock");
    let host = pong_on_host_port_5000(&g);
    let out = g.run(&["--vsock-uds", uds.to_str().unwrap()]);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.serial, "pong\n", "{}", out.stderr);
    assert_eq!(&host.join().unwrap(), b"ping\n");
}

/// A guest that prints a dot every few million iterations forever.
const SPINNER: &str = r#"
1:  mov $2000000, %ecx
2:  loop 2b
    mov $0x2e, %al
    mov $0x3f8, %dx
    out %al, %dx
    jmp 1b
"#;

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn api_boots_pauses_resumes_and_shuts_down_under_seccomp() {
    if !can_run("api_boots_pauses_resumes_and_shuts_down_under_seccomp") {
        return;
    }
    use cocoon_vmm::vmm::{api_call, VmState};
    let g = assemble(SPINNER);
    let api = g.path("api.sock");
    let child = g.spawn(&["--api-sock", api.to_str().unwrap(), "--no-boot"]);
    wait_for("api socket", || api.exists());
    let r = api_call(&api, r#"{"action":"state"}"#).unwrap();
    assert_eq!(r.state, VmState::Configured);
    let r = api_call(&api, r#"{"action":"pause"}"#).unwrap();
    assert!(!r.ok, "pause before boot must be refused");
    let r = api_call(&api, r#"{"action":"bogus"}"#).unwrap();
    assert!(!r.ok && r.error.unwrap().contains("bogus"));
    let r = api_call(&api, r#"{"action":"boot"}"#).unwrap();
    assert!(r.ok && r.state == VmState::Running, "{r:?}");

    // Sandboxed: seccomp in filter mode and no_new_privs, on every thread.
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert!(status.contains("Seccomp:\t2"), "{status}");
    // Every thread has the process's two filters (clone3 answered ENOSYS, the
    // allowlist); the vCPU thread stacks one of its own on them.
    // (A just-spawned vCPU thread names itself, then stacks its filter: wait for both.)
    let vcpu_filters = || {
        thread_filters(child.id())
            .into_iter()
            .find(|(comm, _)| comm == "vcpu0")
            .map(|t| t.1)
    };
    wait_for("vcpu0 under its own filter", || vcpu_filters() == Some(3));
    let threads = thread_filters(child.id());
    assert!(threads.iter().all(|t| t.1 >= 2), "{threads:?}");

    let len = || g.serial().len();
    wait_for("guest output", || len() > 2);
    let r = api_call(&api, r#"{"action":"pause"}"#).unwrap();
    assert!(r.ok && r.state == VmState::Paused, "{r:?}");
    let paused_at = len();
    std::thread::sleep(Duration::from_millis(300));
    assert!(len() <= paused_at + 1, "guest ran while paused");
    let r = api_call(&api, r#"{"action":"resume"}"#).unwrap();
    assert!(r.ok && r.state == VmState::Running);
    wait_for("output after resume", || len() > paused_at + 2);
    // Exit accounting over the API, under seccomp: the guest's serial writes.
    let r = api_call(&api, r#"{"action":"stats"}"#).unwrap();
    let stats = r.stats.expect("stats in the response");
    let serial_writes = stats["by_kind"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kind"] == "io_out 0x3f8")
        .map(|k| k["count"].as_u64().unwrap())
        .unwrap_or(0);
    assert!(serial_writes as usize >= paused_at, "{stats}");
    let r = api_call(&api, r#"{"action":"shutdown"}"#).unwrap();
    assert!(r.ok);
    let out = g.finish(child, Duration::from_secs(10));
    assert!(out.status.success(), "{}", out.stderr);
    assert!(!api.exists(), "api socket left behind");
}

/// Whether the test runs as root (the jail needs it); prints why not.
/// Each thread of `pid`: its name and how many seccomp filters it runs under.
fn thread_filters(pid: u32) -> Vec<(String, u32)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .filter_map(|t| {
            let dir = t.ok()?.path();
            let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
            let status = std::fs::read_to_string(dir.join("status")).ok()?;
            let n = status
                .lines()
                .find_map(|l| l.strip_prefix("Seccomp_filters:"))?
                .trim()
                .parse()
                .ok()?;
            Some((comm.trim().to_string(), n))
        })
        .collect()
}

fn is_root(test: &str) -> bool {
    let root = guest::euid_is_root();
    if !root {
        guest::skip(&format!("{test}: needs root"));
    }
    root
}

/// The namespace a process is in, e.g. `mnt:[4026531841]`.
fn ns(pid: &str, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .unwrap()
        .display()
        .to_string()
}

/// Every path under `root`, relative to it, sorted.
fn tree(root: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(root).unwrap().display().to_string());
            if p.is_dir() && !p.is_symlink() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn jail_gives_the_vmm_its_own_namespaces_and_an_empty_root() {
    if !can_run("jail_gives_the_vmm_its_own_namespaces_and_an_empty_root") {
        return;
    }
    if !is_root("jail_gives_the_vmm_its_own_namespaces_and_an_empty_root") {
        return;
    }
    use cocoon_vmm::vmm::api_call;
    let g = assemble(SPINNER);
    let dir = std::fs::canonicalize(g.dir.path()).unwrap();
    let api = dir.join("api.sock");
    let uds = dir.join("vsock.sock");
    let child = g.spawn(&[
        "--jail",
        "on",
        "--api-sock",
        api.to_str().unwrap(),
        "--vsock-uds",
        uds.to_str().unwrap(),
    ]);
    wait_for("guest output", || g.serial().len() > 2);
    let pid = child.id().to_string();
    for kind in ["mnt", "net", "ipc", "uts"] {
        assert_ne!(ns(&pid, kind), ns("self", kind), "{kind} namespace shared");
    }
    // Its root holds only the directory of its sockets, at the same path.
    let root = std::path::PathBuf::from(format!("/proc/{pid}/root"));
    let outside: Vec<String> = tree(&root)
        .into_iter()
        .filter(|p| !std::path::Path::new("/").join(p).starts_with(&dir))
        .collect();
    let mut ancestors: Vec<String> = dir
        .ancestors()
        .skip(1)
        .filter_map(|a| a.strip_prefix("/").ok())
        .filter(|a| !a.as_os_str().is_empty())
        .map(|a| a.display().to_string())
        .collect();
    ancestors.sort();
    assert_eq!(
        outside, ancestors,
        "the jail root holds more than the kept directory"
    );
    assert!(root.join(uds.strip_prefix("/").unwrap()).exists());
    // The root is read-only; the kept directory is not.
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    // Field 5 of a mountinfo line is the mount point, field 6 its options.
    let opts_at = |point: &std::path::Path| {
        mountinfo
            .lines()
            .map(|l| l.split(' ').collect::<Vec<_>>())
            .find(|f| std::path::Path::new(f[4]) == point)
            .map(|f| f[5].to_string())
            .unwrap_or_default()
    };
    let root_opts = opts_at(std::path::Path::new("/"));
    assert!(
        root_opts.starts_with("ro,"),
        "root mount: {root_opts}\n{mountinfo}"
    );
    let kept_opts = opts_at(&dir);
    assert!(
        kept_opts.starts_with("rw,nosuid,nodev,noexec"),
        "kept dir mount: {kept_opts}\n{mountinfo}"
    );
    // No capabilities left, none to regain.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert!(
            status.contains(&format!("{set}:\t0000000000000000")),
            "{set} not empty:\n{status}"
        );
    }
    // Its network namespace has nothing but a loopback device.
    let dev = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).unwrap();
    let ifaces: Vec<&str> = dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .collect();
    assert_eq!(ifaces.iter().map(|s| s.trim()).collect::<Vec<_>>(), ["lo"]);

    // Sockets in the kept directory still work and are removed at exit from inside.
    let r = api_call(&api, r#"{"action":"shutdown"}"#).unwrap();
    assert!(r.ok, "{r:?}");
    let out = g.finish(child, Duration::from_secs(10));
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stderr.contains("jail: own mount"), "{}", out.stderr);
    assert!(!api.exists() && !uds.exists(), "sockets left behind");
}

/// A vsock socket in a world-writable directory cannot be kept: `auto` runs without the
/// jail and says so, `on` refuses to boot and says why.
#[test]
fn jail_refuses_shared_socket_directories() {
    if !can_run("jail_refuses_shared_socket_directories") {
        return;
    }
    if !is_root("jail_refuses_shared_socket_directories") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let g = assemble("    PRINT \"up\\n\"\n    jmp reset\n");
    let shared = g.path("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let uds = shared.join("vsock.sock");
    let uds = uds.to_str().unwrap();
    let out = g.run(&["--vsock-uds", uds]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stderr.contains("jail: off") && out.stderr.contains("world-writable"));
    let out = g.run(&["--jail", "on", "--vsock-uds", uds]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("world-writable"), "{}", out.stderr);
}

#[test]
fn jail_off_leaves_the_namespaces_alone() {
    if !can_run("jail_off_leaves_the_namespaces_alone") {
        return;
    }
    use cocoon_vmm::vmm::api_call;
    let g = assemble(SPINNER);
    let api = g.path("api.sock");
    let child = g.spawn(&["--jail", "off", "--api-sock", api.to_str().unwrap()]);
    wait_for("guest output", || g.serial().len() > 2);
    let pid = child.id().to_string();
    for kind in ["mnt", "net"] {
        assert_eq!(ns(&pid, kind), ns("self", kind), "{kind} namespace");
    }
    api_call(&api, r#"{"action":"shutdown"}"#).unwrap();
    let out = g.finish(child, Duration::from_secs(10));
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stderr.contains("jail: off by configuration"),
        "{}",
        out.stderr
    );
}

#[test]
fn api_configures_a_vm_from_json() {
    if !can_run("api_configures_a_vm_from_json") {
        return;
    }
    use cocoon_vmm::vmm::{api_call, VmState};
    let g = assemble("    PRINT \"configured\\n\"\n    jmp reset\n");
    let api = g.path("api.sock");
    let child = std::process::Command::new(guest::BIN)
        .args(["run", "--api-sock"])
        .arg(&api)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    g.track(&child);
    wait_for("api socket", || api.exists());
    let r = api_call(&api, r#"{"action":"state"}"#).unwrap();
    assert_eq!(r.state, VmState::NotConfigured);
    let bad = r#"{"action":"configure","config":{"kernel":"/nope","mem_mb":1}}"#;
    let r = api_call(&api, bad).unwrap();
    assert!(
        !r.ok && r.error.as_deref().unwrap_or("").contains("mem_mb"),
        "{r:?}"
    );
    let cfg = serde_json::json!({
        "action": "configure",
        "config": {"kernel": g.elf, "mem_mib": 16, "serial_out": g.path("serial.log")},
    });
    let r = api_call(&api, &cfg.to_string()).unwrap();
    assert!(r.ok && r.state == VmState::Configured, "{r:?}");
    let r = api_call(&api, r#"{"action":"boot"}"#).unwrap();
    assert!(r.ok, "{r:?}");
    let out = g.finish(child, Duration::from_secs(10));
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.serial, "configured\n");
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

/// A guest that sends one Ethernet frame (ethertype 0x88b5) and prints the payload of
/// the first 0x88b5 frame it receives.
const NET_GUEST: &str = r#"
    VIRTIO_INIT 0xd0000000, 1
    QUEUE 0xd0000000, 0, 0x210000, 0x211000, 0x212000
    QUEUE 0xd0000000, 1, 0x220000, 0x221000, 0x222000
    MMIO_W 0xd0000000, 0x070, 15
    DESC 0x210000, 0, 0x213000, 2048, 2, 0
    DESC 0x210000, 1, 0x214000, 2048, 2, 0
    DESC 0x210000, 2, 0x215000, 2048, 2, 0
    DESC 0x210000, 3, 0x216000, 2048, 2, 0
    movw $0, 0x211004
    movw $1, 0x211006
    movw $2, 0x211008
    movw $3, 0x21100a
    movw $4, 0x211002
    MMIO_W 0xd0000000, 0x050, 0
    /* virtio_net_hdr (12 zero bytes), broadcast dst, our src, 0x88b5, payload. */
    mov $0x223000, %edi
    xor %eax, %eax
    mov $16, %ecx
    rep stosl
    movl $0xffffffff, 0x22300c
    movw $0xffff, 0x223010
    movl $0x00434302, 0x223012
    movw $0x0000, 0x223016
    movw $0xb588, 0x223018
    movl $0x73657567, 0x22301a /* "gues" */
    movl $0x72662d74, 0x22301e /* "t-fr" */
    movl $0x00656d61, 0x223022 /* "ame" */
    DESC 0x220000, 0, 0x223000, 64, 0, 0
    AVAIL 0x221000, 0, 0, 1
    MMIO_W 0xd0000000, 0x050, 1
    WAIT16 0x222002, 1, tx
    mov $1, %ebx
2:  cmp $5, %ebx
    jae 4f
    mov $80000000, %ecx
3:  movzwl 0x212002, %eax
    cmp %ebx, %eax
    jae 5f
    loop 3b
4:  PRINT "TIMEOUT rx\n"
    jmp reset
5:  mov 0x212000 + 4 - 8(,%ebx,8), %eax /* used.ring[ebx-1].id */
    mov 0x212000 + 8 - 8(,%ebx,8), %ecx /* used.ring[ebx-1].len */
    shl $12, %eax
    add $0x213000, %eax
    inc %ebx
    cmpw $0xb588, 24(%eax)
    jne 2b
    lea 26(%eax), %esi
    mov $10, %ecx /* the host pads its frame to 60 bytes: print just the payload */
    call putn
    PRINT "\n"
    jmp reset
"#;

/// A raw AF_PACKET socket on one interface, for the host side of the tap test.
struct PacketSocket(std::os::fd::OwnedFd);

impl PacketSocket {
    fn open(ifname: &str) -> std::io::Result<Self> {
        use std::os::fd::FromRawFd;
        let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
        // SAFETY: plain socket(2) call; the result is checked and then owned.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: a valid NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        // SAFETY: sockaddr_ll is plain data; all-zero is valid before filling it in.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto as u16;
        sll.sll_ifindex = ifindex;
        // SAFETY: binding our socket to a correctly sized sockaddr_ll.
        let rc = unsafe {
            libc::bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self(fd))
    }

    fn recv(&self, buf: &mut [u8]) -> isize {
        // SAFETY: receiving into a live buffer of the given length.
        unsafe {
            libc::recv(
                std::os::fd::AsRawFd::as_raw_fd(&self.0),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        }
    }

    fn send(&self, frame: &[u8]) -> isize {
        // SAFETY: sending from a live buffer of the given length.
        unsafe {
            libc::send(
                std::os::fd::AsRawFd::as_raw_fd(&self.0),
                frame.as_ptr().cast(),
                frame.len(),
                0,
            )
        }
    }
}

#[test]
fn net_frames_cross_a_real_tap_both_ways() {
    if !can_run("net_frames_cross_a_real_tap_both_ways") {
        return;
    }
    let tap = format!("ccvm{}", std::process::id() % 100_000);
    let ip = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(args)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !std::path::Path::new("/dev/net/tun").exists()
        || !ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])
    {
        guest::skip("net_frames_cross_a_real_tap_both_ways: cannot create a tap (needs root and /dev/net/tun)");
        return;
    }
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", &self.0])
                .status();
        }
    }
    let _cleanup = Cleanup(tap.clone());
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{tap}/disable_ipv6"), "1");
    assert!(ip(&["link", "set", &tap, "up"]));
    let sock = PacketSocket::open(&tap).unwrap();

    let g = assemble(NET_GUEST);
    let child = g.spawn(&["--net-tap", &tap]);
    // Wait for the guest's frame, then answer with ours.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut buf = [0u8; 2048];
    let got = loop {
        assert!(
            Instant::now() < deadline,
            "no frame from the guest; serial {:?}",
            g.serial()
        );
        let n = sock.recv(&mut buf);
        if n >= 14 && buf[12..14] == [0x88, 0xb5] {
            break buf[14..n as usize].to_vec();
        }
        if n < 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    assert!(got.starts_with(b"guest-frame"), "{got:?}");
    assert_eq!(&buf[6..12], &[2, 0x43, 0x43, 0, 0, 0]);
    let mut frame = vec![0xffu8; 6];
    frame.extend_from_slice(&[2, 0, 0, 0, 0, 9, 0x88, 0xb5]);
    frame.extend_from_slice(b"host-frame");
    frame.resize(60, 0);
    assert_eq!(sock.send(&frame), 60);
    let out = g.finish(child, Duration::from_secs(15));
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.serial, "host-frame\n");
}

#[test]
fn vsock_through_a_vhost_user_backend_process() {
    if !can_run("vsock_through_a_vhost_user_backend_process") {
        return;
    }
    // The same guest as the in-process vsock test, but the queues are served by a
    // separate `cocoon-vmm vhost-user-vsock` process over the shared memfd: this drives
    // the vhost-user frontend (memory table, vring handover, kick and call eventfds).
    let g = assemble(VSOCK_GUEST);
    let vhost = g.path("vhost.sock");
    let uds = g.path("vsock.sock");
    let mut backend = std::process::Command::new(guest::BIN)
        .args(["vhost-user-vsock", "--guest-cid", "3", "--socket"])
        .arg(&vhost)
        .arg("--uds-path")
        .arg(&uds)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    g.track(&backend);
    wait_for("vhost-user socket", || vhost.exists());
    // It parses guest data, so it runs jailed like the VMM (as root, where it can).
    if guest::euid_is_root() {
        let pid = backend.id().to_string();
        assert_ne!(ns(&pid, "mnt"), ns("self", "mnt"), "backend not jailed");
        assert_ne!(ns(&pid, "net"), ns("self", "net"), "backend not jailed");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert!(status.contains("CapEff:\t0000000000000000"), "{status}");
    }
    let host = pong_on_host_port_5000(&g);
    let out = g.run(&["--vsock-vhost-user", vhost.to_str().unwrap()]);
    let _ = backend.kill();
    let _ = g.finish(backend, Duration::from_secs(5));
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.serial, "pong\n", "{}", out.stderr);
    assert_eq!(&host.join().unwrap(), b"ping\n");
}

#[test]
fn virtio_fs_fuse_init_through_virtiofsd() {
    if !can_run("virtio_fs_fuse_init_through_virtiofsd") {
        return;
    }
    if std::process::Command::new("virtiofsd")
        .arg("--version")
        .output()
        .is_err()
    {
        guest::skip("virtio_fs_fuse_init_through_virtiofsd: virtiofsd is not installed (`cargo install virtiofsd`)");
        return;
    }
    // FUSE_INIT (opcode 26) on the request queue: in_header + fuse_init_in readable,
    // out_header + fuse_init_out writable. virtiofsd answers with major version 7.
    let g = assemble(
        r#"
    VIRTIO_INIT 0xd0000000, 26
    QUEUE 0xd0000000, 0, 0x200000, 0x201000, 0x202000
    QUEUE 0xd0000000, 1, 0x220000, 0x221000, 0x222000
    MMIO_W 0xd0000000, 0x070, 15
    mov $0x223000, %edi
    xor %eax, %eax
    mov $64, %ecx
    rep stosl
    movl $104, 0x223000
    movl $26, 0x223004
    movl $1, 0x223008
    movl $7, 0x223028
    movl $31, 0x22302c
    movl $0x20000, 0x223030
    movl $0xffffffff, 0x224004
    DESC 0x220000, 0, 0x223000, 104, 1, 1
    DESC 0x220000, 1, 0x224000, 256, 2, 0
    AVAIL 0x221000, 0, 0, 1
    MMIO_W 0xd0000000, 0x050, 1
    WAIT16 0x222002, 1, fuse_init
    EXPECT32 0x224004, 0, fuse_error
    EXPECT32 0x224010, 7, fuse_major
    PRINT "fuse init ok\n"
    jmp reset
"#,
    );
    let shared = g.path("shared");
    std::fs::create_dir(&shared).unwrap();
    let sock = g.path("fs.sock");
    let fsd = std::process::Command::new("virtiofsd")
        .arg("--socket-path")
        .arg(&sock)
        .arg("--shared-dir")
        .arg(&shared)
        .args(["--sandbox", "none", "--log-level", "error"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    g.track(&fsd);
    wait_for("virtiofsd socket", || sock.exists());
    let arg = format!("{}:shared", sock.display());
    let out = g.run(&["--fs", &arg]);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.serial, "fuse init ok\n", "{}", out.stderr);
    // virtiofsd serves one frontend and exits when it goes away.
    let _ = g.finish(fsd, Duration::from_secs(10));
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
