//! Real clusters in the testbed: per cluster a real control plane and two
//! real nodes (kubelet + containerd + kube-proxy in the gateway's and a
//! node's namespaces), Ligo installed with `kubectl apply -k manifests/`
//! and running as real pods from the image `xtask/kube/make-image.sh`
//! builds offline; and the big node's walk-through on them. The install
//! test (`tests/kube_install.rs`) asserts on these steps; `./x demo`
//! prints them.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context, Result};

use crate::{
    kube::{ControlPlane, ControlPlaneOptions},
    kube_nodes::{Joining, RealNode},
    kube_testbed::apply_cluster_fabric,
    testbed::{Cidr, ClusterPlan, Testbed},
    workspace_root,
};

/// The API server's host octet on each cluster's underlay.
const APISERVER_HOST: u8 = 240;
/// How long pods may take to become ready (image import, sandbox, probes).
pub const POD_WAIT: Duration = Duration::from_secs(120);

pub struct Cluster {
    pub cp: ControlPlane,
    pub nodes: Vec<RealNode>,
}

/// What the big node's walk-through saw.
#[derive(Debug)]
pub struct BigNode {
    /// The pod of A's Deployment `far` bound to the virtual node.
    pub far_pod: String,
    /// Its address as A reports it (B's, translated into A's view).
    pub far_ip: Ipv4Addr,
    /// The address of its copy in B.
    pub copy_ip: Ipv4Addr,
    /// ping's summary line from A's client to `far_ip`.
    pub far_ping: String,
    /// A's Service `far` (ClusterIP) and what A's client got through it.
    pub far_service: String,
    pub far_answer: String,
    /// A's Service `near` reflected into B, and what far's copy got
    /// through it.
    pub near_service: String,
    pub near_answer: String,
}

/// Installs cluster `plan` and pushes it onto `clusters` as soon as its
/// control plane runs (so a failure's message can show its logs).
pub fn install(
    clusters: &mut Vec<Cluster>,
    bed: &Testbed,
    plan: &ClusterPlan,
    prefix: &str,
    index: u8,
    image: &std::path::Path,
) -> Result<()> {
    let apiserver = plan.underlay_ip(APISERVER_HOST);
    // Where the other cluster's controller (a pod) reaches this API server:
    // the public network the gateways are on.
    let public = Ipv4Addr::from(u32::from(plan.public_ip) + u32::from(APISERVER_HOST));
    let cp = ControlPlane::start(
        &format!("{prefix}-{}", plan.name),
        &ControlPlaneOptions {
            controllers: true,
            real_nodes: true,
            cluster_cidr: plan.pod_cidr.to_string(),
            extra_addresses: vec![apiserver, public],
            ..ControlPlaneOptions::new(index)
        },
    )?;
    let kubeconfig = cp.attach(&bed.ns(plan, "ul"), apiserver)?;
    cp.attach_to(
        &bed.lab.ns("inet"),
        &format!("kube-{}", plan.name),
        "pub0",
        public,
    )?;
    egress(bed, plan)?;
    let admin = cp.kubeconfig.clone();
    let cp_netns = cp.netns.clone();
    clusters.push(Cluster {
        cp,
        nodes: Vec::new(),
    });
    let cluster = clusters.last_mut().context("the cluster just pushed")?;
    for (name, octet) in [("gw", 1), ("n1", 11)] {
        let node = RealNode::start(
            name,
            &bed.ns(plan, name),
            bed.lab.file(&format!("{}-{name}-node", plan.name)),
            &Joining {
                kubeconfig: &kubeconfig,
                admin_kubeconfig: &admin,
                node_ip: plan.underlay_ip(octet),
                apiserver_ip: apiserver,
                apiserver_netns: &cp_netns,
                cluster_cidr: plan.pod_cidr.to_string(),
                images: &[image.to_path_buf()],
            },
        )
        .with_context(|| format!("node {name} of {}", plan.name))?;
        cluster.nodes.push(node);
    }
    let cp = &cluster.cp;
    pod_routes(cp, bed, plan)?;
    cp.kubectl(&["label", "node", "gw", "ligo.io/gateway="])?;
    cp.kubectl(&[
        "annotate",
        "node",
        "gw",
        &format!("ligo.io/public-ip={}", plan.public_ip),
    ])?;
    // Our settings first (the CRDs, then ClusterFabric/local), so the
    // controller never fills in defaults of its own.
    let manifests = workspace_root().join("manifests");
    cp.kubectl(&["apply", "-k", &manifests.join("crds").to_string_lossy()])?;
    cp.wait_crds_established()?;
    apply_cluster_fabric(cp, plan)?;
    // Peers' controllers reach us on the public network.
    cp.kubectl(&[
        "patch",
        "clusterfabric",
        "local",
        "--type=merge",
        "-p",
        &format!("{{\"spec\":{{\"apiServerURL\":\"https://{public}:6443\"}}}}"),
    ])?;
    cp.kubectl(&["apply", "-k", &manifests.to_string_lossy()])?;
    let timeout = format!("--timeout={}s", POD_WAIT.as_secs());
    for workload in [
        "deployment/ligo-control",
        "daemonset/ligo-fabric",
        "daemonset/ligo-tunnel",
    ] {
        cp.kubectl(&["rollout", "status", "-n", "ligo-system", workload, &timeout])?;
    }
    cp.wait_condition("clusterfabric", "local", "Ready", "True")?;
    cp.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: default}\nspec:\n  nodeName: n1\n  terminationGracePeriodSeconds: 0\n  containers:\n  - {name: sh, image: localhost/busybox:kt, imagePullPolicy: Never, command: [sleep, '3600']}\n",
    )?;
    cp.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "pod/client",
        "-n",
        "default",
        &timeout,
    ])?;
    Ok(())
}

