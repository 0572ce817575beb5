//! vCPUs: creating and configuring them (CPUID template, MSRs, FPU, LAPIC, boot
//! registers) and the per-vCPU thread that runs KVM_RUN and dispatches exits to the
//! buses. A guest can make any exit happen: unknown ones are logged (rate-limited) and
//! never end the VMM; the ones that end the VM are reported as an [`ExitReason`].

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::exit_stats::{ExitKind, ExitStats};
use super::snapshot::{self, SnapshotError, VcpuState};
use crate::arch::{cpuid, regs};
use crate::devices::bus::Bus;
use crate::logging::LogLimiter;

/// Errors while creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("Failed to {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("Failed to set up vCPU registers")]
    Regs(#[source] regs::RegsError),
    #[error("Failed to install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    #[error("Failed to start the vCPU thread")]
    Spawn(#[source] std::io::Error),
    #[error("Failed to restore vCPU {0}")]
    Restore(u8, #[source] SnapshotError),
}

/// Why the VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset (i8042 0xfe or a KVM reset event): a clean end for a microVM.
    Reset,
    /// The guest or the API asked to power off.
    Shutdown,
    /// KVM_EXIT_SHUTDOWN: the guest triple-faulted.
    TripleFault,
    /// KVM could not go on (entry failure, internal error).
    Crash(String),
}

impl ExitReason {
    /// The process exit status for this reason.
    pub fn exit_code(&self) -> u8 {
        match self {
            ExitReason::Reset | ExitReason::Shutdown => 0,
            ExitReason::TripleFault => 3,
            ExitReason::Crash(_) => 4,
        }
    }
}

/// What the VMM wants the vCPUs to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    Stopping,
}

/// Shared between the VMM and its vCPU threads.
pub struct VcpuControl {
    state: Mutex<ControlState>,
    cv: Condvar,
}

struct ControlState {
    run: RunState,
    /// vCPUs parked in `park`.
    parked: usize,
    /// Bumped to ask each parked vCPU for its state once ([`Vcpus::save_states`]).
    save_round: u64,
    saved: Vec<(u8, Result<VcpuState, String>)>,
}

impl VcpuControl {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(ControlState {
                run: RunState::Running,
                parked: 0,
                save_round: 0,
                saved: Vec::new(),
            }),
            cv: Condvar::new(),
        })
    }

    pub fn state(&self) -> RunState {
        crate::devices::bus::lock(&self.state).run
    }

    pub fn set(&self, s: RunState) {
        crate::devices::bus::lock(&self.state).run = s;
        self.cv.notify_all();
    }

    /// Parks the calling vCPU while paused, answering each save round with `save`;
    /// returns false when it must stop.
    fn park(&self, index: u8, save: &mut dyn FnMut() -> Result<VcpuState, String>) -> bool {
        let mut g = crate::devices::bus::lock(&self.state);
        if g.run == RunState::Paused {
            g.parked += 1;
            let mut answered = g.save_round;
            self.cv.notify_all();
            while g.run == RunState::Paused {
                if g.save_round != answered {
                    answered = g.save_round;
                    drop(g);
                    let r = save();
                    g = crate::devices::bus::lock(&self.state);
                    if g.save_round == answered {
                        g.saved.push((index, r));
                        self.cv.notify_all();
                    }
                    continue;
                }
                g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
            }
            g.parked -= 1;
        }
        g.run != RunState::Stopping
    }

    /// Waits until `n` vCPUs are parked (or the timeout passes).
    fn wait_parked(&self, n: usize, timeout: Duration) -> bool {
        let g = crate::devices::bus::lock(&self.state);
        let (g, _) = self
            .cv
            .wait_timeout_while(g, timeout, |g| g.parked < n && g.run == RunState::Paused)
            .unwrap_or_else(|p| p.into_inner());
        g.parked >= n
    }

    /// Asks every parked vCPU for its state and waits for `n` answers.
    fn save_round(&self, n: usize, timeout: Duration) -> Vec<(u8, Result<VcpuState, String>)> {
        let mut g = crate::devices::bus::lock(&self.state);
        g.saved.clear();
        g.save_round += 1;
        self.cv.notify_all();
        let (mut g, _) = self
            .cv
            .wait_timeout_while(g, timeout, |g| {
                g.saved.len() < n && g.run == RunState::Paused
            })
            .unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut g.saved)
    }
}

