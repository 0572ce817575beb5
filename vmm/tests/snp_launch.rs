//! cocoon-vmm's SEV-SNP launch, recorded at its one seam to the firmware: every page the
//! VMM hands over, read from the VMM's own mapping as the firmware would read it, folded
//! into the launch digest exactly as the firmware folds it, must give what `cocoon
//! measure snp` predicts for the same inputs (itself checked against the reference tool
//! in `shim/tests/measure_reference.rs`). On this host the launch through KVM is refused
//! with the reason; where SEV-SNP exists the same test launches for real.

use std::path::{Path, PathBuf};

use clap::Parser;
use cocoon_confidential::measure::{run, MeasureCmd};
use cocoon_confidential::snp::gctx::{page_digest, Gctx, PageType, VMSA_GPA};
use cocoon_confidential::snp::hashes::SevHashes;
use cocoon_confidential::snp::launch::{LaunchInputs, LaunchPlan};
use cocoon_confidential::snp::ovmf::Ovmf;
use cocoon_confidential::snp::vmsa::{self, cpu_type_sig, Reset, VmmType};
use cocoon_confidential::snp::PAGE_SIZE;
use cocoon_vmm::snp::{cpuid_page, kvm, launch, Launch, SnpError, SnpFirmware, SnpIdentity};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, VolatileSlice};

const AMD_SEV_SUFFIX: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../confidential/tests/fixtures/ovmf_AmdSev_suffix.bin"
);
const DEBIAN_OVMF: &str = "/usr/share/ovmf/OVMF.fd";
const POLICY: u64 = 0x30000;

/// The firmware's side of the seam, on paper.
#[derive(Default)]
struct Recorder {
    calls: Vec<String>,
    pages: Vec<(PageType, u64, Option<Vec<u8>>)>,
    resets: Vec<Reset>,
    features: u64,
    /// The ID block and whether an author key came with it, from SNP_LAUNCH_FINISH.
    identity: Option<([u8; 96], bool)>,
}

impl SnpFirmware for Recorder {
    fn init(&mut self, vmsa_features: u64) -> Result<(), SnpError> {
        self.features = vmsa_features;
        self.calls.push(format!("init {vmsa_features:#x}"));
        Ok(())
    }
    fn create_vcpus(&mut self, n: usize) -> Result<(), SnpError> {
        let after_init = self.calls.last().is_some_and(|c| c.starts_with("init"));
        assert!(after_init, "vCPUs before INIT2");
        self.calls.push(format!("vcpus {n}"));
        Ok(())
    }
    fn launch_start(&mut self, policy: u64) -> Result<(), SnpError> {
        self.calls.push(format!("start {policy:#x}"));
        Ok(())
    }
    fn launch_update(
        &mut self,
        gpa: u64,
        host: VolatileSlice,
        kind: PageType,
    ) -> Result<(), SnpError> {
        assert_eq!(host.len() % PAGE_SIZE, 0, "a partial page at {gpa:#x}");
        assert_ne!(
            kind,
            PageType::Vmsa,
            "KVM makes VMSAs from the vCPUs, not from memory"
        );
        self.calls.push(format!(
            "update {gpa:#x} {:?} x{}",
            kind,
            host.len() / PAGE_SIZE
        ));
        for off in (0..host.len()).step_by(PAGE_SIZE) {
            let mut page = vec![0u8; PAGE_SIZE];
            host.subslice(off, PAGE_SIZE)
                .unwrap()
                .copy_to(&mut page[..]);
            // The firmware measures a NORMAL page's contents; the others it sets up.
            let contents = (kind == PageType::Normal).then_some(page);
            self.pages.push((kind, gpa + off as u64, contents));
        }
        Ok(())
    }
    fn reset_vcpu(&mut self, index: usize, reset: &Reset) -> Result<(), SnpError> {
        assert_eq!(index, self.resets.len(), "vCPUs out of order");
        self.resets.push(*reset);
        Ok(())
    }
    fn launch_finish(
        &mut self,
        host_data: [u8; 32],
        identity: Option<&SnpIdentity>,
    ) -> Result<(), SnpError> {
        self.calls
            .push(format!("finish {}", hex::encode(&host_data[..4])));
        self.identity = identity.map(|i| (i.block, i.author_key));
        Ok(())
    }
}

