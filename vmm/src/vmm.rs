//! The running VMM: one event loop on the main thread (the exit event, the API socket,
//! each device's host descriptor) and one thread per vCPU. Owns the VM's lifecycle:
//! not configured → configured → running ⇄ paused → ended.
//!
//! The API is newline-delimited JSON on a Unix socket (one the VMM binds, or one its
//! parent bound and hands over). Requests:
//! `{"action":"configure","config":{...VmConfig...}}`, `{"action":"boot"}`,
//! `{"action":"pause"}`, `{"action":"resume"}`, `{"action":"shutdown"}`,
//! `{"action":"state"}`, `{"action":"stats"}`, `{"action":"snapshot"}` (paused, in
//! a VMM started with `snapshot_to`; see [`crate::vstate::snapshot`]), and for a VM with
//! a virtio-mem device (`hotplug_mib`; [`crate::devices::virtio::mem`]), running or
//! paused, `{"action":"memory"}` and `{"action":"resize_memory","requested_mib":N}`
//! (N a multiple of 2, at most the region: the guest plugs or unplugs memory until N MiB
//! are plugged, in its own time). Each gets one line back:
//! `{"ok":true,"state":"running"}` or `{"ok":false,"state":...,"error":"..."}`; `stats`
//! adds `"stats":{...}`, the VM exits by kind (`vstate::exit_stats`); `memory` and
//! `resize_memory` add `"memory":{"region_mib":R,"requested_mib":Q,"plugged_mib":P}`.
//! For a VM with disk slots (`block_slots`), running or paused:
//! `{"action":"attach_disk","slot":N,"serial":"S","read_only":B}` with the disk's open
//! descriptor passed in the same message (SCM_RIGHTS), `{"action":"detach_disk",
//! "slot":N}` and `{"action":"disks"}`; their replies add `"disks":[{"slot":N,
//! "serial":S|null,"read_only":B}]`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::api_conn::Client;
use crate::api_socket::ApiSocket;
use crate::builder::{self, BuildError, HostEvents};
use crate::config::VmConfig;
use crate::devices::bus::lock;
use crate::devices::virtio::block::{DiskSlot, FileBackend};
use crate::devices::virtio::mem::{MemControl, MemStatus};
use crate::vstate::exit_stats::ExitStats;
use crate::vstate::snapshot::{self, Snapshot, SnapshotError, SnapshotFiles};
use crate::vstate::vcpu::{self, ExitReason, ExitSink, VcpuControl, VcpuError, VcpuRunner, Vcpus};

