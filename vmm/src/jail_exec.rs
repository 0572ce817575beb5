//! `cocoon-vmm jail-exec`: runs another program (QEMU) in the jail the VMM gives itself
//! ([`crate::jail`]), as an unprivileged user of its own, in the spirit of Firecracker's
//! jailer. The shim starts it in place of QEMU; it sets everything up while it is still
//! root and single-threaded, then `execve`s the program, which starts confined:
//!
//! 1. own mount, network, IPC and UTS namespaces and a read-only empty root holding only
//!    the kept paths (the program and its libraries read-only, the few devices and
//!    sockets it needs);
//! 2. the capability bounding set emptied, resource limits set;
//! 3. the pod's uid and gid (and only the supplementary groups asked for), which clears
//!    every capability left; the ambient set cleared, no_new_privs;
//! 4. the parent-death signal set again (a change of uid clears it) and the parent
//!    checked to be the one that started us, so the program cannot outlive the shim;
//! 5. `execve` with an empty environment.
//!
//! Any failure ends the process before the program runs, with the step on stderr: a
//! pod whose confinement cannot be set up does not start.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use nix::sys::resource::{setrlimit, Resource};
use nix::unistd::{Gid, Uid};

use crate::jail::{JailError, KeptDir};

/// What `jail-exec` sets up before running `program`.
#[derive(Debug)]
pub struct ExecJail {
    pub keep: Vec<KeptDir>,
    /// Symbolic links made in the jail's root (`/lib` → `usr/lib` on a merged-/usr host).
    pub links: Vec<(PathBuf, PathBuf)>,
    /// Who the program runs as; 0 keeps root (without capabilities).
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    /// Soft and hard limit of each resource.
    pub limits: Vec<(Resource, u64)>,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// The program runs as PID 1 of a PID namespace of its own, this process staying
    /// behind as its waiter ([`crate::pid_ns`]).
    pub pid_ns: bool,
    /// A huge-page tmpfs for guest RAM at this path in the jail, with room for this
    /// many bytes, owned by `uid` and `gid`.
    pub huge_tmpfs: Option<(PathBuf, u64)>,
}

fn step(what: &str) -> impl FnOnce(nix::Error) -> JailError + '_ {
    move |source| JailError::Step {
        step: what.to_string(),
        source,
    }
}

/// Sets up the jail and runs the program in it; returns only on failure.
pub fn exec(j: ExecJail) -> JailError {
    match confine(&j) {
        Ok(()) => {
            let e = std::process::Command::new(&j.program)
                .args(&j.args)
                .env_clear()
                .exec();
            JailError::Resolve(j.program, e)
        }
        Err(e) => e,
    }
}

fn confine(j: &ExecJail) -> Result<(), JailError> {
    let parent = nix::unistd::getppid();
    let args = j.pid_ns.then(crate::pid_ns::args_area).flatten();
    let extra = if j.pid_ns {
        nix::sched::CloneFlags::CLONE_NEWPID
    } else {
        nix::sched::CloneFlags::empty()
    };
    let ram = j
        .huge_tmpfs
        .as_ref()
        .map(|(path, size)| crate::jail::RamTmpfs {
            path: path.clone(),
            size: *size,
            uid: j.uid,
            gid: j.gid,
        });
    crate::jail::enter_root(&j.keep, &j.links, ram.as_ref(), extra)?;
    caps::clear(None, caps::CapSet::Bounding).map_err(|e| JailError::Step {
        step: format!("empty the capability bounding set ({e})"),
        source: nix::Error::EPERM,
    })?;
    for &(resource, limit) in &j.limits {
        setrlimit(resource, limit, limit).map_err(step("set a resource limit"))?;
    }
    if j.uid != 0 {
        let groups: Vec<Gid> = j.groups.iter().map(|&g| Gid::from_raw(g)).collect();
        nix::unistd::setgroups(&groups).map_err(step("set the supplementary groups"))?;
        let gid = Gid::from_raw(j.gid);
        nix::unistd::setresgid(gid, gid, gid).map_err(step("change to the pod's gid"))?;
        let uid = Uid::from_raw(j.uid);
        // From root to another uid without keep-caps: permitted and effective go empty.
        nix::unistd::setresuid(uid, uid, uid).map_err(step("change to the pod's uid"))?;
    }
    use caps::CapSet::*;
    for set in [Ambient, Inheritable, Effective, Permitted] {
        caps::clear(None, set).map_err(|e| JailError::Step {
            step: format!("drop the {set:?} capabilities ({e})"),
            source: nix::Error::EPERM,
        })?;
    }
    // SAFETY: plain prctl calls with integer arguments.
    let nnp = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if nnp != 0 {
        return Err(step("set no_new_privs")(nix::Error::last()));
    }
    // SAFETY: as above.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        return Err(step("set the parent-death signal")(nix::Error::last()));
    }
    // Had the parent died before the signal was armed, nobody would send it.
    if nix::unistd::getppid() != parent {
        return Err(step("outlive the parent")(nix::Error::ESRCH));
    }
    if j.pid_ns {
        // Returns only in the child, which goes on to exec.
        crate::pid_ns::fork_and_wait(args)?;
    }
    Ok(())
}