impl Recorder {
    /// The digest the firmware would compute: the pages in order, then one VMSA per
    /// vCPU, which KVM builds from the vCPU's registers (modeled by `vmsa::page`, the
    /// part of this check that is not the VMM's own bytes).
    fn digest(&self) -> String {
        let mut g = Gctx::default();
        for (kind, gpa, contents) in &self.pages {
            let d = contents.as_deref().map_or([0; 48], page_digest);
            g.update(*kind, *gpa, &d);
        }
        for r in &self.resets {
            // INIT2 gets the features but SNP_ACTIVE, which KVM adds itself.
            assert_eq!(self.features & 1, 0, "INIT2 was given SNP_ACTIVE");
            assert_eq!(
                r.sev_features,
                self.features | 1,
                "the VMSA's features differ from INIT2's"
            );
            g.update(PageType::Vmsa, VMSA_GPA, &page_digest(&vmsa::page(r)));
        }
        hex::encode(g.ld())
    }
}

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: MeasureCmd,
}

/// What `cocoon measure snp` prints for these arguments.
fn measured(args: &[&str]) -> String {
    let argv = ["cocoon-measure", "snp"].iter().chain(args);
    run(&Cli::try_parse_from(argv).unwrap().cmd).unwrap()
}

struct Config<'a> {
    ovmf: &'a str,
    kernel: Option<(PathBuf, Option<PathBuf>, Option<&'a str>)>,
    vcpus: u32,
    cpu: &'a str,
    features: u64,
}

/// Launches `c` into the recorder, returns (recorded digest, predicted digest).
fn launch_recorded(c: &Config) -> (String, String, Recorder) {
    launch_recorded_with(c, None)
}

/// As `launch_recorded`, with an owner's ID block handed to SNP_LAUNCH_FINISH.
fn launch_recorded_with(c: &Config, identity: Option<&SnpIdentity>) -> (String, String, Recorder) {
    let fw = Ovmf::parse(std::fs::read(c.ovmf).unwrap()).unwrap();
    let read = |p: &Path| std::fs::read(p).unwrap();
    let hashes = c.kernel.as_ref().map(|(k, i, a)| {
        SevHashes::new(
            &read(k),
            i.as_deref().map(read).as_deref(),
            a.map(str::as_bytes),
        )
    });
    let sig = cpu_type_sig(c.cpu).unwrap();
    let plan = LaunchPlan::build(&LaunchInputs {
        firmware: &fw,
        hashes,
        vcpus: c.vcpus,
        vcpu_sig: sig,
        guest_features: c.features,
        vmm: VmmType::Qemu,
    })
    .unwrap();
    let mem = memory(&fw);
    let mut rec = Recorder::default();
    launch(
        &mut rec,
        &mem,
        &Launch {
            firmware: &fw,
            plan: &plan,
            policy: POLICY,
            guest_features: c.features,
            vcpu_sig: sig,
            vcpus: c.vcpus as usize,
            host_data: [0xab; 32],
            identity,
            cpuid_page: [0; PAGE_SIZE],
        },
    )
    .unwrap();

    let (vcpus, features) = (c.vcpus.to_string(), format!("{:#x}", c.features));
    let mut args = vec![
        "--ovmf",
        c.ovmf,
        "--vcpus",
        &vcpus,
        "--vcpu-type",
        c.cpu,
        "--guest-features",
        &features,
    ];
    let paths;
    if let Some((k, i, a)) = &c.kernel {
        paths = (
            k.to_str().unwrap().to_owned(),
            i.as_ref().map(|i| i.to_str().unwrap().to_owned()),
        );
        args.extend(["--kernel", &paths.0]);
        if let Some(i) = &paths.1 {
            args.extend(["--initrd", i]);
        }
        if let Some(a) = a {
            args.extend(["--append", a]);
        }
    }
    let predicted = measured(&args);
    (rec.digest(), predicted, rec)
}

