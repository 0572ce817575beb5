//! The Cocoon guest agent. It runs as PID 1 of the pod VM: it sets up the
//! minimal system (mounts, console, kernel modules), reaps orphans, and serves
//! the agent protocol over vsock until the host asks it to power off.
//!
//! Any failure before the server is up is printed on the console and powers
//! the VM off: a guest that cannot serve must end, never hang.
//!
//! Other modes: `cocoon-agent --listen-unix <dir>` serves the same protocol on
//! `<dir>/agent.sock` and `<dir>/stdio.sock` without early init (for tests on
//! a host), `cocoon-agent __cocoon-runtime` is the container runtime
//! helper the agent starts itself (see `runtime`), and started as `/pause` it is a
//! sandbox container's pause program (see `pause`).

use cocoon_agent::{
    container, debug, details, handlers, init, modules, pause, portfwd, power, reaper, runtime,
    stdio,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cocoon_protocol::agent_ttrpc::{create_agent, create_health};
use cocoon_protocol::{AGENT_PORT, FORWARD_PORT, READY_LINE, STDIO_PORT};

/// Where the agent listens.
enum Listen {
    Vsock,
    /// The dev mode: Unix sockets in this directory.
    Unix(PathBuf),
}

/// Where the agent's start goes, stage by stage, printed once the server listens with
/// `cocoon.log=debug`. Reading the clock costs next to nothing; under TCG every stage is
/// code run for the first time, so this is the map for cutting the start.
struct Stages {
    start: Instant,
    marks: Vec<(&'static str, Duration)>,
    /// Minor page faults taken before `main` (the exec and libc's and Rust's start).
    faults_at_main: u64,
}

/// This process's minor page faults so far: each is a trip through the guest kernel,
/// dear under TCG (the exec of the agent maps it page by page).
fn minor_faults() -> u64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .map_or(0, |u| u.minor_page_faults() as u64)
}

impl Stages {
    fn mark(&mut self, stage: &'static str) {
        self.marks.push((stage, self.start.elapsed()));
    }

    /// Each stage's own time, in order: `leave-initramfs=3.1ms early-init=13.2ms ...`,
    /// then the minor faults before `main` and since.
    fn describe(&self) -> String {
        let mut before = Duration::ZERO;
        let mut out = Vec::with_capacity(self.marks.len());
        for (stage, at) in &self.marks {
            out.push(format!(
                "{stage}={:.1}ms",
                (*at - before).as_secs_f64() * 1e3
            ));
            before = *at;
        }
        out.push(format!(
            "minor-faults=before-main:{},start:{}",
            self.faults_at_main,
            minor_faults().saturating_sub(self.faults_at_main)
        ));
        out.join(" ")
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: cocoon-agent [--listen-unix <dir> [--no-pivot] [--cgroup-root <dir>] [--no-zygote]]"
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.first().is_some_and(|a| pause::is_pause(a)) {
        pause::main();
    }
    if args.get(1).map(String::as_str) == Some(runtime::HELPER_ARG) {
        runtime::helper_main();
    }
    // Dev-mode options: `--no-pivot` takes the path an initramfs root
    // takes; `--cgroup-root` points at a cgroup v2 directory on a host
    // whose /sys/fs/cgroup is v1; `--no-zygote` exec's each runtime helper (the path
    // taken when the zygote cannot start, kept under test by this).
    let mut opts = container::Options::default();
    let mut zygote = true;
    let listen = match args.get(1).map(String::as_str) {
        None => Listen::Vsock,
        Some("--listen-unix") => {
            let Some(dir) = args.get(2) else { usage() };
            let mut rest = args[3..].iter();
            while let Some(a) = rest.next() {
                match a.as_str() {
                    "--no-pivot" => opts.no_pivot = true,
                    "--no-zygote" => zygote = false,
                    "--cgroup-root" => match rest.next() {
                        Some(d) => opts.cgroup_root = Some(PathBuf::from(d)),
                        None => usage(),
                    },
                    _ => usage(),
                }
            }
            Listen::Unix(PathBuf::from(dir))
        }
        // The kernel hands init each word of its command line that it did not know
        // (`vm.kernel_params` may hold one: a typo, or a parameter of another boot
        // path). The kernel ignores them and so does init: a usage exit here would
        // panic the kernel and fail every pod.
        Some(_) if std::process::id() == 1 => {
            eprintln!(
                "cocoon-agent: ignoring {:?}: kernel command-line words the kernel did not know",
                &args[1..]
            );
            Listen::Vsock
        }
        Some(_) => usage(),
    };
    let started = Instant::now();
    let mut stages = Stages {
        start: started,
        marks: Vec::with_capacity(12),
        faults_at_main: minor_faults(),
    };
    let is_init = std::process::id() == 1;
    let start_boottime_ns = details::boottime_ns();
    let start_tsc = details::tsc();
    if is_init && matches!(listen, Listen::Vsock) {
        if let Err(e) = init::leave_initramfs() {
            eprintln!("cocoon-agent: {e:#}");
            power::fatal("cannot leave the initramfs");
        }
    }
    stages.mark("leave-initramfs");
    std::panic::set_hook(Box::new(|info| {
        eprintln!("cocoon-agent: panic: {info}");
        power::fatal("panicked");
    }));

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
    stages.mark("early-init");
    init::setup_logging(&early.cmdline);
    stages.mark("logging");
    // While this process still has one thread: the async runtime below starts others.
    if !zygote {
        tracing::info!("no runtime zygote (--no-zygote): each container's helper is exec'd");
    } else if let Err(e) = runtime::zygote::start() {
        tracing::warn!("no runtime zygote ({e}): each container's helper will be exec'd");
    }
    stages.mark("zygote");
    let init_ns = started.elapsed().as_nanos() as i64;
    tracing::debug!(
        boottime_ms = start_boottime_ns / 1_000_000,
        "agent main() started"
    );
    // Debug, not info: each console byte is a VM exit under emulation, and the ready
    // line says as much.
    tracing::debug!(
        init_ms = init_ns / 1_000_000,
        modules = early.modules.len(),
        "early init done"
    );

    let reaper = Arc::new(reaper::Reaper::default());
    // `cocoon.confidential` on the (measured) command line: nothing is served before the
    // pod's init-data; with a TEE named, init-data must match the guest's evidence.
    let mode = cocoon_agent::policy::Mode::from_cmdline(&early.cmdline);
    if let cocoon_agent::policy::Mode::Tee(tee) = &mode {
        tracing::info!(
            ?tee,
            "confidential: init-data will be checked against evidence"
        );
        cocoon_agent::init::mount_configfs();
    }
    let policy = Arc::new(cocoon_agent::policy::Gate::for_mode(
        mode,
        cocoon_confidential::evidence::TSM_REPORT_ROOT.into(),
    ));
    let state = Arc::new(handlers::AgentState {
        start_boottime_ns,
        start_tsc,
        init_ns,
        modules: std::sync::Mutex::new(early.modules),
        modules_done: tokio::sync::watch::channel(None).0,
        on_demand: std::sync::Mutex::new(early.on_demand),
        cmdline: early.cmdline,
        server_ready_boottime_ns: Default::default(),
        oom_events: Default::default(),
        forged_ooms: Default::default(),
        is_init,
        containers: Arc::new(container::Containers::new(reaper.clone(), opts)),
        policy,
    });
    stages.mark("state");
    let runtime = match runtime_for(online_cpus()).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cocoon-agent: cannot start the async runtime: {e}");
            power::fatal("no runtime");
        }
    };
    stages.mark("async-runtime");
    let deferred = early.deferred;
    if let Err(e) = runtime.block_on(serve(state, reaper, listen, deferred, stages)) {
        eprintln!("cocoon-agent: {e:#}");
        if is_init {
            power::fatal("server failed");
        }
        std::process::exit(1);
    }
}

