# Sourced by the nested benchmarks: runs a shell script inside an L1 guest (the
# nested harness, with the guest image shared in) that prints its table, then
# `== report json`, then the JSON report. The table goes to stdout, the JSON to $1.
# L1's kernel is COCOON_L1_KERNEL's (6.12 by default, or 6.1), as in the tests
# (cocoon-nested reads it).
# Usage: nested_report OUT_JSON INNER_SCRIPT
nested_report() {
    local out=$1 inner=$2 raw
    raw=$(mktemp)
    "$root/target/debug/cocoon-nested" run --image-dir "$root/target/image" -- sh -c "$inner" > "$raw" \
        || { tail -n 40 "$raw" >&2; rm -f "$raw"; return 1; }
    sed '/^== report json$/,$d' "$raw" | grep -v '^report written to'
    sed '1,/^== report json$/d' "$raw" > "$out"
    rm -f "$raw"
    echo "report written to $out"
}
