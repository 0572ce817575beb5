//! Synthetic guests: tiny PVH ELF programs assembled by the test itself with binutils
//! (`as`/`ld`), entered in the PVH 32-bit protected-mode state, that drive the real VMM
//! through port I/O and MMIO and report on the serial port. Helpers to build them, to
//! run `cocoon-vmm` on them, and to skip (visibly) where the host cannot.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_cocoon-vmm");
/// The first virtio-mmio window and its registers.
pub const MMIO0: u32 = 0xd000_0000;

/// A prerequisite is missing: fails the test under `CI=true`, else prints
/// `SKIPPED: <msg>` (straight to fd 2, past the harness's capture).
#[track_caller]
pub fn skip(msg: &str) {
    let (test, why) = msg.split_once(": ").unwrap_or(("test", msg));
    cocoon_nested::testing::missing(test, why);
}

pub fn euid_is_root() -> bool {
    // SAFETY: geteuid(2) takes no arguments.
    unsafe { libc::geteuid() == 0 }
}

/// Whether /dev/kvm and binutils are here; prints why not.
pub fn can_run(test: &str) -> bool {
    if !Path::new("/dev/kvm").exists() {
        skip(&format!("{test}: /dev/kvm does not exist on this host"));
        return false;
    }
    for tool in ["as", "ld"] {
        if Command::new(tool).arg("--version").output().is_err() {
            skip(&format!("{test}: `{tool}` (binutils) is not installed"));
            return false;
        }
    }
    true
}

/// Common code: stack, `puts` (ESI = NUL-terminated string), `putn` (ESI, ECX bytes),
/// `reset` (i8042), and a PVH note pointing at `_start`. The test body starts at `main`.
const PRELUDE: &str = r#"
    .code32
    .section .text
    .globl _start
_start:
    mov $0x80000, %esp
    jmp main
puts:
    push %eax
    push %edx
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  pop %edx
    pop %eax
    ret
putn:
    push %eax
    push %edx
    mov $0x3f8, %dx
    test %ecx, %ecx
    jz 2f
1:  lodsb
    out %al, %dx
    loop 1b
2:  pop %edx
    pop %eax
    ret
reset:
    mov $0xfe, %al
    out %al, $0x64
3:  hlt
    jmp 3b

.macro PRINT s
    .pushsection .rodata
9:  .asciz "\s"
    .popsection
    mov $9b, %esi
    call puts
.endm

/* Fail with a message unless the 32-bit value at \addr equals \val. */
.macro EXPECT32 addr, val, msg
    cmpl $\val, \addr
    je 8f
    PRINT "FAIL \msg\n"
    jmp reset
8:
.endm

/* Poll the 16-bit value at \addr until it is at least \val, or fail. */
.macro WAIT16 addr, val, msg
    mov $50000000, %ecx
7:  movzwl \addr, %eax
    cmp $\val, %eax
    jae 6f
    loop 7b
    PRINT "TIMEOUT \msg\n"
    jmp reset
6:
.endm

/* A split-queue descriptor: table \t, index \i. */
.macro DESC t, i, addr, len, flags, next
    movl $\addr, (\t + 16 * \i)
    movl $0, (\t + 16 * \i + 4)
    movl $\len, (\t + 16 * \i + 8)
    movw $\flags, (\t + 16 * \i + 12)
    movw $\next, (\t + 16 * \i + 14)
.endm

/* Publish head \head at avail slot \slot (queue size 8) and set avail.idx to \idx. */
.macro AVAIL a, slot, head, idx
    movw $\head, (\a + 4 + 2 * \slot)
    movw $\idx, (\a + 2)
.endm

/* virtio-mmio register write/read at window \base. */
.macro MMIO_W base, reg, val
    movl $\val, (\base + \reg)
.endm

/* Bring a virtio-mmio device to FEATURES_OK acking only VIRTIO_F_VERSION_1. */
.macro VIRTIO_INIT base, devid
    EXPECT32 (\base + 0x000), 0x74726976, magic
    EXPECT32 (\base + 0x004), 2, version
    EXPECT32 (\base + 0x008), \devid, device_id
    MMIO_W \base, 0x070, 0
    MMIO_W \base, 0x070, 3
    MMIO_W \base, 0x014, 1
    mov (\base + 0x010), %eax
    test $1, %eax
    jnz 5f
    PRINT "FAIL no VERSION_1\n"
    jmp reset
5:  MMIO_W \base, 0x024, 1
    MMIO_W \base, 0x020, 1
    MMIO_W \base, 0x024, 0
    MMIO_W \base, 0x020, 0
    MMIO_W \base, 0x070, 11
    EXPECT32 (\base + 0x070), 11, features_ok
.endm

/* Configure queue \q of size 8 at desc \d, avail \a, used \u and make it ready. */
.macro QUEUE base, q, d, a, u
    MMIO_W \base, 0x030, \q
    MMIO_W \base, 0x038, 8
    MMIO_W \base, 0x080, \d
    MMIO_W \base, 0x084, 0
    MMIO_W \base, 0x090, \a
    MMIO_W \base, 0x094, 0
    MMIO_W \base, 0x0a0, \u
    MMIO_W \base, 0x0a4, 0
    MMIO_W \base, 0x044, 1
    EXPECT32 (\base + 0x044), 1, queue_ready
.endm

