#!/usr/bin/env bash
# Processes the tests start and must not leave behind (VMs, their host helpers, the
# test nodes' containerd and registries). `before` records what already runs; `after`
# fails, naming them, if any other is still there once they had 10 s to go.
set -euo pipefail
names='qemu-system-x86|virtiofsd|cocoon-vmm|containerd-shim|containerd|docker-registry'
state="${LEFTOVERS_STATE:-$(dirname "$0")/../target/leftovers.before}"
# By command name (the kernel keeps 15 characters of it).
list() { ps -eo pid=,comm= | awk -v re="^($names)\$" '$2 ~ re {print $1}' | sort; }
case "${1:-}" in
before)
    mkdir -p "$(dirname "$state")"
    list > "$state"
    ;;
after)
    deadline=$((SECONDS + 10))
    while :; do
        left=$(comm -13 "$state" <(list))
        [ -z "$left" ] && exit 0
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "leftovers: processes the tests left behind:" >&2
            # shellcheck disable=SC2086
            ps -o pid,ppid,lstart,args -p $(echo $left | tr ' ' ',') >&2 || true
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
