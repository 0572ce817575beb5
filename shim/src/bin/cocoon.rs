//! `cocoon`: the operator's command. Checks the host, builds the guest image,
//! boots a VM for debugging, and runs benchmarks.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use cocoon_shim::agent_client::AgentClient;
use cocoon_shim::config::Config;
use cocoon_shim::hypervisor::{self, VmSpec};
use cocoon_shim::{bench, check};

#[derive(Parser)]
#[command(name = "cocoon", version, about = "Cocoon: containers in microVMs")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// What this host offers (KVM kind, vsock, SEV-SNP/TDX, tools), which backend to use,
    /// and whether pods with the node's config can start here (exit status 1 if not).
    Check {
        #[arg(long)]
        json: bool,
    },
    /// Guest image commands.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// Debugging VMs by hand.
    Vm {
        #[command(subcommand)]
        cmd: VmCmd,
    },
    /// Pod lifecycles through CRI with faults injected (VMM, virtiofsd, vsock backend or
    /// shim killed, containerd restarted); fails if anything leaked or hung. Runs
    /// `cocoon-soak` (built with the integration tests).
    Soak {
        #[arg(long, default_value_t = 50)]
        cycles: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value = "cocoon-soak.json")]
        out: PathBuf,
        /// Only these faults, comma-separated (none, kill_vmm, kill_virtiofsd,
        /// kill_vsock_backend, kill_shim, restart_containerd, crash_agent); all by default.
        #[arg(long)]
        faults: Option<String>,
    },
    /// The VM templates on this node (`[vm] templates`): key, disk space, and whether a
    /// pod can still be restored from it. `--prune` removes those none can (made from a
    /// kernel, initramfs or VMM binary that has changed since).
    Templates {
        #[arg(long)]
        prune: bool,
    },
    /// The guest console of a pod: live while it runs, kept after its VM failed.
    Logs {
        /// The pod's sandbox id (or a container id, or the VM id `pod-…`).
        id: String,
        /// Its containerd namespace (default: k8s.io, default and moby are tried).
        #[arg(long)]
        namespace: Option<String>,
    },
    /// A root shell in a running pod's guest, outside its containers (pods started
    /// with `[debug] console = true` only). With a command after `--`, runs it there.
    Debug {
        /// The pod's sandbox id (or a container id, or the VM id `pod-…`).
        id: String,
        /// Its containerd namespace (default: k8s.io, default and moby are tried).
        #[arg(long)]
        namespace: Option<String>,
        /// Run this (by `sh -c`) instead of an interactive shell.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// A confidential pod's hardware evidence for a relying party's nonce: the SEV-SNP
    /// report or TDX quote, whose report data binds the nonce and the pod's init-data
    /// (see docs/confidential.md). The host only carries it; the relying party checks it.
    Attest {
        /// The pod's sandbox id (or a container id, or the VM id `pod-…`).
        id: String,
        /// Its containerd namespace (default: k8s.io, default and moby are tried).
        #[arg(long)]
        namespace: Option<String>,
        /// The relying party's nonce, in hex (at most 64 bytes).
        #[arg(long)]
        nonce: String,
        /// Write the raw evidence here (else only its summary is printed).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Metrics of this node and its pods in Prometheus' text format: printed once, or
    /// served at http://<listen>/metrics.
    Metrics {
        /// Serve over HTTP here (e.g. 127.0.0.1:9420) instead of printing once.
        #[arg(long)]
        listen: Option<String>,
    },
    /// The launch measurement a confidential pod's VM will report, computed in advance
    /// (SEV-SNP: the same inputs and digest as `sev-snp-measure --mode snp`).
    Measure {
        #[command(subcommand)]
        cmd: cocoon_confidential::measure::MeasureCmd,
    },
    /// Agent policies for confidential pods.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Benchmarks that write a JSON report and print a table.
    Bench {
        #[command(subcommand)]
        cmd: BenchCmd,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Init-data for a Pod whose policy holds each container to what its manifest and
    /// its image say (image by digest, process, environment, user, secrets): the
    /// confidential default plus CreateContainerImageRequest (docs/confidential.md).
    /// Printed as TOML, or with --annotation as the io.cocoon.init-data value.
    Generate {
        /// The Pod's manifest (YAML or JSON).
        manifest: PathBuf,
        /// Init-data whose other documents (aa.toml, cdh.toml) and algorithm to keep.
        #[arg(long)]
        init_data: Option<PathBuf>,
        /// The digest algorithm without --init-data.
        #[arg(long, default_value = "sha384", value_parser = ["sha256", "sha384", "sha512"])]
        algorithm: String,
        /// Print the pod annotation's value (base64) instead of the TOML.
        #[arg(long)]
        annotation: bool,
        /// The nodes' containerd release (`containerd --version`): how it makes a
        /// container's supplementary groups changed in 1.6.22 and 1.7.3.
        #[arg(long, default_value = cocoon_confidential::genpolicy::CONTAINERD)]
        containerd: String,
        /// A group kubelet adds to every container from one of the pod's persistent
        /// volumes (its `pv.beta.kubernetes.io/gid` annotation); repeat for each.
        #[arg(long = "pv-gid")]
        pv_gids: Vec<u64>,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Builds the guest kernel + initramfs into the content-addressed cache.
    Build {
        /// The statically linked agent binary (becomes /init).
        #[arg(long)]
        agent: PathBuf,
        /// Use this linux-image .deb instead of resolving Debian's cloud kernel.
        #[arg(long, conflicts_with = "built_kernel")]
        kernel_deb: Option<PathBuf>,
        /// Build Cocoon's own kernel (Debian's linux-source-6.12 with
        /// rootfs/kernel/cocoon.config, everything built in; cached) instead of
        /// Debian's cloud kernel.
        #[arg(long)]
        built_kernel: bool,
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Also copy vmlinuz, initramfs.cpio and manifest.json here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// A static busybox for the debug console (`cocoon debug`), at /bin/busybox.
        #[arg(long)]
        busybox: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum VmCmd {
    /// Boots a VM, calls the agent, prints guest details and timings, shuts it down.
    Boot {
        #[arg(long, default_value = "")]
        id: String,
        /// Extra kernel parameters (appended last).
        #[arg(long)]
        kernel_params: Option<String>,
        #[arg(long)]
        json: bool,
        /// Print the guest console (serial) after the run.
        #[arg(long)]
        console: bool,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// `ctr run --rm <image> <id> true` with cocoon vs runc, breakdown and pod memory.
    Run {
        /// containerd's socket.
        #[arg(long, default_value = "/run/containerd/containerd.sock")]
        address: PathBuf,
        /// An image already in that containerd.
        #[arg(long)]
        image: String,
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Idle pods of each runtime run at once for the per-pod footprint (their shims',
        /// janitors' and VMMs' text is shared between them).
        #[arg(long, default_value_t = 4)]
        idle_pods: usize,
        #[arg(long, default_value = "cocoon-bench-run.json")]
        out: PathBuf,
    },
    /// Launch-to-agent-ready time against a raw QEMU boot baseline.
    Boot {
        #[arg(long, default_value_t = 5)]
        runs: usize,
        #[arg(long, default_value = "cocoon-bench-boot.json")]
        out: PathBuf,
        /// Static busybox for the baseline's trivial init.
        #[arg(long, default_value = "/bin/busybox")]
        busybox: PathBuf,
        /// Also boot the guest image in this directory (vmlinuz, initramfs.cpio),
        /// alternating with the configured one: e.g. Debian's cloud kernel against
        /// Cocoon's own.
        #[arg(long)]
        compare_image: Option<PathBuf>,
        /// Also boot with `[vm] templates` the other way round, alternating (cocoon-vmm):
        /// a VM restored from a template against a cold boot. The template is made
        /// before the first measured run.
        #[arg(long, conflicts_with = "compare_image")]
        compare_templates: bool,
        /// Also boot with the configuration in this file, alternating with the node's:
        /// an A/B of any setting (e.g. `[vm] block_slots = 0`) in one run.
        #[arg(long, conflicts_with_all = ["compare_image", "compare_templates"])]
        compare_config: Option<PathBuf>,
    },
    /// Kubernetes pods through containerd's CRI plugin: RunPodSandbox -> container
    /// running, cocoon vs runc, and N pods at once (time, host memory per pod). Runs
    /// `cocoon-bench-pods` (built with the integration tests: it carries the CRI
    /// client, which the runtime itself does not need).
    Pods {
        #[arg(long, default_value_t = 10)]
        runs: usize,
        #[arg(long, default_value_t = 10)]
        concurrent: usize,
        #[arg(long, default_value = "cocoon-bench-pods.json")]
        out: PathBuf,
    },
    /// cocoon-vmm against QEMU with KVM on the same guest image (needs hardware KVM;
    /// `make bench` runs it inside the nested harness where there is none).
    Vmm {
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long, default_value = "cocoon-bench-vmm.json")]
        out: PathBuf,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COCOON_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("cocoon: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Measure { cmd } => {
            println!("{}", cocoon_confidential::measure::run(&cmd)?);
            Ok(())
        }
        Cmd::Policy {
            cmd:
                PolicyCmd::Generate {
                    manifest,
                    init_data,
                    algorithm,
                    annotation,
                    containerd,
                    pv_gids,
                },
        } => {
            let read = |p: &Path| {
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
            };
            let base = init_data.as_deref().map(read).transpose()?;
            let text = cocoon_confidential::genpolicy::generate(
                &read(&manifest)?,
                base.as_deref(),
                &algorithm,
                &containerd,
                &pv_gids,
            )
            .map_err(|e| anyhow::anyhow!("{}: {e}", manifest.display()))?;
            if annotation {
                use base64::Engine;
                println!("{}", base64::engine::general_purpose::STANDARD.encode(text));
            } else {
                print!("{text}");
            }
            Ok(())
        }
        Cmd::Soak {
            cycles,
            seed,
            out,
            faults,
        } => {
            let tool = cocoon_shim::hypervisor::find_binary("cocoon-soak", Path::new("")).context(
                "`cocoon soak` needs cocoon-soak (cargo build -p cocoon-integration --bins)",
            )?;
            let status = std::process::Command::new(&tool)
                .args(["--cycles", &cycles.to_string(), "--seed", &seed.to_string()])
                .arg("--out")
                .arg(&out)
                .args(faults.iter().flat_map(|f| ["--faults", f.as_str()]))
                .status()
                .with_context(|| format!("running {}", tool.display()))?;
            if !status.success() {
                bail!(
                    "the soak found leaks or unclean failures (report: {})",
                    out.display()
                );
            }
            Ok(())
        }
        Cmd::Templates { prune } => {
            use cocoon_shim::hypervisor::template;
            let config = Config::load()?;
            let store = config.paths.run_dir.join(template::DIR);
            let removed = if prune {
                template::prune_stale(&store, None)
            } else {
                Vec::new()
            };
            println!("{:<34} {:>10}  state", "template", "disk (MiB)");
            for t in template::list(&store) {
                let state = if t.usable {
                    "usable"
                } else {
                    "stale (--prune removes it)"
                };
                println!(
                    "{:<34} {:>10.1}  {state}",
                    t.key,
                    t.disk_bytes as f64 / 1048576.0
                );
            }
            for key in removed {
                println!("{key:<34} {:>10}  removed", "-");
            }
            Ok(())
        }
        Cmd::Logs { id, namespace } => {
            let config = Config::load()?;
            let namespaces: Vec<&str> = match &namespace {
                Some(ns) => vec![ns.as_str()],
                None => cocoon_shim::consolelog::NAMESPACES.to_vec(),
            };
            let path = cocoon_shim::consolelog::find(&config.paths.run_dir, &id, &namespaces)
                .with_context(|| {
                    format!(
                        "no console for pod {id} under {} (namespaces {namespaces:?}): not \
                         running here, and no failure of it kept",
                        config.paths.run_dir.display()
                    )
                })?;
            let text =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            std::io::Write::write_all(&mut std::io::stdout(), &text)?;
            Ok(())
        }
        Cmd::Debug {
            id,
            namespace,
            command,
        } => {
            use cocoon_shim::debugconsole;
            let config = Config::load()?;
            let uds = pod_vsock(&config, &id, namespace.as_deref())?;
            let stream = runtime()?.block_on(debugconsole::open(&uds, &command))?;
            debugconsole::join_terminal(stream, command.is_empty())
        }
        Cmd::Attest {
            id,
            namespace,
            nonce,
            out,
        } => {
            let nonce = hex::decode(nonce.trim()).context("--nonce is not hex")?;
            let config = Config::load()?;
            let uds = pod_vsock(&config, &id, namespace.as_deref())?;
            let call = std::time::Duration::from_millis(config.vm.call_timeout_ms);
            let r = runtime()?.block_on(async {
                let agent =
                    cocoon_shim::agent_client::AgentClient::connect(&uds, call, call).await?;
                agent.evidence(nonce).await
            })?;
            println!("provider     {}", r.provider);
            println!("report data  {}", hex::encode(&r.report_data));
            println!("evidence     {} bytes", r.evidence.len());
            if let Some(path) = out {
                std::fs::write(&path, &r.evidence)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("written to   {}", path.display());
            }
            Ok(())
        }
        Cmd::Metrics { listen } => {
            let config = Config::load()?;
            let root = config.paths.run_dir;
            runtime()?.block_on(async {
                match listen {
                    Some(addr) => cocoon_shim::nodemetrics::serve(&addr, &root).await,
                    None => {
                        print!("{}", cocoon_shim::nodemetrics::collect(&root).await);
                        Ok(())
                    }
                }
            })
        }
        Cmd::Check { json } => {
            // The jail is tried where pods' shares will be; the check still runs
            // without a config (it is what one runs to find out what is wrong).
            let config = Config::load();
            let run_dir = config.as_ref().ok().map(|c| c.paths.run_dir.clone());
            let mut r = check::report_in(run_dir.as_deref());
            let pods = cocoon_shim::ready::pods(Config::node_path(), &config, &r);
            let ready = pods.ready();
            r.pods = Some(pods);
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{r}");
            }
            // What the node installer (deploy/install.sh) and scripts go by.
            if !ready {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Image {
            cmd:
                ImageCmd::Build {
                    agent,
                    kernel_deb,
                    built_kernel,
                    cache_dir,
                    out,
                    busybox,
                },
        } => {
            let source = match (kernel_deb, built_kernel) {
                (Some(p), _) => cocoon_rootfs::KernelSource::DebFile(p),
                (None, true) => cocoon_rootfs::KernelSource::Built,
                (None, false) => cocoon_rootfs::KernelSource::DebianCloud,
            };
            let mut opts = cocoon_rootfs::BuildOptions::new(source, agent);
            opts.cache_dir = cache_dir;
            opts.out_dir = out;
            opts.busybox = busybox;
            let image = cocoon_rootfs::build(&opts).context("building the guest image")?;
            println!("{}", serde_json::to_string_pretty(&image)?);
            Ok(())
        }
        Cmd::Vm {
            cmd:
                VmCmd::Boot {
                    id,
                    kernel_params,
                    json,
                    console,
                },
        } => runtime()?.block_on(until_signalled(vm_boot(id, kernel_params, json, console))),
        Cmd::Bench {
            cmd:
                BenchCmd::Run {
                    address,
                    image,
                    runs,
                    idle_pods,
                    out,
                },
        } => {
            if runs == 0 {
                bail!("--runs must be at least 1");
            }
            if idle_pods == 0 {
                bail!("--idle-pods must be at least 1");
            }
            let config = Config::load()?;
            let report = cocoon_shim::bench_run::run_bench(
                &address,
                &image,
                runs,
                idle_pods,
                &config.paths.run_dir,
            )?;
            std::fs::write(&out, serde_json::to_string_pretty(&report)?)
                .with_context(|| format!("writing {}", out.display()))?;
            print!("{}", report.table());
            println!("report written to {}", out.display());
            Ok(())
        }
        Cmd::Bench {
            cmd: BenchCmd::Vmm { runs, out },
        } => {
            if runs == 0 {
                bail!("--runs must be at least 1");
            }
            let config = Config::load()?;
            let report = runtime()?.block_on(cocoon_shim::bench_vmm::vmm_bench(&config, runs))?;
            std::fs::write(&out, serde_json::to_string_pretty(&report)?)
                .with_context(|| format!("writing {}", out.display()))?;
            print!("{}", report.table());
            println!("report written to {}", out.display());
            Ok(())
        }
        Cmd::Bench {
            cmd:
                BenchCmd::Pods {
                    runs,
                    concurrent,
                    out,
                },
        } => {
            let tool = cocoon_shim::hypervisor::find_binary("cocoon-bench-pods", Path::new(""))
                .context("`cocoon bench pods` needs cocoon-bench-pods (cargo build -p cocoon-integration --bins)")?;
            let status = std::process::Command::new(&tool)
                .args([
                    "--runs",
                    &runs.to_string(),
                    "--concurrent",
                    &concurrent.to_string(),
                ])
                .arg("--out")
                .arg(&out)
                .status()
                .with_context(|| format!("running {}", tool.display()))?;
            if !status.success() {
                bail!("{} failed ({status})", tool.display());
            }
            Ok(())
        }
        Cmd::Bench {
            cmd:
                BenchCmd::Boot {
                    runs,
                    out,
                    busybox,
                    compare_image,
                    compare_templates,
                    compare_config,
                },
        } => {
            if runs == 0 {
                bail!("--runs must be at least 1");
            }
            let config = Config::load()?;
            let compare = compare_image.map(|dir| {
                // That image's own kernel choice (its PVH ELF where it has one).
                let mut c = config.clone();
                c.paths.image_dir = dir;
                c.vm.kernel = PathBuf::new();
                c.vm.initrd = PathBuf::new();
                c
            });
            let compare = match compare_templates {
                true => {
                    let mut c = config.clone();
                    c.vm.templates = !c.vm.templates;
                    c.validate()?;
                    Some(c)
                }
                false => compare,
            };
            let compare = match &compare_config {
                Some(path) => Some(Config::from_file(path)?),
                None => compare,
            };
            let mut report = runtime()?.block_on(bench::boot_bench(
                &config,
                runs,
                &busybox,
                compare.as_ref(),
            ))?;
            report.compare_config = compare_config;
            std::fs::write(&out, serde_json::to_string_pretty(&report)?)
                .with_context(|| format!("writing {}", out.display()))?;
            print!("{}", report.table());
            println!("report written to {}", out.display());
            Ok(())
        }
    }
}

/// Runs `f` unless SIGINT or SIGTERM comes first; then `f` is dropped, and
/// with it any VM it owns (which kills its processes and removes its run dir).
async fn until_signalled(f: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        r = f => r,
        _ = term.recv() => bail!("terminated; the VM was stopped and cleaned up"),
        _ = int.recv() => bail!("interrupted; the VM was stopped and cleaned up"),
    }
}

/// The vsock socket of running pod `id` (a sandbox, container or VM id) in `namespace`,
/// or in each namespace pods usually live in.
fn pod_vsock(config: &Config, id: &str, namespace: Option<&str>) -> Result<std::path::PathBuf> {
    let namespaces: Vec<&str> = match namespace {
        Some(ns) => vec![ns],
        None => cocoon_shim::consolelog::NAMESPACES.to_vec(),
    };
    cocoon_shim::debugconsole::find_vsock(&config.paths.run_dir, id, &namespaces).with_context(
        || {
            format!(
                "no running pod {id} under {} (namespaces {namespaces:?})",
                config.paths.run_dir.display()
            )
        },
    )
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

async fn vm_boot(
    id: String,
    kernel_params: Option<String>,
    json: bool,
    console: bool,
) -> Result<()> {
    let mut config = Config::load()?;
    if let Some(p) = kernel_params {
        config.vm.kernel_params = p;
    }
    let id = if id.is_empty() {
        format!("vm-{}", std::process::id())
    } else {
        id
    };
    let hv = hypervisor::from_config(&config)?;
    let spec = VmSpec::from_config(&config, &id);
    let mut vm = hv.launch(&spec).await?;
    let boot_timeout = Duration::from_millis(config.vm.boot_timeout_ms);
    let call_timeout = Duration::from_millis(config.vm.call_timeout_ms);
    let agent = AgentClient::wait_ready(&mut vm, boot_timeout, call_timeout).await?;
    let ready = vm.times.started.elapsed();
    let version = agent.version().await?;
    let asked = Instant::now();
    let d = agent.guest_details().await?;
    let clock = cocoon_shim::shimv2::timings::GuestClock {
        asked,
        answered: Instant::now(),
        boottime_ns: d.boottime_ns,
    };
    let t = Instant::now();
    agent.shutdown().await?;
    let exited = vm.wait_exit(Duration::from_secs(10)).await;
    let shutdown = t.elapsed();
    if console {
        vm.settle_logs().await;
    }
    let launch = vm.times.vmm_spawned - vm.times.started;
    let (started, spawned) = (vm.times.started, vm.times.vmm_spawned);
    let console_text =
        console.then(|| std::fs::read_to_string(&vm.console_log).unwrap_or_default());
    vm.stop(Duration::ZERO).await;
    if let Some(text) = console_text {
        println!("--- guest console ---\n{text}\n--- end of guest console ---");
    }
    if exited.is_none() {
        bail!("the VM did not power off within 10 s of Shutdown; it was killed");
    }
    let kernel_ms = d.agent_start_boottime_ns as f64 / 1e6;
    let agent_ms = (d.server_ready_boottime_ns - d.agent_start_boottime_ns) as f64 / 1e6;
    // Agent main on the host's clock (placed through GuestDetails), and on the guest's
    // TSC, which counts from the VM's start: what lies before that start is the VMM's
    // own set-up. The guest clock's boot time 0 is not used as the kernel's start: under
    // TCG it misses hundreds of ms of the kernel's boot (jiffies lose ticks while
    // interrupts are off, until the TSC clocksource takes over).
    let agent_main_ms = clock.ms_after(spawned, d.agent_start_boottime_ns);
    let tsc_ms = cocoon_shim::bench::tsc_ms(d.agent_start_tsc, &config.paths.run_dir);
    let vmm_setup_ms = agent_main_ms - tsc_ms;
    let connect_ms =
        ready.as_secs_f64() * 1e3 - clock.ms_after(started, d.server_ready_boottime_ns);
    if json {
        let v = serde_json::json!({
            "id": id,
            "agent_version": version.agent_version,
            "protocol_version": version.protocol_version,
            "kernel_release": d.kernel_release,
            "kernel_cmdline": d.kernel_cmdline,
            "online_cpus": d.online_cpus,
            "mem_total_bytes": d.mem_total_bytes,
            "loaded_modules": d.loaded_modules,
            "cgroup_version": d.cgroup_version,
            "timings_ms": {
                "ready": ready.as_secs_f64() * 1e3,
                "vmm_launch": launch.as_secs_f64() * 1e3,
                "vmm_setup": vmm_setup_ms,
                "vm_start_to_agent_main": tsc_ms,
                "kernel_boot": kernel_ms,
                "agent_start": agent_ms,
                "connect": connect_ms,
                "clock_uncertainty": clock.uncertainty_ms(),
                "shutdown": shutdown.as_secs_f64() * 1e3,
            }
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("VM {id} ({} accel)", vm_accel(&config));
    println!(
        "  agent            {} (protocol {})",
        version.agent_version, version.protocol_version
    );
    println!("  kernel           {}", d.kernel_release);
    println!("  cmdline          {}", d.kernel_cmdline);
    println!(
        "  cpus / memory    {} / {} MiB",
        d.online_cpus,
        d.mem_total_bytes >> 20
    );
    println!("  cgroup           {}", d.cgroup_version);
    println!("  modules          {}", d.loaded_modules.join(" "));
    println!("timings (ms)");
    println!(
        "  launch -> agent ready   {:>8.1}",
        ready.as_secs_f64() * 1e3
    );
    println!(
        "    vmm launch (host)     {:>8.1}",
        launch.as_secs_f64() * 1e3
    );
    println!(
        "    vmm set-up (host)     {vmm_setup_ms:>8.1}   (spawn to the guest's first instruction, ±{:.1})",
        clock.uncertainty_ms()
    );
    println!("    firmware + kernel     {tsc_ms:>8.1}   (guest TSC at agent main)");
    println!("      kernel (its clock)  {kernel_ms:>8.1}");
    println!("    agent start (guest)   {agent_ms:>8.1}");
    println!("    first connect (host)  {connect_ms:>8.1}");
    println!(
        "  shutdown -> exit        {:>8.1}",
        shutdown.as_secs_f64() * 1e3
    );
    Ok(())
}

fn vm_accel(config: &Config) -> &'static str {
    match hypervisor::resolve_accel(config.qemu.accel, check::kvm_kind()) {
        Ok((cocoon_shim::config::Accel::Kvm, _)) => "kvm",
        _ => "tcg",
    }
}
