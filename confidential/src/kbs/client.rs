//! The client's side of the exchange: attest once per session, then fetch resources,
//! attesting again when the broker says the session is gone.

use kbs_types::{
    Attestation, Challenge, CompositeEvidence, HashAlgorithm, InitData, Request, RuntimeData,
};
use serde_json::Value;

use super::http::{Reply, Transport};
use super::jwe::TeeKey;
use super::{
    check_name, runtime_report_data, Attester, KbsError, HASH_ALGORITHMS, PREFIX, PROTOCOL_VERSION,
};

/// A session with one broker.
pub struct Client<T, A> {
    transport: T,
    attester: A,
    /// The init-data TOML the launch measured, sent so the broker can check its digest
    /// against the evidence and read the policy in it.
    init_data: Option<String>,
    session: Option<Session>,
}

struct Session {
    id: String,
    key: TeeKey,
}

impl<T: Transport, A: Attester> Client<T, A> {
    pub fn new(transport: T, attester: A, init_data: Option<String>) -> Client<T, A> {
        Client {
            transport,
            attester,
            init_data,
            session: None,
        }
    }

    /// Request, challenge, attestation: a session whose key the evidence vouches for.
    pub fn attest(&mut self) -> Result<(), KbsError> {
        self.session = None;
        let request = Request {
            version: PROTOCOL_VERSION.into(),
            tee: self.attester.tee(),
            extra_params: serde_json::json!({ "supported-hash-algorithms": HASH_ALGORITHMS }),
        };
        let reply = self.post(
            "auth",
            &serde_json::to_vec(&request).expect("serializes"),
            None,
        )?;
        expect_ok("the request (auth)", &reply)?;
        let id = reply.session.ok_or_else(|| KbsError::Malformed {
            what: "challenge",
            detail: format!("no {} cookie", super::SESSION_COOKIE),
        })?;
        let challenge: Challenge =
            serde_json::from_slice(&reply.body).map_err(|e| KbsError::Malformed {
                what: "challenge",
                detail: e.to_string(),
            })?;
        let alg = chosen_algorithm(&challenge.extra_params)?;

        let key = TeeKey::generate();
        let runtime_data = RuntimeData {
            nonce: challenge.nonce,
            tee_pubkey: key.public(),
        };
        let evidence = self
            .attester
            .evidence(&runtime_report_data(&runtime_data, alg))?;
        let attestation = Attestation {
            init_data: self.init_data.clone().map(|body| InitData {
                format: "toml".into(),
                body,
            }),
            runtime_data,
            tee_evidence: CompositeEvidence {
                primary_evidence: evidence,
                additional_evidence: String::new(),
            },
        };
        let body = serde_json::to_vec(&attestation).expect("serializes");
        let reply = self.post("attest", &body, Some(&id))?;
        expect_ok("the attestation", &reply)?;
        // A broker may renew the cookie with the attestation's result.
        let id = reply.session.unwrap_or(id);
        self.session = Some(Session { id, key });
        Ok(())
    }

    /// The resource `repository/type/tag`, decrypted. Attests first when there is no
    /// session, and once more when the broker no longer knows the session.
    pub fn resource(
        &mut self,
        repository: &str,
        kind: &str,
        tag: &str,
    ) -> Result<Vec<u8>, KbsError> {
        let path = format!(
            "{PREFIX}/resource/{}/{}/{}",
            check_name(repository)?,
            check_name(kind)?,
            check_name(tag)?
        );
        for attempt in 0..2 {
            if self.session.is_none() {
                self.attest()?;
            }
            let session = self.session.as_ref().expect("attested");
            let reply = self
                .transport
                .exchange("GET", &path, Some(&session.id), None)?;
            match reply.status {
                200 => {
                    return session
                        .key
                        .open(&reply.body)
                        .map_err(|e| KbsError::Decrypt(e.to_string()))
                }
                401 if attempt == 0 => self.session = None,
                404 => return Err(KbsError::NotFound(format!("{repository}/{kind}/{tag}"))),
                _ => expect_ok("the resource request", &reply)?,
            }
        }
        unreachable!("the second attempt returns")
    }

    fn post(&mut self, step: &str, body: &[u8], session: Option<&str>) -> Result<Reply, KbsError> {
        self.transport
            .exchange("POST", &format!("{PREFIX}/{step}"), session, Some(body))
    }
}

/// The hash the broker chose for the runtime data's binding: one we offered, SHA-384
/// when it names none (the protocol's default).
fn chosen_algorithm(extra: &Value) -> Result<HashAlgorithm, KbsError> {
    let Some(name) = extra.get("selected-hash-algorithm") else {
        return Ok(HashAlgorithm::Sha384);
    };
    let text = name.as_str().unwrap_or_default();
    HASH_ALGORITHMS
        .into_iter()
        .find(|a| a.as_ref().eq_ignore_ascii_case(text))
        .ok_or_else(|| KbsError::HashAlgorithm(name.to_string()))
}

/// Anything but 200 is the broker's refusal, with its error text (bounded).
fn expect_ok(step: &'static str, reply: &Reply) -> Result<(), KbsError> {
    if reply.status == 200 {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&reply.body);
    let detail: String = serde_json::from_slice::<Value>(&reply.body)
        .ok()
        .and_then(|v| v.get("detail").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| text.into_owned())
        .chars()
        .take(512)
        .collect();
    Err(KbsError::Refused {
        step,
        status: reply.status,
        detail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_broker_must_choose_an_offered_hash() {
        assert_eq!(
            chosen_algorithm(&serde_json::json!({})).unwrap(),
            HashAlgorithm::Sha384
        );
        let v = serde_json::json!({"selected-hash-algorithm": "SHA512"});
        assert_eq!(chosen_algorithm(&v).unwrap(), HashAlgorithm::Sha512);
        for bad in [
            serde_json::json!({"selected-hash-algorithm": "sm3"}),
            serde_json::json!({"selected-hash-algorithm": 5}),
        ] {
            assert!(matches!(
                chosen_algorithm(&bad),
                Err(KbsError::HashAlgorithm(_))
            ));
        }
    }
}
