#!/usr/bin/env bash
# The test images, made offline, as docker-archive tarballs that
# `ctr -n k8s.io images import` (containerd 1.6) accepts:
#   OUTDIR/busybox.tar  -> localhost/busybox:kt   (Debian busybox-static, all applets
#                                                 as symlinks; Cmd ["sh"])
#   OUTDIR/pause.tar    -> localhost/pause:kt     (the sandbox "pause" image: the real
#                                                 build/pause/linux/pause.c compiled
#                                                 statically; build-kube.sh leaves it
#                                                 in KUBE_BIN/pause.c)
# Usage: make-test-images.sh OUTDIR [KUBE_BIN]   (KUBE_BIN default ~/.cache/ligo-kube)
# No registry, no network. Prints OUTDIR.
set -euo pipefail
out=${1:?outdir}; kbin=${2:-$HOME/.cache/ligo-kube}
mkdir -p "$out"
if [ -s "$out/busybox.tar" ] && [ -s "$out/pause.tar" ]; then echo "$out"; exit 0; fi
export DEBIAN_FRONTEND=noninteractive
need=()
[ -x /bin/busybox ] || need+=(busybox-static)
command -v gcc >/dev/null || need+=(gcc)
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev)
command -v jq >/dev/null || need+=(jq)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq; apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# the static busybox: busybox-static installs /bin/busybox (statically linked)
file -L /bin/busybox 2>/dev/null | grep -q 'dynamically' && { echo "/bin/busybox is not static" >&2; exit 1; }
w=$(mktemp -d); trap 'rm -rf "$w"' EXIT

# mkimage NAME REF ROOTFS CONFIG_JSON_FRAGMENT -> $out/NAME.tar (docker-archive)
mkimage() {
  local name=$1 ref=$2 root=$3 cfg=$4 d=$w/img-$1
  mkdir -p "$d"
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$root" -cf "$d/layer.tar" .
  local diff; diff=$(sha256sum "$d/layer.tar" | cut -d' ' -f1)
  mkdir -p "$d/$diff"; mv "$d/layer.tar" "$d/$diff/layer.tar"
  jq -n --argjson c "$cfg" --arg diff "sha256:$diff" \
    '{architecture:"amd64", os:"linux", created:"1970-01-01T00:00:00Z", config:$c,
      rootfs:{type:"layers", diff_ids:[$diff]},
      history:[{created:"1970-01-01T00:00:00Z", created_by:"make-images.sh"}]}' > "$d/config.json"
  local cid; cid=$(sha256sum "$d/config.json" | cut -d' ' -f1)
  mv "$d/config.json" "$d/$cid.json"
  jq -n --arg cfg "$cid.json" --arg ref "$ref" --arg l "$diff/layer.tar" \
    '[{Config:$cfg, RepoTags:[$ref], Layers:[$l]}]' > "$d/manifest.json"
  ( cd "$d" && tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
      -cf "$out/$name.tar" manifest.json "$cid.json" "$diff" )
}

# busybox rootfs
r=$w/busybox; mkdir -p "$r"/{bin,etc,proc,sys,dev,tmp,root,var/run}
chmod 1777 "$r/tmp"
cp /bin/busybox "$r/bin/busybox"
for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$r/bin/$a"; done
echo 'root:x:0:0:root:/root:/bin/sh' > "$r/etc/passwd"
echo 'root:x:0:' > "$r/etc/group"
mkimage busybox localhost/busybox:kt "$r" '{"Env":["PATH=/bin"],"Cmd":["sh"]}'

# pause rootfs
p=$w/pause; mkdir -p "$p"
pc=$kbin/pause.c
[ -f "$pc" ] || { echo "missing $pc (run build-kube.sh first)" >&2; exit 1; }
gcc -Os -static -DVERSION=kt -o "$p/pause" "$pc"
strip "$p/pause"
mkimage pause localhost/pause:kt "$p" '{"Entrypoint":["/pause"]}'
echo "$out"
