#!/usr/bin/env bash
# Boots the pod image N times under hardware-style KVM inside one L1 guest (the nested
# harness), alternating QEMU/KVM and cocoon-vmm, and counts the boots that fail: how
# often TCG's emulated SVM loses an L2 guest, per L1 setting.
#
#   scripts/nested-boot-soak.sh [N] [ACCEL]     ACCEL: QEMU's -accel for L1
#                                               (tcg | tcg,thread=single)
# Prints one line per boot and a summary; exits 1 if any boot failed.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-20}
accel=${2:-tcg}
root=$PWD
for b in target/debug/cocoon target/debug/cocoon-vmm target/debug/cocoon-nested; do
    [ -x "$b" ] || { echo "missing $b: cargo build --workspace --bins" >&2; exit 2; }
done

inner=$(cat <<EOF
set -u
run=/tmp/soak-run
mkdir -p \$run
fails=0
for i in \$(seq 1 $n); do
    if [ \$((i % 2)) = 1 ]; then hv=qemu; else hv=cocoon-vmm; fi
    cat > /tmp/soak.toml <<CFG
hypervisor = "\$hv"
[vm]
boot_timeout_ms = 40000
[qemu]
accel = "kvm"
[jail]
enabled = false
[paths]
image_dir = "$root/target/image"
run_dir = "\$run"
vmm_binary = "$root/target/debug/cocoon-vmm"
CFG
    start=\$(date +%s.%N)
    if out=\$(COCOON_CONFIG=/tmp/soak.toml timeout 60 $root/target/debug/cocoon vm boot --id s\$i --console 2>&1); then
        echo "boot \$i \$hv ok \$(echo "\$(date +%s.%N) - \$start" | bc) s"
    else
        fails=\$((fails + 1))
        echo "boot \$i \$hv FAILED after \$(echo "\$(date +%s.%N) - \$start" | bc) s:"
        echo "\$out" | tail -25 | sed 's/^/    /'
    fi
done
echo "summary: \$fails of $n boots failed (L1 accel $accel)"
[ \$fails = 0 ]
EOF
)
exec target/debug/cocoon-nested run --accel "$accel" --timeout 1500 -- sh -c "$inner"
