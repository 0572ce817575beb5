//! The container runtime proper: the agent re-executes itself as a short-lived
//! single-threaded helper (`cocoon-agent __cocoon-runtime`) that creates the
//! namespaces, forks the container's process, sets it up and execs it. Doing
//! this in a fresh process keeps fork/setns away from the agent's threads.
//!
//! Protocol on the sync socket (fd 3, one JSON value per line): the agent
//! sends a [`HelperRequest`]; the helper answers [`HelperMessage::Pid`] once
//! the process exists. A process with a terminal then sends `Console` with
//! the pty master attached. A container init then answers `Ready` (or
//! `Error`) and waits for the line `start`; an exec starts at once. Either
//! way the process reports `Error` if anything fails up to execve, and the
//! socket (close-on-exec) reaches EOF when execve succeeded.

pub(crate) mod console;
mod creds;
mod mount_attrs;
pub mod mounts;
mod sched;
pub mod seccomp;
mod start_hooks;
mod syscalls_x86_64;
mod timens;
mod userns;
pub mod zygote;

pub use mounts::parse_options as mount_options;

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use nix::sched::{setns, unshare, CloneFlags};
use nix::unistd::{fork, ForkResult};
use oci_spec::runtime::{LinuxNamespaceType, Process, Spec};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// argv[1] that turns the agent binary into the runtime helper.
pub const HELPER_ARG: &str = "__cocoon-runtime";
/// The sync socket's descriptor number in the helper.
pub const SYNC_FD: RawFd = 3;
/// What the agent writes to let a created container exec.
pub const START_LINE: &str = "start";
/// What the agent writes once the pod's interfaces are in a sandbox's own network
/// namespace (`takes_pod_network`), before the sandbox's sysctls, which may name them.
pub const NETWORK_LINE: &str = "network";

/// Whether this container is a pod's sandbox that makes the pod's user and network
/// namespaces: the shim asks for a network namespace of its own only for a pod with a
/// user namespace of its own (`hostUsers: false`), whose network namespace must belong
/// to that user namespace, as under runc. The agent moves the pod's interfaces into
/// it. Every other pod's containers share the guest's own network namespace.
pub fn takes_pod_network(spec: &Spec) -> bool {
    let sandbox = spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get("io.kubernetes.cri.container-type"))
        .is_some_and(|t| t == "sandbox");
    let new = |t: LinuxNamespaceType| {
        spec.linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .is_some_and(|ns| ns.iter().any(|n| n.typ() == t && n.path().is_none()))
    };
    sandbox && new(LinuxNamespaceType::Network) && new(LinuxNamespaceType::User)
}

/// The spec as the agent sends it: the bytes the host gave (checked to be JSON), written
/// into the request as they are.
pub type RawSpec = Box<serde_json::value::RawValue>;

/// `spec_json` as a [`RawSpec`] that fits the request's one line: a line break can only
/// be whitespace between tokens (JSON strings hold none unescaped, and the parse refuses
/// one), so each becomes a space.
pub fn raw_spec(spec_json: &[u8]) -> serde_json::Result<RawSpec> {
    let one_line: Vec<u8> = spec_json
        .iter()
        .map(|b| if matches!(b, b'\n' | b'\r') { b' ' } else { *b })
        .collect();
    serde_json::from_slice(&one_line)
}

