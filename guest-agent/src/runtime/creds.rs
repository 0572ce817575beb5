//! The last steps before execve, in runc's order: rlimits, working directory,
//! user and groups, capabilities, no_new_privileges and seccomp.

use std::collections::HashSet;
use std::convert::Infallible;
use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use caps::{CapSet, Capability, CapsHashSet};
use nix::unistd::{Gid, Uid};
use oci_spec::runtime::{LinuxCapabilities, LinuxSeccomp, PosixRlimitType, Process};

use super::{seccomp, Context, RuntimeError};

fn rlimit_resource(t: PosixRlimitType) -> libc::__rlimit_resource_t {
    match t {
        PosixRlimitType::RlimitCpu => libc::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => libc::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => libc::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => libc::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => libc::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => libc::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => libc::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => libc::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => libc::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => libc::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => libc::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => libc::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => libc::RLIMIT_RTTIME,
    }
}

pub fn set_rlimits(process: &Process) -> Result<(), RuntimeError> {
    for r in process.rlimits().iter().flatten() {
        let lim = libc::rlimit {
            rlim_cur: r.soft(),
            rlim_max: r.hard(),
        };
        // SAFETY: setrlimit reads one rlimit struct from a valid reference.
        let rc = unsafe { libc::setrlimit(rlimit_resource(r.typ()), &lim) };
        nix::errno::Errno::result(rc).ctx(|| format!("cannot set rlimit {:?}", r.typ()))?;
    }
    Ok(())
}

pub fn set_oom_score_adj(process: &Process) -> Result<(), RuntimeError> {
    let Some(adj) = process.oom_score_adj() else {
        return Ok(());
    };
    match std::fs::write("/proc/self/oom_score_adj", adj.to_string()) {
        // Lowering it needs CAP_SYS_RESOURCE, which some hosts withhold even
        // from root; runc treats the value as advisory there too.
        Err(e)
            if e.raw_os_error() == Some(libc::EACCES) || e.raw_os_error() == Some(libc::EPERM) =>
        {
            Ok(())
        }
        r => r.ctx(|| format!("cannot set oom_score_adj {adj}")),
    }
}

/// Finds `name` in the container's PATH. Like runc, a process without PATH in
/// its environment finds nothing by bare name (no default search path).
pub fn find_executable(name: &str, path_var: Option<&str>) -> Option<PathBuf> {
    if name.contains('/') {
        return Some(PathBuf::from(name));
    }
    path_var
        .unwrap_or("")
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

fn cstrings<'a>(
    items: impl IntoIterator<Item = &'a String>,
    what: &str,
) -> Result<Vec<CString>, RuntimeError> {
    items
        .into_iter()
        .map(|s| {
            CString::new(s.as_str())
                .map_err(|_| RuntimeError::Invalid(format!("{what} {s:?} has a NUL byte")))
        })
        .collect()
}

fn to_caps(set: &Option<oci_spec::runtime::Capabilities>) -> CapsHashSet {
    let mut out = HashSet::new();
    for c in set.iter().flatten() {
        // serde names are the kernel's (CAP_CHOWN), which caps parses.
        let name = serde_json::to_value(c)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string));
        if let Some(cap) = name.and_then(|n| n.parse::<Capability>().ok()) {
            out.insert(cap);
        }
    }
    out
}

fn apply_capabilities(c: &LinuxCapabilities) -> Result<(), RuntimeError> {
    let supported = caps::runtime::thread_all_supported();
    let bounding = to_caps(c.bounding());
    for cap in supported.difference(&bounding) {
        caps::drop(None, CapSet::Bounding, *cap)?;
    }
    Ok(())
}

fn set_process_caps(c: &LinuxCapabilities) -> Result<(), RuntimeError> {
    // Effective first (it must stay within permitted), permitted last.
    caps::set(None, CapSet::Effective, &to_caps(c.effective()))?;
    caps::set(None, CapSet::Inheritable, &to_caps(c.inheritable()))?;
    caps::set(None, CapSet::Permitted, &to_caps(c.permitted()))?;
    caps::clear(None, CapSet::Ambient)?;
    // The kernel allows only caps both permitted and inheritable; runc skips
    // the others too (the default spec lists ambient caps, no inheritable).
    let inheritable = to_caps(c.inheritable());
    let permitted = to_caps(c.permitted());
    for cap in to_caps(c.ambient()) {
        if inheritable.contains(&cap) && permitted.contains(&cap) {
            caps::raise(None, CapSet::Ambient, cap)?;
        }
    }
    Ok(())
}

fn prctl(op: libc::c_int, arg: libc::c_ulong, what: &str) -> Result<(), RuntimeError> {
    // SAFETY: the prctl options used here take plain integers.
    let rc = unsafe { libc::prctl(op, arg, 0, 0, 0) };
    nix::errno::Errno::result(rc).ctx(|| what.to_string())?;
    Ok(())
}

/// As runc: an environment without `HOME` gets the home of the process's uid in the
/// container's `/etc/passwd` (its first entry for that uid), or `/`. The file is the
/// container's own, read before the identity changes: a regular file only, never
/// waited on, at most 1 MiB.
fn with_home(env: &mut Vec<String>, uid: u32, passwd: &Path) {
    if env.iter().any(|e| e.starts_with("HOME=")) {
        return;
    }
    let home = passwd_home(passwd, uid).unwrap_or_else(|| "/".into());
    env.push(format!("HOME={home}"));
}