/// CPUs online now, read more cheaply than tokio's `available_parallelism` (which
/// reads cgroup files too).
fn online_cpus() -> usize {
    // SAFETY: sysconf only reads a system value.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

/// The async runtime for a guest that starts with `cpus` CPUs: one worker per CPU
/// (tokio's own default), and on a one-CPU guest, most pods', no worker thread at all.
/// The agent had two fixed workers; on one vCPU the second bought no parallelism and
/// cost 10-20 ms of every TCG boot (a thread started, its code run for the first
/// time). With one CPU a worker thread would only hand every task over from the main
/// thread, which has nothing else to do once it serves. Nothing here blocks a task
/// on another (blocking work goes to `spawn_blocking`, whose threads start only when
/// needed; no `block_in_place`), so one thread runs the same work.
fn runtime_for(cpus: usize) -> tokio::runtime::Builder {
    if cpus == 1 {
        return tokio::runtime::Builder::new_current_thread();
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(cpus);
    builder
}

fn started_ms(state: &handlers::AgentState) -> i64 {
    (details::boottime_ns() - state.start_boottime_ns) / 1_000_000
}

/// Accepts stdio stream connections forever.
async fn serve_stdio(listen: &Listen, state: &Arc<handlers::AgentState>) -> anyhow::Result<()> {
    let lookup = Arc::new(cocoon_agent::policy::PolicedStreams {
        containers: state.containers.clone(),
        gate: state.policy.clone(),
    });
    match listen {
        Listen::Vsock => {
            let addr = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, STDIO_PORT);
            let listener = tokio_vsock::VsockListener::bind(addr)
                .map_err(|e| anyhow::anyhow!("cannot listen on vsock port {STDIO_PORT}: {e}"))?;
            tokio::spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok((conn, _)) => {
                            tokio::spawn(stdio::serve_connection(conn, lookup.clone()));
                        }
                        Err(e) => tracing::warn!("stdio accept failed: {e}"),
                    }
                }
            });
        }
        Listen::Unix(dir) => {
            let path = dir.join("stdio.sock");
            let _ = std::fs::remove_file(&path);
            let listener = tokio::net::UnixListener::bind(&path)
                .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", path.display()))?;
            tokio::spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok((conn, _)) => {
                            tokio::spawn(stdio::serve_connection(conn, lookup.clone()));
                        }
                        Err(e) => tracing::warn!("stdio accept failed: {e}"),
                    }
                }
            });
        }
    }
    Ok(())
}

