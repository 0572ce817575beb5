//! ttrpc service implementations: protobuf in, domain calls, protobuf out.
//! Calls not implemented yet fall through to the generated defaults, which
//! answer "not implemented" with the method name.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cocoon_protocol::agent::{
    health_check_response::ServingStatus, CheckRequest, ContainerRequest, CpuStats,
    CreateContainerRequest, CreateContainerResponse, CreateSandboxRequest, DestroySandboxRequest,
    Empty, ExecProcessRequest, ExecProcessResponse, GetEvidenceRequest, GetEvidenceResponse,
    GuestDetailsRequest, GuestDetailsResponse, HealthCheckResponse, Interface, Interfaces, IoStats,
    ListPidsResponse, MemoryStats, NetworkStats, OnlineCpusRequest, OnlineCpusResponse, OomEvent,
    PidsStats, ProcessInfo, ProcessRequest, RemoveContainerRequest, Routes, SetInitDataRequest,
    SetInitDataResponse, ShutdownRequest, SignalProcessRequest, StatsContainerResponse,
    TtyWinResizeRequest, UpdateContainerRequest, UpdateInterfaceRequest, UpdateRoutesRequest,
    VersionCheckResponse, WaitProcessResponse,
};
use cocoon_protocol::agent_ttrpc::{Agent, Health};
use cocoon_protocol::PROTOCOL_VERSION;
use ttrpc::r#async::TtrpcContext;

use crate::cgroup::Limits;
use crate::container::CALL_DEADLINE;
use crate::container::{ContainerError, Containers};
use crate::{details, network, power, sandbox};

mod create;
use create::remove_container_files;

fn status(code: ttrpc::Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

/// The whole error chain in one message: the host logs it as is.
/// When this call must have its answer: the host's ttrpc timeout less a margin for the
/// reply's way back (a tenth, between 200 ms and 1 s), or no bound of its own.
pub fn call_deadline(ctx: &TtrpcContext) -> tokio::time::Instant {
    deadline_for(tokio::time::Instant::now(), ctx.timeout_nano)
}

fn deadline_for(now: tokio::time::Instant, timeout_nano: i64) -> tokio::time::Instant {
    if timeout_nano <= 0 {
        return now + Duration::from_secs(24 * 3600);
    }
    let t = Duration::from_nanos(timeout_nano as u64);
    let margin = (t / 10).clamp(Duration::from_millis(200), Duration::from_secs(1));
    now + t.saturating_sub(margin)
}

fn net_error(e: network::NetError) -> ttrpc::Error {
    let msg = crate::runtime::error_chain(&e);
    tracing::warn!("network request failed: {msg}");
    status(e.code(), msg)
}

fn rpc_error(e: ContainerError) -> ttrpc::Error {
    let msg = crate::runtime::error_chain(&e);
    tracing::debug!("request failed: {msg}");
    status(e.code(), msg)
}

/// Stats of the interfaces of a process's network namespace.
fn net_stats(pid: i32) -> Vec<NetworkStats> {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/dev")) else {
        return Vec::new();
    };
    parse_net_dev(&text)
}

/// /proc/net/dev: two header lines, then `name: rx(8 fields) tx(8 fields)`.
pub fn parse_net_dev(text: &str) -> Vec<NetworkStats> {
    text.lines()
        .skip(2)
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let v: Vec<u64> = rest
                .split_whitespace()
                .map(|f| f.parse().unwrap_or(0))
                .collect();
            if v.len() < 16 {
                return None;
            }
            let mut n = NetworkStats::new();
            n.name = name.trim().to_string();
            n.rx_bytes = v[0];
            n.rx_packets = v[1];
            n.rx_errors = v[2];
            n.rx_dropped = v[3];
            n.tx_bytes = v[8];
            n.tx_packets = v[9];
            n.tx_errors = v[10];
            n.tx_dropped = v[11];
            Some(n)
        })
        .collect()
}

