//! ttrpc service implementations. Calls not implemented yet fall through to
//! the generated defaults, which answer "not implemented" with the method name.

use std::sync::Arc;

use async_trait::async_trait;
use cocoon_protocol::agent::{
    health_check_response::ServingStatus, CheckRequest, Empty, GuestDetailsRequest,
    GuestDetailsResponse, HealthCheckResponse, OomEvent, ShutdownRequest, VersionCheckResponse,
};
use cocoon_protocol::agent_ttrpc::{Agent, Health};
use cocoon_protocol::PROTOCOL_VERSION;
use ttrpc::r#async::TtrpcContext;

use crate::{details, power};

/// Facts gathered at start-up, shared by the handlers.
#[derive(Debug)]
pub struct AgentState {
    pub start_boottime_ns: i64,
    pub init_ns: i64,
    /// Modules loaded so far (boot-critical first, then the deferred ones).
    pub modules: std::sync::Mutex<Vec<String>>,
    /// Set once the deferred modules are in (or failed to load).
    pub modules_done: tokio::sync::watch::Sender<Option<Result<(), String>>>,
    pub cmdline: String,
    /// Guest boot time when the server started listening (set once).
    pub server_ready_boottime_ns: std::sync::atomic::AtomicI64,
    /// OOM kills in the guest, for the GetOomEvent long poll.
    pub oom_events: tokio::sync::broadcast::Sender<String>,
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
}

#[async_trait]
impl Agent for AgentService {
    async fn get_guest_details(
        &self,
        _: &TtrpcContext,
        _: GuestDetailsRequest,
    ) -> ttrpc::Result<GuestDetailsResponse> {
        Ok(details::collect(&self.state))
    }

    async fn get_oom_event(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<OomEvent> {
        // Long poll: answers when a container is OOM-killed. The caller's
        // deadline bounds the wait.
        let mut rx = self.state.oom_events.subscribe();
        match rx.recv().await {
            Ok(container_id) => {
                let mut ev = OomEvent::new();
                ev.container_id = container_id;
                Ok(ev)
            }
            Err(e) => Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::UNAVAILABLE,
                format!("OOM event stream ended: {e}"),
            ))),
        }
    }

    async fn shutdown(&self, _: &TtrpcContext, _: ShutdownRequest) -> ttrpc::Result<Empty> {
        tracing::info!("shutdown requested by the host");
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
        std::thread::spawn(|| {
            std::thread::sleep(std::time::Duration::from_millis(50));
            power::power_off();
        });
        Ok(Empty::new())
    }
}
