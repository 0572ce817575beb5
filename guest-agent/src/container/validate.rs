//! What runc refuses in a spec before it runs anything, refused here at CreateContainer
//! and ExecProcess with the reason, so that a process never runs as something other
//! than asked. A uid of 4294967295 is the case that matters most: `setresuid(-1)` means
//! "leave it", so the process would have run as root.

use std::collections::HashSet;

use oci_spec::runtime::{LinuxNamespaceType, LinuxSchedulerPolicy, Process, Spec};
use thiserror::Error;

/// The largest uid or gid runc accepts (the kernel's ids are unsigned, but -1 means
/// "unchanged" to the set*id calls and an overflowid stands for unmapped ids).
const MAX_ID: u32 = i32::MAX as u32;

#[derive(Debug, Error, PartialEq)]
pub enum ValidateError {
    #[error("the OCI spec needs process and root")]
    NoProcess,
    #[error("the process has no args")]
    NoArgs,
    #[error("the process's working directory {0:?} is not an absolute path")]
    RelativeCwd(std::path::PathBuf),
    #[error("{0} {1} is out of range (0-{MAX_ID})")]
    IdOutOfRange(&'static str, u32),
    #[error("environment entry {0:?} has no '='")]
    EnvNoEquals(String),
    #[error("environment entry {0:?} has no name")]
    EnvNoName(String),
    #[error("environment entry {0:?} has a NUL byte")]
    EnvNul(String),
    #[error("the {0:?} namespace is named twice")]
    NamespaceTwice(LinuxNamespaceType),
    #[error("process.scheduler: {0}")]
    Scheduler(&'static str),
    #[error("process.ioPriority.priority {0} is out of range (0-7)")]
    IoPriority(i64),
    #[error("invalid intelRdt.ClosID {0:?}")]
    ClosId(String),
    #[error("intelRdt.{0} is specified in config, but Intel RDT is not enabled (a pod VM has no resctrl)")]
    IntelRdt(&'static str),
}

/// A process's args, working directory, identity and environment.
pub fn process(p: &Process) -> Result<(), ValidateError> {
    if p.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(ValidateError::NoArgs);
    }
    if !p.cwd().is_absolute() {
        return Err(ValidateError::RelativeCwd(p.cwd().clone()));
    }
    let user = p.user();
    let ids = [("uid", user.uid()), ("gid", user.gid())]
        .into_iter()
        .chain(
            user.additional_gids()
                .iter()
                .flatten()
                .map(|g| ("additional gid", *g)),
        );
    for (what, id) in ids {
        if id > MAX_ID {
            return Err(ValidateError::IdOutOfRange(what, id));
        }
    }
    for entry in p.env().iter().flatten() {
        env_entry(entry)?;
    }
    if let Some(io) = p.io_priority() {
        if !(0..=7).contains(&io.priority()) {
            return Err(ValidateError::IoPriority(io.priority()));
        }
    }
    p.scheduler().as_ref().map_or(Ok(()), scheduler)
}

/// runc 1.2's checks of `process.scheduler`, with its reasons.
fn scheduler(s: &oci_spec::runtime::Scheduler) -> Result<(), ValidateError> {
    use LinuxSchedulerPolicy::*;
    let refuse = |why| Err(ValidateError::Scheduler(why));
    if s.nice().is_some_and(|n| !(-20..=19).contains(&n)) {
        return refuse("nice is out of range (-20 to 19)");
    }
    let priority = s.priority().unwrap_or(0);
    if priority != 0 && !matches!(s.policy(), SchedFifo | SchedRr) {
        return refuse("priority can only be given for SCHED_FIFO or SCHED_RR");
    }
    if !(0..=99).contains(&priority) {
        return refuse("priority is out of range (0-99)");
    }
    let deadline = [s.runtime(), s.deadline(), s.period()];
    if *s.policy() != SchedDeadline && deadline.iter().any(|v| v.is_some_and(|v| v != 0)) {
        return refuse("runtime, deadline and period can only be given for SCHED_DEADLINE");
    }
    Ok(())
}

fn env_entry(entry: &str) -> Result<(), ValidateError> {
    let Some((name, _)) = entry.split_once('=') else {
        return Err(ValidateError::EnvNoEquals(entry.into()));
    };
    if name.is_empty() {
        return Err(ValidateError::EnvNoName(entry.into()));
    }
    if entry.contains('\0') {
        return Err(ValidateError::EnvNul(entry.into()));
    }
    Ok(())
}

/// A spec's process, and namespaces named once each.
pub fn spec(spec: &Spec) -> Result<(), ValidateError> {
    let process_spec = spec.process().as_ref().ok_or(ValidateError::NoProcess)?;
    process(process_spec)?;
    let namespaces = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_deref())
        .unwrap_or_default();
    let mut seen = HashSet::new();
    for n in namespaces {
        if !seen.insert(n.typ()) {
            return Err(ValidateError::NamespaceTwice(n.typ()));
        }
    }
    spec.linux()
        .as_ref()
        .and_then(|l| l.intel_rdt().as_ref())
        .map_or(Ok(()), intel_rdt)
}

/// runc's checks of `linux.intelRdt` on a host without resctrl, as a pod VM is: a
/// class of service alone is taken (and means nothing there), a schema is refused.
fn intel_rdt(rdt: &oci_spec::runtime::LinuxIntelRdt) -> Result<(), ValidateError> {
    if let Some(id) = rdt.clos_id() {
        if id == "." || id == ".." || id.contains('/') {
            return Err(ValidateError::ClosId(id.clone()));
        }
    }
    let given = |s: &Option<String>| s.as_ref().is_some_and(|s| !s.is_empty());
    if given(rdt.l3_cache_schema()) {
        return Err(ValidateError::IntelRdt("l3CacheSchema"));
    }
    if given(rdt.mem_bw_schema()) {
        return Err(ValidateError::IntelRdt("memBwSchema"));
    }
    if rdt.schemata().as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ValidateError::IntelRdt("schemata"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proc(edit: serde_json::Value) -> Process {
        let mut p = serde_json::json!({
            "args": ["true"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}
        });
        for (k, v) in edit.as_object().unwrap() {
            p[k] = v.clone();
        }
        serde_json::from_value(p).unwrap()
    }

    #[test]
    fn what_runc_refuses_in_a_process_is_refused_naming_it() {
        assert_eq!(process(&proc(serde_json::json!({}))), Ok(()));
        let refused = |edit, words: &str| {
            let e = process(&proc(edit)).unwrap_err().to_string();
            assert!(e.contains(words), "{e}");
        };
        refused(serde_json::json!({"args": []}), "no args");
        refused(
            serde_json::json!({"cwd": "tmp"}),
            "\"tmp\" is not an absolute",
        );
        refused(
            serde_json::json!({"user": {"uid": 4294967295u32, "gid": 0}}),
            "uid 4294967295 is out of range",
        );
        refused(
            serde_json::json!({"user": {"uid": 0, "gid": 2147483648u32}}),
            "gid 2147483648",
        );
        refused(
            serde_json::json!({"user": {"uid": 0, "gid": 0, "additionalGids": [5, 4294967295u32]}}),
            "additional gid 4294967295",
        );
        refused(
            serde_json::json!({"env": ["PATH=/bin", "NOEQUALS"]}),
            "\"NOEQUALS\" has no '='",
        );
        refused(serde_json::json!({"env": ["=x"]}), "has no name");
        refused(serde_json::json!({"env": ["A=b\u{0}c"]}), "NUL");
        // The largest id runc takes, an empty value and '=' in a value are fine.
        let ok = proc(serde_json::json!({
            "user": {"uid": 2147483647u32, "gid": 2147483647u32},
            "env": ["B=", "C=x=y"]
        }));
        assert_eq!(process(&ok), Ok(()));
    }

    #[test]
    fn scheduling_runc_would_refuse_is_refused_naming_it() {
        let refused = |edit, words: &str| {
            let e = process(&proc(edit)).unwrap_err().to_string();
            assert!(e.contains(words), "{e}");
        };
        let sched = |s| serde_json::json!({ "scheduler": s });
        refused(
            sched(serde_json::json!({"policy": "SCHED_OTHER", "nice": 20})),
            "nice is out of range",
        );
        refused(
            sched(serde_json::json!({"policy": "SCHED_BATCH", "priority": 1})),
            "only be given for SCHED_FIFO or SCHED_RR",
        );
        refused(
            sched(serde_json::json!({"policy": "SCHED_FIFO", "priority": 100})),
            "priority is out of range",
        );
        refused(
            sched(serde_json::json!({"policy": "SCHED_RR", "period": 5})),
            "only be given for SCHED_DEADLINE",
        );
        refused(
            serde_json::json!({"ioPriority": {"class": "IOPRIO_CLASS_BE", "priority": 8}}),
            "ioPriority.priority 8 is out of range",
        );
        for ok in [
            sched(serde_json::json!({"policy": "SCHED_FIFO", "priority": 99, "nice": -20})),
            sched(serde_json::json!({"policy": "SCHED_DEADLINE", "runtime": 1, "period": 2})),
            serde_json::json!({"ioPriority": {"class": "IOPRIO_CLASS_IDLE", "priority": 0}}),
        ] {
            assert_eq!(process(&proc(ok.clone())), Ok(()), "{ok}");
        }
    }

    #[test]
    fn a_namespace_named_twice_is_refused() {
        let spec = |ns: serde_json::Value| -> Spec {
            serde_json::from_value(serde_json::json!({
                "ociVersion": "1.0.2",
                "root": {"path": "rootfs"},
                "process": {"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
                "linux": {"namespaces": ns},
            }))
            .unwrap()
        };
        assert_eq!(
            super::spec(&spec(
                serde_json::json!([{"type": "pid"}, {"type": "mount"}])
            )),
            Ok(())
        );
        assert_eq!(
            super::spec(&spec(serde_json::json!([{"type": "pid"}, {"type": "pid"}]))),
            Err(ValidateError::NamespaceTwice(LinuxNamespaceType::Pid))
        );
    }

    #[test]
    fn intel_rdt_is_held_to_runcs_checks_without_resctrl() {
        let check = |rdt: serde_json::Value| {
            let spec: Spec = serde_json::from_value(serde_json::json!({
                "ociVersion": "1.0.2",
                "root": {"path": "rootfs"},
                "process": {"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
                "linux": {"intelRdt": rdt},
            }))
            .unwrap();
            super::spec(&spec).map_err(|e| e.to_string())
        };
        assert_eq!(check(serde_json::json!({"closID": "gold"})), Ok(()));
        assert_eq!(check(serde_json::json!({})), Ok(()));
        let refused = |rdt, words: &str| {
            let e = check(rdt).unwrap_err();
            assert!(e.contains(words), "{e}");
        };
        refused(
            serde_json::json!({"closID": "a/b"}),
            "invalid intelRdt.ClosID \"a/b\"",
        );
        refused(
            serde_json::json!({"closID": ".."}),
            "invalid intelRdt.ClosID",
        );
        refused(
            serde_json::json!({"l3CacheSchema": "L3:0=ff"}),
            "intelRdt.l3CacheSchema is specified in config, but Intel RDT",
        );
        refused(
            serde_json::json!({"memBwSchema": "MB:0=20"}),
            "intelRdt.memBwSchema is specified",
        );
        refused(
            serde_json::json!({"schemata": ["L3:0=f"]}),
            "intelRdt.schemata",
        );
    }
}
