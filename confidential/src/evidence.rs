//! The guest's own hardware evidence, and what the agent checks in it before it trusts
//! the host with anything: that the init-data the host handed over is the one the launch
//! measured (HOST_DATA on SEV-SNP, MRCONFIGID on TDX), and that the report is fresh (its
//! REPORT_DATA is what the agent asked for).
//!
//! Evidence comes from the kernel's configfs-tsm interface (Linux 6.7+, the
//! `TSM_REPORTS` option of Cocoon's kernel): make an entry under
//! `/sys/kernel/config/tsm/report`, write 64 bytes of report data to `inblob`, read the
//! report (SEV-SNP) or quote (TDX) from `outblob`. `generation` counts writes to the entry,
//! so a reader sees when another writer got in between. Signatures are not checked here:
//! the guest cannot check its own hardware's signature meaningfully; a relying party does
//! (`snp::verify`, `tdx::verify`).

use std::path::{Path, PathBuf};

use crate::initdata::InitData;

/// Where the kernel's configfs-tsm reports live.
pub const TSM_REPORT_ROOT: &str = "/sys/kernel/config/tsm/report";

/// The trusted execution environments the agent knows evidence of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tee {
    SevSnp,
    Tdx,
}

impl Tee {
    /// The guest command line's name for it (`cocoon.tee=`), also the pod annotation's.
    pub fn parse(name: &str) -> Option<Tee> {
        match name {
            "sev-snp" => Some(Tee::SevSnp),
            "tdx" => Some(Tee::Tdx),
            _ => None,
        }
    }

    /// configfs-tsm's `provider` for it.
    fn provider(self) -> &'static str {
        match self {
            Tee::SevSnp => "sev_guest",
            Tee::Tdx => "tdx_guest",
        }
    }

    /// Where in the evidence the launch-bound config digest and the report data sit:
    /// `(config offset, config length, report data offset)`. SEV-SNP: the attestation
    /// report (HOST_DATA at 0xC0, REPORT_DATA at 0x50). TDX: a v4 quote, whose TD report
    /// body follows the 48-byte header (MRCONFIGID at body offset 184, REPORTDATA at 520).
    fn layout(self) -> (usize, usize, usize) {
        match self {
            Tee::SevSnp => (0xC0, 32, 0x50),
            Tee::Tdx => (48 + 184, 48, 48 + 520),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EvidenceError {
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the evidence comes from {got:?}, not {want:?}: the launch was not what the guest was told"
    )]
    Provider { got: String, want: &'static str },
    #[error("another writer used the report entry meanwhile (generation {before} -> {after})")]
    Raced { before: u64, after: u64 },
    #[error("the evidence is {0} bytes, too short to hold its fields")]
    Short(usize),
    #[error(
        "the evidence's report data is not what the agent asked for: a stale or replayed report"
    )]
    ReportData,
    #[error(
        "the init-data the host gave ({given}) is not the one the launch measured ({measured})"
    )]
    Mismatch { given: String, measured: String },
    #[error("a nonce of {0} bytes: at most {MAX_NONCE} are bound into evidence")]
    NonceTooLong(usize),
}

/// One report read through configfs-tsm.
#[derive(Debug, Clone)]
pub struct TsmReport {
    pub provider: String,
    pub evidence: Vec<u8>,
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> EvidenceError {
    let path = path.to_owned();
    move |source| EvidenceError::Io { what, path, source }
}

fn generation(entry: &Path) -> Result<u64, EvidenceError> {
    let path = entry.join("generation");
    let text = std::fs::read_to_string(&path).map_err(io("read", &path))?;
    Ok(text.trim().parse().unwrap_or(0))
}

/// Asks the kernel for a report carrying `report_data`, through the entry `name` under
/// `root` (made if missing, removed after).
pub fn tsm_report(
    root: &Path,
    name: &str,
    report_data: &[u8; 64],
) -> Result<TsmReport, EvidenceError> {
    tsm_report_with_aux(root, name, report_data).map(|(report, _)| report)
}

/// The same, with the provider's auxiliary blob when it has one: for SEV-SNP the
/// certificate table of an extended report (the VCEK the host's firmware holds,
/// `snp::certs`). The host fills that table: a verifier checks the VCEK's chain, the
/// guest does not trust it.
pub fn tsm_report_with_aux(
    root: &Path,
    name: &str,
    report_data: &[u8; 64],
) -> Result<(TsmReport, Option<Vec<u8>>), EvidenceError> {
    let entry = root.join(name);
    match std::fs::create_dir(&entry) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("make the report entry", &entry)(e)),
    }
    let result = (|| {
        let before = generation(&entry)?;
        let inblob = entry.join("inblob");
        std::fs::write(&inblob, report_data).map_err(io("write", &inblob))?;
        let outblob = entry.join("outblob");
        let evidence = std::fs::read(&outblob).map_err(io("read", &outblob))?;
        let auxblob = entry.join("auxblob");
        let aux = match std::fs::read(&auxblob) {
            Ok(aux) if !aux.is_empty() => Some(aux),
            Ok(_) => None,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io("read", &auxblob)(e)),
        };
        let provider_path = entry.join("provider");
        let provider = std::fs::read_to_string(&provider_path)
            .map_err(io("read", &provider_path))?
            .trim()
            .to_owned();
        uncontended(before, generation(&entry)?)?;
        Ok((TsmReport { provider, evidence }, aux))
    })();
    let _ = std::fs::remove_dir(&entry);
    result
}

