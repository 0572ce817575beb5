//! The containers of the pod: creation through the runtime helper, the
//! processes they run, their cgroups, and removal. Each operation here is
//! what one container RPC does, minus the protobuf.

mod net_sysctls;
mod nofile;
mod process;
mod spawn;
mod storages;
mod validate;

pub use spawn::CALL_DEADLINE;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cocoon_protocol::agent::{StdioStreams, Storage};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use thiserror::Error;

pub use process::Process;
pub use spawn::SpawnError;

use crate::cgroup::{self, Cgroup, CgroupError, Limits};
use crate::reaper::{Exit, Reaper};
use crate::runtime::{ExecTarget, HelperMessage, HelperRequest, RawSpec, START_LINE};
use crate::stdio::{ProcessIo, ProcessLookup, StdioError};
use storages::{mount_storages, unmount_all};

#[derive(Debug, Error)]
pub enum ContainerError {
    #[error("container {0} not found")]
    NotFound(String),
    #[error("process {1:?} of container {0} not found")]
    ProcessNotFound(String, String),
    #[error("container {0} already exists")]
    Exists(String),
    #[error("process {1:?} already exists in container {0}")]
    ProcessExists(String, String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("the spec asks what runc refuses")]
    Refused(#[from] validate::ValidateError),
    #[error("container {0} is {1:?}, which does not allow this")]
    State(String, Status),
    #[error("process {1:?} of container {0} has already exited")]
    Exited(String, String),
    #[error("this needs cgroup v2, which the guest does not have")]
    NoCgroup,
    #[error("cannot set up the process's stdio")]
    Stdio(#[from] StdioError),
    #[error("cannot start the process")]
    Spawn(#[from] SpawnError),
    #[error("cgroup")]
    Cgroup(#[from] CgroupError),
    #[error("cannot mount storage on {0}")]
    Storage(String, #[source] nix::Error),
    #[error("cannot send signal {1} to pid {0}")]
    Signal(i32, i32, #[source] nix::Error),
    #[error("the container's processes did not exit within {0:?}")]
    KillTimeout(Duration),
    #[error("cannot move the pod's network into its sandbox's network namespace")]
    PodNetwork(#[from] crate::network::NetError),
}

impl ContainerError {
    pub fn code(&self) -> ttrpc::Code {
        match self {
            Self::NotFound(_) | Self::ProcessNotFound(..) | Self::Exited(..) => {
                ttrpc::Code::NOT_FOUND
            }
            Self::Exists(_) | Self::ProcessExists(..) => ttrpc::Code::ALREADY_EXISTS,
            Self::Invalid(_) | Self::Refused(_) => ttrpc::Code::INVALID_ARGUMENT,
            Self::State(..) | Self::NoCgroup => ttrpc::Code::FAILED_PRECONDITION,
            Self::KillTimeout(_) => ttrpc::Code::DEADLINE_EXCEEDED,
            _ => ttrpc::Code::INTERNAL,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}

/// How many waited-for execs a container remembers the exit of.
const REAPED_EXECS_KEPT: usize = 32;

#[derive(Debug)]
pub struct Container {
    pub id: String,
    spec: Spec,
    /// The spec's bytes as the host gave them, for the runtime helper.
    raw_spec: RawSpec,
    cgroup: Option<Cgroup>,
    pub init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    /// Execs already waited for and forgotten, with their exits, newest last (bounded:
    /// only for a repeated wait).
    reaped_execs: Mutex<std::collections::VecDeque<(String, Exit)>>,
    /// The init's sync socket, held until StartContainer.
    sync: tokio::sync::Mutex<Option<spawn::SyncChannel>>,
    status: Mutex<Status>,
    storages: Vec<PathBuf>,
    /// Last `oom_kill` count seen in memory.events.
    oom_kills: std::sync::atomic::AtomicU64,
}

impl Container {
    pub fn status(&self) -> Status {
        let s = *self.status.lock().unwrap_or_else(|e| e.into_inner());
        if s != Status::Creating && s != Status::Created && self.init.exited().is_some() {
            return Status::Stopped;
        }
        s
    }

    fn set_status(&self, s: Status) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }

    fn has_own_pid_ns(&self) -> bool {
        self.spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .is_some_and(|ns| {
                ns.iter()
                    .any(|n| n.typ() == LinuxNamespaceType::Pid && n.path().is_none())
            })
    }

    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>, ContainerError> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(exec_id)
            .cloned()
            .ok_or_else(|| ContainerError::ProcessNotFound(self.id.clone(), exec_id.into()))
    }

    fn processes(&self) -> Vec<Arc<Process>> {
        let mut v = vec![self.init.clone()];
        v.extend(
            self.execs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .cloned(),
        );
        v
    }

    /// Every live process of the container: from its cgroup; without one,
    /// those sharing the init's pid namespace; else the ones we started.
    pub fn pids(&self) -> Vec<i32> {
        if let Some(cg) = &self.cgroup {
            if let Ok(p) = cg.pids() {
                return p;
            }
        }
        let init = self.init.pid();
        if init > 0 && self.init.exited().is_none() && self.has_own_pid_ns() {
            if let Some(ns) = pid_ns_of(init) {
                return all_pids()
                    .into_iter()
                    .filter(|p| pid_ns_of(*p) == Some(ns))
                    .collect();
            }
        }
        self.processes()
            .iter()
            .filter(|p| p.pid() > 0 && p.exited().is_none())
            .map(|p| p.pid())
            .collect()
    }

    pub fn cgroup(&self) -> Option<&Cgroup> {
        self.cgroup.as_ref()
    }

    /// Checks `memory.events` for new OOM kills.
    pub fn new_oom_kill(&self) -> bool {
        let Some(cg) = &self.cgroup else {
            return false;
        };
        let now = cg.oom_kills();
        let before = self
            .oom_kills
            .swap(now, std::sync::atomic::Ordering::Relaxed);
        now > before
    }
}

fn pid_ns_of(pid: i32) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/ns/pid"))
        .ok()
        .map(|m| m.ino())
}

fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn validate_id(what: &str, id: &str, allow_empty: bool) -> Result<(), ContainerError> {
    if id.is_empty() && allow_empty {
        return Ok(());
    }
    let ok = !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ContainerError::Invalid(format!("bad {what} {id:?}")))
    }
}

/// How containers are set up; the defaults are the guest's.
#[derive(Debug, Default)]
pub struct Options {
    /// Always use the no-pivot root switch.
    pub no_pivot: bool,
    /// The cgroup v2 directory to create container groups under
    /// (default /sys/fs/cgroup).
    pub cgroup_root: Option<PathBuf>,
}

/// All containers of the sandbox.
#[derive(Debug)]
pub struct Containers {
    map: Mutex<HashMap<String, Arc<Container>>>,
    reaper: Arc<Reaper>,
    /// The cgroup v2 root, when the guest has one.
    cgroup_root: Option<PathBuf>,
    /// Always use the no-pivot root switch (a dev-mode option for tests).
    no_pivot: bool,
    /// Notified when a container is added (the OOM watcher watches its cgroup then).
    pub added: tokio::sync::Notify,
}

impl ProcessLookup for Containers {
    fn process_io(&self, container_id: &str, exec_id: &str) -> Option<Arc<ProcessIo>> {
        let c = self.get(container_id).ok()?;
        c.process(exec_id).ok().map(|p| p.io.clone())
    }
}

impl Containers {
    pub fn new(reaper: Arc<Reaper>, opts: Options) -> Self {
        let root = opts
            .cgroup_root
            .unwrap_or_else(|| PathBuf::from(cgroup::CGROUP_ROOT));
        let cgroup_root = if cgroup::is_v2(&root) {
            Some(root)
        } else {
            tracing::warn!(
                "no cgroup v2 at {}: containers run without resource limits, \
                 pause, stats or OOM events",
                root.display()
            );
            None
        };
        let no_pivot = opts.no_pivot;
        Containers {
            map: Mutex::new(HashMap::new()),
            reaper,
            cgroup_root,
            no_pivot,
            added: tokio::sync::Notify::new(),
        }
    }

    pub fn get(&self, id: &str) -> Result<Arc<Container>, ContainerError> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound(id.to_string()))
    }

    pub fn all(&self) -> Vec<Arc<Container>> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// CreateContainer: sets up the init process, stopped before execve.
    pub async fn create(
        &self,
        id: &str,
        spec_json: &[u8],
        storages: &[Storage],
        stdio: &StdioStreams,
    ) -> Result<i32, ContainerError> {
        validate_id("container id", id, false)?;
        // First: the caller removes what a failed create left, unless it says Exists.
        if self.get(id).is_ok() {
            return Err(ContainerError::Exists(id.into()));
        }
        let spec: Spec = serde_json::from_slice(spec_json)
            .map_err(|e| ContainerError::Invalid(format!("OCI spec: {e}")))?;
        // What the helper gets: these bytes, not a serialization of the parsed copy.
        let raw_spec = crate::runtime::raw_spec(spec_json)
            .map_err(|e| ContainerError::Invalid(format!("OCI spec: {e}")))?;
        if spec.root().is_none() {
            return Err(ContainerError::Invalid(
                "the OCI spec needs process and root".into(),
            ));
        }
        validate::spec(&spec)?;
        if let Some(process) = spec.process() {
            nofile::make_room_in_guest(process);
        }
        let timeline = &crate::details::TIMELINE;
        let mounted = mount_storages(storages)?;
        timeline.mark("container-storage-mounted", id);
        let cgroup = match self.setup_cgroup(id, &spec) {
            Ok(c) => c,
            Err(e) => {
                unmount_all(&mounted);
                return Err(e);
            }
        };
        timeline.mark("container-cgroup-set-up", id);
        let (io, child_stdio) = match ProcessIo::new(stdio) {
            Ok(v) => v,
            Err(e) => {
                self.undo_create(None, cgroup.as_ref(), &mounted).await;
                return Err(e.into());
            }
        };
        let container = Arc::new(Container {
            id: id.to_string(),
            spec: spec.clone(),
            raw_spec: raw_spec.clone(),
            cgroup: cgroup.clone(),
            init: Process::new("", io),
            execs: Mutex::new(HashMap::new()),
            reaped_execs: Mutex::new(std::collections::VecDeque::new()),
            sync: tokio::sync::Mutex::new(None),
            status: Mutex::new(Status::Creating),
            storages: mounted.clone(),
            oom_kills: Default::default(),
        });
        {
            // Registered before the process exists so the host may connect
            // its streams at any time from here on.
            let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            if map.contains_key(id) {
                drop(map);
                unmount_all(&mounted);
                return Err(ContainerError::Exists(id.into()));
            }
            map.insert(id.to_string(), container.clone());
            self.added.notify_one();
        }
        let netns_sysctls = net_sysctls::for_new_netns(&spec, Path::new("/proc/sys"));
        let req = HelperRequest {
            spec: raw_spec,
            exec: None,
            terminal: stdio.terminal,
            cgroup_v2: self.cgroup_root.is_some(),
            no_pivot: self.no_pivot,
            id: id.into(),
            netns_sysctls,
        };
        let result = async {
            timeline.mark("container-helper-spawning", id);
            let spawn::Spawned {
                pid,
                mut sync,
                helper_main_ns,
                oom_kills_before,
            } = spawn::spawn(&req, child_stdio, cgroup.as_ref(), &self.reaper).await?;
            if let Some(ns) = helper_main_ns {
                timeline.mark_at("container-helper-main", id, ns);
            }
            timeline.mark("container-helper-started", id);
            container.init.set_pid(pid, &self.reaper);
            if req.terminal {
                // Sized to the spec's consoleSize by the runtime already.
                let master = sync.expect_console().await?;
                container.init.io.attach_terminal(master)?;
            }
            if crate::runtime::takes_pod_network(&spec) {
                // When the sandbox asks: its namespaces are made by then.
                match sync.recv_or_gone().await? {
                    Some(HelperMessage::Network) => {}
                    Some(HelperMessage::Error(e)) => return Err(SpawnError::Runtime(e).into()),
                    Some(other) => return Err(SpawnError::Unexpected(other).into()),
                    None => return Err(spawn::ended(cgroup.as_ref(), oom_kills_before).into()),
                }
                crate::network::move_into(pid).await?;
                timeline.mark("container-pod-network-moved", id);
                sync.send_line(crate::runtime::NETWORK_LINE).await?;
            }
            match sync.recv_or_gone().await? {
                Some(HelperMessage::Ready) => Ok((pid, sync)),
                Some(HelperMessage::Error(e)) => Err(SpawnError::Runtime(e).into()),
                Some(other) => Err(SpawnError::Unexpected(other).into()),
                None => Err(spawn::ended(cgroup.as_ref(), oom_kills_before).into()),
            }
        }
        .await;
        match result {
            Ok((pid, sync)) => {
                *container.sync.lock().await = Some(sync);
                container.set_status(Status::Created);
                tracing::debug!(container = id, pid, "container created");
                Ok(pid)
            }
            Err(e) => {
                container.init.io.abandon();
                self.map
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(id);
                self.undo_create(Some(&container), cgroup.as_ref(), &mounted)
                    .await;
                Err(e)
            }
        }
    }

    fn setup_cgroup(&self, id: &str, spec: &Spec) -> Result<Option<Cgroup>, ContainerError> {
        let Some(root) = &self.cgroup_root else {
            return Ok(None);
        };
        let cg = Cgroup::create(root, id)?;
        let res = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
        if let Some(res) = res {
            if let Err(e) = cg.apply(&Limits::from(res)) {
                let _ = std::fs::remove_dir(cg.path());
                return Err(e.into());
            }
        }
        // The device cgroup: the spec's rules, then runc's defaults.
        let mut rules = crate::devfilter::from_spec(
            res.and_then(|r| r.devices().as_deref()).unwrap_or_default(),
        );
        rules.extend(crate::devfilter::defaults());
        if let Err(e) = crate::devfilter::attach(cg.path(), &rules) {
            let _ = std::fs::remove_dir(cg.path());
            return Err(CgroupError::Devices(cg.path().to_path_buf(), e).into());
        }
        Ok(Some(cg))
    }

    async fn undo_create(
        &self,
        container: Option<&Arc<Container>>,
        cgroup: Option<&Cgroup>,
        mounted: &[PathBuf],
    ) {
        if let Some(c) = container {
            let pid = c.init.pid();
            if pid > 0 {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                let _ = tokio::time::timeout(Duration::from_secs(5), c.init.exit()).await;
            }
        }
        if let Some(cg) = cgroup {
            let _ = cg.remove().await;
        }
        unmount_all(mounted);
    }

    /// StartContainer: lets the init exec.
    pub async fn start(&self, id: &str) -> Result<(), ContainerError> {
        let c = self.get(id)?;
        let mut slot = c.sync.lock().await;
        let Some(mut sync) = slot.take() else {
            return Err(ContainerError::State(id.into(), c.status()));
        };
        sync.send_line(START_LINE).await?;
        if let Err(e) = sync.expect_exec().await {
            // Never running after its caller was told it failed (its startContainer
            // hooks outlasting the wait, say).
            let pid = c.init.pid();
            if pid > 0 {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            return Err(e.into());
        }
        c.set_status(Status::Running);
        tracing::debug!(container = id, "container started");
        Ok(())
    }

    /// ExecProcess: runs `process_json` in the container; returns its pid.
    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
        stdio: &StdioStreams,
    ) -> Result<i32, ContainerError> {
        validate_id("exec id", exec_id, false)?;
        let c = self.get(id)?;
        match c.status() {
            Status::Running => {}
            s => return Err(ContainerError::State(id.into(), s)),
        }
        let process: oci_spec::runtime::Process = serde_json::from_slice(process_json)
            .map_err(|e| ContainerError::Invalid(format!("OCI process: {e}")))?;
        validate::process(&process)?;
        nofile::make_room_in_guest(&process);
        let (io, child_stdio) = ProcessIo::new(stdio)?;
        let p = Process::new(exec_id, io);
        {
            let mut execs = c.execs.lock().unwrap_or_else(|e| e.into_inner());
            if execs.contains_key(exec_id) {
                return Err(ContainerError::ProcessExists(id.into(), exec_id.into()));
            }
            execs.insert(exec_id.to_string(), p.clone());
        }
        let req = HelperRequest {
            spec: c.raw_spec.clone(),
            exec: Some(ExecTarget {
                init_pid: c.init.pid(),
                process,
            }),
            terminal: stdio.terminal,
            cgroup_v2: self.cgroup_root.is_some(),
            no_pivot: self.no_pivot,
            id: id.into(),
            netns_sysctls: Vec::new(),
        };
        let result = async {
            let spawn::Spawned { pid, mut sync, .. } =
                spawn::spawn(&req, child_stdio, c.cgroup.as_ref(), &self.reaper).await?;
            p.set_pid(pid, &self.reaper);
            if req.terminal {
                p.io.attach_terminal(sync.expect_console().await?)?;
            }
            sync.expect_exec().await?;
            Ok::<_, ContainerError>(pid)
        }
        .await;
        match result {
            Ok(pid) => {
                tracing::debug!(container = id, exec = exec_id, pid, "exec started");
                Ok(pid)
            }
            Err(e) => {
                p.io.abandon();
                c.execs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(exec_id);
                Err(e)
            }
        }
    }

    /// SignalProcess.
    pub fn signal(
        &self,
        id: &str,
        exec_id: &str,
        signal: i32,
        all: bool,
    ) -> Result<(), ContainerError> {
        let c = self.get(id)?;
        // Any signal the kernel knows, the real-time ones included, and 0 (a liveness
        // probe), as runc sends them.
        if !(0..=libc::SIGRTMAX()).contains(&signal) {
            return Err(ContainerError::Invalid(format!("unknown signal {signal}")));
        }
        // `all` reaches every process of the container; an exec's signal only ever
        // reaches that exec.
        if all && exec_id.is_empty() {
            for pid in c.pids() {
                // A process may exit meanwhile; that is fine.
                let _ = spawn::send_signal(pid, signal);
            }
            return Ok(());
        }
        let p = c.process(exec_id)?;
        if p.pid() <= 0 || p.exited().is_some() {
            return Err(ContainerError::Exited(id.into(), exec_id.into()));
        }
        match spawn::send_signal(p.pid(), signal) {
            Ok(()) => Ok(()),
            Err(nix::Error::ESRCH) => Err(ContainerError::Exited(id.into(), exec_id.into())),
            Err(e) => Err(ContainerError::Signal(p.pid(), signal, e)),
        }
    }

    /// WaitProcess: the exit status once output is drained. An exec is forgotten once
    /// its exit has been collected (its record, its terminal): exec probes would
    /// otherwise exhaust the guest's fds. A repeated wait still gets the status from a
    /// short, bounded list.
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<Exit, ContainerError> {
        let c = self.get(id)?;
        if !exec_id.is_empty() {
            let reaped = c.reaped_execs.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, exit)) = reaped.iter().rev().find(|(e, _)| e == exec_id) {
                return Ok(*exit);
            }
        }
        let p = c.process(exec_id)?;
        let exit = p.wait().await;
        if !exec_id.is_empty() {
            let forgotten = c
                .execs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(exec_id);
            if forgotten.is_some() {
                let mut reaped = c.reaped_execs.lock().unwrap_or_else(|e| e.into_inner());
                reaped.push_back((exec_id.to_string(), exit));
                while reaped.len() > REAPED_EXECS_KEPT {
                    reaped.pop_front();
                }
            }
        }
        Ok(exit)
    }