/// The cluster's way out, as a real cluster has one: pods' traffic to the
/// public network leaves through the gateway, masqueraded (the controller
/// pod reaches the other cluster's API server so). Fabric traffic is not
/// touched: the gateway's programs redirect it before netfilter, and the
/// tunnel sends from the gateway's own address.
fn egress(bed: &Testbed, plan: &ClusterPlan) -> Result<()> {
    let gw = bed.ns(plan, "gw");
    crate::netns::sysctl(&gw, "net.ipv4.ip_forward", "1")?;
    crate::netns::exec(
        &gw,
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            &plan.pod_cidr.to_string(),
            "-o",
            "eth1",
            "-j",
            "MASQUERADE",
        ],
    )?;
    let public = Cidr(plan.public_ip, 24);
    crate::netns::ip(&[
        "-n",
        &bed.ns(plan, "n1"),
        "route",
        "add",
        &format!("{}/24", Ipv4Addr::from(u32::from(public.0) & 0xffff_ff00)),
        "via",
        &plan.underlay_ip(1).to_string(),
    ])?;
    Ok(())
}

/// Routes between the nodes' pod CIDRs, as the cluster's CNI would make
/// them (ptp makes none).
fn pod_routes(cp: &ControlPlane, bed: &Testbed, plan: &ClusterPlan) -> Result<()> {
    let nodes = [("gw", plan.underlay_ip(1)), ("n1", plan.underlay_ip(11))];
    for (name, ip) in nodes {
        let cidr = cp.jsonpath("node", name, "{.spec.podCIDR}")?;
        for (other, _) in nodes.iter().filter(|(o, _)| *o != name) {
            crate::netns::ip(&[
                "-n",
                &bed.ns(plan, other),
                "route",
                "replace",
                &cidr,
                "via",
                &ip.to_string(),
            ])?;
        }
    }
    Ok(())
}

pub fn logs(clusters: &[Cluster]) -> String {
    let mut all = String::new();
    for c in clusters {
        all.push_str(&c.cp.logs());
        for n in &c.nodes {
            all.push_str(&n.logs());
        }
        for what in ["pods", "events"] {
            all.push_str(
                &c.cp
                    .kubectl(&["get", what, "-A", "-o", "wide"])
                    .unwrap_or_default(),
            );
        }
        for ds in [
            "daemonset/ligo-fabric",
            "daemonset/ligo-tunnel",
            "deployment/ligo-control",
        ] {
            all.push_str(
                &c.cp
                    .kubectl(&["logs", "-n", "ligo-system", ds, "--tail=20"])
                    .unwrap_or_default(),
            );
        }
    }
    all
}

pub fn client_ip(cp: &ControlPlane) -> Result<Ipv4Addr> {
    cp.jsonpath("pod", "client", "{.status.podIP}")?
        .parse()
        .context("the client pod's IP")
}

pub fn ping(cp: &ControlPlane, to: Ipv4Addr) -> Result<String> {
    cp.kubectl(&[
        "exec",
        "-n",
        "default",
        "client",
        "--",
        "ping",
        "-c",
        "3",
        "-W",
        "2",
        &to.to_string(),
    ])
}

/// A web server in A's namespace `demo`: `greeting` at / on port 8080.
pub fn web(name: &str, greeting: &str, placement: &str) -> String {
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      {placement}
      terminationGracePeriodSeconds: 0
      containers:
      - name: web
        image: localhost/busybox:kt
        imagePullPolicy: Never
        command: [sh, -c, 'mkdir -p /www && echo {greeting} > /www/index.html && exec httpd -f -p 8080 -h /www']
---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: demo}}
spec:
  selector: {{app: {name}}}
  ports: [{{port: 80, targetPort: 8080}}]
"
    )
}

/// An HTTP GET of / from `ip`:`port` in pod `pod` of namespace `ns`, with
/// busybox nc (the static busybox's wget crashes resolving the service
/// name "http" through glibc's NSS).
pub fn fetch(cp: &ControlPlane, ns: &str, pod: &str, ip: &str, port: u16) -> Result<String> {
    let script = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {ip} {port}");
    cp.kubectl(&["exec", "-n", ns, pod, "--", "sh", "-c", &script])
}

