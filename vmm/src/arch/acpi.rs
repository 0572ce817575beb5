//! Minimal ACPI for x86_64 guests, written by hand because it is small: an RSDP, an XSDT,
//! a hardware-reduced FADT, a MADT and a DSDT, placed in the legacy BIOS area where Linux
//! scans for the RSDP (its address also goes in the boot information).
//!
//! Why: a kernel built without `CONFIG_X86_MPPARSE` (Debian's cloud kernel, for one)
//! ignores the MP table, so without a MADT it sees one CPU and no IOAPIC; and without ACPI
//! a guest cannot power off. What the tables say:
//! - MADT: one enabled local APIC per vCPU (ids 0..N), the in-kernel IOAPIC (id N, GSI
//!   base 0), LINT1 as NMI, and no interrupt source overrides: KVM's default routing
//!   sends GSI n to IOAPIC pin n, the PIT included.
//! - FADT: `HW_REDUCED_ACPI` (no PM1/GPE blocks, no SCI), no 8042, no VGA, no CMOS RTC
//!   (so Linux probes none of them), MSI not supported, and a sleep control register at
//!   [`SLEEP_CONTROL_PORT`]: writing `SLP_EN | SLP_TYP=5` there powers the VM off.
//! - DSDT: `\_S5` (`{5, 0, 0, 0}`), the COM1 UART (`PNP0501`), and one `LNRO0005` device
//!   per virtio-mmio window with its memory range and edge-triggered, active-high
//!   interrupt, which is how Linux's `virtio_mmio` driver finds devices under ACPI (no
//!   `virtio_mmio.device=` needed).
//!
//! Hardware-reduced ACPI means no legacy PIC to Linux: it then maps no ISA IRQ by
//! default, so every device that interrupts must be in the DSDT with its GSI. Without
//! the COM1 entry the console still prints kernel messages (polled) but a process
//! writing to it never gets its output out, since the UART's IRQ 4 goes nowhere. (Seen
//! in the `acpi_linux` test before COM1 was added.)

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Where the tables go: the start of the legacy BIOS area, 16-byte aligned, inside the
/// reserved range of the e820 map and inside Linux's RSDP scan window (0xE0000-0xFFFFF).
pub const ACPI_START: u64 = 0xe_0000;
/// End (exclusive) of the space the tables may use.
pub const ACPI_END: u64 = 0xf_0000;
/// The FADT's sleep control register (one byte of port I/O).
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// The FADT's sleep status register, next to it.
pub const SLEEP_STATUS_PORT: u16 = 0x601;
/// `SLP_EN` in the sleep control register.
pub const SLP_EN: u8 = 1 << 5;
/// The sleep type `\_S5` asks for (soft off).
pub const S5_SLEEP_TYPE: u8 = 5;

const OEM_ID: &[u8; 6] = b"COCOON";
const OEM_TABLE_ID: &[u8; 8] = b"COCOONVM";
const CREATOR_ID: &[u8; 4] = b"CCON";

/// Errors while building or writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("The ACPI tables ({0} bytes) do not fit below {ACPI_END:#x}")]
    TooBig(usize),
    #[error("Failed to write the ACPI tables into guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

/// One virtio-mmio window as the DSDT describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDevice {
    pub base: u64,
    pub size: u32,
    pub gsi: u32,
}

impl MmioDevice {
    /// The `index`-th virtio-mmio window of the address map.
    pub fn virtio(index: usize) -> Self {
        Self {
            base: super::layout::virtio_mmio_addr(index),
            size: super::layout::VIRTIO_MMIO_SIZE as u32,
            gsi: super::layout::virtio_mmio_irq(index),
        }
    }
}