/// Low RAM for the metadata sections, and the firmware's range below 4 GiB.
fn memory(fw: &Ovmf) -> GuestMemoryMmap {
    let len = fw.data().len();
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20), (GuestAddress(fw.gpa()), len)])
        .unwrap()
}

fn files(dir: &Path) -> (PathBuf, PathBuf) {
    let (k, i) = (dir.join("vmlinuz"), dir.join("initrd"));
    // Not a real kernel: the launch measures its hash, never its contents.
    std::fs::write(
        &k,
        (0..300_000u32)
            .map(|x| (x * 7 % 251) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    std::fs::write(&i, b"an initrd").unwrap();
    (k, i)
}

fn debian_ovmf() -> &'static str {
    if !Path::new(DEBIAN_OVMF).is_file() {
        panic!(
            "{DEBIAN_OVMF} is missing: install Debian's ovmf package (scripts/setup-host.sh does)"
        );
    }
    DEBIAN_OVMF
}

#[test]
fn the_recorded_launch_digest_is_what_cocoon_measure_predicts() {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, initrd) = files(dir.path());
    let configs = [
        Config {
            ovmf: debian_ovmf(),
            kernel: None,
            vcpus: 1,
            cpu: "EPYC-v4",
            features: 0x1,
        },
        Config {
            ovmf: debian_ovmf(),
            kernel: None,
            vcpus: 4,
            cpu: "EPYC-Milan",
            features: 0x1,
        },
        Config {
            ovmf: debian_ovmf(),
            kernel: None,
            vcpus: 2,
            cpu: "EPYC-Genoa",
            features: 0x21,
        },
        Config {
            ovmf: AMD_SEV_SUFFIX,
            kernel: Some((
                kernel.clone(),
                Some(initrd.clone()),
                Some("console=ttyS0 cocoon.tee=sev-snp"),
            )),
            vcpus: 2,
            cpu: "EPYC-Milan",
            features: 0x1,
        },
        Config {
            ovmf: AMD_SEV_SUFFIX,
            kernel: Some((kernel, None, None)),
            vcpus: 1,
            cpu: "EPYC",
            features: 0x1,
        },
    ];
    for c in &configs {
        let (recorded, predicted, rec) = launch_recorded(c);
        assert_eq!(
            recorded,
            predicted,
            "{} with {} vCPUs, kernel {}",
            c.ovmf,
            c.vcpus,
            c.kernel.is_some()
        );
        assert_eq!(rec.resets.len(), c.vcpus as usize);
        assert_eq!(
            rec.calls[..3],
            [
                format!("init {:#x}", c.features & !1),
                format!("vcpus {}", c.vcpus),
                format!("start {POLICY:#x}")
            ]
        );
        assert_eq!(rec.calls.last().unwrap(), "finish abababab");
    }
}

#[test]
fn the_firmware_goes_over_in_one_update_and_the_hashes_page_holds_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, initrd) = files(dir.path());
    let c = Config {
        ovmf: AMD_SEV_SUFFIX,
        kernel: Some((kernel.clone(), Some(initrd.clone()), Some("quiet"))),
        vcpus: 1,
        cpu: "EPYC",
        features: 0x1,
    };
    let (_, _, rec) = launch_recorded(&c);
    let fw = Ovmf::parse(std::fs::read(AMD_SEV_SUFFIX).unwrap()).unwrap();
    let pages = fw.data().len() / PAGE_SIZE;
    assert_eq!(
        rec.calls[3],
        format!("update {:#x} Normal x{pages}", fw.gpa())
    );
    // The kernel hashes page: the table the VMM wrote, at the offset OVMF reads it from.
    let table_gpa = u64::from(fw.hashes_table_gpa().unwrap());
    let page_gpa = table_gpa & !(PAGE_SIZE as u64 - 1);
    let (_, _, contents) = rec.pages.iter().find(|(_, g, _)| *g == page_gpa).unwrap();
    let table = SevHashes::new(
        &std::fs::read(&kernel).unwrap(),
        Some(b"an initrd"),
        Some(b"quiet"),
    )
    .table();
    let off = (table_gpa - page_gpa) as usize;
    assert_eq!(
        &contents.as_ref().unwrap()[off..off + table.len()],
        &table[..]
    );
}

