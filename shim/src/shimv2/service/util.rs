//! Small helpers of the task service: ttrpc errors, process lookup, timestamps, the
//! bundle's spec.

use std::collections::HashMap;

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;

use super::{Container, Process};
use crate::agent_client::AgentError;

pub(super) use crate::chain;

pub(super) fn err(code: ttrpc::Code, msg: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

/// Runs `call` to its end even if its caller goes. ttrpc drops a handler's future when
/// the call's deadline passes or its connection closes, and containerd gives Shutdown
/// 3 s, then closes the connection: a teardown cut there left the pod's share and
/// cgroup behind (and a shim that never exited). A task of its own is not dropped
/// with the handler.
pub(super) async fn to_completion<T: Send + 'static>(
    call: impl std::future::Future<Output = ttrpc::Result<T>> + Send + 'static,
) -> ttrpc::Result<T> {
    tokio::spawn(call)
        .await
        .unwrap_or_else(|e| Err(err(ttrpc::Code::INTERNAL, format!("the call failed: {e}"))))
}

pub(super) fn not_found(what: &str) -> ttrpc::Error {
    err(ttrpc::Code::NOT_FOUND, format!("{what} not found"))
}

pub(super) fn agent_err(e: AgentError) -> ttrpc::Error {
    let code = match &e {
        AgentError::Rpc { code, .. } if code == "NOT_FOUND" => ttrpc::Code::NOT_FOUND,
        AgentError::Rpc { code, .. } if code == "INVALID_ARGUMENT" => ttrpc::Code::INVALID_ARGUMENT,
        AgentError::Rpc { code, .. } if code == "FAILED_PRECONDITION" => {
            ttrpc::Code::FAILED_PRECONDITION
        }
        AgentError::CallTimeout { .. } => ttrpc::Code::DEADLINE_EXCEEDED,
        AgentError::Disconnected { .. } => ttrpc::Code::UNAVAILABLE,
        _ => ttrpc::Code::INTERNAL,
    };
    err(code, e)
}

/// Container `id` and its process `exec_id` ("" for the container's init).
pub(super) fn lookup<'a>(
    containers: &'a HashMap<String, Container>,
    id: &str,
    exec_id: &str,
) -> Result<(&'a Container, &'a Process), ttrpc::Error> {
    let c = containers
        .get(id)
        .ok_or_else(|| not_found(&format!("container {id}")))?;
    let p = if exec_id.is_empty() {
        Some(&c.init)
    } else {
        c.execs.get(exec_id)
    };
    let p = p.ok_or_else(|| not_found(&format!("exec {exec_id}")))?;
    Ok((c, p))
}

pub(super) fn now() -> Timestamp {
    ts_from_ns(unix_ns_now())
}

/// The host's clock, in ns since the epoch.
pub(super) fn unix_ns_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// The exit status a guest reported, as containerd takes it: what a process can exit
/// with (a code, or 128 + a signal) is 0..=255; anything else from the guest is
/// reported as 255, containerd's unknown status, and logged.
pub(super) fn exit_status(cid: &str, exec_id: &str, status: i32) -> u32 {
    match u8::try_from(status) {
        Ok(s) => u32::from(s),
        Err(_) => {
            tracing::warn!(container = %cid, exec = %exec_id, "the guest reported exit status {status}; reporting 255");
            255
        }
    }
}

/// How far before its watch began a process's exit may be dated: the guest's clock
/// may run a little behind the host's.
const EXIT_CLOCK_SKEW_NS: i64 = 60_000_000_000;

/// The exit time a guest reported, if it falls between a minute before the exit was
/// watched for (`watched_from`, the host's clock) and now; the host's now otherwise. A
/// guest's clock cannot date an exit in 1970 or 2262.
pub(super) fn exit_time(exited_at_ns: i64, watched_from: i64) -> Timestamp {
    let now = unix_ns_now();
    let earliest = watched_from.saturating_sub(EXIT_CLOCK_SKEW_NS);
    if (earliest..=now).contains(&exited_at_ns) {
        ts_from_ns(exited_at_ns)
    } else {
        ts_from_ns(now)
    }
}

