#!/usr/bin/env bash
# cocoon-vmm's boot on a host with hardware KVM and nothing else installed (a lent
# machine, a bare server: no containerd, QEMU or cargo needed). It reports what the host
# offers (vmx/svm, /dev/kvm, `cocoon check`) and stops there when it has no KVM; else it
# boots, alternating, each cocoon-vmm build in DIR:
#   - the guest image's kernel (PVH vmlinux and bzImage) to a trivial busybox init that
#     prints its uptime and powers off: wall time from exec to exit and the guest's uptime;
#   - the guest image itself to its agent's ready line on the console (the agent serving
#     ttrpc on hybrid vsock): wall time from exec to that line.
# DIR holds: cocoon (the CLI), cocoon-vmm.<build> (one or more builds), the guest image
# in image/ and a static busybox (lib-pack.sh's layout). `--pack DIR`
# gathers them from this checkout's builds (`make image`; target/node, release and debug).
# Usage: bench-hw-boot.sh DIR RUNS OUT_DIR   (writes hw-boot.txt, .rows and .json there)
#        bench-hw-boot.sh --pack DIR
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/lib-pack.sh"
if [[ ${1:-} == --pack ]]; then
  set -e
  d=${2:?DIR}
  rm -rf "$d" && mkdir -p "$d"
  cp "$(first_build cocoon)" "$d/"
  for b in node release debug; do
    [[ -x $root/target/$b/cocoon-vmm ]] && cp "$root/target/$b/cocoon-vmm" "$d/cocoon-vmm.$b"
  done
  pack_image "$d"
  du -sh "$d"
  exit 0
fi
dir=$(cd "${1:?DIR}" && pwd)
runs=${2:-10}
out=${3:-/tmp}
mkdir -p "$out"
log=$out/hw-boot.txt
exec > >(tee "$log") 2>&1

echo "== host"
uname -a
echo "cpus: $(nproc)  memory: $(awk '/MemTotal/ {print $2 / 1024 " MiB"}' /proc/meminfo)"
grep -m1 'model name' /proc/cpuinfo
flag=$(grep -o -w -m1 -E 'vmx|svm' /proc/cpuinfo | head -n1)
echo "virtualization flag: ${flag:-none}"
grep -m1 -o -w hypervisor /proc/cpuinfo > /dev/null && echo "running under a hypervisor (cpuid)"
ls -l /dev/kvm 2>&1
ls /sys/module 2> /dev/null | grep -E '^kvm' | tr '\n' ' '
echo
grep -E '^Cap(Eff|Bnd)' /proc/self/status
echo "== cocoon check"
timeout 60 "$dir/cocoon" check 2>&1 | head -n 60
# A /dev/kvm without vmx/svm is PVM (a cloud VM's paravirtual KVM), which cannot boot a
# stock Linux guest: each boot would only crash. FORCE=1 boots anyway.
if [[ ! -c /dev/kvm ]]; then
  echo "RESULT: no /dev/kvm on this host; nothing booted"
  exit 0
elif [[ -z $flag && -z ${FORCE:-} ]]; then
  echo "RESULT: /dev/kvm without vmx/svm (PVM); nothing booted (FORCE=1 boots anyway)"
  exit 0
fi

rows=$out/hw-boot.rows
: > "$rows"
row() { echo "row $*" | tee -a "$rows"; }
ms() { echo $(($(date +%s%N) / 1000000)); }
R=$(mktemp -d)
trap 'rm -rf "$R"' EXIT
mkdir "$R/in"
unpack_into "$dir" "$R/in"
dir=$R/in
mkdir -p "$R/root/bin" "$R/root/proc" "$R/root/dev"
cp "$dir/busybox" "$R/root/bin/busybox"
printf '#!/bin/busybox sh\n/bin/busybox mount -t proc p /proc\necho "uptime-at-init $(/bin/busybox cut -d" " -f1 /proc/uptime)"\n/bin/busybox poweroff -f\n' > "$R/root/init"
chmod +x "$R/root/init"
mknod "$R/root/dev/console" c 5 1
(cd "$R/root" && find . | "$dir/busybox" cpio -o -H newc > "$R/init.cpio" 2> /dev/null)
CMD="console=ttyS0 quiet panic=-1 reboot=k pci=off"
builds=$(cd "$dir" && ls cocoon-vmm.* | sed 's/^cocoon-vmm\.//')
ready="cocoon-agent: ready on vsock port"

