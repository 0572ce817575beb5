//! `cocoon measure snp` against the reference, `sev-snp-measure` 0.0.13 (PyPI, installed
//! by scripts/setup-host.sh into Cocoon's cache): the same digest on Debian's OVMF images,
//! on a direct-boot firmware with a kernel hashes section, and on generated firmware
//! images with random SEV metadata and random launch inputs; and a failure wherever the
//! reference fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const REFERENCE_VERSION: &str = "0.0.13";

/// A missing prerequisite fails the test under CI and skips it (saying so) elsewhere.
fn missing(what: &str) -> bool {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{what} (scripts/setup-host.sh installs it)");
    }
    eprintln!("SKIPPED: {what}");
    true
}

fn reference() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("COCOON_SEV_SNP_MEASURE") {
        return Some(PathBuf::from(p));
    }
    let cache = std::env::var_os("COCOON_CACHE_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| nix_is_root().then(|| PathBuf::from("/var/lib/cocoon")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/cocoon")))?;
    let tool = cache
        .join("venv")
        .join(format!("sev-snp-measure-{REFERENCE_VERSION}"))
        .join("bin/sev-snp-measure");
    tool.is_file().then_some(tool)
}

fn nix_is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// `cocoon measure`.
fn cocoon() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cocoon"));
    c.arg("measure");
    c
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../confidential/tests/fixtures")
        .join(name)
}

