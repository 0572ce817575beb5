//! The ID block and its authentication structure (SEV-SNP ABI, `SNP_LAUNCH_FINISH`):
//! what a guest owner signs so that the SEV firmware itself refuses a launch whose digest
//! or policy differ from what the owner expected, and so that the guest's attestation
//! reports carry the owner's identity (FAMILY_ID, IMAGE_ID, the ID key's and author
//! key's digests) beside the measurement.
//!
//! The ID block (96 bytes) holds the expected launch digest, the family and image ids,
//! version 1, the guest SVN and the policy. The ID authentication structure (4 KiB)
//! holds the ID block's signature by the ID key (ECDSA P-384 with SHA-384), the ID key,
//! and optionally the ID key's signature by an author key and the author key. Points and
//! signature halves are little-endian in 72-byte fields (the ABI's ECDSA formats).
//!
//! Layout checked against the ABI tables and the `sev` crate's types (which need
//! OpenSSL, so they are not used here): `tests` rebuilds both structures by hand.

use p384::ecdsa::signature::{Signer, Verifier};
use p384::ecdsa::{Signature, SigningKey, VerifyingKey};
use sha2::{Digest, Sha384};

/// An ID block's size.
pub const ID_BLOCK_LEN: usize = 96;
/// The ID authentication structure's size.
pub const ID_AUTH_LEN: usize = 4096;
/// An ECDSA public key structure's size (curve, Qx, Qy, reserved).
pub const PUBKEY_LEN: usize = 0x404;
/// An ECDSA signature structure's size (R, S, reserved).
const SIG_LEN: usize = 0x200;
/// A coordinate or signature half: 576 bits, little-endian.
const POINT: usize = 72;
/// ECDSA P-384 with SHA-384 (`ID_KEY_ALGO`, `AUTH_KEY_ALGO`).
const ALGO_ECDSA_P384_SHA384: u32 = 1;
/// The P-384 curve, in a public key structure.
const CURVE_P384: u32 = 2;

// Offsets in the ID authentication structure.
const ID_BLOCK_SIG: usize = 0x40;
const ID_KEY: usize = 0x240;
const ID_KEY_SIG: usize = 0x680;
const AUTHOR_KEY: usize = 0x880;

#[derive(Debug, thiserror::Error)]
pub enum IdBlockError {
    #[error("{0} is not an EC P-384 private key in PEM (PKCS#8 or SEC1): {1}")]
    Key(String, String),
    #[error("the ID authentication structure: {0}")]
    Auth(&'static str),
}

/// What the owner expects of a launch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdBlock {
    /// The launch digest (`cocoon measure snp`).
    pub launch_digest: [u8; 48],
    pub family_id: [u8; 16],
    pub image_id: [u8; 16],
    pub guest_svn: u32,
    /// The guest policy, which must equal the launch's.
    pub policy: u64,
}

impl IdBlock {
    pub fn to_bytes(&self) -> [u8; ID_BLOCK_LEN] {
        let mut b = [0u8; ID_BLOCK_LEN];
        b[..0x30].copy_from_slice(&self.launch_digest);
        b[0x30..0x40].copy_from_slice(&self.family_id);
        b[0x40..0x50].copy_from_slice(&self.image_id);
        b[0x50..0x54].copy_from_slice(&1u32.to_le_bytes()); // VERSION
        b[0x54..0x58].copy_from_slice(&self.guest_svn.to_le_bytes());
        b[0x58..0x60].copy_from_slice(&self.policy.to_le_bytes());
        b
    }
}

/// An EC P-384 private key from PEM (`openssl ecparam -name secp384r1 -genkey`, with or
/// without its parameters block, or PKCS#8); `name` says where it came from in errors.
pub fn signing_key(pem: &str, name: &str) -> Result<SigningKey, IdBlockError> {
    use p384::pkcs8::DecodePrivateKey;
    let secret = if let Some(at) = pem.find("-----BEGIN EC PRIVATE KEY-----") {
        p384::SecretKey::from_sec1_pem(&pem[at..]).map_err(|e| e.to_string())
    } else {
        p384::SecretKey::from_pkcs8_pem(pem).map_err(|e| e.to_string())
    };
    secret
        .map(SigningKey::from)
        .map_err(|e| IdBlockError::Key(name.to_owned(), e))
}

/// A public key as the ABI lays it out.
pub fn public_key_bytes(key: &VerifyingKey) -> [u8; PUBKEY_LEN] {
    let point = key.to_encoded_point(false);
    let mut b = [0u8; PUBKEY_LEN];
    b[..4].copy_from_slice(&CURVE_P384.to_le_bytes());
    b[4..4 + 48].copy_from_slice(&little_endian(point.x().expect("uncompressed")));
    b[4 + POINT..4 + POINT + 48].copy_from_slice(&little_endian(point.y().expect("uncompressed")));
    b
}

