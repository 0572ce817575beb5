//! Turns a validated [`VmConfig`] into a VM ready to run: guest memory, the KVM VM, the
//! buses with legacy and virtio-mmio devices (announced on the command line), the loaded
//! guest, the MP table and configured vCPUs.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};
use std::sync::{Arc, Mutex};

use kvm_ioctls::VcpuFd;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::{acpi, boot, layout, mptable};
use crate::config::{ConfigError, VmConfig};
use crate::devices::bus::{Bus, BusError};
use crate::devices::legacy::acpi_pm::AcpiPm;
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::serial::SerialDevice;
use crate::devices::legacy::EventFdTrigger;
use crate::devices::virtio::balloon::{Balloon, RemovePages};
use crate::devices::virtio::block::{Block, DiskSlot, FileBackend};
use crate::devices::virtio::defs::TYPE_VSOCK;
use crate::devices::virtio::mem::{Mem, MemControl, MemError};
use crate::devices::virtio::mmio::TransportState;
use crate::devices::virtio::mmio::{MmioError, MmioTransport};
use crate::devices::virtio::net::{Net, NetError, Tap};
use crate::devices::virtio::vhost_user::{VhostUserDevice, VhostUserError};
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::vsock::{MuxerError, VsockMuxer};
use crate::vstate::memory::{self, GuestMemory, MemoryError};
use crate::vstate::snapshot::{self, Snapshot, SnapshotError};
use crate::vstate::vcpu::{self, ExitReason, ExitSink, VcpuError};
use crate::vstate::vm::{Vm, VmError};

