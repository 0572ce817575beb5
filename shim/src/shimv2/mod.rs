//! `containerd-shim-cocoon-v2`: the containerd runtime v2 shim. containerd
//! runs it as `start` (find or launch the pod's shim, print its address),
//! `delete` (clean up after a shim that died), or with no action (serve the
//! Task API until Shutdown).
//!
//! The bootstrap is ours rather than the crate's `run()`: containerd 1.6 and
//! 1.7 call `containerd.task.v2.Task`, 2.x calls `containerd.task.v3.Task`
//! (the same messages), and `run()` registers only v3. We register both, and
//! answer `start` with a plain address, which every containerd accepts.

mod delete;
mod fifo_holders;
pub mod guest_events;
pub mod hooks;
pub mod idmaps;
pub mod info;
pub mod janitor;
pub mod logsink;
pub(crate) mod metrics;
pub mod mounts;
mod options;
pub mod overlay;
mod persist;
pub mod pod;
pub mod podmetrics;
pub mod podns;
mod podrecord;
pub mod propagation;
mod rlimits;
mod sandbox;
mod service;
pub mod share;
pub mod sizing;
mod start;
pub mod stdio;
pub mod timings;
pub mod watched;

use std::collections::HashMap;
use std::sync::Arc;

use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::protos::shim_async::{create_task, Task};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::Flags;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;

/// How long a guest has to report the exit of a pod's container it was SIGKILLed, before
/// the host ends the VM instead: a kill of a process takes the guest milliseconds.
pub const KILL_EXIT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(15);

pub const RUNTIME_ID: &str = "io.containerd.cocoon.v2";
/// The annotation that groups a Kubernetes pod's containers into one shim.
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";

/// Entry point of the shim binary; returns the process exit code.
/// The VM id the shim uses for a pod (namespace + grouping id).
pub fn sandbox_vm_id(namespace: &str, group: &str) -> String {
    sandbox::vm_id(namespace, group)
}

/// When this shim process started (for the timing records).
pub static SHIM_STARTED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

pub async fn main() -> i32 {
    SHIM_STARTED.get_or_init(std::time::Instant::now);
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let flags = match containerd_shim::parse(&args[1..]) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{RUNTIME_ID}: {e}");
            return 1;
        }
    };
    if flags.version {
        println!("containerd-shim-cocoon-v2 {}", env!("CARGO_PKG_VERSION"));
        return 0;
    }
    if flags.info {
        return match info::print(RUNTIME_ID) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("{RUNTIME_ID}: {e:#}");
                1
            }
        };
    }
    let result = match flags.action.as_str() {
        "start" => start::run(&flags).await,
        "delete" => delete::run(&flags).await,
        "" => serve(&flags).await,
        other => Err(anyhow::anyhow!("unknown action {other:?}")),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{RUNTIME_ID}: {e:#}");
            tracing::error!("{e:#}");
            1
        }
    }
}

/// Logs go to the `log` fifo containerd made in the bundle (our cwd), which
/// containerd copies into its own log; stderr if there is none.
fn setup_logging(debug: bool) {
    use std::os::unix::fs::OpenOptionsExt;
    let level = if debug { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("COCOON_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let fifo = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("log");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    let _ = match fifo {
        Ok(f) => builder.with_writer(std::sync::Mutex::new(f)).try_init(),
        Err(_) => builder.with_writer(std::io::stderr).try_init(),
    };
    // Panics unwind (see the workspace's release profile): one failed request task
    // must not take the pod's VM down with the shim. Say so in containerd's log.
    std::panic::set_hook(Box::new(|info| {
        tracing::error!("shim panic (the call fails, the pod stays): {info}");
    }));
}

async fn serve(flags: &Flags) -> anyhow::Result<()> {
    use anyhow::Context;
    setup_logging(flags.debug);
    if flags.socket.is_empty() {
        anyhow::bail!("-socket is required to serve");
    }
    let config = Config::load().context("loading the cocoon config")?;
    let socket = flags.socket.trim_start_matches("unix://").to_string();
    let listener = std::os::unix::net::UnixListener::bind(&socket)
        .with_context(|| format!("cannot listen on {socket}"))?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    persist::Shim::set_this(std::path::Path::new(&socket));

    let ttrpc_address = std::env::var("TTRPC_ADDRESS").context("TTRPC_ADDRESS is not set")?;
    let publisher = RemotePublisher::new(&ttrpc_address)
        .await
        .with_context(|| format!("cannot reach containerd's event service at {ttrpc_address}"))?;
    let exit = Arc::new(ExitSignal::default());
    let group = std::env::var("COCOON_SHIM_GROUP").unwrap_or_else(|_| flags.id.clone());
    let config_run_dir = config.paths.run_dir.clone();
    let service = service::Service::new(&flags.namespace, &group, config, publisher, exit.clone());
    let task: Arc<dyn Task + Send + Sync> = Arc::new(service.clone());
    let mut services = create_task(task.clone());
    let v2: HashMap<_, _> = create_task(task)
        .into_iter()
        .map(|(name, s)| {
            (
                name.replace("containerd.task.v3.", "containerd.task.v2."),
                s,
            )
        })
        .collect();
    services.extend(v2);
    let mut server = ttrpc::r#async::Server::new()
        .add_listener(listener.into())
        .register_service(services);
    server
        .start()
        .await
        .context("cannot start the task server")?;
    // `start` waits for our stdout to close: we are ready.
    signal_ready();
    // Pods whose shim died before their teardown ended: no bundle may name them any more.
    let run_root = config_run_dir.clone();
    tokio::task::spawn_blocking(move || {
        for vm in podrecord::sweep(&run_root) {
            tracing::warn!(vm = %vm, "undid what a dead shim's pod left on the node");
        }
    });
    tracing::info!(id = %flags.id, group = %group, "shim serving on {socket}");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = exit.wait() => {}
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
    service.stop_all().await;
    let _ = server.shutdown().await;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

fn signal_ready() {
    // SAFETY: dup2 of stderr onto stdout; both are plain descriptors that no
    // Rust object owns exclusively.
    unsafe {
        libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO);
    }
}