#[test]
fn a_launch_the_vmm_cannot_place_is_refused() {
    let fw = Ovmf::parse(std::fs::read(debian_ovmf()).unwrap()).unwrap();
    let plan = LaunchPlan::build(&LaunchInputs {
        firmware: &fw,
        hashes: None,
        vcpus: 2,
        vcpu_sig: 0xa00f11,
        guest_features: 1,
        vmm: VmmType::Qemu,
    })
    .unwrap();
    let l = |vcpus| Launch {
        firmware: &fw,
        plan: &plan,
        policy: POLICY,
        guest_features: 1,
        vcpu_sig: 0xa00f11,
        vcpus,
        host_data: [0; 32],
        identity: None,
        cpuid_page: [0; PAGE_SIZE],
    };
    let e = launch(&mut Recorder::default(), &memory(&fw), &l(3)).unwrap_err();
    assert!(matches!(e, SnpError::Vcpus(3, 2)), "{e}");
    // Guest memory without the firmware's range.
    let low = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
    let mut rec = Recorder::default();
    let e = launch(&mut rec, &low, &l(2)).unwrap_err();
    assert!(e.to_string().contains(&format!("{:#x}", fw.gpa())), "{e}");
    assert!(
        rec.calls.is_empty(),
        "the firmware was called before the memory was placed"
    );
}

#[test]
fn the_cpuid_page_is_written_before_it_is_handed_over() {
    let fw = Ovmf::parse(std::fs::read(debian_ovmf()).unwrap()).unwrap();
    let plan = LaunchPlan::build(&LaunchInputs {
        firmware: &fw,
        hashes: None,
        vcpus: 1,
        vcpu_sig: 0xa00f11,
        guest_features: 1,
        vmm: VmmType::Qemu,
    })
    .unwrap();
    let entry = kvm_bindings::kvm_cpuid_entry2 {
        function: 0x8000_001f,
        eax: 0x1b,
        ..Default::default()
    };
    let page = cpuid_page::table(&[entry]).unwrap();
    let mem = memory(&fw);
    let mut rec = Recorder::default();
    let l = Launch {
        firmware: &fw,
        plan: &plan,
        policy: POLICY,
        guest_features: 1,
        vcpu_sig: 0xa00f11,
        vcpus: 1,
        host_data: [0; 32],
        identity: None,
        cpuid_page: page,
    };
    launch(&mut rec, &mem, &l).unwrap();
    let cpuid_gpa = plan
        .updates
        .iter()
        .find(|u| u.kind == PageType::Cpuid)
        .unwrap()
        .gpa;
    let mut got = [0u8; PAGE_SIZE];
    mem.read_slice(&mut got, GuestAddress(cpuid_gpa)).unwrap();
    assert_eq!(got, page);
}

#[test]
fn the_launch_through_kvm_on_this_host() {
    let Ok(k) = kvm_ioctls::Kvm::new() else {
        panic!("/dev/kvm cannot be opened");
    };
    match kvm::create_vm(&k) {
        Err(e) => {
            let e = e.to_string();
            assert!(e.contains("KVM_X86_SNP_VM"), "{e}");
            // And the SEV device, checked on its own.
            let vm = k.create_vm().unwrap();
            if !Path::new(kvm::SEV_DEVICE).exists() {
                let e = kvm::KvmSnp::new(&vm).err().unwrap().to_string();
                assert!(e.contains("/dev/sev"), "{e}");
            }
            eprintln!("SKIPPED: the hardware launch: {e}");
        }
        Ok(vm) => hardware_launch(&vm),
    }
}

