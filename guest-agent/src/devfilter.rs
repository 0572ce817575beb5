//! The device cgroup of a container under cgroup v2: an eBPF program
//! (`BPF_PROG_TYPE_CGROUP_DEVICE`) attached to the container's cgroup, deciding every
//! open and mknod of a device node, as runc loads one. Without it a container's root,
//! which holds `CAP_MKNOD` by default, could make and open any device of the guest (its
//! disks, `/dev/kmsg`, a TEE's `/dev/sev-guest`).
//!
//! The rules are the spec's `linux.resources.devices` followed by runc's defaults (mknod
//! of any node; the standard character devices and `/dev/pts/*`); a later matching rule
//! wins, no match denies. Our own program generator (a few dozen instructions, no
//! libbpf): each rule is one block that falls through to the next when the request does
//! not match it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType};

/// One rule: device type (`None`: any), major and minor (`None`: any), the access bits
/// it covers (`ACC_*`), allow or deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    pub block: Option<bool>,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    pub access: u32,
    pub allow: bool,
}

const ACC_MKNOD: u32 = 1;
const ACC_READ: u32 = 2;
const ACC_WRITE: u32 = 4;
const DEV_BLOCK: i32 = 1;
const DEV_CHAR: i32 = 2;

/// runc's default rules (`specconv.AllowedDevices`), after the spec's.
pub fn defaults() -> Vec<Rule> {
    let rwm = ACC_MKNOD | ACC_READ | ACC_WRITE;
    let c = |major, minor: Option<u32>| Rule {
        block: Some(false),
        major: Some(major),
        minor,
        access: rwm,
        allow: true,
    };
    let mut v = vec![
        Rule {
            block: Some(false),
            major: None,
            minor: None,
            access: ACC_MKNOD,
            allow: true,
        },
        Rule {
            block: Some(true),
            major: None,
            minor: None,
            access: ACC_MKNOD,
            allow: true,
        },
    ];
    // null, random, full, tty, zero, urandom, ptmx, tun; then every pts.
    for (major, minor) in [
        (1, 3),
        (1, 8),
        (1, 7),
        (5, 0),
        (1, 5),
        (1, 9),
        (5, 2),
        (10, 200),
    ] {
        v.push(c(major, Some(minor)));
    }
    v.push(c(136, None));
    v
}

/// The spec's rules, in order.
pub fn from_spec(rules: &[LinuxDeviceCgroup]) -> Vec<Rule> {
    rules
        .iter()
        .map(|r| {
            let access = r.access().as_deref().unwrap_or("rwm");
            let bits = access.chars().fold(0, |acc, ch| {
                acc | match ch {
                    'm' => ACC_MKNOD,
                    'r' => ACC_READ,
                    'w' => ACC_WRITE,
                    _ => 0,
                }
            });
            Rule {
                block: match r.typ() {
                    Some(LinuxDeviceType::B) => Some(true),
                    Some(LinuxDeviceType::C) | Some(LinuxDeviceType::U) => Some(false),
                    _ => None,
                },
                major: r.major().and_then(|m| u32::try_from(m).ok()),
                minor: r.minor().and_then(|m| u32::try_from(m).ok()),
                access: bits,
                allow: r.allow(),
            }
        })
        .collect()
}

/// One eBPF instruction, as the kernel reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

