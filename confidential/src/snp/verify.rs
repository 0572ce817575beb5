//! Verifying an SEV-SNP attestation report, as a relying party (or the key broker) does:
//! the VCEK that signed it must chain to AMD's root for the product (ARK → ASK → VCEK,
//! RSA-PSS, checked by the `sev` crate against the roots built into it), the report's
//! signature must verify over its raw signed bytes, and its contents must say what the
//! relying party expects: the launch measurement, the report data (the caller's nonce),
//! the host data (the init-data digest), a policy without debugging or a migration
//! agent, VMPL 0.
//!
//! The signature is checked here over the bytes as received, not over a re-serialized
//! parse: a field a parser drops would otherwise be free to change. Reserved bytes of the
//! signature must be zero for the same reason: a one-bit change anywhere in a report
//! fails it.

use p384::ecdsa::signature::hazmat::PrehashVerifier;
use sev::certs::snp::{builtin, ca, Certificate, Chain, Verifiable};
use sha2::{Digest, Sha384};

/// A report's size (ABI versions 2 to 5).
pub const REPORT_SIZE: usize = 0x4a0;
/// The bytes the signature covers.
const SIGNED: usize = 0x2a0;

/// What the relying party expects of a report. `None` leaves a field unchecked.
#[derive(Clone, Debug, Default)]
pub struct Expected {
    pub measurement: Option<[u8; 48]>,
    pub report_data: Option<[u8; 64]>,
    pub host_data: Option<[u8; 32]>,
    /// The digest of the owner's ID key the launch's ID block was signed with
    /// (`cocoon measure snp-id-block`); all zeros in a report of a launch without one.
    pub id_key_digest: Option<[u8; 48]>,
    /// The digest of the author key that signed the ID key.
    pub author_key_digest: Option<[u8; 48]>,
    /// Accept a guest whose policy allows debugging (never for a confidential pod).
    pub allow_debug: bool,
}

/// Why a report is not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("the report is {0} bytes, not {REPORT_SIZE}")]
    Size(usize),
    #[error("report version {0} is not one this verifier knows (2 to 5)")]
    Version(u32),
    #[error("the report's signature algorithm is {0}, not 1 (ECDSA P-384 with SHA-384)")]
    Algorithm(u32),
    #[error("the VCEK certificate cannot be parsed: {0}")]
    Certificate(String),
    #[error("the VCEK does not chain to a trusted root (AMD's for Milan, Genoa or Turin, unless the verifier was given others)")]
    Chain,
    #[error("the report's signature does not verify with the VCEK")]
    Signature,
    #[error("the VCEK lacks AMD's TCB extension {0} (1.3.6.1.4.1.3704.1.3.x)")]
    VcekTcbMissing(&'static str),
    #[error("the report claims {what} SPL {report}, its VCEK was issued for {vcek}")]
    VcekTcb {
        what: &'static str,
        report: u8,
        vcek: u8,
    },
    #[error("the report's CHIP_ID is not the hwID its VCEK was issued for")]
    ChipId,
    #[error("the report's signature has non-zero reserved bytes")]
    SignatureReserved,
    #[error("the guest policy {0:#x} allows debugging")]
    Debug(u64),
    #[error("the guest policy {0:#x} allows a migration agent")]
    MigrationAgent(u64),
    #[error("the guest policy {0:#x} has its must-be-one bit 17 clear")]
    PolicyReserved(u64),
    #[error("the report was requested at VMPL {0}, not 0")]
    Vmpl(u32),
    #[error("the launch measurement is {got}, expected {want}")]
    Measurement { got: String, want: String },
    #[error("the report data is {got}, expected {want}")]
    ReportData { got: String, want: String },
    #[error("the host data is {got}, expected {want}")]
    HostData { got: String, want: String },
    #[error("the ID key digest is {got}, expected {want}")]
    IdKey { got: String, want: String },
    #[error("the author key digest is {got}, expected {want}")]
    AuthorKey { got: String, want: String },
}

/// The fields of an accepted report a caller may want.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub version: u32,
    pub policy: u64,
    pub measurement: [u8; 48],
    pub report_data: [u8; 64],
    pub host_data: [u8; 32],
    pub chip_id: [u8; 64],
    /// The owner's ID block's FAMILY_ID and IMAGE_ID (zeros without one).
    pub family_id: [u8; 16],
    pub image_id: [u8; 16],
    pub id_key_digest: [u8; 48],
    pub author_key_digest: [u8; 48],
}