fn passwd_home(passwd: &Path, uid: u32) -> Option<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(passwd)
        .ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut bytes = Vec::new();
    file.take(1 << 20).read_to_end(&mut bytes).ok()?;
    String::from_utf8_lossy(&bytes).lines().find_map(|line| {
        let fields: Vec<&str> = line.trim().split(':').collect();
        let id = fields.get(2)?.parse::<u32>().ok()?;
        (id == uid).then(|| fields.get(5).copied().unwrap_or_default().to_string())
    })
}

/// Drops to the process's identity and execs it.
pub fn finalize_and_exec(
    process: &Process,
    seccomp_profile: Option<&LinuxSeccomp>,
    before_exec: impl FnOnce() -> Result<(), RuntimeError>,
) -> Result<Infallible, RuntimeError> {
    let args = process
        .args()
        .as_ref()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| RuntimeError::Invalid("the process has no args".into()))?;
    // In the process itself, past the helper's last fork: a policy asked with
    // SCHED_FLAG_RESET_ON_FORK would not outlive a fork. Its capabilities are still
    // whole here (a real-time policy needs CAP_SYS_NICE).
    super::sched::set_scheduler(process.scheduler().as_ref())?;
    let mut env: Vec<String> = process.env().clone().unwrap_or_default();
    with_home(&mut env, process.user().uid(), Path::new("/etc/passwd"));
    let path_var = env.iter().find_map(|e| e.strip_prefix("PATH="));
    let cwd = process.cwd();
    nix::unistd::chdir(cwd).ctx(|| format!("cannot change to the working directory {cwd:?}"))?;
    let program = find_executable(&args[0], path_var).ok_or_else(|| {
        RuntimeError::Io(
            format!("executable {:?} not found in $PATH", args[0]),
            std::io::ErrorKind::NotFound.into(),
        )
    })?;
    let program = CString::new(program.as_os_str().as_encoded_bytes())
        .map_err(|_| RuntimeError::Invalid("program path has a NUL byte".into()))?;
    let argv = cstrings(args, "argument")?;
    let envp = cstrings(&env, "environment entry")?;
    let filters = match seccomp_profile {
        Some(p) => seccomp::compile(p)?,
        None => Vec::new(),
    };
    let nnp = process.no_new_privileges().unwrap_or(false);
    // Without no_new_privileges only a privileged process may install a
    // filter, so that happens before the identity change (as runc does).
    if !nnp {
        seccomp::install(&filters)?;
    }

    let user = process.user();
    let caps = process.capabilities().as_ref();
    if let Some(c) = caps {
        apply_capabilities(c)?;
        prctl(libc::PR_SET_KEEPCAPS, 1, "cannot keep capabilities")?;
    }
    let groups: Vec<Gid> = user
        .additional_gids()
        .iter()
        .flatten()
        .map(|g| Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&groups).ctx(|| "cannot set additional groups".into())?;
    let gid = Gid::from_raw(user.gid());
    nix::unistd::setresgid(gid, gid, gid).ctx(|| format!("cannot set gid {gid}"))?;
    let uid = Uid::from_raw(user.uid());
    nix::unistd::setresuid(uid, uid, uid).ctx(|| format!("cannot set uid {uid}"))?;
    if let Some(c) = caps {
        prctl(libc::PR_SET_KEEPCAPS, 0, "cannot reset keep-capabilities")?;
        set_process_caps(c)?;
    }
    if let Some(mask) = user.umask() {
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(mask));
    }
    if nnp {
        prctl(libc::PR_SET_NO_NEW_PRIVS, 1, "cannot set no_new_privileges")?;
        seccomp::install(&filters)?;
    }
    // The container's startContainer hooks, as the process will run.
    before_exec()?;
    nix::unistd::execve(&program, &argv, &envp).ctx(|| format!("cannot execute {:?}", args[0]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn home_comes_from_the_users_passwd_entry_or_is_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let passwd = dir.path().join("passwd");
        std::fs::write(
            &passwd,
            "root:x:0:0:root:/root:/bin/sh\nu:x:1000:1000::/home/u:/bin/sh\n",
        )
        .unwrap();
        let home = |env: &[&str], uid| {
            let mut env: Vec<String> = env.iter().map(|s| s.to_string()).collect();
            with_home(&mut env, uid, &passwd);
            env
        };
        assert_eq!(home(&["A=1"], 0), ["A=1", "HOME=/root"]);
        assert_eq!(home(&[], 1000), ["HOME=/home/u"]);
        assert_eq!(home(&[], 7), ["HOME=/"]);
        assert_eq!(home(&["HOME=/x"], 0), ["HOME=/x"]);
        // Not a regular file: never waited on.
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let mut env = Vec::new();
        with_home(&mut env, 0, &fifo);
        assert_eq!(env, ["HOME=/"]);
    }

    #[test]
    fn executables_are_found_on_path() {
        let d = tempfile::tempdir().unwrap();
        let exe = d.path().join("tool");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(d.path().join("data"), "").unwrap();
        let path = format!("/nonexistent:{}", d.path().display());
        assert_eq!(find_executable("tool", Some(&path)), Some(exe));
        assert_eq!(find_executable("data", Some(&path)), None);
        // Like runc: no PATH, no search.
        assert_eq!(find_executable("tool", None), None);
        assert_eq!(
            find_executable("/abs/x", Some(&path)),
            Some(PathBuf::from("/abs/x"))
        );
    }

    #[test]
    fn oci_capability_names_map_to_caps() {
        let spec: oci_spec::runtime::LinuxCapabilities =
            serde_json::from_str(r#"{"bounding":["CAP_CHOWN","CAP_NET_BIND_SERVICE"]}"#).unwrap();
        let set = to_caps(spec.bounding());
        assert!(set.contains(&Capability::CAP_CHOWN));
        assert!(set.contains(&Capability::CAP_NET_BIND_SERVICE));
        assert_eq!(set.len(), 2);
    }
}