/// Parses `NAME=VALUE` resource limits: `nofile`, `nproc`, `fsize` (bytes), `core`,
/// `memlock` (bytes).
pub fn parse_limit(s: &str) -> Result<(Resource, u64), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=VALUE"))?;
    let resource = match name {
        "nofile" => Resource::RLIMIT_NOFILE,
        "nproc" => Resource::RLIMIT_NPROC,
        "fsize" => Resource::RLIMIT_FSIZE,
        "core" => Resource::RLIMIT_CORE,
        "memlock" => Resource::RLIMIT_MEMLOCK,
        _ => {
            return Err(format!(
                "{name:?} is not one of nofile, nproc, fsize, core, memlock"
            ))
        }
    };
    let value = value
        .parse()
        .map_err(|_| format!("{value:?} (limit of {name}) is not a number"))?;
    Ok((resource, value))
}

/// The largest `--huge-tmpfs`: 1 TiB, far above any guest's RAM, and far from where
/// rounding up to whole huge pages could wrap to 0 (which tmpfs reads as no limit).
pub const MAX_HUGE_TMPFS: u64 = 1 << 40;

/// Parses `PATH=BYTES` (`--huge-tmpfs`): an absolute path other than the root, and a
/// size from one byte to [`MAX_HUGE_TMPFS`].
pub fn parse_huge_tmpfs(s: &str) -> Result<(PathBuf, u64), String> {
    let (path, size) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not PATH=BYTES"))?;
    use std::path::Component;
    let plain = std::path::Path::new(path)
        .components()
        .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !path.starts_with('/') || path.trim_end_matches('/').is_empty() || !plain {
        return Err(format!(
            "the tmpfs path {path:?} is not a plain absolute path below the root"
        ));
    }
    match size.parse::<u64>() {
        Ok(n) if n > 0 && n <= MAX_HUGE_TMPFS => Ok((path.into(), n)),
        _ => Err(format!(
            "{size:?} (size of the tmpfs at {path}) is not a number of bytes from 1 to \
             {MAX_HUGE_TMPFS}"
        )),
    }
}

/// Parses `LINK=TARGET`.
pub fn parse_link(s: &str) -> Result<(PathBuf, PathBuf), String> {
    let (link, target) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not LINK=TARGET"))?;
    if !link.starts_with('/') {
        return Err(format!("the link {link:?} is not an absolute path"));
    }
    Ok((link.into(), target.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_and_name_what_is_wrong() {
        assert_eq!(
            parse_limit("nofile=4096"),
            Ok((Resource::RLIMIT_NOFILE, 4096))
        );
        assert_eq!(parse_limit("fsize=0"), Ok((Resource::RLIMIT_FSIZE, 0)));
        assert!(parse_limit("stack=1").unwrap_err().contains("stack"));
        assert!(parse_limit("nproc=many").unwrap_err().contains("many"));
        assert!(parse_limit("nproc").unwrap_err().contains("NAME=VALUE"));
    }

    #[test]
    fn huge_tmpfs_takes_an_absolute_path_and_a_size() {
        assert_eq!(
            parse_huge_tmpfs("/guest-ram=268435456"),
            Ok(("/guest-ram".into(), 256 << 20))
        );
        assert!(parse_huge_tmpfs("guest-ram=1")
            .unwrap_err()
            .contains("absolute"));
        assert!(parse_huge_tmpfs("/=1")
            .unwrap_err()
            .contains("below the root"));
        assert!(parse_huge_tmpfs("/a/../usr=1")
            .unwrap_err()
            .contains("below the root"));
        assert!(parse_huge_tmpfs("/ram=0").unwrap_err().contains("from 1"));
        let huge = format!("/ram={}", u64::MAX);
        assert!(parse_huge_tmpfs(&huge).unwrap_err().contains("from 1"));
        assert!(parse_huge_tmpfs("/ram=2M").unwrap_err().contains("2M"));
        assert!(parse_huge_tmpfs("/ram").unwrap_err().contains("PATH=BYTES"));
    }

    #[test]
    fn links_must_be_absolute() {
        assert_eq!(
            parse_link("/lib=usr/lib"),
            Ok(("/lib".into(), "usr/lib".into()))
        );
        assert!(parse_link("lib=usr/lib").unwrap_err().contains("absolute"));
        assert!(parse_link("/lib").unwrap_err().contains("LINK=TARGET"));
    }
}
