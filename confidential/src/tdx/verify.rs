//! Verifying a TDX quote (DCAP, v4/v5): the `dcap-qvl` crate checks the PCK certificate
//! chain to Intel's SGX root (built in), the CRLs, the QE report and its identity, the
//! attestation key's signature over the TD report, and the platform's TCB level from the
//! collateral. Cocoon then asks what a confidential pod needs: the TCB status is one the
//! caller accepts, the TD is not debuggable, and MRTD, RTMR0-3, MRCONFIGID (the init-data
//! digest) and the report data (the caller's nonce) are what it expects. Before any of
//! that, the quote's container must be canonical (`layout`): nothing in it may vary.

use dcap_qvl::verify::QuoteVerifier;
use dcap_qvl::QuoteCollateralV3;

/// What the relying party expects. `None` leaves a field unchecked.
#[derive(Clone, Debug)]
pub struct Expected {
    pub mr_td: Option<[u8; 48]>,
    pub rtmrs: [Option<[u8; 48]>; 4],
    pub mr_config_id: Option<[u8; 48]>,
    pub report_data: Option<[u8; 64]>,
    /// TCB statuses accepted (Intel's words: UpToDate, SWHardeningNeeded, OutOfDate...).
    pub accept_status: Vec<String>,
    pub allow_debug: bool,
}

impl Default for Expected {
    fn default() -> Self {
        Expected {
            mr_td: None,
            rtmrs: [None; 4],
            mr_config_id: None,
            report_data: None,
            accept_status: vec!["UpToDate".into()],
            allow_debug: false,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("the collateral is not DCAP collateral JSON: {0}")]
    Collateral(String),
    #[error("the quote's container is not canonical: {0}")]
    Layout(String),
    #[error("the quote does not verify: {0}")]
    Quote(String),
    #[error("the quote is an SGX enclave's, not a TD's")]
    NotTd,
    #[error("the platform's TCB status is {0}, which is not accepted")]
    Status(String),
    #[error("the TD is debuggable (TD attributes {0})")]
    Debug(String),
    #[error("{field} is {got}, expected {want}")]
    Mismatch {
        field: &'static str,
        got: String,
        want: String,
    },
}

/// What an accepted quote says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub status: String,
    pub mr_td: [u8; 48],
    pub rtmrs: [[u8; 48]; 4],
    pub mr_config_id: [u8; 48],
    pub report_data: [u8; 64],
}

/// Verifies `quote` with `collateral` (the JSON a PCCS serves) at time `now_secs` (Unix
/// seconds: certificates, CRLs and TCB info must be valid then).
pub fn verify_quote(
    quote: &[u8],
    collateral: &[u8],
    now_secs: u64,
    expected: &Expected,
) -> Result<Verified, VerifyError> {
    let collateral: QuoteCollateralV3 =
        serde_json::from_slice(collateral).map_err(|e| VerifyError::Collateral(e.to_string()))?;
    super::layout::check(quote).map_err(VerifyError::Layout)?;
    let report = QuoteVerifier::new(super::layout::INTEL_ROOT_CA_DER.to_vec())
        .verify(quote, &collateral, now_secs)
        .map_err(|e| VerifyError::Quote(format!("{e:#}")))?;
    let td = report.report.as_td10().ok_or(VerifyError::NotTd)?;
    if !expected.accept_status.contains(&report.status) {
        return Err(VerifyError::Status(report.status));
    }
    // TDATTRIBUTES bit 0: DEBUG.
    if td.td_attributes[0] & 1 != 0 && !expected.allow_debug {
        return Err(VerifyError::Debug(hex::encode(td.td_attributes)));
    }
    let v = Verified {
        status: report.status.clone(),
        mr_td: td.mr_td,
        rtmrs: [td.rt_mr0, td.rt_mr1, td.rt_mr2, td.rt_mr3],
        mr_config_id: td.mr_config_id,
        report_data: td.report_data,
    };
    let check = |field: &'static str, got: &[u8], want: Option<&[u8]>| match want {
        Some(w) if w != got => Err(VerifyError::Mismatch {
            field,
            got: hex::encode(got),
            want: hex::encode(w),
        }),
        _ => Ok(()),
    };
    check("MRTD", &v.mr_td, expected.mr_td.as_ref().map(|a| &a[..]))?;
    for (i, name) in ["RTMR0", "RTMR1", "RTMR2", "RTMR3"].into_iter().enumerate() {
        check(
            name,
            &v.rtmrs[i],
            expected.rtmrs[i].as_ref().map(|a| &a[..]),
        )?;
    }
    check(
        "MRCONFIGID",
        &v.mr_config_id,
        expected.mr_config_id.as_ref().map(|a| &a[..]),
    )?;
    check(
        "the report data",
        &v.report_data,
        expected.report_data.as_ref().map(|a| &a[..]),
    )?;
    Ok(v)
}
