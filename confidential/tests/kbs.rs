//! The key broker client against a broker this test runs on real TCP: the whole
//! request/challenge/attestation/response exchange, with SEV-SNP evidence signed by a
//! synthetic chain (so it can bind each fresh nonce) and AMD's real Milan report (which
//! chains to AMD but cannot answer a new challenge). The broker checks evidence with the
//! library's `kbs::broker::check`, encrypts with `jwe::seal`, keeps sessions by cookie.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cocoon_confidential::initdata::InitData;
use cocoon_confidential::kbs::attester::{snp_evidence, tdx_evidence};
use cocoon_confidential::kbs::broker::{check, check_tdx, BrokerError, TdxPolicy};
use cocoon_confidential::kbs::client::Client;
use cocoon_confidential::kbs::http::{Http, Transport};
use cocoon_confidential::kbs::{jwe, Attester, KbsError};
use cocoon_confidential::snp::verify::{amd_roots, Expected, Roots};
use kbs_types::{Attestation, Challenge, HashAlgorithm, Request, Tee, TeePubKey};
use p384::ecdsa::signature::hazmat::PrehashSigner;
use p384::pkcs8::DecodePrivateKey;
use serde_json::Value;
use sha2::{Digest, Sha384};

const ARK: &[u8] = include_bytes!("fixtures/snp-synthetic/ark.der");
const ASK: &[u8] = include_bytes!("fixtures/snp-synthetic/ask.der");
const VCEK: &[u8] = include_bytes!("fixtures/snp-synthetic/vcek.der");
const VCEK_KEY: &[u8] = include_bytes!("fixtures/snp-synthetic/vcek.pk8");
const MILAN_REPORT: &str = include_str!("fixtures/snp/report_milan.hex");
const MILAN_VCEK: &[u8] = include_bytes!("fixtures/snp/vcek_milan.der");
const TLS_CA: &str = include_str!("fixtures/kbs-tls/ca.pem");
const OTHER_CA: &str = include_str!("fixtures/kbs-tls/other-ca.pem");
const SERVER_CERT: &str = include_str!("fixtures/kbs-tls/server.pem");
const SERVER_KEY: &str = include_str!("fixtures/kbs-tls/server.pk8.pem");

const MEASUREMENT: [u8; 48] = [0x5a; 48];
const SECRET: &[u8] = b"the image decryption key";
const INIT_DATA: &str = "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n\"policy.rego\" = \"package agent_policy\"\n";

// ---------------------------------------------------------------- the guest's side

/// Signs SEV-SNP reports with the synthetic VCEK, as a guest's firmware would.
struct Synthetic {
    host_data: [u8; 32],
    measurement: [u8; 48],
    /// Report data to use instead of what the client asks for (a replayed report).
    stale: Option<[u8; 64]>,
    /// REPORTED_TCB and CHIP_ID (the synthetic VCEK's: `gen.sh`).
    tcb: [u8; 8],
    chip_id: [u8; 64],
}

impl Synthetic {
    fn honest() -> Synthetic {
        let init = InitData::parse(INIT_DATA.as_bytes()).unwrap();
        Synthetic {
            host_data: init.host_data(),
            measurement: MEASUREMENT,
            stale: None,
            tcb: [3, 0, 0, 0, 0, 0, 8, 0x73],
            chip_id: [0x5c; 64],
        }
    }

    fn report(&self, report_data: &[u8; 64]) -> Vec<u8> {
        let mut r = vec![0u8; 0x4a0];
        r[0..4].copy_from_slice(&2u32.to_le_bytes()); // version
        r[8..16].copy_from_slice(&0x30000u64.to_le_bytes()); // policy: SMT, bit 17
        r[0x34..0x38].copy_from_slice(&1u32.to_le_bytes()); // ECDSA P-384 SHA-384
        r[0x50..0x90].copy_from_slice(self.stale.as_ref().unwrap_or(report_data));
        r[0x90..0xc0].copy_from_slice(&self.measurement);
        r[0xc0..0xe0].copy_from_slice(&self.host_data);
        r[0x180..0x188].copy_from_slice(&self.tcb);
        r[0x1a0..0x1e0].copy_from_slice(&self.chip_id);
        let key = p384::ecdsa::SigningKey::from_pkcs8_der(VCEK_KEY).unwrap();
        let sig: p384::ecdsa::Signature = key.sign_prehash(&Sha384::digest(&r[..0x2a0])).unwrap();
        let (rr, ss) = sig.split_bytes();
        for (at, be) in [(0x2a0, rr), (0x2a0 + 72, ss)] {
            let mut le = be.to_vec();
            le.reverse();
            r[at..at + 48].copy_from_slice(&le);
        }
        r
    }
}

