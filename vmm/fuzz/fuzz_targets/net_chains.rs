#![no_main]
//! cargo-fuzz target: `cocoon_vmm::fuzz::net_chains`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cocoon_vmm::fuzz::net_chains(data);
});
