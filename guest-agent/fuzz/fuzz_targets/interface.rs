#![no_main]
//! cargo-fuzz target: `cocoon_agent::fuzz::interface`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cocoon_agent::fuzz::interface(data);
});
