#![no_main]
//! cargo-fuzz target: `cocoon_agent::fuzz::stdio_header`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cocoon_agent::fuzz::stdio_header(data);
});
