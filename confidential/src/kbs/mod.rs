//! A key broker client: what a confidential guest runs to trade its hardware evidence for
//! secrets, speaking the "Request-Challenge-Attestation-Response" protocol of
//! Confidential Containers' key broker (Trustee's `docs/kbs_attestation_protocol.md`,
//! protocol version 0.4.0, with the `kbs-types` crate's messages):
//!
//! 1. `POST /kbs/v0/auth` with a `Request` (the TEE, the hash algorithms we take) →
//!    a `Challenge` (a nonce, the algorithm chosen) and a `kbs-session-id` cookie;
//! 2. a fresh P-256 key pair (`jwe::TeeKey`); the runtime data `{nonce, tee-pubkey}`,
//!    serialized canonically (RFC 8785) and hashed, becomes the evidence's report data,
//!    so the evidence vouches for this key and this challenge;
//! 3. `POST /kbs/v0/attest` with the `Attestation` (runtime data, evidence, and the
//!    init-data, whose digest the launch bound into the evidence);
//! 4. `GET /kbs/v0/resource/<repository>/<type>/<tag>` → a JWE only the key of step 2
//!    opens.
//!
//! Why our own and not guest-components' `kbs_protocol`: that crate is async (tokio,
//! reqwest with a TLS stack) and would add several megabytes to an agent that is
//! synchronous where it waits for the broker; the protocol is four requests. The
//! transport sits behind `Transport` so a test drives the client over real TCP against a
//! broker it runs itself (`tests/kbs.rs`).

use kbs_types::{HashAlgorithm, RuntimeData, Tee, TeePubKey};
use serde_json::Value;

pub mod attester;
#[cfg(feature = "verify")]
pub mod broker;
pub mod client;
pub mod http;
pub mod jwe;

/// The protocol version this client speaks (the broker checks it).
pub const PROTOCOL_VERSION: &str = "0.4.0";
/// The broker's path prefix.
pub const PREFIX: &str = "/kbs/v0";
/// The session cookie's name.
pub const SESSION_COOKIE: &str = "kbs-session-id";
/// The hash algorithms the client offers for the runtime data's binding.
pub const HASH_ALGORITHMS: [HashAlgorithm; 3] = [
    HashAlgorithm::Sha256,
    HashAlgorithm::Sha384,
    HashAlgorithm::Sha512,
];

/// Why a broker exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum KbsError {
    #[error("cannot reach the key broker at {url}: {detail}")]
    Transport { url: String, detail: String },
    #[error("the key broker's {what} is malformed: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("the key broker refused {step} (HTTP {status}): {detail}")]
    Refused {
        step: &'static str,
        status: u16,
        detail: String,
    },
    #[error("the key broker has no resource {0}")]
    NotFound(String),
    #[error("no evidence for the key broker: {0}")]
    Evidence(String),
    #[error("the key broker's response cannot be opened: {0}")]
    Decrypt(String),
    #[error("{0:?} is not a resource name part (letters, digits, '.', '_', '-'; not '.' or '..')")]
    ResourceName(String),
    #[error("the key broker chose the hash algorithm {0:?}, not one this client offered")]
    HashAlgorithm(String),
}

/// Where evidence comes from: the guest's TEE through configfs-tsm in production
/// (`attester::SnpTsm`), a test's own signer in tests.
pub trait Attester {
    /// The TEE, as the broker names it.
    fn tee(&self) -> Tee;
    /// Evidence whose report data is `report_data`, as the JSON the broker verifies.
    fn evidence(&self, report_data: &[u8; 64]) -> Result<Value, KbsError>;
}

/// The report data that binds `runtime`: the digest of its canonical JSON, with the
/// additional-evidence field guest-components adds (empty: no device evidence),
/// zero-padded to the report's 64 bytes.
pub fn runtime_report_data(runtime: &RuntimeData, alg: HashAlgorithm) -> [u8; 64] {
    let value = serde_json::json!({
        "tee-pubkey": pubkey_value(&runtime.tee_pubkey),
        "nonce": runtime.nonce,
        "additional-evidence": "",
    });
    let digest = alg.digest(canonical_json(&value).as_bytes());
    let mut out = [0u8; 64];
    let n = digest.len().min(64);
    out[..n].copy_from_slice(&digest[..n]);
    out
}

fn pubkey_value(key: &TeePubKey) -> Value {
    serde_json::to_value(key).expect("a public key serializes")
}

/// JSON in RFC 8785's canonical form: object members sorted by their names' UTF-16 code
/// units, no whitespace, strings escaped minimally. Written here rather than relying on
/// `serde_json`'s map order, which a workspace feature (`preserve_order`) changes.
/// Numbers other than integers do not occur in the runtime data and are written as
/// `serde_json` writes them.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            members.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
            out.push('{');
            for (i, (name, v)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(name.clone()).to_string());
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// A resource path part: what the broker's URL scheme allows, and nothing that could
/// walk its store (`..`) or add a segment.
pub(crate) fn check_name(part: &str) -> Result<&str, KbsError> {
    if crate::initdata::resource_part(part) {
        Ok(part)
    } else {
        Err(KbsError::ResourceName(part.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_sorts_members_at_every_level() {
        let v = serde_json::json!({"nonce": "n\"1", "b": [{"z": 1, "a": null}], "a": true});
        assert_eq!(
            canonical_json(&v),
            r#"{"a":true,"b":[{"a":null,"z":1}],"nonce":"n\"1"}"#
        );
    }

    #[test]
    fn runtime_report_data_hashes_the_canonical_runtime_data() {
        let runtime = RuntimeData {
            nonce: "bm9uY2U".into(),
            tee_pubkey: TeePubKey::EC {
                crv: "P-256".into(),
                alg: "ECDH-ES+A256KW".into(),
                x: "eA".into(),
                y: "eQ".into(),
            },
        };
        // The canonical text, written out by hand: members sorted, "kty" from the tag.
        let text = r#"{"additional-evidence":"","nonce":"bm9uY2U","tee-pubkey":{"alg":"ECDH-ES+A256KW","crv":"P-256","kty":"EC","x":"eA","y":"eQ"}}"#;
        let data = runtime_report_data(&runtime, HashAlgorithm::Sha384);
        assert_eq!(
            data[..48],
            HashAlgorithm::Sha384.digest(text.as_bytes())[..]
        );
        assert_eq!(data[48..], [0u8; 16]);
        let data = runtime_report_data(&runtime, HashAlgorithm::Sha512);
        assert_eq!(data[..], HashAlgorithm::Sha512.digest(text.as_bytes())[..]);
    }

    #[test]
    fn resource_names_cannot_walk_or_add_segments() {
        for bad in ["", ".", "..", "a/b", "a%2Fb", "a?b", "é", &"x".repeat(129)] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["default", "key", "1", "my-key_v2.pem"] {
            assert_eq!(check_name(good).unwrap(), good);
        }
    }
}