/// Facts gathered at start-up, shared by the handlers.
#[derive(Debug)]
pub struct AgentState {
    pub start_boottime_ns: i64,
    /// The TSC at the same moment (see `details::tsc`).
    pub start_tsc: u64,
    pub init_ns: i64,
    /// Modules loaded so far (boot-critical first, then the deferred ones).
    pub modules: std::sync::Mutex<Vec<String>>,
    /// Set once the deferred modules are in (or failed to load).
    pub modules_done: tokio::sync::watch::Sender<Option<Result<(), String>>>,
    /// The on-demand modules not loaded yet (`modules::load_on_demand`).
    pub on_demand: std::sync::Mutex<Vec<crate::modules::ModuleEntry>>,
    pub cmdline: String,
    /// Guest boot time when the server started listening (set once).
    pub server_ready_boottime_ns: std::sync::atomic::AtomicI64,
    /// OOM kills in the guest, for the GetOomEvent long poll.
    pub oom_events: crate::oomqueue::OomQueue,
    /// Forged OOM events answered (debug-armed hostile-guest tests only).
    pub forged_ooms: std::sync::atomic::AtomicUsize,
    /// Whether the agent is the guest's PID 1 (not the dev mode).
    pub is_init: bool,
    pub containers: Arc<Containers>,
    /// The pod's init-data and agent policy (see `crate::policy`).
    pub policy: Arc<crate::policy::Gate>,
}

pub struct HealthService;

#[async_trait]
impl Health for HealthService {
    async fn check(&self, _: &TtrpcContext, _: CheckRequest) -> ttrpc::Result<HealthCheckResponse> {
        let mut r = HealthCheckResponse::new();
        r.status = ServingStatus::SERVING.into();
        Ok(r)
    }

    async fn version(
        &self,
        _: &TtrpcContext,
        _: CheckRequest,
    ) -> ttrpc::Result<VersionCheckResponse> {
        let mut r = VersionCheckResponse::new();
        r.agent_version = env!("CARGO_PKG_VERSION").to_string();
        r.protocol_version = PROTOCOL_VERSION;
        r.build_id = option_env!("COCOON_BUILD_ID").unwrap_or("").to_string();
        Ok(r)
    }
}

pub struct AgentService {
    state: Arc<AgentState>,
}

impl AgentService {
    pub fn new(state: Arc<AgentState>) -> Self {
        Self { state }
    }

    fn containers(&self) -> &Containers {
        &self.state.containers
    }

    /// Asks the pod's policy about `call` with `req` as its input.
    fn allow<M: protobuf::MessageFull>(&self, call: &str, req: &M) -> ttrpc::Result<()> {
        self.state
            .policy
            .check(call, || crate::policy::input_of(req))
            .map_err(|denied| {
                tracing::warn!(call, "refused: {denied}");
                status(ttrpc::Code::PERMISSION_DENIED, denied.to_string())
            })
    }
}

impl AgentService {
    /// Publishes an OOM event for `container_id` if its cgroup counted a new
    /// OOM kill (each kill is reported once, by whoever sees it first).
    fn report_oom(&self, container_id: &str) {
        if let Ok(c) = self.containers().get(container_id) {
            self.state.report_new_oom(&c);
        }
    }
}

impl AgentState {
    /// Publishes an OOM event for `c` if its cgroup counted a new OOM kill: the exit
    /// paths and the OOM watcher both call this, and each kill is reported once.
    pub fn report_new_oom(&self, c: &crate::container::Container) {
        if c.new_oom_kill() {
            tracing::info!(container = %c.id, "OOM kill");
            self.oom_events.push(c.id.clone());
        }
    }
}

