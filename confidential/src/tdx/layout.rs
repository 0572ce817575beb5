//! The container of a TDX quote (v4), read strictly. DCAP verification authenticates the
//! TD report, the QE report and the PCK chain up to Intel's root, but parts of the
//! container are not covered by any signature: the length and type fields around them,
//! the PEM text's whitespace, the copy of the root certificate, the padding after the
//! signature data. A verifier that let those vary would accept many encodings of one
//! quote; Cocoon accepts exactly one: every length exact, every type the expected one,
//! the chain in canonical PEM ending in Intel's root itself, and padding only zeros.
//!
//! Layout: header (48) | TD report (584) | signature data length (4) | signature (64) |
//! attestation key (64) | certification data type 6 (2), size (4): QE report (384), its
//! signature (64), QE auth data size (2) and data, certification data type 5 (2), size
//! (4), PCK certificate chain (PEM, then a NUL) | zero padding.

use base64::Engine;

/// Intel's SGX Root CA (DER; SHA-256 44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3,
/// valid to 2049), as built into `dcap-qvl`.
pub const INTEL_ROOT_CA_DER: &[u8] = include_bytes!("intel_sgx_root_ca.der");

const BODY_END: usize = 48 + 584;

fn u16_at(q: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(q.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(q: &[u8], at: usize) -> Option<usize> {
    Some(u32::from_le_bytes(q.get(at..at + 4)?.try_into().ok()?) as usize)
}

/// Checks the quote's container; the error says which part is off.
pub fn check(q: &[u8]) -> Result<(), String> {
    let short = || format!("the quote ends early ({} bytes)", q.len());
    let version = u16_at(q, 0).ok_or_else(short)?;
    if version != 4 {
        return Err(format!("quote version {version}: only version 4 is read"));
    }
    let key_type = u16_at(q, 2).ok_or_else(short)?;
    if key_type != 2 {
        return Err(format!(
            "attestation key type {key_type}, not 2 (ECDSA P-256)"
        ));
    }
    let tee = u32_at(q, 4).ok_or_else(short)?;
    if tee != 0x81 {
        return Err(format!("TEE type {tee:#x}, not 0x81 (TDX)"));
    }
    let sig_len = u32_at(q, BODY_END).ok_or_else(short)?;
    let sig_start = BODY_END + 4;
    let sig_end = sig_start
        .checked_add(sig_len)
        .filter(|e| *e <= q.len())
        .ok_or_else(|| format!("the signature data's length {sig_len} runs past the quote"))?;
    if q[sig_end..].iter().any(|b| *b != 0) {
        return Err("bytes after the signature data are not zero padding".into());
    }
    // Signature and attestation key, then the QE certification data.
    let cert = sig_start + 128;
    let (outer_type, outer_size) = (
        u16_at(q, cert).ok_or_else(short)?,
        u32_at(q, cert + 2).ok_or_else(short)?,
    );
    if outer_type != 6 {
        return Err(format!(
            "certification data type {outer_type}, not 6 (QE report)"
        ));
    }
    if cert + 6 + outer_size != sig_end {
        return Err(format!(
            "the QE certification data's size {outer_size} does not fill the signature data"
        ));
    }
    let auth = cert + 6 + 384 + 64;
    let auth_len = u16_at(q, auth).ok_or_else(short)? as usize;
    let inner = auth + 2 + auth_len;
    let (inner_type, inner_size) = (
        u16_at(q, inner).ok_or_else(short)?,
        u32_at(q, inner + 2).ok_or_else(short)?,
    );
    if inner_type != 5 {
        return Err(format!(
            "inner certification data type {inner_type}, not 5 (PCK chain)"
        ));
    }
    if inner + 6 + inner_size != sig_end {
        return Err(format!(
            "the PCK chain's size {inner_size} does not fill the QE certification data"
        ));
    }
    check_chain(&q[inner + 6..sig_end])
}

/// The chain must be PEM exactly as it would be written (64-column base64, `\n` line
/// ends), three certificates, the last Intel's root byte for byte, and one NUL after
/// them (Intel's quoting library writes the chain as a C string).
fn check_chain(pem: &[u8]) -> Result<(), String> {
    let pem = pem
        .strip_suffix(b"\0")
        .ok_or("the PCK chain does not end in its NUL terminator")?;
    let text = std::str::from_utf8(pem).map_err(|_| "the PCK chain is not text")?;
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----\n";
    const END: &str = "\n-----END CERTIFICATE-----\n";
    let mut ders = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let body = rest
            .strip_prefix(BEGIN)
            .ok_or("the PCK chain is not a sequence of PEM certificates")?;
        let (b64, after) = body
            .split_once(END)
            .ok_or("a PEM certificate in the PCK chain is not closed")?;
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64.replace('\n', ""))
            .map_err(|e| format!("a certificate's base64: {e}"))?;
        if pem_body(&der) != b64 {
            return Err("a certificate in the PCK chain is not in canonical PEM".into());
        }
        ders.push(der);
        rest = after;
    }
    if ders.len() != 3 {
        return Err(format!(
            "the PCK chain has {} certificates, not 3 (PCK, CA, root)",
            ders.len()
        ));
    }
    if ders[2] != INTEL_ROOT_CA_DER {
        return Err("the PCK chain does not end in Intel's SGX root CA".into());
    }
    Ok(())
}

/// The base64 lines of a canonical PEM body.
fn pem_body(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).expect("base64 is ASCII"))
        .collect();
    lines.join("\n")
}
