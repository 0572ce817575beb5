#!/usr/bin/env bash
# The demo: a private containerd, a locally built busybox image, and
# `ctr run --runtime io.containerd.cocoon.v2`: a container in its own microVM.
# Then the same with runc, for comparison. Everything is torn down at the end.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/target/debug"
dir=$(mktemp -d /tmp/cocoon-demo.XXXXXX)
sock="$dir/containerd.sock"
export PATH="$bin:${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
export COCOON_CONFIG="$dir/cocoon.toml"

cleanup() {
    [[ -n "${cpid:-}" ]] && kill "$cpid" 2>/dev/null && wait "$cpid" 2>/dev/null || true
    pkill -f -- "-address $sock" 2>/dev/null || true
    grep -o " $dir[^ ]*" /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

cat > "$COCOON_CONFIG" <<EOT
[vm]
kernel = "$root/target/image/vmlinuz"
initrd = "$root/target/image/initramfs.cpio"
[paths]
run_dir = "$dir/run"
EOT
cat > "$dir/containerd.toml" <<EOT
version = 2
root = "$dir/root"
state = "$dir/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
EOT

echo "== host check"
cocoon check
echo
echo "== private containerd at $sock"
containerd --config "$dir/containerd.toml" >"$dir/containerd.log" 2>&1 &
cpid=$!
for _ in $(seq 1 300); do
    ctr --address "$sock" version >/dev/null 2>&1 && break
    sleep 0.1
done
image=$(cocoon-test-image /bin/busybox "$dir/busybox.tar")
ctr --address "$sock" images import "$dir/busybox.tar" >/dev/null
echo "imported $image"
echo
cmd=(sh -c 'echo "hello from $(hostname), kernel $(uname -r), $(grep -c ^processor /proc/cpuinfo) cpu"; id')
echo "== ctr run --runtime io.containerd.cocoon.v2 (a microVM)"
time ctr --address "$sock" run --rm --runtime io.containerd.cocoon.v2 "$image" demo-cocoon "${cmd[@]}"
echo
echo "== ctr run --runtime io.containerd.runc.v2 (for comparison)"
time ctr --address "$sock" run --rm --runtime io.containerd.runc.v2 "$image" demo-runc "${cmd[@]}"
