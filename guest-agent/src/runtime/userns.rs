//! A container's own user namespace (`linux.uidMappings`/`gidMappings`, as
//! `ctr run --uidmap` asks), made and joined the way runc's nsexec does: the user
//! namespace first, mapped, and root in it taken, before the other namespaces are
//! made, so that they belong to it.
//!
//! A process cannot map ids it does not hold in its own new namespace, so the helper
//! forks a mapper that stays in the agent's namespace: the helper unshares, the mapper
//! (root there) writes the helper's `uid_map` and `gid_map`, and the helper goes on.
//! The shim made the pod's share show the rootfs's host owners as themselves
//! (`hypervisor::userns` on the host), so the container's root owns its rootfs.

use std::fmt::Write as _;
use std::io::{Read, Write};

use nix::sched::{unshare, CloneFlags};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Gid, Uid};
use oci_spec::runtime::{Linux, LinuxIdMapping};

use super::{Context, RuntimeError};

/// The kernel's most lines in one map (Linux ≥ 4.15).
const MAX_LINES: usize = 340;

/// One `uid_map` or `gid_map` as the kernel reads it, checked: non-empty ranges within
/// 32 bits, at most `MAX_LINES` of them.
pub fn map_text(kind: &str, maps: Option<&Vec<LinuxIdMapping>>) -> Result<String, RuntimeError> {
    let maps = maps.filter(|m| !m.is_empty()).ok_or_else(|| {
        RuntimeError::Invalid(format!(
            "a new user namespace needs {kind}Mappings (runc refuses one without)"
        ))
    })?;
    if maps.len() > MAX_LINES {
        return Err(RuntimeError::Invalid(format!(
            "{} {kind}Mappings, more than the kernel's {MAX_LINES}",
            maps.len()
        )));
    }
    let mut text = String::new();
    for m in maps {
        let fits = |start: u32| u64::from(start) + u64::from(m.size()) <= u64::from(u32::MAX);
        if m.size() == 0 || !fits(m.container_id()) || !fits(m.host_id()) {
            return Err(RuntimeError::Invalid(format!(
                "{kind} mapping {} -> {} ({} ids) is empty or passes 2^32",
                m.container_id(),
                m.host_id(),
                m.size()
            )));
        }
        let _ = writeln!(text, "{} {} {}", m.container_id(), m.host_id(), m.size());
    }
    Ok(text)
}

/// Moves this (single-threaded) process into a new user namespace with the spec's
/// mappings and makes it root there: uid and gid 0 in it, no supplementary groups,
/// every capability in it and none outside.
pub fn unshare_mapped(linux: &Linux) -> Result<(), RuntimeError> {
    let uid_map = map_text("uid", linux.uid_mappings().as_ref())?;
    let gid_map = map_text("gid", linux.gid_mappings().as_ref())?;
    let (go_r, go_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).ctx(|| "pipe".into())?;
    let (why_r, why_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).ctx(|| "pipe".into())?;
    let helper = nix::unistd::getpid();
    // SAFETY: this helper process is single-threaded, so the child may run any code.
    match unsafe { fork() }.ctx(|| "cannot fork the id mapper".into())? {
        ForkResult::Child => {
            drop(go_w);
            drop(why_r);
            let mut b = [0u8; 1];
            // EOF: the helper could not unshare, and says so itself.
            let ok = loop {
                match nix::unistd::read(&go_r, &mut b) {
                    Err(nix::Error::EINTR) => continue,
                    r => break matches!(r, Ok(1)),
                }
            };
            if !ok {
                std::process::exit(1);
            }
            let written = [("uid_map", &uid_map), ("gid_map", &gid_map)]
                .into_iter()
                .try_for_each(|(file, text)| {
                    // One write: the kernel takes a map whole or not at all.
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(format!("/proc/{helper}/{file}"))
                        .and_then(|mut f| f.write_all(text.as_bytes()))
                        .map_err(|e| format!("cannot write {file} {:?}: {e}", text.trim_end()))
                });
            match written {
                Ok(()) => std::process::exit(0),
                Err(why) => {
                    let _ = std::fs::File::from(why_w).write_all(why.as_bytes());
                    std::process::exit(1)
                }
            }
        }
        ForkResult::Parent { child } => {
            drop(go_r);
            drop(why_w);
            let unshared = unshare(CloneFlags::CLONE_NEWUSER);
            if unshared.is_ok() {
                let _ = nix::unistd::write(&go_w, &[1]);
            }
            drop(go_w);
            let status = loop {
                match waitpid(child, None) {
                    Err(nix::Error::EINTR) => continue,
                    r => break r,
                }
            };
            unshared.ctx(|| "cannot create the container's user namespace".into())?;
            let mut why = String::new();
            let _ = std::fs::File::from(why_r).read_to_string(&mut why);
            match status {
                Ok(WaitStatus::Exited(_, 0)) => {}
                _ if !why.is_empty() => return Err(RuntimeError::Invalid(why)),
                other => {
                    return Err(RuntimeError::Invalid(format!(
                        "the id mapper of the user namespace failed: {other:?}"
                    )))
                }
            }
            become_root()
        }
    }
}

/// Takes uid and gid 0 of the user namespace this process just entered, which must map
/// them (runc needs the same); capabilities in it stay whole, as the old ids were not
/// its root.
pub fn become_root() -> Result<(), RuntimeError> {
    let root_mapped = |file: &str| {
        std::fs::read_to_string(format!("/proc/self/{file}"))
            .map(|t| {
                t.lines().any(|l| {
                    let f: Vec<u64> = l
                        .split_whitespace()
                        .filter_map(|x| x.parse().ok())
                        .collect();
                    f.len() == 3 && f[0] == 0 && f[2] > 0
                })
            })
            .unwrap_or(false)
    };
    if !root_mapped("uid_map") || !root_mapped("gid_map") {
        return Err(RuntimeError::Invalid(
            "the user namespace does not map the container's uid and gid 0 (the mappings \
             must include containerID 0)"
                .into(),
        ));
    }
    nix::unistd::setgroups(&[]).ctx(|| "setgroups in the user namespace".into())?;
    let (g, u) = (Gid::from_raw(0), Uid::from_raw(0));
    nix::unistd::setresgid(g, g, g).ctx(|| "cannot become gid 0 in the user namespace".into())?;
    nix::unistd::setresuid(u, u, u).ctx(|| "cannot become uid 0 in the user namespace".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(c: u32, h: u32, n: u32) -> LinuxIdMapping {
        serde_json::from_value(serde_json::json!({"containerID": c, "hostID": h, "size": n}))
            .unwrap()
    }

    #[test]
    fn maps_are_written_as_the_kernel_reads_them() {
        let v = vec![m(0, 100_000, 65_536), m(65_536, 1_000, 1)];
        assert_eq!(
            map_text("uid", Some(&v)).unwrap(),
            "0 100000 65536\n65536 1000 1\n"
        );
    }

    #[test]
    fn bad_maps_are_named() {
        let e = |v: Vec<LinuxIdMapping>| map_text("gid", Some(&v)).unwrap_err().to_string();
        assert!(map_text("uid", None)
            .unwrap_err()
            .to_string()
            .contains("uidMappings"));
        assert!(e(vec![]).contains("gidMappings"));
        assert!(e(vec![m(0, 1, 0)]).contains("empty"));
        assert!(e(vec![m(0, u32::MAX, 2)]).contains("2^32"));
        assert!(e(vec![m(u32::MAX - 1, 0, 5)]).contains("2^32"));
        assert!(e((0..341).map(|i| m(i, 100_000 + i, 1)).collect()).contains("340"));
    }
}
