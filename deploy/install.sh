#!/usr/bin/env bash
# Installs Cocoon on a Kubernetes node, as the cocoon-deploy DaemonSet runs it
# (deploy/cocoon-deploy.yaml) or by hand: the binaries and guest image into /opt/cocoon,
# the shim on containerd's PATH, /etc/cocoon/config.toml, and the `cocoon` runtime
# handler in containerd's config (deploy/containerd-cocoon.toml for containerd 1.6/1.7's
# `version = 2`, deploy/containerd2-cocoon.toml for containerd 2's `version = 3`); then it
# restarts containerd, runs `cocoon check` on the node and labels the node:
# cocoon.io/runtime=true when pods can start there, cocoon.io/runtime=unready (which the
# RuntimeClass does not select) with the check's reasons in this script's output when
# they cannot. `install.sh uninstall` undoes all of it.
#
# Usage: install.sh [install | uninstall | install-and-wait]
#   install: exits 2 when everything was installed but the node cannot run pods.
#   install-and-wait: install, then wait for SIGTERM (the DaemonSet's container; its
#   preStop hook runs `install.sh uninstall`), whether the node is ready or not: its log
#   says which.
#
# Environment:
#   HOST_ROOT          where the node's root filesystem is seen (default /host; / by hand)
#   COCOON_PAYLOAD     what to install (default /opt/cocoon-artifacts): bin/ and
#                      share/cocoon/ as `make install PREFIX=<payload>` lays them out
#   CONTAINERD_CONFIG  containerd's config on the node (default /etc/containerd/config.toml)
#   COCOON_NO_RESTART  1: leave containerd running (restart it yourself)
#   NODE_NAME          the node to label cocoon.io/runtime (kubectl; skipped if unset)
#   COCOON_CHECK       the command that checks the node instead of /opt/cocoon/bin/cocoon
#                      check in the node's namespaces; `skip` labels the node unchecked
set -euo pipefail

HOST_ROOT=${HOST_ROOT:-/host}
PAYLOAD=${COCOON_PAYLOAD:-/opt/cocoon-artifacts}
CONTAINERD_CONFIG=${CONTAINERD_CONFIG:-/etc/containerd/config.toml}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# The handler's table for each containerd config version (check_containerd_config
# picks SNIPPET).
SNIPPET_V2=$HERE/containerd-cocoon.toml
SNIPPET_V3=$HERE/containerd2-cocoon.toml
SNIPPET=""

# Paths as the node sees them (written into configs and links); `host PATH` is where
# this script reaches them.
PREFIX=/opt/cocoon
BIN_DIR=$PREFIX/bin
IMAGE_DIR=$PREFIX/share/cocoon
SHIM=containerd-shim-cocoon-v2
SHIM_LINK=/usr/local/bin/$SHIM
NODE_CONFIG=/etc/cocoon/config.toml
# The checksum of the config.toml this script wrote: uninstall removes that file only
# while it is unchanged.
CONFIG_SUM=$PREFIX/config.toml.sha256
BINARIES=(containerd-shim-cocoon-v2 cocoon cocoon-vmm)
# Installed when the payload has it; otherwise the node's PATH must.
OPTIONAL_BINARIES=(virtiofsd)
IMAGE_FILES=(vmlinuz initramfs.cpio manifest.json)
# The PVH ELF of Cocoon's own kernel, which the image's manifest names when it has one.
OPTIONAL_IMAGE_FILES=(vmlinux)
# systemd's default PATH: what containerd, and so the shim, runs with.
NODE_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
BEGIN_MARK="# BEGIN cocoon"
END_MARK="# END cocoon"
NODE_LABEL=cocoon.io/runtime
# Whether `cocoon check` found that pods can start on the node (check_node).
NODE_READY=true

log() { echo "cocoon install.sh: $*"; }
die() {
    echo "cocoon install.sh: error: $*" >&2
    exit 1
}
host() { printf '%s%s' "${HOST_ROOT%/}" "$1"; }

