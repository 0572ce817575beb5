#!/usr/bin/env bash
# Installs what Cocoon needs on a Debian 12 host, idempotently: QEMU, the
# container tooling used by tests and the demo, static busybox for the boot
# benchmark's baseline, and dpkg tools for the guest image builder. Run as root.
set -euo pipefail

packages=(qemu-system-x86 containerd runc busybox-static dpkg)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup-host: need root to install: ${missing[*]}" >&2
        exit 1
    fi
    echo "setup-host: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! cargo nextest --version >/dev/null 2>&1; then
    echo "setup-host: installing cargo-nextest"
    cargo install --locked cargo-nextest
fi
