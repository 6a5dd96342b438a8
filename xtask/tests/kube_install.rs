//! The install test: per cluster a real control plane and two real nodes
//! (kubelet + containerd + kube-proxy in the testbed's gateway and node
//! namespaces), `kubectl apply -k manifests/`, Ligo's controller, fabric
//! daemons and tunnel running as real pods from the image
//! `xtask/kube/make-image.sh` builds offline; then `ligo-control peer
//! --offload out --wait`, a busybox pod in A pings a busybox pod in B by
//! its view address and back; the big node: a Deployment of A runs in B
//! through the virtual node and answers A's client through A's Service
//! (kube-proxy's ClusterIP), and the offloaded pod reaches a Service of A
//! through its reflection in B; `unpeer`, traffic stops and nothing of the
//! peering is left.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context, Result};
use xtask::{
    kube::{ControlPlane, ControlPlaneOptions},
    kube_nodes::{ligo_image, Joining, RealNode},
    kube_testbed::{apply_cluster_fabric, KubeTestbed},
    require_root,
    testbed::{Cidr, ClusterPlan, Pod, Scenario, Testbed},
    traffic, workspace_root,
};

const APISERVER_HOST: u8 = 240;
/// How long pods may take to become ready (image import, sandbox, probes).
const POD_WAIT: Duration = Duration::from_secs(120);

struct Cluster {
    cp: ControlPlane,
    nodes: Vec<RealNode>,
}

