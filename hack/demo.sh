#!/usr/bin/env bash
# The tproxy-cni demo: two pods on a real bridge, set up through the real CNI chain (bridge +
# host-local + tproxy-cni, driven by libcni), with Consul's annotations and tproxy-cni's built-in
# defaults (the nftables engine: our tables `ip tproxy-cni` / `ip6 tproxy-cni` in each pod). `tproxy-cni validate` proves the client's redirect as an unprivileged user; then a
# stand-in sidecar in each pod shows the client's request crossing both proxies, an intention
# denying it and being lifted, and everything is torn down at the end.
#
# Usage: sudo hack/demo.sh        (installs what it needs on Debian; about a minute on first run)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "demo.sh needs root (network namespaces, nftables)"; exit 1; }

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
bash hack/deps.sh
say "building tproxy-cni and the demo's stand-in sidecar"
cargo build -q --bin tproxy-cni --example demo_pod
bin=$PWD/target/debug
pod=$bin/examples/demo_pod
cnidrv=$PWD/target/tmp/cnidrv
if [ ! -x "$cnidrv" ]; then
  # shared/tools sits beside the checkout (CI, the main clone) or higher up (a git worktree).
  build=$(for d in .. ../.. ../../..; do [ -f "$d/shared/tools/cnidrv/build.sh" ] && echo "$d/shared/tools/cnidrv/build.sh" && break; done)
  [ -n "$build" ] || { echo "shared/tools/cnidrv not found beside the checkout"; exit 1; }
  mkdir -p target/tmp; bash "$build" "$cnidrv" >/dev/null
fi

work=$(mktemp -d /tmp/tproxy-cni-demo.XXXXXX)
chmod 755 "$work"   # the sidecars run as the proxy's UID and read their deny file here
br=tpdemo$$
pids=()
cleanup() {
  set +e
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  for ns in hello hello-client; do
    [ -e /run/netns/demo-$ns ] && CNI_PATH=/usr/lib/cni:$bin CNIDRV_CACHE=$work/cache \
      "$cnidrv" del "$work/demo.conflist" /run/netns/demo-$ns "demo-$ns" "$(args $ns)" >/dev/null 2>&1
    ip netns del demo-$ns 2>/dev/null
  done
  ip link del "$br" 2>/dev/null
  rm -rf "$work"
}
args() { echo "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=$1"; }
trap cleanup EXIT

# The node's CNI configuration: the primary plugin, then tproxy-cni chained last.
cat > "$work/demo.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "demo",
  "plugins": [
    {"type": "bridge", "bridge": "$br", "isGateway": false, "ipMasq": false,
     "ipam": {"type": "host-local", "dataDir": "$work/ipam", "ranges": [[{"subnet": "198.18.0.0/24"}]]}},
    {"type": "tproxy-cni", "log_file": "$work/tproxy-cni.log",
     "capabilities": {"io.kubernetes.cri.pod-annotations": true}}
  ]
}
JSON
say "the node's CNI configuration (tproxy-cni chained after bridge; no \"backend\": the default, nftables)"
cat "$work/demo.conflist"

# What Consul's webhook writes on a meshed pod with transparent proxy (ConsulDNS off).
annotations='{"consul.hashicorp.com/connect-inject-status":"injected",
 "consul.hashicorp.com/transparent-proxy-status":"enabled",
 "consul.hashicorp.com/redirect-traffic-config":"{\"ConsulDNSIP\":\"\",\"ConsulDNSPort\":0,\"ProxyUserID\":\"5995\",\"ProxyInboundPort\":20000,\"ProxyOutboundPort\":15001,\"ExcludeInboundPorts\":null,\"ExcludeOutboundPorts\":null,\"ExcludeOutboundCIDRs\":null,\"ExcludeUIDs\":[\"5996\"],\"NetNS\":\"\",\"IptablesProvider\":null}"}'
echo "$annotations" > "$work/annotations.json"

say "tproxy-cni render: the nf_tables batch a pod with these annotations gets, as an nft -f script"
"$bin/tproxy-cni" render "$work/annotations.json"

# The bridge exists before the first pod, with a fixed MAC: otherwise Linux changes its address as
# ports join, and the bridge plugin's own CHECK reports a mismatch.
ip link add "$br" type bridge && ip link set "$br" address 02:00:5e:00:53:01 && ip link set "$br" up
for ns in hello hello-client; do
  ip netns add demo-$ns
  ip netns exec demo-$ns ip link set lo up   # as a container runtime does
  say "runtime: ADD pod $ns through the chain (libcni, annotations as a runtime capability)"
  CNI_PATH=/usr/lib/cni:$bin CNIDRV_CACHE=$work/cache "$cnidrv" add "$work/demo.conflist" /run/netns/demo-$ns "demo-$ns" \
    "$(args $ns)" "{\"io.kubernetes.cri.pod-annotations\": $(tr -d '\n' < "$work/annotations.json")}" \
    | grep -E '"address"' | sed 's/^ */  pod address: /'
