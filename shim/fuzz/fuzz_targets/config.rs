#![no_main]
//! cargo-fuzz target: `cocoon_shim::fuzz::config`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cocoon_shim::fuzz::config(data);
});
