//! Snapshots and restores (VM templates, issue #12) with a synthetic guest on this
//! host's KVM: a guest that counts, keeping its count both in a register and in RAM,
//! is paused and saved mid-count; VMs restored from the snapshot must go on from the
//! next number (registers, RAM, the serial port and the interrupt controller all came
//! back), never print the guest's start-up line again, and leave the template's memory
//! file as it was (their RAM is a private copy-on-write mapping of it).

mod guest;

use std::time::{Duration, Instant};

use cocoon_vmm::vmm::{api_call, VmState};
use guest::{assemble, can_run, Guest};

/// Prints "start", then the digits 1-7, 0, 1, ... forever, one per 20 000 loop
/// iterations (PVM emulates this 32-bit code: ≈40 ms a digit here). The count lives
/// in EBX and at `count` in RAM; a digit is printed only when both agree.
const COUNTER: &str = r#"
    PRINT "start\n"
    xor %ebx, %ebx
    movl $0, count
1:  mov $20000, %ecx
2:  loop 2b
    inc %ebx
    incl count
    cmp count, %ebx
    je 3f
    PRINT "FAIL register and memory disagree\n"
    jmp reset
3:  mov %bl, %al
    and $7, %al
    add $0x30, %al
    mov $0x3f8, %dx
    out %al, %dx
    jmp 1b
    .section .data
count: .long 0
    .section .text
"#;

fn wait_for(g: &Guest, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; serial so far: {:?}",
            g.serial()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The digits printed, checked to be the sequence 1, 2, ... 7, 0, 1, ... (mod 8) from
/// `first`; returns the count reached.
fn check_run(digits: &str, first: u32) -> u32 {
    let mut n = first;
    for (i, c) in digits.chars().enumerate() {
        let want = char::from_digit(n % 8, 10).unwrap();
        assert_eq!(c, want, "digit {i} of {digits:?}: a gap or a repeat");
        n += 1;
    }
    n
}

fn file_digest(path: &std::path::Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::fs::read(path).unwrap().hash(&mut h);
    h.finish()
}

/// Boots the counter with an API and a snapshot directory, waits for a few digits,
/// pauses, snapshots and shuts it down. Returns what it printed.
fn take_template(g: &Guest, snap: &std::path::Path) -> String {
    let api = g.path("api.sock");
    let child = g.spawn(&[
        "--api-sock",
        api.to_str().unwrap(),
        "--snapshot-to",
        snap.to_str().unwrap(),
    ]);
    wait_for(g, "api socket", Duration::from_secs(10), || api.exists());
    wait_for(g, "the count to start", Duration::from_secs(10), || {
        g.serial().len() >= "start\n".len() + 10
    });
    let r = api_call(&api, r#"{"action":"snapshot"}"#).unwrap();
    assert!(
        !r.ok && r.state == VmState::Running,
        "snapshot while running: {r:?}"
    );
    let r = api_call(&api, r#"{"action":"pause"}"#).unwrap();
    assert!(r.ok, "{r:?}");
    let r = api_call(&api, r#"{"action":"snapshot"}"#).unwrap();
    assert!(r.ok && r.state == VmState::Paused, "{r:?}");
    let r = api_call(&api, r#"{"action":"shutdown"}"#).unwrap();
    assert!(r.ok, "{r:?}");
    let out = g.finish(child, Duration::from_secs(10));
    assert!(out.status.success(), "{}", out.stderr);
    out.serial
}

#[test]
fn a_restored_vm_goes_on_where_the_template_stopped() {
    if !can_run("a_restored_vm_goes_on_where_the_template_stopped") {
        return;
    }
    let g = assemble(COUNTER);
    let snap = g.path("template");
    let before = take_template(&g, &snap);
    let digits = before
        .strip_prefix("start\n")
        .expect("the guest's start line");
    let stopped_at = check_run(digits, 1);
    let memory = snap.join("memory");
    let digest = file_digest(&memory);
    // Zero pages are holes: a 32 MiB guest that touched little takes little disk.
    let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&memory).unwrap());
    assert!(
        blocks * 512 < 4 << 20,
        "memory file not sparse: {} KiB",
        blocks / 2
    );

    // Two VMs from the one template, at once; each counts on for 20 digits.
    let clones: Vec<_> = (0..2)
        .map(|i| {
            let serial = g.path(&format!("clone{i}.log"));
            let api = g.path(&format!("clone{i}.sock"));
            let child = std::process::Command::new(guest::BIN)
                .args(["run", "--restore"])
                .arg(&snap)
                .arg("--serial-out")
                .arg(&serial)
                .arg("--api-sock")
                .arg(&api)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            g.track(&child);
            (serial, api, child)
        })
        .collect();
    for (serial, api, child) in clones {
        let text = || std::fs::read_to_string(&serial).unwrap_or_default();
        wait_for(&g, "the clone's count", Duration::from_secs(20), || {
            text().len() >= 20
        });
        assert!(api_call(&api, r#"{"action":"shutdown"}"#).unwrap().ok);
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(
            stderr.contains("copy-on-write over the template"),
            "{stderr}"
        );
        let text = text();
        assert!(!text.contains("start"), "the clone booted again: {text:?}");
        check_run(&text, stopped_at);
    }
    assert_eq!(
        file_digest(&memory),
        digest,
        "a clone wrote to the template's memory"
    );
}

#[test]
fn snapshots_are_refused_with_the_reason() {
    if !can_run("snapshots_are_refused_with_the_reason") {
        return;
    }
    let g = assemble(COUNTER);
    // Without a snapshot directory.
    let api = g.path("api.sock");
    let child = g.spawn(&["--api-sock", api.to_str().unwrap()]);
    wait_for(&g, "api socket", Duration::from_secs(10), || api.exists());
    assert!(api_call(&api, r#"{"action":"pause"}"#).unwrap().ok);
    let r = api_call(&api, r#"{"action":"snapshot"}"#).unwrap();
    assert!(!r.ok, "{r:?}");
    assert!(r.error.unwrap().contains("--snapshot-to"));
    assert!(api_call(&api, r#"{"action":"shutdown"}"#).unwrap().ok);
    g.finish(child, Duration::from_secs(10));

    // A clone that does not fit the template is refused before it runs, naming what
    // differs; so is a directory without a snapshot.
    let snap = g.path("template");
    take_template(&g, &snap);
    let out = std::process::Command::new(guest::BIN)
        .args(["run", "--restore"])
        .arg(&snap)
        .args(["--vsock-uds"])
        .arg(g.path("v.sock"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("vsock: template false, this VM true"),
        "{stderr}"
    );
    let out = std::process::Command::new(guest::BIN)
        .args(["run", "--restore"])
        .arg(g.path("nothing-here"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("vm.json"), "{stderr}");
}