/// Where vCPU threads report the end of the VM: the first reason wins.
pub struct ExitSink {
    reason: Mutex<Option<ExitReason>>,
    evt: vmm_sys_util::eventfd::EventFd,
}

impl ExitSink {
    pub fn new(evt: vmm_sys_util::eventfd::EventFd) -> Arc<Self> {
        Arc::new(Self {
            reason: Mutex::new(None),
            evt,
        })
    }

    pub fn report(&self, r: ExitReason) {
        let mut g = crate::devices::bus::lock(&self.reason);
        if g.is_none() {
            *g = Some(r);
        }
        let _ = self.evt.write(1);
    }

    pub fn reason(&self) -> Option<ExitReason> {
        crate::devices::bus::lock(&self.reason).clone()
    }

    pub fn event(&self) -> &vmm_sys_util::eventfd::EventFd {
        &self.evt
    }
}

/// Creates and configures vCPU `index` of `count`.
pub fn create(
    kvm: &Kvm,
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    index: u8,
    count: u8,
    entry: regs::BootEntry,
    boot_info: u64,
) -> Result<VcpuFd, VcpuError> {
    let fd = with_cpuid(kvm, vm, index, count)?;
    regs::setup_msrs(&fd).map_err(VcpuError::Regs)?;
    regs::setup_fpu(&fd).map_err(VcpuError::Regs)?;
    regs::setup_lapic(&fd).map_err(VcpuError::Regs)?;
    // Only the boot vCPU starts at the entry point; the others wait in the
    // wait-for-SIPI state the in-kernel LAPIC gives them until the guest wakes them.
    if index == 0 {
        regs::setup_sregs(&fd, mem, entry).map_err(VcpuError::Regs)?;
        regs::setup_regs(&fd, entry, boot_info).map_err(VcpuError::Regs)?;
    }
    Ok(fd)
}

/// vCPU `index` of `count` with Cocoon's CPUID and nothing else set.
fn with_cpuid(kvm: &Kvm, vm: &VmFd, index: u8, count: u8) -> Result<VcpuFd, VcpuError> {
    let fd = vm
        .create_vcpu(u64::from(index))
        .map_err(|e| VcpuError::Kvm("create a vCPU", e))?;
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| VcpuError::Kvm("get the supported CPUID", e))?;
    cpuid::filter(&mut cpuid, index, count);
    fd.set_cpuid2(&cpuid)
        .map_err(|e| VcpuError::Kvm("set CPUID", e))?;
    Ok(fd)
}

/// Creates vCPU `index` of `count` as [`create`] does, then loads its saved state in
/// place of a boot state. The CPUID is this host's, filtered the same way: a snapshot
/// restores only on a host like the one that took it.
pub fn create_restored(
    kvm: &Kvm,
    vm: &VmFd,
    index: u8,
    count: u8,
    state: &VcpuState,
) -> Result<VcpuFd, VcpuError> {
    let fd = with_cpuid(kvm, vm, index, count)?;
    snapshot::restore_vcpu(&fd, state).map_err(|e| VcpuError::Restore(index, e))?;
    Ok(fd)
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that interrupts KVM_RUN.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

/// Installs the no-op handler for the kick signal, so it interrupts KVM_RUN with EINTR
/// instead of killing the process.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), kick_handler).map_err(VcpuError::Signal)
}

/// A running vCPU thread.
pub struct VcpuHandle {
    thread: JoinHandle<()>,
}

impl VcpuHandle {
    fn kick(&self) {
        let _ = self.thread.kill(kick_signal());
    }

    pub fn join(self) {
        let _ = self.thread.join();
    }
}

/// Starts vCPU threads and pauses, resumes or stops them together.
pub struct Vcpus {
    pub handles: Vec<VcpuHandle>,
    pub control: Arc<VcpuControl>,
}

impl Vcpus {
    /// Asks every vCPU to pause and waits until they have left KVM_RUN.
    pub fn pause(&self) -> bool {
        self.control.set(RunState::Paused);
        for _ in 0..1000 {
            self.handles.iter().for_each(VcpuHandle::kick);
            if self
                .control
                .wait_parked(self.handles.len(), Duration::from_millis(2))
            {
                return true;
            }
        }
        false
    }

    pub fn resume(&self) {
        self.control.set(RunState::Running);
    }

