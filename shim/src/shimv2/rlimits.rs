//! The resource limits a container inherits. Under runc every limit that the process
//! spec does not name comes from the runtime's own process: runc inherits the shim's,
//! which inherits containerd's. In a VM the container would inherit the guest's PID 1
//! instead, and two of its limits, `RLIMIT_NPROC` and `RLIMIT_SIGPENDING`, the guest
//! kernel derives from the VM's RAM: 850 processes for a non-root user of a 256 MiB
//! pod against 96 369 under runc on this host (Kata's users report the same gap). So
//! the shim names its own limits in each process spec that leaves them out, and the
//! container starts with what runc's would have.
//!
//! `RLIMIT_NOFILE` too: ctr's specs name it, but CRI's do not, so a pod's container got
//! the guest's 1024 where runc's gets containerd's (a node's containerd often runs with
//! `LimitNOFILE=infinity`; databases and Elasticsearch refuse to start below 65 536).
//! The agent raises the guest's `fs.nr_open` when a host's limit exceeds it.

use nix::sys::resource::{getrlimit, Resource};
use oci_spec::runtime::{PosixRlimit, PosixRlimitBuilder, PosixRlimitType, Process};

/// Every limit passed on, with its `getrlimit` resource.
const INHERITED: &[(PosixRlimitType, Resource)] = &[
    (PosixRlimitType::RlimitCpu, Resource::RLIMIT_CPU),
    (PosixRlimitType::RlimitFsize, Resource::RLIMIT_FSIZE),
    (PosixRlimitType::RlimitData, Resource::RLIMIT_DATA),
    (PosixRlimitType::RlimitStack, Resource::RLIMIT_STACK),
    (PosixRlimitType::RlimitCore, Resource::RLIMIT_CORE),
    (PosixRlimitType::RlimitRss, Resource::RLIMIT_RSS),
    (PosixRlimitType::RlimitNproc, Resource::RLIMIT_NPROC),
    (PosixRlimitType::RlimitMemlock, Resource::RLIMIT_MEMLOCK),
    (PosixRlimitType::RlimitAs, Resource::RLIMIT_AS),
    (PosixRlimitType::RlimitLocks, Resource::RLIMIT_LOCKS),
    (
        PosixRlimitType::RlimitSigpending,
        Resource::RLIMIT_SIGPENDING,
    ),
    (PosixRlimitType::RlimitMsgqueue, Resource::RLIMIT_MSGQUEUE),
    (PosixRlimitType::RlimitNice, Resource::RLIMIT_NICE),
    (PosixRlimitType::RlimitNofile, Resource::RLIMIT_NOFILE),
    (PosixRlimitType::RlimitRtprio, Resource::RLIMIT_RTPRIO),
    (PosixRlimitType::RlimitRttime, Resource::RLIMIT_RTTIME),
];

/// Adds to `process` every limit of [`INHERITED`] it does not name, at this process's
/// values; those it names are kept as they are.
pub fn inherit(process: &mut Process) {
    let mut limits: Vec<PosixRlimit> = process.rlimits().clone().unwrap_or_default();
    for (typ, resource) in INHERITED {
        if limits.iter().any(|r| r.typ() == *typ) {
            continue;
        }
        let Ok((soft, hard)) = getrlimit(*resource) else {
            continue;
        };
        if let Ok(r) = PosixRlimitBuilder::default()
            .typ(*typ)
            .soft(soft)
            .hard(hard)
            .build()
        {
            limits.push(r);
        }
    }
    process.set_rlimits(Some(limits));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unnamed_limits_are_this_processs_and_named_ones_stay() {
        let mut p: Process = serde_json::from_value(serde_json::json!({
            "cwd": "/",
            "user": {"uid": 0, "gid": 0},
            "args": ["sh"],
            "rlimits": [
                {"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024},
                {"type": "RLIMIT_NPROC", "hard": 7, "soft": 5}
            ]
        }))
        .unwrap();
        inherit(&mut p);
        let limits = p.rlimits().clone().unwrap();
        let find = |t: PosixRlimitType| limits.iter().find(|r| r.typ() == t).copied();
        let nproc = find(PosixRlimitType::RlimitNproc).unwrap();
        assert_eq!((nproc.soft(), nproc.hard()), (5, 7), "named: kept");
        let nofile: Vec<_> = limits
            .iter()
            .filter(|r| r.typ() == PosixRlimitType::RlimitNofile)
            .collect();
        assert_eq!(nofile.len(), 1, "a named NOFILE is kept alone: {limits:?}");
        assert_eq!((nofile[0].soft(), nofile[0].hard()), (1024, 1024));
        let pending = find(PosixRlimitType::RlimitSigpending).unwrap();
        let mine = getrlimit(Resource::RLIMIT_SIGPENDING).unwrap();
        assert_eq!((pending.soft(), pending.hard()), mine);
        assert_eq!(limits.len(), INHERITED.len(), "each resource once");
    }

    #[test]
    fn a_process_without_limits_gets_all_nofile_included() {
        let mut p: Process = serde_json::from_value(
            serde_json::json!({"cwd": "/", "args": ["sh"], "user": {"uid": 0, "gid": 0}}),
        )
        .unwrap();
        inherit(&mut p);
        let limits = p.rlimits().clone().unwrap();
        assert_eq!(limits.len(), INHERITED.len());
        let nofile = limits
            .iter()
            .find(|r| r.typ() == PosixRlimitType::RlimitNofile)
            .unwrap();
        assert_eq!(
            (nofile.soft(), nofile.hard()),
            getrlimit(Resource::RLIMIT_NOFILE).unwrap()
        );
    }
}
