# Sourced by demo.sh and bench-run.sh: a private containerd in a temp dir with
# the busybox test image imported, torn down (with its shims, VMs and mounts)
# on exit. Sets: dir, sock, image, cpid; exports PATH and COCOON_CONFIG.
# COCOON_HYPERVISOR (qemu, cocoon-vmm) pins the pods' VMM; unset, the shim's default.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=$(mktemp -d "${TMPDIR:-/tmp}/cocoon.XXXXXX")
sock="$dir/containerd.sock"
# COCOON_BIN_DIR=target/node measures the binaries `make install` puts on a node.
export PATH="${COCOON_BIN_DIR:-$root/target/debug}:$root/target/debug:${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
export COCOON_CONFIG="$dir/cocoon.toml"

cleanup() {
    [[ -n "${cpid:-}" ]] && kill "$cpid" 2>/dev/null && wait "$cpid" 2>/dev/null || true
    pkill -f -- "-address $sock" 2>/dev/null || true
    grep -o " $dir[^ ]*" /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

# The image's own kernel and initramfs (its PVH ELF where it has one).
top=""
[[ -z "${COCOON_HYPERVISOR:-}" ]] || top="hypervisor = \"$COCOON_HYPERVISOR\""$'\n'
printf '%s[paths]\nimage_dir = "%s"\nrun_dir = "%s"\n' \
    "$top" "$root/target/image" "$dir/run" > "$COCOON_CONFIG"
printf 'version = 2\nroot = "%s/root"\nstate = "%s/state"\ndisabled_plugins = ["io.containerd.grpc.v1.cri"]\n[grpc]\n  address = "%s"\n[ttrpc]\n  address = "%s.ttrpc"\n' \
    "$dir" "$dir" "$sock" "$sock" > "$dir/containerd.toml"
containerd --config "$dir/containerd.toml" >"$dir/containerd.log" 2>&1 &
cpid=$!
for _ in $(seq 1 300); do
    ctr --address "$sock" version >/dev/null 2>&1 && break
    sleep 0.1
done
image=$(cocoon-test-image /bin/busybox "$dir/busybox.tar")
ctr --address "$sock" images import "$dir/busybox.tar" >/dev/null