TMP=""
TMP_FILES=()
cleanup() { rm -f -- "${TMP_FILES[@]}"; }
trap cleanup EXIT

# Sets TMP to a new temporary file beside $1 (so that mv replaces $1 atomically), with
# $1's mode and owner. Not in a subshell: the EXIT trap must know every such file.
temp_beside() {
    TMP=$(mktemp "$1.cocoon.XXXXXX") || die "cannot create a temporary file beside $1"
    TMP_FILES+=("$TMP")
    if [[ -e $1 ]]; then
        { chmod --reference="$1" "$TMP" && chown --reference="$1" "$TMP"; } ||
            die "cannot give $TMP the mode and owner of $1"
    fi
}

# Writes file $1 to $2 without the cocoon block, byte for byte: the block is the lines
# from BEGIN_MARK to END_MARK and the newline before them, which is what add_block adds.
without_block() {
    local text="" begin=$'\n'"$BEGIN_MARK"$'\n' head rest
    IFS= read -r -d '' text <"$1" || true
    while [[ $text == *"$begin"* ]]; do
        head=${text%%"$begin"*}
        rest=${text#*"$begin"}
        if [[ $rest == *"$END_MARK"$'\n'* ]]; then
            rest=${rest#*"$END_MARK"$'\n'}
        elif [[ $rest == *"$END_MARK" ]]; then
            rest=""
        else
            die "$1 has a '$BEGIN_MARK' line with no '$END_MARK' line after it: fix the file by hand"
        fi
        text=$head$rest
    done
    printf '%s' "$text" >"$2" || die "cannot write $2"
}

# The top-level `version` of the containerd config $1, or nothing.
containerd_config_version() {
    awk '/^[[:space:]]*\[/ { exit }
         /^[[:space:]]*version[[:space:]]*=/ {
             sub(/^[^=]*=[[:space:]]*/, ""); sub(/[[:space:]]*(#.*)?$/, ""); print; exit
         }' "$1"
}

check_containerd_config() {
    local cfg version
    cfg=$(host "$CONTAINERD_CONFIG")
    [[ -f $cfg ]] || die "containerd's config $cfg does not exist: create one (\`containerd config default\` writes version = 2 on containerd 1.6/1.7, version = 3 on containerd 2.x), or set CONTAINERD_CONFIG"
    version=$(containerd_config_version "$cfg")
    case $version in
        2) SNIPPET=$SNIPPET_V2 ;;
        3) SNIPPET=$SNIPPET_V3 ;;
        "") die "containerd's config $cfg has no top-level \`version\`, so containerd reads it as version 1, whose tables this installer does not write: convert it (containerd 2.x: \`containerd config migrate\`) to version = 2 (containerd 1.6/1.7, $SNIPPET_V2) or version = 3 (containerd 2.x, $SNIPPET_V3), or add the handler by hand" ;;
        *) die "containerd's config $cfg declares version = $version: this installer writes the handler for version = 2 (containerd 1.6/1.7, $SNIPPET_V2) and version = 3 (containerd 2.x, $SNIPPET_V3); with version = $version, add the handler by hand" ;;
    esac
    [[ -f $SNIPPET ]] || die "the containerd snippet $SNIPPET is missing (it ships beside install.sh)"
    temp_beside "$cfg"
    without_block "$cfg" "$TMP"
    if grep -qE '^[[:space:]]*\[[^]]*\.runtimes\.("cocoon"|'"'"'cocoon'"'"'|cocoon)[].]' "$TMP"; then
        die "containerd's config $cfg already defines the runtime \`cocoon\` outside the '$BEGIN_MARK' block: remove that table, or keep it and do not run this installer"
    fi
}

