#!/usr/bin/env bash
# A real Kubernetes node (kubelet v1.20.2 + containerd + kube-proxy) in an
# existing network namespace of the testbed (adapted from the node script
# checked in ../shared/kube; here the testbed owns the network: no bridge,
# no route in the root namespace).
#   node.sh start NAME NETNS DIR   starts it; returns once the Node is Ready
#   node.sh stop  NAME NETNS DIR   kills every process of the node (by its
#                                  cgroups) and removes the cgroups; the
#                                  namespace stays (the testbed removes it)
# The node's processes run in NETNS, in a private mount namespace with its
# own bpffs on /sys/fs/bpf (so each node's pins are its own, as on a real
# machine) and /var/lib/kubelet, /var/log/pods bind-mounted from DIR, in
# cgroups /ligo-NETNS (v1 hierarchies).
# Env: KUBECONFIG (its server reachable from NETNS), ADMIN_KUBECONFIG (one
#   this script can use from the root namespace to see the Node), NODE_IP (an address of
#   NETNS), APISERVER_IP (where the `kubernetes` Service leads: the node gets
#   a route for SERVICE_CIDR toward it, so kube-proxy's DNAT applies),
#   APISERVER_NETNS (the API server's namespace: it gets a route to the
#   node's podCIDR, so it can answer pods that reach it through the
#   `kubernetes` Service), KUBE_BIN (default ~/.cache/ligo-kube), IMAGES (docker-archive tarballs to
#   import; default KUBE_BIN/images/*.tar), CLUSTER_CIDR, SERVICE_CIDR.
set -euo pipefail
cmd=${1:?start|stop}; name=${2:?node name}; ns=${3:?netns}; dir=${4:?dir}
mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
KUBE_BIN=${KUBE_BIN:-$HOME/.cache/ligo-kube}
CLUSTER_CIDR=${CLUSTER_CIDR:-10.244.0.0/16}
SERVICE_CIDR=${SERVICE_CIDR:-10.96.0.0/24}
cg=ligo-$ns
hier=(cpu cpuacct cpuset memory pids blkio devices freezer systemd hugetlb net_cls perf_event unified)
cg_dirs() { for h in "${hier[@]}"; do [ -d "/sys/fs/cgroup/$h" ] && echo "/sys/fs/cgroup/$h/$cg"; done; true; }

if [ "$cmd" = stop ]; then
  p=/sys/fs/cgroup/pids/$cg
  for _ in $(seq 100); do
    pids=$(find "$p" -name cgroup.procs -exec cat {} + 2>/dev/null || true)
    [ -n "$pids" ] || break
    kill -9 $pids 2>/dev/null || true
    sleep 0.1
  done
  for d in $(cg_dirs); do
    [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
  exit 0
fi

: "${NODE_IP:?NODE_IP}" "${KUBECONFIG:?KUBECONFIG}" "${APISERVER_IP:?APISERVER_IP}" "${ADMIN_KUBECONFIG:?ADMIN_KUBECONFIG}" "${APISERVER_NETNS:?APISERVER_NETNS}"
ip -n "$ns" route replace "$SERVICE_CIDR" via "$APISERVER_IP"
for d in $(cg_dirs); do mkdir -p "$d/system"; done
for f in cpuset.cpus cpuset.mems; do
  cat "/sys/fs/cgroup/cpuset/$f" > "/sys/fs/cgroup/cpuset/$cg/$f"
  cat "/sys/fs/cgroup/cpuset/$f" > "/sys/fs/cgroup/cpuset/$cg/system/$f"
done

mkdir -p "$dir"/{containerd,cni/net.d,kubelet,log/pods,log/containers}
cat > "$dir/cni/template.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "ligo-test",
  "plugins": [
    { "type": "ptp", "mtu": 1500, "ipMasq": false,
      "ipam": { "type": "host-local", "dataDir": "$dir/cni/ipam",
                "ranges": [[{ "subnet": "{{.PodCIDR}}" }]],
                "routes": [{ "dst": "0.0.0.0/0" }] } }
  ]
}
EOF
cat > "$dir/containerd.toml" <<EOF
version = 2
root = "$dir/containerd/root"
state = "$dir/containerd/state"
[grpc]
  address = "$dir/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$dir/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/pause:kt"
  netns_mounts_under_state_dir = true
  # Lowering oom_score_adj needs CAP_SYS_RESOURCE, which some sandboxes
  # drop (runc then fails "can't get final child's PID from pipe: EOF").
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$dir/cni/net.d"
    conf_template = "$dir/cni/template.conflist"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
    Root = "$dir/containerd/runc"
