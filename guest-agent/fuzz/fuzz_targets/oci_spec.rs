#![no_main]
//! cargo-fuzz target: `cocoon_agent::fuzz::oci_spec`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cocoon_agent::fuzz::oci_spec(data);
});