/// A report through configfs-tsm at `root`; for SEV-SNP on a kernel without it, through
/// the legacy `/dev/sev-guest` (`sev_guest`).
fn report_from(
    root: &Path,
    tee: Tee,
    name: &str,
    report_data: &[u8; 64],
) -> Result<TsmReport, EvidenceError> {
    let legacy = Path::new(crate::sev_guest::SEV_GUEST_DEVICE);
    if tee == Tee::SevSnp && !root.exists() && legacy.exists() {
        let evidence =
            crate::sev_guest::report(legacy, report_data).map_err(|e| EvidenceError::Io {
                what: "get a report through",
                path: legacy.to_owned(),
                source: std::io::Error::other(e),
            })?;
        return Ok(TsmReport {
            provider: Tee::SevSnp.provider().to_owned(),
            evidence,
        });
    }
    tsm_report(root, name, report_data)
}

/// Our write to `inblob` counts one generation; more means someone else wrote to the
/// entry between our write and our read, and the report may carry their data.
fn uncontended(before: u64, after: u64) -> Result<(), EvidenceError> {
    if after > before.saturating_add(1) {
        return Err(EvidenceError::Raced { before, after });
    }
    Ok(())
}

/// Checks that `report` is `tee`'s, that it carries `report_data`, and that the config
/// digest the launch bound into it is `init_data`'s.
pub fn check_init_data(
    tee: Tee,
    report: &TsmReport,
    report_data: &[u8; 64],
    init_data: &InitData,
) -> Result<(), EvidenceError> {
    if report.provider != tee.provider() {
        return Err(EvidenceError::Provider {
            got: report.provider.clone(),
            want: tee.provider(),
        });
    }
    let (at, len, data_at) = tee.layout();
    let ev = &report.evidence;
    let (Some(measured), Some(data)) = (ev.get(at..at + len), ev.get(data_at..data_at + 64)) else {
        return Err(EvidenceError::Short(ev.len()));
    };
    if data != report_data {
        return Err(EvidenceError::ReportData);
    }
    let given: Vec<u8> = match tee {
        Tee::SevSnp => init_data.host_data().to_vec(),
        Tee::Tdx => init_data.mr_config_id().to_vec(),
    };
    if measured != given.as_slice() {
        return Err(EvidenceError::Mismatch {
            given: hex::encode(given),
            measured: hex::encode(measured),
        });
    }
    Ok(())
}

/// The report data the agent asks for when it checks init-data: the init-data digest,
/// truncated or zero-padded to 64 bytes (so the report itself also names the document).
pub fn init_data_report_data(init_data: &InitData) -> [u8; 64] {
    let mut out = [0u8; 64];
    let n = init_data.digest.len().min(64);
    out[..n].copy_from_slice(&init_data.digest[..n]);
    out
}

/// The most bytes of a caller's nonce that evidence binds.
pub const MAX_NONCE: usize = 64;

/// The report data of evidence given on request: SHA-512 over a label, the pod's
/// init-data digest (length-prefixed) and the caller's nonce. A relying party recomputes
/// it from the nonce it sent and the init-data it expects, so one report shows both that
/// it is fresh and which document the guest runs under.
pub fn nonce_report_data(init_digest: &[u8], nonce: &[u8]) -> [u8; 64] {
    use sha2::Digest;
    let mut h = sha2::Sha512::new();
    h.update(b"cocoon-evidence-v1\0");
    h.update((init_digest.len() as u32).to_be_bytes());
    h.update(init_digest);
    h.update(nonce);
    h.finalize().into()
}

