//! The Cocoon guest agent. It runs as PID 1 of the pod VM: it sets up the
//! minimal system (mounts, console, kernel modules), reaps orphans, and serves
//! the agent protocol over vsock until the host asks it to power off.
//!
//! Any failure before the server is up is printed on the console and powers
//! the VM off: a guest that cannot serve must end, never hang.

mod cmdline;
mod details;
mod handlers;
mod init;
mod modules;
mod power;
mod reaper;

use std::sync::Arc;
use std::time::Instant;

use cocoon_protocol::agent_ttrpc::{create_agent, create_health};
use cocoon_protocol::AGENT_PORT;

fn main() {
    let started = Instant::now();
    let start_boottime_ns = details::boottime_ns();
    std::panic::set_hook(Box::new(|info| {
        eprintln!("cocoon-agent: panic: {info}");
        power::fatal("panicked");
    }));

    let is_init = std::process::id() == 1;
    let early = if is_init {
        match init::early_init() {
            Ok(early) => early,
            Err(e) => {
                eprintln!("cocoon-agent: early init failed: {e:#}");
                power::fatal("early init failed");
            }
        }
    } else {
        init::EarlyInit::default()
    };
    init::setup_logging(&early.cmdline);
    let init_ns = started.elapsed().as_nanos() as i64;
    tracing::debug!(
        boottime_ms = start_boottime_ns / 1_000_000,
        "agent main() started"
    );
    tracing::info!(
        init_ms = init_ns / 1_000_000,
        modules = early.modules.len(),
        "early init done"
    );

    let state = Arc::new(handlers::AgentState {
        start_boottime_ns,
        init_ns,
        modules: std::sync::Mutex::new(early.modules),
        modules_done: tokio::sync::watch::channel(None).0,
        cmdline: early.cmdline,
        server_ready_boottime_ns: Default::default(),
        oom_events: tokio::sync::broadcast::channel(16).0,
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cocoon-agent: cannot start the async runtime: {e}");
            power::fatal("no runtime");
        }
    };
    let deferred = early.deferred;
    if let Err(e) = runtime.block_on(serve(state, is_init, deferred)) {
        eprintln!("cocoon-agent: {e:#}");
        if is_init {
            power::fatal("server failed");
        }
        std::process::exit(1);
    }
}

fn started_ms(state: &handlers::AgentState) -> i64 {
    (details::boottime_ns() - state.start_boottime_ns) / 1_000_000
}

async fn serve(
    state: Arc<handlers::AgentState>,
    is_init: bool,
    deferred: Vec<modules::ModuleEntry>,
) -> anyhow::Result<()> {
    if is_init {
        tokio::spawn(reaper::run());
    }
    let addr = format!("vsock://-1:{AGENT_PORT}");
    let mut server = ttrpc::r#async::Server::new()
        .bind(&addr)
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?
        .register_service(create_health(Arc::new(handlers::HealthService)))
        .register_service(create_agent(Arc::new(handlers::AgentService::new(
            state.clone(),
        ))));
    server
        .start()
        .await
        .map_err(|e| anyhow::anyhow!("cannot start the ttrpc server: {e}"))?;
    tracing::debug!(since_main_ms = started_ms(&state), "server listening");
    state
        .server_ready_boottime_ns
        .store(details::boottime_ns(), std::sync::atomic::Ordering::Relaxed);
    // Filesystem, block and net modules are not needed to answer the host;
    // load them now, off the boot path. Calls that need them wait on
    // `modules_done`.
    let st = state.clone();
    std::thread::spawn(move || {
        let result = modules::load(deferred, &st.cmdline);
        let outcome = match result {
            Ok(names) => {
                if let Ok(mut m) = st.modules.lock() {
                    m.extend(names);
                }
                Ok(())
            }
            Err(e) => {
                eprintln!("cocoon-agent: loading modules failed: {e}");
                Err(e.to_string())
            }
        };
        st.modules_done.send_replace(Some(outcome));
    });
    // This exact line is what boot benchmarks and humans look for on the console.
    println!("cocoon-agent: ready on vsock port {AGENT_PORT}");
    // The server runs on its own tasks; PID 1 lives until power-off.
    std::future::pending::<()>().await;
    Ok(())
}