    /// RemoveContainer: kills what is left, then forgets the container.
    pub async fn remove(&self, id: &str, timeout: Duration) -> Result<(), ContainerError> {
        let c = self.get(id)?;
        // A frozen group would keep the kill from completing.
        if c.status() == Status::Paused {
            if let Some(cg) = &c.cgroup {
                let _ = cg.set_frozen(false, Duration::from_secs(5)).await;
            }
        }
        c.sync.lock().await.take();
        kill_all(&c, timeout).await?;
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        // Unmount even when the cgroup will not go: a failed removal must not leave
        // the container's mounts behind for the pod's life.
        unmount_all(&c.storages);
        // Its disks' dirty pages, written back before the host may take a disk away.
        let disks: Vec<(u64, u64)> = c
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.devices().as_ref())
            .map(|d| {
                d.iter()
                    .filter(|d| d.typ() == oci_spec::runtime::LinuxDeviceType::B)
                    .map(|d| (d.major() as u64, d.minor() as u64))
                    .collect()
            })
            .unwrap_or_default();
        if !disks.is_empty() {
            let _ = tokio::task::spawn_blocking(move || crate::disks::flush(&disks)).await;
        }
        if let Some(cg) = &c.cgroup {
            cg.remove().await?;
        }
        tracing::debug!(container = id, "container removed");
        Ok(())
    }

    pub async fn pause(&self, id: &str) -> Result<(), ContainerError> {
        let c = self.get(id)?;
        let cg = c.cgroup.as_ref().ok_or(ContainerError::NoCgroup)?;
        match c.status() {
            Status::Running => {}
            s => return Err(ContainerError::State(id.into(), s)),
        }
        cg.set_frozen(true, Duration::from_secs(10)).await?;
        c.set_status(Status::Paused);
        Ok(())
    }

    pub async fn resume(&self, id: &str) -> Result<(), ContainerError> {
        let c = self.get(id)?;
        let cg = c.cgroup.as_ref().ok_or(ContainerError::NoCgroup)?;
        match c.status() {
            Status::Paused => {}
            s => return Err(ContainerError::State(id.into(), s)),
        }
        cg.set_frozen(false, Duration::from_secs(10)).await?;
        c.set_status(Status::Running);
        Ok(())
    }

    pub fn update(&self, id: &str, limits: &Limits) -> Result<(), ContainerError> {
        let c = self.get(id)?;
        let cg = c.cgroup.as_ref().ok_or(ContainerError::NoCgroup)?;
        cg.apply(limits)?;
        Ok(())
    }

    /// ListPids: every process with the exec id we know it by.
    pub fn list_pids(&self, id: &str) -> Result<Vec<(i32, String)>, ContainerError> {
        let c = self.get(id)?;
        let known: HashMap<i32, String> = c
            .processes()
            .iter()
            .filter(|p| p.pid() > 0)
            .map(|p| (p.pid(), p.exec_id.clone()))
            .collect();
        let mut pids = c.pids();
        pids.sort_unstable();
        Ok(pids
            .into_iter()
            .map(|p| (p, known.get(&p).cloned().unwrap_or_default()))
            .collect())
    }

    /// SIGTERMs every process of every container and waits, up to `grace`,
    /// for the inits to exit (Shutdown).
    pub async fn terminate_all(&self, grace: Duration) {
        let all = self.all();
        for c in &all {
            for pid in c.pids() {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        let exits = all
            .iter()
            .filter(|c| c.init.pid() > 0)
            .map(|c| c.init.exit());
        let done = async {
            for e in exits {
                e.await;
            }
        };
        if tokio::time::timeout(grace, done).await.is_err() {
            tracing::warn!(?grace, "containers still running at power-off");
        }
    }

    /// Kills every container (DestroySandbox).
    pub async fn remove_all(&self, timeout: Duration) {
        for c in self.all() {
            if let Err(e) = self.remove(&c.id, timeout).await {
                tracing::warn!(container = %c.id, "remove failed: {e}");
            }
        }
    }
}

/// SIGKILLs every process of the container and waits for the init to go.
async fn kill_all(c: &Container, timeout: Duration) -> Result<(), ContainerError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let pids = c.pids();
        let init_alive = c.init.pid() > 0 && c.init.exited().is_none();
        if pids.is_empty() && !init_alive {
            return Ok(());
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        if init_alive {
            let _ = kill(Pid::from_raw(c.init.pid()), Signal::SIGKILL);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ContainerError::KillTimeout(timeout));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