/// One request to the helper. The agent sends it with a [`RawSpec`] and the helper reads
/// it with a parsed [`Spec`]: serializing the agent's parsed copy took 5-8 ms of
/// first-run code in each VM under TCG (docs/notes.md, fortieth session).
#[derive(Debug, Serialize, Deserialize)]
pub struct HelperRequest<S = Spec> {
    /// The container's spec (for an exec: its namespaces and seccomp). The helper adds
    /// a cgroup namespace where `cgroup_v2` says the guest has cgroup v2.
    pub spec: S,
    /// Present for ExecProcess: join the init's namespaces, run `process`.
    pub exec: Option<ExecTarget>,
    /// The process gets a terminal: a pty from the container's devpts, its
    /// master sent back as `Console` (stdio 0-2 are /dev/null until then).
    pub terminal: bool,
    /// The hierarchy at /sys/fs/cgroup is v2 (else cgroup mounts are skipped).
    pub cgroup_v2: bool,
    /// Move the rootfs over `/` instead of pivot_root.
    #[serde(default)]
    pub no_pivot: bool,
    /// The container's id, for the state its `startContainer` hooks read.
    #[serde(default)]
    pub id: String,
    /// Sysctls for a new network namespace, written before the spec's and best-effort
    /// (`container::net_sysctls`).
    #[serde(default)]
    pub netns_sysctls: Vec<(String, String)>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ExecTarget {
    pub init_pid: i32,
    pub process: Process,
}

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HelperMessage {
    /// The helper's first line: its main() began at this guest CLOCK_BOOTTIME, so the
    /// agent's timeline can tell the helper's exec from the work it then does.
    Started(i64),
    Pid(i32),
    /// The pty master comes with this line (SCM_RIGHTS).
    Console,
    /// A sandbox that made the pod's network namespace waits for its interfaces
    /// (`takes_pod_network`): the agent answers `NETWORK_LINE` once they are in.
    Network,
    Ready,
    Error(String),
}

#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("{0}")]
    Sys(String, #[source] nix::Error),
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("cannot change capabilities")]
    Caps(#[from] caps::errors::CapsError),
}

/// Adds what was being done to a syscall or I/O error.
pub(crate) trait Context<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, RuntimeError>;
}

impl<T> Context<T> for nix::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, RuntimeError> {
        self.map_err(|e| RuntimeError::Sys(what(), e))
    }
}

impl<T> Context<T> for std::io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, RuntimeError> {
        self.map_err(|e| RuntimeError::Io(what(), e))
    }
}

/// "outer: inner: innermost", for the one-line error sent to the agent.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

pub fn send(sock: &UnixStream, msg: &HelperMessage) {
    if let Ok(mut line) = serde_json::to_string(msg) {
        line.push('\n');
        let _ = (&*sock).write_all(line.as_bytes());
    }
}

/// Sends one message line with `fd` attached (SCM_RIGHTS). The agent reads
/// the sync socket with recvmsg, so the descriptor arrives with the line.
pub fn send_with_fd(
    sock: &UnixStream,
    msg: &HelperMessage,
    fd: BorrowedFd<'_>,
) -> Result<(), RuntimeError> {
    let mut line = serde_json::to_string(msg)
        .map_err(|e| RuntimeError::Invalid(format!("cannot encode {msg:?}: {e}")))?;
    line.push('\n');
    let fds = [fd.as_raw_fd()];
    let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
    let iov = [std::io::IoSlice::new(line.as_bytes())];
    let sent = loop {
        match nix::sys::socket::sendmsg::<()>(
            sock.as_raw_fd(),
            &iov,
            &cmsg,
            nix::sys::socket::MsgFlags::empty(),
            None,
        ) {
            Err(nix::Error::EINTR) => continue,
            r => break r.ctx(|| format!("cannot send {msg:?} with a descriptor"))?,
        }
    };
    // The descriptor went with the first byte; the rest is plain data.
    if sent < line.len() {
        use std::io::Write;
        (&*sock)
            .write_all(&line.as_bytes()[sent..])
            .ctx(|| format!("cannot send {msg:?} with a descriptor"))?;
    }
    Ok(())
}

/// Reads one line, consuming nothing after it: what follows on the socket (the start
/// line, after a create) is the forked init's to read.
///
/// Peeks at what has arrived and takes it up to the newline, rather than a byte per
/// syscall: the request is the whole OCI spec, kilobytes long (tens of KB with a large
/// environment or many mounts).
fn read_line(sock: &UnixStream) -> std::io::Result<Option<String>> {
    use nix::sys::socket::{recv, MsgFlags};
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match recv(sock.as_raw_fd(), &mut buf, MsgFlags::MSG_PEEK) {
            Ok(n) => n,
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Ok(None);
        }
        let newline = buf[..n].iter().position(|&b| b == b'\n');
        let take = newline.map_or(n, |i| i + 1);
        // Only this process reads the socket: the bytes peeked are the ones read.
        (&*sock).read_exact(&mut buf[..take])?;
        match newline {
            Some(i) => {
                out.extend_from_slice(&buf[..i]);
                return Ok(Some(String::from_utf8_lossy(&out).into_owned()));
            }
            None => out.extend_from_slice(&buf[..take]),
        }
    }
}

