#!/usr/bin/env bash
# Builds genuine Kubernetes v1.20.2 server binaries from Debian bookworm's
# `kubernetes` source package (full tree incl. vendor/) with Debian's Go 1.19,
# in ONE `make` so that the shared packages compile once.
#   build-kube.sh OUTDIR [BIN...]   (default BINs: kube-apiserver
#       kube-controller-manager kube-scheduler kube-proxy kubelet)
# Prints OUTDIR. Returns at once when OUTDIR already holds every BIN.
# Same recipe as build-kube-apiserver.sh, plus:
#  * all binaries static (CGO_ENABLED=0; kubelet via KUBE_STATIC_OVERRIDES);
#  * kubelet patch: it normally REWRITES global sysctls at start-up
#    (vm.overcommit_memory=1, kernel.panic=10, kernel.panic_on_oops=1, ...);
#    patched to only log them (the 'warn' behaviour that already exists in
#    the code), so test runs do not change the host kernel's panic policy;
#  * kube-controller-manager patch: with --allocate-node-cidrs its node IPAM
#    start-up does wait.Poll(10s, ...) before its first Node list, and since
#    controllers start one after another, a random half of all controllers
#    (endpoints, GC, namespace, ...) started 10 s late; use wait.PollImmediate
#    (what later upstream releases do);
#  * kubelet patch: its cAdvisor asks Docker for its root dir 5 times, 1 s
#    apart, before giving up (rootDirRetries) -- a fixed 5 s start-up delay
#    on a machine without Docker; 0 retries (flag default /var/lib/docker);
#  * copies build/pause/linux/pause.c to OUTDIR for make-images.sh.
set -euo pipefail
out=${1:?outdir}; shift || true
bins=("$@")
[ ${#bins[@]} -gt 0 ] || bins=(kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubelet)
mkdir -p "$out"; out=$(cd "$out" && pwd)
missing=()
for b in "${bins[@]}"; do [ -x "$out/$b" ] || missing+=("$b"); done
if [ ${#missing[@]} -eq 0 ] && [ -f "$out/pause.c" ]; then echo "$out"; exit 0; fi

export DEBIAN_FRONTEND=noninteractive
if ! grep -rqs '^Types: deb-src' /etc/apt/sources.list.d/ && ! grep -qs '^deb-src' /etc/apt/sources.list; then
  sed -e 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
    > /etc/apt/sources.list.d/debian-src.sources
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends golang-go rsync jq dpkg-dev etcd-server \
  golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev >/dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
( cd "$work" && apt-get source -qq kubernetes >"$work/source.log" 2>&1 ) || { cat "$work/source.log" >&2; exit 1; }
src=$(find "$work" -maxdepth 1 -type d -name 'kubernetes-*' | head -1)
[ -n "$src" ] || { echo "apt-get source kubernetes: no source tree" >&2; exit 1; }
cd "$src"
# vendored reflect2 v1.0.1 / json-iterator v1.1.10 segfault under Go >= 1.18;
# use Debian's reflect2 1.0.2 / json-iterator 1.1.12.
swap() {
  rm -rf "vendor/$1"; mkdir -p "vendor/$1"
  find "$2" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' -o -name go.mod -o -name LICENSE \) \
    ! -name '*_test.go' -exec cp {} "vendor/$1/" \;
}
swap github.com/modern-go/reflect2 /usr/share/gocode/src/github.com/modern-go/reflect2
swap github.com/json-iterator/go /usr/share/gocode/src/github.com/json-iterator/go
# kubelet: do not modify global kernel sysctls (see header).
f=pkg/kubelet/cm/container_manager_linux.go
grep -q 'b := KernelTunableModify' "$f" || { echo "kubelet sysctl patch: pattern not found" >&2; exit 1; }
sed -i 's/b := KernelTunableModify/b := KernelTunableWarn/' "$f"
# kube-controller-manager: first Node list without the 10 s delay (see header).
f=pkg/controller/nodeipam/ipam/cidr_allocator.go
grep -q 'wait.Poll(10\*time.Second, apiserverStartupGracePeriod' "$f" || { echo "nodeipam patch: pattern not found" >&2; exit 1; }
sed -i 's/wait.Poll(10\*time.Second, apiserverStartupGracePeriod/wait.PollImmediate(10*time.Second, apiserverStartupGracePeriod/' "$f"
# kubelet: no 5 s wait for a Docker daemon that is not there (see header).
f=vendor/github.com/google/cadvisor/container/docker/factory.go
grep -q '^const rootDirRetries = 5$' "$f" || { echo "cadvisor patch: pattern not found" >&2; exit 1; }
sed -i 's/^const rootDirRetries = 5$/const rootDirRetries = 0/' "$f"
# the sandbox "pause" program's source, for make-images.sh
cp build/pause/linux/pause.c "$out/pause.c"
[ ${#missing[@]} -gt 0 ] || { echo "$out"; exit 0; }
what=$(printf 'cmd/%s ' "${missing[@]}")
t0=$(date +%s)
CGO_ENABLED=0 KUBE_STATIC_OVERRIDES=kubelet GOFLAGS= GOCACHE="$work/gocache" HOME="$work" \
  make WHAT="$what" >"$work/build.log" 2>&1 || { tail -40 "$work/build.log" >&2; exit 1; }
for b in "${missing[@]}"; do cp "_output/bin/$b" "$out/"; done
echo "built ${missing[*]} in $(( $(date +%s) - t0 )) s" >&2
echo "$out"