/// The program for `rules` (later ones win). r2: type, r3: access, r4: major, r5: minor.
fn program(rules: &[Rule]) -> Vec<Insn> {
    const LDX_W: u8 = 0x61;
    const AND32_K: u8 = 0x54;
    const RSH32_K: u8 = 0x74;
    const MOV32_X: u8 = 0xbc;
    const JNE_K: u8 = 0x55;
    const MOV64_K: u8 = 0xb7;
    const EXIT: u8 = 0x95;
    let mut p = vec![
        insn(LDX_W, 2, 1, 0, 0),
        insn(AND32_K, 2, 0, 0, 0xffff),
        insn(LDX_W, 3, 1, 0, 0),
        insn(RSH32_K, 3, 0, 0, 16),
        insn(LDX_W, 4, 1, 4, 0),
        insn(LDX_W, 5, 1, 8, 0),
    ];
    for r in rules.iter().rev() {
        // Each test jumps to the block's end when the request is not this rule's.
        let mut tests: Vec<Insn> = Vec::new();
        if let Some(block) = r.block {
            tests.push(insn(
                JNE_K,
                2,
                0,
                0,
                if block { DEV_BLOCK } else { DEV_CHAR },
            ));
        }
        // Access asked beyond the rule's: not this rule.
        let beyond = !r.access & (ACC_MKNOD | ACC_READ | ACC_WRITE);
        if beyond != 0 {
            tests.push(insn(MOV32_X, 1, 3, 0, 0));
            tests.push(insn(AND32_K, 1, 0, 0, beyond as i32));
            tests.push(insn(JNE_K, 1, 0, 0, 0));
        }
        if let Some(major) = r.major {
            tests.push(insn(JNE_K, 4, 0, 0, major as i32));
        }
        if let Some(minor) = r.minor {
            tests.push(insn(JNE_K, 5, 0, 0, minor as i32));
        }
        let n = tests.len();
        if n == 0 {
            // Matches everything: the rules before it are never reached (and the
            // verifier refuses code that cannot run).
            p.push(insn(MOV64_K, 0, 0, 0, i32::from(r.allow)));
            p.push(insn(EXIT, 0, 0, 0, 0));
            return p;
        }
        for (i, t) in tests.iter_mut().enumerate() {
            if t.code == JNE_K {
                // Past the rest of the tests and the verdict's two instructions.
                t.off = (n - i - 1 + 2) as i16;
            }
        }
        p.extend(tests);
        p.push(insn(MOV64_K, 0, 0, 0, i32::from(r.allow)));
        p.push(insn(EXIT, 0, 0, 0, 0));
    }
    p.push(insn(MOV64_K, 0, 0, 0, 0));
    p.push(insn(EXIT, 0, 0, 0, 0));
    p
}

/// The rules of most containers: a spec that names no device but containerd's deny-all
/// (ctr's and CRI's defaults), then runc's defaults.
fn usual() -> Vec<Rule> {
    let mut rules = vec![Rule {
        block: None,
        major: None,
        minor: None,
        access: ACC_MKNOD | ACC_READ | ACC_WRITE,
        allow: false,
    }];
    rules.extend(defaults());
    rules
}

/// Loads the program for [`usual`] rules ahead of the first container, on a blocking
/// thread while the guest waits for the host's next call: the kernel's verifier runs
/// for the first time then (≈ 14 ms under TCG), not in the create. A create that comes
/// sooner waits for it on [`LOADED`]'s lock and takes the result. Errors are the
/// create's to report.
pub fn preload_usual() {
    if let Err(e) = loaded(program(&usual())) {
        tracing::debug!("the usual device filter was not loaded ahead: {e}");
    }
}

/// Programs loaded so far, newest last, by their instructions. Most containers of a
/// pod have the same rules (the spec names no device, runc's defaults follow), so one
/// loaded program serves them all: a second attach of the same program costs nothing,
/// where a load runs the kernel's verifier (≈ 15 ms of a container's create under TCG).
/// Bounded: a pod whose containers name many different device sets keeps only the last
/// few loaded.
static LOADED: std::sync::Mutex<Vec<(Vec<Insn>, std::sync::Arc<OwnedFd>)>> =
    std::sync::Mutex::new(Vec::new());

/// How many distinct programs [`LOADED`] keeps.
const LOADED_MAX: usize = 8;

/// Loads the program for `rules` (or takes the one loaded before for the same rules)
/// and attaches it to the cgroup at `cgroup`.
pub fn attach(cgroup: &Path, rules: &[Rule]) -> std::io::Result<()> {
    let insns = program(rules);
    let dir = std::fs::File::open(cgroup)?;
    let attached = match attach_prog(&dir, &*loaded(insns.clone())?) {
        // The kernel refuses one program twice on a cgroup (EINVAL): the kept one may be
        // on this cgroup already, one a failed create of the same id left. A fresh copy
        // goes on then, as before programs were kept; any other cause fails it again.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => attach_prog(&dir, &load(&insns)?),
        r => r,
    };
    attached.map_err(|e| std::io::Error::new(e.kind(), format!("attaching it: {e}")))
}

