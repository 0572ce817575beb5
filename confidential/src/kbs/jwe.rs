//! The TEE key and the broker's encrypted responses: JSON Web Encryption (RFC 7516,
//! flattened JSON) with the content key wrapped by ECDH-ES+A256KW on P-256 (RFC 7518
//! §4.6: an ephemeral key from the broker, the Concat KDF over SHA-256, AES key wrap)
//! and the content under A256GCM. This is guest-components' default key type, the one
//! Trustee's broker answers with.
//!
//! The additional authenticated data is the `protected` member exactly as received
//! (RFC 7516 §5.2), not a re-serialization of the parsed header.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use kbs_types::TeePubKey;
use p256::elliptic_curve::sec1::{EncodedPoint, FromEncodedPoint, ToEncodedPoint};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The key-management algorithm, as the public key and the header name it.
pub const ALG: &str = "ECDH-ES+A256KW";
/// The content encryption.
pub const ENC: &str = "A256GCM";
const CURVE: &str = "P-256";
/// The most a response may hold (a resource is a key or a small document).
pub const MAX_RESPONSE: usize = 1 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JweError {
    #[error("the response is not JSON: {0}")]
    Json(String),
    #[error("the response lacks {0:?} or it is not a base64url string")]
    Member(&'static str),
    #[error("the protected header is malformed: {0}")]
    Header(String),
    #[error("the key algorithm is {0:?}, not {ALG}")]
    Alg(String),
    #[error("the content encryption is {0:?}, not {ENC}")]
    Enc(String),
    #[error("the broker's ephemeral key is not a P-256 point")]
    EphemeralKey,
    #[error("the content key does not unwrap with this TEE key (wrong key or altered)")]
    Unwrap,
    #[error("the content does not decrypt: altered, or not for this key")]
    Content,
    #[error("the TEE public key is not an EC P-256 {ALG} key")]
    PublicKey,
}

/// An ephemeral P-256 key made for one attestation; its public half travels in the
/// runtime data the evidence binds.
pub struct TeeKey {
    secret: p256::SecretKey,
}

impl TeeKey {
    pub fn generate() -> TeeKey {
        TeeKey {
            secret: p256::SecretKey::random(&mut rand_core::OsRng),
        }
    }

    /// The public key as the broker reads it (a JWK).
    pub fn public(&self) -> TeePubKey {
        jwk(&self.secret.public_key())
    }

    /// Opens a broker response (the JWE's JSON text).
    pub fn open(&self, response: &[u8]) -> Result<Vec<u8>, JweError> {
        let v: Value =
            serde_json::from_slice(response).map_err(|e| JweError::Json(e.to_string()))?;
        let text = |name: &'static str| {
            v.get(name)
                .and_then(Value::as_str)
                .ok_or(JweError::Member(name))
        };
        let bytes = |name: &'static str| {
            URL_SAFE_NO_PAD
                .decode(text(name)?)
                .map_err(|_| JweError::Member(name))
        };
        let protected = text("protected")?;
        let header: Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(protected)
                .map_err(|_| JweError::Member("protected"))?,
        )
        .map_err(|e| JweError::Header(e.to_string()))?;
        let field = |name: &str| header.get(name).and_then(Value::as_str);
        // Nothing this client would have to understand to read the content correctly.
        for unsupported in ["zip", "crit"] {
            if header.get(unsupported).is_some() {
                return Err(JweError::Header(format!(
                    "{unsupported:?} is not supported"
                )));
            }
        }
        if v.get("aad").is_some() {
            return Err(JweError::Header(
                "a JWE \"aad\" member is not supported".into(),
            ));
        }
        match field("alg") {
            Some(ALG) => {}
            other => return Err(JweError::Alg(other.unwrap_or_default().to_owned())),
        }
        match field("enc") {
            Some(ENC) => {}
            other => return Err(JweError::Enc(other.unwrap_or_default().to_owned())),
        }
        let epk = header
            .get("epk")
            .ok_or_else(|| JweError::Header("no \"epk\"".into()))?;
        let epk = public_from_jwk(epk).ok_or(JweError::EphemeralKey)?;
        let party = |name: &str| match field(name) {
            Some(s) => URL_SAFE_NO_PAD
                .decode(s)
                .map_err(|_| JweError::Header(format!("{name:?} is not base64url"))),
            None => Ok(Vec::new()),
        };
        let kek = key_encryption_key(&self.secret, &epk, &party("apu")?, &party("apv")?);
        let cek = aes_kw::KekAes256::from(kek)
            .unwrap_vec(&bytes("encrypted_key")?)
            .map_err(|_| JweError::Unwrap)?;
        let iv = bytes("iv")?;
        if iv.len() != 12 {
            return Err(JweError::Member("iv"));
        }
        let tag = bytes("tag")?;
        if tag.len() != 16 {
            return Err(JweError::Member("tag"));
        }
        let mut sealed = bytes("ciphertext")?;
        sealed.extend_from_slice(&tag);
        let cipher = aes_gcm::Aes256Gcm::new_from_slice(&cek).map_err(|_| JweError::Unwrap)?;
        cipher
            .decrypt(
                aes_gcm::Nonce::from_slice(&iv),
                Payload {
                    msg: &sealed,
                    aad: protected.as_bytes(),
                },
            )
            .map_err(|_| JweError::Content)
    }
}