check_payload() {
    [[ -d $HOST_ROOT ]] || die "HOST_ROOT $HOST_ROOT is not a directory (the node's root filesystem)"
    local f
    for f in "${BINARIES[@]}"; do
        [[ -f $PAYLOAD/bin/$f ]] || die "the payload $PAYLOAD has no bin/$f (expected the layout of \`make install PREFIX=$PAYLOAD\`)"
    done
    for f in "${IMAGE_FILES[@]}"; do
        [[ -f $PAYLOAD/share/cocoon/$f ]] || die "the payload $PAYLOAD has no share/cocoon/$f (expected the layout of \`make install PREFIX=$PAYLOAD\`)"
    done
}

# Copies $1 to $2 with mode $3 through a temporary file, so a running binary is replaced,
# not overwritten.
install_file() {
    local dir
    dir=$(dirname "$2")
    mkdir -p "$dir" || die "cannot create $dir"
    temp_beside "$2"
    { cp "$1" "$TMP" && chmod "$3" "$TMP" && mv -f "$TMP" "$2"; } || die "cannot install $1 as $2"
}

install_files() {
    local f
    for f in "${BINARIES[@]}"; do
        install_file "$PAYLOAD/bin/$f" "$(host "$BIN_DIR/$f")" 0755
    done
    for f in "${OPTIONAL_BINARIES[@]}"; do
        if [[ -f $PAYLOAD/bin/$f ]]; then
            install_file "$PAYLOAD/bin/$f" "$(host "$BIN_DIR/$f")" 0755
        fi
    done
    for f in "${IMAGE_FILES[@]}"; do
        install_file "$PAYLOAD/share/cocoon/$f" "$(host "$IMAGE_DIR/$f")" 0644
    done
    for f in "${OPTIONAL_IMAGE_FILES[@]}"; do
        if [[ -f $PAYLOAD/share/cocoon/$f ]]; then
            install_file "$PAYLOAD/share/cocoon/$f" "$(host "$IMAGE_DIR/$f")" 0644
        else
            rm -f "$(host "$IMAGE_DIR/$f")" || die "cannot remove $(host "$IMAGE_DIR/$f")"
        fi
    done
    log "installed the binaries in $BIN_DIR and the guest image in $IMAGE_DIR"

    # containerd looks the shim up on its PATH.
    local link
    link=$(host "$SHIM_LINK")
    if [[ -L $link ]]; then
        [[ $(readlink "$link") == "$BIN_DIR/$SHIM" ]] ||
            die "$link is a link to $(readlink "$link"), not to $BIN_DIR/$SHIM: another Cocoon install owns it; remove it first"
    elif [[ -e $link ]]; then
        die "$link exists and is not a link to $BIN_DIR/$SHIM (Cocoon installed by hand with \`make install\`?): remove it first"
    else
        mkdir -p "$(dirname "$link")" || die "cannot create $(dirname "$link")"
        ln -s "$BIN_DIR/$SHIM" "$link" || die "cannot link $link to $BIN_DIR/$SHIM"
    fi
    log "linked $SHIM_LINK to $BIN_DIR/$SHIM"
}

write_cocoon_config() {
    local cfg sum
    cfg=$(host "$NODE_CONFIG")
    sum=$(host "$CONFIG_SUM")
    if [[ -e $cfg ]]; then
        log "kept the existing $NODE_CONFIG"
        return
    fi
    mkdir -p "$(dirname "$cfg")" || die "cannot create $(dirname "$cfg")"
    temp_beside "$cfg"
    cat >"$TMP" <<EOF
# Written by Cocoon's install.sh; \`install.sh uninstall\` removes it unless it was edited.
# Every key, its default and its meaning: docs/config.toml in the Cocoon repository.
# The kernel and initramfs are the image's (vm.kernel and vm.initrd unset): its PVH
# ELF where its manifest names one, else its bzImage.
[paths]
image_dir = "$IMAGE_DIR"
EOF
    { chmod 0644 "$TMP" && mv -f "$TMP" "$cfg"; } || die "cannot write $cfg"
    sha256sum "$cfg" | cut -d' ' -f1 >"$sum" || die "cannot write $sum"
    log "wrote $NODE_CONFIG"
}

