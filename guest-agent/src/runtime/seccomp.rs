//! OCI seccomp profiles to BPF, through seccompiler's backend.
//!
//! seccompiler builds filters with one match action, while an OCI profile
//! gives each rule its own. The profile becomes a stack of filters; the
//! kernel runs all of them and keeps the most restrictive verdict:
//! - a base filter allows every syscall some rule names (with its argument
//!   conditions) and answers the default action for everything else;
//! - one filter per other action answers that action for its rules and
//!   allows the rest.
//!
//! A syscall matched by an `SCMP_ACT_ERRNO(ENOSYS)` rule thus gets ENOSYS
//! (base: allow, its filter: errno), an unnamed one the default action.
//! Unknown syscall names are skipped, as libseccomp-based runtimes do.
//!
//! Architecture: seccompiler's filters kill any process making a syscall
//! through another ABI (i386), and x32 syscalls (the x86_64 ABI with bit 30
//! set in the number) would match no rule, so one more filter refuses them
//! with ENOSYS; a deny-list profile cannot be bypassed through x32.

use std::collections::BTreeMap;

use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator, LinuxSyscall};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use thiserror::Error;

use super::syscalls_x86_64::SYSCALLS;

#[derive(Debug, Error)]
pub enum SeccompError {
    #[error("seccomp action {0:?} is not supported")]
    Action(LinuxSeccompAction),
    #[error("cannot build the seccomp filter")]
    Build(#[from] seccompiler::BackendError),
    #[error("cannot install the seccomp filter")]
    Install(#[source] std::io::Error),
}

/// The syscall number of `name` on this architecture.
pub fn syscall_nr(name: &str) -> Option<i64> {
    SYSCALLS.iter().find(|(n, _)| *n == name).map(|(_, nr)| *nr)
}

fn action(
    a: LinuxSeccompAction,
    errno: Option<u32>,
    default_errno: Option<u32>,
) -> Result<SeccompAction, SeccompError> {
    Ok(match a {
        LinuxSeccompAction::ScmpActAllow => SeccompAction::Allow,
        LinuxSeccompAction::ScmpActErrno => {
            SeccompAction::Errno(errno.or(default_errno).unwrap_or(libc::EPERM as u32))
        }
        // libseccomp's SCMP_ACT_KILL is the thread variant.
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            SeccompAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => SeccompAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => SeccompAction::Trap,
        LinuxSeccompAction::ScmpActTrace => SeccompAction::Trace(errno.unwrap_or(0)),
        LinuxSeccompAction::ScmpActLog => SeccompAction::Log,
        other => return Err(SeccompError::Action(other)),
    })
}

/// The argument conditions of one OCI rule (all must hold), or `None` when
/// the rule matches the syscall unconditionally.
fn conditions(s: &LinuxSyscall) -> Result<Option<SeccompRule>, SeccompError> {
    let Some(args) = s.args().as_ref().filter(|a| !a.is_empty()) else {
        return Ok(None);
    };
    let mut conds = Vec::new();
    for a in args {
        let (op, value) = match a.op() {
            LinuxSeccompOperator::ScmpCmpNe => (SeccompCmpOp::Ne, a.value()),
            LinuxSeccompOperator::ScmpCmpLt => (SeccompCmpOp::Lt, a.value()),
            LinuxSeccompOperator::ScmpCmpLe => (SeccompCmpOp::Le, a.value()),
            LinuxSeccompOperator::ScmpCmpEq => (SeccompCmpOp::Eq, a.value()),
            LinuxSeccompOperator::ScmpCmpGe => (SeccompCmpOp::Ge, a.value()),
            LinuxSeccompOperator::ScmpCmpGt => (SeccompCmpOp::Gt, a.value()),
            // libseccomp: (arg & value) == valueTwo.
            LinuxSeccompOperator::ScmpCmpMaskedEq => (
                SeccompCmpOp::MaskedEq(a.value()),
                a.value_two().unwrap_or(0),
            ),
        };
        conds.push(SeccompCondition::new(
            a.index() as u8,
            SeccompCmpArgLen::Qword,
            op,
            value,
        )?);
    }
    Ok(Some(SeccompRule::new(conds)?))
}

/// syscall number -> rules; an empty list matches unconditionally.
type RuleMap = BTreeMap<i64, Vec<SeccompRule>>;

fn add_rules(map: &mut RuleMap, s: &LinuxSyscall) -> Result<(), SeccompError> {
    let rule = conditions(s)?;
    for name in s.names() {
        let Some(nr) = syscall_nr(name) else {
            continue;
        };
        match (&rule, map.get_mut(&nr)) {
            // Already unconditional: stays so.
            (_, Some(rules)) if rules.is_empty() => {}
            (None, Some(rules)) => rules.clear(),
            (Some(r), Some(rules)) => rules.push(r.clone()),
            (None, None) => {
                map.insert(nr, Vec::new());
            }
            (Some(r), None) => {
                map.insert(nr, vec![r.clone()]);
            }
        }
    }
    Ok(())
}

/// Compiles a profile into filters to install in order.
pub fn compile(profile: &LinuxSeccomp) -> Result<Vec<BpfProgram>, SeccompError> {
    let default_errno = profile.default_errno_ret();
    let default = action(profile.default_action(), None, default_errno)?;
    let mut base = RuleMap::new();
    let mut by_action: Vec<(SeccompAction, RuleMap)> = Vec::new();
    for s in profile.syscalls().iter().flatten() {
        let act = action(s.action(), s.errno_ret(), default_errno)?;
        add_rules(&mut base, s)?;
        if act == SeccompAction::Allow {
            continue;
        }
        let idx = match by_action.iter().position(|(a, _)| *a == act) {
            Some(i) => i,
            None => {
                by_action.push((act.clone(), RuleMap::new()));
                by_action.len() - 1
            }
        };
        add_rules(&mut by_action[idx].1, s)?;
    }
    let arch = TargetArch::x86_64;
    let mut out = vec![refuse_x32()];
    if default != SeccompAction::Allow {
        let f = SeccompFilter::new(base, default, SeccompAction::Allow, arch)?;
        out.push(f.try_into()?);
    }
    for (act, rules) in by_action {
        if rules.is_empty() {
            continue;
        }
        let f = SeccompFilter::new(rules, SeccompAction::Allow, act, arch)?;
        out.push(f.try_into()?);
    }
    Ok(out)
}

/// `nr & __X32_SYSCALL_BIT` -> ENOSYS, else allow.
fn refuse_x32() -> BpfProgram {
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    let stmt = |code: u32, k: u32| seccompiler::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    vec![
        // seccomp_data.nr is at offset 0.
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0),
        seccompiler::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: X32_SYSCALL_BIT,
        },
        stmt(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        ),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ]
}

