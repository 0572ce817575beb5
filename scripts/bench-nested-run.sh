#!/usr/bin/env bash
# `cocoon bench run` on cocoon-vmm pods, inside the nested harness's L1 (a
# hardware-style /dev/kvm under QEMU/TCG with emulated SVM): `ctr run --rm`
# against runc, and the host memory of idle pods by process (Pss beyond guest
# RAM), one pod alone and per pod of IDLE_PODS (default 4). Uses the binaries
# `make install` puts on a node (target/node, `cargo build --profile node -p
# cocoon-shim -p cocoon-vmm`) where they are built, or PROFILE=release's.
# Latencies are TCG's; the memory is not.
# Usage: bench-nested-run.sh RUNS OUT_JSON
set -euo pipefail
runs=${1:-3}
out=${2:-target/bench-nested-run.json}
root=$(cd "$(dirname "$0")/.." && pwd)
bins=$root/target/debug
built=$root/target/${PROFILE:-node}
if [[ -x $built/containerd-shim-cocoon-v2 && -x $built/cocoon-vmm ]]; then
    # That shim alone on PATH: it finds cocoon-vmm beside itself, and the
    # debug `cocoon` CLI (which drives the bench) stays in use.
    bins=$(mktemp -d)
    trap 'rm -rf "$bins"' EXIT
    ln -s "$built/containerd-shim-cocoon-v2" "$bins/"
fi
source "$root/scripts/lib-nested.sh"
nested_report "$out" "
    COCOON_HYPERVISOR=cocoon-vmm COCOON_BIN_DIR=$bins bash -c '
        source $root/scripts/lib-containerd.sh
        echo \"binaries: \$(readlink -f \$(command -v containerd-shim-cocoon-v2))\"
        # Where L1 runs Debian 6.1 (--l1-kernel 6.1), its tmpfs has no idmapped mounts:
        # the jailed virtiofsd cannot run there, so its pods run it as root (as the
        # tests do).
        if cocoon check 2>&1 | grep -q \"^virtiofsd jail: no\"; then
            printf \"[jail]\\nvirtiofsd = false\\n\" >> \"\$COCOON_CONFIG\"
            echo \"virtiofsd: unjailed (cocoon check: no virtiofsd jail in L1)\"
        fi
        cocoon bench run --address \"\$sock\" --image \"\$image\" --runs $runs \
            --idle-pods ${IDLE_PODS:-4} --out \$TMPDIR/bench-run.json
        echo \"== report json\"
        cat \$TMPDIR/bench-run.json'"