echo "== boots ($runs rounds; builds: $(echo $builds))"
for i in $(seq "$runs"); do
  for b in $builds; do
    vmm=$dir/cocoon-vmm.$b
    for k in vmlinux vmlinuz; do
      for hp in auto off; do
        s=$(ms)
        timeout -s KILL 20 "$vmm" run --kernel "$dir/image/$k" --initrd "$R/init.cpio" --cmdline "$CMD" \
          --mem-mib 256 --vcpus 1 --serial-out "$R/s" --huge-pages $hp > /dev/null 2> "$R/err" \
          || { echo "failed trivial $b $k $hp: $(tail -n 3 "$R/err" | tr '\n' ' ')"; }
        e=$(ms)
        up=$(sed -n 's/^uptime-at-init //p' "$R/s" 2> /dev/null | tr -d '\r')
        # A boot that never reached init is counted as failed, not timed.
        [[ -n $up ]] || s=$e
        row trivial $b $k hp-$hp $((e - s)) ${up:-0}
        rm -f "$R/s"
      done
    done
    # The image to its agent: the shim's own command line (less its log level).
    rm -f "$R/v.sock" "$R/a"
    s=$(ms)
    "$vmm" run --kernel "$dir/image/vmlinux" --initrd "$dir/image/initramfs.cpio" \
      --cmdline "console=ttyS0 quiet panic=-1 reboot=k" --mem-mib 512 --vcpus 1 \
      --serial-out "$R/a" --vsock-uds "$R/v.sock" > /dev/null 2> "$R/err" &
    p=$!
    t=0
    while kill -0 $p 2> /dev/null; do
      if grep -q "$ready" "$R/a" 2> /dev/null; then t=$(($(ms) - s)); break; fi
      (($(ms) - s < 20000)) || break
      sleep 0.005
    done
    kill -9 $p 2> /dev/null
    wait $p 2> /dev/null
    if ((t == 0)); then
      echo "failed agent $b: $(tail -n 3 "$R/err" | tr '\n' ' ') console: $(tail -c 300 "$R/a" 2> /dev/null | tr '\n' ' ')"
    fi
    row agent $b vmlinux hp-auto $t 0
  done
done

python3 - "$rows" "$out/hw-boot.json" << 'PY'
import json, statistics, sys
rows = [l.split()[1:] for l in open(sys.argv[1]) if l.startswith("row ")]
groups = {}
for kind, build, kernel, hp, wall, up in rows:
    g = groups.setdefault((kind, build, kernel, hp), {"wall_ms": [], "guest_uptime_s": [], "failed": 0})
    if int(wall) == 0:
        g["failed"] += 1
        continue
    g["wall_ms"].append(int(wall))
    g["guest_uptime_s"].append(float(up))
report = []
print("\n| boot | build | kernel | guest RAM | runs | wall ms median | min | guest uptime at init, ms |")
print("|---|---|---|---|---|---|---|---|")
for (kind, build, kernel, hp), g in sorted(groups.items()):
    w, f = g["wall_ms"], g["failed"]
    med = statistics.median(w) if w else None
    up = statistics.median(g["guest_uptime_s"]) * 1000 if w else None
    report.append({"boot": kind, "build": build, "kernel": kernel, "huge_pages": hp[3:],
                   "runs": len(w), "failed": f, "wall_ms_median": med,
                   "wall_ms_min": min(w) if w else None, "wall_ms": w,
                   "guest_uptime_ms_median": up if kind == "trivial" else None})
    cell = lambda v: "-" if v is None else f"{v:.0f}"
    runs = f"{len(w)}" + (f" ({f} failed)" if f else "")
    print(f"| {kind} | {build} | {kernel} | {hp[3:]} | {runs} | {cell(med)} | {cell(min(w) if w else None)} | {cell(up if kind == 'trivial' else None)} |")
json.dump(report, open(sys.argv[2], "w"), indent=1)
PY
echo "RESULT: done"
