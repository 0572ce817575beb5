#!/usr/bin/env bash
# Installs what Cocoon needs on a Debian 12 host, idempotently: QEMU, the
# container tooling used by tests and the demo, static busybox for the boot
# benchmark's baseline, and dpkg tools for the guest image builder. Run as root.
set -euo pipefail

# libseccomp-dev, libcap-ng-dev, pkg-config: to build virtiofsd (below) and
# the guest agent's seccomp support; binutils (as, ld) to assemble the VMM's
# synthetic test guests; iproute2 for tap tests; acpica-tools (iasl) to check
# the VMM's ACPI tables; containernetworking-plugins (bridge, host-local,
# loopback) for the CRI tests' pod networks; protobuf-compiler because k8s-cri (the
# CRI v1 API the tests drive containerd with) generates its code with protoc; make,
# gcc, flex, bison, bc, libelf-dev, libssl-dev, xz-utils to build Cocoon's own guest
# kernel from linux-source-6.12 (`cocoon image build --built-kernel`); ovmf (SEV
# firmware images) and python3-venv for the reference `cocoon measure` is tested
# against (below); nftables: the shim's PortForward redirect in each pod's network
# namespace (`nft`; some Debian images lack it, and then port-forward to a VM pod fails);
# docker-registry (the CNCF distribution registry) for the in-guest pull tests, which
# start their own on loopback; openssl makes the certificates of the TLS pull test; curl
# and ca-certificates fetch containerd 2 (below).
packages=(qemu-system-x86 containerd runc busybox-static dpkg libseccomp-dev libcap-ng-dev pkg-config binutils iproute2 acpica-tools
          containernetworking-plugins protobuf-compiler make gcc libc6-dev flex bison bc libelf-dev libssl-dev xz-utils
          ovmf python3-venv nftables docker-registry openssl curl ca-certificates)
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
    # The package enables a registry service on :5000; the tests start their own.
    if [[ " ${missing[*]} " == *" docker-registry "* ]] && command -v systemctl >/dev/null; then
        systemctl disable --now docker-registry >/dev/null 2>&1 || true
    fi
fi

# The crates.io tools, at the versions the project was last tested with: a fresh machine
# gets what CI ran, not whatever was released that morning. Where a pinned version
# cannot be installed (yanked, say), the newest is, and the log says so.
VIRTIOFSD_VERSION=1.14.0
NEXTEST_VERSION=0.9.143
CARGO_FUZZ_VERSION=0.13.2
tool_install() {
    local name=$1 version=$2
    shift 2
    cargo install --locked --version "$version" "$@" "$name" && return
    echo "setup-host: WARNING: $name $version would not install; installing the newest" >&2
    cargo install --locked "$@" "$name"
}

# virtiofsd (crates.io; Debian 12 has no package): one per pod VM, it shares
# container filesystems into the guest. Installed where containerd's shims
# find it ($PATH).
if ! command -v virtiofsd >/dev/null 2>&1; then
    if [[ -x "${CARGO_HOME:-$HOME/.cargo}/bin/virtiofsd" ]]; then
        install -m 0755 "${CARGO_HOME:-$HOME/.cargo}/bin/virtiofsd" /usr/local/bin/virtiofsd
    else
        echo "setup-host: installing virtiofsd (cargo install, a few minutes)"
        tool_install virtiofsd "$VIRTIOFSD_VERSION" --root /usr/local
    fi
fi

if ! cargo nextest --version >/dev/null 2>&1; then
    echo "setup-host: installing cargo-nextest"
    tool_install cargo-nextest "$NEXTEST_VERSION"
fi

# cargo-fuzz (crates.io) builds the coverage-guided fuzz targets with libFuzzer, on
# stable (`--sanitizer none`): `make fuzz-guided`, and a short run in `make test`.
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "setup-host: installing cargo-fuzz"
    tool_install cargo-fuzz "$CARGO_FUZZ_VERSION"
fi