/// What an attestation report shows for a key (ID_KEY_DIGEST, AUTHOR_KEY_DIGEST).
pub fn key_digest(key: &VerifyingKey) -> [u8; 48] {
    Sha384::digest(public_key_bytes(key)).into()
}

fn little_endian(big: &[u8]) -> Vec<u8> {
    big.iter().rev().copied().collect()
}

fn signature_bytes(sig: &Signature) -> [u8; SIG_LEN] {
    let (r, s) = sig.split_bytes();
    let mut b = [0u8; SIG_LEN];
    b[..48].copy_from_slice(&little_endian(&r));
    b[POINT..POINT + 48].copy_from_slice(&little_endian(&s));
    b
}

/// The ID authentication structure for `block`: signed by `id_key`, and the ID key signed
/// by `author_key` when given (then `SNP_LAUNCH_FINISH` needs `AUTH_KEY_EN`).
pub fn id_auth(
    block: &IdBlock,
    id_key: &SigningKey,
    author_key: Option<&SigningKey>,
) -> [u8; ID_AUTH_LEN] {
    let mut a = [0u8; ID_AUTH_LEN];
    a[..4].copy_from_slice(&ALGO_ECDSA_P384_SHA384.to_le_bytes());
    let block_sig: Signature = id_key.sign(&block.to_bytes());
    a[ID_BLOCK_SIG..ID_BLOCK_SIG + SIG_LEN].copy_from_slice(&signature_bytes(&block_sig));
    let id_pub = public_key_bytes(id_key.verifying_key());
    a[ID_KEY..ID_KEY + PUBKEY_LEN].copy_from_slice(&id_pub);
    if let Some(author) = author_key {
        a[4..8].copy_from_slice(&ALGO_ECDSA_P384_SHA384.to_le_bytes());
        let key_sig: Signature = author.sign(&id_pub);
        a[ID_KEY_SIG..ID_KEY_SIG + SIG_LEN].copy_from_slice(&signature_bytes(&key_sig));
        a[AUTHOR_KEY..AUTHOR_KEY + PUBKEY_LEN]
            .copy_from_slice(&public_key_bytes(author.verifying_key()));
    }
    a
}

/// The checks the SEV firmware makes at `SNP_LAUNCH_FINISH` on the signatures (the
/// launch digest and policy it compares with the launch itself): the ID block's
/// signature under the embedded ID key and, with `author`, the ID key's under the
/// embedded author key. Returns the ID key's digest and the author key's.
pub fn check(
    block: &[u8; ID_BLOCK_LEN],
    auth: &[u8; ID_AUTH_LEN],
    author: bool,
) -> Result<([u8; 48], Option<[u8; 48]>), IdBlockError> {
    let algorithm = |at: usize| u32::from_le_bytes(auth[at..at + 4].try_into().expect("4 bytes"));
    if algorithm(0) != ALGO_ECDSA_P384_SHA384 || (author && algorithm(4) != ALGO_ECDSA_P384_SHA384)
    {
        return Err(IdBlockError::Auth(
            "a key algorithm other than ECDSA P-384 with SHA-384",
        ));
    }
    let id_key = read_key(&auth[ID_KEY..ID_KEY + PUBKEY_LEN])?;
    read_sig(&auth[ID_BLOCK_SIG..ID_BLOCK_SIG + SIG_LEN]).and_then(|s| {
        id_key
            .verify(block, &s)
            .map_err(|_| IdBlockError::Auth("the ID block's signature does not verify"))
    })?;
    let author_digest = match author {
        false => None,
        true => {
            let author_key = read_key(&auth[AUTHOR_KEY..AUTHOR_KEY + PUBKEY_LEN])?;
            let sig = read_sig(&auth[ID_KEY_SIG..ID_KEY_SIG + SIG_LEN])?;
            author_key
                .verify(&auth[ID_KEY..ID_KEY + PUBKEY_LEN], &sig)
                .map_err(|_| IdBlockError::Auth("the ID key's signature does not verify"))?;
            Some(key_digest(&author_key))
        }
    };
    Ok((key_digest(&id_key), author_digest))
}

fn big_endian_48(le: &[u8]) -> Result<[u8; 48], IdBlockError> {
    if le[48..POINT].iter().any(|&b| b != 0) {
        return Err(IdBlockError::Auth("a P-384 value wider than 384 bits"));
    }
    let mut be = [0u8; 48];
    be.copy_from_slice(&little_endian(&le[..48]));
    Ok(be)
}

fn read_key(b: &[u8]) -> Result<VerifyingKey, IdBlockError> {
    if b[..4] != CURVE_P384.to_le_bytes() {
        return Err(IdBlockError::Auth("a key that is not on P-384"));
    }
    let (x, y) = (
        big_endian_48(&b[4..4 + POINT])?,
        big_endian_48(&b[4 + POINT..4 + 2 * POINT])?,
    );
    let point = p384::EncodedPoint::from_affine_coordinates(&x.into(), &y.into(), false);
    VerifyingKey::from_encoded_point(&point).map_err(|_| IdBlockError::Auth("a key off the curve"))
}

