//! The ACPI tables checked by ACPICA's own tools: `iasl -d` disassembles each table (it
//! verifies lengths, checksums and every AML opcode) and the text it prints is checked
//! for what Linux will read. Skips, visibly, where `iasl` (acpica-tools) is missing.

use std::path::Path;
use std::process::Command;

use cocoon_vmm::arch::acpi::{self, AcpiConfig, MmioDevice};

/// A prerequisite is missing: a failure under `CI=true`, else `SKIPPED: <msg>`.
#[track_caller]
fn skip(msg: &str) {
    let (test, why) = msg.split_once(": ").unwrap_or(("test", msg));
    cocoon_nested::testing::missing(test, why);
}

/// Each table in the blob by signature, following the RSDP → XSDT → FADT → DSDT chain.
fn tables(blob: &[u8], base: u64) -> Vec<([u8; 4], Vec<u8>)> {
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let at = |addr: u64| {
        let o = (addr - base) as usize;
        let len = u32_at(blob, o + 4) as usize;
        blob[o..o + len].to_vec()
    };
    let xsdt = at(u64_at(blob, 24));
    let mut out = vec![(*b"XSDT", xsdt.clone())];
    for o in (36..xsdt.len()).step_by(8) {
        let t = at(u64_at(&xsdt, o));
        if &t[..4] == b"FACP" {
            out.push((*b"DSDT", at(u64_at(&t, 140))));
        }
        out.push((t[..4].try_into().unwrap(), t));
    }
    out
}

fn disassemble(dir: &Path, sig: &[u8; 4], table: &[u8]) -> String {
    let name = String::from_utf8_lossy(sig).to_lowercase();
    let dat = dir.join(format!("{name}.dat"));
    std::fs::write(&dat, table).unwrap();
    let out = Command::new("iasl")
        .current_dir(dir)
        .arg("-d")
        .arg(&dat)
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "iasl -d {name}: {log}");
    for bad in ["Error", "Warning", "Invalid", "Incorrect"] {
        assert!(!log.contains(bad), "iasl -d {name} complained:\n{log}");
    }
    let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap();
    for bad in ["Incorrect checksum", "Invalid", "**** "] {
        assert!(!dsl.contains(bad), "{name}.dsl flags a problem:\n{dsl}");
    }
    dsl
}

#[test]
fn acpica_accepts_every_table() {
    if Command::new("iasl").arg("-v").output().is_err() {
        skip("acpica_accepts_every_table: iasl (acpica-tools) is not installed");
        return;
    }
    let config = AcpiConfig {
        vcpus: 4,
        ioapic_addr: 0xfec0_0000,
        lapic_addr: 0xfee0_0000,
        devices: (0..3).map(MmioDevice::virtio).collect(),
        overrides: vec![(0, 2)],
    };
    let blob = acpi::build(acpi::ACPI_START, &config).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut seen = Vec::new();
    for (sig, table) in tables(&blob, acpi::ACPI_START) {
        let dsl = disassemble(dir.path(), &sig, &table);
        // Comments dropped, whitespace collapsed: `Name (_S5, Package (0x04) { 0x05, ... })`.
        let squash = dsl
            .lines()
            .map(|l| l.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join(" ")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        match &sig {
            b"FACP" => {
                assert!(squash.contains("Hardware Reduced (V5) : 1"), "{dsl}");
                assert!(
                    squash.contains("8042 Present on ports 60/64 (V2) : 0"),
                    "{dsl}"
                );
                assert!(squash.contains("CMOS RTC Not Present (V5) : 1"), "{dsl}");
            }
            b"APIC" => {
                assert_eq!(
                    squash
                        .matches("Subtable Type : 00 [Processor Local APIC]")
                        .count(),
                    4
                );
                assert!(squash.contains("Subtable Type : 01 [I/O APIC]"), "{dsl}");
                assert!(squash.contains("Address : FEC00000"), "{dsl}");
                assert!(
                    squash.contains("Subtable Type : 02 [Interrupt Source Override]"),
                    "{dsl}"
                );
            }
            b"DSDT" => {
                assert!(
                    squash.contains("Name (_S5, Package (0x04) { 0x05, Zero, Zero, Zero })"),
                    "{dsl}"
                );
                assert_eq!(
                    squash.matches("Name (_HID, \"LNRO0005\")").count(),
                    3,
                    "{dsl}"
                );
                assert!(
                    squash.contains("Device (COM1) { Name (_HID, EisaId (\"PNP0501\")"),
                    "{dsl}"
                );
                assert!(
                    squash.contains("IO (Decode16, 0x03F8, 0x03F8, 0x00, 0x08, )"),
                    "{dsl}"
                );
                assert!(
                    squash.contains("Memory32Fixed (ReadWrite, 0xD0002000, 0x00001000, )"),
                    "{dsl}"
                );
                assert!(squash.contains("Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000007, }"), "{dsl}");
            }
            _ => {}
        }
        seen.push(String::from_utf8_lossy(&sig).into_owned());
    }
    assert_eq!(seen, ["XSDT", "DSDT", "FACP", "APIC"]);
}