fn u32_at(r: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(r[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(r: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(r[at..at + 8].try_into().expect("8 bytes"))
}

fn array<const N: usize>(r: &[u8], at: usize) -> [u8; N] {
    r[at..at + N].try_into().expect("in bounds")
}

/// A VCEK whose chain to AMD's root has been checked (a verifier keeps these: the chain
/// costs three RSA-PSS 4096 verifications, and one chip signs many reports), with what
/// it was issued for: the chip (hwID) and the TCB (security patch levels). A report it
/// signs must claim that chip and that TCB, or an old VCEK would vouch for a newer TCB.
#[derive(Clone, Debug)]
pub struct Vcek {
    key: p384::ecdsa::VerifyingKey,
    hw_id: Option<Vec<u8>>,
    tcb: Tcb,
}

/// A VCEK's TCB: bootloader, TEE, SNP firmware and microcode SPLs, and Turin's FMC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Tcb {
    bootloader: Option<u8>,
    tee: Option<u8>,
    snp: Option<u8>,
    microcode: Option<u8>,
    fmc: Option<u8>,
}

/// AMD's VCEK extensions: the SPLs (INTEGERs) and the hwID (an OCTET STRING).
fn vcek_extensions(x509: &x509_cert::Certificate) -> Result<(Option<Vec<u8>>, Tcb), VerifyError> {
    let bad = |what: &str| VerifyError::Certificate(format!("its {what} extension is malformed"));
    let mut tcb = Tcb::default();
    let mut hw_id = None;
    for ext in x509.tbs_certificate.extensions.iter().flatten() {
        let oid = ext.extn_id.to_string();
        let v = ext.extn_value.as_bytes();
        let spl = || -> Result<u8, VerifyError> {
            // DER INTEGER 0..=255: one content byte, or 0x00 then one above 0x7f.
            match v {
                [0x02, 1, b] if *b < 0x80 => Ok(*b),
                [0x02, 2, 0, b] if *b >= 0x80 => Ok(*b),
                _ => Err(bad(&oid)),
            }
        };
        match oid.as_str() {
            "1.3.6.1.4.1.3704.1.3.1" => tcb.bootloader = Some(spl()?),
            "1.3.6.1.4.1.3704.1.3.2" => tcb.tee = Some(spl()?),
            "1.3.6.1.4.1.3704.1.3.3" => tcb.snp = Some(spl()?),
            "1.3.6.1.4.1.3704.1.3.8" => tcb.microcode = Some(spl()?),
            "1.3.6.1.4.1.3704.1.3.9" => tcb.fmc = Some(spl()?),
            "1.3.6.1.4.1.3704.1.4" => {
                hw_id = Some(match v {
                    [0x04, n, rest @ ..] if *n as usize == rest.len() => rest.to_vec(),
                    raw => raw.to_vec(),
                })
            }
            _ => {}
        }
    }
    for (name, spl) in [
        ("blSPL", tcb.bootloader),
        ("teeSPL", tcb.tee),
        ("snpSPL", tcb.snp),
        ("ucodeSPL", tcb.microcode),
    ] {
        if spl.is_none() {
            return Err(VerifyError::VcekTcbMissing(name));
        }
    }
    Ok((hw_id, tcb))
}

impl Vcek {
    /// Parses `der` and checks ARK (self-signed) → ASK → VCEK for one of the products
    /// whose roots are built in.
    pub fn new(der: &[u8]) -> Result<Vcek, VerifyError> {
        Vcek::chained_to(der, &amd_roots())
    }

    /// The same against roots the caller trusts instead of AMD's (a test's own chain,
    /// or a relying party pinning one product).
    pub fn chained_to(der: &[u8], roots: &[Roots]) -> Result<Vcek, VerifyError> {
        let cert =
            Certificate::from_der(der).map_err(|e| VerifyError::Certificate(e.to_string()))?;
        // The outer algorithm is outside what the ASK signs; RFC 5280 wants it equal to
        // the signed one, and a verifier that ignored it would accept altered bytes.
        let x509 = x509_cert::Certificate::from(cert.clone());
        if x509.signature_algorithm != x509.tbs_certificate.signature {
            return Err(VerifyError::Certificate(
                "its outer signature algorithm differs from the signed one".into(),
            ));
        }
        if !roots.iter().any(|r| r.signed(&cert)) {
            return Err(VerifyError::Chain);
        }
        let key = p384::ecdsa::VerifyingKey::from_sec1_bytes(cert.public_key_sec1())
            .map_err(|e| VerifyError::Certificate(format!("its key is not a P-384 point: {e}")))?;
        let (hw_id, tcb) = vcek_extensions(&x509)?;
        Ok(Vcek { key, hw_id, tcb })
    }
}

/// One product's ARK and ASK, the roots a VCEK chains to.
#[derive(Clone, Debug)]
pub struct Roots {
    ark: Certificate,
    ask: Certificate,
}

impl Roots {
    /// From DER certificates; the ARK must sign itself and the ASK.
    pub fn from_der(ark: &[u8], ask: &[u8]) -> Result<Roots, VerifyError> {
        let parse =
            |der| Certificate::from_der(der).map_err(|e| VerifyError::Certificate(e.to_string()));
        let roots = Roots {
            ark: parse(ark)?,
            ask: parse(ask)?,
        };
        let ca = ca::Chain {
            ark: roots.ark.clone(),
            ask: roots.ask.clone(),
        };
        (&ca).verify().map_err(|_| VerifyError::Chain)?;
        Ok(roots)
    }

    /// ARK (self-signed) → ASK → `vcek`.
    fn signed(&self, vcek: &Certificate) -> bool {
        let chain = Chain {
            ca: ca::Chain {
                ark: self.ark.clone(),
                ask: self.ask.clone(),
            },
            vek: vcek.clone(),
        };
        (&chain).verify().is_ok()
    }
}

/// AMD's roots for the products built into the `sev` crate (Milan, Genoa, Turin).
pub fn amd_roots() -> Vec<Roots> {
    type Root = fn() -> std::io::Result<Certificate>;
    let products: [(Root, Root); 3] = [
        (builtin::milan::ark, builtin::milan::ask),
        (builtin::genoa::ark, builtin::genoa::ask),
        (builtin::turin::ark, builtin::turin::ask),
    ];
    products
        .iter()
        .filter_map(|(ark, ask)| {
            Some(Roots {
                ark: ark().ok()?,
                ask: ask().ok()?,
            })
        })
        .collect()
}

/// Checks `report` (raw, as the guest's firmware wrote it) signed by the VCEK in
/// `vcek_der` against `expected`.
pub fn verify_report(
    report: &[u8],
    vcek_der: &[u8],
    expected: &Expected,
) -> Result<Verified, VerifyError> {
    verify_with(&Vcek::new(vcek_der)?, report, expected)
}

/// The same with a VCEK already checked.
pub fn verify_with(
    vcek: &Vcek,
    report: &[u8],
    expected: &Expected,
) -> Result<Verified, VerifyError> {
    if report.len() != REPORT_SIZE {
        return Err(VerifyError::Size(report.len()));
    }
    let version = u32_at(report, 0x00);
    if !(2..=5).contains(&version) {
        return Err(VerifyError::Version(version));
    }
    let algo = u32_at(report, 0x34);
    if algo != 1 {
        return Err(VerifyError::Algorithm(algo));
    }
    check_signature(report, &vcek.key)?;

    let policy = u64_at(report, 0x08);
    if policy & (1 << 17) == 0 {
        return Err(VerifyError::PolicyReserved(policy));
    }
    if policy & (1 << 19) != 0 && !expected.allow_debug {
        return Err(VerifyError::Debug(policy));
    }
    if policy & (1 << 18) != 0 {
        return Err(VerifyError::MigrationAgent(policy));
    }
    let vmpl = u32_at(report, 0x30);
    if vmpl != 0 {
        return Err(VerifyError::Vmpl(vmpl));
    }
    check_vcek_binding(vcek, report, version)?;
    let v = Verified {
        version,
        policy,
        report_data: array(report, 0x50),
        measurement: array(report, 0x90),
        host_data: array(report, 0xc0),
        chip_id: array(report, 0x1a0),
        family_id: array(report, 0x10),
        image_id: array(report, 0x20),
        id_key_digest: array(report, 0xe0),
        author_key_digest: array(report, 0x110),
    };
    fn same<const N: usize>(
        got: &[u8; N],
        want: &Option<[u8; N]>,
        err: fn(String, String) -> VerifyError,
    ) -> Result<(), VerifyError> {
        match want {
            Some(w) if w != got => Err(err(hex::encode(got), hex::encode(w))),
            _ => Ok(()),
        }
    }
    same(&v.measurement, &expected.measurement, |got, want| {
        VerifyError::Measurement { got, want }
    })?;
    same(&v.report_data, &expected.report_data, |got, want| {
        VerifyError::ReportData { got, want }
    })?;
    same(&v.host_data, &expected.host_data, |got, want| {
        VerifyError::HostData { got, want }
    })?;
    same(&v.id_key_digest, &expected.id_key_digest, |got, want| {
        VerifyError::IdKey { got, want }
    })?;
    same(
        &v.author_key_digest,
        &expected.author_key_digest,
        |got, want| VerifyError::AuthorKey { got, want },
    )?;
    Ok(v)
}

/// The report must claim the chip and the TCB its VCEK was issued for. REPORTED_TCB
/// (0x180) is bootloader, TEE, 4 reserved, SNP, microcode on Milan and Genoa; Turin
/// (family 0x1A, named in reports of version 3 and later) puts FMC first: FMC,
/// bootloader, TEE, SNP, 3 reserved, microcode. A CHIP_ID of zeros is a guest policy's
/// MASK_CHIP_ID and is not compared.
fn check_vcek_binding(vcek: &Vcek, report: &[u8], version: u32) -> Result<(), VerifyError> {
    let t = &report[0x180..0x188];
    let turin = version >= 3 && report[0x188] == 0x1a;
    let claimed = if turin {
        [
            ("FMC", t[0], vcek.tcb.fmc),
            ("bootloader", t[1], vcek.tcb.bootloader),
            ("TEE", t[2], vcek.tcb.tee),
            ("SNP", t[3], vcek.tcb.snp),
            ("microcode", t[7], vcek.tcb.microcode),
        ]
    } else {
        [
            ("FMC", 0, None),
            ("bootloader", t[0], vcek.tcb.bootloader),
            ("TEE", t[1], vcek.tcb.tee),
            ("SNP", t[6], vcek.tcb.snp),
            ("microcode", t[7], vcek.tcb.microcode),
        ]
    };
    for (what, report, vcek) in claimed {
        if let Some(vcek) = vcek {
            if report != vcek {
                return Err(VerifyError::VcekTcb { what, report, vcek });
            }
        }
    }
    let chip = &report[0x1a0..0x1e0];
    if let Some(hw_id) = &vcek.hw_id {
        let n = hw_id.len().min(64);
        if chip.iter().any(|b| *b != 0) && chip[..n] != hw_id[..n] {
            return Err(VerifyError::ChipId);
        }
    }
    Ok(())
}

/// ECDSA P-384 over SHA-384 of the signed bytes. R and S are stored little-endian in
/// 72-byte fields; only the low 48 bytes may be non-zero, and the rest of the signature
/// area is reserved (zero).
fn check_signature(report: &[u8], key: &p384::ecdsa::VerifyingKey) -> Result<(), VerifyError> {
    let sig = &report[SIGNED..];
    let (r, s) = (&sig[..72], &sig[72..144]);
    if r[48..]
        .iter()
        .chain(&s[48..])
        .chain(&sig[144..])
        .any(|b| *b != 0)
    {
        return Err(VerifyError::SignatureReserved);
    }
    let be = |le: &[u8]| -> [u8; 48] {
        let mut b: [u8; 48] = le[..48].try_into().expect("48 bytes");
        b.reverse();
        b
    };
    let signature =
        p384::ecdsa::Signature::from_scalars(be(r), be(s)).map_err(|_| VerifyError::Signature)?;
    let digest = Sha384::digest(&report[..SIGNED]);
    key.verify_prehash(&digest, &signature)
        .map_err(|_| VerifyError::Signature)
}
