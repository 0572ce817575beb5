//! Fuzz entry points for what a confidential guest parses from outside its trust
//! boundary: the key broker's HTTP replies and encrypted responses (the network and the
//! host carry them), the SNP certificate table (the host's firmware fills it), and the
//! firmware descriptors `cocoon measure` and the VMMs read. None may panic or run
//! unbounded. `tests/fuzz_smoke.rs` runs them on stable; `fuzz/` is their cargo-fuzz
//! workspace (`scripts/fuzz-guided.sh`).

use std::sync::OnceLock;

use crate::kbs::http::parse_reply;
use crate::kbs::jwe::TeeKey;
use crate::snp::certs;
use crate::tdx::tdvf::Tdvf;

pub type Target = fn(&[u8]);

pub const TARGETS: &[(&str, Target)] = &[
    ("broker_reply", broker_reply),
    ("snp_cert_table", snp_cert_table),
    ("tdvf", tdvf),
];

/// A whole HTTP reply from the broker, then its body as a challenge and as a JWE.
pub fn broker_reply(data: &[u8]) {
    static KEY: OnceLock<TeeKey> = OnceLock::new();
    let key = KEY.get_or_init(TeeKey::generate);
    let body = match parse_reply(data) {
        Ok(reply) => {
            assert!(reply.body.len() <= data.len());
            reply.body
        }
        Err(_) => data.to_vec(),
    };
    let _ = serde_json::from_slice::<kbs_types::Challenge>(&body);
    let _ = key.open(&body);
}

/// An extended report's certificate table.
pub fn snp_cert_table(data: &[u8]) {
    if let Ok(Some(der)) = certs::vcek(data) {
        let (start, end) = (data.as_ptr() as usize, data.as_ptr() as usize + data.len());
        assert!(der.as_ptr() as usize >= start && der.as_ptr() as usize + der.len() <= end);
    }
}

/// A TDVF image: its descriptor parsed, and MRTD computed when it is small.
pub fn tdvf(data: &[u8]) {
    if let Ok(fw) = Tdvf::parse(data.to_vec()) {
        let pages: u64 = fw.sections().iter().map(|s| s.memory_size / 4096).sum();
        if pages <= 4096 {
            fw.mrtd();
        }
    }
}
