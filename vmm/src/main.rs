//! `cocoon-vmm`: Cocoon's VMM process. `run` (or plain top-level flags) boots one microVM
//! from a config file and/or flags, optionally driven over an API socket;
//! `vhost-user-vsock` serves the vsock device to QEMU instead.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand};
use cocoon_vmm::config::{
    BlockDeviceConfig, FsDeviceConfig, NetDeviceConfig, VhostUserVsockConfig, VmConfig,
    VsockDeviceConfig,
};
use cocoon_vmm::vmm::{error_chain, Vmm, VmmOptions};
use cocoon_vmm::vsock::defs::{DEFAULT_GUEST_CID, DEFAULT_MAX_CONNECTIONS};
use cocoon_vmm::vsock::VsockConfig;

#[derive(Parser)]
#[command(
    name = "cocoon-vmm",
    version,
    about = "Cocoon's microVM monitor",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Without a subcommand, the flags of `run`.
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Boot one microVM; exits 0 when the guest resets (i8042) or powers off, 3 on a
    /// triple fault, 4 when KVM gives up, 1 on a VMM error.
    Run(Box<RunArgs>),
    /// Serve a virtio-vsock device to one vhost-user frontend (QEMU), with host
    /// connections over Unix sockets (Firecracker's hybrid vsock convention).
    VhostUserVsock {
        /// vhost-user socket to create and listen on for the frontend.
        #[arg(long)]
        socket: PathBuf,
        /// Unix socket host clients connect to (`CONNECT <port>\n`); guest connections to
        /// host port P go to `<uds-path>_P`.
        #[arg(long)]
        uds_path: PathBuf,
        /// The guest's context id.
        #[arg(long, default_value_t = DEFAULT_GUEST_CID)]
        guest_cid: u64,
        /// Milliseconds the guest has to accept a host connection.
        #[arg(long, default_value_t = 2000)]
        connect_timeout_ms: u64,
        /// Most simultaneous connections.
        #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS)]
        max_connections: usize,
        /// Own namespaces, an empty read-only root and no capabilities before serving:
        /// auto (when root), on (required), off.
        #[arg(long, default_value = "auto")]
        jail: cocoon_vmm::jail::JailMode,
        /// An inherited descriptor of a socket already listening at --uds-path (made by
        /// the caller), accepted on instead of binding one; left in place at exit.
        #[arg(long)]
        uds_fd: Option<i32>,
        /// An inherited descriptor of a socket already listening at --socket (made by
        /// the caller), the frontend's connection is accepted on instead of binding one;
        /// left in place at exit.
        #[arg(long)]
        socket_fd: Option<i32>,
    },
    /// Run PROGRAM (QEMU) jailed: own mount, network, IPC and UTS namespaces, a
    /// read-only root holding only the kept paths, an unprivileged uid, no capabilities,
    /// no_new_privs, resource limits, and killed with its parent. Must start as root.
    JailExec(Box<JailExecArgs>),
}

#[derive(Args)]
struct JailExecArgs {
    /// Keep a path read-only, nothing in it runs.
    #[arg(long)]
    keep_ro: Vec<PathBuf>,
    /// Keep a path read-only; programs and libraries in it run.
    #[arg(long)]
    keep_exec: Vec<PathBuf>,
    /// Keep a directory writable (sockets), nothing in it runs.
    #[arg(long)]
    keep_rw: Vec<PathBuf>,
    /// Keep a device node.
    #[arg(long)]
    keep_dev: Vec<PathBuf>,
    /// A symbolic link LINK=TARGET in the jail's root.
    #[arg(long, value_parser = cocoon_vmm::jail_exec::parse_link)]
    link: Vec<(PathBuf, PathBuf)>,
    #[arg(long, default_value_t = 0)]
    uid: u32,
    #[arg(long, default_value_t = 0)]
    gid: u32,
    /// Supplementary groups (only these).
    #[arg(long, value_delimiter = ',')]
    groups: Vec<u32>,
    /// A resource limit NAME=VALUE (nofile, nproc, fsize, core, memlock), soft and hard.
    #[arg(long, value_parser = cocoon_vmm::jail_exec::parse_limit)]
    limit: Vec<(nix::sys::resource::Resource, u64)>,
    /// Run the program as PID 1 of a PID namespace of its own; this process stays as
    /// its waiter (forwards signals, ends as it ends).
    #[arg(long)]
    pid_ns: bool,
    /// PATH=BYTES: a tmpfs of the jail's own at PATH for guest RAM, mounted huge=always
    /// with room for BYTES (whole 2 MiB pages), owned by --uid and --gid.
    #[arg(long, value_parser = cocoon_vmm::jail_exec::parse_huge_tmpfs)]
    huge_tmpfs: Option<(PathBuf, u64)>,
    /// The program and its arguments.
    #[arg(required = true, last = true)]
    command: Vec<std::ffi::OsString>,
}

