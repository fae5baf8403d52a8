#!/usr/bin/env bash
# Installs the Debian packages tproxy-cni's demo and tests need, if any is missing. Needs root.
#   iptables, nftables          both iptables backends, and nft for one failure test
#   iproute2, util-linux        ip netns / links; unshare, setpriv
#   containernetworking-plugins bridge + host-local, the primary CNI of every test chain
#   golang-go, golang-github-appc-cni-dev   to build cnidrv, the libcni driver in ../shared/tools
#   systemd                     systemd-analyze, to load the host units in installer/host/
#   g++                         libFuzzer (built by the fuzz crate's libfuzzer-sys)
#   podman, runc, busybox-static            the container runtime of tests/it/podman.rs (its CNI backend,
#                                           runc; the busybox rootfs its image is imported from)
#   containerd                  containerd 1.6 and its CRI plugin (and ctr), the runtime of tests/it/cri.rs;
#                               the test starts a private instance itself (a system one is never used)
#   libc6-dev                   libc.a, for the static pause program tests/it/cri.rs builds (gcc comes with g++)
#   protobuf-compiler           protoc, for the k8s-cri dev-dependency's build script (tests/it/cri.rs's CRI client)
#   musl-tools                  musl-gcc, for ring's C code in the <arch>-unknown-linux-musl build the image ships
#                               (hack/test.sh lints that build, hack/bench.sh measures it)
# and rustup's <arch>-unknown-linux-musl target (its standard library), and cargo-deny (the licence, ban and source checks of hack/test.sh), compiled from crates.io once
# into ~/.cargo/bin (no prebuilt binary is reachable; keep ~/.cargo/bin between CI runs and this is
# skipped). It has no optional features to leave out; its release profile's fat LTO with one
# codegen unit is switched off instead: the same 4.5 min of CPU on 2 shared cores, but half the
# wall time (20 min instead of 38 under a load of 13-15; a few minutes on an idle machine), for a
# tool whose check takes a second either way.
set -euo pipefail
pkgs=(iptables nftables iproute2 util-linux containernetworking-plugins golang-go golang-github-appc-cni-dev systemd g++
  podman runc busybox-static containerd libc6-dev protobuf-compiler musl-tools)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "== installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
musl="$(uname -m)-unknown-linux-musl"
if ! rustup target list --installed | grep -qx "$musl"; then
  echo "== adding the $musl target (rustup)"
  rustup target add "$musl" >/dev/null
fi
deny_version=0.20.2
if [ "$(cargo deny --version 2>/dev/null)" != "cargo-deny $deny_version" ]; then
  echo "== installing cargo-deny $deny_version (compiled from crates.io, once)"
  CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
    cargo install --locked --quiet --version "$deny_version" cargo-deny
fi
