#!/usr/bin/env bash
# Kubernetes' CRI validation suite (critest, cri-tools' pkg/validate) against Cocoon and
# runc on one private CRI node, case by case. Not part of `make test`: critest is Go
# and lives on GitHub, which CI cannot reach. See docs/kubernetes.md ("critest").
#
# usage: scripts/critest.sh [--containerd DIR] [--runc-type] (--critest BIN | --cri-tools DIR) [critest flags...]
#   --containerd DIR: the node runs DIR's containerd, ctr and runc shim instead of those on
#   PATH; containerd 2 is in <cache>/containerd2/usr/bin (scripts/setup-host.sh).
#   --runc-type: the cocoon handler is declared runc-type (runtime_path names Cocoon's
#   shim), as docs/kubernetes.md says for containerd 2.1-2.3, which offer user namespaces
#   and recursively read-only volumes only to runc-type handlers.
#   BIN: a built critest (`go test -c ./cmd/critest` in cri-tools); DIR: a cri-tools
#   checkout with its vendor/ (v1.26.x builds with Debian 12's Go 1.19, v1.32.0 with
#   bookworm-backports' golang-1.23-go), built here.
# Writes target/critest/{runc,cocoon}.{log,json} and report.{json,txt}. Fails if Cocoon
# fails a case runc passes, beyond the cases a VM cannot pass by design (below).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$root/target/critest
critest=
if [[ ${1:-} == --containerd ]]; then
    for b in containerd ctr containerd-shim-runc-v2; do
        [[ -x $2/$b ]] || { echo "critest.sh: no $b in $2" >&2; exit 1; }
    done
    PATH=$(cd "$2" && pwd):$PATH
    shift 2
fi
runc_type=false
if [[ ${1:-} == --runc-type ]]; then
    runc_type=true
    shift
fi
case "${1:-}" in
--critest) critest=$2; shift 2 ;;
--cri-tools)
    command -v go >/dev/null || { echo "critest.sh: go not found (apt-get install golang-go)" >&2; exit 1; }
    mkdir -p "$out"
    (cd "$2" && GOFLAGS=-mod=vendor CGO_ENABLED=0 go test -c -o "$out/critest" ./cmd/critest)
    critest=$out/critest
    shift 2 ;;
*) sed -n 2,16p "$0" >&2; exit 2 ;;
esac
for tool in docker-registry containerd ctr gcc python3 /usr/lib/cni/portmap "$root/target/debug/containerd-shim-cocoon-v2"; do
    command -v "$tool" >/dev/null || { echo "critest.sh: $tool not found (make build; scripts/setup-host.sh)" >&2; exit 1; }
done
[[ -n $(ls "$root/target/image" 2>/dev/null) ]] || { echo "critest.sh: no guest image in target/image (make image)" >&2; exit 1; }

# The cases Cocoon fails by design, each refused with a reason naming it (docs/kubernetes.md).
by_design=(
    "runtime should support HostPID"
    "runtime should support HostIpc is true"
    "runtime should support HostNetwork is true"
    "runtime should support portforward in host network"
    "mount with 'rshared' should support propagation from host to container and vice versa"
    # critest >= 1.30: read-only volumes are read-only all the way down (issue #10).
    "should support non-recursive readonly mounts"
)

# Cases containerd itself skips for Cocoon while it runs them for runc: containerd 2.1-2.3
# ask only runc-type runtimes for their features (`-info`; containerd 2.4 asks every
# runtime), so they offer recursively read-only volumes on runc's handler alone.
containerd_skips=(
    "should support recursive readonly mounts"
    "should reject a recursive readonly mount with PROPAGATION_BIDIRECTIONAL"
    "should reject a recursive readonly mount with PROPAGATION_HOST_TO_CONTAINER"
    "should reject a recursive readonly mount with ReadOnly: false"
)

