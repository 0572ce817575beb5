#![no_main]
//! cargo-fuzz target: `cocoon_vmm::fuzz::vsock_tx`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cocoon_vmm::fuzz::vsock_tx(data);
});