impl Attester for Synthetic {
    fn tee(&self) -> Tee {
        Tee::Snp
    }
    fn evidence(&self, report_data: &[u8; 64]) -> Result<Value, KbsError> {
        Ok(snp_evidence(&self.report(report_data), Some(VCEK)))
    }
}

/// The real TD quote of `dcap-qvl`'s samples, whatever the challenge.
struct SampleTd;

const TD_QUOTE: &[u8] = include_bytes!("fixtures/tdx/tdx_quote");
const TD_COLLATERAL: &[u8] = include_bytes!("fixtures/tdx/tdx_quote_collateral.json");
/// Inside the sample collateral's validity (see `tdx_verify.rs`).
const TD_NOW: u64 = 1_751_328_000;

impl Attester for SampleTd {
    fn tee(&self) -> Tee {
        Tee::Tdx
    }
    fn evidence(&self, _: &[u8; 64]) -> Result<Value, KbsError> {
        Ok(tdx_evidence(TD_QUOTE, None))
    }
}

/// AMD's real Milan report, whatever the challenge.
struct Milan;

impl Attester for Milan {
    fn tee(&self) -> Tee {
        Tee::Snp
    }
    fn evidence(&self, _: &[u8; 64]) -> Result<Value, KbsError> {
        Ok(snp_evidence(
            &hex::decode(MILAN_REPORT.trim()).unwrap(),
            Some(MILAN_VCEK),
        ))
    }
}

// ---------------------------------------------------------------- the broker

#[derive(Default)]
struct Session {
    nonce: String,
    tee: Option<Tee>,
    key: Option<TeePubKey>,
}

struct State {
    roots: Vec<Roots>,
    expected: Expected,
    /// How TDX evidence is checked, when the broker takes it.
    tdx: Option<TdxPolicy>,
    alg: HashAlgorithm,
    sessions: HashMap<String, Session>,
    resources: HashMap<String, Vec<u8>>,
    /// Every request line, in order.
    requests: Vec<String>,
    /// Every response body sent.
    sent: Vec<Vec<u8>>,
    /// Flip a bit in the next resource response's ciphertext.
    tamper: bool,
    /// Answer every request with this many bytes of body.
    flood: Option<usize>,
    next_id: u64,
}

struct Broker {
    url: String,
    state: Arc<Mutex<State>>,
}

impl Broker {
    fn start(roots: Vec<Roots>) -> Broker {
        Broker::start_with(roots, None)
    }

    /// Over TLS with the test CA's server certificate (`fixtures/kbs-tls/gen.sh`).
    fn start_tls(roots: Vec<Roots>) -> Broker {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_slice_iter(SERVER_CERT.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(SERVER_KEY.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        Broker::start_with(roots, Some(Arc::new(config)))
    }

    fn start_with(roots: Vec<Roots>, tls: Option<Arc<rustls::ServerConfig>>) -> Broker {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State {
            roots,
            expected: Expected {
                measurement: Some(MEASUREMENT),
                ..Expected::default()
            },
            tdx: None,
            alg: HashAlgorithm::Sha384,
            sessions: HashMap::new(),
            resources: HashMap::from([("default/key/one".to_owned(), SECRET.to_vec())]),
            requests: Vec::new(),
            sent: Vec::new(),
            tamper: false,
            flood: None,
            next_id: 0,
        }));
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                match &tls {
                    None => serve(stream, &shared),
                    Some(config) => {
                        let conn = rustls::ServerConnection::new(config.clone()).unwrap();
                        let mut s = rustls::StreamOwned::new(conn, stream);
                        serve(&mut s, &shared);
                        s.conn.send_close_notify();
                        let _ = s.flush();
                    }
                }
            }
        });
        Broker { url, state }
    }

    fn client<A: Attester>(&self, attester: A) -> Client<Http, A> {
        let http = Http::new(&self.url, Duration::from_secs(10)).unwrap();
        Client::new(http, attester, Some(INIT_DATA.to_owned()))
    }

    fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }
}

