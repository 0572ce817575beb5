//! SEV-SNP report verification with a real report from an AMD Milan part and its VCEK
//! (fixtures from the `sev` crate's test data): it is accepted with the expectations it
//! meets, refused with each it does not, and refused after any one-bit change to the
//! report or the certificate.

use std::time::Instant;

use cocoon_confidential::snp::verify::{verify_report, verify_with, Expected, Vcek, VerifyError};

const REPORT_HEX: &str = include_str!("fixtures/snp/report_milan.hex");
const VCEK: &[u8] = include_bytes!("fixtures/snp/vcek_milan.der");
const OTHER_VCEK: &[u8] = include_bytes!("fixtures/snp/vcek_turin.der");

fn report() -> Vec<u8> {
    hex::decode(REPORT_HEX.trim()).unwrap()
}

fn expected() -> Expected {
    let r = report();
    Expected {
        measurement: Some(r[0x90..0xc0].try_into().unwrap()),
        report_data: Some(r[0x50..0x90].try_into().unwrap()),
        host_data: Some([0; 32]),
        // AMD's sample was launched without an ID block.
        id_key_digest: Some([0; 48]),
        author_key_digest: Some([0; 48]),
        allow_debug: false,
    }
}

#[test]
fn the_real_report_verifies() {
    let t = Instant::now();
    let v = verify_report(&report(), VCEK, &expected()).expect("the fixture verifies");
    eprintln!("one verification: {:?}", t.elapsed());
    assert_eq!(v.version, 2);
    assert_eq!(v.policy, 0x30000);
    assert_eq!(
        hex::encode(v.measurement),
        "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d3e1a0dc39b2c60bd95b9c480cd81841f"
    );
}

#[test]
fn unmet_expectations_are_named() {
    let mut e = expected();
    e.measurement.as_mut().unwrap()[0] ^= 1;
    assert!(matches!(
        verify_report(&report(), VCEK, &e),
        Err(VerifyError::Measurement { .. })
    ));
    let mut e = expected();
    e.report_data = Some([0; 64]);
    let err = verify_report(&report(), VCEK, &e).unwrap_err();
    assert!(
        err.to_string().starts_with("the report data is d447b55d"),
        "{err}"
    );
    let mut e = expected();
    e.host_data = Some([1; 32]);
    assert!(matches!(
        verify_report(&report(), VCEK, &e),
        Err(VerifyError::HostData { .. })
    ));
    // A relying party expecting an owner's ID key (or author key) refuses a launch
    // without one.
    let mut e = expected();
    e.id_key_digest = Some([7; 48]);
    let err = verify_report(&report(), VCEK, &e).unwrap_err();
    assert!(
        err.to_string().starts_with("the ID key digest is 000000"),
        "{err}"
    );
    let mut e = expected();
    e.author_key_digest = Some([7; 48]);
    assert!(matches!(
        verify_report(&report(), VCEK, &e),
        Err(VerifyError::AuthorKey { .. })
    ));
    // Another chip's genuine VCEK (it chains to AMD's Turin root) did not sign it.
    assert_eq!(
        verify_report(&report(), OTHER_VCEK, &expected()),
        Err(VerifyError::Signature)
    );
    assert_eq!(
        verify_report(&report()[..1000], VCEK, &expected()),
        Err(VerifyError::Size(1000))
    );
}

/// Every byte of the report, one bit each (bit `i % 8` of byte `i`, so every bit
/// position is covered across the report): none of the changed reports verifies.
#[test]
fn a_one_bit_change_anywhere_in_the_report_fails() {
    let good = report();
    let e = expected();
    let vcek = Vcek::new(VCEK).unwrap();
    let t = Instant::now();
    assert!(verify_with(&vcek, &good, &e).is_ok());
    eprintln!("one report signature: {:?}", t.elapsed());
    for i in 0..good.len() {
        let mut r = good.clone();
        r[i] ^= 1 << (i % 8);
        assert!(
            verify_with(&vcek, &r, &e).is_err(),
            "flipping bit {} of byte {i:#x} still verified",
            i % 8
        );
    }
}

/// The same for the VCEK certificate: a change either breaks its encoding, its
/// signature by AMD's ASK, or its key.
#[test]
fn a_one_bit_change_anywhere_in_the_vcek_fails() {
    let good = report();
    let e = expected();
    for i in 0..VCEK.len() {
        let mut c = VCEK.to_vec();
        c[i] ^= 1 << (i % 8);
        assert!(
            verify_report(&good, &c, &e).is_err(),
            "flipping bit {} of certificate byte {i:#x} still verified",
            i % 8
        );
    }
}

/// The agent reads HOST_DATA and REPORT_DATA from its own report where the verifier does.
#[test]
fn the_agents_init_data_check_reads_the_fields_the_verifier_reads() {
    use cocoon_confidential::evidence::{check_init_data, Tee, TsmReport};
    use cocoon_confidential::initdata::{Algorithm, InitData};
    let r = report();
    let v = verify_report(&r, VCEK, &expected()).expect("verifies");
    let tsm = TsmReport {
        provider: "sev_guest".into(),
        evidence: r,
    };
    let mut init = InitData {
        algorithm: Algorithm::Sha256,
        data: Default::default(),
        text: String::new(),
        digest: v.host_data.to_vec(),
    };
    check_init_data(Tee::SevSnp, &tsm, &v.report_data, &init).expect("the report's own values");
    init.digest[0] ^= 1;
    assert!(check_init_data(Tee::SevSnp, &tsm, &v.report_data, &init).is_err());
}