pub(super) fn ts_from_ns(ns: i64) -> Timestamp {
    let mut t = Timestamp::new();
    t.seconds = ns.div_euclid(1_000_000_000);
    t.nanos = ns.rem_euclid(1_000_000_000) as i32;
    t
}

/// The OCI spec containerd wrote to the bundle, parsed strictly.
pub(super) fn read_spec(bundle: &std::path::Path) -> Result<oci_spec::runtime::Spec, ttrpc::Error> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path).map_err(|e| {
        err(
            ttrpc::Code::INVALID_ARGUMENT,
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    let malformed = |e: serde_json::Error| {
        err(
            ttrpc::Code::INVALID_ARGUMENT,
            format!("malformed OCI spec {}: {e}", path.display()),
        )
    };
    let mut spec: serde_json::Value = serde_json::from_slice(&text).map_err(malformed)?;
    if let Some(process) = spec.get_mut("process") {
        drop_unknown_capabilities(process);
        spell_scheduler_flags(process);
    }
    serde_json::from_value(spec).map_err(malformed)
}

/// An exec's process spec, parsed strictly but for capability names.
pub(super) fn parse_process(json: &[u8]) -> Result<oci_spec::runtime::Process, ttrpc::Error> {
    let malformed = |e: serde_json::Error| {
        err(
            ttrpc::Code::INVALID_ARGUMENT,
            format!("malformed OCI process spec: {e}"),
        )
    };
    let mut process: serde_json::Value = serde_json::from_slice(json).map_err(malformed)?;
    drop_unknown_capabilities(&mut process);
    spell_scheduler_flags(&mut process);
    serde_json::from_value(process).map_err(malformed)
}

/// oci-spec 0.10 spells two of the runtime spec's `process.scheduler.flags` its own
/// way (`SCHED_RESET_ON_FORK`, `SCHED_FLAG_D_L_OVERRUN`), and would refuse the spec's
/// names, which runc takes. They are renamed to oci-spec's before it parses them; the
/// agent parses them with the same crate.
fn spell_scheduler_flags(process: &mut serde_json::Value) {
    let Some(flags) = process
        .pointer_mut("/scheduler/flags")
        .and_then(|f| f.as_array_mut())
    else {
        return;
    };
    for f in flags {
        let ours = match f.as_str() {
            Some("SCHED_FLAG_RESET_ON_FORK") => "SCHED_RESET_ON_FORK",
            Some("SCHED_FLAG_DL_OVERRUN") => "SCHED_FLAG_D_L_OVERRUN",
            _ => continue,
        };
        *f = ours.into();
    }
}

/// runc skips capability names it does not know (a newer kernel's, a misspelt one in a
/// pod's `capabilities.add`) with a warning, and runs the container; oci-spec would
/// refuse the whole spec. They are dropped here the same way, each logged.
fn drop_unknown_capabilities(process: &mut serde_json::Value) {
    let Some(sets) = process
        .get_mut("capabilities")
        .and_then(|c| c.as_object_mut())
    else {
        return;
    };
    for (set, names) in sets.iter_mut() {
        let Some(names) = names.as_array_mut() else {
            continue;
        };
        // Only names: anything else (a number, a null) is left for the parser to refuse.
        names.retain(|name| {
            let known = !name.is_string()
                || serde_json::from_value::<oci_spec::runtime::Capability>(name.clone()).is_ok();
            if !known {
                tracing::warn!(set = %set, capability = %name, "unknown capability ignored, as runc does");
            }
            known
        });
    }
}

/// The type runc's shim describes an exec's process with in a Pids reply, and which
/// `ctr task ps` prints: `containerd.runc.v1.ProcessDetails { string exec_id = 1; }`.
pub(super) const PROCESS_DETAILS: &str = "containerd.runc.v1.ProcessDetails";

/// A Pids entry's `info` for the process of exec `exec_id`, as runc's shim writes it.
pub(super) fn process_details(exec_id: &str) -> Any {
    use containerd_shim::protos::protobuf::CodedOutputStream;
    let mut value = Vec::with_capacity(exec_id.len() + 6);
    let mut out = CodedOutputStream::vec(&mut value);
    // Writing to a Vec cannot fail.
    let _ = out.write_string(1, exec_id).and_then(|()| out.flush());
    drop(out);
    let mut any = Any::new();
    any.type_url = PROCESS_DETAILS.into();
    any.value = value;
    any
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a guest reports of an exit is held to what a process can exit with and
    /// when: statuses outside 0..=255 read as 255, dates outside [a minute before the
    /// watch, now] as the host's now.
    #[test]
    fn a_guests_exit_status_and_time_are_held_to_what_can_be() {
        assert_eq!(exit_status("c", "", 0), 0);
        assert_eq!(exit_status("c", "", 137), 137);
        assert_eq!(exit_status("c", "", 255), 255);
        for bad in [-1, 256, i32::MAX, i32::MIN] {
            assert_eq!(exit_status("c", "e", bad), 255, "{bad}");
        }
        let watched = unix_ns_now();
        let fine = watched - 1_000_000_000;
        assert_eq!(
            exit_time(fine, watched).seconds,
            fine.div_euclid(1_000_000_000)
        );
        for bad in [0, -5, watched - 2 * EXIT_CLOCK_SKEW_NS, i64::MAX] {
            let t = exit_time(bad, watched);
            assert!(
                (watched / 1_000_000_000..=unix_ns_now() / 1_000_000_000).contains(&t.seconds),
                "{bad} gave {}",
                t.seconds
            );
        }
    }

    #[test]
    fn unknown_capabilities_are_dropped_as_runc_drops_them() {
        let json = serde_json::json!({
            "args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0},
            "capabilities": {
                "bounding": ["CAP_CHOWN", "CAP_FOO", "CAP_NET_RAW"],
                "effective": ["CAP_BAR"],
            }
        });
        let p = parse_process(&serde_json::to_vec(&json).unwrap()).unwrap();
        let caps = p.capabilities().as_ref().unwrap();
        let names = |s: &Option<oci_spec::runtime::Capabilities>| {
            let mut v: Vec<String> = s.iter().flatten().map(|c| c.to_string()).collect();
            v.sort();
            v
        };
        assert_eq!(names(caps.bounding()), ["CHOWN", "NET_RAW"]);
        assert!(names(caps.effective()).is_empty());
        // Anything else malformed is still refused, a capability that is no name too.
        let bad = serde_json::json!({"args": ["true"], "cwd": "/", "user": {"uid": "x"}});
        let e = parse_process(&serde_json::to_vec(&bad).unwrap()).unwrap_err();
        assert!(e.to_string().contains("malformed OCI process spec"), "{e}");
        let mut not_a_name = json.clone();
        not_a_name["capabilities"]["bounding"] = serde_json::json!(["CAP_CHOWN", 5]);
        assert!(parse_process(&serde_json::to_vec(&not_a_name).unwrap()).is_err());
    }

    #[test]
    fn the_runtime_specs_scheduler_flags_are_taken() {
        let json = serde_json::json!({
            "args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0},
            "scheduler": {"policy": "SCHED_DEADLINE", "flags": [
                "SCHED_FLAG_RESET_ON_FORK", "SCHED_FLAG_RECLAIM", "SCHED_FLAG_DL_OVERRUN"
            ]}
        });
        let p = parse_process(&serde_json::to_vec(&json).unwrap()).unwrap();
        use oci_spec::runtime::LinuxSchedulerFlag::*;
        assert_eq!(
            p.scheduler().as_ref().unwrap().flags().as_deref(),
            Some(&[SchedResetOnFork, SchedFlagReclaim, SchedFlagDLOverrun][..])
        );
    }

    #[test]
    fn exec_details_are_runcs_message() {
        let any = process_details("e3");
        assert_eq!(any.type_url, "containerd.runc.v1.ProcessDetails");
        // Field 1, length-delimited, two bytes.
        assert_eq!(any.value, b"\x0a\x02e3");
        let long = "x".repeat(200);
        let v = process_details(&long).value;
        assert_eq!(&v[..3], &[0x0a, 0xc8, 0x01], "a two-byte length");
        assert_eq!(&v[3..], long.as_bytes());
    }
}