impl AgentService {
    async fn exec_process_inner(
        &self,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<ExecProcessResponse> {
        let pid = self
            .containers()
            .exec(
                &req.container_id,
                &req.exec_id,
                &req.process_json,
                req.stdio.get_or_default(),
            )
            .await
            .map_err(rpc_error)?;
        let mut r = ExecProcessResponse::new();
        r.pid = pid as u32;
        Ok(r)
    }
}

#[async_trait]
impl Agent for AgentService {
    async fn set_init_data(
        &self,
        _: &TtrpcContext,
        req: SetInitDataRequest,
    ) -> ttrpc::Result<SetInitDataResponse> {
        let data = self
            .state
            .policy
            .set_init_data(&req.toml)
            .map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, e))?;
        tracing::info!(
            digest = %hex_string(&data.digest),
            policy = data.policy().is_some(),
            "init-data set"
        );
        let mut r = SetInitDataResponse::new();
        r.digest = data.digest.clone();
        r.policy = data.policy().is_some();
        Ok(r)
    }

    async fn get_guest_details(
        &self,
        _: &TtrpcContext,
        req: GuestDetailsRequest,
    ) -> ttrpc::Result<GuestDetailsResponse> {
        self.allow("GetGuestDetails", &req)?;
        Ok(details::collect(&self.state))
    }

    async fn get_evidence(
        &self,
        _: &TtrpcContext,
        req: GetEvidenceRequest,
    ) -> ttrpc::Result<GetEvidenceResponse> {
        self.allow("GetEvidence", &req)?;
        let policy = self.state.policy.clone();
        // Reading a report asks the firmware: off the async workers.
        let got = tokio::task::spawn_blocking(move || policy.evidence(&req.nonce))
            .await
            .map_err(|e| status(ttrpc::Code::INTERNAL, e.to_string()))?;
        let (report, report_data) = got.map_err(|e| status(ttrpc::Code::FAILED_PRECONDITION, e))?;
        let mut r = GetEvidenceResponse::new();
        r.provider = report.provider;
        r.evidence = report.evidence;
        r.report_data = report_data.to_vec();
        Ok(r)
    }

    async fn create_sandbox(
        &self,
        _: &TtrpcContext,
        req: CreateSandboxRequest,
    ) -> ttrpc::Result<Empty> {
        self.allow("CreateSandbox", &req)?;
        // First, before any container: a VM restored from a template must not draw the
        // template's random stream (crate::reseed). Only the guest's PID 1 reseeds.
        if self.state.is_init {
            crate::reseed::reseed(&req.host_entropy).map_err(|e| {
                status(
                    ttrpc::Code::FAILED_PRECONDITION,
                    crate::runtime::error_chain(&e),
                )
            })?;
        }
        // The host's wall time is taken only where the host is trusted (crate::clock),
        // and only by the guest's PID 1 (an agent run by hand must not set its host's).
        if self.state.is_init && !self.state.policy.confidential() {
            match crate::clock::align(req.host_realtime_ns) {
                Ok(Some(step)) => {
                    tracing::debug!(step_ms = step / 1_000_000, "wall clock set to the host's")
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("cannot set the wall clock: {e}"),
            }
        }
        sandbox::create(&self.state, &req.hostname, &req.dns, &req.shared_fs_tag)
            .await
            .map_err(|e| {
                status(
                    ttrpc::Code::FAILED_PRECONDITION,
                    crate::runtime::error_chain(&e),
                )
            })?;
        crate::details::TIMELINE.mark("sandbox-created", "");
        tracing::debug!(sandbox = %req.sandbox_id, "sandbox created");
        if self.state.is_init {
            // While the host prepares the first container and the guest has nothing
            // else to do: what the boot need not wait for.
            tokio::task::spawn_blocking(|| {
                if let Err(e) = crate::init::favor_dynmods() {
                    // Linux before 6.0: task migrations wait out a grace period.
                    tracing::info!("cgroup2 refused favordynmods ({e}); kept without");
                }
                crate::devfilter::preload_usual()
            });
        }
        Ok(Empty::new())
    }

    async fn destroy_sandbox(
        &self,
        _: &TtrpcContext,
        req: DestroySandboxRequest,
    ) -> ttrpc::Result<Empty> {
        self.allow("DestroySandbox", &req)?;
        sandbox::destroy(&self.state).await;
        tracing::debug!(sandbox = %req.sandbox_id, "sandbox destroyed");
        Ok(Empty::new())
    }

    async fn create_container(
        &self,
        ctx: &TtrpcContext,
        mut req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        // A confidential pod's sandbox runs the agent's own pause, never a root the host
        // made: decided before the policy sees the request.
        let pins_images = self.state.policy.pins_images();
        if self.state.policy.confidential() || pins_images {
            crate::pause::for_request(&mut req);
        }
        // Whatever the policy says (one written before hooks reached the guest): a
        // startContainer hook runs a program the host names in the container.
        if (self.state.policy.confidential() || pins_images)
            && crate::policy::has_start_hooks(&req.oci_spec_json)
        {
            let why = "a startContainer hook would run a program the host names in the \
                       container, which a confidential pod's agent never allows";
            tracing::warn!(call = "CreateContainer", "refused: {why}");
            return Err(status(ttrpc::Code::PERMISSION_DENIED, why));
        }
        self.allow("CreateContainer", &req)?;
        // A policy that decides containers by their pulled image has nothing to decide
        // a root the host made by.
        if pins_images && req.guest_image.is_empty() {
            let why = format!(
                "{}: the pod's policy decides each container by the image the guest pulls \
                 for it, and this one asks for none (io.cocoon.guest-pull, io.cocoon.guest-image)",
                crate::policy::IMAGE_RULE
            );
            tracing::warn!(call = "CreateContainer", "refused: {why}");
            return Err(status(ttrpc::Code::PERMISSION_DENIED, why));
        }
        CALL_DEADLINE
            .scope(call_deadline(ctx), self.create_container_inner(req))
            .await
    }

    async fn start_container(
        &self,
        ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.allow("StartContainer", &req)?;
        CALL_DEADLINE
            .scope(call_deadline(ctx), async {
                self.containers()
                    .start(&req.container_id)
                    .await
                    .map_err(rpc_error)
            })
            .await?;
        // `start` returns once the init's execve is done.
        crate::details::TIMELINE.mark("container-running", &req.container_id);
        Ok(Empty::new())
    }

    async fn exec_process(
        &self,
        ctx: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<ExecProcessResponse> {
        self.allow("ExecProcess", &req)?;
        CALL_DEADLINE
            .scope(call_deadline(ctx), self.exec_process_inner(req))
            .await
    }

    async fn remove_container(
        &self,
        _: &TtrpcContext,
        req: RemoveContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.allow("RemoveContainer", &req)?;
        let timeout = match req.timeout_ms {
            0 => Duration::from_secs(10),
            ms => Duration::from_millis(ms.into()),
        };
        // Last look at memory.events before the cgroup goes.
        self.report_oom(&req.container_id);
        let removed = self.containers().remove(&req.container_id, timeout).await;
        // Gone, or never made (a create still pulling its image, which then fails):
        // what the agent made for it goes too.
        if matches!(removed, Ok(()) | Err(ContainerError::NotFound(_))) {
            remove_container_files(&req.container_id);
        }
        removed.map_err(rpc_error)?;
        Ok(Empty::new())
    }

    async fn pause_container(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.allow("PauseContainer", &req)?;
        self.containers()
            .pause(&req.container_id)
            .await
            .map_err(rpc_error)?;
        Ok(Empty::new())
    }

    async fn resume_container(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.allow("ResumeContainer", &req)?;
        self.containers()
            .resume(&req.container_id)
            .await
            .map_err(rpc_error)?;
        Ok(Empty::new())
    }

    async fn update_container(
        &self,
        _: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.allow("UpdateContainer", &req)?;
        let limits = Limits::from(req.resources.get_or_default());
        self.containers()
            .update(&req.container_id, &limits)
            .map_err(rpc_error)?;
        Ok(Empty::new())
    }

    async fn stats_container(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        self.allow("StatsContainer", &req)?;
        let c = self
            .containers()
            .get(&req.container_id)
            .map_err(rpc_error)?;
        let mut r = StatsContainerResponse::new();
        if let Some(cg) = c.cgroup() {
            let s = cg.stats();
            let mut cpu = CpuStats::new();
            cpu.usage_usec = s.cpu_usage_usec;
            cpu.user_usec = s.cpu_user_usec;
            cpu.system_usec = s.cpu_system_usec;
            cpu.nr_periods = s.cpu_nr_periods;
            cpu.nr_throttled = s.cpu_nr_throttled;
            cpu.throttled_usec = s.cpu_throttled_usec;
            let mut mem = MemoryStats::new();
            mem.usage_bytes = s.memory_usage;
            mem.limit_bytes = s.memory_limit;
            mem.max_usage_bytes = s.memory_max_usage;
            mem.anon_bytes = s.memory_anon;
            mem.file_bytes = s.memory_file;
            mem.oom_events = s.memory_oom;
            mem.oom_kill_events = s.memory_oom_kill;
            mem.stat = s.memory_stat;
            let mut pids = PidsStats::new();
            pids.current = s.pids_current;
            pids.limit = s.pids_limit;
            let mut io = IoStats::new();
            io.read_bytes = s.io.read_bytes;
            io.write_bytes = s.io.write_bytes;
            io.read_ios = s.io.read_ios;
            io.write_ios = s.io.write_ios;
            r.cpu = Some(cpu).into();
            r.memory = Some(mem).into();
            r.pids = Some(pids).into();
            r.io = Some(io).into();
        }
        if c.init.pid() > 0 && c.init.exited().is_none() {
            r.network = net_stats(c.init.pid());
        }
        Ok(r)
    }

    async fn list_pids(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<ListPidsResponse> {
        self.allow("ListPids", &req)?;
        let mut pids = self
            .containers()
            .list_pids(&req.container_id)
            .map_err(rpc_error)?;
        if let Some(n) = crate::debug::forged_pids(&self.state.cmdline) {
            tracing::warn!(container = %req.container_id, "debug: answering ListPids with {n} made-up processes");
            pids = (0..n).map(|i| (i as i32 + 1, String::new())).collect();
        }
        let mut r = ListPidsResponse::new();
        r.processes = pids
            .into_iter()
            .map(|(pid, exec_id)| {
                let mut p = ProcessInfo::new();
                p.pid = pid as u32;
                p.exec_id = exec_id;
                p
            })
            .collect();
        Ok(r)
    }

    async fn signal_process(
        &self,
        _: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        self.allow("SignalProcess", &req)?;
        if crate::debug::ignoring_signals(&self.state.cmdline) {
            tracing::warn!(container = %req.container_id, "debug: not answering SignalProcess");
            std::future::pending::<()>().await;
        }
        if crate::debug::faking_kills(&self.state.cmdline) {
            tracing::warn!(container = %req.container_id, "debug: answering SignalProcess, signalling nothing");
            return Ok(Empty::new());
        }
        let signal = i32::try_from(req.signal)
            .map_err(|_| status(ttrpc::Code::INVALID_ARGUMENT, "signal out of range"))?;
        self.containers()
            .signal(&req.container_id, &req.exec_id, signal, req.all)
            .map_err(rpc_error)?;
        Ok(Empty::new())
    }

    async fn wait_process(
        &self,
        _: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        self.allow("WaitProcess", &req)?;
        let exit = self
            .containers()
            .wait(&req.container_id, &req.exec_id)
            .await
            .map_err(rpc_error)?;
        // The OOM poller may not have looked since the kill: report it now,
        // before the exit, so the host never sees an OOM-killed exit without
        // its OOM event.
        self.report_oom(&req.container_id);
        let mut r = WaitProcessResponse::new();
        r.status = exit.status;
        r.exited_at_ns = exit.at_ns;
        Ok(r)
    }

    async fn tty_win_resize(
        &self,
        _: &TtrpcContext,
        req: TtyWinResizeRequest,
    ) -> ttrpc::Result<Empty> {
        self.allow("TtyWinResize", &req)?;
        let p = self
            .containers()
            .get(&req.container_id)
            .and_then(|c| c.process(&req.exec_id))
            .map_err(rpc_error)?;
        let clamp = |v: u32| v.min(u16::MAX.into()) as u16;
        p.io.resize(clamp(req.rows), clamp(req.columns))
            .map_err(|e| rpc_error(e.into()))?;
        Ok(Empty::new())
    }

    async fn close_stdin(&self, _: &TtrpcContext, req: ProcessRequest) -> ttrpc::Result<Empty> {
        self.allow("CloseStdin", &req)?;
        let p = self
            .containers()
            .get(&req.container_id)
            .and_then(|c| c.process(&req.exec_id))
            .map_err(rpc_error)?;
        p.io.close_stdin();
        Ok(Empty::new())
    }

    async fn online_cpus(
        &self,
        _: &TtrpcContext,
        req: OnlineCpusRequest,
    ) -> ttrpc::Result<OnlineCpusResponse> {
        self.allow("OnlineCpus", &req)?;
        let count = req.count;
        let got = tokio::task::spawn_blocking(move || {
            crate::cpus::online_up_to(std::path::Path::new(crate::cpus::SYSFS_CPUS), count)
        })
        .await
        .map_err(|e| status(ttrpc::Code::INTERNAL, e.to_string()))?
        .map_err(|e| {
            tracing::warn!("cannot bring CPUs online: {e:#}");
            status(
                ttrpc::Code::INTERNAL,
                format!("{:#}", anyhow::Error::from(e)),
            )
        })?;
        tracing::debug!(
            asked = count,
            online = got.online,
            present = got.present,
            "CPUs online"
        );
        Ok(OnlineCpusResponse {
            online: got.online,
            present: got.present,
            ..Default::default()
        })
    }

    async fn get_oom_event(&self, _: &TtrpcContext, req: Empty) -> ttrpc::Result<OomEvent> {
        self.allow("GetOomEvent", &req)?;
        // Long poll: answers when a container is OOM-killed. The caller's
        // deadline bounds the wait.
        let mut ev = OomEvent::new();
        let turn = self
            .state
            .forged_ooms
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(id) = crate::debug::forged_oom(&self.state.cmdline, turn) {
            ev.container_id = id;
            return Ok(ev);
        }
        if !crate::debug::enabled(&self.state.cmdline) {
            ev.container_id = self.state.oom_events.pop().await;
            return Ok(ev);
        }
        // Debug-armed: a poll already waiting must also notice the forging switch.
        loop {
            tokio::select! {
                id = self.state.oom_events.pop() => {
                    ev.container_id = id;
                    return Ok(ev);
                }
                _ = tokio::time::sleep(std::time::Duration::from_millis(250)) => {
                    if let Some(id) = crate::debug::forged_oom(&self.state.cmdline, turn) {
                        ev.container_id = id;
                        return Ok(ev);
                    }
                }
            }
        }
    }

    async fn update_interface(
        &self,
        _: &TtrpcContext,
        req: UpdateInterfaceRequest,
    ) -> ttrpc::Result<Interface> {
        self.allow("UpdateInterface", &req)?;
        let want = req.interface.clone().into_option().unwrap_or_default();
        let got = network::update_interface(&want, &req.current_hw_addr)
            .await
            .map_err(net_error)?;
        tracing::debug!(name = %got.name, mac = %got.hw_addr, "interface configured");
        Ok(got)
    }

    async fn update_routes(
        &self,
        _: &TtrpcContext,
        req: UpdateRoutesRequest,
    ) -> ttrpc::Result<Routes> {
        self.allow("UpdateRoutes", &req)?;
        let routes = req.routes.into_option().unwrap_or_default();
        network::update_routes(&routes).await.map_err(net_error)
    }

    async fn list_interfaces(&self, _: &TtrpcContext, req: Empty) -> ttrpc::Result<Interfaces> {
        self.allow("ListInterfaces", &req)?;
        let mut out = Interfaces::new();
        out.interfaces = network::list_interfaces().await.map_err(net_error)?;
        Ok(out)
    }

    async fn list_routes(&self, _: &TtrpcContext, req: Empty) -> ttrpc::Result<Routes> {
        self.allow("ListRoutes", &req)?;
        network::list_routes().await.map_err(net_error)
    }

    async fn shutdown(&self, _: &TtrpcContext, req: ShutdownRequest) -> ttrpc::Result<Empty> {
        self.allow("Shutdown", &req)?;
        tracing::debug!(grace_ms = req.timeout_ms, "shutdown requested by the host");
        if std::process::id() != 1 {
            return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::FAILED_PRECONDITION,
                "the agent is not PID 1 and will not power off this machine",
            )));
        }
        // The reply is written by the server after this returns; power off
        // from another thread a moment later so it has left the guest. The
        // host does not depend on it: it treats a closed connection after
        // Shutdown as success and waits for the VMM to exit.
        let state = self.state.clone();
        let grace = Duration::from_millis(req.timeout_ms.into());
        if req.host_ends_vm {
            // The host kills the VMM as soon as this returns (a guest power-off
            // costs ~100 ms under TCG that nobody waits for in Kata or
            // Firecracker either), so everything must be on the host's disks
            // first: the containers' writes through virtio-fs and any block
            // device's dirty pages.
            if !grace.is_zero() {
                state.containers.terminate_all(grace).await;
            }
            // Synced here, on the server's own thread, and the backstop is a task: a
            // thread started for either cost 6-15 ms of every pod's stop under TCG (its
            // stack, its start-up code run for the first time, a wake-up), more than the
            // sync itself (0.4-2.5 ms with no container writes pending). The server's
            // other tasks wait out the sync, and the VM ends right after it.
            nix::unistd::sync();
            tokio::spawn(async {
                tokio::time::sleep(HOST_ENDS_VM_BACKSTOP).await;
                power::power_off();
            });
            return Ok(Empty::new());
        }
        tokio::spawn(async move {
            // Containers get SIGTERM and the grace period to exit cleanly
            // (flushing their files) before the power goes.
            if !grace.is_zero() {
                state.containers.terminate_all(grace).await;
            }
            std::thread::spawn(|| {
                std::thread::sleep(std::time::Duration::from_millis(50));
                power::power_off();
            });
        });
        Ok(Empty::new())
    }
}