/// Entry point of the helper process. Never returns.
pub fn helper_main() -> ! {
    reset_signal_dispositions();
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    );
    close_inherited_fds();
    // SAFETY: the agent placed the sync socket at SYNC_FD before exec and
    // nothing else in this fresh process owns that descriptor.
    let sock = unsafe { UnixStream::from_raw_fd(SYNC_FD) };
    // Close-on-exec from here on: its EOF tells the agent that execve worked.
    let _ = nix::fcntl::fcntl(
        sock.as_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    send(
        &sock,
        &HelperMessage::Started(crate::details::boottime_ns()),
    );
    let req = match read_line(&sock) {
        Ok(Some(line)) => parse_request(line.as_bytes()),
        Ok(None) => std::process::exit(1),
        Err(e) => Err(RuntimeError::Io("cannot read the helper request".into(), e)),
    };
    let result = req.and_then(|req| match &req.exec {
        None => create(&req, &sock),
        Some(target) => exec(&req, target, &sock),
    });
    if let Err(e) = result {
        send(&sock, &HelperMessage::Error(error_chain(&e)));
        std::process::exit(1);
    }
    std::process::exit(0)
}

/// The agent's request, parsed from bytes as the agent parses the spec: the same
/// deserializer code, which under TCG is then already translated (a zygote's helper runs
/// the agent's code at its addresses). From a str it was another copy, 10-20 ms to
/// translate.
fn parse_request(line: &[u8]) -> Result<HelperRequest, RuntimeError> {
    let mut req: HelperRequest = serde_json::from_slice(line)
        .map_err(|e| RuntimeError::Invalid(format!("bad helper request: {e}")))?;
    if req.cgroup_v2 {
        add_cgroup_namespace(&mut req.spec);
    }
    Ok(req)
}

