#!/usr/bin/env bash
# VM templates against cold boots on cocoon-vmm, inside the nested harness's L1 (a
# hardware-style /dev/kvm under QEMU/TCG with emulated SVM): `cocoon bench boot
# --compare-templates` on the guest image, alternating a cold boot (launch -> agent
# ready) with a restore from a template made before the first measured run, plus the
# raw QEMU/KVM baseline. Only ratios within one run mean anything here; absolute
# times are TCG's.
# Usage: bench-nested-template.sh RUNS OUT_JSON
set -euo pipefail
runs=${1:-5}
out=${2:-target/bench-template.json}
root=$(cd "$(dirname "$0")/.." && pwd)
image=$root/target/image
source "$root/scripts/lib-nested.sh"
nested_report "$out" "
    printf 'hypervisor = \"cocoon-vmm\"\n[vm]\nkernel = \"$image/vmlinuz\"\ninitrd = \"$image/initramfs.cpio\"\n' > /tmp/bench.toml
    COCOON_CONFIG=/tmp/bench.toml $root/target/debug/cocoon bench boot --runs $runs \
        --compare-templates --out /tmp/bench-template.json
    echo '== report json'
    cat /tmp/bench-template.json"