/// How long a guest whose host said it would end the VM waits before powering
/// off by itself, in case the host went away instead.
const HOST_ENDS_VM_BACKSTOP: Duration = Duration::from_secs(5);

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_answers_before_the_host_gives_up() {
        let now = tokio::time::Instant::now();
        let secs = |s: u64| Duration::from_secs(s).as_nanos() as i64;
        // The host's 10 s call: the guest stops at 9 s (a tenth kept for the reply).
        assert_eq!(deadline_for(now, secs(10)) - now, Duration::from_secs(9));
        // The margin is at least 200 ms and at most 1 s.
        assert_eq!(deadline_for(now, secs(1)) - now, Duration::from_millis(800));
        assert_eq!(deadline_for(now, secs(60)) - now, Duration::from_secs(59));
        // No host timeout: no bound of the call's own (each step keeps its own).
        assert!(deadline_for(now, 0) - now > Duration::from_secs(3600));
    }

    #[test]
    fn net_dev_is_parsed() {
        let t = "Inter-|   Receive                                                |  Transmit\n \
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
lo:     100       2    0    0    0     0          0         0      100       2    0    0    0     0       0          0\n  \
eth0: 5000 40 1 2 0 0 0 0 7000 50 3 4 0 0 0 0\n";
        let n = parse_net_dev(t);
        assert_eq!(n.len(), 2);
        assert_eq!(n[1].name, "eth0");
        assert_eq!(n[1].rx_bytes, 5000);
        assert_eq!(n[1].rx_dropped, 2);
        assert_eq!(n[1].tx_bytes, 7000);
        assert_eq!(n[1].tx_dropped, 4);
    }
}