/// Ignored signals survive exec, and containers must start with defaults:
/// Rust's runtime ignores SIGPIPE, and glibc's posix_spawn can leave its
/// internal signals (32, 33) ignored in whatever the agent's parent was.
/// glibc's sigaction() refuses those two, hence the raw syscall.
fn reset_signal_dispositions() {
    /// The kernel's `struct sigaction` for rt_sigaction on x86_64.
    #[repr(C)]
    struct KernelSigaction {
        handler: libc::c_ulong,
        flags: libc::c_ulong,
        restorer: libc::c_ulong,
        mask: u64,
    }
    let dfl = KernelSigaction {
        handler: libc::SIG_DFL as libc::c_ulong,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: installs the default disposition (no handler code) from a
        // valid struct of the kernel's layout; the old action is not read.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                &dfl as *const KernelSigaction,
                std::ptr::null_mut::<KernelSigaction>(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

/// Closes every descriptor above the sync socket: whatever the agent
/// inherited without close-on-exec (a parent's jobserver pipes in the dev
/// mode, say) must not reach the container.
fn close_inherited_fds() {
    let first = SYNC_FD as libc::c_uint + 1;
    // SAFETY: close_range only closes descriptors; nothing in this fresh
    // process owns any above SYNC_FD yet.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, libc::c_uint::MAX, 0) };
    if rc == 0 {
        return;
    }
    // Kernels before 5.9: close them one by one.
    let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    for fd in fds.into_iter().filter(|fd| *fd > SYNC_FD) {
        // SAFETY: as above; a stale number (the read_dir's own) fails harmlessly.
        unsafe { libc::close(fd) };
    }
}

/// Gives the container a cgroup namespace if the spec has none, as runc does
/// on a cgroup v2 host. containerd leaves it out when its own host is v1, but
/// the guest is v2: the helper unshares it after the agent put it in the
/// container's group, so that group is the namespace's root, and the cgroup2
/// mount at /sys/fs/cgroup shows the container's own files and limits.
fn add_cgroup_namespace(spec: &mut Spec) {
    let linux = spec.linux_mut().get_or_insert_with(Default::default);
    let namespaces = linux.namespaces_mut().get_or_insert_with(Vec::new);
    if !namespaces
        .iter()
        .any(|n| n.typ() == LinuxNamespaceType::Cgroup)
    {
        let mut ns = oci_spec::runtime::LinuxNamespace::default();
        ns.set_typ(LinuxNamespaceType::Cgroup);
        namespaces.push(ns);
    }
}

fn ns_flag(t: LinuxNamespaceType) -> Result<CloneFlags, RuntimeError> {
    Ok(match t {
        LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
        LinuxNamespaceType::Network => CloneFlags::CLONE_NEWNET,
        LinuxNamespaceType::Mount => CloneFlags::CLONE_NEWNS,
        LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
        LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
        LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
        LinuxNamespaceType::Time => timens::CLONE_NEWTIME,
        other => {
            return Err(RuntimeError::Invalid(format!(
                "{other:?} namespaces are not supported"
            )))
        }
    })
}

/// Forks the container's process. The helper (parent) reports the child's
/// pid and leaves, so the child is re-parented to the agent (PID 1 or
/// subreaper); the child returns only once that report is on the socket,
/// so the agent always reads `Pid` before anything the child sends.
fn fork_and_report(sock: &UnixStream, what: &str) -> Result<(), RuntimeError> {
    let (reported_r, reported_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).ctx(|| "pipe".into())?;
    // SAFETY: this helper process is single-threaded (no runtime, no
    // threads started), so the child may run arbitrary code after fork.
    match unsafe { fork() }.ctx(|| format!("cannot fork the {what}"))? {
        ForkResult::Parent { child } => {
            drop(reported_r);
            send(sock, &HelperMessage::Pid(child.as_raw()));
            let _ = nix::unistd::write(&reported_w, &[1]);
            std::process::exit(0)
        }
        ForkResult::Child => {
            drop(reported_w);
            let mut b = [0u8; 1];
            // One byte, or EOF if the parent died: either way it is done.
            while let Err(nix::Error::EINTR) = nix::unistd::read(&reported_r, &mut b) {}
            Ok(())
        }
    }
}

/// Runs `f` in the forked child; its error goes to the agent.
fn in_child(sock: &UnixStream, f: impl FnOnce() -> Result<(), RuntimeError>) -> ! {
    if let Err(e) = f() {
        send(sock, &HelperMessage::Error(error_chain(&e)));
    }
    std::process::exit(1)
}

fn create(req: &HelperRequest, sock: &UnixStream) -> Result<(), RuntimeError> {
    let spec = &req.spec;
    let linux = spec.linux().clone().unwrap_or_default();
    let mut flags = CloneFlags::empty();
    // Checked before anything is made.
    let time_offsets = timens::check(&linux)?;
    let namespaces = linux.namespaces().clone().unwrap_or_default();
    // The user namespace first, as runc: the others are then made by (or joined as)
    // its root, and belong to it.
    let (user, others): (Vec<_>, Vec<_>) = namespaces
        .iter()
        .partition(|n| n.typ() == LinuxNamespaceType::User);
    if !user.is_empty() {
        // Raised limits and a lowered OOM score need the agent's namespace (as runc
        // sets them from outside); the forks below inherit them.
        set_limits(spec)?;
    }
    let mut new_user = false;
    for ns in user.iter().chain(&others) {
        let flag = match ns.typ() {
            LinuxNamespaceType::User => CloneFlags::CLONE_NEWUSER,
            t => ns_flag(t)?,
        };
        match ns.path() {
            Some(path) => {
                let f = File::open(path).ctx(|| format!("cannot open namespace {path:?}"))?;
                setns(f.as_fd(), flag).ctx(|| format!("cannot join namespace {path:?}"))?;
                if flag == CloneFlags::CLONE_NEWUSER {
                    userns::become_root()?;
                }
            }
            None if flag == CloneFlags::CLONE_NEWUSER => new_user = true,
            None => flags |= flag,
        }
    }
    if new_user {
        userns::unshare_mapped(&linux)?;
    } else if user.is_empty()
        && (linux.uid_mappings().as_ref().is_some_and(|m| !m.is_empty())
            || linux.gid_mappings().as_ref().is_some_and(|m| !m.is_empty()))
    {
        return Err(RuntimeError::Invalid(
            "uidMappings or gidMappings without a user namespace".into(),
        ));
    }
    unshare(flags).ctx(|| "cannot create the container's namespaces".into())?;
    // Before the fork: once a process is in the new time namespace, its offsets are fixed.
    if let Some(text) = &time_offsets {
        timens::set_offsets(text)?;
    }
    fork_and_report(sock, "container init")?;
    in_child(sock, || container_init(req, sock))
}

fn container_init(req: &HelperRequest, sock: &UnixStream) -> Result<(), RuntimeError> {
    let spec = &req.spec;
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| RuntimeError::Invalid("the spec has no process".into()))?;
    nix::unistd::setsid().ctx(|| "setsid".into())?;
    // runc's order: mounts and pivot_root, the console (it needs the
    // container's devpts), hostname and sysctls, then the read-only and
    // masked paths (which include /proc/sys).
    mounts::prepare_rootfs(spec, req.cgroup_v2, req.no_pivot)?;
    if req.terminal {
        console::setup(sock, process, true)?;
    }
    let linux = spec.linux().clone().unwrap_or_default();
    let has_uts = linux
        .namespaces()
        .iter()
        .flatten()
        .any(|n| n.typ() == LinuxNamespaceType::Uts);
    if has_uts {
        if let Some(h) = spec.hostname() {
            nix::unistd::sethostname(h).ctx(|| format!("cannot set hostname {h:?}"))?;
        }
        if let Some(d) = spec.domainname() {
            let c = CString::new(d.as_str())
                .map_err(|_| RuntimeError::Invalid("domainname has a NUL byte".into()))?;
            // SAFETY: setdomainname reads `len` bytes from a valid C string.
            let rc = unsafe { libc::setdomainname(c.as_ptr(), d.len()) };
            nix::errno::Errno::result(rc).ctx(|| "cannot set domainname".into())?;
        }
    }
    if takes_pod_network(spec) {
        // The pod's interfaces move in first: a sysctl may name them, as under runc,
        // where CNI made them before the sandbox started.
        send(sock, &HelperMessage::Network);
        match read_line(sock) {
            Ok(Some(line)) if line == NETWORK_LINE => {}
            _ => std::process::exit(1),
        }
    }
    for (key, value) in &req.netns_sysctls {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let _ = std::fs::write(path, value);
    }
    for (key, value) in linux.sysctl().iter().flatten() {
        if key.contains("..") || key.starts_with('/') {
            return Err(RuntimeError::Invalid(format!("bad sysctl name {key:?}")));
        }
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        std::fs::write(&path, value).ctx(|| format!("cannot set sysctl {key}"))?;
    }
    mounts::finalize_rootfs(spec)?;
    if !has_user(&linux) {
        set_limits(spec)?;
    }
    send(sock, &HelperMessage::Ready);
    match read_line(sock) {
        Ok(Some(line)) if line == START_LINE => {}
        // The agent went away or gave up on this container.
        _ => std::process::exit(1),
    }
    let hooks = || start_hooks::run(spec, &req.id);
    creds::finalize_and_exec(process, linux.seccomp().as_ref(), hooks).map(|never| match never {})
}

fn has_user(linux: &oci_spec::runtime::Linux) -> bool {
    linux
        .namespaces()
        .iter()
        .flatten()
        .any(|n| n.typ() == LinuxNamespaceType::User)
}

/// The process's resource limits, OOM score, I/O priority and execution domain, on
/// this process (its children inherit them; the CPU scheduler is set in
/// `creds::finalize_and_exec`, past the last fork).
fn set_limits(spec: &Spec) -> Result<(), RuntimeError> {
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| RuntimeError::Invalid("the spec has no process".into()))?;
    set_process_limits(spec, process)
}

/// `process`'s limits, with the execution domain of the container's `spec`.
fn set_process_limits(spec: &Spec, process: &Process) -> Result<(), RuntimeError> {
    creds::set_rlimits(process)?;
    creds::set_oom_score_adj(process)?;
    sched::set_io_priority(process.io_priority().as_ref())?;
    sched::set_personality(spec.linux().as_ref().and_then(|l| l.personality().as_ref()))
}

fn exec(req: &HelperRequest, target: &ExecTarget, sock: &UnixStream) -> Result<(), RuntimeError> {
    let pid = target.init_pid;
    // Before a user namespace is joined, while raising them is still allowed.
    set_process_limits(&req.spec, &target.process)?;
    // Mount last: after it, /proc may be the container's.
    // The user namespace first, as runc: the others belong to it.
    const ORDER: &[(&str, CloneFlags)] = &[
        ("user", CloneFlags::CLONE_NEWUSER),
        ("cgroup", CloneFlags::CLONE_NEWCGROUP),
        ("time", timens::CLONE_NEWTIME),
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("net", CloneFlags::CLONE_NEWNET),
        ("pid", CloneFlags::CLONE_NEWPID),
        ("mnt", CloneFlags::CLONE_NEWNS),
    ];
    let mut joins = Vec::new();
    for (name, flag) in ORDER {
        let theirs = format!("/proc/{pid}/ns/{name}");
        let ours = format!("/proc/self/ns/{name}");
        // A kind of namespace this kernel does not have (time before Linux 5.6).
        if !lexists(Path::new(&ours)) {
            continue;
        }
        let same = match (std::fs::metadata(&theirs), std::fs::metadata(&ours)) {
            (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
            (Err(e), _) => {
                return Err(RuntimeError::Io(
                    format!("the container's init {pid} is gone"),
                    e,
                ))
            }
            _ => false,
        };
        if !same {
            let f = File::open(&theirs).ctx(|| format!("cannot open {theirs}"))?;
            joins.push((f, *flag, theirs));
        }
    }
    for (f, flag, path) in &joins {
        setns(f.as_fd(), *flag).ctx(|| format!("cannot join {path}"))?;
        if *flag == CloneFlags::CLONE_NEWUSER {
            // While /proc is still the agent's.
            userns::become_root()?;
        }
    }
    drop(joins);
    fork_and_report(sock, "exec process")?;
    in_child(sock, || {
        if req.terminal {
            // From the container's devpts (setns put us in its mount
            // namespace), as runc does: the process sees /dev/pts/N.
            nix::unistd::setsid().ctx(|| "setsid".into())?;
            console::setup(sock, &target.process, false)?;
        }
        let seccomp = req.spec.linux().as_ref().and_then(|l| l.seccomp().clone());
        creds::finalize_and_exec(&target.process, seccomp.as_ref(), || Ok(()))
            .map(|never| match never {})
    })
}

/// Whether a path exists without following a final symlink.
pub(crate) fn lexists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A line is read whole, however it arrives, and what follows it stays on the socket.
    #[test]
    fn a_line_is_read_up_to_its_newline_and_no_further() {
        let (a, b) = UnixStream::pair().unwrap();
        let long = "x".repeat(200 * 1024);
        let sent = long.clone();
        let writer = std::thread::spawn(move || {
            let mut a = a;
            // In pieces, the newline and the next line's start in one write.
            for chunk in sent.as_bytes().chunks(50_000) {
                a.write_all(chunk).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            a.write_all(b"\nstart\n").unwrap();
            a
        });
        assert_eq!(read_line(&b).unwrap().as_deref(), Some(long.as_str()));
        let a = writer.join().unwrap();
        assert_eq!(read_line(&b).unwrap().as_deref(), Some("start"));
        drop(a);
        assert_eq!(read_line(&b).unwrap(), None);
    }

    /// The agent sends the host's bytes (pretty-printed here, a file's `ctr run --config`
    /// would be), on one line; the helper reads the spec the host meant, with its cgroup
    /// namespace only where the guest has cgroup v2.
    #[test]
    fn a_request_carries_the_hosts_spec_on_one_line() {
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh", "-c", "echo 'a\nb'"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}
        });
        let pretty = serde_json::to_vec_pretty(&spec).unwrap();
        assert!(pretty.contains(&b'\n'));
        for cgroup_v2 in [true, false] {
            let req = HelperRequest {
                spec: raw_spec(&pretty).unwrap(),
                exec: None,
                terminal: false,
                cgroup_v2,
                no_pivot: false,
                id: "c1".into(),
                netns_sysctls: Vec::new(),
            };
            let line = serde_json::to_string(&req).unwrap();
            assert!(!line.contains('\n'), "{line}");
            let (a, b) = UnixStream::pair().unwrap();
            (&a).write_all(format!("{line}\nstart\n").as_bytes())
                .unwrap();
            let read = read_line(&b).unwrap().unwrap();
            let got = parse_request(read.as_bytes()).unwrap();
            let process = got.spec.process().as_ref().unwrap();
            assert_eq!(process.args().as_ref().unwrap()[2], "echo 'a\nb'");
            let linux = got.spec.linux().as_ref().unwrap();
            let types: Vec<_> = linux
                .namespaces()
                .iter()
                .flatten()
                .map(|n| n.typ())
                .collect();
            let mut want = vec![LinuxNamespaceType::Pid, LinuxNamespaceType::Mount];
            if cgroup_v2 {
                want.push(LinuxNamespaceType::Cgroup);
            }
            assert_eq!(types, want);
            assert_eq!(read_line(&b).unwrap().as_deref(), Some(START_LINE));
        }
        // Not JSON: named, as the parse of the spec the agent did first would.
        assert!(raw_spec(b"{\"a\": ").is_err());
    }
}
