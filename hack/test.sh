#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs the Debian packages it needs, checks formatting and
# lints (the fuzz crate's too) and every dependency's licence, bans and source (cargo deny), runs
# the demo, a short run of every fuzz target, then every unit and integration test (real
# namespaces, real iptables, real traffic, the real CNI chain through libcni).
#
# Usage: sudo hack/test.sh [extra cargo test arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "hack/test.sh needs root: the tests create network namespaces and iptables rules"; exit 1; }

bash hack/deps.sh
echo "== cargo fmt --check"
cargo fmt --all -- --check
(cd fuzz && cargo fmt -- --check)
echo "== cargo clippy"
cargo clippy -q --all-targets -- -D warnings
(cd fuzz && cargo clippy -q --all-targets -- -D warnings)
echo "== cargo clippy, the static musl build the image ships (installer/Dockerfile)"
cargo clippy -q --target "$(uname -m)-unknown-linux-musl" -- -D warnings
echo "== cargo deny check licenses bans sources (deny.toml; docs/dependencies.md#licences)"
cargo deny check licenses bans sources
cargo deny --manifest-path fuzz/Cargo.toml --config deny.toml check licenses bans sources
echo "== demo (hack/demo.sh)"
if ! bash hack/demo.sh > target/demo.log 2>&1; then
  cat target/demo.log
  echo "hack/demo.sh failed"
  exit 1
fi
tail -n 3 target/demo.log
echo "== fuzz: every target for ${FUZZ_SECONDS:=4} s (hack/fuzz.sh; docs/reliability.md for the long runs)"
bash hack/fuzz.sh -t "$FUZZ_SECONDS"
echo "== cargo test"
cargo test "$@" 2>&1 | tee target/test.log