dir=$(mktemp -d /tmp/cocoon-critest.XXXXXX)
bridge=cni-ct50
cleanup() {
    [[ -n ${cpid:-} ]] && kill "$cpid" 2>/dev/null && wait "$cpid" 2>/dev/null || true
    [[ -n ${rpid:-} ]] && kill "$rpid" 2>/dev/null && wait "$rpid" 2>/dev/null || true
    pkill -f -- "-address $dir/containerd.sock" 2>/dev/null || true
    grep -o " $dir[^ ]*" /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    ip link del "$bridge" 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT
mkdir -p "$out" "$dir"/{reg,bin,cni,run,certs.d/registry.k8s.io,certs.d/gcr.io}

# A registry standing in for registry.k8s.io and gcr.io.
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf 'version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: %s/reg\nhttp:\n  addr: 127.0.0.1:%s\n' "$dir" "$port" > "$dir/reg.yml"
docker-registry serve "$dir/reg.yml" > "$dir/registry.log" 2>&1 &
rpid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done
for c in nnp pgrep nginx; do gcc -static -O1 -o "$dir/bin/$c" "$root/scripts/critest/$c.c"; done
"$root/target/debug/cocoon-test-image" /bin/busybox "$dir/busybox.tar" >/dev/null
python3 "$root/scripts/critest/push-images.py" "http://127.0.0.1:$port" "$dir/busybox.tar" "$dir/bin"
for h in registry.k8s.io gcr.io; do
    printf 'server = "http://127.0.0.1:%s"\n[host."http://127.0.0.1:%s"]\n  capabilities = ["pull", "resolve"]\n' "$port" "$port" \
        > "$dir/certs.d/$h/hosts.toml"
done

# The node: containerd with the CRI plugin, runc by default and a `cocoon` handler.
if $runc_type; then
    # A runc-type handler gets runc's options, which name no Cocoon config: the shim
    # takes COCOON_CONFIG from containerd's environment (below).
    cocoon_type="runtime_type = \"io.containerd.runc.v2\"
  runtime_path = \"$root/target/debug/containerd-shim-cocoon-v2\""
else
    cocoon_type='runtime_type = "io.containerd.cocoon.v2"'
fi
cri='plugins."io.containerd.grpc.v1.cri"'
cat > "$dir/containerd.toml" <<T
version = 2
root = "$dir/root"
state = "$dir/state"
[grpc]
  address = "$dir/containerd.sock"
[ttrpc]
  address = "$dir/containerd.sock.ttrpc"
[plugins."io.containerd.nri.v1.nri"]
  socket_path = "$dir/nri.sock"
[$cri]
  sandbox_image = "registry.k8s.io/pause:3.9"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
[$cri.containerd]
  default_runtime_name = "runc"
  snapshotter = "overlayfs"
[$cri.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[$cri.containerd.runtimes.cocoon]
  $cocoon_type
  privileged_without_host_devices = true
[$cri.registry]
  config_path = "$dir/certs.d"
[$cri.cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "$dir/cni"
  max_conf_num = 1
T
cat > "$dir/cni/10-critest.conflist" <<C
{"cniVersion": "0.4.0", "name": "critest", "plugins": [
  {"type": "bridge", "bridge": "$bridge", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "198.18.50.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$dir/ipam"}},
  {"type": "portmap", "capabilities": {"portMappings": true}},
  {"type": "loopback"}]}
C
printf '[vm]\nboot_timeout_ms = 120000\n[paths]\nimage_dir = "%s"\nrun_dir = "%s"\n' "$root/target/image" "$dir/run" > "$dir/cocoon.toml"
PATH=$root/target/debug:$PATH COCOON_CONFIG=$dir/cocoon.toml containerd --config "$dir/containerd.toml" > "$dir/containerd.log" 2>&1 &
cpid=$!
for _ in $(seq 100); do ctr --address "$dir/containerd.sock" version >/dev/null 2>&1 && break; sleep 0.1; done

for handler in runc cocoon; do
    # Each run pulls its images afresh.
    ctr --address "$dir/containerd.sock" -n k8s.io images ls -q | { grep -v pause || true; } \
        | xargs -r ctr --address "$dir/containerd.sock" -n k8s.io images rm >/dev/null
    echo "== critest, handler $handler"
    "$critest" -runtime-endpoint "unix://$dir/containerd.sock" -runtime-handler "$handler" \
        -ginkgo.no-color -ginkgo.json-report "$out/$handler.json" "$@" > "$out/$handler.log" 2>&1 || true
    grep -E '^Ran |Passed \|' "$out/$handler.log" || { tail -20 "$out/$handler.log"; exit 1; }
done
cp "$dir/containerd.log" "$out/containerd.log"
printf '%s\n' "${by_design[@]}" > "$dir/by-design"
# Only where this containerd is one of those, and the handler is not declared runc-type.
if ! $runc_type && containerd --version | grep -qE ' v?2\.[123]\.'; then
    printf '%s\n' "${containerd_skips[@]}" > "$dir/containerd-skips"
else
    : > "$dir/containerd-skips"
fi
python3 - "$out" "$dir/by-design" "$dir/containerd-skips" "$(containerd --version)" <<'P'
import json, sys
out, by_design = sys.argv[1], set(open(sys.argv[2]).read().splitlines())
containerd_skips = set(open(sys.argv[3]).read().splitlines())
def cases(handler):
    specs = json.load(open(f"{out}/{handler}.json"))[0]["SpecReports"]
    return {" ".join(s["ContainerHierarchyTexts"] + [s["LeafNodeText"]]): s["State"] for s in specs if s["LeafNodeType"] == "It"}
runc, cocoon = cases("runc"), cases("cocoon")
rows, worse = [], []
for name in sorted(runc):
    r, c = runc[name], cocoon.get(name, "missing")
    if r != c:
        why = "by design" if any(name.endswith(b) for b in by_design) else ""
        if c == "skipped" and any(name.endswith(b) for b in containerd_skips):
            why = "skipped by containerd"
        rows.append({"case": name, "runc": r, "cocoon": c, "note": why})
        if r == "passed" and not why:
            worse.append(name)
count = lambda cs, st: sum(1 for v in cs.values() if v == st)
report = {"runc": {"passed": count(runc, "passed"), "failed": count(runc, "failed")},
          "cocoon": {"passed": count(cocoon, "passed"), "failed": count(cocoon, "failed")},
          "differences": rows, "cocoon_worse": worse}
json.dump(report, open(f"{out}/report.json", "w"), indent=1)
lines = [f"containerd: {sys.argv[4]}",
         f"critest: runc {report['runc']['passed']} passed / {report['runc']['failed']} failed; "
         f"cocoon {report['cocoon']['passed']} passed / {report['cocoon']['failed']} failed",
         f"{'case':<100} {'runc':<8} {'cocoon':<8} note"]
lines += [f"{r['case'][:100]:<100} {r['runc']:<8} {r['cocoon']:<8} {r['note']}" for r in rows]
open(f"{out}/report.txt", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
sys.exit(1 if worse else 0)
P
