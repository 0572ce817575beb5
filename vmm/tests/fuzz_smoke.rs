//! The fuzz targets (`cocoon_vmm::fuzz`) on stable: a few thousand pseudo-random and
//! mutated inputs each, so they run in every `cargo test` even where cargo-fuzz (nightly)
//! does not. `COCOON_FUZZ_ITERS` raises the count (driver: `cocoon_nested::fuzzing`).

use cocoon_vmm::fuzz::TARGETS;

#[test]
fn fuzz_targets_survive_random_inputs() {
    let iters = cocoon_nested::fuzzing::iterations();
    for (name, target) in TARGETS {
        cocoon_nested::fuzzing::run(name, *target, &[], iters);
    }
}
