#!/usr/bin/env bash
# cocoon-vmm against QEMU with KVM, inside the nested harness's L1 guest (a
# hardware-style /dev/kvm under QEMU/TCG with emulated SVM). Ratios between
# the two VMMs in the same L1 are meaningful; absolute times are TCG's.
# Usage: bench-nested.sh RUNS OUT_JSON
set -euo pipefail
runs=${1:-3}
out=${2:-target/bench-vmm.json}
root=$(cd "$(dirname "$0")/.." && pwd)
image=$root/target/image
raw=$(mktemp)
trap 'rm -f "$raw"' EXIT
"$root/target/debug/cocoon-nested" run --image-dir "$image" -- sh -c "
    printf '[vm]\nkernel = \"$image/vmlinuz\"\ninitrd = \"$image/initramfs.cpio\"\n' > /tmp/bench.toml
    COCOON_CONFIG=/tmp/bench.toml $root/target/debug/cocoon bench vmm --runs $runs --out /tmp/bench-vmm.json
    echo '== report json'
    cat /tmp/bench-vmm.json" > "$raw"
sed '/^== report json$/,$d' "$raw" | grep -v '^report written to'
sed '1,/^== report json$/d' "$raw" > "$out"
echo "report written to $out"
