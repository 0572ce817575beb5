//! The broker's side of an attestation, for SEV-SNP evidence in Cocoon's format
//! (`attester::snp_evidence`): the challenge's nonce, the VCEK's chain to the roots the
//! broker trusts, the report's signature, the runtime data's binding (so the TEE key
//! the response will be encrypted to is the one the evidence vouches for), the
//! init-data's digest against HOST_DATA, and the relying party's expectations
//! (measurement, policy). The test broker in `tests/kbs.rs` runs on it.
//!
//! TDX evidence (`attester::tdx_evidence`) goes through `check_tdx`: the quote verified
//! with DCAP collateral (`tdx::verify`), the runtime data bound in REPORTDATA, the
//! init-data's digest in MRCONFIGID, and the relying party's MRTD and RTMRs.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use kbs_types::{Attestation, HashAlgorithm, Tee, TeePubKey};
use serde_json::Value;

use super::runtime_report_data;
use crate::initdata::InitData;
use crate::snp::verify::{verify_with, Expected, Roots, Vcek, Verified, VerifyError};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BrokerError {
    #[error("the attestation answers another challenge (nonce {got:?})")]
    Nonce { got: String },
    #[error("the evidence is not SEV-SNP evidence in Cocoon's format: {0}")]
    Format(String),
    #[error("the init-data is unusable: {0}")]
    InitData(String),
    #[error("the init-data's digest is not the one this broker expects")]
    InitDataNotExpected,
    #[error("{0}")]
    Verify(#[from] VerifyError),
    #[error("the TEE {0} is not one this check verifies")]
    Tee(String),
    #[error("{0}")]
    VerifyTdx(#[from] crate::tdx::verify::VerifyError),
    #[error(
        "no launch measurement is expected: a broker releases secrets to one launch, not to any"
    )]
    NoMeasurement,
}

/// What an accepted attestation established.
#[derive(Debug)]
pub struct Attested {
    pub report: Verified,
    /// The key to encrypt responses to.
    pub tee_pubkey: TeePubKey,
}

/// Checks `attestation`, answering the challenge `nonce` with the runtime data hashed by
/// `alg`, against VCEKs chained to `roots` and the relying party's `expected` values.
pub fn check(
    tee: Tee,
    attestation: &Attestation,
    nonce: &str,
    alg: HashAlgorithm,
    roots: &[Roots],
    expected: &Expected,
) -> Result<Attested, BrokerError> {
    if tee != Tee::Snp {
        return Err(BrokerError::Tee(tee.to_string()));
    }
    if expected.measurement.is_none() {
        return Err(BrokerError::NoMeasurement);
    }
    if attestation.runtime_data.nonce != nonce {
        return Err(BrokerError::Nonce {
            got: attestation.runtime_data.nonce.chars().take(64).collect(),
        });
    }
    let evidence = &attestation.tee_evidence.primary_evidence;
    let field = |name: &str| -> Result<Vec<u8>, BrokerError> {
        let text = evidence
            .get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| BrokerError::Format(format!("no {name:?} string")))?;
        STANDARD
            .decode(text)
            .map_err(|e| BrokerError::Format(format!("{name:?} is not base64: {e}")))
    };
    let report = field("report")?;
    // Without the VCEK a broker would fetch it from AMD's key distribution service by
    // chip id and TCB; this one has no network, so the guest must send it.
    let vcek = Vcek::chained_to(&field("vcek")?, roots)?;

    let mut want = expected.clone();
    want.report_data = Some(runtime_report_data(&attestation.runtime_data, alg));
    if let Some(init) = &attestation.init_data {
        let parsed = parse_init_data(init)?;
        if expected.host_data.is_some_and(|h| h != parsed.host_data()) {
            return Err(BrokerError::InitDataNotExpected);
        }
        // The document sent must be the one the launch bound.
        want.host_data = Some(parsed.host_data());
    } else if want.host_data.is_none() {
        // No document: the launch must have bound none either, or a guest launched
        // with a lax one could leave it out.
        want.host_data = Some([0; 32]);
    }
    let report = verify_with(&vcek, &report, &want)?;
    Ok(Attested {
        report,
        tee_pubkey: attestation.runtime_data.tee_pubkey.clone(),
    })
}

/// What a broker expects of TDX evidence: the DCAP collateral to verify quotes with (as
/// its PCCS serves it), the time to check it at (Unix seconds), and the relying party's
/// values (`mr_td`, `rtmrs[1]` and `rtmrs[2]` are required: a broker releases secrets to
/// one TD image, firmware, kernel and initramfs, not to any).
#[derive(Clone, Debug)]
pub struct TdxPolicy {
    pub collateral: Vec<u8>,
    pub now_secs: u64,
    pub expected: crate::tdx::verify::Expected,
}

/// What an accepted TDX attestation established.
#[derive(Debug)]
pub struct AttestedTdx {
    pub quote: crate::tdx::verify::Verified,
    /// The key to encrypt responses to.
    pub tee_pubkey: TeePubKey,
}

/// Checks a TDX `attestation` answering the challenge `nonce`, its runtime data hashed
/// by `alg`, against `policy`.
pub fn check_tdx(
    tee: Tee,
    attestation: &Attestation,
    nonce: &str,
    alg: HashAlgorithm,
    policy: &TdxPolicy,
) -> Result<AttestedTdx, BrokerError> {
    if tee != Tee::Tdx {
        return Err(BrokerError::Tee(tee.to_string()));
    }
    // MRTD covers the firmware only; the kernel, its command line and initramfs (the
    // agent) are measured into RTMR1 and RTMR2 by it.
    let e = &policy.expected;
    if e.mr_td.is_none() || e.rtmrs[1].is_none() || e.rtmrs[2].is_none() {
        return Err(BrokerError::NoMeasurement);
    }
    if attestation.runtime_data.nonce != nonce {
        return Err(BrokerError::Nonce {
            got: attestation.runtime_data.nonce.chars().take(64).collect(),
        });
    }
    let quote = attestation
        .tee_evidence
        .primary_evidence
        .get("quote")
        .and_then(Value::as_str)
        .ok_or_else(|| BrokerError::Format("no \"quote\" string".into()))
        .and_then(|t| {
            STANDARD
                .decode(t)
                .map_err(|e| BrokerError::Format(format!("\"quote\" is not base64: {e}")))
        })?;
    let mut want = policy.expected.clone();
    want.report_data = Some(runtime_report_data(&attestation.runtime_data, alg));
    if let Some(init) = &attestation.init_data {
        let parsed = parse_init_data(init)?;
        if policy
            .expected
            .mr_config_id
            .is_some_and(|m| m != parsed.mr_config_id())
        {
            return Err(BrokerError::InitDataNotExpected);
        }
        // The document sent must be the one the launch bound.
        want.mr_config_id = Some(parsed.mr_config_id());
    } else if want.mr_config_id.is_none() {
        want.mr_config_id = Some([0; 48]);
    }
    let quote =
        crate::tdx::verify::verify_quote(&quote, &policy.collateral, policy.now_secs, &want)?;
    Ok(AttestedTdx {
        quote,
        tee_pubkey: attestation.runtime_data.tee_pubkey.clone(),
    })
}

/// The init-data document an attestation carries, parsed.
fn parse_init_data(init: &kbs_types::InitData) -> Result<InitData, BrokerError> {
    if init.format != "toml" {
        return Err(BrokerError::InitData(format!(
            "format {:?}, not toml",
            init.format
        )));
    }
    InitData::parse(init.body.as_bytes()).map_err(|e| BrokerError::InitData(e.to_string()))
}
