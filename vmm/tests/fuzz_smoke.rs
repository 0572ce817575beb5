//! The fuzz targets (`cocoon_vmm::fuzz`) on stable: a few thousand pseudo-random and
//! mutated inputs each, so they run in every `cargo test` even where cargo-fuzz (nightly)
//! does not. `COCOON_FUZZ_ITERS` raises the count.

use cocoon_vmm::fuzz::TARGETS;

/// xorshift64*: deterministic, so a failure names a reproducible iteration.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn fuzz_targets_survive_random_inputs() {
    let iters: usize = std::env::var("COCOON_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    for (name, target) in TARGETS {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut corpus: Vec<Vec<u8>> = vec![Vec::new()];
        for i in 0..iters {
            // Half fresh random inputs, half mutations of earlier ones.
            let mut input = if i % 2 == 0 {
                let len = (rng.next() % 512) as usize;
                (0..len).map(|_| rng.next() as u8).collect()
            } else {
                let mut b = corpus[(rng.next() as usize) % corpus.len()].clone();
                for _ in 0..1 + rng.next() % 8 {
                    if b.is_empty() {
                        b.push(rng.next() as u8);
                    }
                    let at = (rng.next() as usize) % b.len();
                    b[at] = rng.next() as u8;
                }
                b
            };
            if i % 7 == 0 {
                input.truncate(8);
            }
            let r = std::panic::catch_unwind(|| target(&input));
            assert!(
                r.is_ok(),
                "{name} panicked on iteration {i}: input {input:02x?}"
            );
            if corpus.len() < 256 {
                corpus.push(input);
            }
        }
    }
}
