#!/usr/bin/env bash
# The demo: a private containerd, a locally built busybox image, and
# `ctr run --runtime io.containerd.cocoon.v2`: a container in its own microVM.
# Then the same with runc, for comparison. Everything is torn down at the end.
set -euo pipefail
echo "== host check"
"$(dirname "$0")/../target/debug/cocoon" check
echo
source "$(dirname "$0")/lib-containerd.sh"
echo "== private containerd at $sock, image $image"
cmd=(sh -c 'echo "hello from $(hostname), kernel $(uname -r), $(grep -c ^processor /proc/cpuinfo) cpu"; id')
echo
echo "== ctr run --runtime io.containerd.cocoon.v2 (a microVM)"
time ctr --address "$sock" run --rm --runtime io.containerd.cocoon.v2 "$image" demo-cocoon "${cmd[@]}"
echo
echo "== ctr run --runtime io.containerd.runc.v2 (for comparison)"
time ctr --address "$sock" run --rm --runtime io.containerd.runc.v2 "$image" demo-runc "${cmd[@]}"