/// Accepts port-forward connections forever (vsock only: the dev mode shares the host's
/// network, where nothing needs forwarding).
fn serve_forwards(listen: &Listen) -> anyhow::Result<()> {
    if !matches!(listen, Listen::Vsock) {
        return Ok(());
    }
    let addr = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, FORWARD_PORT);
    let listener = tokio_vsock::VsockListener::bind(addr)
        .map_err(|e| anyhow::anyhow!("cannot listen on vsock port {FORWARD_PORT}: {e}"))?;
    let limit = Arc::new(tokio::sync::Semaphore::new(portfwd::MAX_FORWARDS));
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((conn, _)) => {
                    tokio::spawn(portfwd::serve_connection(conn, limit.clone()));
                }
                Err(e) => tracing::warn!("port-forward accept failed: {e}"),
            }
        }
    });
    Ok(())
}

/// Reports OOM kills that do not end a container (a child killed while its init lives
/// on; a kill that ends it is reported by the exit path first). Woken by the kernel: a
/// cgroup's `memory.events` is modified (inotify) when it counts an OOM kill. It polled
/// every 100 ms before, waking the guest's vCPU ten times a second in every pod: under
/// TCG an idle pod's QEMU took 57 ticks of host CPU in 20 s with the poll and 16-19
/// without.
async fn watch_oom(state: Arc<handlers::AgentState>) {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
        .map_err(std::io::Error::from)
        .and_then(|i| {
            // SAFETY: the Inotify owns its descriptor, which stays open and keeps its
            // number until the AsyncFd that owns the Inotify is dropped.
            unsafe { tokio::io::unix::AsyncFd::register(InotifyFd(i)) }.map_err(Into::into)
        });
    let inotify = match inotify {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!("no inotify for OOM events ({e}): polling every 100 ms");
            return poll_oom(state).await;
        }
    };
    // Each container watched once, as the instance it is (an id may come back).
    let mut watched: std::collections::HashMap<String, std::sync::Weak<container::Container>> =
        Default::default();
    loop {
        // Registered before the scan: a container added during it wakes the next wait.
        let added = state.containers.added.notified();
        let all = state.containers.all();
        watched.retain(|id, w| {
            all.iter()
                .any(|c| &c.id == id && w.as_ptr() == Arc::as_ptr(c))
        });
        for c in &all {
            if !watched.contains_key(&c.id) {
                if let Some(cg) = c.cgroup() {
                    let file = cg.events_file();
                    if let Err(e) = inotify
                        .get_ref()
                        .0
                        .add_watch(&file, AddWatchFlags::IN_MODIFY)
                    {
                        tracing::warn!("cannot watch {}: {e}", file.display());
                    }
                }
                watched.insert(c.id.clone(), Arc::downgrade(c));
            }
            state.report_new_oom(c);
        }
        tokio::select! {
            _ = added => {}
            ready = inotify.readable() => match ready {
                Ok(mut guard) => {
                    // What changed is read again above; the events only wake the scan.
                    while guard.get_inner().0.read_events().is_ok() {}
                    guard.clear_ready();
                }
                Err(e) => {
                    tracing::warn!("inotify for OOM events failed ({e}): polling every 100 ms");
                    return poll_oom(state).await;
                }
            },
        }
    }
}

