#!/usr/bin/env bash
# Builds the image the manifests name, offline, from the project's binaries:
#   OUTDIR/ligo.tar -> localhost/ligo:0.1.0 (docker-archive; import with
#   `ctr -n k8s.io images import`, or `docker load`, then `imagePullPolicy:
#   IfNotPresent` finds it)
# holding /usr/local/bin/ligo-fabric and /usr/local/bin/ligo-control with
# the shared libraries they link (from this machine, as ldd lists them).
# Usage: make-image.sh OUTDIR [BINDIR]   (BINDIR default target/release)
# No registry, no network, reproducible (sorted, mtime 0). Prints the tarball.
set -euo pipefail
out=${1:?outdir}; bindir=${2:-target/release}; ref=${LIGO_IMAGE:-localhost/ligo:0.1.0}
command -v jq >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends jq >/dev/null; }
mkdir -p "$out"
w=$(mktemp -d); trap 'rm -rf "$w"' EXIT
root=$w/root; mkdir -p "$root/usr/local/bin" "$root/tmp" "$root/etc"
chmod 1777 "$root/tmp"
for b in ligo-fabric ligo-control; do
  [ -x "$bindir/$b" ] || { echo "missing $bindir/$b (cargo build --release -p ligo-fabric -p ligo-control)" >&2; exit 1; }
  install -m 0755 "$bindir/$b" "$root/usr/local/bin/$b"
  # The loader and every library, at the paths the binary asks for.
  for lib in $(ldd "$bindir/$b" | grep -o '/[^ ]*'); do
    mkdir -p "$root$(dirname "$lib")"; cp -L "$lib" "$root$lib"
  done
done
echo 'root:x:0:0:root:/root:/sbin/nologin' > "$root/etc/passwd"
echo 'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' >> "$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"

d=$w/img; mkdir -p "$d"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$root" -cf "$d/layer.tar" .
diff=$(sha256sum "$d/layer.tar" | cut -d' ' -f1)
mkdir -p "$d/$diff"; mv "$d/layer.tar" "$d/$diff/layer.tar"
jq -n --arg diff "sha256:$diff" \
  '{architecture:"amd64", os:"linux", created:"1970-01-01T00:00:00Z",
    config:{Env:["PATH=/usr/local/bin:/usr/bin:/bin"], Entrypoint:["/usr/local/bin/ligo-fabric"]},
    rootfs:{type:"layers", diff_ids:[$diff]},
    history:[{created:"1970-01-01T00:00:00Z", created_by:"xtask/kube/make-image.sh"}]}' > "$d/config.json"
cid=$(sha256sum "$d/config.json" | cut -d' ' -f1)
mv "$d/config.json" "$d/$cid.json"
jq -n --arg cfg "$cid.json" --arg ref "$ref" --arg l "$diff/layer.tar" \
  '[{Config:$cfg, RepoTags:[$ref], Layers:[$l]}]' > "$d/manifest.json"
( cd "$d" && tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
    -cf "$out/ligo.tar" manifest.json "$cid.json" "$diff" )
echo "$out/ligo.tar"
