#![no_main]
//! cargo-fuzz target: `cocoon_confidential::fuzz::snp_cert_table`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cocoon_confidential::fuzz::snp_cert_table(data);
});
