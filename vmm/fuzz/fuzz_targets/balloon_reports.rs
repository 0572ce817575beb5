#![no_main]
//! cargo-fuzz target: `cocoon_vmm::fuzz::balloon_reports`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cocoon_vmm::fuzz::balloon_reports(data);
});
