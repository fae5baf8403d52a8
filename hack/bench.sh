#!/usr/bin/env bash
# Benchmarks tproxy-cni's ADD side by side with the peers' strategies and prints a table
# (benches/cni_add.rs). A few minutes; needs root. BENCH_RUNS=N changes the runs per strategy.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "hack/bench.sh needs root"; exit 1; }
bash hack/deps.sh
# GNU time measures the plugin's peak RSS (see peak_rss in benches/cni_add.rs).
if ! dpkg-query -W -f='${Status}' time 2>/dev/null | grep -q 'install ok installed'; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends time >/dev/null
fi
cargo bench --bench cni_add --no-run -q
# Measure the binary the image ships: linked statically against musl (installer/Dockerfile; the
# target and musl-tools come with hack/deps.sh). It starts faster and maps less than the glibc
# build cargo makes for the benchmark itself.
# It is installed (copied, as the installer copies it onto a node) and dropped from the page cache:
# the file the linker just wrote sits in the page cache as large folios, and a mapping maps a whole
# folio, so the freshly built file shows about 1.3 MiB more peak RSS than the same bytes on a node.
musl="$(uname -m)-unknown-linux-musl"
cargo build --release -q --target "$musl"
install -D -m 0755 "target/$musl/release/tproxy-cni" target/bench-plugin/tproxy-cni
dd if=target/bench-plugin/tproxy-cni iflag=nocache count=0 status=none
export BENCH_PLUGIN="$PWD/target/bench-plugin/tproxy-cni"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB," \
  "Debian $(cat /etc/debian_version), kernel $(uname -r), $(iptables --version)"
cargo bench --bench cni_add