fn read_sig(b: &[u8]) -> Result<Signature, IdBlockError> {
    let (r, s) = (
        big_endian_48(&b[..POINT])?,
        big_endian_48(&b[POINT..2 * POINT])?,
    );
    Signature::from_scalars(r, s).map_err(|_| IdBlockError::Auth("a malformed signature"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_slice(&[seed; 48]).unwrap()
    }

    fn block() -> IdBlock {
        IdBlock {
            launch_digest: [0xaa; 48],
            family_id: [1; 16],
            image_id: [2; 16],
            guest_svn: 7,
            policy: 0x30000,
        }
    }

    #[test]
    fn the_id_block_is_laid_out_as_the_abi_says() {
        let b = block().to_bytes();
        let mut by_hand = vec![0xaa; 48];
        by_hand.extend([1; 16]);
        by_hand.extend([2; 16]);
        by_hand.extend(1u32.to_le_bytes());
        by_hand.extend(7u32.to_le_bytes());
        by_hand.extend(0x30000u64.to_le_bytes());
        assert_eq!(b.to_vec(), by_hand);
    }

    #[test]
    fn keys_and_signatures_are_little_endian_in_72_byte_fields() {
        let k = key(3);
        let p = public_key_bytes(k.verifying_key());
        let point = k.verifying_key().to_encoded_point(false);
        let mut x = point.x().unwrap().to_vec();
        x.reverse();
        assert_eq!(&p[..4], &2u32.to_le_bytes());
        assert_eq!(&p[4..52], &x[..]);
        assert!(p[52..76].iter().all(|&b| b == 0));
        assert_eq!(
            key_digest(k.verifying_key()),
            <[u8; 48]>::from(Sha384::digest(p))
        );

        let auth = id_auth(&block(), &k, None);
        assert_eq!(
            &auth[..8],
            &[1, 0, 0, 0, 0, 0, 0, 0],
            "ID key algorithm only"
        );
        let sig: Signature = k.sign(&block().to_bytes());
        let (r, _) = sig.split_bytes();
        let mut r = r.to_vec();
        r.reverse();
        assert_eq!(&auth[0x40..0x40 + 48], &r[..]);
        assert_eq!(&auth[0x240..0x240 + PUBKEY_LEN], &p[..]);
        assert!(auth[0x680..].iter().all(|&b| b == 0), "no author key");
    }

    #[test]
    fn the_firmwares_checks_pass_and_any_change_fails() {
        let (id, author) = (key(3), key(4));
        let b = block();
        let auth = id_auth(&b, &id, Some(&author));
        let (id_digest, author_digest) = check(&b.to_bytes(), &auth, true).unwrap();
        assert_eq!(id_digest, key_digest(id.verifying_key()));
        assert_eq!(author_digest, Some(key_digest(author.verifying_key())));
        assert_eq!(&auth[4..8], &1u32.to_le_bytes(), "author key algorithm");

        // Another launch digest, SVN or policy than the one signed.
        for change in [0x00, 0x54, 0x58] {
            let mut other = b.to_bytes();
            other[change] ^= 1;
            assert!(check(&other, &auth, true).is_err(), "byte {change:#x}");
        }
        // A bit flipped in the algorithms, the signatures or either key.
        for at in [0x0, 0x4, 0x40, 0x88, 0x244, 0x680, 0x884] {
            let mut bad = auth;
            bad[at] ^= 1;
            assert!(check(&b.to_bytes(), &bad, true).is_err(), "offset {at:#x}");
        }
        // Without the author check, only the ID block's signature counts.
        let mut no_author = auth;
        no_author[0x680] ^= 1;
        assert!(check(&b.to_bytes(), &no_author, false).is_ok());
    }

    #[test]
    fn keys_load_from_pem_and_others_are_named() {
        use p384::pkcs8::{EncodePrivateKey, LineEnding};
        let k = p384::SecretKey::from_slice(&[5; 48]).unwrap();
        let pkcs8 = k.to_pkcs8_pem(LineEnding::LF).unwrap();
        let sec1 = k.to_sec1_pem(LineEnding::LF).unwrap();
        let with_params = format!(
            "-----BEGIN EC PARAMETERS-----\nBgUrgQQAIg==\n-----END EC PARAMETERS-----\n{}",
            sec1.as_str()
        );
        for pem in [pkcs8.as_str(), sec1.as_str(), with_params.as_str()] {
            let s = signing_key(pem, "id.pem").unwrap();
            assert_eq!(s.verifying_key(), SigningKey::from(&k).verifying_key());
        }
        let p256 = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n";
        let e = signing_key(p256, "wrong.pem").unwrap_err().to_string();
        assert!(e.contains("wrong.pem") && e.contains("P-384"), "{e}");
    }
}