/// What the tables describe.
#[derive(Clone, Debug, Default)]
pub struct AcpiConfig {
    pub vcpus: u8,
    pub ioapic_addr: u32,
    pub lapic_addr: u32,
    pub devices: Vec<MmioDevice>,
    /// Interrupt source overrides (ISA IRQ, GSI), edge/high. Empty for KVM's default
    /// routing; QEMU, for one, wires the PIT to pin 2.
    pub overrides: Vec<(u8, u32)>,
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// A table: the 36-byte header, then `body`, with length and checksum filled in.
fn table(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(36 + body.len());
    t.extend_from_slice(signature);
    t.extend_from_slice(&((36 + body.len()) as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, below
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// A Generic Address Structure for one byte of system I/O at `port`.
fn gas_io_byte(port: u16) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O space
    g[1] = 8; // register bit width
    g[2] = 0; // bit offset
    g[3] = 1; // access size: byte
    g[4..].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

/// FADT revision 6 (276 bytes), hardware-reduced.
fn fadt(dsdt: u64) -> Vec<u8> {
    const HW_REDUCED_ACPI: u32 = 1 << 20;
    const BOOT_VGA_NOT_PRESENT: u16 = 1 << 2;
    const BOOT_MSI_NOT_SUPPORTED: u16 = 1 << 3;
    const BOOT_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
    let mut b = vec![0u8; 276 - 36];
    let at = |off: usize| off - 36;
    b[at(40)..at(44)].copy_from_slice(&(dsdt as u32).to_le_bytes());
    // Legacy devices and 8042 bits left clear: neither is present.
    let boot_arch = BOOT_VGA_NOT_PRESENT | BOOT_MSI_NOT_SUPPORTED | BOOT_CMOS_RTC_NOT_PRESENT;
    b[at(109)..at(111)].copy_from_slice(&boot_arch.to_le_bytes());
    b[at(112)..at(116)].copy_from_slice(&HW_REDUCED_ACPI.to_le_bytes());
    b[at(131)] = 5; // FADT minor version (ACPI 6.5)
    b[at(140)..at(148)].copy_from_slice(&dsdt.to_le_bytes());
    b[at(244)..at(256)].copy_from_slice(&gas_io_byte(SLEEP_CONTROL_PORT));
    b[at(256)..at(268)].copy_from_slice(&gas_io_byte(SLEEP_STATUS_PORT));
    b[at(268)..at(276)].copy_from_slice(b"COCOONVM");
    table(b"FACP", 6, &b)
}

/// MADT revision 5.
fn madt(c: &AcpiConfig) -> Vec<u8> {
    const PCAT_COMPAT: u32 = 1; // the in-kernel irqchip has the 8259 pair too
    const ENABLED: u32 = 1;
    let mut b = Vec::new();
    b.extend_from_slice(&c.lapic_addr.to_le_bytes());
    b.extend_from_slice(&PCAT_COMPAT.to_le_bytes());
    for cpu in 0..c.vcpus {
        b.extend_from_slice(&[0, 8, cpu, cpu]); // processor local APIC: UID, APIC id
        b.extend_from_slice(&ENABLED.to_le_bytes());
    }
    b.extend_from_slice(&[1, 12, c.vcpus, 0]); // I/O APIC, id after the CPUs'
    b.extend_from_slice(&c.ioapic_addr.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    for &(irq, gsi) in &c.overrides {
        b.extend_from_slice(&[2, 10, 0, irq]); // interrupt source override, ISA bus
        b.extend_from_slice(&gsi.to_le_bytes());
        b.extend_from_slice(&5u16.to_le_bytes()); // active high, edge
    }
    // Local APIC NMI: every processor (0xff), active high, edge, on LINT1.
    b.extend_from_slice(&[4, 6, 0xff, 5, 0, 1]);
    table(b"APIC", 5, &b)
}

/// AML `PkgLength`: the length of what follows plus the encoding itself.
fn pkg_length(content: usize) -> Vec<u8> {
    // One byte holds up to 63; two up to 4095; three up to 1 MiB.
    for n in 1..=3usize {
        let total = content + n;
        let limit = if n == 1 {
            1 << 6
        } else {
            1 << (4 + 8 * (n - 1))
        };
        if total < limit {
            if n == 1 {
                return vec![total as u8];
            }
            let mut v = vec![(((n - 1) as u8) << 6) | (total & 0xf) as u8];
            for i in 0..n - 1 {
                v.push((total >> (4 + 8 * i)) as u8);
            }
            return v;
        }
    }
    unreachable!("AML objects here are far below 1 MiB")
}

/// `Op PkgLength contents`.
fn aml_pkg(op: &[u8], contents: &[u8]) -> Vec<u8> {
    let mut v = op.to_vec();
    v.extend(pkg_length(contents.len()));
    v.extend_from_slice(contents);
    v
}

/// `Name(name, value)` with a four-character name.
fn aml_name(name: &[u8; 4], value: &[u8]) -> Vec<u8> {
    let mut v = vec![0x08];
    v.extend_from_slice(name);
    v.extend_from_slice(value);
    v
}

/// An AML integer (ZeroOp, OneOp, or the smallest prefix that holds it).
fn aml_int(n: u32) -> Vec<u8> {
    match n {
        0 => vec![0x00],
        1 => vec![0x01],
        2..=0xff => vec![0x0a, n as u8],
        0x100..=0xffff => [&[0x0b][..], &(n as u16).to_le_bytes()].concat(),
        _ => [&[0x0c][..], &n.to_le_bytes()].concat(),
    }
}

fn aml_string(s: &str) -> Vec<u8> {
    let mut v = vec![0x0d];
    v.extend_from_slice(s.as_bytes());
    v.push(0);
    v
}

/// The `Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi }` descriptor.
fn crs_interrupt(gsi: u32) -> Vec<u8> {
    let mut v = vec![0x89, 6, 0, 0x03, 1];
    v.extend_from_slice(&gsi.to_le_bytes());
    v
}

/// `Name(_CRS, ResourceTemplate() { descriptors })`, end tag appended.
fn aml_crs(descriptors: &[u8]) -> Vec<u8> {
    let mut crs = descriptors.to_vec();
    crs.extend_from_slice(&[0x79, 0]); // end tag (checksum 0: "not computed")
    let mut buf = aml_int(crs.len() as u32);
    buf.extend_from_slice(&crs);
    aml_name(b"_CRS", &aml_pkg(&[0x11], &buf))
}

/// `EisaId("PNPxxxx")`: three letters in 5 bits each, then four hex digits, big-endian.
fn aml_eisa_id(id: &str) -> Vec<u8> {
    let b = id.as_bytes();
    let letters = b[..3]
        .iter()
        .fold(0u16, |a, c| (a << 5) | u16::from(c - b'@'));
    let product = u16::from_str_radix(&id[3..], 16).unwrap_or(0);
    let mut v = vec![0x0c];
    v.extend_from_slice(&letters.to_be_bytes());
    v.extend_from_slice(&product.to_be_bytes());
    v
}

/// COM1: `Device(COM1) { _HID EisaId("PNP0501"), _UID 1, _CRS { IO(Decode16, 0x3f8,
/// 0x3f8, 0, 8), Interrupt(...) { 4 } } }`.
fn aml_com1() -> Vec<u8> {
    let port = super::layout::SERIAL_PORT.to_le_bytes();
    let mut crs = vec![0x47, 0x01, port[0], port[1], port[0], port[1], 0, 8];
    crs.extend(crs_interrupt(super::layout::SERIAL_IRQ));
    let mut body = b"COM1".to_vec();
    body.extend(aml_name(b"_HID", &aml_eisa_id("PNP0501")));
    body.extend(aml_name(b"_UID", &aml_int(1)));
    body.extend(aml_crs(&crs));
    aml_pkg(&[0x5b, 0x82], &body)
}

/// A virtio-mmio window as an ACPI device: `Device(Vnnn) { _HID "LNRO0005", _UID n,
/// _CRS { Memory32Fixed(RW, base, size), Interrupt(Consumer, Edge, ActiveHigh,
/// Exclusive) { gsi } } }`.
fn aml_virtio_device(index: usize, d: &MmioDevice) -> Vec<u8> {
    let mut crs = vec![0x86, 9, 0, 1]; // Memory32Fixed, read-write
    crs.extend_from_slice(&(d.base as u32).to_le_bytes());
    crs.extend_from_slice(&d.size.to_le_bytes());
    crs.extend(crs_interrupt(d.gsi));
    let mut body = format!("V{index:03X}").into_bytes();
    body.extend(aml_name(b"_HID", &aml_string("LNRO0005")));
    body.extend(aml_name(b"_UID", &aml_int(index as u32)));
    body.extend(aml_crs(&crs));
    aml_pkg(&[0x5b, 0x82], &body)
}

fn dsdt(c: &AcpiConfig) -> Vec<u8> {
    // Name(_S5, Package(4) { 5, 0, 0, 0 })
    let mut s5 = vec![4u8];
    s5.extend(aml_int(u32::from(S5_SLEEP_TYPE)));
    s5.extend_from_slice(&[0, 0, 0]);
    let mut aml = aml_name(b"_S5_", &aml_pkg(&[0x12], &s5));
    let mut scope = b"\\_SB_".to_vec();
    scope.extend(aml_com1());
    for (i, d) in c.devices.iter().enumerate() {
        scope.extend(aml_virtio_device(i, d));
    }
    aml.extend(aml_pkg(&[0x10], &scope));
    table(b"DSDT", 2, &aml)
}

fn align16(n: u64) -> u64 {
    (n + 15) & !15
}

/// Builds every table for placement at `base`: RSDP first, then XSDT, FADT, MADT, DSDT.
pub fn build(base: u64, c: &AcpiConfig) -> Result<Vec<u8>, AcpiError> {
    let xsdt_addr = base + 48;
    let xsdt_len = 36 + 2 * 8;
    let fadt_addr = align16(xsdt_addr + xsdt_len);
    let madt_addr = align16(fadt_addr + 276);
    let madt = madt(c);
    let dsdt_addr = align16(madt_addr + madt.len() as u64);
    let dsdt = dsdt(c);
    let fadt = fadt(dsdt_addr);

    let mut xsdt_body = fadt_addr.to_le_bytes().to_vec();
    xsdt_body.extend_from_slice(&madt_addr.to_le_bytes());
    let xsdt = table(b"XSDT", 1, &xsdt_body);

    let mut rsdp = Vec::with_capacity(36);
    rsdp.extend_from_slice(b"RSD PTR ");
    rsdp.push(0); // checksum of the first 20 bytes, below
    rsdp.extend_from_slice(OEM_ID);
    rsdp.push(2); // ACPI 2.0+ (XSDT)
    rsdp.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    rsdp.extend_from_slice(&36u32.to_le_bytes());
    rsdp.extend_from_slice(&xsdt_addr.to_le_bytes());
    rsdp.extend_from_slice(&[0, 0, 0, 0]); // extended checksum, reserved
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = checksum(&rsdp);

    let total = (dsdt_addr - base) as usize + dsdt.len();
    if base + total as u64 > ACPI_END {
        return Err(AcpiError::TooBig(total));
    }
    let mut out = vec![0u8; total];
    for (addr, bytes) in [
        (base, &rsdp),
        (xsdt_addr, &xsdt),
        (fadt_addr, &fadt),
        (madt_addr, &madt),
        (dsdt_addr, &dsdt),
    ] {
        let at = (addr - base) as usize;
        out[at..at + bytes.len()].copy_from_slice(bytes);
    }
    Ok(out)
}

/// Writes the tables into guest memory; returns the RSDP's address.
pub fn setup(mem: &GuestMemoryMmap, c: &AcpiConfig) -> Result<u64, AcpiError> {
    let bytes = build(ACPI_START, c)?;
    mem.write_slice(&bytes, GuestAddress(ACPI_START))
        .map_err(AcpiError::Memory)?;
    Ok(ACPI_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vcpus: u8, devices: usize) -> AcpiConfig {
        AcpiConfig {
            vcpus,
            ioapic_addr: 0xfec0_0000,
            lapic_addr: 0xfee0_0000,
            devices: (0..devices).map(MmioDevice::virtio).collect(),
            overrides: Vec::new(),
        }
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// The table at guest address `addr` within `blob` placed at `base`.
    fn table_at(blob: &[u8], base: u64, addr: u64) -> &[u8] {
        let at = (addr - base) as usize;
        let len = u32_at(blob, at + 4) as usize;
        &blob[at..at + len]
    }

    #[test]
    fn tables_chain_from_the_rsdp_with_valid_checksums() {
        let blob = build(ACPI_START, &config(4, 3)).unwrap();
        assert_eq!(&blob[..8], b"RSD PTR ");
        assert_eq!(sum(&blob[..20]), 0);
        assert_eq!(sum(&blob[..36]), 0);
        let xsdt = table_at(&blob, ACPI_START, u64_at(&blob, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(sum(xsdt), 0);
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(xsdt, o))
            .collect();
        let sigs: Vec<&[u8]> = entries
            .iter()
            .map(|a| &table_at(&blob, ACPI_START, *a)[..4])
            .collect();
        assert_eq!(sigs, [b"FACP", b"APIC"]);
        for a in &entries {
            assert_eq!(sum(table_at(&blob, ACPI_START, *a)), 0);
            assert_eq!(a % 8, 0);
        }
        let fadt = table_at(&blob, ACPI_START, entries[0]);
        assert_eq!(fadt.len(), 276);
        assert_ne!(u32_at(fadt, 112) & (1 << 20), 0, "HW_REDUCED_ACPI");
        let dsdt = table_at(&blob, ACPI_START, u64_at(fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        assert_eq!(sum(dsdt), 0);
        assert_eq!(u64::from(u32_at(fadt, 40)), u64_at(fadt, 140));
        // Sleep control register: system I/O, one byte, at the port the VMM serves.
        assert_eq!(fadt[244], 1);
        assert_eq!(u64_at(fadt, 248), u64::from(SLEEP_CONTROL_PORT));
    }

    #[test]
    fn madt_lists_every_vcpu_and_the_ioapic() {
        let blob = build(ACPI_START, &config(3, 0)).unwrap();
        let xsdt = table_at(&blob, ACPI_START, u64_at(&blob, 24));
        let madt = table_at(&blob, ACPI_START, u64_at(xsdt, 44));
        assert_eq!(u32_at(madt, 36), 0xfee0_0000);
        let mut at = 44;
        let (mut cpus, mut ioapics) = (Vec::new(), Vec::new());
        while at < madt.len() {
            let (kind, len) = (madt[at], madt[at + 1] as usize);
            assert!(
                len >= 2 && at + len <= madt.len(),
                "entry overruns the table"
            );
            match kind {
                0 => cpus.push((madt[at + 3], u32_at(madt, at + 4))),
                1 => ioapics.push((madt[at + 2], u32_at(madt, at + 4))),
                _ => {}
            }
            at += len;
        }
        assert_eq!(at, madt.len());
        assert_eq!(cpus, [(0, 1), (1, 1), (2, 1)]);
        assert_eq!(ioapics, [(3, 0xfec0_0000)]);
    }

    #[test]
    fn dsdt_carries_s5_and_one_device_per_window() {
        let blob = build(ACPI_START, &config(1, 12)).unwrap();
        let xsdt = table_at(&blob, ACPI_START, u64_at(&blob, 24));
        let fadt = table_at(&blob, ACPI_START, u64_at(xsdt, 36));
        let dsdt = table_at(&blob, ACPI_START, u64_at(fadt, 140));
        let aml = &dsdt[36..];
        assert_eq!(&aml[..13], b"\x08_S5_\x12\x07\x04\x0a\x05\x00\x00\x00");
        let hids = aml.windows(8).filter(|w| w == b"LNRO0005").count();
        assert_eq!(hids, 12);
        // The last device's window and GSI are in its _CRS.
        let base = (0xd000_0000u32 + 11 * 0x1000).to_le_bytes();
        assert!(aml.windows(4).any(|w| w == base));
    }

    #[test]
    fn eisa_ids_compress_like_acpica() {
        // iasl compiles EisaId("PNP0501") to 0x0105D041 (bytes 41 D0 05 01).
        assert_eq!(aml_eisa_id("PNP0501"), [0x0c, 0x41, 0xd0, 0x05, 0x01]);
    }

    #[test]
    fn pkg_length_encodings() {
        assert_eq!(pkg_length(0), [1]);
        assert_eq!(pkg_length(62), [63]);
        // 63 + 2 = 65 = 0x41: low nibble 1 in the lead byte, 0x04 next.
        assert_eq!(pkg_length(63), [0x41, 0x04]);
        assert_eq!(pkg_length(4093), [0x4f, 0xff]);
        assert_eq!(pkg_length(4094), [0x81, 0x00, 0x01]);
    }

    #[test]
    fn too_many_tables_for_the_window_is_an_error() {
        assert!(matches!(
            build(ACPI_END - 64, &config(1, 0)),
            Err(AcpiError::TooBig(_))
        ));
    }
}
