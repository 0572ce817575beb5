//! What runc refuses in a spec before it runs anything, refused here at CreateContainer
//! and ExecProcess with the reason, so that a process never runs as something other
//! than asked. A uid of 4294967295 is the case that matters most: `setresuid(-1)` means
//! "leave it", so the process would have run as root.

use std::collections::HashSet;

use oci_spec::runtime::{LinuxNamespaceType, Process, Spec};
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
}
