#!/usr/bin/env bash
# Pins each cargo-fuzz workspace (guest-agent/fuzz, shim/fuzz, vmm/fuzz, confidential/fuzz)
# to the versions of the main workspace's Cargo.lock: each starts from a copy of it and
# cargo drops what that workspace does not use and adds what it alone needs (libfuzzer-sys).
#
# Without this, each fuzz workspace resolved its dependencies afresh on every CI run, to
# whatever crates.io had newest that day, so the fuzz stage built code no other stage had
# built, and a new release could break CI's last stage. `fuzz_locks.rs` fails when a lock
# has drifted from the main one (after a `cargo update`, say); run this, then commit.
set -euo pipefail
cd "$(dirname "$0")/.."
for crate in guest-agent shim vmm confidential; do
    cp Cargo.lock "$crate/fuzz/Cargo.lock"
    (cd "$crate/fuzz" && cargo metadata --format-version 1 >/dev/null)
    echo "fuzz-locks: $crate/fuzz/Cargo.lock follows Cargo.lock"
done