/// Where SEV-SNP exists: the same launch, for real, into guest_memfd-backed memory.
fn hardware_launch(vm: &kvm_ioctls::VmFd) {
    let fw = Ovmf::parse(std::fs::read(debian_ovmf()).unwrap()).unwrap();
    let plan = LaunchPlan::build(&LaunchInputs {
        firmware: &fw,
        hashes: None,
        vcpus: 1,
        vcpu_sig: cpu_type_sig("EPYC-v4").unwrap(),
        guest_features: 1,
        vmm: VmmType::Qemu,
    })
    .unwrap();
    let mem = memory(&fw);
    let mut keep = Vec::new();
    for (slot, (gpa, len)) in [(0u64, 64usize << 20), (fw.gpa(), fw.data().len())]
        .into_iter()
        .enumerate()
    {
        let host = vm_memory::GuestMemoryBackend::get_slice(&mem, GuestAddress(gpa), len).unwrap();
        keep.push(kvm::add_private_memory(vm, slot as u32, gpa, host).unwrap());
    }
    let mut fw_kvm = kvm::KvmSnp::new(vm).unwrap();
    launch(
        &mut fw_kvm,
        &mem,
        &Launch {
            firmware: &fw,
            plan: &plan,
            policy: POLICY,
            guest_features: 1,
            vcpu_sig: cpu_type_sig("EPYC-v4").unwrap(),
            vcpus: 1,
            host_data: [0; 32],
            identity: None,
            cpuid_page: cpuid_page::table(&[]).unwrap(),
        },
    )
    .expect("the SNP launch on this host");
}

/// What the SEV firmware checks at SNP_LAUNCH_FINISH against an owner's ID block: the
/// launch digest in the block `cocoon measure snp-id-block` makes for a launch's
/// arguments must be the digest of what cocoon-vmm handed over, and the policy the
/// launch's. The block reaches the firmware with its author-key flag.
#[test]
fn an_owners_id_block_holds_the_digest_of_the_recorded_launch() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("id.pem");
    let made = std::process::Command::new("openssl")
        .args(["ecparam", "-name", "secp384r1", "-genkey", "-noout", "-out"])
        .arg(&key)
        .status()
        .expect("openssl (apt-get install openssl)");
    assert!(made.success(), "openssl ecparam");
    let c = Config {
        ovmf: debian_ovmf(),
        kernel: None,
        vcpus: 2,
        cpu: "EPYC-Milan",
        features: 0x1,
    };
    let argv = [
        "cocoon-measure",
        "snp-id-block",
        "--ovmf",
        c.ovmf,
        "--vcpus",
        "2",
        "--vcpu-type",
        c.cpu,
        "--id-key",
        key.to_str().unwrap(),
    ];
    let lines = run(&Cli::try_parse_from(argv).unwrap().cmd).unwrap();
    let field = |name: &str| {
        let b64 = lines
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} in {lines}"));
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64).unwrap()
    };
    let identity = SnpIdentity {
        block: field("id-block").try_into().unwrap(),
        auth: field("id-auth").into_boxed_slice().try_into().unwrap(),
        author_key: false,
    };
    let (recorded, predicted, rec) = launch_recorded_with(&c, Some(&identity));
    assert_eq!(recorded, predicted);
    let (block, author) = rec.identity.expect("SNP_LAUNCH_FINISH got no ID block");
    assert_eq!(
        hex::encode(&block[..48]),
        recorded,
        "the firmware would refuse this launch"
    );
    assert_eq!(&block[0x58..0x60], &POLICY.to_le_bytes());
    assert!(!author);
}