/// The guest's evidence for a caller's `nonce` (at most [`MAX_NONCE`] bytes): the
/// report (SEV-SNP) or quote (TDX), checked to be `tee`'s and to carry the report data
/// asked for. Returns it with that report data.
pub fn evidence_for(
    root: &Path,
    tee: Tee,
    init_digest: &[u8],
    nonce: &[u8],
) -> Result<(TsmReport, [u8; 64]), EvidenceError> {
    if nonce.len() > MAX_NONCE {
        return Err(EvidenceError::NonceTooLong(nonce.len()));
    }
    let report_data = nonce_report_data(init_digest, nonce);
    let report = report_from(root, tee, "cocoon-evidence", &report_data)?;
    if report.provider != tee.provider() {
        return Err(EvidenceError::Provider {
            got: report.provider,
            want: tee.provider(),
        });
    }
    let (_, _, data_at) = tee.layout();
    match report.evidence.get(data_at..data_at + 64) {
        None => Err(EvidenceError::Short(report.evidence.len())),
        Some(d) if d != report_data => Err(EvidenceError::ReportData),
        Some(_) => Ok((report, report_data)),
    }
}

/// Gets the guest's evidence and checks `init_data` against it: what the agent does
/// before it takes init-data in a confidential launch (`cocoon.tee=` on its command
/// line). Any failure means the host handed over something the launch did not measure,
/// or the guest is not the TEE it was told it is.
pub fn verify_init_data(root: &Path, tee: Tee, init_data: &InitData) -> Result<(), EvidenceError> {
    let report_data = init_data_report_data(init_data);
    let report = report_from(root, tee, "cocoon-init-data", &report_data)?;
    check_init_data(tee, &report, &report_data, init_data)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &[u8] = b"version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n";

    /// An SEV-SNP report of the fixture's size carrying `host_data` and `report_data`.
    fn snp_report(host_data: &[u8], report_data: &[u8; 64]) -> Vec<u8> {
        let mut r = vec![0u8; 0x4A0];
        r[0xC0..0xC0 + 32].copy_from_slice(host_data);
        r[0x50..0x50 + 64].copy_from_slice(report_data);
        r
    }

    /// A configfs-tsm entry as the kernel shows one, with `evidence` ready to read.
    fn fake_entry(root: &Path, provider: &str, evidence: &[u8]) {
        fake_named_entry(root, "cocoon-init-data", provider, evidence)
    }

    fn fake_named_entry(root: &Path, name: &str, provider: &str, evidence: &[u8]) {
        let e = root.join(name);
        std::fs::create_dir_all(&e).unwrap();
        std::fs::write(e.join("outblob"), evidence).unwrap();
        std::fs::write(e.join("provider"), format!("{provider}\n")).unwrap();
        std::fs::write(e.join("generation"), "0\n").unwrap();
    }

    /// Evidence on request carries the caller's nonce bound to the init-data digest; a
    /// report with other data (stale, replayed), another TEE's, a short one or an
    /// oversized nonce is refused.
    #[test]
    fn evidence_on_request_binds_the_callers_nonce() {
        let d = tempfile::tempdir().unwrap();
        let digest = [7u8; 48];
        let want = nonce_report_data(&digest, b"nonce-1");
        assert_ne!(want, nonce_report_data(&digest, b"nonce-2"));
        assert_ne!(want, nonce_report_data(&[8u8; 48], b"nonce-1"));
        fake_named_entry(
            d.path(),
            "cocoon-evidence",
            "sev_guest",
            &snp_report(&[0; 32], &want),
        );
        let (r, data) = evidence_for(d.path(), Tee::SevSnp, &digest, b"nonce-1").unwrap();
        assert_eq!(data, want);
        assert_eq!(r.evidence[0x50..0x50 + 64], want);
        assert_eq!(
            std::fs::read(d.path().join("cocoon-evidence/inblob")).unwrap(),
            want,
            "the agent asked for the bound data"
        );
        fake_named_entry(
            d.path(),
            "cocoon-evidence",
            "sev_guest",
            &snp_report(&[0; 32], &want),
        );
        let e = evidence_for(d.path(), Tee::SevSnp, &digest, b"nonce-2").unwrap_err();
        assert!(matches!(e, EvidenceError::ReportData), "{e}");
        fake_named_entry(
            d.path(),
            "cocoon-evidence",
            "tdx_guest",
            &snp_report(&[0; 32], &want),
        );
        let e = evidence_for(d.path(), Tee::SevSnp, &digest, b"nonce-1").unwrap_err();
        assert!(matches!(e, EvidenceError::Provider { .. }), "{e}");
        fake_named_entry(d.path(), "cocoon-evidence", "sev_guest", &[0; 16]);
        let e = evidence_for(d.path(), Tee::SevSnp, &digest, b"nonce-1").unwrap_err();
        assert!(matches!(e, EvidenceError::Short(16)), "{e}");
        let e = evidence_for(d.path(), Tee::SevSnp, &digest, &[0; 65]).unwrap_err();
        assert!(matches!(e, EvidenceError::NonceTooLong(65)), "{e}");
    }

    #[test]
    fn the_measured_init_data_passes_and_any_other_fails() {
        let init = InitData::parse(DOC).unwrap();
        let data = init_data_report_data(&init);
        let d = tempfile::tempdir().unwrap();
        fake_entry(d.path(), "sev_guest", &snp_report(&init.host_data(), &data));
        verify_init_data(d.path(), Tee::SevSnp, &init).unwrap();
        // What the agent asked for went in.
        let written = std::fs::read(d.path().join("cocoon-init-data/inblob")).unwrap();
        assert_eq!(written, data);

        let other = InitData::parse(b"version = \"0.1.0\"\nalgorithm = \"sha384\"\n").unwrap();
        fake_entry(d.path(), "sev_guest", &snp_report(&init.host_data(), &data));
        let e = verify_init_data(d.path(), Tee::SevSnp, &other).unwrap_err();
        // The report data is the other document's digest, so the stale report fails
        // first; with matching report data, the digests are what differs.
        assert!(matches!(e, EvidenceError::ReportData), "{e}");
        let r = TsmReport {
            provider: "sev_guest".into(),
            evidence: snp_report(&init.host_data(), &init_data_report_data(&other)),
        };
        let e =
            check_init_data(Tee::SevSnp, &r, &init_data_report_data(&other), &other).unwrap_err();
        assert!(
            e.to_string().contains(&hex::encode(other.host_data())),
            "{e}"
        );
    }

    #[test]
    fn a_tdx_quote_binds_mrconfigid() {
        let init = InitData::parse(DOC).unwrap();
        let data = init_data_report_data(&init);
        let mut quote = vec![0u8; 48 + 584 + 4];
        quote[232..232 + 48].copy_from_slice(&init.mr_config_id());
        quote[568..568 + 64].copy_from_slice(&data);
        let r = TsmReport {
            provider: "tdx_guest".into(),
            evidence: quote.clone(),
        };
        check_init_data(Tee::Tdx, &r, &data, &init).unwrap();
        quote[232] ^= 1;
        let r = TsmReport {
            provider: "tdx_guest".into(),
            evidence: quote,
        };
        let e = check_init_data(Tee::Tdx, &r, &data, &init).unwrap_err();
        assert!(matches!(e, EvidenceError::Mismatch { .. }), "{e}");
    }

    #[test]
    fn the_wrong_provider_a_short_report_and_a_race_are_refused() {
        let init = InitData::parse(DOC).unwrap();
        let data = init_data_report_data(&init);
        let r = TsmReport {
            provider: "tdx_guest".into(),
            evidence: snp_report(&init.host_data(), &data),
        };
        let e = check_init_data(Tee::SevSnp, &r, &data, &init).unwrap_err();
        assert!(e.to_string().contains("tdx_guest"), "{e}");
        let r = TsmReport {
            provider: "sev_guest".into(),
            evidence: vec![0; 0x90],
        };
        assert!(matches!(
            check_init_data(Tee::SevSnp, &r, &data, &init),
            Err(EvidenceError::Short(0x90))
        ));
        // One write of ours moves the generation by one; more is another writer.
        uncontended(7, 8).unwrap();
        assert!(matches!(
            uncontended(7, 9),
            Err(EvidenceError::Raced {
                before: 7,
                after: 9
            })
        ));
    }

    #[test]
    fn no_configfs_tsm_is_a_clear_error() {
        let init = InitData::parse(DOC).unwrap();
        let e =
            verify_init_data(Path::new("/nonexistent/tsm/report"), Tee::SevSnp, &init).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/tsm/report"), "{e}");
    }

    #[test]
    fn tee_names_parse() {
        assert_eq!(Tee::parse("sev-snp"), Some(Tee::SevSnp));
        assert_eq!(Tee::parse("tdx"), Some(Tee::Tdx));
        assert_eq!(Tee::parse("sev"), None);
    }
}
