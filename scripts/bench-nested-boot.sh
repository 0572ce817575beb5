#!/usr/bin/env bash
# cocoon-vmm against QEMU microvm with KVM on the same work, inside the nested
# harness's L1: the guest image's Debian kernel booting a trivial busybox init
# (mount proc, print uptime, power off), same command line, 1 vCPU, 256 MiB,
# alternating runs. Reports wall time (process start to exit), the guest's
# uptime at /init, and KVM's exit counters for both (cocoon-vmm's --stats;
# QEMU's from L1's KVM debugfs, sampled while it runs), under shmem THP
# `advise` and `never` (L1's default). cocoon-vmm runs twice: as it ships
# (`--huge-pages auto`: guest RAM on a huge-page tmpfs of its own) and with
# `--huge-pages off` (a plain memfd, which only shmem THP can give huge pages).
# Usage: [KERNEL=bzImage] [VMM=cocoon-vmm] bench-nested-boot.sh RUNS OUT_JSON (default: the image's kernel)
set -euo pipefail
runs=${1:-3}
out=${2:-target/bench-nested-boot.json}
root=$(cd "$(dirname "$0")/.." && pwd)
# The build `make install` ships (target/node), else release's, else debug's;
# VMM=path picks another.
vmm=${VMM:-$root/target/node/cocoon-vmm}
[[ -x $vmm ]] || vmm=$root/target/release/cocoon-vmm
[[ -x $vmm ]] || vmm=$root/target/debug/cocoon-vmm
script=$(mktemp)
raw=$(mktemp)
trap 'rm -f "$script" "$raw"' EXIT
cat > "$script" <<SCRIPT
set -e
mount -t debugfs none /sys/kernel/debug 2>/dev/null || true
R=\$TMPDIR/boot; mkdir -p \$R/root/bin \$R/root/proc \$R/root/dev
cp /bin/busybox \$R/root/bin/
printf '#!/bin/busybox sh\n/bin/busybox mount -t proc p /proc\necho "uptime-at-init \$(/bin/busybox cut -d" " -f1 /proc/uptime)"\n/bin/busybox poweroff -f\n' > \$R/root/init
chmod +x \$R/root/init; mknod \$R/root/dev/console c 5 1
(cd \$R/root && find . | busybox cpio -o -H newc > \$R/init.cpio 2>/dev/null)
K=${KERNEL:-$root/target/image/vmlinuz}
CMD="console=ttyS0 quiet panic=-1 reboot=k pci=off"
ms() { echo \$(( \$(date +%s%N) / 1000000 )); }
for thp in advise never; do
  echo \$thp > /sys/kernel/mm/transparent_hugepage/shmem_enabled
  for i in \$(seq $runs); do
    for hp in auto off; do
    name=cocoon-vmm; [ \$hp = off ] && name=cocoon-memfd
    s=\$(ms); timeout -s KILL 60 $vmm run --kernel \$K --initrd \$R/init.cpio --cmdline "\$CMD" --mem-mib 256 --vcpus 1 --serial-out \$R/s --huge-pages \$hp --stats 2> \$R/st || echo "failed \$name \$thp"; e=\$(ms)
    up=\$(sed -n 's/^uptime-at-init //p' \$R/s | tr -d '\r')
    ex=\$(sed -n 's/^exits  *//p' \$R/st | head -n 1)
    pf=\$(sed -n 's/^pf_fixed  *//p' \$R/st | head -n 1)
    echo "row \$name \$thp \$((e-s)) \${up:-0} \${ex:-0} \${pf:-0}"
    rm -f \$R/s
    done
    s=\$(ms)
    qemu-system-x86_64 -M microvm,rtc=on -accel kvm -cpu host -m 256M -smp 1 -nodefaults -no-user-config -display none -no-reboot -kernel \$K -initrd \$R/init.cpio -append "\$CMD" -serial file:\$R/q > /dev/null 2>&1 & p=\$!
    best=0; pf=0
    while kill -0 \$p 2>/dev/null; do
      for d in /sys/kernel/debug/kvm/\${p}-*; do
        x=\$(cat \$d/exits 2>/dev/null || echo 0)
        # Both read before either is kept: the directory vanishes as QEMU exits.
        y=\$(cat \$d/pf_fixed 2>/dev/null || echo -1)
        [ "\$x" -ge "\$best" ] && [ "\$y" -ge 0 ] && best=\$x && pf=\$y
      done
      sleep 0.02
      [ \$((\$(ms) - s)) -lt 60000 ] || kill -9 \$p 2>/dev/null || true
    done
    wait \$p || echo "failed qemu \$thp"
    e=\$(ms)
    up=\$(sed -n 's/^uptime-at-init //p' \$R/q | tr -d '\r')
    echo "row qemu \$thp \$((e-s)) \${up:-0} \$best \${pf:-0}"
    rm -f \$R/q
  done
done
SCRIPT
# An L1 that stops (TCG's emulated SVM stalls now and then: docs/notes.md) costs at
# most 300 s, and the rows it printed before are still reported.
if ! "$root/target/debug/cocoon-nested" run --timeout 300 --image-dir "$root/target/image" \
    -- sh "$script" > "$raw" 2>&1; then
  echo "L1 did not finish; reporting the runs it completed:" >&2
  grep -v '^row \|^failed ' "$raw" | head -n 5 >&2
  echo "failed L1 stopped" >> "$raw"
fi
python3 - "$raw" "$out" <<'PY'
import json, statistics, sys
rows = [l.split()[1:] for l in open(sys.argv[1]) if l.startswith("row ")]
# A run that failed or did not end within 60 s (killed) is counted, not timed.
failed = [l.split()[1:] for l in open(sys.argv[1]) if l.startswith("failed ")]
runs = [dict(vmm=r[0], shmem_thp=r[1], wall_ms=int(r[2]), init_uptime_s=float(r[3]),
             kvm_exits=int(r[4]), page_faults=int(r[5])) for r in rows if len(r) == 6 and float(r[3]) > 0]
med = lambda xs: statistics.median(xs) if xs else 0
summary = {}
print(f"{'shmem THP':<10} {'vmm':<12} {'wall ms':>8} {'/init s':>8} {'KVM exits':>10} {'page faults':>12}")
for thp in ("advise", "never"):
    for vmm in ("cocoon-vmm", "cocoon-memfd", "qemu"):
        sel = [r for r in runs if r["vmm"] == vmm and r["shmem_thp"] == thp]
        m = {k: med([r[k] for r in sel]) for k in ("wall_ms", "init_uptime_s", "kvm_exits", "page_faults")}
        summary[f"{thp}/{vmm}"] = m
        print(f"{thp:<10} {vmm:<12} {m['wall_ms']:>8.0f} {m['init_uptime_s']:>8.2f} {m['kvm_exits']:>10.0f} {m['page_faults']:>12.0f}")
    q = summary[f"{thp}/qemu"]["wall_ms"]
    if q:
        for vmm in ("cocoon-vmm", "cocoon-memfd"):
            print(f"{thp:<10} ratio {vmm}/qemu wall (medians): {summary[f'{thp}/{vmm}']['wall_ms'] / q:.2f}")
for t in failed:
    print(f"{t[1]:<10} {t[0]:<12} one run failed or was killed after 60 s (not in the medians)")
json.dump({"runs": runs, "medians": summary, "failed": failed}, open(sys.argv[2], "w"), indent=2)
print("report written to", sys.argv[2])
PY
