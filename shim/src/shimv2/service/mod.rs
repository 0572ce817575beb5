//! The containerd Task service: every task call from containerd, turned into
//! calls to the agent in the pod VM. Containers of one pod share the VM; the
//! VM boots with the first Create and stops at Shutdown once all are deleted.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cocoon_protocol::agent as pb;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::protos::api;
use containerd_shim::protos::events::task as ev;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{Message, MessageDyn, MessageField};
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::topics;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{TtrpcContext, TtrpcResult};
use tokio::sync::{watch, Mutex};

use super::mounts::ContainerMounts;
use super::persist::ContainerState;
use super::pod;
use super::sandbox::{self, Sandbox};
use super::stdio::{self, StdioCopies, StdioPaths};
use super::timings;
use crate::config::Config;

mod control;
mod lifecycle;
mod start;
mod teardown;
mod undo;
mod util;

use util::{agent_err, err, lookup, not_found, now, to_completion};

/// How long a process's output may keep flowing after it exited.
const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// The exit status reported when the VM dies under a running process.
const VM_LOST_STATUS: u32 = 137;
/// How long a pod's boot waits for the node's record of its VM id held by another
/// process: a sweep, or an earlier pod of the same id still being torn down.
const RECORD_WAIT: Duration = Duration::from_secs(30);

type Exit = Option<(u32, Timestamp)>;

struct Process {
    pid: u32,
    stdio: StdioPaths,
    /// For exec processes: the OCI process (JSON) until it starts.
    spec_json: Vec<u8>,
    started: bool,
    exit: watch::Sender<Exit>,
    copies: Option<Arc<Mutex<StdioCopies>>>,
}

impl Process {
    fn new(stdio: StdioPaths, spec_json: Vec<u8>) -> Self {
        Self {
            pid: 0,
            stdio,
            spec_json,
            started: false,
            exit: watch::channel(None).0,
            copies: None,
        }
    }

    fn status(&self, paused: bool) -> api::Status {
        match (self.exit.borrow().is_some(), self.started, paused) {
            (true, _, _) => api::Status::STOPPED,
            (false, false, _) => api::Status::CREATED,
            (false, true, true) => api::Status::PAUSED,
            (false, true, false) => api::Status::RUNNING,
        }
    }
}

struct Container {
    /// Where this container's time went (written at Delete).
    timing: Arc<std::sync::Mutex<timings::Record>>,
    /// The host's moments of its Create, for the timeline placed at Start.
    marks: timings::HostMarks,
    bundle: PathBuf,
    mounts: ContainerMounts,
    init: Process,
    execs: HashMap<String, Process>,
    paused: bool,
    /// Its OCI hooks that run on the host (`poststart` and `poststop` are still to run).
    hooks: Arc<crate::shimv2::hooks::HostHooks>,
}

/// An id claimed by a Create in progress; given back when the Create ends, either way.
struct CreateClaim<'a> {
    inner: &'a Inner,
    id: &'a str,
}

impl Drop for CreateClaim<'_> {
    fn drop(&mut self) {
        self.inner
            .creating
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(self.id);
    }
}

/// A started process whose exit `watch_exit` waits for.
struct Watched {
    cid: String,
    exec_id: String,
    pid: u32,
    exit: watch::Sender<Exit>,
    copies: Option<Arc<Mutex<StdioCopies>>>,
    timing: Option<Arc<std::sync::Mutex<timings::Record>>>,
}

struct Inner {
    namespace: String,
    /// The grouping id: the pod's sandbox id, or the container id alone.
    group: String,
    config: Config,
    publisher: RemotePublisher,
    exit: Arc<ExitSignal>,
    sandbox: Mutex<Option<Arc<Sandbox>>>,
    containers: Mutex<HashMap<String, Container>>,
    /// Ids whose Create is in progress: claimed with the duplicate check, under the
    /// containers lock, so two Creates of one id cannot both go ahead.
    creating: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Ids of containers being undone or deleted (`undo::Undoing`): a Create of one is
    /// refused meanwhile, and Shutdown waits for them.
    undoing: watch::Sender<std::collections::HashSet<String>>,
    /// Set once the pod's VM has been torn down (by Shutdown or SIGTERM, whichever came
    /// first; the other waits for it).
    torn_down: tokio::sync::OnceCell<()>,
    /// Which guest OOM events reach containerd (`guest_events`).
    oom_filter: std::sync::Mutex<super::guest_events::OomFilter>,
    /// Set by Shutdown: a boot still in progress is abandoned (containerd gave up on
    /// the Create that started it, e.g. kubelet's RunPodSandbox deadline passed).
    cancel_boot: watch::Sender<bool>,
    /// The node's record of the pod's VM, held while this shim runs it (`podrecord`).
    record: std::sync::Mutex<Option<super::podrecord::Held>>,
}