    /// Each vCPU's state, read by its own thread; the vCPUs must be paused.
    pub fn save_states(&self) -> Result<Vec<VcpuState>, SnapshotError> {
        let n = self.handles.len();
        if self.control.state() != RunState::Paused
            || !self.control.wait_parked(n, Duration::from_millis(0))
        {
            return Err(SnapshotError::Mismatch("the vCPUs are not paused".into()));
        }
        let mut answers = self.control.save_round(n, Duration::from_secs(10));
        answers.sort_by_key(|(i, _)| *i);
        if answers.len() != n {
            return Err(SnapshotError::Vcpu(
                answers.len() as u8,
                "no answer within 10 s".into(),
            ));
        }
        answers
            .into_iter()
            .map(|(i, r)| r.map_err(|e| SnapshotError::Vcpu(i, e)))
            .collect()
    }

    /// Stops and joins every vCPU thread.
    pub fn stop(self) {
        self.control.set(RunState::Stopping);
        for h in &self.handles {
            h.kick();
        }
        // A vCPU may have been between its state check and KVM_RUN when kicked.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while self.handles.iter().any(|h| !h.thread.is_finished())
            && std::time::Instant::now() < deadline
        {
            self.handles.iter().for_each(VcpuHandle::kick);
            std::thread::sleep(Duration::from_millis(1));
        }
        for h in self.handles {
            if h.thread.is_finished() {
                h.join();
            }
        }
    }
}

/// Everything a vCPU thread needs.
pub struct VcpuRunner {
    pub fd: VcpuFd,
    pub index: u8,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub control: Arc<VcpuControl>,
    pub exit: Arc<ExitSink>,
    /// Called once, on the first exit of vCPU 0: the guest has run.
    pub on_first_exit: Option<Box<dyn FnOnce() + Send>>,
    /// Shared by all vCPUs of the VM.
    pub stats: Arc<ExitStats>,
    /// Stack the vCPU threads' own seccomp filter (`seccomp::apply_vcpu`) before the
    /// first KVM_RUN (on top of the process's, which must already be in place).
    pub seccomp: bool,
    /// The MSRs a snapshot saves (`snapshot::readable_msrs`); empty where the VM is
    /// never snapshotted, and then a save round is refused.
    pub msrs: Arc<Vec<u32>>,
}

/// Records one exit's handling time when dropped.
struct Tally<'a> {
    stats: &'a ExitStats,
    kind: ExitKind,
    since: Instant,
}

impl Drop for Tally<'_> {
    fn drop(&mut self) {
        self.stats.record(self.kind, self.since.elapsed());
    }
}

impl VcpuRunner {
    pub fn spawn(self) -> Result<VcpuHandle, VcpuError> {
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{}", self.index))
            .spawn(move || self.run())
            .map_err(VcpuError::Spawn)?;
        Ok(VcpuHandle { thread })
    }

