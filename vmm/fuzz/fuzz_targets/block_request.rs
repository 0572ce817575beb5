#![no_main]
//! cargo-fuzz target: `cocoon_vmm::fuzz::block_request`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cocoon_vmm::fuzz::block_request(data);
});