# Puts the handler in containerd's config (replacing an earlier block). Returns 0 when
# the file changed.
add_block() {
    local cfg
    cfg=$(host "$CONTAINERD_CONFIG")
    temp_beside "$cfg"
    without_block "$cfg" "$TMP"
    {
        printf '\n%s\n' "$BEGIN_MARK"
        printf '%s\n' "# Added by Cocoon's install.sh; \`install.sh uninstall\` removes this block."
        printf '%s\n' "$(<"$SNIPPET")"
        printf '%s\n' "$END_MARK"
    } >>"$TMP" || die "cannot write $TMP"
    if cmp -s "$TMP" "$cfg"; then
        log "containerd's config $CONTAINERD_CONFIG already has the cocoon handler"
        return 1
    fi
    mv -f "$TMP" "$cfg" || die "cannot replace $cfg"
    log "added the cocoon handler to containerd's config $CONTAINERD_CONFIG"
}

# Takes the handler out of containerd's config. Returns 0 when the file changed.
remove_block() {
    local cfg
    cfg=$(host "$CONTAINERD_CONFIG")
    [[ -f $cfg ]] || return 1
    temp_beside "$cfg"
    without_block "$cfg" "$TMP"
    if cmp -s "$TMP" "$cfg"; then
        return 1
    fi
    mv -f "$TMP" "$cfg" || die "cannot replace $cfg"
    log "removed the cocoon handler from containerd's config $CONTAINERD_CONFIG"
}

restart_containerd() {
    if [[ ${COCOON_NO_RESTART:-} == 1 ]]; then
        log "COCOON_NO_RESTART=1: containerd was not restarted; restart it for the change to take effect"
        return
    fi
    command -v nsenter >/dev/null ||
        die "nsenter is not installed here: cannot restart containerd on the node (restart it yourself and rerun with COCOON_NO_RESTART=1)"
    nsenter --target 1 --mount --uts --ipc --net --pid -- systemctl restart containerd ||
        die "\`systemctl restart containerd\` failed on the node (needs hostPID and privileges; see \`journalctl -u containerd\` there)"
    log "restarted containerd"
}

# Runs `cocoon check` as the node will run pods and logs its verdict; returns 0 when
# pods can start. In the node's own namespaces (PID 1's, as for the restart; by hand,
# HOST_ROOT=/, here), with a clean environment: it must see the node's /dev/kvm, kernel,
# tools and /etc/cocoon/config.toml, as the shim will, not this container's.
check_node() {
    local cmd out rc=0
    if [[ ${COCOON_CHECK:-} == skip ]]; then
        log "COCOON_CHECK=skip: the node was not checked"
        return 0
    elif [[ -n ${COCOON_CHECK:-} ]]; then
        read -ra cmd <<<"$COCOON_CHECK"
    elif [[ -z ${HOST_ROOT%/} ]]; then
        cmd=(timeout 120 env -i PATH="$NODE_PATH" "$BIN_DIR/cocoon" check)
    else
        if ! command -v nsenter >/dev/null; then
            log "error: nsenter is not installed here, so \`cocoon check\` cannot run on the node" >&2
            return 1
        fi
        # timeout: a tool's `--version` that hangs must not hold the install.
        cmd=(nsenter --target 1 --mount --uts --ipc --net --pid --
            timeout 120 env -i PATH="$NODE_PATH" "$BIN_DIR/cocoon" check)
    fi
    out=$("${cmd[@]}" 2>&1) || rc=$?
    # Exit status 1 is the verdict only with the verdict's line (nsenter, or a cocoon that
    # failed otherwise, exit 1 too).
    if [[ $rc == 1 ]] && ! grep -q '^pods:' <<<"$out"; then
        rc=failed
    fi
    case $rc in
        0)
            log "cocoon check on the node: $(grep -m1 '^pods:' <<<"$out" | sed 's/^pods: *//')"
            return 0
            ;;
        1)
            # The verdict is the report's last section, from its `pods:` line on.
            log "error: cocoon check on the node: pods cannot start there:" >&2
            sed -n '/^pods:/,$p' <<<"$out" | sed 's/^/    /' >&2
            ;;
        *)
            log "error: \`${cmd[*]}\` failed on the node (exit status ${rc/failed/1}):" >&2
            tail -n 20 <<<"$out" | sed 's/^/    /' >&2
            ;;
    esac
    log "the node is labelled $NODE_LABEL=unready, which the RuntimeClass does not select: fix the above, then rerun install.sh (under the DaemonSet: delete its pod on this node)" >&2
    return 1
}

