#!/usr/bin/env bash
# Benchmarks tproxy-cni's ADD side by side with the peers' strategies and prints a table
# (benches/cni_add.rs). A few minutes; needs root. BENCH_RUNS=N changes the runs per strategy.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "hack/bench.sh needs root"; exit 1; }
bash hack/deps.sh
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, kernel $(uname -r), $(iptables --version)"
cargo bench --bench cni_add
