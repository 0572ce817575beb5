#![no_main]
//! cargo-fuzz target: `cocoon_agent::fuzz::forward_request`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cocoon_agent::fuzz::forward_request(data);
});
