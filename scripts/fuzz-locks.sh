#!/usr/bin/env bash
# Pins each cargo-fuzz workspace (<crate>/fuzz: the agent's, the shim's, cocoon-vmm's, ...)
# to the versions of the main workspace's Cargo.lock: each starts from a copy of it and
# cargo drops what that workspace does not use and adds what it alone needs (libfuzzer-sys).
#
# Without this, each fuzz workspace resolved its dependencies afresh on every CI run, to
# whatever crates.io had newest that day, so the fuzz stage built code no other stage had
# built, and a new release could break CI's last stage. `fuzz_locks.rs` fails when a lock
# has drifted from the main one (after a `cargo update`, say); run this, then commit.
set -euo pipefail
cd "$(dirname "$0")/.."
# Every crate's fuzz workspace, found as fuzz_locks.rs finds them.
for manifest in */fuzz/Cargo.toml; do
    fuzz=$(dirname "$manifest")
    cp Cargo.lock "$fuzz/Cargo.lock"
    (cd "$fuzz" && cargo metadata --format-version 1 >/dev/null)
    echo "fuzz-locks: $fuzz/Cargo.lock follows Cargo.lock"
done