fn jwk(key: &p256::PublicKey) -> TeePubKey {
    let point = key.to_encoded_point(false);
    TeePubKey::EC {
        crv: CURVE.into(),
        alg: ALG.into(),
        x: URL_SAFE_NO_PAD.encode(point.x().expect("uncompressed")),
        y: URL_SAFE_NO_PAD.encode(point.y().expect("uncompressed")),
    }
}

/// A P-256 public key from a JWK's `crv`, `x`, `y` (32 bytes each, on the curve).
fn public_from_jwk(v: &Value) -> Option<p256::PublicKey> {
    if v.get("crv")?.as_str()? != CURVE {
        return None;
    }
    let coord = |n: &str| -> Option<[u8; 32]> {
        URL_SAFE_NO_PAD
            .decode(v.get(n)?.as_str()?)
            .ok()?
            .try_into()
            .ok()
    };
    let (x, y) = (coord("x")?, coord("y")?);
    let point =
        EncodedPoint::<p256::NistP256>::from_affine_coordinates(&x.into(), &y.into(), false);
    Option::from(p256::PublicKey::from_encoded_point(&point))
}

/// ECDH, then RFC 7518's Concat KDF (one SHA-256 round gives the 256 bits A256KW needs):
/// SHA-256(counter 1 ‖ Z ‖ AlgorithmID ‖ PartyUInfo ‖ PartyVInfo ‖ keydatalen).
fn key_encryption_key(
    secret: &p256::SecretKey,
    public: &p256::PublicKey,
    apu: &[u8],
    apv: &[u8],
) -> [u8; 32] {
    let shared = p256::ecdh::diffie_hellman(secret.to_nonzero_scalar(), public.as_affine());
    concat_kdf(shared.raw_secret_bytes(), ALG.as_bytes(), apu, apv, 256)
}

/// One round of the Concat KDF (NIST SP 800-56A as RFC 7518 §4.6.2 uses it): enough for
/// keys up to 256 bits; the caller takes the first `bits / 8` bytes.
fn concat_kdf(z: &[u8], alg: &[u8], apu: &[u8], apv: &[u8], bits: u32) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(1u32.to_be_bytes());
    h.update(z);
    for part in [alg, apu, apv] {
        h.update((part.len() as u32).to_be_bytes());
        h.update(part);
    }
    h.update(bits.to_be_bytes());
    h.finalize().into()
}

/// The broker's side: encrypts `plaintext` to a TEE's public key. Used by the test
/// broker; a relying party that releases secrets itself can use it too.
#[cfg(feature = "verify")]
pub fn seal(to: &TeePubKey, plaintext: &[u8]) -> Result<Vec<u8>, JweError> {
    use rand_core::RngCore;
    let TeePubKey::EC { crv, alg, x, y } = to else {
        return Err(JweError::PublicKey);
    };
    if alg != ALG {
        return Err(JweError::PublicKey);
    }
    let recipient = public_from_jwk(&serde_json::json!({"crv": crv, "x": x, "y": y}))
        .ok_or(JweError::PublicKey)?;
    let ephemeral = p256::SecretKey::random(&mut rand_core::OsRng);
    let kek = key_encryption_key(&ephemeral, &recipient, &[], &[]);
    let mut cek = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut cek);
    let mut iv = [0u8; 12];
    rand_core::OsRng.fill_bytes(&mut iv);
    let TeePubKey::EC { crv, x, y, .. } = jwk(&ephemeral.public_key()) else {
        unreachable!("jwk makes EC keys")
    };
    let header = serde_json::json!({
        "alg": ALG,
        "enc": ENC,
        "epk": {"kty": "EC", "crv": crv, "x": x, "y": y},
    });
    let protected = URL_SAFE_NO_PAD.encode(header.to_string());
    let wrapped = aes_kw::KekAes256::from(kek)
        .wrap_vec(&cek)
        .map_err(|_| JweError::Unwrap)?;
    let cipher = aes_gcm::Aes256Gcm::new_from_slice(&cek).expect("a 32-byte key");
    let mut sealed = cipher
        .encrypt(
            aes_gcm::Nonce::from_slice(&iv),
            Payload {
                msg: plaintext,
                aad: protected.as_bytes(),
            },
        )
        .map_err(|_| JweError::Content)?;
    let tag = sealed.split_off(sealed.len() - 16);
    let b = |x: &[u8]| URL_SAFE_NO_PAD.encode(x);
    Ok(serde_json::json!({
        "protected": protected,
        "encrypted_key": b(&wrapped),
        "iv": b(&iv),
        "ciphertext": b(&sealed),
        "tag": b(&tag),
    })
    .to_string()
    .into_bytes())
}

