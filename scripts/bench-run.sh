#!/usr/bin/env bash
# `cocoon bench run` against a private containerd with the busybox test image.
# Usage: scripts/bench-run.sh [runs] [report.json]
set -euo pipefail
runs=${1:-10}
out=${2:-$(pwd)/target/bench-run.json}
source "$(dirname "$0")/lib-containerd.sh"
cocoon bench run --address "$sock" --image "$image" --runs "$runs" --out "$out"