EOF
cat > "$dir/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
cgroupRoot: /$cg
failSwapOn: false
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
clusterDomain: cluster.local
serializeImagePulls: false
nodeStatusUpdateFrequency: 1s
EOF
cp "$KUBECONFIG" "$dir/kubeconfig"
images=${IMAGES:-$(ls "$KUBE_BIN"/images/*.tar)}

cat > "$dir/run.sh" <<EOF
#!/bin/sh
set -e
for h in ${hier[*]}; do
  [ -d /sys/fs/cgroup/\$h/$cg/system ] && echo \$\$ > /sys/fs/cgroup/\$h/$cg/system/cgroup.procs
done
mkdir -p /var/lib/kubelet /var/log/pods /var/log/containers
mount --bind $dir/kubelet /var/lib/kubelet
mount --bind $dir/log/pods /var/log/pods
mount --bind $dir/log/containers /var/log/containers
# The node's own /run/ligo-fabric (hostPath of Ligo's pods): every node of
# the machine would share the host's otherwise.
mkdir -p $dir/run-ligo-fabric /run/ligo-fabric
mount --bind $dir/run-ligo-fabric /run/ligo-fabric
# This node's own bpffs: pins outlive the fabric pod, not the node.
mount -t bpf bpf /sys/fs/bpf
# HostToContainer propagation needs a shared (or slave) source mount.
mount --make-shared /sys/fs/bpf
containerd --config $dir/containerd.toml >$dir/containerd.log 2>&1 &
i=0; until ctr -a $dir/containerd.sock version >/dev/null 2>&1; do
  i=\$((i+1)); [ \$i -lt 300 ] || { echo containerd not up >&2; exit 1; }; sleep 0.1; done
for img in $images; do
  ctr -a $dir/containerd.sock -n k8s.io images import \$img >/dev/null
done
$KUBE_BIN/kubelet --config $dir/kubelet.yaml --kubeconfig $dir/kubeconfig \\
  --container-runtime remote --container-runtime-endpoint unix://$dir/containerd.sock \\
  --hostname-override $name --node-ip $NODE_IP --v 2 >$dir/kubelet.log 2>&1 &
$KUBE_BIN/kube-proxy --kubeconfig $dir/kubeconfig --proxy-mode iptables \\
  --hostname-override $name --bind-address $NODE_IP --cluster-cidr $CLUSTER_CIDR \\
  --conntrack-max-per-core 0 --conntrack-tcp-timeout-established 0 \\
  --conntrack-tcp-timeout-close-wait 0 \\
  --metrics-bind-address 127.0.0.1:10249 --healthz-bind-address 127.0.0.1:10256 \\
  >$dir/kube-proxy.log 2>&1 &
wait
EOF
chmod +x "$dir/run.sh"
nsenter --net="/run/netns/$ns" unshare --mount --propagation private "$dir/run.sh" \
  >"$dir/run.log" 2>&1 </dev/null &
echo $! > "$dir/run.pid"
for _ in $(seq 1200); do
  if kubectl --kubeconfig "$ADMIN_KUBECONFIG" get node "$name" \
       -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -q True; then
    cidr=$(kubectl --kubeconfig "$ADMIN_KUBECONFIG" get node "$name" -o jsonpath='{.spec.podCIDR}')
    ip -n "$APISERVER_NETNS" route replace "$cidr" via "$NODE_IP"
    exit 0
  fi
  kill -0 "$(cat "$dir/run.pid")" 2>/dev/null || { echo "node $name: run.sh died" >&2; tail -5 "$dir"/*.log >&2; exit 1; }
  sleep 0.1
done
echo "node $name not Ready after 120 s; see $dir/*.log" >&2; exit 1