#[cfg(all(test, feature = "verify"))]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_response_opens_with_its_key_only() {
        let key = TeeKey::generate();
        let sealed = seal(&key.public(), b"the secret").unwrap();
        assert_eq!(key.open(&sealed).unwrap(), b"the secret");
        // kbs-types reads what we write (the broker's Response type).
        let parsed: kbs_types::Response = serde_json::from_slice(&sealed).unwrap();
        assert_eq!(parsed.protected.alg, ALG);
        assert_eq!(TeeKey::generate().open(&sealed), Err(JweError::Unwrap));
    }

    #[test]
    fn any_altered_member_fails() {
        let key = TeeKey::generate();
        let sealed: Value =
            serde_json::from_slice(&seal(&key.public(), b"secret").unwrap()).unwrap();
        for member in ["protected", "encrypted_key", "iv", "ciphertext", "tag"] {
            let mut v = sealed.clone();
            let mut raw = URL_SAFE_NO_PAD.decode(v[member].as_str().unwrap()).unwrap();
            // The header's last byte is its closing brace: change one inside it.
            let at = if member == "protected" {
                raw.len() - 3
            } else {
                0
            };
            raw[at] ^= 1;
            v[member] = Value::String(URL_SAFE_NO_PAD.encode(&raw));
            let got = key.open(v.to_string().as_bytes());
            assert!(got.is_err(), "{member} altered still opened");
        }
    }

    #[test]
    fn members_the_client_would_have_to_understand_are_refused() {
        let key = TeeKey::generate();
        let sealed: Value = serde_json::from_slice(&seal(&key.public(), b"s").unwrap()).unwrap();
        let mut with_aad = sealed.clone();
        with_aad["aad"] = Value::String("eA".into());
        let e = key.open(with_aad.to_string().as_bytes()).unwrap_err();
        assert!(e.to_string().contains("aad"), "{e}");
        let mut header: Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(sealed["protected"].as_str().unwrap())
                .unwrap(),
        )
        .unwrap();
        header["zip"] = Value::String("DEF".into());
        let mut zipped = sealed.clone();
        zipped["protected"] = Value::String(URL_SAFE_NO_PAD.encode(header.to_string()));
        let e = key.open(zipped.to_string().as_bytes()).unwrap_err();
        assert!(e.to_string().contains("zip"), "{e}");
    }

    #[test]
    fn the_kdf_matches_rfc_7518_appendix_c() {
        // RFC 7518 Appendix C: ECDH-ES with A128GCM, apu "Alice", apv "Bob".
        let d = |s: &str| URL_SAFE_NO_PAD.decode(s).unwrap();
        let bob =
            p256::SecretKey::from_slice(&d("VEmDZpDXXK8p8N0Cndsxs924q6nS1RXFASRl6BfUqdw")).unwrap();
        let alice_epk = public_from_jwk(&serde_json::json!({
            "crv": "P-256",
            "x": "gI0GAILBdu7T53akrFmMyGcsF3n5dO7MmwNBHKW5SV0",
            "y": "SLW_xSffzlPWrHEVI30DHM_4egVwt3NQqeUD7nMFpps",
        }))
        .unwrap();
        let shared = p256::ecdh::diffie_hellman(bob.to_nonzero_scalar(), alice_epk.as_affine());
        let key = concat_kdf(shared.raw_secret_bytes(), b"A128GCM", b"Alice", b"Bob", 128);
        assert_eq!(URL_SAFE_NO_PAD.encode(&key[..16]), "VqqN6vgjbSBcIijNcacQGg");
    }
}