fn serve<S: Read + Write>(mut stream: S, state: &Mutex<State>) {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let (head, body) = loop {
        let n = stream.read(&mut buf).unwrap_or(0);
        if n == 0 {
            return;
        }
        raw.extend_from_slice(&buf[..n]);
        let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&raw[..end]).into_owned();
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .map_or(0, |n| n.parse().unwrap());
        if raw.len() >= end + 4 + length {
            break (head, raw[end + 4..end + 4 + length].to_vec());
        }
    };
    let line = head.lines().next().unwrap().to_owned();
    let cookie = head
        .lines()
        .find_map(|l| l.strip_prefix("Cookie: kbs-session-id="))
        .map(str::to_owned);
    let mut st = state.lock().unwrap();
    st.requests.push(line.clone());
    let (status, set_cookie, body) = route(&mut st, &line, cookie, &body);
    let body = match st.flood {
        Some(n) => vec![b'x'; n],
        None => body,
    };
    st.sent.push(body.clone());
    drop(st);
    let mut out = format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\n", body.len());
    if let Some(id) = set_cookie {
        out.push_str(&format!("Set-Cookie: kbs-session-id={id}; Path=/kbs\r\n"));
    }
    out.push_str("\r\n");
    let _ = stream.write_all(out.as_bytes());
    let _ = stream.write_all(&body);
}

fn refusal(status: u16, detail: String) -> (u16, Option<String>, Vec<u8>) {
    let body = serde_json::json!({"type": "https://github.com/confidential-containers/kbs/errors/Unauthorized", "detail": detail});
    (status, None, body.to_string().into_bytes())
}

