//! TDX quote verification with a real quote and its DCAP collateral (fixtures from the
//! `dcap-qvl` crate's samples): accepted at a time the collateral is valid with the
//! expectations it meets; refused with each it does not, when the collateral has
//! expired, and after any one-bit change to the quote.

use cocoon_confidential::tdx::verify::{verify_quote, Expected, VerifyError};

const QUOTE: &[u8] = include_bytes!("fixtures/tdx/tdx_quote");
const COLLATERAL: &[u8] = include_bytes!("fixtures/tdx/tdx_quote_collateral.json");

/// 2025-07-01T00:00:00Z: inside the collateral's validity (its TCB info and QE identity
/// were issued 2025-06-19 for a month).
const NOW: u64 = 1_751_328_000;

fn accepting_any_status() -> Expected {
    Expected {
        accept_status: [
            "UpToDate",
            "SWHardeningNeeded",
            "ConfigurationNeeded",
            "OutOfDate",
        ]
        .map(String::from)
        .to_vec(),
        ..Expected::default()
    }
}

#[test]
fn the_real_quote_verifies_and_says_what_it_measured() {
    let v = verify_quote(QUOTE, COLLATERAL, NOW, &accepting_any_status()).expect("verifies");
    eprintln!("status {}, MRTD {}", v.status, hex::encode(v.mr_td));
    // With its own values expected, it still verifies.
    let exact = Expected {
        mr_td: Some(v.mr_td),
        rtmrs: v.rtmrs.map(Some),
        mr_config_id: Some(v.mr_config_id),
        report_data: Some(v.report_data),
        accept_status: vec![v.status.clone()],
        allow_debug: false,
    };
    assert_eq!(
        verify_quote(QUOTE, COLLATERAL, NOW, &exact).as_ref(),
        Ok(&v)
    );
    // Each unmet expectation is named.
    for (i, field) in ["RTMR0", "RTMR1", "RTMR2", "RTMR3"].into_iter().enumerate() {
        let mut e = exact.clone();
        e.rtmrs[i].as_mut().unwrap()[47] ^= 0x80;
        match verify_quote(QUOTE, COLLATERAL, NOW, &e) {
            Err(VerifyError::Mismatch { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        }
    }
    let mut e = exact.clone();
    e.mr_td.as_mut().unwrap()[0] ^= 1;
    assert!(matches!(
        verify_quote(QUOTE, COLLATERAL, NOW, &e),
        Err(VerifyError::Mismatch { field: "MRTD", .. })
    ));
    let mut e = exact.clone();
    e.mr_config_id = Some([0xaa; 48]);
    assert!(matches!(
        verify_quote(QUOTE, COLLATERAL, NOW, &e),
        Err(VerifyError::Mismatch {
            field: "MRCONFIGID",
            ..
        })
    ));
    let mut e = exact.clone();
    e.report_data = Some([0; 64]);
    assert!(matches!(
        verify_quote(QUOTE, COLLATERAL, NOW, &e),
        Err(VerifyError::Mismatch {
            field: "the report data",
            ..
        })
    ));
    // A status the caller does not accept.
    let mut e = exact.clone();
    e.accept_status = vec!["NoSuchStatus".into()];
    assert!(matches!(
        verify_quote(QUOTE, COLLATERAL, NOW, &e),
        Err(VerifyError::Status(_))
    ));
}

#[test]
fn expired_or_foreign_collateral_is_refused() {
    // A year after the collateral's next update was due.
    let later = NOW + 365 * 86_400;
    assert!(matches!(
        verify_quote(QUOTE, COLLATERAL, later, &accepting_any_status()),
        Err(VerifyError::Quote(_))
    ));
    assert!(matches!(
        verify_quote(QUOTE, b"{}", NOW, &accepting_any_status()),
        Err(VerifyError::Collateral(_))
    ));
}

/// Every byte of the quote, one bit each (bit `i % 8` of byte `i`).
#[test]
fn a_one_bit_change_anywhere_in_the_quote_fails() {
    let e = accepting_any_status();
    let mut passed = Vec::new();
    for i in 0..QUOTE.len() {
        let mut q = QUOTE.to_vec();
        q[i] ^= 1 << (i % 8);
        if verify_quote(&q, COLLATERAL, NOW, &e).is_ok() {
            passed.push(i);
        }
    }
    assert!(
        passed.is_empty(),
        "{} one-bit changes still verified, at bytes {:x?}",
        passed.len(),
        &passed[..passed.len().min(40)]
    );
}

/// The agent reads MRCONFIGID and REPORTDATA from its own quote where the verifier does.
#[test]
fn the_agents_init_data_check_reads_the_fields_the_verifier_reads() {
    use cocoon_confidential::evidence::{check_init_data, Tee, TsmReport};
    use cocoon_confidential::initdata::{Algorithm, InitData};
    let v = verify_quote(QUOTE, COLLATERAL, NOW, &accepting_any_status()).expect("verifies");
    let report = TsmReport {
        provider: "tdx_guest".into(),
        evidence: QUOTE.to_vec(),
    };
    let mut init = InitData {
        algorithm: Algorithm::Sha384,
        data: Default::default(),
        text: String::new(),
        digest: v.mr_config_id.to_vec(),
    };
    check_init_data(Tee::Tdx, &report, &v.report_data, &init).expect("the quote's own values");
    init.digest[47] ^= 1;
    assert!(check_init_data(Tee::Tdx, &report, &v.report_data, &init).is_err());
}