fn jail_exec(a: JailExecArgs) -> anyhow::Result<u8> {
    use cocoon_vmm::jail::{KeepAs, KeptDir};
    let mut keep = Vec::new();
    for (paths, how) in [
        (&a.keep_exec, KeepAs::PROGRAMS),
        (&a.keep_ro, KeepAs::READ_ONLY),
        (&a.keep_rw, KeepAs::SOCKETS),
        (&a.keep_dev, KeepAs::DEVICE),
    ] {
        for p in paths {
            // A path named twice (a kernel that is also the initrd) is kept once.
            if !keep.iter().any(|k: &KeptDir| &k.path == p) {
                keep.push(KeptDir::open_as(p, how)?);
            }
        }
    }
    let mut command = a.command.into_iter();
    let program = PathBuf::from(command.next().unwrap_or_default());
    let err = cocoon_vmm::jail_exec::exec(cocoon_vmm::jail_exec::ExecJail {
        keep,
        links: a.link,
        uid: a.uid,
        gid: a.gid,
        groups: a.groups,
        limits: a.limit,
        program,
        args: command.collect(),
        pid_ns: a.pid_ns,
        huge_tmpfs: a.huge_tmpfs,
    });
    let cause = std::error::Error::source(&err)
        .map(|c| format!(": {c}"))
        .unwrap_or_default();
    anyhow::bail!("jail-exec: {err}{cause}")
}

