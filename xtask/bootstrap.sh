#!/usr/bin/env bash
# Installs everything the project needs on a fresh machine of its kind
# (Debian 12, root): Rust toolchains, bpf-linker, Debian packages, scapy,
# boringtun-cli (the independent WireGuard peer of the interop test and bench),
# Kubernetes server binaries and kubectl (the control-plane tests).
# Idempotent: each step is skipped when what it installs already answers.
set -euo pipefail

USERSPACE_TOOLCHAIN=1.99.0
EBPF_TOOLCHAIN=nightly-2026-06-25
BPF_LINKER_VERSION=0.13.0
BORINGTUN_CLI_VERSION=0.7.1
DEBIAN_PACKAGES=(llvm-22-dev libpolly-22-dev iproute2 iperf3 tshark iputils-ping
  bpftool nftables ethtool procps prometheus wireguard-tools iputils-tracepath
  etcd-server containerd runc containernetworking-plugins iptables conntrack
  busybox-static jq gcc libc6-dev)

log() { echo "bootstrap: $*" >&2; }

have_toolchain() { rustup toolchain list | grep -q "^$1"; }

if ! have_toolchain "$USERSPACE_TOOLCHAIN"; then
  log "installing Rust $USERSPACE_TOOLCHAIN"
  rustup toolchain install "$USERSPACE_TOOLCHAIN" --profile minimal --component clippy,rustfmt
fi
# (This nightly ships no clippy; rustfmt checks the eBPF crate's format.)
ebpf_components=$(rustup component list --toolchain "$EBPF_TOOLCHAIN" --installed 2>/dev/null || true)
if ! grep -q rust-src <<<"$ebpf_components" || ! grep -q rustfmt <<<"$ebpf_components"; then
  log "installing Rust $EBPF_TOOLCHAIN with rust-src and rustfmt (for the eBPF target)"
  rustup toolchain install "$EBPF_TOOLCHAIN" --profile minimal --component rust-src,rustfmt
fi

missing=()
for p in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! bpf-linker --version >/dev/null 2>&1; then
  log "building bpf-linker $BPF_LINKER_VERSION against LLVM 22 (about 4 minutes)"
  PATH=/usr/lib/llvm-22/bin:$PATH cargo +"$USERSPACE_TOOLCHAIN" install --locked \
    "bpf-linker@$BPF_LINKER_VERSION" --no-default-features --features llvm-22
fi

if [ "$(boringtun-cli --version 2>/dev/null)" != "boringtun $BORINGTUN_CLI_VERSION" ]; then
  log "building boringtun-cli $BORINGTUN_CLI_VERSION (about 2 minutes)"
  cargo +"$USERSPACE_TOOLCHAIN" install --locked "boringtun-cli@$BORINGTUN_CLI_VERSION"
fi

if ! python3 -c 'import scapy' 2>/dev/null; then
  log "installing scapy (independent packet library for tests)"
  python3 -m pip install --quiet --disable-pip-version-check scapy
fi

# Genuine Kubernetes v1.20.2 server binaries for the control-plane tests,
# built offline from Debian's source package into a cache outside the clone
# (the script returns at once when they are there).
KUBE_BIN_DIR=${LIGO_KUBE_BIN:-$HOME/.cache/ligo-kube}
if [ ! -x "$KUBE_BIN_DIR/kube-apiserver" ] || [ ! -x "$KUBE_BIN_DIR/kubelet" ]; then
  log "building Kubernetes v1.20.2 from Debian's source into $KUBE_BIN_DIR (about 7 minutes, once)"
  bash "$(dirname "$0")/kube/build-kube.sh" "$KUBE_BIN_DIR" >/dev/null
fi
# The install test's images (busybox, pause), made offline once.
if [ ! -s "$KUBE_BIN_DIR/images/busybox.tar" ] || [ ! -s "$KUBE_BIN_DIR/images/pause.tar" ]; then
  log "making the test images (busybox, pause) into $KUBE_BIN_DIR/images"
  bash "$(dirname "$0")/kube/make-test-images.sh" "$KUBE_BIN_DIR/images" "$KUBE_BIN_DIR" >/dev/null
fi
if ! command -v kubectl >/dev/null; then
  log "installing kubectl (Debian's kubernetes-client)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends kubernetes-client >/dev/null
fi
