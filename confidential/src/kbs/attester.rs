//! Evidence for the broker from the guest's own TEE, through configfs-tsm.
//!
//! TDX evidence travels as Trustee's verifier reads it, `{"quote": base64,
//! "cc_eventlog": base64}`: the TD quote configfs-tsm's `tdx_guest` provider returns, and
//! the firmware's CC event log (the ACPI CCEL table) when the guest has one.
//!
//! SEV-SNP evidence travels as `{"report": base64, "vcek": base64}`: the raw attestation
//! report as the firmware wrote it (the verifier checks the signature over these bytes,
//! not over a re-serialized parse) and, when the host's firmware has one in the extended
//! report's certificate table, the VCEK in DER. This is Cocoon's own format: Trustee's
//! verifier reads the `sev` crate's serialized report instead (not done here: see
//! `docs/confidential.md`).

use std::path::PathBuf;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use kbs_types::Tee;
use serde_json::Value;

use super::{Attester, KbsError};
use crate::evidence;
use crate::snp::certs;

/// The evidence's JSON for an SEV-SNP report and its VCEK.
pub fn snp_evidence(report: &[u8], vcek: Option<&[u8]>) -> Value {
    let mut v = serde_json::json!({ "report": STANDARD.encode(report) });
    if let Some(der) = vcek {
        v["vcek"] = Value::String(STANDARD.encode(der));
    }
    v
}

/// SEV-SNP evidence from configfs-tsm (the `sev_guest` provider).
pub struct SnpTsm {
    pub root: PathBuf,
}

impl SnpTsm {
    pub fn new() -> SnpTsm {
        SnpTsm {
            root: evidence::TSM_REPORT_ROOT.into(),
        }
    }
}

impl Default for SnpTsm {
    fn default() -> Self {
        SnpTsm::new()
    }
}

impl Attester for SnpTsm {
    fn tee(&self) -> Tee {
        Tee::Snp
    }

    fn evidence(&self, report_data: &[u8; 64]) -> Result<Value, KbsError> {
        let fail = |e: String| KbsError::Evidence(e);
        if !self.root.is_dir() {
            // A kernel without configfs-tsm may still have the legacy device (no VCEK
            // from it: the broker then needs its own).
            let legacy = std::path::Path::new(crate::sev_guest::SEV_GUEST_DEVICE);
            if legacy.exists() {
                let report = crate::sev_guest::report(legacy, report_data).map_err(fail)?;
                return Ok(snp_evidence(&report, None));
            }
            return Err(fail(format!(
                "{} is missing: this guest has no TEE evidence (no configfs-tsm, no {})",
                self.root.display(),
                legacy.display()
            )));
        }
        let name = format!("cocoon-kbs-{}", std::process::id());
        let (report, aux) = evidence::tsm_report_with_aux(&self.root, &name, report_data)
            .map_err(|e| fail(e.to_string()))?;
        if report.provider != "sev_guest" {
            return Err(fail(format!(
                "the report comes from {:?}, not sev_guest",
                report.provider
            )));
        }
        // The guest checks what it can: the report carries the data it asked for.
        if report.evidence.get(0x50..0x90) != Some(&report_data[..]) {
            return Err(fail(
                "the report does not carry the requested report data".into(),
            ));
        }
        let vcek = match &aux {
            Some(table) => certs::vcek(table).map_err(|e| fail(e.to_string()))?,
            None => None,
        };
        Ok(snp_evidence(&report.evidence, vcek))
    }
}

/// The evidence's JSON for a TD quote and the firmware's CC event log.
pub fn tdx_evidence(quote: &[u8], cc_eventlog: Option<&[u8]>) -> Value {
    let mut v = serde_json::json!({ "quote": STANDARD.encode(quote) });
    if let Some(log) = cc_eventlog {
        v["cc_eventlog"] = Value::String(STANDARD.encode(log));
    }
    v
}

/// Where a TD quote (v4, or v5 with its body's type and size) holds REPORTDATA.
pub fn tdx_report_data(quote: &[u8]) -> Option<&[u8]> {
    let version = u16::from_le_bytes(quote.get(0..2)?.try_into().ok()?);
    let body = match version {
        4 => 48,
        5 => 48 + 6,
        _ => return None,
    };
    quote.get(body + 520..body + 584)
}

/// The ACPI table the firmware's CC event log sits in, as Linux exposes it.
pub const CCEL_TABLE: &str = "/sys/firmware/acpi/tables/data/CCEL";

/// TDX evidence from configfs-tsm (the `tdx_guest` provider).
pub struct TdxTsm {
    pub root: PathBuf,
    /// The CC event log to send along, if the guest has one.
    pub ccel: PathBuf,
}

impl Default for TdxTsm {
    fn default() -> Self {
        TdxTsm {
            root: evidence::TSM_REPORT_ROOT.into(),
            ccel: CCEL_TABLE.into(),
        }
    }
}

impl Attester for TdxTsm {
    fn tee(&self) -> Tee {
        Tee::Tdx
    }

