//! The host's client for the guest agent: connects over hybrid vsock, waits
//! for the agent with a deadline, and bounds every call by a deadline so a
//! dead or silent guest gives a clear error instead of a hang.

use std::time::{Duration, Instant};

use cocoon_protocol::agent::{
    CheckRequest, Empty, GuestDetailsRequest, GuestDetailsResponse, HealthCheckResponse, OomEvent,
    ShutdownRequest, VersionCheckResponse,
};
use cocoon_protocol::agent_ttrpc::{AgentClient as AgentRpc, HealthClient};
use cocoon_protocol::AGENT_PORT;
use thiserror::Error;

use crate::agent_reply::Bounded;
use crate::hypervisor::Vm;
use crate::vsock::{self, VsockError};

/// Per-attempt deadline for the vsock handshake while the guest boots.
const CONNECT_ATTEMPT: Duration = Duration::from_secs(2);
/// Pause between connection attempts while the guest boots.
const RETRY_EVERY: Duration = Duration::from_millis(20);
/// The same where the shim watches the console for the agent's ready line (QEMU): the
/// line, not the timer, says when to connect, and each refused attempt costs the booting
/// guest a reset to send (≈9 of them while the agent started under TCG, at 20 ms).
const RETRY_WATCHED: Duration = Duration::from_millis(200);

/// A device backend's exit, for the report of a VM that exited: a virtiofsd that died
/// at start shows in QEMU's own log only as a refused connection.
fn backend_too(vm: &mut Vm) -> String {
    vm.try_backend_exit()
        .map(|r| format!("\nalso: {r}"))
        .unwrap_or_default()
}

#[derive(Debug, Error)]
pub enum AgentError {
    #[error("the agent did not answer within {after:?} of launch; last error: {last}; guest console ends with:\n{console}")]
    BootTimeout {
        after: Duration,
        last: String,
        console: String,
    },
    #[error(
        "the VM exited ({status}) before its agent answered; the VMM's log ends with:\n{vmm_log}\nguest console ends with:\n{console}{backend}"
    )]
    VmExited {
        status: String,
        vmm_log: String,
        console: String,
        /// A device backend that exited too (perhaps first, and the cause), or empty.
        backend: String,
    },
    #[error(
        "a host process of the VM exited before its agent answered ({what}); guest console ends with:\n{console}"
    )]
    BackendExited { what: String, console: String },
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error("agent call {method} got no answer within {after:?}")]
    CallTimeout {
        method: &'static str,
        after: Duration,
    },
    #[error("agent call {method} failed: the connection to the agent was lost ({detail})")]
    Disconnected {
        method: &'static str,
        detail: String,
    },
    #[error("agent call {method} failed: the guest's reply is out of bounds: {what}")]
    Malformed { method: &'static str, what: String },
    #[error("agent call {method} failed: {code}: {message}")]
    Rpc {
        method: &'static str,
        code: String,
        message: String,
    },
}

/// The bound on a CreateContainer whose image the guest pulls, or whose secrets it
/// fetches from a key broker (`docs/timeouts.md`).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(300);

/// A connected agent.
#[derive(Clone)]
pub struct AgentClient {
    health: HealthClient,
    agent: AgentRpc,
    call_timeout: Duration,
    /// Where call latencies and failures are counted (`cocoon metrics`), if anywhere.
    stats: Option<std::sync::Arc<crate::telemetry::PodStats>>,
}

impl AgentClient {
    /// Connects once to the agent behind the hybrid vsock socket.
    pub async fn connect(
        uds: &std::path::Path,
        connect_timeout: Duration,
        call_timeout: Duration,
    ) -> Result<Self, AgentError> {
        let stream = vsock::connect(uds, AGENT_PORT, connect_timeout).await?;
        let client = ttrpc::r#async::Client::new(stream.into());
        Ok(Self {
            health: HealthClient::new(client.clone()),
            agent: AgentRpc::new(client),
            call_timeout,
            stats: None,
        })
    }