/// An inotify instance as tokio's reactor takes it.
struct InotifyFd(nix::sys::inotify::Inotify);

impl std::os::fd::AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

/// The fallback where inotify is not to be had.
async fn poll_oom(state: Arc<handlers::AgentState>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        for c in state.containers.all() {
            state.report_new_oom(&c);
        }
    }
}

async fn serve(
    state: Arc<handlers::AgentState>,
    reaper: Arc<reaper::Reaper>,
    listen: Listen,
    deferred: Vec<modules::ModuleEntry>,
    mut stages: Stages,
) -> anyhow::Result<()> {
    if !state.is_init {
        // Container inits are re-parented to us when the runtime helper
        // exits; PID 1 gets them anyway.
        nix::sys::prctl::set_child_subreaper(true)
            .map_err(|e| anyhow::anyhow!("cannot become a subreaper: {e}"))?;
    }
    tokio::spawn(reaper.run());
    tokio::spawn(watch_oom(state.clone()));
    let addr = match &listen {
        Listen::Vsock => format!("vsock://-1:{AGENT_PORT}"),
        Listen::Unix(dir) => {
            let path = dir.join("agent.sock");
            let _ = std::fs::remove_file(&path);
            format!("unix://{}", path.display())
        }
    };
    stages.mark("tasks");
    serve_stdio(&listen, &state).await?;
    serve_forwards(&listen)?;
    if matches!(listen, Listen::Vsock) {
        debug::serve(&state.cmdline, state.policy.clone())?;
    }
    stages.mark("side-listeners");
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
    stages.mark("ttrpc-server");
    tracing::debug!(
        since_main_ms = started_ms(&state),
        stages = %stages.describe(),
        "server listening"
    );
    state
        .server_ready_boottime_ns
        .store(details::boottime_ns(), std::sync::atomic::Ordering::Relaxed);
    // Filesystem, block and net modules are not needed to answer the host;
    // load them now, off the boot path. Calls that need them wait on
    // `modules_done`. Cocoon's own kernel has them built in: nothing to load, and no
    // thread to start before the ready line.
    if deferred.is_empty() {
        state.modules_done.send_replace(Some(Ok(())));
    } else {
        load_deferred(state.clone(), deferred);
    }
    // This exact line is what the shim (`cocoon_protocol::READY_LINE`), boot benchmarks
    // and humans look for on the console.
    match &listen {
        Listen::Vsock => println!("{READY_LINE} {AGENT_PORT}"),
        Listen::Unix(dir) => println!("cocoon-agent: ready on {}", dir.display()),
    }
    // The server runs on its own tasks; PID 1 lives until power-off.
    std::future::pending::<()>().await;
    Ok(())
}

/// Loads `deferred` on a thread of its own, then says so on `modules_done`.
fn load_deferred(st: Arc<handlers::AgentState>, deferred: Vec<modules::ModuleEntry>) {
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
}

#[cfg(test)]
mod tests {
    use super::runtime_for;
    use tokio::runtime::RuntimeFlavor;

    #[test]
    fn one_cpu_gets_no_worker_thread_and_more_get_one_each() {
        let one = runtime_for(1).enable_all().build().unwrap();
        assert_eq!(one.handle().runtime_flavor(), RuntimeFlavor::CurrentThread);
        // Timers and blocking work still run on it, as the handlers need.
        let slept = one.block_on(async {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            tokio::task::spawn_blocking(|| 7).await.unwrap()
        });
        assert_eq!(slept, 7);
        let three = runtime_for(3).enable_all().build().unwrap();
        assert_eq!(three.handle().runtime_flavor(), RuntimeFlavor::MultiThread);
        assert_eq!(three.metrics().num_workers(), 3);
    }
}