#[derive(Args, Default)]
#[command(group(ArgGroup::new("api").args(["api_sock", "api_sock_fd"])))]
struct RunArgs {
    /// VM config file (JSON, or TOML if it ends in .toml); flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Kernel: a PVH ELF or a bzImage.
    #[arg(long)]
    kernel: Option<PathBuf>,
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line (the VMM appends its virtio_mmio.device= entries).
    #[arg(long)]
    cmdline: Option<String>,
    #[arg(long)]
    mem_mib: Option<u64>,
    #[arg(long)]
    vcpus: Option<u8>,
    /// File (or pipe) the serial console is appended to, capped at 4 MiB.
    #[arg(long)]
    serial_out: Option<PathBuf>,
    /// An inherited descriptor (a pipe) the serial console is written to, uncapped: its
    /// reader bounds what it keeps.
    #[arg(long, conflicts_with = "serial_out")]
    serial_out_fd: Option<i32>,
    /// Add a hybrid vsock device whose host side listens on this Unix socket.
    #[arg(long)]
    vsock_uds: Option<PathBuf>,
    #[arg(long, default_value_t = DEFAULT_GUEST_CID)]
    vsock_cid: u64,
    /// With --vsock-uds: an inherited socket already listening there, accepted on
    /// instead of binding one (its maker removes it).
    #[arg(long, requires = "vsock_uds")]
    vsock_uds_fd: Option<i32>,
    /// An inherited, open /dev/kvm, for a VMM that cannot open it itself (jail-exec).
    #[arg(long)]
    kvm_fd: Option<i32>,
    /// Guest RAM on a huge-page tmpfs of its own: auto (where this process may mount
    /// one), on (required), off.
    #[arg(long)]
    huge_pages: Option<cocoon_vmm::vstate::ram_file::HugePages>,
    /// An inherited file to use as guest RAM (its maker chose its huge pages).
    #[arg(long, conflicts_with = "huge_pages")]
    mem_fd: Option<i32>,
    /// Add a virtio-blk disk: PATH or PATH,ro. Repeatable.
    #[arg(long)]
    disk: Vec<String>,
    /// Add a virtio-net device on this tap interface. Repeatable.
    #[arg(long)]
    net_tap: Vec<String>,
    /// Add a virtio-net device on an inherited tap fd: FD or FD,mac=MAC. Repeatable.
    #[arg(long)]
    net_fd: Vec<String>,
    /// Add a virtio-fs device: SOCKET:TAG (virtiofsd's vhost-user socket). Repeatable.
    #[arg(long)]
    fs: Vec<String>,
    /// Serve vsock through this vhost-user backend socket instead of in-process.
    #[arg(long, conflicts_with = "vsock_uds")]
    vsock_vhost_user: Option<PathBuf>,
    /// Serve the JSON-lines API on this Unix socket.
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Serve the API on an inherited Unix socket, already bound and listening (made by
    /// the caller, who removes it), instead of binding --api-sock.
    #[arg(long, value_name = "FD", conflicts_with = "api_sock")]
    api_sock_fd: Option<i32>,
    /// With an API socket: wait for a `boot` request instead of booting right away.
    #[arg(long)]
    no_boot: bool,
    /// Run without the seccomp filter and no_new_privs (debugging only).
    #[arg(long)]
    no_seccomp: bool,
    /// No ACPI tables: the MP table, and virtio devices on the kernel command line.
    #[arg(long)]
    no_acpi: bool,
    /// A virtio balloon taking free page reports: memory the guest frees goes back to
    /// the host.
    #[arg(long)]
    free_page_reporting: bool,
    /// MiB of memory the guest can be given while it runs (a virtio-mem device; a
    /// multiple of 128): none of it is plugged until a `resize_memory` API request.
    #[arg(long, value_name = "MIB")]
    hotplug_mib: Option<u64>,
    /// Empty virtio-blk slots the API can put host disks in while the guest runs
    /// (`attach_disk`, the disk's descriptor passed with the request).
    #[arg(long, value_name = "N")]
    block_slots: Option<u8>,
    /// Own mount/network/IPC/UTS namespaces and an empty read-only root before the
    /// guest runs: auto (when root), on (required), off.
    #[arg(long)]
    jail: Option<cocoon_vmm::jail::JailMode>,
    /// With an API socket: make DIR's snapshot files now, and take a snapshot of the
    /// paused VM into them on a `snapshot` request (a VM template).
    #[arg(long, requires = "api", value_name = "DIR")]
    snapshot_to: Option<PathBuf>,
    /// Start from the snapshot in DIR instead of booting: the guest goes on where it
    /// was saved. Its config is the snapshot's; the flags given here (serial output,
    /// vsock socket, virtio-fs sockets, taps, API socket) replace the template's.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["config", "kernel", "initrd", "cmdline", "mem_mib", "vcpus", "no_boot", "hotplug_mib", "block_slots"])]
    restore: Option<PathBuf>,
    /// Print the wall-clock time of the guest's first exit to stderr (benchmarks).
    #[arg(long, hide = true)]
    print_first_exit: bool,
    /// At exit, print the VM exits by kind (port, MMIO address, halt, ...) with the time
    /// spent handling each, as a table and as one `cocoon-vmm: exit-stats {json}` line.
    #[arg(long)]
    stats: bool,
}

/// Checks that a descriptor named on the command line is open. Done while reading the
/// flags, before the VMM opens descriptors of its own, which a stale number could name
/// (and the VMM would then map, or close, as if it were the one meant). Numbers 0-2 are
/// left to the config's own check, which refuses them.
fn inherited_is_open(flag: &str, fd: i32) -> anyhow::Result<()> {
    // SAFETY: fcntl on a number only asks whether it is an open descriptor.
    if fd > 2 && unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        anyhow::bail!("{flag} {fd}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn vm_config(a: &RunArgs, template: Option<&VmConfig>) -> anyhow::Result<Option<VmConfig>> {
    let mut c = match (&a.config, &a.kernel, template) {
        (_, _, Some(t)) => {
            // The template's descriptors were its VMM's; this VM gets its own devices
            // where flags name them.
            let mut c = t.clone();
            c.kvm_fd = None;
            c.mem_fd = None;
            c.serial_out_fd = None;
            if let Some(v) = &mut c.vsock {
                v.listener_fd = None;
            }
            if !a.fs.is_empty() {
                c.fs.clear();
            }
            if !a.net_tap.is_empty() || !a.net_fd.is_empty() {
                c.net.clear();
            }
            if !a.disk.is_empty() {
                c.block.clear();
            }
            c
        }
        (Some(p), _, None) => VmConfig::from_file(p)?,
        (None, Some(k), None) => VmConfig::new(k),
        (None, None, None) => return Ok(None),
    };
    if let Some(k) = &a.kernel {
        c.kernel = k.clone();
    }
    if let Some(i) = &a.initrd {
        c.initrd = Some(i.clone());
    }
    if let Some(s) = &a.cmdline {
        c.cmdline = s.clone();
    }
    if let Some(m) = a.mem_mib {
        c.mem_mib = m;
    }
    if let Some(n) = a.vcpus {
        c.vcpus = n;
    }
    if let Some(s) = &a.serial_out {
        c.serial_out = Some(s.clone());
    }
    if let Some(fd) = a.serial_out_fd {
        inherited_is_open("--serial-out-fd", fd)?;
        c.serial_out = None;
        c.serial_out_fd = Some(fd);
    }
    if let Some(u) = &a.vsock_uds {
        c.vsock = Some(VsockDeviceConfig {
            guest_cid: a.vsock_cid,
            uds_path: u.clone(),
            listener_fd: a.vsock_uds_fd,
        });
    }
    if let Some(fd) = a.kvm_fd {
        inherited_is_open("--kvm-fd", fd)?;
        c.kvm_fd = Some(fd);
    }
    if let Some(h) = a.huge_pages {
        c.huge_pages = h;
    }
    if let Some(fd) = a.mem_fd {
        inherited_is_open("--mem-fd", fd)?;
        c.mem_fd = Some(fd);
    }
    for d in &a.disk {
        let (path, read_only) = match d.strip_suffix(",ro") {
            Some(p) => (p, true),
            None => (d.as_str(), false),
        };
        c.block.push(BlockDeviceConfig {
            path: path.into(),
            read_only,
            id: String::new(),
        });
    }
    for t in &a.net_tap {
        c.net.push(NetDeviceConfig {
            tap: t.clone(),
            tap_fd: None,
            mac: None,
        });
    }
    for f in &a.net_fd {
        let (fd, mac) = match f.split_once(",mac=") {
            Some((fd, mac)) => (fd, Some(mac.to_string())),
            None => (f.as_str(), None),
        };
        let fd = fd
            .parse()
            .map_err(|_| anyhow::anyhow!("--net-fd wants FD or FD,mac=MAC, got {f:?}"))?;
        c.net.push(NetDeviceConfig {
            tap: String::new(),
            tap_fd: Some(fd),
            mac,
        });
    }
    for f in &a.fs {
        let (socket, tag) = f
            .rsplit_once(':')
            .ok_or_else(|| anyhow::anyhow!("--fs wants SOCKET:TAG, got {f:?}"))?;
        c.fs.push(FsDeviceConfig {
            socket: socket.into(),
            tag: tag.into(),
            queue_size: 1024,
        });
    }
    if let Some(s) = &a.vsock_vhost_user {
        c.vhost_user_vsock = Some(VhostUserVsockConfig {
            socket: s.clone(),
            guest_cid: a.vsock_cid,
        });
    }
    if a.no_seccomp {
        c.seccomp = false;
    }
    if a.no_acpi {
        c.acpi = false;
    }
    if a.free_page_reporting {
        c.free_page_reporting = true;
    }
    if let Some(n) = a.block_slots {
        c.block_slots = n;
    }
    if let Some(m) = a.hotplug_mib {
        c.hotplug_mib = m;
    }
    if let Some(j) = a.jail {
        c.jail = j;
    }
    Ok(Some(c))
}

fn run_vm(a: RunArgs) -> anyhow::Result<u8> {
    let restore = match &a.restore {
        Some(dir) => Some(
            cocoon_vmm::vstate::snapshot::load(dir)
                .map_err(|e| anyhow::anyhow!("{}: {e}: {}", dir.display(), error_chain(&e)))?,
        ),
        None => None,
    };
    let config = vm_config(&a, restore.as_ref().map(|(s, _)| &s.config))?;
    if config.is_none() && a.api_sock.is_none() && a.api_sock_fd.is_none() {
        anyhow::bail!(
            "nothing to run: give --kernel, --config, --restore, --api-sock or --api-sock-fd"
        );
    }
    let boot_now = config.is_some() && !a.no_boot;
    let vmm = Vmm::new(VmmOptions {
        config,
        api_sock: a.api_sock,
        api_sock_fd: a.api_sock_fd,
        boot_now,
        print_first_exit: a.print_first_exit,
        print_stats: a.stats,
        snapshot_to: a.snapshot_to,
        restore,
    })
    .map_err(|e| anyhow::anyhow!("{e}: {}", error_chain(&e)))?;
    let reason = vmm
        .run()
        .map_err(|e| anyhow::anyhow!("{e}: {}", error_chain(&e)))?;
    Ok(reason.exit_code())
}

fn main() -> ExitCode {
    // virtio-queue logs an error of its own, unlimited, for each misprogrammed queue
    // register a guest writes (size, ring alignment, rings outside its memory): a guest
    // could fill the host's logs with them. The transport and devices report the same
    // things through their `LogLimiter`s, so the crate is silenced whatever RUST_LOG says.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .filter_module("virtio_queue", log::LevelFilter::Off)
        .init();
    // A panic in any thread (a vCPU, a device) ends the whole VMM: a VM with a dead
    // device thread would hang its guest instead of failing where the shim can see it.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::abort();
    }));
    let cli = Cli::parse();
    let result = match cli.command {
        None => run_vm(cli.run),
        Some(Command::Run(a)) => run_vm(*a),
        Some(Command::JailExec(a)) => jail_exec(*a),
        Some(Command::VhostUserVsock {
            socket,
            uds_path,
            guest_cid,
            connect_timeout_ms,
            max_connections,
            jail,
            uds_fd,
            socket_fd,
        }) => {
            let config = VsockConfig {
                guest_cid,
                uds_path,
                connect_timeout: Duration::from_millis(connect_timeout_ms),
                max_connections,
                listener_fd: uds_fd,
            };
            cocoon_vmm::vhost_user_vsock::serve(&socket, socket_fd, config, jail)
                .map(|()| 0)
                .map_err(anyhow::Error::from)
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("cocoon-vmm: {e:#}");
            ExitCode::FAILURE
        }
    }
}