fn show(o: &Output) -> String {
    format!(
        "exit {:?}, stdout {:?}, stderr {:?}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs both on `args` (the reference's spelling; ours takes the same flags) and
/// asserts they agree: the same digest, or both refusing.
fn agree(reference: &Path, args: &[String]) -> Option<String> {
    let r = Command::new(reference)
        .args(["--mode", "snp"])
        .args(args)
        .output()
        .expect("run sev-snp-measure");
    let c = cocoon()
        .arg("snp")
        .args(args)
        .output()
        .expect("run cocoon measure");
    if r.status.success() {
        assert!(
            c.status.success() && c.stdout == r.stdout,
            "for {args:?}\nreference: {}\ncocoon: {}",
            show(&r),
            show(&c)
        );
        Some(String::from_utf8_lossy(&c.stdout).trim().to_owned())
    } else {
        assert!(
            !c.status.success() && !c.stderr.is_empty() && c.stdout.is_empty(),
            "the reference refused {args:?} but cocoon did not:\nreference: {}\ncocoon: {}",
            show(&r),
            show(&c)
        );
        None
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

#[test]
fn matches_the_reference_on_real_firmware() {
    let Some(reference) = reference() else {
        missing("sev-snp-measure (the reference) is not installed");
        return;
    };
    let debian = Path::new("/usr/share/ovmf/OVMF.fd");
    if !debian.is_file() && missing("Debian's OVMF.fd (package ovmf) is not installed") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinuz");
    let initrd = dir.path().join("initrd");
    std::fs::write(&kernel, b"a kernel, as far as the hashes care".repeat(1000)).unwrap();
    std::fs::write(&initrd, b"an initrd".repeat(333)).unwrap();
    let (d, k, i) = (
        debian.to_str().unwrap(),
        kernel.to_str().unwrap(),
        initrd.to_str().unwrap(),
    );
    let amd_sev = fixture("ovmf_AmdSev_suffix.bin");
    let a = amd_sev.to_str().unwrap();
    let code = "/usr/share/OVMF/OVMF_CODE.fd";
    let code_4m = "/usr/share/OVMF/OVMF_CODE_4M.fd";
    // Placeholders: D Debian's OVMF.fd, C its 2 MB OVMF_CODE, A the AmdSev firmware with
    // a kernel hashes section, K a kernel, I an initrd; `--append` takes the rest.
    let case = |line: &str| -> Vec<String> {
        let (flags, append) = line.split_once(" --append ").unwrap_or((line, ""));
        let mut v: Vec<String> = flags
            .split_whitespace()
            .map(|w| match w {
                "D" => d.to_owned(),
                "C" => code.to_owned(),
                "A" => a.to_owned(),
                "K" => k.to_owned(),
                "I" => i.to_owned(),
                w => w.to_owned(),
            })
            .collect();
        if !append.is_empty() {
            v.extend(["--append".to_owned(), append.to_owned()]);
        }
        v
    };
    let cases = [
        "--ovmf D --vcpus 1 --vcpu-type EPYC-v4",
        "--ovmf D --vcpus 4 --vcpu-type EPYC-Milan",
        "--ovmf D --vcpus 2 --vcpu-type EPYC-Genoa --guest-features 0x21",
        "--ovmf D --vcpus 3 --vcpu-sig 0xa10f11 --output-format base64",
        "--ovmf D --vcpus 2 --vcpu-family 25 --vcpu-model 17 --vcpu-stepping 1",
        "--ovmf D --vcpus 8 --vmm-type gce",
        "--ovmf D --vcpus 2 --vmm-type ec2",
        "--ovmf C --vcpus 1 --vcpu-type EPYC-Rome",
        "--ovmf C --vcpus 2 --vcpu-type EPYC-Turin --guest-features 0",
        // Direct boot: kernel, initrd and command line hashes in the measured page.
        "--ovmf A --vcpus 1 --vcpu-type EPYC-Milan --kernel K",
        "--ovmf A --vcpus 2 --vcpu-type EPYC-Milan --kernel K --initrd I --append console=ttyS0 quiet panic=-1",
        "--ovmf A --vcpus 4 --vmm-type gce --kernel K --append é ü",
        "--ovmf A --vcpus 2 --vmm-type ec2 --kernel K --initrd I",
        // Refusals: a kernel for firmware that cannot check one; no signature for QEMU.
        "--ovmf D --vcpus 1 --vcpu-type EPYC --kernel K",
        "--ovmf D --vcpus 1",
    ];
    let mut digests = Vec::new();
    for line in cases {
        if let Some(dg) = agree(&reference, &case(line)) {
            digests.push(dg);
        }
    }
    assert_eq!(
        digests.len(),
        cases.len() - 2,
        "the refusals are the last two"
    );
    // Distinct inputs, distinct digests.
    let mut unique = digests.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), digests.len(), "{digests:?}");

    // Firmware without SEV metadata (Debian's 4 MB OVMF_CODE) cannot launch an SNP guest:
    // the reference still prints a digest, Cocoon refuses and says why.
    let no_metadata = cocoon()
        .args([
            "snp",
            "--ovmf",
            code_4m,
            "--vcpus",
            "2",
            "--vcpu-type",
            "EPYC-Turin",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&no_metadata.stderr);
    assert!(
        !no_metadata.status.success()
            && err.contains("OVMF_CODE_4M.fd: the firmware has no SEV metadata"),
        "{}",
        show(&no_metadata)
    );
    // A missing file is named.
    let gone = cocoon()
        .args([
            "snp",
            "--ovmf",
            "/nonexistent.fd",
            "--vcpus",
            "1",
            "--vcpu-type",
            "EPYC",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains("cannot read /nonexistent.fd"),
        "{}",
        show(&gone)
    );

    // The precomputed firmware digest: the reference's equals ours, and either as a
    // seed gives the full digest.
    let ours = cocoon()
        .args(["snp-ovmf-hash", "--ovmf", d])
        .output()
        .unwrap();
    let theirs = Command::new(&reference)
        .args(["--mode", "snp:ovmf-hash", "--ovmf", d])
        .output()
        .unwrap();
    assert!(ours.status.success(), "{}", show(&ours));
    assert_eq!(ours.stdout, theirs.stdout);
    let seed = String::from_utf8_lossy(&ours.stdout).trim().to_owned();
    let with_seed = strings(&[
        "--ovmf",
        d,
        "--vcpus",
        "4",
        "--vcpu-type",
        "EPYC-Milan",
        "--snp-ovmf-hash",
        &seed,
    ]);
    assert_eq!(agree(&reference, &with_seed).as_ref(), Some(&digests[1]));
}

/// A tiny deterministic generator (xorshift64*): the cases are the same on every run;
/// `COCOON_MEASURE_SEED` explores others.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    /// `min` to `min + spread - 1` random bytes.
    fn blob(&mut self, min: usize, spread: u64) -> Vec<u8> {
        let n = min + self.below(spread) as usize;
        self.bytes(n)
    }
}

fn guid_le(s: &str) -> Vec<u8> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    let raw: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let mut le = raw.clone();
    le[..4].reverse();
    le[4..6].reverse();
    le[6..8].reverse();
    le
}

/// A firmware image with a footer table and SEV metadata, its sizes and places random
/// (sometimes out of bounds, to see both refuse).
fn random_firmware(rng: &mut Rng) -> Vec<u8> {
    let pages = 2 + rng.below(30) as usize;
    let mut data = rng.bytes(pages * 4096);
    let len = data.len();
    let kinds = [1u32, 2, 3, 4, 0x10];
    let n = rng.below(7) as usize;
    let mut meta = b"ASEV".to_vec();
    meta.extend_from_slice(&(16 + 12 * n as u32).to_le_bytes());
    meta.extend_from_slice(&1u32.to_le_bytes());
    meta.extend_from_slice(&(n as u32).to_le_bytes());
    for _ in 0..n {
        let kind = kinds[rng.below(kinds.len() as u64) as usize];
        let gpa = (rng.below(0x10_0000) as u32) << 12;
        let size = if rng.chance(5) {
            0x800
        } else if kind == 0x10 && rng.chance(80) {
            0x1000
        } else {
            ((1 + rng.below(4)) as u32) << 12
        };
        for v in [gpa, size, kind] {
            meta.extend_from_slice(&v.to_le_bytes());
        }
    }
    // The metadata somewhere in the first half, 16-aligned.
    let meta_at = 16 * rng.below((len / 2 / 16) as u64) as usize;
    data[meta_at..meta_at + meta.len()].copy_from_slice(&meta);
    let mut table = Vec::new();
    let mut entry = |guid: &str, payload: &[u8]| {
        table.extend_from_slice(payload);
        table.extend_from_slice(&((payload.len() + 18) as u16).to_le_bytes());
        table.extend_from_slice(&guid_le(guid));
    };
    entry(
        "dc886566-984a-4798-a75e-5585a7bf67cc",
        &((len - meta_at) as u32).to_le_bytes(),
    );
    let eip: u32 = if rng.chance(10) {
        0
    } else {
        0xff00_0000 | (rng.below(0xff_ffff) as u32 & !0xf)
    };
    entry("00f771de-1a7e-4fcb-890e-68c77e2fb44e", &eip.to_le_bytes());
    let table_page = (rng.below(0x10_0000) as u32) << 12;
    let table_off = if rng.chance(10) {
        4000
    } else {
        16 * rng.below((4096 - 176) / 16 + 1) as u32
    };
    entry(
        "7255371f-3a3b-4b04-927b-1da6efa8d454",
        &[
            (table_page | table_off).to_le_bytes(),
            0x400u32.to_le_bytes(),
        ]
        .concat(),
    );
    // Unknown entries are skipped by both.
    let noise = rng.blob(0, 9);
    entry("11111111-2222-3333-4444-555555555555", &noise);
    table.extend_from_slice(&((table.len() + 18) as u16).to_le_bytes());
    table.extend_from_slice(&guid_le("96b582de-1fb2-45f7-baea-a366c55a082d"));
    let end = len - 32;
    data[end - table.len()..end].copy_from_slice(&table);
    data
}

#[test]
fn matches_the_reference_on_generated_firmware_and_inputs() {
    let Some(reference) = reference() else {
        missing("sev-snp-measure (the reference) is not installed");
        return;
    };
    let seed = std::env::var("COCOON_MEASURE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_c0c0_0000_0001u64);
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let types = [
        "EPYC",
        "EPYC-v4",
        "EPYC-Rome",
        "EPYC-Milan-v2",
        "EPYC-Genoa",
        "EPYC-Turin",
    ];
    let (mut measured, mut refused) = (0, 0);
    for case in 0..40 {
        let fw = dir.path().join(format!("fw{case}.fd"));
        std::fs::write(&fw, random_firmware(&mut rng)).unwrap();
        let mut args = strings(&["--ovmf", fw.to_str().unwrap()]);
        args.extend(strings(&["--vcpus", &(1 + rng.below(8)).to_string()]));
        match rng.below(4) {
            0 => args.extend(strings(&["--vcpu-type", types[rng.below(6) as usize]])),
            1 => args.extend(strings(&[
                "--vcpu-sig",
                &format!("{:#x}", rng.below(1 << 32)),
            ])),
            2 => args.extend(strings(&[
                "--vcpu-family",
                &(1 + rng.below(40)).to_string(),
                "--vcpu-model",
                &rng.below(256).to_string(),
                "--vcpu-stepping",
                &rng.below(16).to_string(),
            ])),
            _ => {}
        }
        match rng.below(4) {
            0 => args.extend(strings(&["--vmm-type", "gce"])),
            1 => args.extend(strings(&["--vmm-type", "ec2"])),
            _ => {}
        }
        if rng.chance(50) {
            args.extend(strings(&[
                "--guest-features",
                &format!("{:#x}", rng.next()),
            ]));
        }
        if rng.chance(60) {
            let k = dir.path().join(format!("k{case}"));
            std::fs::write(&k, rng.blob(1, 20000)).unwrap();
            args.extend(strings(&["--kernel", k.to_str().unwrap()]));
            if rng.chance(50) {
                let i = dir.path().join(format!("i{case}"));
                std::fs::write(&i, rng.blob(0, 20000)).unwrap();
                args.extend(strings(&["--initrd", i.to_str().unwrap()]));
            }
            if rng.chance(70) {
                let line: String = (0..rng.below(60))
                    .map(|_| (b' ' + rng.below(95) as u8) as char)
                    .collect();
                args.push(format!("--append={line}"));
            }
        }
        if rng.chance(30) {
            args.extend(strings(&["--output-format", "base64"]));
        }
        match agree(&reference, &args) {
            Some(_) => measured += 1,
            None => refused += 1,
        }
    }
    // The generator must exercise both outcomes, or it tests less than it claims.
    assert!(
        measured >= 10 && refused >= 3,
        "measured {measured}, refused {refused}"
    );
}

/// `cocoon measure tdx`: no reference tool runs here (virtee/tdx-measure's model was
/// checked against it by hand once: docs/confidential.md), so this checks the command:
/// it prints MRTD alone, the library's, for Debian's TDVF, and refuses firmware without
/// TDX metadata, naming the file.
#[test]
fn measure_tdx_prints_mrtd_or_names_the_firmware() {
    let debian = Path::new("/usr/share/ovmf/OVMF.fd");
    if !debian.is_file() && missing("Debian's OVMF.fd (package ovmf) is not installed") {
        return;
    }
    let out = cocoon()
        .args(["tdx", "--ovmf"])
        .arg(debian)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let fw = cocoon_confidential::tdx::tdvf::Tdvf::parse(std::fs::read(debian).unwrap()).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}\n", hex::encode(fw.mrtd()))
    );

    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.fd");
    std::fs::write(&plain, vec![0u8; 8192]).unwrap();
    let out = cocoon()
        .args(["tdx", "--ovmf"])
        .arg(&plain)
        .output()
        .unwrap();
    assert!(
        !out.status.success() && out.stdout.is_empty(),
        "{}",
        show(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("plain.fd") && err.contains("not TDVF"),
        "{err}"
    );
}

/// A small PE32+ image with one section: what `--kernel` takes (an EFI-stub kernel).
fn tiny_pe() -> Vec<u8> {
    let mut d = vec![0u8; 0x1000];
    d[..2].copy_from_slice(b"MZ");
    d[0x3c] = 0x40;
    d[0x40..0x44].copy_from_slice(b"PE\0\0");
    let (coff, opt) = (0x44, 0x44 + 20);
    d[coff + 2] = 1; // one section
    d[coff + 16] = 240; // the optional header's size
    d[opt..opt + 2].copy_from_slice(&0x20bu16.to_le_bytes());
    d[opt + 60..opt + 64].copy_from_slice(&0x200u32.to_le_bytes()); // SizeOfHeaders
    d[opt + 108] = 16; // NumberOfRvaAndSizes
    let section = opt + 240;
    d[section + 16..section + 20].copy_from_slice(&0xe00u32.to_le_bytes());
    d[section + 20..section + 24].copy_from_slice(&0x200u32.to_le_bytes());
    d[0x200..].fill(0xcc);
    // A Linux setup header (boot protocol 2.15, loaded high) for QEMU's patch.
    d[0x202..0x206].copy_from_slice(b"HdrS");
    d[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
    d[0x211] = 0x01;
    d[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    d[0x236..0x238].fill(0);
    d
}

/// `cocoon measure tdx` with a direct boot: MRTD, RTMR1 and RTMR2 as labelled lines,
/// the library's (checked by hand in `confidential::tdx::rtmr`, and against
/// virtee/tdx-measure's model once, see docs/confidential.md); the setup header patch
/// changes RTMR1 alone; a kernel that is not a PE image is named.
#[test]
fn measure_tdx_with_a_direct_boot_prints_rtmr1_and_rtmr2() {
    use cocoon_confidential::tdx::rtmr;
    let debian = Path::new("/usr/share/ovmf/OVMF.fd");
    if !debian.is_file() && missing("Debian's OVMF.fd (package ovmf) is not installed") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (kernel, initrd) = (dir.path().join("vmlinuz"), dir.path().join("initrd"));
    std::fs::write(&kernel, tiny_pe()).unwrap();
    std::fs::write(&initrd, b"an initramfs").unwrap();
    let run = |extra: &[&str]| {
        let out = cocoon()
            .args(["tdx", "--ovmf"])
            .arg(debian)
            .arg("--kernel")
            .arg(&kernel)
            .arg("--initrd")
            .arg(&initrd)
            .args(["--append", "console=hvc0 -v"])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", show(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    let fw = cocoon_confidential::tdx::tdvf::Tdvf::parse(std::fs::read(debian).unwrap()).unwrap();
    let rtmr2 = hex::encode(rtmr::rtmr2("console=hvc0 -v", b"an initramfs").unwrap());
    let as_is = hex::encode(rtmr::rtmr1(&tiny_pe(), 12, rtmr::Kernel::AsIs).unwrap());
    assert_eq!(
        run(&[]),
        format!(
            "MRTD: {}\nRTMR1: {as_is}\nRTMR2: {rtmr2}\n",
            hex::encode(fw.mrtd())
        )
    );
    let patched = run(&["--patched-setup-header-memory-mib", "2048"]);
    assert!(
        patched.contains(&rtmr2) && !patched.contains(&as_is),
        "{patched}"
    );

    let out = cocoon()
        .args(["tdx", "--ovmf"])
        .arg(debian)
        .arg("--kernel")
        .arg(&initrd)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--append", ""])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("initrd") && err.contains("not a PE/COFF"),
        "{}",
        show(&out)
    );
}

/// A DER ECDSA-Sig-Value from a little-endian 72-byte R and S, as OpenSSL reads it.
fn der_signature(r_le: &[u8], s_le: &[u8]) -> Vec<u8> {
    let int = |le: &[u8]| {
        let mut be: Vec<u8> = le.iter().rev().copied().skip_while(|&b| b == 0).collect();
        if be.first().is_some_and(|&b| b & 0x80 != 0) {
            be.insert(0, 0);
        }
        let mut out = vec![0x02, be.len() as u8];
        out.extend(be);
        out
    };
    let body = [int(r_le), int(s_le)].concat();
    let mut out = vec![0x30, body.len() as u8];
    out.extend(body);
    out
}

/// `openssl dgst -sha384 -verify`: whether `sig` signs `data` under the key in `key_pem`.
fn openssl_verifies(dir: &Path, key_pem: &Path, data: &[u8], sig: &[u8]) -> bool {
    let (pubkey, data_f, sig_f) = (dir.join("pub.pem"), dir.join("data"), dir.join("sig"));
    let ok = Command::new("openssl")
        .args(["ec", "-pubout", "-in"])
        .arg(key_pem)
        .arg("-out")
        .arg(&pubkey)
        .output()
        .unwrap()
        .status
        .success();
    assert!(ok, "openssl ec -pubout");
    std::fs::write(&data_f, data).unwrap();
    std::fs::write(&sig_f, sig).unwrap();
    let out = Command::new("openssl")
        .args(["dgst", "-sha384", "-verify"])
        .arg(&pubkey)
        .arg("-signature")
        .arg(&sig_f)
        .arg(&data_f)
        .output()
        .unwrap();
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Verified OK")
}

/// The ABI's public key structure for an OpenSSL key, built from OpenSSL's own output
/// (the uncompressed point ending its SubjectPublicKeyInfo).
fn openssl_key_structure(key_pem: &Path) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(["ec", "-pubout", "-outform", "DER", "-in"])
        .arg(key_pem)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let point = &out.stdout[out.stdout.len() - 97..];
    assert_eq!(point[0], 4, "an uncompressed point");
    let mut s = 2u32.to_le_bytes().to_vec();
    for coordinate in [&point[1..49], &point[49..97]] {
        s.extend(coordinate.iter().rev());
        s.extend([0u8; 24]);
    }
    s.resize(0x404, 0);
    s
}

/// `cocoon measure snp-id-block`, checked with OpenSSL as the SEV firmware would check
/// it: the ID block holds the launch digest `cocoon measure snp` prints and the ids, SVN
/// and policy asked for; OpenSSL verifies its signature under the ID key and the ID key's
/// under the author key (both made by OpenSSL, in its two PEM formats); the key digests
/// are SHA-384 of the keys as the ABI lays them out. A changed block fails OpenSSL.
#[test]
fn an_id_block_verifies_with_openssl_as_the_firmware_would() {
    use base64::Engine;
    use sha2::Digest;
    let debian = Path::new("/usr/share/ovmf/OVMF.fd");
    if !debian.is_file() && missing("Debian's OVMF.fd (package ovmf) is not installed") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (id_key, author_key) = (dir.path().join("id.pem"), dir.path().join("author.pem"));
    for (args, out) in [
        (
            &["ecparam", "-name", "secp384r1", "-genkey", "-noout", "-out"][..],
            &id_key,
        ),
        (
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-384",
                "-out",
            ][..],
            &author_key,
        ),
    ] {
        let o = Command::new("openssl")
            .args(args)
            .arg(out)
            .output()
            .unwrap();
        assert!(o.status.success(), "openssl: {}", show(&o));
    }
    let launch = [
        "--ovmf",
        "/usr/share/ovmf/OVMF.fd",
        "--vcpus",
        "2",
        "--vcpu-type",
        "EPYC-v4",
    ];
    let digest = cocoon().arg("snp").args(launch).output().unwrap();
    assert!(digest.status.success(), "{}", show(&digest));
    let out = cocoon()
        .arg("snp-id-block")
        .args(launch)
        .arg("--id-key")
        .arg(&id_key)
        .arg("--author-key")
        .arg(&author_key)
        .args(["--family-id", "0102030405060708090a0b0c0d0e0f10"])
        .args(["--guest-svn", "3"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .to_owned()
    };
    let b64 = |s: String| base64::engine::general_purpose::STANDARD.decode(s).unwrap();
    let (block, auth) = (b64(field("id-block")), b64(field("id-auth")));
    assert_eq!((block.len(), auth.len()), (96, 4096));
    assert_eq!(
        hex::encode(&block[..48]),
        String::from_utf8_lossy(&digest.stdout).trim()
    );
    assert_eq!(
        hex::encode(&block[48..64]),
        "0102030405060708090a0b0c0d0e0f10"
    );
    assert_eq!(
        &block[80..96],
        &[1, 0, 0, 0, 3, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0]
    );

    let id_structure = openssl_key_structure(&id_key);
    assert_eq!(
        &auth[0x240..0x644],
        &id_structure[..],
        "the ID key as the ABI lays it out"
    );
    assert_eq!(
        field("id-key-digest"),
        hex::encode(sha2::Sha384::digest(&id_structure))
    );
    assert_eq!(
        field("author-key-digest"),
        hex::encode(sha2::Sha384::digest(openssl_key_structure(&author_key)))
    );
    let block_sig = der_signature(&auth[0x40..0x88], &auth[0x88..0xd0]);
    assert!(openssl_verifies(dir.path(), &id_key, &block, &block_sig));
    let key_sig = der_signature(&auth[0x680..0x6c8], &auth[0x6c8..0x710]);
    assert!(openssl_verifies(
        dir.path(),
        &author_key,
        &id_structure,
        &key_sig
    ));
    let mut changed = block.clone();
    changed[0x54] ^= 1; // another SVN
    assert!(!openssl_verifies(dir.path(), &id_key, &changed, &block_sig));
}