/// The address of pod `name` of namespace `demo` in `cp`.
fn demo_pod_ip(cp: &ControlPlane, name: &str) -> Result<Ipv4Addr> {
    let ip = cp.kubectl(&[
        "get",
        "pod",
        "-n",
        "demo",
        name,
        "-o",
        "jsonpath={.status.podIP}",
    ])?;
    ip.parse()
        .with_context(|| format!("pod {name}'s address {ip:?}"))
}

/// With A's namespace `demo` offloaded: A's Deployment `far` runs in B through the virtual node and answers
/// A's client at its Service's ClusterIP (A's kube-proxy to the address
/// in A's view, the fabric to B); B's copy reaches A's `near` through
/// its reflection in B (B's kube-proxy to B's view of A).
pub fn big_node(a: &ControlPlane, b: &ControlPlane, a_pods: Cidr, b_pods: Cidr) -> Result<BigNode> {
    // B's workloads go to its node; its gateway is left to the tunnel
    // (pods on a gateway node across a peering are not tried here).
    b.kubectl(&["taint", "node", "gw", "ligo.io/gateway=:NoSchedule"])?;
    let toleration = "tolerations: [{key: virtual-node.ligo.io/not-allowed, operator: Exists, effect: NoSchedule}]\n      nodeSelector: {type: virtual-kubelet}";
    a.apply(&web("far", "hello-from-b", toleration))?;
    a.apply(&web(
        "near",
        "hello-from-a",
        "nodeSelector: {kubernetes.io/hostname: n1}",
    ))?;
    let timeout = format!("--timeout={}s", POD_WAIT.as_secs());
    for d in ["deployment/far", "deployment/near"] {
        a.kubectl(&["rollout", "status", "-n", "demo", d, &timeout])?;
    }
    let far_pod = a.kubectl(&[
        "get",
        "pods",
        "-n",
        "demo",
        "-l",
        "app=far",
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ])?;
    let node = a.kubectl(&[
        "get",
        "pod",
        "-n",
        "demo",
        &far_pod,
        "-o",
        "jsonpath={.spec.nodeName}",
    ])?;
    anyhow::ensure!(
        node == "ligo-b",
        "far runs on {node:?}, not the virtual node"
    );
    // The copy runs on B's real kubelet; A's client reaches it at the
    // address A's status gives it (B's, translated into A's view).
    let far_ip = demo_pod_ip(a, &far_pod).context("far's address in A")?;
    let view = Cidr::parse(&a.jsonpath("peer", "b", "{.spec.view}")?);
    let copy_ip = demo_pod_ip(b, &far_pod).context("the copy's address in B")?;
    anyhow::ensure!(
        b_pods.translate(copy_ip, view) == far_ip,
        "A sees far at {far_ip}, B runs it at {copy_ip} (view {view:?})"
    );
    let out = ping(a, far_ip).context("A's client pings the offloaded pod")?;
    let far_ping = out
        .lines()
        .find(|l| l.contains("packets"))
        .unwrap_or_default()
        .to_owned();

    // B holds A's Service near, its endpoints in B's view of A.
    let near_ip: Ipv4Addr = a
        .kubectl(&[
            "get",
            "pods",
            "-n",
            "demo",
            "-l",
            "app=near",
            "-o",
            "jsonpath={.items[0].status.podIP}",
        ])?
        .parse()
        .context("near's address")?;
    let a_in_b = Cidr::parse(&b.jsonpath("peer", "a", "{.spec.view}")?);
    let expected = a_pods.translate(near_ip, a_in_b).to_string();
    b.wait_for(
        "near reflected into B with its endpoints in B's view of A",
        POD_WAIT,
        || {
            let ips = b.kubectl(&[
                "get",
                "endpoints",
                "-n",
                "demo",
                "near",
                "--ignore-not-found",
                "-o",
                "jsonpath={.subsets[*].addresses[*].ip}",
            ])?;
            Ok((ips.trim() == expected).then_some(()))
        },
    )?;
    // Through the Services' ClusterIPs, by kube-proxy: A's client to far
    // (in B), far's copy to near (in A) through near's reflection in B.
    let far_service = a.kubectl(&[
        "get",
        "service",
        "-n",
        "demo",
        "far",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ])?;
    let far_answer = a.wait_for(
        "A's client fetches far through its Service",
        POD_WAIT,
        || {
            Ok(fetch(a, "default", "client", &far_service, 80)
                .ok()
                .filter(|a| a.contains("hello-from-b")))
        },
    )?;
    let near_service = b.kubectl(&[
        "get",
        "service",
        "-n",
        "demo",
        "near",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ])?;
    let near_answer = b.wait_for(
        "far's copy fetches near through its reflection in B",
        POD_WAIT,
        || {
            Ok(fetch(b, "demo", &far_pod, &near_service, 80)
                .ok()
                .filter(|a| a.contains("hello-from-a")))
        },
    )?;
    let last_line = |s: String| s.lines().last().unwrap_or_default().to_owned();
    Ok(BigNode {
        far_pod,
        far_ip,
        copy_ip,
        far_ping,
        far_service,
        far_answer: last_line(far_answer),
        near_service,
        near_answer: last_line(near_answer),
    })
}