done
hello_ip=$(ip netns exec demo-hello ip -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1)
client_ip=$(ip netns exec demo-hello-client ip -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1)

# Rules of ours in a pod: the nftables engine's (every rule of our tables carries a comment) and,
# to show the default engine is the one at work, any iptables rule carrying our comment.
nft_ours() { ip netns exec "demo-$1" nft list ruleset | grep -c 'comment "tproxy-cni"' || true; }
iptables_ours() {
  for t in iptables-nft-save ip6tables-nft-save iptables-legacy-save ip6tables-legacy-save; do
    ip netns exec "demo-$1" "$t" 2>/dev/null
  done | grep -c -- '--comment tproxy-cni' || true
}
say "the rules tproxy-cni installed in hello-client's network namespace (nft list table ip tproxy-cni)"
ip netns exec demo-hello-client nft list table ip tproxy-cni \
  || { echo "demo FAILED: no table ip tproxy-cni in hello-client"; exit 1; }
for ns in hello hello-client; do
  ip netns exec demo-$ns nft list table ip tproxy-cni | grep -q 'redirect to :15001' \
    || { echo "demo FAILED: no outbound redirect in $ns's table"; exit 1; }
  [ "$(iptables_ours $ns)" = 0 ] || { echo "demo FAILED: iptables rules of ours in $ns"; exit 1; }
  echo "  $ns: $(nft_ours $ns) rule(s) of ours in nftables, none in iptables"
done

# What an unprivileged init container can run before the sidecar starts: validate listens on the
# sidecar's outbound port and proves, with a token and SO_ORIGINAL_DST, that a call is redirected
# there. (The demo's pods have no default route, so it dials hello rather than its default target.)
say "tproxy-cni validate in hello-client, as UID 1000 (what an unprivileged init container runs)"
ip netns exec demo-hello-client setpriv --reuid 1000 --regid 1000 --clear-groups \
  "$bin/tproxy-cni" validate --target "$hello_ip:8080" | sed 's/^/  /'

say "starting the pods: app 'hello' on :8080, a sidecar (UID 5995) in each pod"
ip netns exec demo-hello "$pod" app --name hello --port 8080 & pids+=($!)
install -m 644 /dev/null "$work/hello.deny"
for ns in hello hello-client; do
  ip netns exec demo-$ns setpriv --reuid 5995 --regid 5995 --clear-groups \
    "$pod" sidecar --name "$ns-sidecar" --deny-file "$work/hello.deny" >> "$work/$ns-sidecar.log" & pids+=($!)
done
listening() { ip netns exec "demo-$1" ss -Hltn "sport = :$2" | grep -q .; }
for _ in $(seq 50); do
  listening hello 8080 && listening hello 20000 && listening hello-client 15001 && break
  sleep 0.1
done

# call EXPECTED: hello-client dials hello; the answer must contain EXPECTED.
call() {
  : > "$work/hello-sidecar.log"; : > "$work/hello-client-sidecar.log"
  echo "hello-client\$ call $hello_ip:8080"
  answer=$(ip netns exec demo-hello-client "$pod" call "$hello_ip:8080" || true)
  echo "  answer: $answer"
  sleep 0.2
  cat "$work/hello-client-sidecar.log" "$work/hello-sidecar.log" | sed 's/^/  /'
  case "$answer" in *"$1"*) ;; *) echo "demo FAILED: expected an answer containing '$1'"; exit 1 ;; esac
}
say "hello-client calls hello: the request crosses both sidecars"
call "hello from hello"

say "an intention denies hello-client ($client_ip) at hello's sidecar"
echo "$client_ip" > "$work/hello.deny"
call "denied by hello-sidecar"

say "the intention is lifted"
: > "$work/hello.deny"
call "hello from hello"

say "runtime: CHECK and DEL"
for ns in hello hello-client; do
  CNI_PATH=/usr/lib/cni:$bin CNIDRV_CACHE=$work/cache "$cnidrv" check "$work/demo.conflist" /run/netns/demo-$ns "demo-$ns" \
    "$(args $ns)" "{\"io.kubernetes.cri.pod-annotations\": $(tr -d '\n' < "$work/annotations.json")}" && echo "  CHECK $ns: rules as expected"
  CNI_PATH=/usr/lib/cni:$bin CNIDRV_CACHE=$work/cache "$cnidrv" del "$work/demo.conflist" /run/netns/demo-$ns "demo-$ns" "$(args $ns)"
done
for ns in hello hello-client; do
  left=$(( $(nft_ours $ns) + $(iptables_ours $ns) ))
  echo "  DEL done: $left rule(s) of ours left in $ns"
  [ "$left" = 0 ] || { echo "demo FAILED: DEL left rules of ours in $ns"; exit 1; }
  if ip netns exec demo-$ns nft list table ip tproxy-cni >/dev/null 2>&1; then
    echo "demo FAILED: DEL left our table in $ns"; exit 1
  fi
done

say "the plugin's log"
sed 's/^/  /' "$work/tproxy-cni.log"
say "demo finished: everything it created is being removed"
