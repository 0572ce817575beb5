#!/usr/bin/env bash
# Pod VMs booted at once, without containerd: `cocoon vm boot` (launch, agent ready,
# one call, shutdown) alone, then N at once, alternating, RUNS rounds. Where #12's
# "10 pods at once within 3x of one" is bound by cores under TCG (each boot keeps one
# core busy), this shows what more cores change, on a host that has no containerd, CNI
# or QEMU installed: `--pack DIR` gathers this machine's QEMU (its binary, the shared
# libraries it loads and its microvm firmware), the cocoon CLI, cocoon-vmm (the vsock
# backend) and the guest image into DIR. A carried QEMU runs through its own dynamic
# loader, so the host's libraries are never replaced.
# With BOOT_RUNS=K it also runs `cocoon bench boot --runs K` from the pack (one VM
# against raw QEMU boots of the same kernel: #12's overhead ratio), into
# OUT_DIR/bench-boot.json.
# Usage: [BOOT_RUNS=K] bench-bare-boots.sh DIR N RUNS OUT_DIR   (writes bare-boots.txt and .json there)
#        bench-bare-boots.sh --pack DIR
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/lib-pack.sh"
if [[ ${1:-} == --pack ]]; then
  set -e
  d=${2:?DIR}
  rm -rf "$d" && mkdir -p "$d/qemu/lib" "$d/qemu/share"
  q=$(command -v qemu-system-x86_64)
  cp "$q" "$d/qemu/"
  ldd "$q" | awk '/=> \// {print $3} /^\t\/.*ld-linux/ {print $1}' | xargs -I{} cp -L {} "$d/qemu/lib/"
  # Debian builds TCG's ops as a module, loaded from QEMU_MODULE_DIR.
  mkdir "$d/qemu/modules"
  cp /usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so "$d/qemu/modules/"
  for f in qboot.rom bios-microvm.bin pvh.bin linuxboot_dma.bin kvmvapic.bin; do
    cp -L "/usr/share/qemu/$f" "$d/qemu/share/"
  done
  cp "$(first_build cocoon)" "$(first_build cocoon-vmm)" "$d/"
  pack_image "$d"
  (cd "$d/qemu" && tar czf ../qemu.tgz . && cd .. && rm -rf qemu)
  du -sh "$d"
  exit 0
fi
src=$(cd "${1:?DIR}" && pwd)
n=${2:-10}
runs=${3:-3}
out=${4:-/tmp}
mkdir -p "$out"
exec > >(tee "$out/bare-boots.txt") 2>&1
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
unpack_into "$src" "$W"
mkdir "$W/qemu"
tar xzf "$W/qemu.tgz" -C "$W/qemu"
ld=$(ls "$W"/qemu/lib/ld-linux-x86-64.so.* | head -n1)
cat > "$W/qemu-system-x86_64" << EOF
#!/bin/sh
export QEMU_MODULE_DIR=$W/qemu/modules
exec $ld --library-path $W/qemu/lib $W/qemu/qemu-system-x86_64 -L $W/qemu/share "\$@"
EOF
chmod +x "$W/qemu-system-x86_64"
# Unconfined: the jail would need the carried loader and libraries bound into
# QEMU's empty root. The measurement is of boots, not of the jail.
cat > "$W/config.toml" << EOF
[paths]
image_dir = "$W/image"
run_dir = "$W/run"
vmm_binary = "$W/cocoon-vmm"
[qemu]
binary = "$W/qemu-system-x86_64"
[jail]
enabled = false
EOF
export COCOON_CONFIG=$W/config.toml
echo "== host: $(nproc) cpus, $(uname -r); $("$W/qemu-system-x86_64" -version | head -n1)"
ms() { echo $(($(date +%s%N) / 1000000)); }
# One boot's launch -> agent ready, from its JSON, or 0 when it failed.
ready() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(round(d["timings_ms"]["ready"]))' "$1" 2> /dev/null || echo 0; }
: > "$W/rows"
for r in $(seq "$runs"); do
  s=$(ms)
  "$W/cocoon" vm boot --id one-$r --json > "$W/one.json" 2> "$W/one.err" || { echo "one failed:"; tail -n 5 "$W/one.err"; }
  e=$(ms)
  echo "row one $r $((e - s)) $(ready "$W/one.json")" | tee -a "$W/rows"
  s=$(ms)
  for i in $(seq "$n"); do
    "$W/cocoon" vm boot --id many-$r-$i --json > "$W/many-$i.json" 2> "$W/many-$i.err" &
  done
  fails=0
  for j in $(jobs -p); do wait "$j" || fails=$((fails + 1)); done
  e=$(ms)
  slowest=0
  for i in $(seq "$n"); do
    t=$(ready "$W/many-$i.json")
    ((t == 0)) && { echo "boot $i of $n failed:"; tail -n 3 "$W/many-$i.err"; }
    ((t > slowest)) && slowest=$t
  done
  echo "row many $r $((e - s)) $slowest $fails" | tee -a "$W/rows"
done
python3 - "$W/rows" "$out/bare-boots.json" "$n" << 'PY'
import json, statistics, sys
one = [l.split() for l in open(sys.argv[1]) if l.startswith("row one")]
many = [l.split() for l in open(sys.argv[1]) if l.startswith("row many")]
n = int(sys.argv[3])
med = lambda rows, i: statistics.median(int(r[i]) for r in rows)
rep = {"n": n, "rounds": len(one),
       "one_cycle_ms": [int(r[3]) for r in one], "one_ready_ms": [int(r[4]) for r in one],
       "many_cycle_ms": [int(r[3]) for r in many], "many_slowest_ready_ms": [int(r[4]) for r in many],
       "many_failed": [int(r[5]) for r in many]}
# A failed lone boot reads 0 ms: no ratio then, and the run fails below.
ratio = lambda i: med(many, i) / med(one, i) if med(one, i) else None
rep["ratio_ready"], rep["ratio_cycle"] = ratio(4), ratio(3)
json.dump(rep, open(sys.argv[2], "w"), indent=1)
cell = lambda v: "-" if v is None else f"{v:.2f}"
print(f"\n| | one VM | {n} at once (slowest) | ratio |\n|---|---|---|---|")
print(f"| launch -> agent ready, ms | {med(one, 4):.0f} | {med(many, 4):.0f} | {cell(rep['ratio_ready'])} |")
print(f"| whole cycle (process wall), ms | {med(one, 3):.0f} | {med(many, 3):.0f} | {cell(rep['ratio_cycle'])} |")
print(f"failed boots among the {n}-at-once rounds: {sum(rep['many_failed'])}")
sys.exit(1 if rep["ratio_ready"] is None or sum(rep["many_failed"]) else 0)
PY
rc=$?
if [[ -n ${BOOT_RUNS:-} ]]; then
  "$W/cocoon" bench boot --runs "$BOOT_RUNS" --busybox "$W/busybox" --out "$out/bench-boot.json" || rc=1
fi
exit $rc