/// BPF_PROG_ATTACH of `prog` to the cgroup `dir`, as a device filter among others.
fn attach_prog(dir: &std::fs::File, prog: &OwnedFd) -> std::io::Result<()> {
    let mut at = [0u32; 8];
    at[0] = dir.as_raw_fd() as u32;
    at[1] = prog.as_raw_fd() as u32;
    // BPF_CGROUP_DEVICE, with BPF_F_ALLOW_MULTI: beside any other program on the cgroup.
    at[2] = 6;
    at[3] = 2;
    // SAFETY: the attr holds no pointer; the attachment holds its own reference to the
    // program.
    unsafe { bpf(BPF_PROG_ATTACH, &at) }.map(drop)
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;

/// The `bpf(2)` command `cmd` with `attr` as its `bpf_attr` (a plain-integer buffer, as
/// far as the command reads it; the rest zero).
///
/// # Safety
/// Every address in `attr` must name memory valid for what `cmd` does with it (read,
/// or written for a log buffer) until the call returns.
unsafe fn bpf<T: Copy>(cmd: libc::c_long, attr: &[T]) -> std::io::Result<libc::c_long> {
    // SAFETY: the kernel reads at most `size_of_val(attr)` bytes of a buffer that lives
    // through the call; the addresses in it are the caller's promise.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

/// The loaded program for `insns`: the one [`LOADED`] has, or a new one it then keeps.
fn loaded(insns: Vec<Insn>) -> std::io::Result<std::sync::Arc<OwnedFd>> {
    let mut cache = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(i) = cache.iter().position(|(k, _)| *k == insns) {
        let hit = cache.remove(i);
        let prog = hit.1.clone();
        cache.push(hit);
        return Ok(prog);
    }
    let prog = std::sync::Arc::new(load(&insns)?);
    if cache.len() >= LOADED_MAX {
        cache.remove(0);
    }
    cache.push((insns, prog.clone()));
    Ok(prog)
}

/// Loads `insns` as a device-cgroup program (the kernel's verifier checks it).
fn load(insns: &[Insn]) -> std::io::Result<OwnedFd> {
    let license = c"Apache-2.0";
    // bpf_attr for BPF_PROG_LOAD, as far as we use it; the rest stays zero.
    let mut load = [0u64; 16];
    // prog_type (u32) | insn_cnt (u32)
    load[0] = 15 | ((insns.len() as u64) << 32);
    load[1] = insns.as_ptr() as u64;
    load[2] = license.as_ptr() as u64;
    // SAFETY: the instructions and the license outlive the call.
    let fd = match unsafe { bpf(BPF_PROG_LOAD, &load) } {
        Ok(fd) => fd,
        Err(e) => {
            // Again with the verifier's log, to say why.
            let mut log = vec![0u8; 16 * 1024];
            // log_level (u32) | log_size (u32); log_buf (outlives the call too).
            load[3] = 1 | ((log.len() as u64) << 32);
            load[4] = log.as_mut_ptr() as u64;
            // SAFETY: as above, and the log buffer outlives the call.
            let _ = unsafe { bpf(BPF_PROG_LOAD, &load) };
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            let why = String::from_utf8_lossy(&log[..end]);
            return Err(std::io::Error::new(
                e.kind(),
                format!("loading the program: {e}: {}", why.trim()),
            ));
        }
    };
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads real programs: needs CAP_BPF (root, as the tests run in CI).
    #[test]
    fn one_program_is_loaded_per_rule_set_and_only_a_few_are_kept() {
        use std::sync::Arc;
        // What containerd's specs ask is what is loaded ahead.
        let deny_all: LinuxDeviceCgroup =
            serde_json::from_value(serde_json::json!({"allow": false, "access": "rwm"})).unwrap();
        let mut asked = from_spec(&[deny_all]);
        asked.extend(defaults());
        preload_usual();
        // Taken by its rules, not as the newest: other tests load programs beside this one.
        let ahead = loaded(program(&usual())).unwrap();
        assert!(Arc::ptr_eq(&ahead, &loaded(program(&asked)).unwrap()));
        let a = loaded(program(&defaults())).unwrap();
        assert!(Arc::ptr_eq(&a, &loaded(program(&defaults())).unwrap()));
        let rule = |major| Rule {
            block: Some(true),
            major: Some(major),
            minor: None,
            access: ACC_READ,
            allow: true,
        };
        let mut more = defaults();
        more.push(rule(8));
        let b = loaded(program(&more)).unwrap();
        assert!(!Arc::ptr_eq(&a, &b));
        assert!(Arc::ptr_eq(&b, &loaded(program(&more)).unwrap()));
        for major in 0..LOADED_MAX as u32 {
            loaded(program(&[rule(1000 + major)])).unwrap();
        }
        assert_eq!(LOADED.lock().unwrap().len(), LOADED_MAX);
        // The oldest were let go: the defaults are loaded afresh.
        assert!(!Arc::ptr_eq(&a, &loaded(program(&defaults())).unwrap()));
    }

    /// A cgroup that a failed create of the same id left already has the kept program:
    /// a second attach of the same rules to it still succeeds. Needs root and cgroup2
    /// (mounted here, on a directory of the test's own).
    #[test]
    fn the_same_rules_attach_twice_to_one_cgroup() {
        use nix::mount::{mount, umount2, MntFlags, MsFlags};
        let root = tempfile::tempdir().unwrap();
        mount(
            Some("cgroup2"),
            root.path(),
            Some("cgroup2"),
            MsFlags::empty(),
            None::<&str>,
        )
        .expect("mounting cgroup2 (the test needs root)");
        let cg = root
            .path()
            .join(format!("cocoon-devfilter-test-{}", std::process::id()));
        std::fs::create_dir(&cg).unwrap();
        let result = (|| -> std::io::Result<()> {
            attach(&cg, &defaults())?;
            attach(&cg, &defaults())?;
            let mut more = defaults();
            more.push(Rule {
                block: Some(true),
                major: Some(8),
                minor: None,
                access: ACC_READ,
                allow: true,
            });
            attach(&cg, &more)
        })();
        let _ = std::fs::remove_dir(&cg);
        let _ = umount2(root.path(), MntFlags::MNT_DETACH);
        result.unwrap();
    }

    /// A program the verifier refuses is an error quoting the verifier's reason (the
    /// second load, with its log). Needs root.
    #[test]
    fn a_refused_program_says_why() {
        // r0 = r1: a pointer returned where a device program must return a number.
        let bad = [insn(0xbf, 0, 1, 0, 0), insn(0x95, 0, 0, 0, 0)];
        let e = load(&bad).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("loading the program: "), "{msg}");
        assert!(msg.contains("R0"), "the verifier's log: {msg}");
    }

    #[test]
    fn each_rule_is_a_block_whose_tests_skip_to_its_end() {
        let rules = [Rule {
            block: Some(false),
            major: Some(1),
            minor: Some(3),
            access: ACC_READ | ACC_WRITE,
            allow: true,
        }];
        let p = program(&rules);
        // 6 loads, type test, 3 for access, major, minor, verdict (2), default (2).
        assert_eq!(p.len(), 6 + 1 + 3 + 1 + 1 + 2 + 2);
        let jumps: Vec<i16> = p.iter().filter(|i| i.code == 0x55).map(|i| i.off).collect();
        // From each test, past the tests left and the verdict: to the default.
        assert_eq!(jumps, [7, 4, 3, 2]);
        assert_eq!(p[12], insn(0xb7, 0, 0, 0, 1));
        assert_eq!(p[14], insn(0xb7, 0, 0, 0, 0));
    }

    #[test]
    fn later_rules_are_tested_first() {
        let deny = Rule {
            block: None,
            major: None,
            minor: None,
            access: 7,
            allow: false,
        };
        let allow_null = Rule {
            block: Some(false),
            major: Some(1),
            minor: Some(3),
            access: 7,
            allow: true,
        };
        let p = program(&[deny, allow_null]);
        // The first verdict after the loads is allow_null's.
        let first = p.iter().position(|i| i.code == 0xb7).unwrap();
        assert_eq!(p[first].imm, 1);
        assert_eq!(from_spec(&[]), vec![]);
        assert!(defaults()
            .iter()
            .any(|r| r.major == Some(136) && r.minor.is_none()));
    }
}
