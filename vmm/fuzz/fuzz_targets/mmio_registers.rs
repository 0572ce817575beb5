#![no_main]
//! cargo-fuzz target: `cocoon_vmm::fuzz::mmio_registers`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cocoon_vmm::fuzz::mmio_registers(data);
});