#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

impl Service {
    pub fn new(
        namespace: &str,
        group: &str,
        config: Config,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                namespace: namespace.into(),
                group: group.into(),
                config,
                publisher,
                exit,
                sandbox: Mutex::new(None),
                containers: Mutex::new(HashMap::new()),
                creating: Default::default(),
                undoing: watch::channel(Default::default()).0,
                torn_down: tokio::sync::OnceCell::new(),
                oom_filter: Default::default(),
                cancel_boot: watch::channel(false).0,
                record: Default::default(),
            }),
        }
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let ctx = ttrpc::context::Context::default();
        if let Err(e) = self
            .inner
            .publisher
            .publish(ctx, topic, &self.inner.namespace, event)
            .await
        {
            tracing::warn!("cannot publish {topic}: {e}");
        }
    }

    /// The pod VM, booted on first use (with the pod's network, for a CRI sandbox), and
    /// whether this call booted it. The booting call's container (`cid`, in `bundle`)
    /// records the VM for `shim delete`: what the boot will make before it starts, the
    /// VM itself once it is up.
    async fn sandbox(
        &self,
        pod_vm: pod::PodVm,
        cid: &str,
        bundle: &std::path::Path,
    ) -> Result<(Arc<Sandbox>, bool), ttrpc::Error> {
        let mut slot = self.inner.sandbox.lock().await;
        if let Some(s) = slot.as_ref() {
            return Ok((s.clone(), false));
        }
        let vm_id = sandbox::vm_id(&self.inner.namespace, &self.inner.group);
        let pending = sandbox::pending_state(&self.inner.config, &vm_id, &pod_vm);
        let mut record = self.take_record(&vm_id, &pending).await?;
        undo::save_state(
            bundle,
            &ContainerState {
                container_id: cid.into(),
                ..pending
            },
        );
        let mut cancelled = self.inner.cancel_boot.subscribe();
        // Dropping the boot undoes it (the VM's processes, run dir, share, cgroup).
        let booted = tokio::select! {
            r = Sandbox::start(&self.inner.config, &vm_id, &self.inner.group, pod_vm) => {
                r.map_err(|e| {
                    err(
                        ttrpc::Code::UNAVAILABLE,
                        format!("cannot start the pod VM: {}", util::chain(&e)),
                    )
                })
            }
            _ = cancelled.wait_for(|c| *c) => Err(err(
                ttrpc::Code::CANCELLED,
                "the pod VM's boot was abandoned: the shim is shutting down",
            )),
        };
        let sb = match booted {
            Ok(sb) => Arc::new(sb),
            Err(e) => {
                // What the boot made, it undid.
                record.release();
                return Err(e);
            }
        };
        let vm = sb.state_for("", &Default::default());
        if let Err(e) = record.write(&vm) {
            tracing::warn!("cannot record the pod VM for the node: {e}");
        }
        let janitor = record.janitor_pid();
        *self.inner.record.lock().unwrap_or_else(|e| e.into_inner()) = Some(record);
        undo::save_state(
            bundle,
            &ContainerState {
                container_id: cid.into(),
                ..vm
            },
        );
        *slot = Some(sb.clone());
        super::podmetrics::spawn(&sb, &self.inner.namespace, &self.inner.group, janitor);
        let me = self.clone();
        let watched = sb.clone();
        tokio::spawn(async move { me.forward_oom_events(watched).await });
        Ok((sb, true))
    }

    /// Takes the node's record of the pod VM `vm_id` (`podrecord`: what a dead shim's pod
    /// of the same id left is undone first) and records what the boot will make.
    async fn take_record(
        &self,
        vm_id: &str,
        pending: &ContainerState,
    ) -> Result<super::podrecord::Held, ttrpc::Error> {
        let root = self.inner.config.paths.run_dir.clone();
        let id = vm_id.to_string();
        let taken = tokio::task::spawn_blocking(move || {
            let mut held = super::podrecord::Held::take(&root, &id, RECORD_WAIT)?;
            // Should this shim die before the pod's teardown ends, the janitor undoes it.
            let spawned = held
                .watch_copy()
                .and_then(|record| super::janitor::Janitor::spawn(&root, &id, record));
            match spawned {
                Ok(j) => {
                    tracing::debug!(vm = %id, pid = j.pid(), "the pod's janitor is watching");
                    held.watched_by(j);
                }
                Err(e) => tracing::warn!(
                    vm = %id,
                    "cannot start the pod's janitor (the next shim's sweep covers a death): {e}"
                ),
            }
            Ok::<_, std::io::Error>(held)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        let mut held = taken.map_err(|e| {
            err(
                ttrpc::Code::UNAVAILABLE,
                format!("cannot take the node's record of the pod VM {vm_id}: {e}"),
            )
        })?;
        if let Err(e) = held.write(pending) {
            tracing::warn!("cannot record the pod VM for the node: {e}");
        }
        Ok(held)
    }

    /// On SIGTERM, or once Shutdown ended the shim: tear down every container's mounts
    /// and the VM (waiting for a teardown already under way).
    pub async fn stop_all(&self) {
        let mut containers = self.inner.containers.lock().await;
        for (_, mut c) in containers.drain() {
            c.mounts.cleanup();
            ContainerState::remove(&c.bundle);
        }
        drop(containers);
        self.inner.cancel_boot.send_replace(true);
        self.tear_down().await;
    }

    /// The pod VM, for a call that needs it alive: once one of its host processes died,
    /// such calls fail at once with why, instead of waiting on a guest that is gone.
    async fn live_sandbox(&self) -> Result<Arc<Sandbox>, ttrpc::Error> {
        let sb = self.existing_sandbox().await?;
        match sb.lost() {
            Some(why) => Err(err(
                ttrpc::Code::UNAVAILABLE,
                format!("the pod VM is gone: {why}"),
            )),
            None => Ok(sb),
        }
    }

    async fn existing_sandbox(&self) -> Result<Arc<Sandbox>, ttrpc::Error> {
        self.inner
            .sandbox
            .lock()
            .await
            .clone()
            .ok_or_else(|| not_found("pod VM"))
    }
}

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        _: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let _claim = {
            let containers = self.inner.containers.lock().await;
            let mut creating = self
                .inner
                .creating
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if containers.contains_key(&req.id) || creating.contains(&req.id) {
                return Err(err(
                    ttrpc::Code::ALREADY_EXISTS,
                    format!("container {} already exists", req.id),
                ));
            }
            undo::refuse_undoing(&self.inner, &req.id)?;
            creating.insert(req.id.clone());
            CreateClaim {
                inner: &self.inner,
                id: &req.id,
            }
        };
        let pid = self.create_inner(&req).await?;
        let mut m = ev::TaskCreate::new();
        m.container_id = req.id.clone();
        m.bundle = req.bundle.clone();
        m.rootfs = req.rootfs.clone();
        m.io = MessageField::some(ev::TaskIO {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
            ..Default::default()
        });
        m.pid = pid;
        self.publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(m))
            .await;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    /// To its end, whatever the caller does (`to_completion`): a Start cut after it
    /// claimed the process would leave it marked started with nothing watching its exit
    /// (Wait never returns, Delete is refused), as an ExecSync whose timeout passes mid-
    /// Start would.
    async fn start(
        &self,
        _: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let me = self.clone();
        to_completion(async move { me.start_task(req).await }).await
    }

    /// Undoes a container (unmounts, state file) once taken off the table: to its end,
    /// whatever the caller does (`to_completion`).
    async fn delete(
        &self,
        _: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let me = self.clone();
        to_completion(async move { me.delete_task(req).await }).await
    }

    async fn exec(
        &self,
        _: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        self.live_sandbox().await?;
        let mut containers = self.inner.containers.lock().await;
        let c = containers
            .get_mut(&req.id)
            .ok_or_else(|| not_found(&format!("container {}", req.id)))?;
        if c.execs.contains_key(&req.exec_id) || req.exec_id.is_empty() {
            return Err(err(
                ttrpc::Code::ALREADY_EXISTS,
                format!("exec id {:?} is taken or empty", req.exec_id),
            ));
        }
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        // Validate now, so a bad process spec fails Exec, not Start.
        let mut process = util::parse_process(&spec)?;
        // With the limits runc's exec would inherit.
        super::rlimits::inherit(&mut process);
        let spec = serde_json::to_vec(&process).map_err(|e| err(ttrpc::Code::INTERNAL, e))?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        c.execs
            .insert(req.exec_id.clone(), Process::new(stdio, spec));
        drop(containers);
        let mut m = ev::TaskExecAdded::new();
        m.container_id = req.id.clone();
        m.exec_id = req.exec_id.clone();
        self.publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(m))
            .await;
        Ok(api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let sb = self.existing_sandbox().await?;
        sb.agent
            .tty_resize(&req.id, &req.exec_id, req.height, req.width)
            .await
            .map_err(agent_err)?;
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        if !req.stdin {
            return Ok(api::Empty::new());
        }
        let copies = {
            let containers = self.inner.containers.lock().await;
            let (_, p) = lookup(&containers, &req.id, &req.exec_id)?;
            p.copies.clone()
        };
        if let Some(c) = copies {
            c.lock().await.close_stdin();
        }
        Ok(api::Empty::new())
    }

    /// To its end, whatever the caller does (`to_completion`): one cut between the
    /// signal and watching an unstarted container would leave its Wait hanging.
    async fn kill(&self, _: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let me = self.clone();
        to_completion(async move { me.kill_task(req).await }).await
    }

    async fn pids(
        &self,
        _: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let sb = self.existing_sandbox().await?;
        let r = sb.agent.list_pids(&req.id).await.map_err(agent_err)?;
        // An exec's process is described by its id, as runc's shim does; only ids of
        // this container's execs are passed on, whatever the guest says.
        let containers = self.inner.containers.lock().await;
        let known = |id: &str| {
            containers
                .get(&req.id)
                .is_some_and(|c| c.execs.contains_key(id))
        };
        let processes = r
            .processes
            .into_iter()
            .map(|p| api::ProcessInfo {
                pid: p.pid,
                info: known(&p.exec_id)
                    .then(|| util::process_details(&p.exec_id))
                    .into(),
                ..Default::default()
            })
            .collect();
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    /// To its end (`to_completion`), so the state it reports matches the guest's.
    async fn pause(&self, _: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        let me = self.clone();
        to_completion(async move { me.pause_task(&req.id, true).await }).await
    }

    /// To its end (`to_completion`), so the state it reports matches the guest's.
    async fn resume(&self, _: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        let me = self.clone();
        to_completion(async move { me.pause_task(&req.id, false).await }).await
    }

    async fn checkpoint(
        &self,
        _: &TtrpcContext,
        _: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(err(
            ttrpc::Code::UNIMPLEMENTED,
            "checkpoint is not supported by cocoon",
        ))
    }

    /// To its end (`to_completion`): the limits the shim counts match the guest's.
    async fn update(
        &self,
        _: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let me = self.clone();
        to_completion(async move { me.update_task(req).await }).await
    }

    async fn wait(
        &self,
        _: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let mut rx = {
            let containers = self.inner.containers.lock().await;
            let (_, p) = lookup(&containers, &req.id, &req.exec_id)?;
            p.exit.subscribe()
        };
        let exit = rx
            .wait_for(|e| e.is_some())
            .await
            .map_err(|_| err(ttrpc::Code::UNAVAILABLE, "the process was removed"))?
            .clone()
            .expect("waited for Some");
        Ok(api::WaitResponse {
            exit_status: exit.0,
            exited_at: MessageField::some(exit.1),
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let sb = self.existing_sandbox().await?;
        let s = sb.agent.stats_container(&req.id).await.map_err(agent_err)?;
        let metrics = super::metrics::to_cgroups_v2(&s);
        let mut any = Any::new();
        any.type_url = "io.containerd.cgroups.v2.Metrics".into();
        any.value = metrics
            .write_to_bytes()
            .map_err(|e| err(ttrpc::Code::INTERNAL, e))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    async fn state(
        &self,
        _: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let containers = self.inner.containers.lock().await;
        let (c, p) = lookup(&containers, &req.id, &req.exec_id)?;
        let exit = p.exit.borrow().clone();
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.to_string_lossy().into_owned(),
            pid: p.pid,
            status: p.status(c.paused).into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: exit.as_ref().map(|e| e.0).unwrap_or(0),
            exited_at: MessageField::from_option(exit.map(|e| e.1)),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self
            .inner
            .containers
            .lock()
            .await
            .get(&req.id)
            .map(|c| c.init.pid)
            .unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    /// Stops the VM and ends the shim once no container is left: to its end, whatever
    /// the caller does (`to_completion`).
    async fn shutdown(&self, _: &TtrpcContext, _: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        let me = self.clone();
        to_completion(async move { me.shutdown_shim().await }).await
    }
}

/// Reads the guest's clock and timeline and records the container's whole start on the
/// host's clock, as a `timeline` record of its own (best effort, like all timings).
async fn place_timeline(
    sb: Arc<Sandbox>,
    id: String,
    marks: timings::HostMarks,
    start: (std::time::Instant, std::time::Instant),
    run_dir: PathBuf,
) {
    let asked = std::time::Instant::now();
    let details = match sb.agent.guest_details().await {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(container = %id, "no timeline: {e}");
            return;
        }
    };
    let clock = timings::GuestClock {
        asked,
        answered: std::time::Instant::now(),
        boottime_ns: details.boottime_ns,
    };
    // Cached per host boot once any TCG VM started; else measured here, off the runtime.
    let khz_dir = run_dir.clone();
    let tsc_khz = tokio::task::spawn_blocking(move || cocoon_rootfs::tsc::host_khz(Some(&khz_dir)))
        .await
        .unwrap_or(0);
    let rec = timings::Record {
        kind: "timeline".into(),
        timeline: timings::timeline(&marks, start, &clock, &details, &id, tsc_khz),
        clock_uncertainty_ms: clock.uncertainty_ms(),
        container_id: id,
        vm_id: sb.id.clone(),
        ..Default::default()
    };
    timings::append(&run_dir, &rec);
}