# sev-snp-measure (PyPI), the reference tool relying parties use for SEV-SNP launch
# digests: `cocoon measure snp` is tested against it, byte for byte. Pinned, in a venv
# in Cocoon's cache (where the tests look for it).
SNP_MEASURE_VERSION=0.0.13
cache=${COCOON_CACHE_DIR:-}
if [[ -z $cache ]]; then
    if [[ $(id -u) -eq 0 ]]; then cache=/var/lib/cocoon; else cache=${XDG_CACHE_HOME:-$HOME/.cache}/cocoon; fi
fi
venv=$cache/venv/sev-snp-measure-$SNP_MEASURE_VERSION
if [[ ! -x $venv/bin/sev-snp-measure ]]; then
    echo "setup-host: installing sev-snp-measure $SNP_MEASURE_VERSION into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "sev-snp-measure==$SNP_MEASURE_VERSION"
fi

# containerd 2 beside Debian 12's containerd 1.6 (which stays the one on $PATH): the
# tests that check Cocoon under containerd 2's CRI and ctr (`use_containerd2`) run it from
# here. Debian 12 has no containerd 2; Debian's unstable suite builds one against glibc
# 2.34, which Debian 12 has. Pinned by version and sha256; once unstable moved on and the
# pinned file left its pool, the version unstable has now is taken, checked against the
# sha256 its package index gives.
CONTAINERD2_DEB=pool/main/c/containerd/containerd_2.1.9+ds1-5_amd64.deb
CONTAINERD2_SHA256=2dda86ce7033fd612fc50e136679d8174ccad680eb29cd4611e0d2a1b84cf591
MIRROR=${DEBIAN_MIRROR:-https://deb.debian.org/debian}
c2=$cache/containerd2
c2_fail() {
    echo "setup-host: containerd 2: $*" >&2
    exit 1
}
# The pin that filled the cache (a new pin fills it again).
if [[ ! -x $c2/usr/bin/containerd || $(cat "$c2/pin" 2>/dev/null) != "$CONTAINERD2_DEB" ]]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    deb=$CONTAINERD2_DEB sha=$CONTAINERD2_SHA256
    if ! curl -fsSL -o "$tmp/c2.deb" "$MIRROR/$deb"; then
        echo "setup-host: $MIRROR/$deb is gone; taking Debian unstable's containerd instead"
        curl -fsSL -o "$tmp/Packages.xz" "$MIRROR/dists/unstable/main/binary-amd64/Packages.xz" ||
            c2_fail "cannot fetch Debian unstable's package index from $MIRROR"
        xz -dc "$tmp/Packages.xz" > "$tmp/Packages" || c2_fail "Debian unstable's package index does not unpack"
        deb= sha=
        read -r deb sha < <(awk '/^Package: containerd$/ {p = 1} p && /^Filename:/ {f = $2}
            p && /^SHA256:/ {s = $2} p && /^$/ {if (f) {print f, s; exit} p = 0}' "$tmp/Packages") || true
        [[ -n $deb && -n $sha ]] || c2_fail "Debian unstable's package index has no containerd"
        curl -fsSL -o "$tmp/c2.deb" "$MIRROR/$deb" || c2_fail "cannot fetch $MIRROR/$deb"
    fi
    echo "$sha  $tmp/c2.deb" | sha256sum -c --quiet - || c2_fail "$deb: sha256 mismatch"
    echo "setup-host: containerd 2 ($(basename "$deb")) into $c2"
    rm -rf "$c2.new" && mkdir -p "$c2.new"
    dpkg-deb -x "$tmp/c2.deb" "$c2.new" || c2_fail "cannot unpack $deb"
    for b in containerd ctr containerd-shim-runc-v2; do
        [[ -x $c2.new/usr/bin/$b ]] || c2_fail "$deb has no usr/bin/$b"
    done
    "$c2.new/usr/bin/containerd" --version || c2_fail "$deb's containerd does not run here"
    echo "$CONTAINERD2_DEB" > "$c2.new/pin"
    rm -rf "$c2" && mv "$c2.new" "$c2"
fi
