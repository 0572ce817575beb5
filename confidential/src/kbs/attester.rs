//! Evidence for the broker from the guest's own TEE, through configfs-tsm.
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

#[cfg(test)]
mod tests {
    use super::*;

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
