#![no_main]
//! cargo-fuzz target: `cocoon_shim::fuzz::agent_replies`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cocoon_shim::fuzz::agent_replies(data);
});
