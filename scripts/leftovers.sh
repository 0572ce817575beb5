#!/usr/bin/env bash
# What the tests make and must not leave behind: processes (VMs, their host helpers, the
# test nodes' containerd and registries), network namespaces, network links (taps,
# veths, bridges), mounts, loop devices and cgroups. `before` records what is already
# there; `after` fails, naming them, if anything else is still there once it had 10 s
# to go.
set -euo pipefail
names='qemu-system-x86|virtiofsd|cocoon-vmm|containerd-shim|containerd|docker-registry'
state="${LEFTOVERS_STATE:-$(dirname "$0")/../target/leftovers.before}"
kinds='processes netns links mounts loops cgroups'

# Each kind, one entry per line, sorted.
processes() {
    # By command name (the kernel keeps 15 characters of it).
    ps -eo pid=,comm= | awk -v re="^($names)\$" '$2 ~ re {print $1}' | sort
}
netns() { ip netns list 2>/dev/null | awk '{print $1}' | sort; }
# The host's side of pod networks (taps, veths, CNI bridges), by name: modules load
# links of their own on first use (ifb0, tunl0, ...).
links() {
    ip -o link show 2>/dev/null | awk -F': ' '{sub(/@.*/, "", $2); print $2}' |
        grep -E '^(tap|veth|cni|cocoon|vnet)' | sort || true
}
# Mount points where pods and test nodes mount (run and temporary directories, named
# network namespaces); a module's own (fuse's connections, configfs) come on first use.
mounts() {
    awk '{print $5}' /proc/self/mountinfo |
        grep -E 'cocoon|containerd|kubelet|^/tmp/|^/run/netns/' | sort || true
}
loops() { losetup -ln -O NAME,BACK-FILE 2>/dev/null | sort; }
# Cgroups of pods and containers: anything named for Cocoon, and what lies under the
# parents containerd and the test nodes use (the parents themselves stay, as they
# would on a node).
cgroups() {
    find /sys/fs/cgroup -type d 2>/dev/null |
        grep -E '/cocoon|/(default|k8s\.io|kubepods[^/]*)/.' | sort || true
}

case "${1:-}" in
before)
    mkdir -p "$(dirname "$state")"
    processes > "$state"
    for k in $kinds; do
        [ "$k" = processes ] || "$k" > "$state.$k"
    done
    ;;
after)
    deadline=$((SECONDS + 10))
    while :; do
        left=$(comm -13 "$state" <(processes))
        others=""
        for k in $kinds; do
            [ "$k" = processes ] && continue
            new=$(comm -13 "$state.$k" <("$k"))
            [ -n "$new" ] && others+="$k the tests left behind:"$'\n'"$new"$'\n'
        done
        [ -z "$left" ] && [ -z "$others" ] && exit 0
        if [ "$SECONDS" -ge "$deadline" ]; then
            if [ -n "$left" ]; then
                echo "leftovers: processes the tests left behind:" >&2
                # shellcheck disable=SC2086
                ps -o pid,ppid,lstart,args -p $(echo $left | tr ' ' ',') >&2 || true
            fi
            [ -n "$others" ] && printf 'leftovers: %s' "$others" >&2
            exit 1
        fi
        sleep 0.2
    done
    ;;
*)
    echo "usage: $0 before|after" >&2
    exit 2
    ;;
esac