fn route(
    st: &mut State,
    line: &str,
    cookie: Option<String>,
    body: &[u8],
) -> (u16, Option<String>, Vec<u8>) {
    match line.split(' ').take(2).collect::<Vec<_>>()[..] {
        ["POST", "/kbs/v0/auth"] => {
            let request: Request = match serde_json::from_slice(body) {
                Ok(r) => r,
                Err(e) => return refusal(400, e.to_string()),
            };
            if request.version != "0.4.0" {
                return refusal(400, format!("version {}", request.version));
            }
            st.next_id += 1;
            let id = format!("session-{}", st.next_id);
            let nonce = format!("nonce-{}-{}", st.next_id, std::process::id());
            st.sessions.insert(
                id.clone(),
                Session {
                    nonce: nonce.clone(),
                    tee: Some(request.tee),
                    key: None,
                },
            );
            let challenge = Challenge {
                nonce,
                extra_params: serde_json::json!({"selected-hash-algorithm": st.alg.as_ref()}),
            };
            (200, Some(id), serde_json::to_vec(&challenge).unwrap())
        }
        ["POST", "/kbs/v0/attest"] => {
            let Some(session) = cookie.as_ref().and_then(|c| st.sessions.get(c)) else {
                return refusal(401, "no session".into());
            };
            let attestation: Attestation = match serde_json::from_slice(body) {
                Ok(a) => a,
                Err(e) => return refusal(400, e.to_string()),
            };
            let tee = session.tee.unwrap();
            let checked = match (tee, &st.tdx) {
                (Tee::Tdx, Some(policy)) => {
                    check_tdx(tee, &attestation, &session.nonce, st.alg, policy)
                        .map(|a| a.tee_pubkey)
                }
                _ => check(
                    tee,
                    &attestation,
                    &session.nonce,
                    st.alg,
                    &st.roots,
                    &st.expected,
                )
                .map(|a| a.tee_pubkey),
            };
            match checked {
                Ok(tee_pubkey) => {
                    st.sessions.get_mut(cookie.as_ref().unwrap()).unwrap().key = Some(tee_pubkey);
                    (200, None, br#"{"token":"opaque"}"#.to_vec())
                }
                Err(e) => refusal(401, e.to_string()),
            }
        }
        ["GET", path] if path.starts_with("/kbs/v0/resource/") => {
            let Some(key) = cookie
                .as_ref()
                .and_then(|c| st.sessions.get(c))
                .and_then(|s| s.key.clone())
            else {
                return refusal(401, "not attested".into());
            };
            let name = &path["/kbs/v0/resource/".len()..];
            let Some(secret) = st.resources.get(name) else {
                return refusal(404, format!("no {name}"));
            };
            let mut sealed: Value =
                serde_json::from_slice(&jwe::seal(&key, secret).unwrap()).unwrap();
            if std::mem::take(&mut st.tamper) {
                let c = sealed["ciphertext"].as_str().unwrap();
                let flipped = if c.starts_with('A') { "B" } else { "A" };
                sealed["ciphertext"] = Value::String(format!("{flipped}{}", &c[1..]));
            }
            (200, None, sealed.to_string().into_bytes())
        }
        _ => refusal(404, format!("no route {line}")),
    }
}

fn synthetic_roots() -> Vec<Roots> {
    vec![Roots::from_der(ARK, ASK).unwrap()]
}

fn refused(e: KbsError) -> (&'static str, u16, String) {
    match e {
        KbsError::Refused {
            step,
            status,
            detail,
        } => (step, status, detail),
        other => panic!("not a refusal: {other}"),
    }
}

// ---------------------------------------------------------------- the tests

#[test]
fn a_guest_gets_a_secret_its_evidence_earned() {
    let broker = Broker::start(synthetic_roots());
    let mut client = broker.client(Synthetic::honest());
    assert_eq!(client.resource("default", "key", "one").unwrap(), SECRET);
    // A second resource rides on the same session: no second attestation.
    assert_eq!(client.resource("default", "key", "one").unwrap(), SECRET);
    assert_eq!(
        broker.requests(),
        [
            "POST /kbs/v0/auth HTTP/1.1",
            "POST /kbs/v0/attest HTTP/1.1",
            "GET /kbs/v0/resource/default/key/one HTTP/1.1",
            "GET /kbs/v0/resource/default/key/one HTTP/1.1",
        ]
    );
    // The secret never crossed the wire in the clear.
    let st = broker.state.lock().unwrap();
    assert!(st
        .sent
        .iter()
        .all(|b| !b.windows(SECRET.len()).any(|w| w == SECRET)));
}

#[test]
fn every_hash_the_broker_may_choose_binds() {
    for alg in [
        HashAlgorithm::Sha256,
        HashAlgorithm::Sha384,
        HashAlgorithm::Sha512,
    ] {
        let broker = Broker::start(synthetic_roots());
        broker.state.lock().unwrap().alg = alg;
        let mut client = broker.client(Synthetic::honest());
        assert_eq!(
            client.resource("default", "key", "one").unwrap(),
            SECRET,
            "{alg}"
        );
    }
}

#[test]
fn evidence_for_another_challenge_is_refused() {
    let broker = Broker::start(synthetic_roots());
    let mut replayed = Synthetic::honest();
    replayed.stale = Some([0x11; 64]);
    let (step, status, detail) = refused(
        broker
            .client(replayed)
            .resource("default", "key", "one")
            .unwrap_err(),
    );
    assert_eq!((step, status), ("the attestation", 401));
    assert!(detail.starts_with("the report data is 1111"), "{detail}");
    // No resource was asked for without a session.
    assert!(!broker.requests().iter().any(|r| r.starts_with("GET")));
}

#[test]
fn a_wrong_launch_or_init_data_is_refused() {
    let broker = Broker::start(synthetic_roots());
    let mut other_launch = Synthetic::honest();
    other_launch.measurement = [0x77; 48];
    let (_, _, detail) = refused(broker.client(other_launch).attest().unwrap_err());
    assert!(
        detail.starts_with("the launch measurement is 7777"),
        "{detail}"
    );

    // Evidence whose HOST_DATA is not the digest of the init-data sent.
    let mut other_init = Synthetic::honest();
    other_init.host_data = [0x33; 32];
    let (_, _, detail) = refused(broker.client(other_init).attest().unwrap_err());
    assert!(detail.starts_with("the host data is 3333"), "{detail}");

    // A broker pinned to another init-data refuses the document itself.
    broker.state.lock().unwrap().expected.host_data = Some([0x44; 32]);
    let (_, _, detail) = refused(broker.client(Synthetic::honest()).attest().unwrap_err());
    assert_eq!(detail, BrokerError::InitDataNotExpected.to_string());
}

#[test]
fn amds_real_report_chains_but_cannot_answer_a_challenge() {
    // Trusting AMD's roots: the chain and the signature pass (they are checked before
    // the report data), and the report, signed long ago, does not bind this nonce.
    let broker = Broker::start(amd_roots());
    let milan = hex::decode(MILAN_REPORT.trim()).unwrap();
    broker.state.lock().unwrap().expected = Expected {
        measurement: Some(milan[0x90..0xc0].try_into().unwrap()),
        ..Expected::default()
    };
    let (_, _, detail) = refused(broker.client(Milan).attest().unwrap_err());
    assert!(
        detail.starts_with("the report data is d447b55d"),
        "{detail}"
    );
    // Trusting only the synthetic roots, the real VCEK does not chain.
    let broker = Broker::start(synthetic_roots());
    let (_, _, detail) = refused(broker.client(Milan).attest().unwrap_err());
    assert!(detail.contains("does not chain"), "{detail}");
    // And the synthetic chain means nothing to a broker that trusts only AMD.
    let broker = Broker::start(amd_roots());
    let (_, _, detail) = refused(broker.client(Synthetic::honest()).attest().unwrap_err());
    assert!(detail.contains("does not chain"), "{detail}");
}

#[test]
fn one_flipped_bit_in_the_evidence_is_refused() {
    // Straight through the broker's check, for speed: every byte of the report, one bit.
    let attester = Synthetic::honest();
    let key = jwe::TeeKey::generate();
    let runtime_data = kbs_types::RuntimeData {
        nonce: "n".into(),
        tee_pubkey: key.public(),
    };
    let data = cocoon_confidential::kbs::runtime_report_data(&runtime_data, HashAlgorithm::Sha384);
    let report = attester.report(&data);
    let attestation = |report: &[u8]| Attestation {
        init_data: Some(kbs_types::InitData {
            format: "toml".into(),
            body: INIT_DATA.into(),
        }),
        runtime_data: runtime_data.clone(),
        tee_evidence: kbs_types::CompositeEvidence {
            primary_evidence: snp_evidence(report, Some(VCEK)),
            additional_evidence: String::new(),
        },
    };
    let roots = synthetic_roots();
    let expected = Expected {
        measurement: Some(MEASUREMENT),
        ..Expected::default()
    };
    let run = |r: &[u8]| {
        check(
            Tee::Snp,
            &attestation(r),
            "n",
            HashAlgorithm::Sha384,
            &roots,
            &expected,
        )
    };
    run(&report).expect("the untouched report passes");
    for at in 0..report.len() {
        let mut r = report.clone();
        r[at] ^= 1 << (at % 8);
        assert!(run(&r).is_err(), "a flip at {at:#x} passed");
    }
    // And the runtime data: another key or nonce than the evidence binds.
    let mut other = attestation(&report);
    other.runtime_data.tee_pubkey = jwe::TeeKey::generate().public();
    assert!(check(
        Tee::Snp,
        &other,
        "n",
        HashAlgorithm::Sha384,
        &roots,
        &expected
    )
    .is_err());
    assert!(matches!(
        check(
            Tee::Snp,
            &attestation(&report),
            "m",
            HashAlgorithm::Sha384,
            &roots,
            &expected
        ),
        Err(BrokerError::Nonce { .. })
    ));
}

#[test]
fn a_lost_session_attests_again() {
    let broker = Broker::start(synthetic_roots());
    let mut client = broker.client(Synthetic::honest());
    assert_eq!(client.resource("default", "key", "one").unwrap(), SECRET);
    broker.state.lock().unwrap().sessions.clear();
    assert_eq!(client.resource("default", "key", "one").unwrap(), SECRET);
    let auths = broker
        .requests()
        .iter()
        .filter(|r| r.contains("/auth"))
        .count();
    assert_eq!(auths, 2);
}

#[test]
fn an_altered_response_does_not_open() {
    let broker = Broker::start(synthetic_roots());
    broker.state.lock().unwrap().tamper = true;
    let e = broker
        .client(Synthetic::honest())
        .resource("default", "key", "one")
        .unwrap_err();
    assert!(matches!(e, KbsError::Decrypt(_)), "{e}");
}

#[test]
fn unknown_and_unnameable_resources() {
    let broker = Broker::start(synthetic_roots());
    let mut client = broker.client(Synthetic::honest());
    let e = client.resource("default", "key", "two").unwrap_err();
    assert!(
        matches!(e, KbsError::NotFound(ref n) if n == "default/key/two"),
        "{e}"
    );
    let before = broker.requests().len();
    for (repo, kind, tag) in [
        ("..", "key", "one"),
        ("default", "a/b", "one"),
        ("default", "key", ""),
    ] {
        assert!(matches!(
            client.resource(repo, kind, tag),
            Err(KbsError::ResourceName(_))
        ));
    }
    assert_eq!(
        broker.requests().len(),
        before,
        "a bad name reached the broker"
    );
}

#[test]
fn a_flooding_or_silent_broker_is_bounded() {
    let broker = Broker::start(synthetic_roots());
    broker.state.lock().unwrap().flood = Some(3 << 20);
    let e = broker
        .client(Synthetic::honest())
        .attest()
        .unwrap_err()
        .to_string();
    assert!(e.contains("exceeds"), "{e}");

    // Accepts, never answers: the deadline ends the wait.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let mut http = Http::new(&url, Duration::from_millis(300)).unwrap();
    let t = std::time::Instant::now();
    let e = http
        .exchange("POST", "/kbs/v0/auth", None, Some(b"{}"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("receive"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    drop(silent);

    // Drips a byte every 100 ms, each read well within the 300 ms: the exchange as a
    // whole still ends at its deadline.
    let drip = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", drip.local_addr().unwrap());
    std::thread::spawn(move || {
        let Ok((mut conn, _)) = drip.accept() else {
            return;
        };
        while std::io::Write::write_all(&mut conn, b"H").is_ok() {
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let mut http = Http::new(&url, Duration::from_millis(300)).unwrap();
    let t = std::time::Instant::now();
    let e = http
        .exchange("POST", "/kbs/v0/auth", None, Some(b"{}"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("out of time"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[test]
fn a_broker_that_expects_no_measurement_releases_nothing() {
    let broker = Broker::start(synthetic_roots());
    broker.state.lock().unwrap().expected = Expected::default();
    let (_, _, detail) = refused(broker.client(Synthetic::honest()).attest().unwrap_err());
    assert_eq!(detail, BrokerError::NoMeasurement.to_string());
}

#[test]
fn a_report_must_claim_its_vceks_chip_and_tcb() {
    let broker = Broker::start(synthetic_roots());
    // A newer SNP firmware than the VCEK was issued for: an old VCEK vouching for it.
    let mut newer = Synthetic::honest();
    newer.tcb[6] = 9;
    let (_, _, detail) = refused(broker.client(newer).attest().unwrap_err());
    assert_eq!(
        detail,
        "the report claims SNP SPL 9, its VCEK was issued for 8"
    );
    let mut other_chip = Synthetic::honest();
    other_chip.chip_id[63] ^= 1;
    let (_, _, detail) = refused(broker.client(other_chip).attest().unwrap_err());
    assert!(detail.contains("CHIP_ID"), "{detail}");
    // A guest policy that masks the chip id (MASK_CHIP_ID) is not a mismatch.
    let mut masked = Synthetic::honest();
    masked.chip_id = [0; 64];
    broker.client(masked).attest().expect("a masked chip id");
}

#[test]
fn over_tls_only_the_pinned_ca_is_trusted() {
    let broker = Broker::start_tls(synthetic_roots());
    let client = |ca: Option<&str>| {
        let http = Http::with_ca(&broker.url, Duration::from_secs(10), ca);
        http.map(|h| Client::new(h, Synthetic::honest(), Some(INIT_DATA.to_owned())))
    };
    let mut pinned = client(Some(TLS_CA)).unwrap();
    assert_eq!(pinned.resource("default", "key", "one").unwrap(), SECRET);
    // A broker whose certificate another CA signed: the handshake fails, nothing is sent.
    let before = broker.requests().len();
    let e = client(Some(OTHER_CA))
        .unwrap()
        .attest()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("certificate") || e.contains("UnknownIssuer"),
        "{e}"
    );
    assert_eq!(broker.requests().len(), before);
    // https without a pinned CA is refused before connecting.
    let e = client(None).err().unwrap().to_string();
    assert!(e.contains("needs the broker's CA certificate"), "{e}");
    let e = client(Some("not a certificate")).err().unwrap().to_string();
    assert!(e.contains("no PEM certificate"), "{e}");
}

#[test]
fn a_real_td_quote_verifies_through_the_exchange_but_cannot_answer_a_challenge() {
    use cocoon_confidential::tdx::verify::{verify_quote, Expected as TdExpected};
    let any_status = [
        "UpToDate",
        "SWHardeningNeeded",
        "ConfigurationNeeded",
        "OutOfDate",
    ]
    .map(String::from)
    .to_vec();
    let lax = TdExpected {
        accept_status: any_status.clone(),
        ..TdExpected::default()
    };
    let sample = verify_quote(TD_QUOTE, TD_COLLATERAL, TD_NOW, &lax).unwrap();
    assert_eq!(
        cocoon_confidential::kbs::attester::tdx_report_data(TD_QUOTE),
        Some(&sample.report_data[..]),
        "REPORTDATA's offset in a v4 quote"
    );
    let policy = |mr_td| TdxPolicy {
        collateral: TD_COLLATERAL.to_vec(),
        now_secs: TD_NOW,
        expected: TdExpected {
            mr_td: Some(mr_td),
            rtmrs: [None, Some(sample.rtmrs[1]), Some(sample.rtmrs[2]), None],
            accept_status: any_status.clone(),
            ..TdExpected::default()
        },
    };
    let broker = Broker::start(synthetic_roots());
    broker.state.lock().unwrap().tdx = Some(policy(sample.mr_td));
    // The quote, its chain and its TCB check out; the init-data the client sends is not
    // what the sample TD was launched with, and its REPORTDATA is not this nonce's.
    let (_, _, detail) = refused(broker.client(SampleTd).attest().unwrap_err());
    assert!(detail.starts_with("MRCONFIGID is "), "{detail}");
    // Without init-data, the launch must have bound none (MRCONFIGID zero): the sample's
    // is, so what is left is the binding, not this challenge's.
    let http = Http::new(&broker.url, Duration::from_secs(10)).unwrap();
    let e = Client::new(http, SampleTd, None).attest().unwrap_err();
    let (_, _, detail) = refused(e);
    let zero_config = sample.mr_config_id == [0; 48];
    let want = if zero_config {
        "the report data is "
    } else {
        "MRCONFIGID is "
    };
    assert!(detail.starts_with(want), "{detail}");
    // Another TD image: refused before anything else of it is looked at.
    broker.state.lock().unwrap().tdx = Some(policy([0x5a; 48]));
    let (_, _, detail) = refused(broker.client(SampleTd).attest().unwrap_err());
    assert!(detail.starts_with("MRTD is "), "{detail}");
    // A broker that expects no TD image, or only its firmware, releases nothing.
    for unset in [0, 2, 3] {
        let mut lax = policy(sample.mr_td);
        match unset {
            0 => lax.expected.mr_td = None,
            i => lax.expected.rtmrs[i - 1] = None,
        }
        broker.state.lock().unwrap().tdx = Some(lax);
        let (_, _, detail) = refused(broker.client(SampleTd).attest().unwrap_err());
        assert_eq!(detail, BrokerError::NoMeasurement.to_string(), "{unset}");
    }
}