# label_node VALUE, or label_node - to remove the label.
label_node() {
    [[ -n ${NODE_NAME:-} ]] || return 0
    local arg
    if [[ $1 == - ]]; then arg=$NODE_LABEL-; else arg=$NODE_LABEL=$1; fi
    if ! command -v kubectl >/dev/null; then
        log "warning: kubectl is not installed here: run \`kubectl label node $NODE_NAME $arg\` yourself"
        return
    fi
    kubectl label node "$NODE_NAME" "$arg" --overwrite ||
        die "\`kubectl label node $NODE_NAME $arg\` failed (may this service account patch nodes?)"
}

do_install() {
    check_payload
    check_containerd_config
    install_files
    write_cocoon_config
    if add_block; then
        restart_containerd
    fi
    if check_node; then
        label_node true
        log "done: pods with runtimeClassName: cocoon can run on this node"
    else
        NODE_READY=false
        label_node unready
    fi
}

do_uninstall() {
    # First, so that no new Cocoon pods are scheduled here.
    label_node -
    if remove_block; then
        restart_containerd
    fi

    local link
    link=$(host "$SHIM_LINK")
    if [[ -L $link && $(readlink "$link") == "$BIN_DIR/$SHIM" ]]; then
        rm -f "$link" || die "cannot remove $link"
    fi

    local cfg sum
    cfg=$(host "$NODE_CONFIG")
    sum=$(host "$CONFIG_SUM")
    if [[ -f $cfg && -f $sum ]]; then
        if [[ $(sha256sum "$cfg" | cut -d' ' -f1) == "$(<"$sum")" ]]; then
            rm -f "$cfg" || die "cannot remove $cfg"
        else
            log "kept $NODE_CONFIG: it was edited after install.sh wrote it"
        fi
    fi
    rm -f "$sum" || die "cannot remove $sum"

    local f
    for f in "${BINARIES[@]}" "${OPTIONAL_BINARIES[@]}"; do
        rm -f "$(host "$BIN_DIR/$f")" || die "cannot remove $(host "$BIN_DIR/$f")"
    done
    for f in "${IMAGE_FILES[@]}" "${OPTIONAL_IMAGE_FILES[@]}"; do
        rm -f "$(host "$IMAGE_DIR/$f")" || die "cannot remove $(host "$IMAGE_DIR/$f")"
    done
    local d
    for d in "$IMAGE_DIR" "$PREFIX/share" "$BIN_DIR" "$PREFIX" /etc/cocoon; do
        if [[ -d $(host "$d") ]]; then
            rmdir --ignore-fail-on-non-empty "$(host "$d")" || die "cannot remove $(host "$d")"
        fi
    done
    log "uninstalled"
}

case ${1:-install} in
    install)
        do_install
        [[ $NODE_READY == true ]] || exit 2
        ;;
    uninstall) do_uninstall ;;
    install-and-wait)
        # A node that cannot run pods keeps its pod running: the log says why.
        do_install
        sleep infinity &
        sleeper=$!
        trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM INT
        wait "$sleeper"
        ;;
    *) die "unknown action '$1' (install, uninstall or install-and-wait)" ;;
esac