    fn run(mut self) {
        let mut log = LogLimiter::new("vcpu");
        if self.seccomp {
            if let Err(e) = crate::seccomp::apply_vcpu() {
                let why = format!("vcpu{}: cannot install its seccomp filter: {e}", self.index);
                log::error!("{why}");
                self.exit.report(ExitReason::Crash(why));
                return;
            }
        }
        // Stop as soon as the VM has ended (e.g. this vCPU just wrote the i8042 reset),
        // without waiting for a kick.
        while self
            .control
            .park(self.index, &mut || save_own(&mut self.fd, &self.msrs))
            && self.exit.reason().is_none()
        {
            let entered = Instant::now();
            let exit = self.fd.run();
            let returned = Instant::now();
            self.stats.add_run_time(returned - entered);
            if let Some(f) = self.on_first_exit.take() {
                f();
            }
            let kind = match &exit {
                Ok(VcpuExit::IoIn(port, _)) => ExitKind::IoIn(*port),
                Ok(VcpuExit::IoOut(port, _)) => ExitKind::IoOut(*port),
                Ok(VcpuExit::MmioRead(addr, _)) => ExitKind::MmioRead(*addr),
                Ok(VcpuExit::MmioWrite(addr, _)) => ExitKind::MmioWrite(*addr),
                Ok(VcpuExit::Hlt) => ExitKind::Hlt,
                Ok(VcpuExit::Shutdown) => ExitKind::Shutdown,
                Ok(VcpuExit::SystemEvent(..)) => ExitKind::SystemEvent,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    ExitKind::Interrupted
                }
                _ => ExitKind::Other,
            };
            // Recorded when this iteration ends, however it ends (`continue` or `return`).
            let _tally = Tally {
                stats: &self.stats,
                kind,
                since: returned,
            };
            match exit {
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !self.pio.read(u64::from(port), data) {
                        data.fill(0xff);
                        if log.allow() {
                            log::warn!("vcpu{}: read of unknown port {port:#x}", self.index);
                        }
                    }
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    if !self.pio.write(u64::from(port), data) && log.allow() {
                        log::warn!("vcpu{}: write to unknown port {port:#x}", self.index);
                    }
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !self.mmio.read(addr, data) {
                        data.fill(0xff);
                        if log.allow() {
                            log::warn!("vcpu{}: read of unknown MMIO {addr:#x}", self.index);
                        }
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if !self.mmio.write(addr, data) && log.allow() {
                        log::warn!("vcpu{}: write to unknown MMIO {addr:#x}", self.index);
                    }
                }
                Ok(VcpuExit::Hlt) => {
                    // With the in-kernel irqchip KVM keeps a halted vCPU asleep inside
                    // KVM_RUN and never returns this exit (a guest halting for good just
                    // sleeps: Linux powers off through ACPI S5, see `arch::acpi`). Other
                    // setups may return it; end the VM rather than spin.
                    log::info!("vcpu{}: halted with interrupts disabled", self.index);
                    self.exit.report(ExitReason::Shutdown);
                    return;
                }
                Ok(VcpuExit::Shutdown) => {
                    log::error!(
                        "vcpu{}: triple fault (KVM_EXIT_SHUTDOWN); {}",
                        self.index,
                        cpu_state(&self.fd)
                    );
                    self.exit.report(ExitReason::TripleFault);
                    return;
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    let r = match kind {
                        KVM_SYSTEM_EVENT_RESET => ExitReason::Reset,
                        KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::Shutdown,
                        k => ExitReason::Crash(format!("system event {k}")),
                    };
                    log::info!("vcpu{}: system event {r:?}", self.index);
                    self.exit.report(r);
                    return;
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    let why = format!("entry failed: reason {reason:#x} on cpu {cpu}");
                    log::error!("vcpu{}: {why}", self.index);
                    self.exit.report(ExitReason::Crash(why));
                    return;
                }
                Ok(VcpuExit::InternalError) => {
                    log::error!("vcpu{}: KVM internal error", self.index);
                    self.exit
                        .report(ExitReason::Crash("KVM internal error".into()));
                    return;
                }
                Ok(other) => {
                    if log.allow() {
                        log::warn!("vcpu{}: unhandled exit {other:?}", self.index);
                    }
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(e) => {
                    log::error!("vcpu{}: KVM_RUN failed: {e}", self.index);
                    self.exit.report(ExitReason::Crash(format!("KVM_RUN: {e}")));
                    return;
                }
            }
        }
    }
}

/// A parked vCPU's answer to a save round.
fn save_own(fd: &mut VcpuFd, msrs: &[u32]) -> Result<VcpuState, String> {
    if msrs.is_empty() {
        return Err("this VMM was not started for snapshots".into());
    }
    snapshot::save_vcpu(fd, msrs).map_err(|e| {
        let cause = std::error::Error::source(&e)
            .map(|c| format!(": {c}"))
            .unwrap_or_default();
        format!("{e}{cause}")
    })
}

/// Where a vCPU stood, for the log line of a VM that ended badly: the instruction
/// pointer, stack, control registers and descriptor tables say whether the guest was
/// still in early boot, in its own kernel, or lost (a zero IDT, a wild RIP).
fn cpu_state(fd: &VcpuFd) -> String {
    let regs = match fd.get_regs() {
        Ok(r) => format!(
            "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x}",
            r.rip, r.rsp, r.rflags, r.rax
        ),
        Err(e) => format!("registers unreadable: {e}"),
    };
    let sregs = match fd.get_sregs() {
        Ok(s) => format!(
            "cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x} idt={:#x}+{:#x} gdt={:#x}+{:#x}",
            s.cr0,
            s.cr2,
            s.cr3,
            s.cr4,
            s.efer,
            s.cs.selector,
            s.idt.base,
            s.idt.limit,
            s.gdt.base,
            s.gdt.limit
        ),
        Err(e) => format!("system registers unreadable: {e}"),
    };
    format!("{regs} {sregs}")
}
