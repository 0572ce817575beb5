#![no_main]
//! cargo-fuzz target: `cocoon_confidential::fuzz::broker_reply`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cocoon_confidential::fuzz::broker_reply(data);
});
