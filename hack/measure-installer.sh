#!/usr/bin/env bash
# Measures what `tproxy-cni install` costs on a node, to size the DaemonSet's resource requests:
# peak and steady RSS, and CPU time at start-up, idle, and while the primary CNI rewrites its file
# 200 times. Prints figures; never fails on a slow machine (a benchmark, not a test).
#
# Usage: hack/measure-installer.sh [path/to/tproxy-cni]   (default: a release build)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-}
if [ -z "$bin" ]; then
  cargo build -q --release
  bin=target/release/tproxy-cni
fi
root=$(mktemp -d /tmp/tproxy-measure.XXXXXX)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$root"; }
trap cleanup EXIT
mkdir -p "$root"/{bin,conf,sa}
printf token > "$root/sa/token"; printf ca > "$root/sa/ca.crt"
cp cni-conf/primary/10-calico.conflist "$root/conf/"
hz=$(getconf CLK_TCK)
cpu() { awk '{print $14+$15}' "/proc/$pid/stat"; }   # utime+stime in clock ticks
rss() { awk '/^VmRSS/{r=$2} /^VmHWM/{h=$2} END{print r" kB (peak "h" kB)"}' "/proc/$pid/status"; }

"$bin" install --cni-bin-dir "$root/bin" --cni-conf-dir "$root/conf" --state-dir "$root/state" \
  --service-account-dir "$root/sa" --api-server https://10.96.0.1:443 --probe-addr 127.0.0.1:0 \
  --ready-file "$root/ready" --log-level warn 2>"$root/log" &
pid=$!
for _ in $(seq 200); do [ -f "$root/ready" ] && break; sleep 0.02; done
[ -f "$root/ready" ] || { cat "$root/log"; echo "installer never became ready"; exit 1; }
echo "binary: $bin ($(stat -c %s "$bin") bytes)"
echo "after install:      RSS $(rss), CPU $(( $(cpu) * 1000 / hz )) ms"
c0=$(cpu); sleep 10; c1=$(cpu)
echo "idle 10 s:          RSS $(rss), CPU $(( (c1 - c0) * 1000 / hz )) ms"
start=$(date +%s%N)
for i in $(seq 200); do
  sed "s/\"mtu\": 0/\"mtu\": $((1400 + i))/" cni-conf/primary/10-calico.conflist > "$root/new"
  mv "$root/new" "$root/conf/10-calico.conflist"
  for _ in $(seq 400); do grep -q '"tproxy-cni"' "$root/conf/10-calico.conflist" && break; sleep 0.005; done
done
end=$(date +%s%N); c2=$(cpu)
echo "200 rewrites:       RSS $(rss), CPU $(( (c2 - c1) * 1000 / hz )) ms over $(( (end - start) / 1000000 )) ms wall"