/// Installs the filters on the calling thread (no_new_privileges or
/// CAP_SYS_ADMIN required). Unlike seccompiler's own `apply_filter`, this
/// does not force no_new_privileges on.
pub fn install(filters: &[BpfProgram]) -> Result<(), SeccompError> {
    for f in filters {
        let prog = libc::sock_fprog {
            len: f.len() as u16,
            filter: f.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: the kernel copies the program from `prog`, which points at
        // `f`'s instructions; both outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &prog as *const libc::sock_fprog,
            )
        };
        if rc != 0 {
            return Err(SeccompError::Install(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: &str) -> LinuxSeccomp {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn names_resolve() {
        assert_eq!(syscall_nr("read"), Some(0));
        assert_eq!(syscall_nr("clone3"), Some(435));
        assert_eq!(syscall_nr("no_such_call"), None);
    }

    #[test]
    fn allow_list_with_an_errno_override_makes_two_filters() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":1,
                "syscalls":[
                  {"names":["read","write","exit_group","bogus_call"],"action":"SCMP_ACT_ALLOW"},
                  {"names":["personality"],"action":"SCMP_ACT_ALLOW",
                   "args":[{"index":0,"value":8,"op":"SCMP_CMP_EQ"}]},
                  {"names":["clone"],"action":"SCMP_ACT_ALLOW",
                   "args":[{"index":0,"value":2114060288,"valueTwo":0,"op":"SCMP_CMP_MASKED_EQ"}]},
                  {"names":["clone3"],"action":"SCMP_ACT_ERRNO","errnoRet":38}
                ]}"#,
        );
        let filters = compile(&p).unwrap();
        // x32 guard, base, errno(ENOSYS) for clone3.
        assert_eq!(filters.len(), 3);
        assert!(filters.iter().all(|f| !f.is_empty()));
    }

    #[test]
    fn a_docker_sized_profile_fits_the_bpf_limit() {
        // Every known syscall allowed, a few with argument filters, as in
        // the Docker/containerd default profiles (about 350 names).
        let names: Vec<&str> = SYSCALLS.iter().map(|(n, _)| *n).collect();
        let p = profile(&format!(
            r#"{{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[
                {{"names":{names:?},"action":"SCMP_ACT_ALLOW"}},
                {{"names":["personality"],"action":"SCMP_ACT_ALLOW",
                  "args":[{{"index":0,"value":0,"op":"SCMP_CMP_EQ"}}]}},
                {{"names":["personality"],"action":"SCMP_ACT_ALLOW",
                  "args":[{{"index":0,"value":8,"op":"SCMP_CMP_EQ"}}]}},
                {{"names":["socket"],"action":"SCMP_ACT_ERRNO","errnoRet":97,
                  "args":[{{"index":0,"value":40,"op":"SCMP_CMP_EQ"}}]}}
            ]}}"#
        ));
        let filters = compile(&p).unwrap();
        assert_eq!(filters.len(), 3);
        // BPF_MAXINSNS: the kernel refuses longer programs.
        assert!(
            filters.iter().all(|f| f.len() <= 4096),
            "{:?}",
            filters.iter().map(|f| f.len()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn deny_list_makes_one_filter() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW",
                "syscalls":[{"names":["mount","umount2"],"action":"SCMP_ACT_ERRNO"}]}"#,
        );
        assert_eq!(compile(&p).unwrap().len(), 2);
    }

    #[test]
    fn notify_is_refused() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW",
                "syscalls":[{"names":["mount"],"action":"SCMP_ACT_NOTIFY"}]}"#,
        );
        assert!(matches!(compile(&p), Err(SeccompError::Action(_))));
    }

    #[test]
    fn filters_take_effect_in_a_child() {
        // Forking a test process is fine: the child only makes raw syscalls.
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW",
                "syscalls":[{"names":["getppid"],"action":"SCMP_ACT_ERRNO","errnoRet":38}]}"#,
        );
        let filters = compile(&p).unwrap();
        // SAFETY: the child calls only prctl, seccomp, getppid and _exit.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                // SAFETY: plain integer prctl.
                unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
                let ok = install(&filters).is_ok();
                // SAFETY: getppid has no arguments.
                let r = unsafe { libc::syscall(libc::SYS_getppid) };
                let errno = std::io::Error::last_os_error().raw_os_error();
                let code = if ok && r == -1 && errno == Some(38) {
                    0
                } else {
                    1
                };
                // SAFETY: _exit ends the forked child without running the
                // parent's atexit handlers.
                unsafe { libc::_exit(code) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                let st = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(st, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
    }
}