main:
"#;

const NOTE: &str = r#"
    .section .note.Xen, "a"
    .p2align 2
    .long 4
    .long 4
    .long 18 /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .p2align 2
    .long _start
"#;

const LINKER_SCRIPT: &str = r#"
ENTRY(_start)
PHDRS { text PT_LOAD FLAGS(7); note PT_NOTE; }
SECTIONS {
  . = 0x100000;
  .text : { *(.text) *(.rodata*) *(.data) *(.bss) } :text
  .note : { *(.note.Xen) } :text :note
}
"#;

/// A temp dir holding an assembled guest, and the VMMs started on it (killed on drop,
/// so a failing test leaves no process behind).
pub struct Guest {
    pub dir: tempfile::TempDir,
    pub elf: PathBuf,
    children: std::cell::RefCell<Vec<u32>>,
}

impl Drop for Guest {
    fn drop(&mut self) {
        for pid in self.children.borrow().iter() {
            // Only unreaped children are tracked (finish() forgets the ones it reaps), so
            // the pid still names our child.
            if Path::new(&format!("/proc/{pid}")).exists() {
                // SAFETY: kill(2) takes no pointers; the pid is a child we spawned.
                unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
            }
        }
    }
}

/// Assembles `body` (AT&T syntax, 32-bit, after the prelude) into a PVH ELF64.
pub fn assemble(body: &str) -> Guest {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("guest.S");
    let obj = dir.path().join("guest.o");
    let lds = dir.path().join("guest.ld");
    let elf = dir.path().join("guest.elf");
    std::fs::write(&src, format!("{PRELUDE}{body}\n{NOTE}")).unwrap();
    std::fs::write(&lds, LINKER_SCRIPT).unwrap();
    let out = Command::new("as")
        .args(["--64", "-o"])
        .arg(&obj)
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "as: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("ld")
        .args(["-m", "elf_x86_64", "--no-warn-rwx-segments", "-T"])
        .arg(&lds)
        .arg("-o")
        .arg(&elf)
        .arg(&obj)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ld: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Guest {
        dir,
        elf,
        children: Default::default(),
    }
}

/// What a VMM run produced.
pub struct Outcome {
    pub status: ExitStatus,
    pub serial: String,
    pub stderr: String,
}

impl Guest {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `cocoon-vmm run --kernel <elf> --serial-out <dir>/serial.log <extra>` to the end.
    pub fn run(&self, extra: &[&str]) -> Outcome {
        let child = self.spawn(extra);
        self.finish(child, Duration::from_secs(20))
    }

    /// Kills `child` when the guest is dropped, if it is still running.
    pub fn track(&self, child: &Child) {
        self.children.borrow_mut().push(child.id());
    }

    pub fn spawn(&self, extra: &[&str]) -> Child {
        let child = Command::new(BIN)
            .args(["run", "--mem-mib", "32", "--kernel"])
            .arg(&self.elf)
            .arg("--serial-out")
            .arg(self.path("serial.log"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        self.track(&child);
        child
    }

    pub fn serial(&self) -> String {
        std::fs::read_to_string(self.path("serial.log")).unwrap_or_default()
    }

    pub fn finish(&self, mut child: Child, timeout: Duration) -> Outcome {
        // Reaped below: stop tracking it so its pid is never signalled after reuse.
        self.children.borrow_mut().retain(|p| *p != child.id());
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("cocoon-vmm did not exit; serial: {:?}", self.serial());
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut stderr);
        }
        Outcome {
            status,
            serial: self.serial(),
            stderr,
        }
    }
}

/// A guest that prints a dot every few million iterations forever.
pub const SPINNER: &str = r#"
1:  mov $2000000, %ecx
2:  loop 2b
    mov $0x2e, %al
    mov $0x3f8, %dx
    out %al, %dx
    jmp 1b
"#;

/// Waits (10 s at most) until `f` holds.
pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether the test runs as root; says SKIPPED (failing under CI) when not.
pub fn is_root(test: &str) -> bool {
    let root = euid_is_root();
    if !root {
        skip(&format!("{test}: needs root"));
    }
    root
}

/// The namespace a process is in, e.g. `mnt:[4026531841]`.
pub fn ns(pid: &str, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .unwrap()
        .display()
        .to_string()
}

/// A pod-like uid for `jail-exec` tests.
pub const JAIL_UID: &str = "2000000123";

/// `jail-exec` with a PID namespace, a pod-like uid and only /usr (plus the merged-/usr
/// links) in its root; `extra` jail-exec options go before the program.
pub fn jailed_with(extra: &[&str], program: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args([
        "jail-exec",
        "--pid-ns",
        "--uid",
        JAIL_UID,
        "--gid",
        JAIL_UID,
    ])
    .args(["--keep-exec", "/usr"]);
    for d in ["/bin", "/lib", "/lib64", "/sbin"] {
        match std::fs::read_link(d) {
            Ok(t) => {
                c.arg("--link").arg(format!("{d}={}", t.display()));
            }
            Err(_) if Path::new(d).is_dir() => {
                c.args(["--keep-exec", d]);
            }
            Err(_) => {}
        }
    }
    c.args(extra).arg("--").args(program);
    c
}

/// [`jailed_with`] and nothing more.
pub fn jailed(program: &[&str]) -> Command {
    jailed_with(&[], program)
}
