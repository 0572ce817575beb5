#![no_main]
//! cargo-fuzz target: `cocoon_vmm::fuzz::mem_requests`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cocoon_vmm::fuzz::mem_requests(data);
});
