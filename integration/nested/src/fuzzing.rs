//! The stable fuzz driver that each crate's `tests/fuzz_smoke.rs` runs over its fuzz
//! entry points (`cocoon_vmm::fuzz`, `cocoon_agent::fuzz`, `cocoon_shim::fuzz`): fresh
//! random inputs and mutations of earlier ones from a fixed seed, so a failure names a
//! reproducible iteration. No coverage guidance (that is cargo-fuzz's, on nightly): it
//! keeps every target built and exercised in every `cargo test`, and `make fuzz` runs
//! it a million times per target.
//!
//! `COCOON_FUZZ_ITERS` sets the count (default 3000); with `COCOON_FUZZ_REPORT` set to a
//! file, one JSON line per target is appended to it (name, executions, seconds).

use std::io::Write;
use std::time::Instant;

/// xorshift64*: small, deterministic, so a run can be replayed from its seed (the
/// fuzz driver's, and the soak's fault choices).
pub struct Rng(u64);
impl Rng {
    /// A generator from `seed` (any value; zero is made odd).
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Iterations per target: `COCOON_FUZZ_ITERS`, else 3000.
pub fn iterations() -> usize {
    std::env::var("COCOON_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

/// Runs `target` on `iters` inputs seeded from `seeds` (valid examples to mutate).
/// Panics, naming the target, the iteration and the input, if the target panics.
pub fn run(name: &str, target: fn(&[u8]), seeds: &[&[u8]], iters: usize) {
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    let mut corpus: Vec<Vec<u8>> = vec![Vec::new()];
    corpus.extend(seeds.iter().map(|s| s.to_vec()));
    let started = Instant::now();
    for i in 0..iters {
        // Half fresh random inputs, half mutations of earlier ones.
        let mut input = if i % 2 == 0 {
            let len = (rng.next() % 512) as usize;
            (0..len).map(|_| rng.next() as u8).collect()
        } else {
            let mut b = corpus[(rng.next() as usize) % corpus.len()].clone();
            for _ in 0..1 + rng.next() % 8 {
                match rng.next() % 3 {
                    0 if !b.is_empty() => {
                        let at = (rng.next() as usize) % b.len();
                        b[at] = rng.next() as u8;
                    }
                    1 if !b.is_empty() => {
                        let at = (rng.next() as usize) % b.len();
                        b.remove(at);
                    }
                    _ => {
                        let at = (rng.next() as usize) % (b.len() + 1);
                        b.insert(at, rng.next() as u8);
                    }
                }
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
    let seconds = started.elapsed().as_secs_f64();
    if let Some(path) = std::env::var_os("COCOON_FUZZ_REPORT") {
        let line = serde_json::json!({"target": name, "executions": iters, "seconds": seconds, "crashes": 0});
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{line}");
        }
    }
}
