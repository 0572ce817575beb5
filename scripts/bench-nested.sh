#!/usr/bin/env bash
# cocoon-vmm against QEMU with KVM, inside the nested harness's L1 guest (a
# hardware-style /dev/kvm under QEMU/TCG with emulated SVM). Ratios between
# the two VMMs in the same L1 are meaningful; absolute times are TCG's.
# Run twice: with shmem THP on `advise` (what `cocoon check` recommends),
# then on `never` (the kernel's default and L1's), where cocoon-vmm's
# shared guest RAM stays in 4 KiB pages.
# Usage: bench-nested.sh RUNS OUT_JSON
set -euo pipefail
runs=${1:-3}
out=${2:-target/bench-vmm.json}
root=$(cd "$(dirname "$0")/.." && pwd)
image=$root/target/image
source "$root/scripts/lib-nested.sh"
nested_report "$out" "
    printf '[vm]\nkernel = \"$image/vmlinuz\"\ninitrd = \"$image/initramfs.cpio\"\n' > /tmp/bench.toml
    # The jailed QEMU gets /dev/kvm through its group (L1's is 0600 root:root).
    chgrp 36 /dev/kvm && chmod 660 /dev/kvm
    T=/sys/kernel/mm/transparent_hugepage/shmem_enabled
    for thp in advise never; do
        echo \$thp > \$T
        echo \"== shmem THP: \$(cat \$T)\"
        COCOON_CONFIG=/tmp/bench.toml $root/target/debug/cocoon bench vmm --runs $runs --out /tmp/bench-vmm-\$thp.json
    done
    echo '== report json'
    printf '{\"shmem_thp_advise\":'; cat /tmp/bench-vmm-advise.json
    printf ',\"shmem_thp_never\":'; cat /tmp/bench-vmm-never.json; echo '}'"