    /// Waits for the VM's agent to answer a health check: retries while the
    /// guest boots, fails at once if the VM exits, and gives up at `boot_timeout`.
    pub async fn wait_ready(
        vm: &mut Vm,
        boot_timeout: Duration,
        call_timeout: Duration,
    ) -> Result<Self, AgentError> {
        let deadline = Instant::now() + boot_timeout;
        let mut last = String::from("no attempt yet");
        loop {
            if let Some(status) = vm.try_exit_status() {
                vm.settle_logs().await;
                return Err(AgentError::VmExited {
                    status: status.to_string(),
                    vmm_log: vm.vmm_log_tail(20),
                    console: vm.console_tail(20),
                    backend: backend_too(vm),
                });
            }
            // A dead virtiofsd or vsock backend: the agent may never be reachable. A
            // backend also exits when the VM itself does (its frontend went away): if
            // the VMM follows within a moment, the VM's exit is the cause to report.
            if let Some(what) = vm.try_backend_exit() {
                let grace = Instant::now() + Duration::from_millis(500);
                while Instant::now() < grace {
                    if let Some(status) = vm.try_exit_status() {
                        vm.settle_logs().await;
                        return Err(AgentError::VmExited {
                            status: status.to_string(),
                            vmm_log: vm.vmm_log_tail(20),
                            console: vm.console_tail(20),
                            backend: format!("\nalso: {what}"),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                vm.settle_logs().await;
                let what = vm.try_backend_exit().unwrap_or(what);
                return Err(AgentError::BackendExited {
                    what,
                    console: vm.console_tail(20),
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(AgentError::BootTimeout {
                    after: boot_timeout,
                    last,
                    console: vm.console_tail(20),
                });
            }
            let attempt = CONNECT_ATTEMPT.min(left);
            match Self::connect(&vm.vsock_uds, attempt, attempt).await {
                Ok(c) => match c.check_within(attempt).await {
                    Ok(_) => {
                        return Ok(Self { call_timeout, ..c });
                    }
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
            // Where the shim watches the console, the agent's ready line says when to
            // connect; the timer is only a backstop.
            match &vm.agent_ready {
                Some(ready) => tokio::select! {
                    _ = tokio::time::sleep(RETRY_WATCHED.min(left)) => {}
                    _ = ready.notified() => {
                        tracing::debug!("the agent's ready line is on the console: connecting");
                    }
                },
                None => tokio::time::sleep(RETRY_EVERY.min(left)).await,
            }
        }
    }

    /// Counts this client's calls in `stats`.
    pub fn with_stats(self, stats: std::sync::Arc<crate::telemetry::PodStats>) -> Self {
        Self {
            stats: Some(stats),
            ..self
        }
    }

    fn ctx(&self, t: Duration) -> ttrpc::context::Context {
        ttrpc::context::with_timeout(t.as_nanos() as i64)
    }

    /// One call within `t`, its reply checked against `agent_reply`'s bounds.
    async fn call<T, F>(&self, method: &'static str, t: Duration, f: F) -> Result<T, AgentError>
    where
        T: Bounded,
        F: std::future::Future<Output = ttrpc::Result<T>>,
    {
        let started = Instant::now();
        let r = match tokio::time::timeout(t, f).await {
            Err(_) => Err(AgentError::CallTimeout { method, after: t }),
            Ok(Ok(v)) => bounded(method, v),
            Ok(Err(e)) => Err(map_err(method, t, e)),
        };
        if let Some(stats) = &self.stats {
            let kind = r.as_ref().err().map(|e| match e {
                AgentError::CallTimeout { .. } => "timeout",
                AgentError::Disconnected { .. } => "disconnected",
                AgentError::Rpc { .. } => "rpc",
                AgentError::Malformed { .. } => "malformed",
                _ => "other",
            });
            stats.record_call(method, started.elapsed(), kind);
        }
        r
    }

    async fn check_within(&self, t: Duration) -> Result<HealthCheckResponse, AgentError> {
        self.call(
            "Health.Check",
            t,
            self.health.check(self.ctx(t), &CheckRequest::new()),
        )
        .await
    }

    pub async fn check(&self) -> Result<HealthCheckResponse, AgentError> {
        self.check_within(self.call_timeout).await
    }

    pub async fn version(&self) -> Result<VersionCheckResponse, AgentError> {
        let t = self.call_timeout;
        self.call(
            "Health.Version",
            t,
            self.health.version(self.ctx(t), &CheckRequest::new()),
        )
        .await
    }

    pub async fn guest_details(&self) -> Result<GuestDetailsResponse, AgentError> {
        let t = self.call_timeout;
        let req = GuestDetailsRequest::new();
        self.call(
            "Agent.GetGuestDetails",
            t,
            self.agent.get_guest_details(self.ctx(t), &req),
        )
        .await
    }

    /// Asks the guest to power off. A lost connection counts as success: the
    /// guest may go down before its reply leaves.
    pub async fn shutdown(&self) -> Result<(), AgentError> {
        self.shutdown_with(ShutdownRequest::new()).await.map(|_| ())
    }

    /// Asks the guest to sync its filesystems and to leave ending the VM to the
    /// host. `Ok(true)`: the agent replied, so the guest's writes are on the
    /// host and the VMM can be killed now. `Ok(false)`: the connection closed
    /// first, so the guest may be powering off by itself.
    pub async fn sync_for_stop(&self) -> Result<bool, AgentError> {
        let mut req = ShutdownRequest::new();
        req.host_ends_vm = true;
        self.shutdown_with(req).await
    }

    async fn shutdown_with(&self, req: ShutdownRequest) -> Result<bool, AgentError> {
        let t = self.call_timeout;
        match self
            .call("Agent.Shutdown", t, self.agent.shutdown(self.ctx(t), &req))
            .await
        {
            Ok(_) => Ok(true),
            Err(AgentError::Disconnected { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Long-polls for the next OOM kill in the guest, up to `t`.
    pub async fn next_oom_event(&self, t: Duration) -> Result<OomEvent, AgentError> {
        self.call(
            "Agent.GetOomEvent",
            t,
            self.agent.get_oom_event(self.ctx(t), &Empty::new()),
        )
        .await
    }
}

/// `v`, or the error naming what in it is over its bound.
fn bounded<T: Bounded>(method: &'static str, v: T) -> Result<T, AgentError> {
    v.check()
        .map(|()| v)
        .map_err(|what| AgentError::Malformed { method, what })
}

fn map_err(method: &'static str, t: Duration, e: ttrpc::Error) -> AgentError {
    match e {
        ttrpc::Error::RpcStatus(s) => {
            if s.code() == ttrpc::Code::DEADLINE_EXCEEDED {
                return AgentError::CallTimeout { method, after: t };
            }
            AgentError::Rpc {
                method,
                code: format!("{:?}", s.code()),
                message: crate::agent_reply::error_message(s.message()),
            }
        }
        other => AgentError::Disconnected {
            method,
            detail: other.to_string(),
        },
    }
}

/// Container and process calls. Each is bounded by the call deadline except
/// `wait_process`, which lasts as long as the process (and fails as soon as
/// the connection to the agent is lost).
impl AgentClient {
    pub fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    /// Hands the guest the pod's init-data (once, before the sandbox).
    /// The guest's hardware evidence for a relying party's `nonce` (confidential pods).
    pub async fn evidence(
        &self,
        nonce: Vec<u8>,
    ) -> Result<cocoon_protocol::agent::GetEvidenceResponse, AgentError> {
        let mut req = cocoon_protocol::agent::GetEvidenceRequest::new();
        req.nonce = nonce;
        let t = self.call_timeout;
        self.call(
            "Agent.GetEvidence",
            t,
            self.agent.get_evidence(self.ctx(t), &req),
        )
        .await
    }

    pub async fn set_init_data(
        &self,
        toml: Vec<u8>,
    ) -> Result<cocoon_protocol::agent::SetInitDataResponse, AgentError> {
        let mut req = cocoon_protocol::agent::SetInitDataRequest::new();
        req.toml = toml;
        let t = self.call_timeout;
        self.call(
            "Agent.SetInitData",
            t,
            self.agent.set_init_data(self.ctx(t), &req),
        )
        .await
    }

    pub async fn create_sandbox(
        &self,
        req: cocoon_protocol::agent::CreateSandboxRequest,
    ) -> Result<(), AgentError> {
        // Mounting the share waits for the guest's deferred modules.
        let t = self.call_timeout * 3;
        self.call(
            "Agent.CreateSandbox",
            t,
            self.agent.create_sandbox(self.ctx(t), &req),
        )
        .await
        .map(drop)
    }

    /// Gives the guest interface with `interface.hw_addr` (or `current_hw_addr`, which
    /// it then trades for `interface.hw_addr`) the pod's name, MTU and addresses;
    /// answers with what the guest then has.
    pub async fn update_interface(
        &self,
        interface: cocoon_protocol::agent::Interface,
        current_hw_addr: Option<&str>,
    ) -> Result<cocoon_protocol::agent::Interface, AgentError> {
        let t = self.call_timeout;
        let mut req = cocoon_protocol::agent::UpdateInterfaceRequest::new();
        req.interface = protobuf::MessageField::some(interface);
        req.current_hw_addr = current_hw_addr.unwrap_or_default().into();
        self.call(
            "Agent.UpdateInterface",
            t,
            self.agent.update_interface(self.ctx(t), &req),
        )
        .await
    }

    pub async fn update_routes(
        &self,
        routes: Vec<cocoon_protocol::agent::Route>,
    ) -> Result<cocoon_protocol::agent::Routes, AgentError> {
        let t = self.call_timeout;
        let mut req = cocoon_protocol::agent::UpdateRoutesRequest::new();
        let mut r = cocoon_protocol::agent::Routes::new();
        r.routes = routes;
        req.routes = protobuf::MessageField::some(r);
        self.call(
            "Agent.UpdateRoutes",
            t,
            self.agent.update_routes(self.ctx(t), &req),
        )
        .await
    }

    pub async fn list_interfaces(
        &self,
    ) -> Result<Vec<cocoon_protocol::agent::Interface>, AgentError> {
        let t = self.call_timeout;
        self.call(
            "Agent.ListInterfaces",
            t,
            self.agent
                .list_interfaces(self.ctx(t), &cocoon_protocol::agent::Empty::new()),
        )
        .await
        .map(|r| r.interfaces)
    }

    /// CreateContainer; `fetches` when the guest pulls the image or fetches secrets for
    /// it over the network, which gets `FETCH_TIMEOUT` instead of the usual bound.
    pub async fn create_container(
        &self,
        req: cocoon_protocol::agent::CreateContainerRequest,
        fetches: bool,
    ) -> Result<u32, AgentError> {
        let t = match fetches {
            true => self.call_timeout.max(FETCH_TIMEOUT),
            false => self.call_timeout,
        };
        let r = self
            .call(
                "Agent.CreateContainer",
                t,
                self.agent.create_container(self.ctx(t), &req),
            )
            .await?;
        Ok(r.pid)
    }

    pub async fn start_container(&self, container_id: &str) -> Result<(), AgentError> {
        let t = self.call_timeout;
        let req = container_req(container_id);
        self.call(
            "Agent.StartContainer",
            t,
            self.agent.start_container(self.ctx(t), &req),
        )
        .await
        .map(drop)
    }

    pub async fn remove_container(&self, container_id: &str) -> Result<(), AgentError> {
        let t = self.call_timeout;
        let mut req = cocoon_protocol::agent::RemoveContainerRequest::new();
        req.container_id = container_id.into();
        req.timeout_ms = t.as_millis() as u32 / 2;
        self.call(
            "Agent.RemoveContainer",
            t,
            self.agent.remove_container(self.ctx(t), &req),
        )
        .await
        .map(drop)
    }

    pub async fn pause_container(&self, container_id: &str) -> Result<(), AgentError> {
        let t = self.call_timeout;
        let req = container_req(container_id);
        self.call(
            "Agent.PauseContainer",
            t,
            self.agent.pause_container(self.ctx(t), &req),
        )
        .await
        .map(drop)
    }

    pub async fn resume_container(&self, container_id: &str) -> Result<(), AgentError> {
        let t = self.call_timeout;
        let req = container_req(container_id);
        self.call(
            "Agent.ResumeContainer",
            t,
            self.agent.resume_container(self.ctx(t), &req),
        )
        .await
        .map(drop)
    }

    pub async fn update_container(
        &self,
        req: cocoon_protocol::agent::UpdateContainerRequest,
    ) -> Result<(), AgentError> {
        let t = self.call_timeout;
        self.call(
            "Agent.UpdateContainer",
            t,
            self.agent.update_container(self.ctx(t), &req),
        )
        .await
        .map(drop)
    }

    /// Has the guest bring CPUs online until `count` are (`sizing::CpuRoom`).
    pub async fn online_cpus(
        &self,
        count: u32,
    ) -> Result<cocoon_protocol::agent::OnlineCpusResponse, AgentError> {
        let t = self.call_timeout;
        let req = cocoon_protocol::agent::OnlineCpusRequest {
            count,
            ..Default::default()
        };
        self.call(
            "Agent.OnlineCpus",
            t,
            self.agent.online_cpus(self.ctx(t), &req),
        )
        .await
    }

    pub async fn stats_container(
        &self,
        container_id: &str,
    ) -> Result<cocoon_protocol::agent::StatsContainerResponse, AgentError> {
        let t = self.call_timeout;
        let req = container_req(container_id);
        self.call(
            "Agent.StatsContainer",
            t,
            self.agent.stats_container(self.ctx(t), &req),
        )
        .await
    }

    pub async fn list_pids(
        &self,
        container_id: &str,
    ) -> Result<cocoon_protocol::agent::ListPidsResponse, AgentError> {
        let t = self.call_timeout;
        let req = container_req(container_id);
        self.call("Agent.ListPids", t, self.agent.list_pids(self.ctx(t), &req))
            .await
    }

    pub async fn exec_process(
        &self,
        req: cocoon_protocol::agent::ExecProcessRequest,
    ) -> Result<u32, AgentError> {
        let t = self.call_timeout;
        let r = self
            .call(
                "Agent.ExecProcess",
                t,
                self.agent.exec_process(self.ctx(t), &req),
            )
            .await?;
        Ok(r.pid)
    }

    pub async fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentError> {
        let t = self.call_timeout;
        let mut req = cocoon_protocol::agent::SignalProcessRequest::new();
        req.container_id = container_id.into();
        req.exec_id = exec_id.into();
        req.signal = signal;
        req.all = all;
        self.call(
            "Agent.SignalProcess",
            t,
            self.agent.signal_process(self.ctx(t), &req),
        )
        .await
        .map(drop)
    }

    /// Waits for the process to exit and its output to drain in the guest.
    pub async fn wait_process(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<cocoon_protocol::agent::WaitProcessResponse, AgentError> {
        let req = process_req(container_id, exec_id);
        let ctx = ttrpc::context::Context::default();
        self.agent
            .wait_process(ctx, &req)
            .await
            .map_err(|e| map_err("Agent.WaitProcess", Duration::ZERO, e))
            .and_then(|r| bounded("Agent.WaitProcess", r))
    }

    pub async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), AgentError> {
        let t = self.call_timeout;
        let req = process_req(container_id, exec_id);
        self.call(
            "Agent.CloseStdin",
            t,
            self.agent.close_stdin(self.ctx(t), &req),
        )
        .await
        .map(drop)
    }

    pub async fn tty_resize(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        columns: u32,
    ) -> Result<(), AgentError> {
        let t = self.call_timeout;
        let mut req = cocoon_protocol::agent::TtyWinResizeRequest::new();
        req.container_id = container_id.into();
        req.exec_id = exec_id.into();
        req.rows = rows;
        req.columns = columns;
        self.call(
            "Agent.TtyWinResize",
            t,
            self.agent.tty_win_resize(self.ctx(t), &req),
        )
        .await
        .map(drop)
    }
}

fn container_req(container_id: &str) -> cocoon_protocol::agent::ContainerRequest {
    let mut r = cocoon_protocol::agent::ContainerRequest::new();
    r.container_id = container_id.into();
    r
}

fn process_req(container_id: &str, exec_id: &str) -> cocoon_protocol::agent::ProcessRequest {
    let mut r = cocoon_protocol::agent::ProcessRequest::new();
    r.container_id = container_id.into();
    r.exec_id = exec_id.into();
    r
}