/// Installs cluster `plan` and pushes it onto `clusters` as soon as its
/// control plane runs (so a failure's message can show its logs).
fn install(
    clusters: &mut Vec<Cluster>,
    bed: &Testbed,
    plan: &ClusterPlan,
    index: u8,
    image: &std::path::Path,
) -> Result<()> {
    let apiserver = plan.underlay_ip(APISERVER_HOST);
    // Where the other cluster's controller (a pod) reaches this API server:
    // the public network the gateways are on.
    let public = Ipv4Addr::from(u32::from(plan.public_ip) + u32::from(APISERVER_HOST));
    let cp = ControlPlane::start(
        &format!("ki-{}", plan.name),
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
    xtask::netns::sysctl(&gw, "net.ipv4.ip_forward", "1")?;
    xtask::netns::exec(
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
    xtask::netns::ip(&[
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
            xtask::netns::ip(&[
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

fn logs(clusters: &[Cluster]) -> String {
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

fn pod_ip(cp: &ControlPlane) -> Result<Ipv4Addr> {
    cp.jsonpath("pod", "client", "{.status.podIP}")?
        .parse()
        .context("the client pod's IP")
}

fn ping(cp: &ControlPlane, to: Ipv4Addr) -> Result<String> {
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

#[test]
fn ligo_installs_from_the_manifests_on_real_nodes_and_peers() {
    if !require_root("ligo_installs_from_the_manifests_on_real_nodes_and_peers") {
        return;
    }
    let mut scenario = Scenario::identical_cidrs();
    scenario.public_bridge = true;
    let bed = Testbed::up("ki", scenario).expect("testbed");
    let image = ligo_image(&bed.lab.file("images")).unwrap_or_else(|e| panic!("{e:#}"));
    let mut clusters = Vec::new();
    for (i, plan) in [&bed.scenario.a, &bed.scenario.b].into_iter().enumerate() {
        if let Err(e) = install(&mut clusters, &bed, plan, 215 + i as u8, &image) {
            panic!("{e:#}\n{}", logs(&clusters));
        }
    }
    let (a, b) = (&clusters[0].cp, &clusters[1].cp);
    let peer = KubeTestbed::ligo_control(&[
        "peer",
        "--kubeconfig",
        &a.kubeconfig.to_string_lossy(),
        "--remote-kubeconfig",
        &b.kubeconfig.to_string_lossy(),
        "--offload",
        "out",
        "--wait",
        "--timeout",
        "90s",
    ]);
    match peer {
        Ok((true, out)) => println!("{out}"),
        Ok((false, out)) => panic!("peer failed:\n{out}\n{}", logs(&clusters)),
        Err(e) => panic!("{e:#}"),
    }
    let pods = Cidr::parse("10.244.0.0/16");
    let view = |cp: &ControlPlane, peer: &str| {
        Cidr::parse(
            &cp.jsonpath("peer", peer, "{.spec.view}")
                .unwrap_or_default(),
        )
    };
    let (ip_a, ip_b) = (pod_ip(a).expect("pod a"), pod_ip(b).expect("pod b"));
    let b_from_a = pods.translate(ip_b, view(a, "b"));
    let a_from_b = pods.translate(ip_a, view(b, "a"));
    for (cp, to, what) in [(a, b_from_a, "A -> B"), (b, a_from_b, "B -> A")] {
        match ping(cp, to) {
            Ok(out) => println!(
                "{what}: {}",
                out.lines().find(|l| l.contains("packets")).unwrap_or("")
            ),
            Err(e) => panic!("{what} ({to}): {e:#}\n{}", logs(&clusters)),
        }
    }

    if let Err(e) = big_node(a, b) {
        panic!("the big node: {e:#}\n{}", logs(&clusters));
    }

    // What a tunnel upgrade costs where DaemonSets cannot surge (1.20,
    // 1.21): the old tunnel pod stops before the new one starts. A 10,000
    // packets/s stream from A's pod to B's while A's tunnel DaemonSet rolls.
    let a_pod = Pod {
        netns: "ki-a-client".into(),
        ip: ip_a,
        cluster: 0,
    };
    let b_pod = Pod {
        netns: "ki-b-client".into(),
        ip: ip_b,
        cluster: 1,
    };
    for (cluster, pod) in clusters.iter().zip([&a_pod, &b_pod]) {
        let container = cluster
            .cp
            .jsonpath(
                "pod",
                "client",
                "{.status.containerStatuses[0].containerID}",
            )
            .expect("the client's container");
        let pid = cluster.nodes[1].container_pid(&container).expect("its pid");
        xtask::netns::ip(&["netns", "attach", &pod.netns, &pid.to_string()]).expect("attach");
    }
    let roll = || -> Result<()> {
        a.kubectl(&[
            "rollout",
            "restart",
            "-n",
            "ligo-system",
            "daemonset/ligo-tunnel",
        ])?;
        a.kubectl(&[
            "rollout",
            "status",
            "-n",
            "ligo-system",
            "daemonset/ligo-tunnel",
            "--timeout=120s",
        ])?;
        // Until the new tunnel's first handshake has carried traffic.
        std::thread::sleep(Duration::from_secs(3));
        Ok(())
    };
    let (stream, ()) =
        match traffic::udp_stream(&a_pod, &b_pod, b_from_a, a_from_b, 7600, 10_000, roll) {
            Ok(r) => r,
            Err(e) => panic!("{e:#}\n{}", logs(&clusters)),
        };
    let lost = stream.sent - stream.received;
    println!(
        "tunnel DaemonSet rolled (no surge): {stream:?}; lost {lost} = {} ms of the stream",
        lost / 10
    );
    assert_eq!(
        (stream.duplicates, stream.mistranslated),
        (0, 0),
        "{stream:?}"
    );
    // Measured here: 11–12 s, most of it the DaemonSet controller waiting
    // for the old pod to be gone before it creates the new one (README:
    // what an upgrade costs). Bounded so a hang fails.
    assert!(stream.received > 0 && lost < 300_000, "{stream:?}");
    ping(a, b_from_a).expect("traffic after the tunnel upgrade");

    let unpeer = KubeTestbed::ligo_control(&[
        "unpeer",
        "--kubeconfig",
        &a.kubeconfig.to_string_lossy(),
        "--remote-kubeconfig",
        &b.kubeconfig.to_string_lossy(),
    ]);
    assert!(matches!(unpeer, Ok((true, _))), "{unpeer:?}");
    std::thread::sleep(Duration::from_secs(2));
    assert!(ping(a, b_from_a).is_err(), "A still reaches B after unpeer");
    assert_eq!(a.peering_objects("b"), Vec::<String>::new());
    assert_eq!(b.peering_objects("a"), Vec::<String>::new());
    let gone = |cp: &ControlPlane, kind: &str, name: &str| {
        cp.wait_for(&format!("{kind} {name} gone"), POD_WAIT, || {
            let out = cp.kubectl(&["get", kind, name, "--ignore-not-found", "-o", "name"])?;
            Ok(out.trim().is_empty().then_some(()))
        })
    };
    gone(a, "node", "ligo-b").expect("the virtual node removed");
    gone(b, "namespace", "demo").expect("B's copy of demo removed");
}

/// A web server in A's namespace `demo`: `greeting` at / on port 8080.
fn web(name: &str, greeting: &str, placement: &str) -> String {
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
fn fetch(cp: &ControlPlane, ns: &str, pod: &str, ip: &str, port: u16) -> Result<String> {
    let script = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {ip} {port}");
    cp.kubectl(&["exec", "-n", ns, pod, "--", "sh", "-c", &script])
}

/// A's Deployment `far` runs in B through the virtual node and answers
/// A's client at its Service's ClusterIP (A's kube-proxy to the address
/// in A's view, the fabric to B); B's copy reaches A's `near` through
/// its reflection in B (B's kube-proxy to B's view of A).
fn big_node(a: &ControlPlane, b: &ControlPlane) -> Result<()> {
    KubeTestbed::offload_namespace(a, "demo")?;
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
    let far_ip: Ipv4Addr = a
        .kubectl(&[
            "get",
            "pod",
            "-n",
            "demo",
            &far_pod,
            "-o",
            "jsonpath={.status.podIP}",
        ])?
        .parse()
        .context("far's address in A")?;
    let view = Cidr::parse(&a.jsonpath("peer", "b", "{.spec.view}")?);
    let copy_ip: Ipv4Addr = b
        .kubectl(&[
            "get",
            "pod",
            "-n",
            "demo",
            &far_pod,
            "-o",
            "jsonpath={.status.podIP}",
        ])?
        .parse()
        .context("the copy's address in B")?;
    anyhow::ensure!(
        Cidr::parse("10.244.0.0/16").translate(copy_ip, view) == far_ip,
        "A sees far at {far_ip}, B runs it at {copy_ip} (view {view:?})"
    );
    let out = ping(a, far_ip).context("A's client pings the offloaded pod")?;
    println!(
        "A's client -> far on the big node ({far_ip}): {}",
        out.lines().find(|l| l.contains("packets")).unwrap_or("")
    );

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
    let expected = Cidr::parse("10.244.0.0/16")
        .translate(near_ip, a_in_b)
        .to_string();
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
    let answer = a.wait_for(
        "A's client fetches far through its Service",
        POD_WAIT,
        || {
            Ok(fetch(a, "default", "client", &far_service, 80)
                .ok()
                .filter(|a| a.contains("hello-from-b")))
        },
    )?;
    println!(
        "A's client -> Service far ({far_service}) -> B: {}",
        answer.lines().last().unwrap_or("")
    );
    let near_service = b.kubectl(&[
        "get",
        "service",
        "-n",
        "demo",
        "near",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ])?;
    let answer = b.wait_for(
        "far's copy fetches near through its reflection in B",
        POD_WAIT,
        || {
            Ok(fetch(b, "demo", &far_pod, &near_service, 80)
                .ok()
                .filter(|a| a.contains("hello-from-a")))
        },
    )?;
    println!(
        "B's copy of far -> reflected Service near ({near_service}) -> A: {}",
        answer.lines().last().unwrap_or("")
    );
    Ok(())
}