    fn evidence(&self, report_data: &[u8; 64]) -> Result<Value, KbsError> {
        let fail = |e: String| KbsError::Evidence(e);
        if !self.root.is_dir() {
            return Err(fail(format!(
                "{} is missing: this guest has no TEE evidence (no configfs-tsm)",
                self.root.display()
            )));
        }
        let name = format!("cocoon-kbs-{}", std::process::id());
        let (report, _) = evidence::tsm_report_with_aux(&self.root, &name, report_data)
            .map_err(|e| fail(e.to_string()))?;
        if report.provider != "tdx_guest" {
            return Err(fail(format!(
                "the report comes from {:?}, not tdx_guest",
                report.provider
            )));
        }
        // The guest checks what it can: the quote carries the data it asked for.
        if tdx_report_data(&report.evidence) != Some(&report_data[..]) {
            return Err(fail(
                "the quote does not carry the requested report data".into(),
            ));
        }
        let ccel = std::fs::read(&self.ccel).ok();
        Ok(tdx_evidence(&report.evidence, ccel.as_deref()))
    }
}

/// The guest's own TEE's evidence, whichever it is.
pub enum Tsm {
    Snp(SnpTsm),
    Tdx(TdxTsm),
}

impl Attester for Tsm {
    fn tee(&self) -> Tee {
        match self {
            Tsm::Snp(a) => a.tee(),
            Tsm::Tdx(a) => a.tee(),
        }
    }

    fn evidence(&self, report_data: &[u8; 64]) -> Result<Value, KbsError> {
        match self {
            Tsm::Snp(a) => a.evidence(report_data),
            Tsm::Tdx(a) => a.evidence(report_data),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configfs-tsm entry the attester will use, with `outblob` and `provider`.
    fn fake_tsm(root: &std::path::Path, outblob: &[u8], provider: &str) {
        let entry = root.join(format!("cocoon-kbs-{}", std::process::id()));
        std::fs::create_dir_all(&entry).unwrap();
        std::fs::write(entry.join("outblob"), outblob).unwrap();
        std::fs::write(entry.join("provider"), format!("{provider}\n")).unwrap();
        std::fs::write(entry.join("generation"), "0\n").unwrap();
    }

    #[test]
    fn configfs_tsm_gives_a_td_quote_with_the_event_log() {
        let dir = tempfile::tempdir().unwrap();
        let data = [9u8; 64];
        let mut quote = vec![0u8; 48 + 584 + 64];
        quote[0..2].copy_from_slice(&4u16.to_le_bytes());
        quote[568..632].copy_from_slice(&data);
        fake_tsm(&dir.path().join("tsm"), &quote, "tdx_guest");
        std::fs::write(dir.path().join("CCEL"), b"log").unwrap();
        let attester = TdxTsm {
            root: dir.path().join("tsm"),
            ccel: dir.path().join("CCEL"),
        };
        let v = Tsm::Tdx(attester).evidence(&data).unwrap();
        assert_eq!(v["quote"], STANDARD.encode(&quote));
        assert_eq!(v["cc_eventlog"], STANDARD.encode(b"log"));
        // A v5 quote holds it 6 bytes further.
        let mut v5 = vec![0u8; 48 + 6 + 584];
        v5[0..2].copy_from_slice(&5u16.to_le_bytes());
        v5[574..638].copy_from_slice(&data);
        assert_eq!(tdx_report_data(&v5), Some(&data[..]));
        assert_eq!(tdx_report_data(&[3, 0]), None);
    }

    #[test]
    fn a_td_quote_without_the_data_asked_for_or_from_another_provider_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut quote = vec![0u8; 48 + 584];
        quote[0..2].copy_from_slice(&4u16.to_le_bytes());
        fake_tsm(dir.path(), &quote, "tdx_guest");
        let attester = TdxTsm {
            root: dir.path().into(),
            ccel: dir.path().join("none"),
        };
        let e = attester.evidence(&[1; 64]).unwrap_err().to_string();
        assert!(e.contains("requested report data"), "{e}");
        fake_tsm(dir.path(), &quote, "sev_guest");
        let e = attester.evidence(&[0; 64]).unwrap_err().to_string();
        assert!(e.contains("not tdx_guest"), "{e}");
    }

    #[test]
    fn configfs_tsm_evidence_with_its_vcek() {
        let dir = tempfile::tempdir().unwrap();
        let attester = SnpTsm {
            root: dir.path().into(),
        };
        let data = [7u8; 64];
        let mut report = vec![0u8; 0x4a0];
        report[0x50..0x90].copy_from_slice(&data);
        // configfs makes the entry's files; a plain directory needs them beforehand, so
        // write them into the entry the attester will use.
        let entry = dir
            .path()
            .join(format!("cocoon-kbs-{}", std::process::id()));
        std::fs::create_dir(&entry).unwrap();
        std::fs::write(entry.join("outblob"), &report).unwrap();
        std::fs::write(entry.join("provider"), "sev_guest\n").unwrap();
        std::fs::write(entry.join("generation"), "0\n").unwrap();
        let mut table = vec![0u8; 48];
        table[..16].copy_from_slice(&hex::decode("8d75da6364e66445adc5f4b93be8accd").unwrap());
        table[16..20].copy_from_slice(&48u32.to_le_bytes());
        table[20..24].copy_from_slice(&3u32.to_le_bytes());
        table.extend(b"DER");
        std::fs::write(entry.join("auxblob"), &table).unwrap();
        let v = attester.evidence(&data).unwrap();
        assert_eq!(v["report"], STANDARD.encode(&report));
        assert_eq!(v["vcek"], STANDARD.encode(b"DER"));
    }

    #[test]
    fn without_configfs_tsm_the_error_says_so() {
        let attester = SnpTsm {
            root: "/nonexistent/tsm".into(),
        };
        let e = attester.evidence(&[0; 64]).unwrap_err().to_string();
        assert!(e.contains("no TEE evidence"), "{e}");
    }
}
