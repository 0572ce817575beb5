#!/usr/bin/env bash
# Coverage-guided fuzzing (issue #10): every cargo-fuzz target of the agent (what the host
# sends), the shim (what the guest sends) and cocoon-vmm (guest-facing devices), run by
# libFuzzer for RUNS inputs each (a million by default), or until SECONDS_EACH run out.
#
# Stable Rust: `cargo fuzz build --sanitizer none` needs no nightly (libFuzzer's coverage
# comes from LLVM's sancov pass, a stable -C flag; only the sanitizers need nightly).
# A panic is a crash for libFuzzer, so every `assert!` in an entry point is checked.
#
# Usage: [FUZZ_SEED=n] scripts/fuzz-guided.sh [RUNS] [OUT.json] [SECONDS_EACH]
# A fixed FUZZ_SEED, a fixed RUNS and no SECONDS_EACH make the same run each time.
# Writes one JSON object per target to OUT (an array) and a table to stdout. The corpus of
# each target is kept in target/fuzz-corpus/ and grows from run to run; a crash's input is
# kept in target/fuzz-artifacts/ and fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
runs=${1:-1000000}
out=${2:-$root/target/fuzz-guided.json}
seconds=${3:-0}
build=$root/target/fuzz-build
triple=x86_64-unknown-linux-gnu

command -v cargo-fuzz >/dev/null || { echo "fuzz-guided: cargo-fuzz is missing (make setup installs it)" >&2; exit 1; }

rows=()
failed=0
for crate in guest-agent shim vmm confidential; do
    echo "== building the fuzz targets of $crate" >&2
    (cd "$crate" && cargo fuzz build --sanitizer none --release --target-dir "$build" >&2)
    for target in $(cd "$crate" && cargo fuzz list); do
        corpus=$root/target/fuzz-corpus/$crate/$target
        artifacts=$root/target/fuzz-artifacts/$crate/$target/
        mkdir -p "$corpus" "$artifacts"
        log=$root/target/fuzz-logs/$crate-$target.log
        mkdir -p "$(dirname "$log")"
        status=ok
        # -rss_limit_mb: an entry point that grows without bound is a finding too.
        if ! "$build/$triple/release/$target" "$corpus" -runs="$runs" -max_total_time="$seconds" \
            -seed="${FUZZ_SEED:-0}" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
            -artifact_prefix="$artifacts" >"$log" 2>&1; then
            status=crash
            failed=1
            echo "fuzz-guided: $crate/$target failed; its input is in $artifacts, its log $log" >&2
            grep -m1 -A15 -E "panicked|ERROR: libFuzzer|deadly signal" "$log" >&2 || tail -20 "$log" >&2
        fi
        execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
        # libFuzzer's own rate reads 0 for a run under a second; its "Done" line has the time.
        secs=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
        speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
        rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -1)
        cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | cut -d' ' -f2)
        inputs=$(find "$corpus" -type f | wc -l)
        rows+=("{\"crate\":\"$crate\",\"target\":\"$target\",\"status\":\"$status\",\"execs\":${execs:-0},\"seconds\":${secs:-0},\"execs_per_sec\":${speed:-0},\"coverage_edges\":${cov:-0},\"corpus_inputs\":$inputs,\"peak_rss_mb\":${rss:-0}}")
        printf '%-12s %-18s %-6s %10s execs in %4s s  cov %5s  corpus %5s  rss %5s MB\n' \
            "$crate" "$target" "$status" "${execs:-0}" "${secs:-0}" "${cov:-0}" "$inputs" "${rss:-0}"
    done
done

mkdir -p "$(dirname "$out")"
{
    echo "["
    for i in "${!rows[@]}"; do
        sep=,
        [ "$i" -eq $((${#rows[@]} - 1)) ] && sep=
        echo "  ${rows[$i]}$sep"
    done
    echo "]"
} >"$out"
echo "fuzz-guided: report in $out" >&2
exit $failed