/// Errors while building the VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("Invalid configuration")]
    Config(#[from] ConfigError),
    #[error("Failed to create guest memory")]
    Memory(#[from] MemoryError),
    #[error("Failed to create the VM")]
    Vm(#[from] VmError),
    #[error("Failed to create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("Failed to register an interrupt line")]
    Irqfd(#[source] kvm_ioctls::Error),
    #[error("Failed to open the serial output {0}")]
    SerialOut(String, #[source] std::io::Error),
    #[error("Failed to open disk image {0}")]
    Disk(String, #[source] std::io::Error),
    #[error("Failed to set up the vsock device")]
    Vsock(#[from] MuxerError),
    #[error("Failed to set up a network device")]
    Net(#[from] NetError),
    #[error("Failed to set up a vhost-user device")]
    VhostUser(#[from] VhostUserError),
    #[error("Failed to create a virtio-mmio transport")]
    Mmio(#[from] MmioError),
    #[error("Failed to place a device on a bus")]
    Bus(#[from] BusError),
    #[error("Failed to load the guest")]
    Boot(#[from] boot::BootError),
    #[error("Failed to write the MP table")]
    MpTable(#[from] mptable::MpTableError),
    #[error("Failed to write the ACPI tables")]
    Acpi(#[from] acpi::AcpiError),
    #[error("Failed to create vCPU")]
    Vcpu(#[from] VcpuError),
    #[error("Failed to restore the snapshot")]
    Snapshot(#[from] SnapshotError),
    #[error("Failed to restore a device: {0}")]
    Restore(String),
    #[error("Failed to set up the virtio-mem device")]
    Mem(#[from] MemError),
}

/// A virtio device on its transport, as the event loop and snapshots see it: a
/// host-side descriptor to poll, and state to save and restore.
pub trait HostEvents: Send {
    fn host_fd(&self) -> Option<RawFd>;
    fn process_host(&mut self);
    fn save(&mut self) -> Result<TransportState, String>;
    fn restore(&mut self, state: &TransportState) -> Result<(), String>;
}

impl<D: VirtioDevice, I: Interrupt> HostEvents for MmioTransport<D, I> {
    fn host_fd(&self) -> Option<RawFd> {
        MmioTransport::host_fd(self)
    }
    fn process_host(&mut self) {
        MmioTransport::process_host(self)
    }
    fn save(&mut self) -> Result<TransportState, String> {
        MmioTransport::save(self)
    }
    fn restore(&mut self, state: &TransportState) -> Result<(), String> {
        MmioTransport::restore(self, state)
    }
}

/// The i8042 reset line: ends the VM as a clean reset.
pub struct ResetTrigger(pub Arc<ExitSink>);

impl vm_superio::Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        log::info!("i8042: guest requested a reset");
        self.0.report(ExitReason::Reset);
        Ok(())
    }
}

/// A built VM, not yet running.
pub struct BuiltVm {
    pub vm: Vm,
    pub mem: GuestMemory,
    pub vcpus: Vec<VcpuFd>,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub host_devices: Vec<Arc<Mutex<dyn HostEvents>>>,
    pub serial: Arc<Mutex<SerialDevice>>,
    /// The virtio-mem device, when the config asks for one (`hotplug_mib`).
    pub memory: Option<Arc<Mutex<dyn MemControl>>>,
    /// The empty disk slots (`block_slots`), in order.
    pub disk_slots: Vec<Arc<Mutex<dyn DiskSlot>>>,
}

fn irqfd(vm: &Vm, gsi: u32) -> Result<EventFd, BuildError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm.fd.register_irqfd(&evt, gsi).map_err(BuildError::Irqfd)?;
    Ok(evt)
}

/// Builds everything `config` describes. `exit` receives the i8042 reset.
pub fn build(config: &VmConfig, exit: &Arc<ExitSink>) -> Result<BuiltVm, BuildError> {
    build_vm(config, exit, None)
}

/// Builds the VM `config` describes (a template's config with this VM's own paths and
/// descriptors) in the state `snapshot` saved, over the template's `memory` file. The
/// guest goes on where the template stopped; nothing is loaded or booted.
pub fn restore(
    config: &VmConfig,
    exit: &Arc<ExitSink>,
    snapshot: &Snapshot,
    memory: std::fs::File,
) -> Result<BuiltVm, BuildError> {
    snapshot.check_clone(config)?;
    build_vm(config, exit, Some((snapshot, memory)))
}

fn build_vm(
    config: &VmConfig,
    exit: &Arc<ExitSink>,
    restoring: Option<(&Snapshot, std::fs::File)>,
) -> Result<BuiltVm, BuildError> {
    config.validate()?;
    let mem_size = config.mem_bytes();
    let source = match config.mem_fd {
        // SAFETY: the config's validation checked it is a descriptor above stdio, handed
        // to us for this use; nothing else here owns it.
        Some(fd) => memory::RamSource::Inherited(unsafe { std::fs::File::from_raw_fd(fd) }),
        None => memory::RamSource::Make(config.huge_pages),
    };
    // Copy-on-write over the template where only this process maps guest RAM; a
    // vhost-user backend maps it too, and a balloon gives pages back by punching holes
    // in the shared file, so with either the VM gets a RAM file of its own, filled from
    // the template's.
    let private_ok = config.fs.is_empty()
        && config.vhost_user_vsock.is_none()
        && !config.free_page_reporting
        && config.mem_fd.is_none();
    let (snap, source, copy_from) = match restoring {
        None => (None, source, None),
        Some((s, file)) if private_ok => (Some(s), memory::RamSource::Template(file), None),
        Some((s, file)) => (Some(s), source, Some(file)),
    };
    let mut gm = memory::create_from(mem_size, source)?;
    let hotplug = (config.hotplug_mib > 0).then(|| {
        (
            layout::hotplug_region_start(mem_size),
            config.hotplug_bytes(),
        )
    });
    if let Some((start, size)) = hotplug {
        // Made here like RAM's own file where this process may; an inherited RAM file
        // means a jailed VMM that may not, which `auto` falls back from.
        let huge = match config.mem_fd {
            Some(_) => crate::vstate::ram_file::HugePages::Auto,
            None => config.huge_pages,
        };
        gm.add_hotplug_region(start, size, huge)?;
    }
    if let Some(template) = copy_from {
        let n = snapshot::copy_memory(&template, &gm.mem)?;
        log::info!("guest RAM: {} MiB of the template's copied", n >> 20);
    }
    let vm = Vm::new(&gm.mem, config.kvm_fd)?;
    if let Some(s) = snap {
        snapshot::restore_vm(&vm.fd, &s.vm)?;
    }

    let mut pio = Bus::new();
    let out: Box<dyn Write + Send> = match (&config.serial_out, config.serial_out_fd) {
        // SAFETY: the descriptor was handed to this process for the console alone
        // (checked above 2 by the config); nothing else here owns or closes it.
        (_, Some(fd)) => Box::new(unsafe { std::fs::File::from_raw_fd(fd) }),
        (Some(p), None) => Box::new(crate::devices::legacy::capped::CappedWriter::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| BuildError::SerialOut(p.display().to_string(), e))?,
            crate::devices::legacy::capped::SERIAL_OUT_LIMIT,
        )),
        (None, None) => Box::new(std::io::sink()),
    };
    let serial_irq = EventFdTrigger(irqfd(&vm, layout::SERIAL_IRQ)?);
    let serial = match snap {
        Some(s) => {
            SerialDevice::restored(&s.serial, serial_irq, out).map_err(BuildError::Restore)?
        }
        None => SerialDevice::new(serial_irq, out),
    };
    let serial = Arc::new(Mutex::new(serial));
    pio.insert(serial.clone(), u64::from(layout::SERIAL_PORT), 8)?;
    let i8042 = I8042::new(ResetTrigger(exit.clone()));
    pio.insert(
        Arc::new(Mutex::new(i8042)),
        u64::from(layout::I8042_PORT),
        5,
    )?;

    if config.acpi {
        let exit = exit.clone();
        let pm = AcpiPm::new(move || {
            log::info!("ACPI: guest powered off");
            exit.report(ExitReason::Shutdown);
        });
        pio.insert(
            Arc::new(Mutex::new(pm)),
            u64::from(acpi::SLEEP_CONTROL_PORT),
            2,
        )?;
    }

    let mut virtio = VirtioSet {
        vm: &vm,
        mem: &gm.mem,
        mmio: Bus::new(),
        host_devices: Vec::new(),
        windows: Vec::new(),
    };
    if let Some(v) = &config.vsock {
        let muxer = VsockMuxer::new(v.to_vsock_config())?;
        virtio.add(Vsock::new(v.guest_cid, muxer))?;
    }
    for b in &config.block {
        let disk_err = |e| BuildError::Disk(b.path.display().to_string(), e);
        let file = OpenOptions::new()
            .read(true)
            .write(!b.read_only)
            .open(&b.path)
            .map_err(disk_err)?;
        let backend = FileBackend::new(file).map_err(disk_err)?;
        virtio.add(Block::new(backend, b.read_only, &b.id))?;
    }
    for (i, n) in config.net.iter().enumerate() {
        let tap = match n.tap_fd {
            Some(fd) => Tap::inherited(fd)?,
            None => Tap::open(&n.tap)?,
        };
        virtio.add(Net::new(tap, n.mac_or_default(i)))?;
    }
    if let Some(v) = &config.vhost_user_vsock {
        let dev = VhostUserDevice::connect(
            &v.socket,
            TYPE_VSOCK,
            vec![256; 3],
            v.guest_cid.to_le_bytes().to_vec(),
        )?;
        virtio.add(dev)?;
    }
    for f in &config.fs {
        virtio.add(VhostUserDevice::fs(&f.socket, &f.tag, f.queue_size)?)?;
    }
    if config.free_page_reporting {
        virtio.add(Balloon::new(RemovePages))?;
    }
    // Empty, so a template's clone starts with them as they were saved.
    let mut disk_slots: Vec<Arc<Mutex<dyn DiskSlot>>> = Vec::new();
    for _ in 0..config.block_slots {
        disk_slots.push(virtio.add(Block::slot())?);
    }
    // Last, so every other device keeps its window (and a template's order) with or
    // without it.
    let memory = match hotplug {
        Some((start, size)) => {
            let t: Arc<Mutex<dyn MemControl>> = virtio.add(Mem::new(start, size, RemovePages)?)?;
            log::info!("virtio-mem: {} MiB at {start:#x}, none plugged", size >> 20);
            Some(t)
        }
        None => None,
    };
    let VirtioSet {
        mmio,
        host_devices,
        windows,
        ..
    } = virtio;
    let vcpus = match snap {
        Some(s) => {
            for (i, (t, saved)) in host_devices.iter().zip(&s.virtio).enumerate() {
                crate::devices::bus::lock(t)
                    .restore(saved)
                    .map_err(|e| BuildError::Restore(format!("virtio device {i}: {e}")))?;
            }
            let vcpus = s
                .vcpus
                .iter()
                .enumerate()
                .map(|(i, state)| {
                    vcpu::create_restored(&vm.kvm, &vm.fd, i as u8, config.vcpus, state)
                })
                .collect::<Result<Vec<_>, _>>()?;
            log::info!(
                "restored VM: {} MiB, {} vCPU(s), {} virtio device(s)",
                config.mem_mib,
                config.vcpus,
                host_devices.len()
            );
            vcpus
        }
        None => load_guest(config, &vm, &gm, windows)?,
    };
    Ok(BuiltVm {
        vm,
        mem: gm,
        vcpus,
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        host_devices,
        serial,
        memory,
        disk_slots,
    })
}

/// Loads the kernel, initrd and command line, writes the ACPI (or MP) tables for the
/// virtio `windows`, and creates the vCPUs at the kernel's entry.
fn load_guest(
    config: &VmConfig,
    vm: &Vm,
    gm: &GuestMemory,
    windows: Vec<acpi::MmioDevice>,
) -> Result<Vec<VcpuFd>, BuildError> {
    let mem_size = config.mem_bytes();
    // With ACPI the DSDT describes the virtio-mmio windows; without it, the command line
    // does. (A kernel with ACPI would see both and probe every device twice.)
    // A guest told `acpi=off` would find no devices in the DSDT.
    let acpi = config.acpi && !config.cmdline.split_whitespace().any(|w| w == "acpi=off");
    let (cmdline_extra, rsdp) = if acpi {
        let tables = acpi::AcpiConfig {
            vcpus: config.vcpus,
            ioapic_addr: layout::IOAPIC_START as u32,
            lapic_addr: layout::LAPIC_START as u32,
            devices: windows,
            overrides: Vec::new(),
        };
        (Vec::new(), Some(acpi::setup(&gm.mem, &tables)?))
    } else {
        let extra = windows
            .iter()
            .map(|w| format!("virtio_mmio.device=4K@{:#x}:{}", w.base, w.gsi))
            .collect();
        (extra, None)
    };
    let cmdline = boot::build_cmdline(&config.cmdline, &cmdline_extra)?;
    let loaded = boot::load(
        &gm.mem,
        mem_size,
        &config.kernel,
        config.initrd.as_deref(),
        &cmdline,
        rsdp,
    )?;
    // Kernels without ACPI (or without MADT support) find the vCPUs here instead.
    mptable::setup(&gm.mem, config.vcpus)?;
    let vcpus = (0..config.vcpus)
        .map(|i| {
            vcpu::create(
                &vm.kvm,
                &vm.fd,
                &gm.mem,
                i,
                config.vcpus,
                loaded.entry,
                loaded.boot_info,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    log::info!(
        "built VM: {} MiB, {} vCPU(s), {} virtio device(s), entry {:?}",
        config.mem_mib,
        config.vcpus,
        config.virtio_device_count(),
        loaded.entry
    );
    Ok(vcpus)
}

/// Virtio devices being placed: each gets the next MMIO window and IRQ, and a
/// `virtio_mmio.device=` entry on the command line.
struct VirtioSet<'a> {
    vm: &'a Vm,
    mem: &'a GuestMemoryMmap,
    mmio: Bus,
    host_devices: Vec<Arc<Mutex<dyn HostEvents>>>,
    windows: Vec<acpi::MmioDevice>,
}

impl VirtioSet<'_> {
    /// Places `device`; returns its transport for those who drive it from the host.
    fn add<D: VirtioDevice + 'static>(
        &mut self,
        device: D,
    ) -> Result<Arc<Mutex<MmioTransport<D, EventFd>>>, BuildError> {
        let index = self.host_devices.len();
        let addr = layout::virtio_mmio_addr(index);
        let irq = layout::virtio_mmio_irq(index);
        let transport = MmioTransport::new(device, irqfd(self.vm, irq)?, self.mem.clone())?;
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(transport.clone(), addr, layout::VIRTIO_MMIO_SIZE)?;
        self.host_devices.push(transport.clone());
        self.windows.push(acpi::MmioDevice::virtio(index));
        Ok(transport)
    }
}

/// Memory for tests that need a `GuestMemoryMmap` without KVM.
pub fn test_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    memory::create(size).map(|g| g.mem)
}
