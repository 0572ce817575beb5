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

use crate::hypervisor::Vm;
use crate::vsock::{self, VsockError};

/// Per-attempt deadline for the vsock handshake while the guest boots.
const CONNECT_ATTEMPT: Duration = Duration::from_secs(2);
/// Pause between connection attempts while the guest boots.
const RETRY_EVERY: Duration = Duration::from_millis(20);

#[derive(Debug, Error)]
pub enum AgentError {
    #[error("the agent did not answer within {after:?} of launch; last error: {last}; guest console ends with:\n{console}")]
    BootTimeout {
        after: Duration,
        last: String,
        console: String,
    },
    #[error(
        "the VM exited ({status}) before its agent answered; guest console ends with:\n{console}"
    )]
    VmExited { status: String, console: String },
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
    #[error("agent call {method} failed: {code}: {message}")]
    Rpc {
        method: &'static str,
        code: String,
        message: String,
    },
}

/// A connected agent.
#[derive(Clone)]
pub struct AgentClient {
    health: HealthClient,
    agent: AgentRpc,
    call_timeout: Duration,
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
                return Err(AgentError::VmExited {
                    status: status.to_string(),
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
            tokio::time::sleep(RETRY_EVERY.min(left)).await;
        }
    }

    fn ctx(&self, t: Duration) -> ttrpc::context::Context {
        ttrpc::context::with_timeout(t.as_nanos() as i64)
    }

    async fn call<T, F>(&self, method: &'static str, t: Duration, f: F) -> Result<T, AgentError>
    where
        F: std::future::Future<Output = ttrpc::Result<T>>,
    {
        match tokio::time::timeout(t, f).await {
            Err(_) => Err(AgentError::CallTimeout { method, after: t }),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(map_err(method, t, e)),
        }
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
        let t = self.call_timeout;
        let req = ShutdownRequest::new();
        match self
            .call("Agent.Shutdown", t, self.agent.shutdown(self.ctx(t), &req))
            .await
        {
            Ok(_) | Err(AgentError::Disconnected { .. }) => Ok(()),
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

fn map_err(method: &'static str, t: Duration, e: ttrpc::Error) -> AgentError {
    match e {
        ttrpc::Error::RpcStatus(s) => {
            if s.code() == ttrpc::Code::DEADLINE_EXCEEDED {
                return AgentError::CallTimeout { method, after: t };
            }
            AgentError::Rpc {
                method,
                code: format!("{:?}", s.code()),
                message: s.message().to_string(),
            }
        }
        other => AgentError::Disconnected {
            method,
            detail: other.to_string(),
        },
    }
}