/// Errors that end the VMM (as opposed to the guest).
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("Failed to build the VM")]
    Build(#[from] BuildError),
    #[error("Failed to start vCPUs")]
    Vcpu(#[from] VcpuError),
    #[error("Event loop failure")]
    Epoll(#[source] std::io::Error),
    #[error("Failed to create the API socket {0}")]
    Api(PathBuf, #[source] std::io::Error),
    #[error("Failed to take over the inherited API socket (descriptor {0})")]
    ApiFd(RawFd, #[source] std::io::Error),
    #[error("Failed to install the seccomp filter")]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("Failed to jail the VMM (set jail = \"off\" to run without)")]
    Jail(#[from] crate::jail::JailError),
    #[error("Failed to prepare for snapshots")]
    Snapshot(#[from] SnapshotError),
}

/// The VM's lifecycle state as the API reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    NotConfigured,
    Configured,
    Running,
    Paused,
}

/// One API request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, tag = "action", rename_all = "snake_case")]
pub enum ApiRequest {
    Configure {
        config: Box<VmConfig>,
    },
    Boot,
    Pause,
    Resume,
    Shutdown,
    State,
    Stats,
    Snapshot,
    /// Where the virtio-mem device stands.
    Memory,
    /// Asks the guest to plug (or unplug) virtio-mem memory until this much is plugged.
    ResizeMemory {
        requested_mib: u64,
    },
    /// What each disk slot holds.
    Disks,
    /// Puts the disk whose descriptor came with the request in an empty slot.
    AttachDisk {
        slot: u8,
        serial: String,
        #[serde(default)]
        read_only: bool,
    },
    /// Empties a slot: its disk is closed at once; the guest's requests fail after.
    DetachDisk {
        slot: u8,
    },
}

/// One API response.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ApiResponse {
    pub ok: bool,
    pub state: VmState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks: Option<Vec<SlotReport>>,
}

/// A disk slot as the API reports it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SlotReport {
    pub slot: u8,
    /// The serial of the disk in it, or `None` when it is empty.
    pub serial: Option<String>,
    pub read_only: bool,
}

/// The virtio-mem device as the API reports it, in MiB.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemoryReport {
    /// The region the guest can plug memory into (`hotplug_mib`).
    pub region_mib: u64,
    /// What the guest was asked to plug.
    pub requested_mib: u64,
    /// What it has plugged.
    pub plugged_mib: u64,
}

impl From<MemStatus> for MemoryReport {
    fn from(s: MemStatus) -> Self {
        Self {
            region_mib: s.region_bytes >> 20,
            requested_mib: s.requested_bytes >> 20,
            plugged_mib: s.plugged_bytes >> 20,
        }
    }
}

/// How the VMM starts.
#[derive(Default)]
pub struct VmmOptions {
    pub config: Option<VmConfig>,
    pub api_sock: Option<PathBuf>,
    /// An inherited Unix socket, already bound and listening, to serve the API on instead
    /// of binding `api_sock` (a jailed VMM may not bind where its parent wants the
    /// socket). Not removed at exit: its maker owns the path.
    pub api_sock_fd: Option<RawFd>,
    /// Boot as soon as configured (the one-shot form); otherwise wait for `boot`.
    pub boot_now: bool,
    /// Print the wall-clock time of the guest's first exit to stderr (for benchmarks).
    pub print_first_exit: bool,
    /// Print the VM exits by kind to stderr when the VM ends.
    pub print_stats: bool,
    /// Where the `snapshot` request writes (a directory, its files made at start).
    pub snapshot_to: Option<PathBuf>,
    /// Boot by restoring this snapshot (loaded by [`snapshot::load`]) instead of
    /// loading a kernel; `config` is then the template's with this VM's own paths.
    pub restore: Option<(Snapshot, std::fs::File)>,
}

const TOKEN_EXIT: u64 = 0;
const TOKEN_API: u64 = 1;
const TOKEN_SIGNAL: u64 = 2;
const TOKEN_DEVICE_BASE: u64 = 1 << 32;
const TOKEN_CLIENT_BASE: u64 = 2 << 32;

struct Running {
    vcpus: Vcpus,
    host_devices: Vec<Arc<Mutex<dyn HostEvents>>>,
    /// The VM and its memory, alive while vCPUs run.
    vm: crate::vstate::vm::Vm,
    mem: crate::vstate::memory::GuestMemory,
    serial: Arc<Mutex<crate::devices::legacy::serial::SerialDevice>>,
    memory: Option<Arc<Mutex<dyn MemControl>>>,
    disk_slots: Vec<Arc<Mutex<dyn DiskSlot>>>,
}

pub struct Vmm {
    opts: VmmOptions,
    config: Option<VmConfig>,
    running: Option<Running>,
    paused: bool,
    exit: Arc<ExitSink>,
    epoll: Epoll,
    api: Option<ApiSocket>,
    clients: HashMap<RawFd, Client>,
    signals: SignalFd,
    stats: Arc<ExitStats>,
    snapshot_files: Option<SnapshotFiles>,
}

/// SIGTERM and SIGINT end the VM like a `shutdown` request, so sockets get cleaned up.
/// They are blocked before any thread starts (threads inherit the mask) and read from
/// a signalfd in the event loop.
fn shutdown_signals() -> Result<SignalFd, VmmError> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGTERM);
    mask.add(Signal::SIGINT);
    mask.thread_block()
        .map_err(|e| VmmError::Epoll(std::io::Error::from(e)))?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|e| VmmError::Epoll(std::io::Error::from(e)))
}

