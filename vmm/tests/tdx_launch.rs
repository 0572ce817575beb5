//! cocoon-vmm's TDX launch, recorded at its one seam to the TDX module: every page the
//! VMM adds, read from the VMM's mapping, folded into MRTD as the module folds it
//! (TDH.MEM.PAGE.ADD, then TDH.MR.EXTEND per 256 bytes where measured), must give what
//! `cocoon measure tdx` predicts for the same firmware. On this host the TD itself is
//! refused with the reason; where TDX exists the same test launches for real.

use clap::Parser;
use cocoon_confidential::measure::{run, MeasureCmd};
use cocoon_confidential::tdx::tdvf::{Mrtd, Tdvf};
use cocoon_vmm::tdx::{kvm, launch, TdParams, TdxError, TdxModule};
use vm_memory::{GuestAddress, GuestMemoryMmap, VolatileSlice};

const DEBIAN_OVMF: &str = "/usr/share/ovmf/OVMF.fd";

#[derive(Default)]
struct Recorder {
    mrtd: Mrtd,
    calls: Vec<String>,
    finalized: bool,
}

impl TdxModule for Recorder {
    fn init_vm(&mut self, td: &TdParams) -> Result<(), TdxError> {
        self.calls.push(format!(
            "init_vm {:#x} {}",
            td.attributes,
            hex::encode(&td.mrconfigid[..4])
        ));
        Ok(())
    }
    fn create_vcpus(&mut self, n: usize) -> Result<(), TdxError> {
        let after_init = self.calls.last().is_some_and(|c| c.starts_with("init_vm"));
        assert!(after_init, "vCPUs before INIT_VM");
        self.calls.push(format!("vcpus {n}"));
        Ok(())
    }
    fn init_vcpu(&mut self, index: usize, hob_gpa: u64) -> Result<(), TdxError> {
        self.calls.push(format!("init_vcpu {index} {hob_gpa:#x}"));
        Ok(())
    }
    fn init_mem_region(
        &mut self,
        gpa: u64,
        source: VolatileSlice,
        measure: bool,
    ) -> Result<(), TdxError> {
        assert!(!self.finalized);
        assert_eq!(source.len() % 4096, 0, "a partial page at {gpa:#x}");
        self.calls
            .push(format!("add {gpa:#x} x{} {measure}", source.len() / 4096));
        for off in (0..source.len()).step_by(4096) {
            let page_gpa = gpa + off as u64;
            self.mrtd.page_add(page_gpa);
            if measure {
                let mut page = vec![0u8; 4096];
                source.subslice(off, 4096).unwrap().copy_to(&mut page[..]);
                self.mrtd.extend_page(page_gpa, &page);
            }
        }
        Ok(())
    }
    fn finalize(&mut self) -> Result<(), TdxError> {
        self.finalized = true;
        Ok(())
    }
}

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: MeasureCmd,
}

fn firmware() -> (Vec<u8>, Tdvf) {
    let Ok(bytes) = std::fs::read(DEBIAN_OVMF) else {
        panic!(
            "{DEBIAN_OVMF} is missing: install Debian's ovmf package (scripts/setup-host.sh does)"
        );
    };
    (bytes.clone(), Tdvf::parse(bytes).unwrap())
}

/// Low RAM for the HOB and temporary memory, and the firmware's range below 4 GiB.
fn memory(fw_len: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 64 << 20),
        (GuestAddress((4u64 << 30) - fw_len as u64), fw_len),
    ])
    .unwrap()
}

fn params() -> TdParams {
    TdParams {
        attributes: 0,
        xfam: 0x3,
        mrconfigid: [0xcd; 48],
        cpuid: Vec::new(),
    }
}

#[test]
fn the_recorded_mrtd_is_what_cocoon_measure_predicts() {
    let (bytes, fw) = firmware();
    let predicted = run(&Cli::try_parse_from(["m", "tdx", "--ovmf", DEBIAN_OVMF])
        .unwrap()
        .cmd)
    .unwrap();
    for vcpus in [1, 4] {
        let mut rec = Recorder::default();
        launch(&mut rec, &memory(bytes.len()), &fw, &params(), vcpus).unwrap();
        assert!(rec.finalized);
        assert_eq!(
            hex::encode(rec.mrtd.clone().finish()),
            predicted,
            "{vcpus} vCPUs"
        );
        assert_eq!(
            rec.calls[..2],
            ["init_vm 0x0 cdcdcdcd".to_owned(), format!("vcpus {vcpus}")]
        );
        // Every vCPU learns where the HOB is (Debian's TDVF: 0x809000) before any page.
        for i in 0..vcpus {
            assert_eq!(rec.calls[2 + i], format!("init_vcpu {i} 0x809000"));
        }
        // The code volume goes over measured, the variables unmeasured.
        assert_eq!(rec.calls[2 + vcpus], "add 0xffe20000 x480 true");
        assert_eq!(rec.calls[3 + vcpus], "add 0xffe00000 x32 false");
    }
}

#[test]
fn memory_the_vmm_cannot_fill_stops_the_launch_before_the_module_is_called() {
    let (_, fw) = firmware();
    let low = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
    let mut rec = Recorder::default();
    let e = launch(&mut rec, &low, &fw, &params(), 1).unwrap_err();
    assert!(e.to_string().contains("0xffe20000"), "{e}");
    assert!(rec.calls.is_empty());
}

#[test]
fn the_launch_through_kvm_on_this_host() {
    let k = kvm_ioctls::Kvm::new().expect("/dev/kvm cannot be opened");
    match kvm::create_vm(&k) {
        Err(e) => {
            let e = e.to_string();
            assert!(e.contains("KVM_X86_TDX_VM"), "{e}");
            eprintln!("SKIPPED: the hardware launch: {e}");
        }
        Ok(vm) => {
            let (bytes, fw) = firmware();
            let mem = memory(bytes.len());
            let mut keep = Vec::new();
            for (slot, (gpa, len)) in [
                (0u64, 64usize << 20),
                ((4u64 << 30) - bytes.len() as u64, bytes.len()),
            ]
            .into_iter()
            .enumerate()
            {
                let host =
                    vm_memory::GuestMemoryBackend::get_slice(&mem, GuestAddress(gpa), len).unwrap();
                keep.push(
                    cocoon_vmm::snp::kvm::add_private_memory(&vm, slot as u32, gpa, host).unwrap(),
                );
            }
            launch(&mut kvm::KvmTdx::new(&vm), &mem, &fw, &params(), 1)
                .expect("the TDX launch on this host");
        }
    }
}
