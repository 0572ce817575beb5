#![no_main]
//! cargo-fuzz target: `cocoon_agent::fuzz::request_messages`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cocoon_agent::fuzz::request_messages(data);
});