impl Vmm {
    pub fn new(mut opts: VmmOptions) -> Result<Self, VmmError> {
        let epoll = Epoll::new().map_err(VmmError::Epoll)?;
        let exit = ExitSink::new(EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::Epoll)?);
        epoll
            .ctl(
                ControlOperation::Add,
                exit.event().as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_EXIT),
            )
            .map_err(VmmError::Epoll)?;
        let signals = shutdown_signals()?;
        epoll
            .ctl(
                ControlOperation::Add,
                signals.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_SIGNAL),
            )
            .map_err(VmmError::Epoll)?;
        let api = match (opts.api_sock.take(), opts.api_sock_fd) {
            (Some(path), Some(fd)) => {
                return Err(VmmError::ApiFd(
                    fd,
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("an API socket path ({}) is given too", path.display()),
                    ),
                ))
            }
            (Some(path), None) => {
                Some(ApiSocket::bind(&path).map_err(|e| VmmError::Api(path.clone(), e))?)
            }
            (None, Some(fd)) => Some(ApiSocket::inherited(fd).map_err(|e| VmmError::ApiFd(fd, e))?),
            (None, None) => None,
        };
        if let Some(api) = &api {
            epoll
                .ctl(
                    ControlOperation::Add,
                    api.listener.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, TOKEN_API),
                )
                .map_err(VmmError::Epoll)?;
        }
        if let Some(c) = &opts.config {
            c.validate().map_err(|e| VmmError::Build(e.into()))?;
        }
        // Made now, while this process may still create files (no jail, no filter).
        let snapshot_files = match &opts.snapshot_to {
            Some(dir) => Some(SnapshotFiles::create(dir)?),
            None => None,
        };
        Ok(Self {
            config: opts.config.take(),
            opts,
            running: None,
            paused: false,
            exit,
            epoll,
            api,
            clients: HashMap::new(),
            signals,
            stats: Arc::default(),
            snapshot_files,
        })
    }

    pub fn state(&self) -> VmState {
        match (&self.config, &self.running, self.paused) {
            (None, _, _) => VmState::NotConfigured,
            (Some(_), None, _) => VmState::Configured,
            (_, Some(_), false) => VmState::Running,
            (_, Some(_), true) => VmState::Paused,
        }
    }

    /// Builds the VM and starts its vCPUs.
    fn boot(&mut self) -> Result<(), VmmError> {
        let mut config = self
            .config
            .clone()
            .ok_or(VmmError::Build(BuildError::Config(
                crate::config::ConfigError::Invalid {
                    key: "config".into(),
                    reason: "no configuration given".into(),
                },
            )))?;
        // The jail keeps the vsock socket's directory (guest connections dial
        // `<uds>_<port>` there), checked and opened now.
        let mut sockets: Vec<&mut std::path::PathBuf> =
            config.vsock.iter_mut().map(|v| &mut v.uds_path).collect();
        let keep = crate::jail::prepare(config.jail, &mut sockets)?;
        let built = match self.opts.restore.take() {
            Some((snap, memory)) => builder::restore(&config, &self.exit, &snap, memory)?,
            None => builder::build(&config, &self.exit)?,
        };
        // The MSRs a snapshot saves, listed now: later the filter allows only getters.
        let msrs = match (&self.snapshot_files, built.vcpus.first()) {
            (Some(_), Some(fd)) => Arc::new(snapshot::readable_msrs(&built.vm.kvm, fd)?),
            _ => Arc::new(Vec::new()),
        };
        for fd in &built.vcpus {
            // Opened before the jail and seccomp, which may refuse new descriptors.
            if let Some(s) = crate::vstate::kvm_stats::KvmStatsFd::open(fd) {
                self.stats.add_kvm_stats(s);
            }
        }
        for (i, d) in built.host_devices.iter().enumerate() {
            if let Some(fd) = lock(d).host_fd() {
                self.epoll
                    .ctl(
                        ControlOperation::Add,
                        fd,
                        EpollEvent::new(EventSet::IN, TOKEN_DEVICE_BASE + i as u64),
                    )
                    .map_err(VmmError::Epoll)?;
            }
        }
        vcpu::install_kick_handler()?;
        if let Some(keep) = &keep {
            // Everything is open; before any other thread exists (namespaces are per
            // thread) and before the guest runs.
            if let Err(e) = crate::jail::enter_as(config.jail, keep) {
                if !e.nothing_changed() {
                    // Half-jailed: this process cannot run a VM any more; end it.
                    let why = format!("jail setup failed halfway: {e}: {}", error_chain(&e));
                    log::error!("{why}");
                    self.exit.report(ExitReason::Crash(why));
                }
                return Err(e.into());
            }
        }
        if config.seccomp {
            // Everything the VM needs is open; from here on only the allowlist.
            crate::seccomp::apply()?;
            log::info!("seccomp filter and no_new_privs in place");
        }
        let control = VcpuControl::new();
        let mut handles = Vec::new();
        for (i, fd) in built.vcpus.into_iter().enumerate() {
            let on_first_exit: Option<Box<dyn FnOnce() + Send>> =
                (i == 0 && self.opts.print_first_exit).then(|| {
                    Box::new(|| {
                        let t = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap_or_default();
                        eprintln!("cocoon-vmm: first-exit-unix-ns={}", t.as_nanos());
                    }) as Box<dyn FnOnce() + Send>
                });
            let runner = VcpuRunner {
                fd,
                index: i as u8,
                pio: built.pio.clone(),
                mmio: built.mmio.clone(),
                control: control.clone(),
                exit: self.exit.clone(),
                on_first_exit,
                stats: self.stats.clone(),
                seccomp: config.seccomp,
                msrs: msrs.clone(),
            };
            handles.push(runner.spawn()?);
        }
        if config.seccomp {
            // This thread goes on as the event loop: it never runs a vCPU.
            crate::seccomp::apply_event_loop()?;
        }
        self.running = Some(Running {
            vcpus: Vcpus { handles, control },
            host_devices: built.host_devices,
            vm: built.vm,
            mem: built.mem,
            serial: built.serial,
            memory: built.memory,
            disk_slots: built.disk_slots,
        });
        Ok(())
    }

    /// Runs until the VM ends; returns why.
    pub fn run(mut self) -> Result<ExitReason, VmmError> {
        if self.opts.boot_now {
            self.boot()?;
        }
        let mut events = vec![EpollEvent::default(); 32];
        let reason = loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(VmmError::Epoll(e)),
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_EXIT => {}
                    TOKEN_SIGNAL => {
                        if let Ok(Some(info)) = self.signals.read_signal() {
                            log::info!("signal {} received: shutting down", info.ssi_signo);
                            self.exit.report(ExitReason::Shutdown);
                        }
                    }
                    TOKEN_API => self.accept_client(),
                    t if t >= TOKEN_CLIENT_BASE => {
                        self.serve_client((t - TOKEN_CLIENT_BASE) as RawFd)
                    }
                    t => {
                        let i = (t - TOKEN_DEVICE_BASE) as usize;
                        if let Some(d) = self.running.as_ref().and_then(|r| r.host_devices.get(i)) {
                            lock(d).process_host();
                        }
                    }
                }
            }
            if let Some(r) = self.exit.reason() {
                break r;
            }
        };
        log::info!("VM ended: {reason:?}");
        if let Some(r) = self.running.take() {
            r.vcpus.stop();
        }
        if self.opts.print_stats {
            let report = self.stats.report();
            eprint!("{}", report.table());
            eprintln!(
                "cocoon-vmm: exit-stats {}",
                serde_json::to_string(&report).unwrap_or_default()
            );
        }
        if let Some(api) = &self.api {
            api.remove();
        }
        Ok(reason)
    }

    fn accept_client(&mut self) {
        let Some(ApiSocket { listener: l, .. }) = &self.api else {
            return;
        };
        if let Ok((s, _)) = l.accept() {
            let fd = s.as_raw_fd();
            if self
                .epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, TOKEN_CLIENT_BASE + fd as u64),
                )
                .is_ok()
            {
                self.clients.insert(fd, Client::new(s));
            }
        }
    }

    fn serve_client(&mut self, fd: RawFd) {
        let Some(mut client) = self.clients.remove(&fd) else {
            return;
        };
        if !client.fill() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            return;
        }
        while let Some((line, fds)) = client.next_line() {
            let resp = match serde_json::from_slice::<ApiRequest>(&line) {
                Ok(req) => self.handle_with(req, fds),
                Err(e) => self.respond(Err(format!("invalid request: {e}"))),
            };
            let mut text = serde_json::to_string(&resp).unwrap_or_default();
            text.push('\n');
            let _ = client.stream.write_all(text.as_bytes());
        }
        self.clients.insert(fd, client);
    }

    fn respond(&self, r: Result<(), String>) -> ApiResponse {
        ApiResponse {
            ok: r.is_ok(),
            state: self.state(),
            error: r.err(),
            stats: None,
            memory: None,
            disks: None,
        }
    }

    /// Applies one API request that came without descriptors.
    pub fn handle(&mut self, req: ApiRequest) -> ApiResponse {
        self.handle_with(req, Vec::new())
    }

    /// Applies one API request with the descriptors that came with it (`attach_disk`
    /// takes one; the others are closed).
    pub fn handle_with(&mut self, req: ApiRequest, mut fds: Vec<OwnedFd>) -> ApiResponse {
        let r = match (req, self.state()) {
            (ApiRequest::State, _) => Ok(()),
            (ApiRequest::Stats, _) => {
                let mut resp = self.respond(Ok(()));
                resp.stats = serde_json::to_value(self.stats.report()).ok();
                return resp;
            }
            (ApiRequest::Configure { config }, VmState::NotConfigured | VmState::Configured) => {
                match config.validate() {
                    Ok(()) => {
                        self.config = Some(*config);
                        Ok(())
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
            (ApiRequest::Boot, VmState::Configured) => {
                self.boot().map_err(|e| format!("{e}: {}", error_chain(&e)))
            }
            (ApiRequest::Pause, VmState::Running) => {
                let ok = self.running.as_ref().is_some_and(|r| r.vcpus.pause());
                self.paused = true;
                if ok {
                    Ok(())
                } else {
                    Err("vCPUs did not stop in time".into())
                }
            }
            (ApiRequest::Resume, VmState::Paused) => {
                if let Some(r) = &self.running {
                    r.vcpus.resume();
                }
                self.paused = false;
                Ok(())
            }
            (ApiRequest::Snapshot, VmState::Paused) => self.snapshot(),
            (ApiRequest::Memory, VmState::Running | VmState::Paused) => {
                return self.memory(|m| Ok(m.status()));
            }
            (ApiRequest::ResizeMemory { requested_mib }, VmState::Running | VmState::Paused) => {
                return self.memory(|m| {
                    let bytes = requested_mib
                        .checked_mul(1 << 20)
                        .ok_or_else(|| format!("{requested_mib} MiB is too large"))?;
                    m.request(bytes).map_err(|e| e.to_string())
                });
            }
            (ApiRequest::Disks, VmState::Running | VmState::Paused) => {
                return self.disks(None, |_| Ok(()));
            }
            (
                ApiRequest::AttachDisk {
                    slot,
                    serial,
                    read_only,
                },
                VmState::Running | VmState::Paused,
            ) => {
                if fds.len() != 1 {
                    let e = format!(
                        "attach_disk takes exactly one descriptor with the request, got {}",
                        fds.len()
                    );
                    return self.respond(Err(e));
                }
                let disk = std::fs::File::from(fds.remove(0));
                return self.disks(Some(slot), move |s| {
                    let backend = FileBackend::device(disk)
                        .map_err(|e| format!("cannot size the disk: {e}"))?;
                    let size = s
                        .insert(backend, read_only, &serial)
                        .map_err(|e| e.to_string())?;
                    log::info!(
                        "disk {serial} ({size} bytes, read_only={read_only}) in slot {slot}"
                    );
                    Ok(())
                });
            }
            (ApiRequest::DetachDisk { slot }, VmState::Running | VmState::Paused) => {
                return self.disks(Some(slot), move |s| {
                    if s.eject() {
                        log::info!("slot {slot} emptied");
                    }
                    Ok(())
                });
            }
            (ApiRequest::Shutdown, _) => {
                self.exit.report(ExitReason::Shutdown);
                Ok(())
            }
            (req, state) => Err(format!("{req:?} is not allowed in state {state:?}")),
        };
        self.respond(r)
    }
}

impl Vmm {
    /// Answers with the virtio-mem device's status after `f`, or why there is none.
    fn memory(
        &mut self,
        f: impl FnOnce(&mut dyn MemControl) -> Result<MemStatus, String>,
    ) -> ApiResponse {
        let device = self.running.as_ref().and_then(|r| r.memory.clone());
        let r = match &device {
            Some(d) => f(&mut *lock(d)),
            None => Err("this VM has no virtio-mem device (it was started without \
                 hotplug_mib / --hotplug-mib)"
                .into()),
        };
        match r {
            Ok(status) => ApiResponse {
                memory: Some(status.into()),
                ..self.respond(Ok(()))
            },
            Err(e) => self.respond(Err(e)),
        }
    }

    /// Applies `f` to slot `slot` (none: only reports), then answers with every slot.
    fn disks(
        &mut self,
        slot: Option<u8>,
        f: impl FnOnce(&mut dyn DiskSlot) -> Result<(), String>,
    ) -> ApiResponse {
        let slots = self
            .running
            .as_ref()
            .map(|r| r.disk_slots.clone())
            .unwrap_or_default();
        if slots.is_empty() {
            return self.respond(Err("this VM has no disk slots (it was started without \
                 block_slots / --block-slots)"
                .into()));
        }
        if let Some(i) = slot {
            let r = match slots.get(usize::from(i)) {
                Some(s) => f(&mut *lock(s)),
                None => Err(format!("no slot {i}: this VM has {}", slots.len())),
            };
            if let Err(e) = r {
                return self.respond(Err(format!("slot {i}: {e}")));
            }
        }
        let report = slots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let s = lock(s);
                SlotReport {
                    slot: i as u8,
                    serial: s.serial(),
                    read_only: s.read_only(),
                }
            })
            .collect();
        ApiResponse {
            disks: Some(report),
            ..self.respond(Ok(()))
        }
    }

    /// Saves the paused VM to the files made at start. The VM stays paused and can go
    /// on (`resume`) or end.
    fn snapshot(&mut self) -> Result<(), String> {
        let chain = |e: SnapshotError| format!("{e}: {}", error_chain(&e));
        let files = self
            .snapshot_files
            .as_ref()
            .ok_or("this VMM was not started with a snapshot directory (--snapshot-to)")?;
        let (Some(r), Some(config)) = (&self.running, &self.config) else {
            return Err("no VM is running".into());
        };
        // A template is taken before anything is plugged: a clone's device then starts
        // as the template's did. Plugged blocks and a requested size are not saved, and
        // a clone would come up with them unplugged under a guest that uses them.
        if let Some(m) = &r.memory {
            let s = lock(m).status();
            if s.plugged_bytes > 0 || s.requested_bytes > 0 {
                return Err(format!(
                    "a VM whose virtio-mem device has memory plugged or asked for ({} MiB \
                     plugged, {} MiB requested) cannot be snapshotted yet",
                    s.plugged_bytes >> 20,
                    s.requested_bytes >> 20
                ));
            }
        }
        // A slot's disk is the host's, opened for this VM: not something a clone has.
        if let Some(i) = r.disk_slots.iter().position(|s| lock(s).serial().is_some()) {
            return Err(format!(
                "a VM with a disk in a slot (slot {i}) cannot be snapshotted"
            ));
        }
        let started = std::time::Instant::now();
        let vcpus = r.vcpus.save_states().map_err(chain)?;
        let vm = snapshot::save_vm(&r.vm.fd).map_err(chain)?;
        let serial = lock(&r.serial).save();
        let virtio = r
            .host_devices
            .iter()
            .enumerate()
            .map(|(i, d)| {
                lock(d)
                    .save()
                    .map_err(|e| format!("virtio device {i}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let snap = Snapshot {
            version: snapshot::FORMAT_VERSION,
            config: config.clone(),
            vcpus,
            vm,
            serial,
            virtio,
        };
        let bytes = files.write(&snap, &r.mem.mem).map_err(chain)?;
        log::info!(
            "snapshot taken in {} ms: {} MiB of guest RAM written",
            started.elapsed().as_millis(),
            bytes >> 20
        );
        Ok(())
    }
}

/// The causes of an error, joined, for API responses and the CLI.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push(c.to_string());
        cur = c.source();
    }
    out.join(": ")
}

/// Sends one API request to a VMM and reads the response (a small client for tests and
/// the shim).
pub fn api_call(sock: &Path, request: &str) -> std::io::Result<ApiResponse> {
    let mut s = UnixStream::connect(sock)?;
    s.write_all(request.trim_end().as_bytes())?;
    s.write_all(b"\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(std::io::Error::other)
}

#[cfg(test)]
#[path = "vmm_tests.rs"]
mod tests;
