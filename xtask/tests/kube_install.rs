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

use std::time::Duration;

use anyhow::Result;
use xtask::{
    kube::ControlPlane,
    kube_nodes::ligo_image,
    kube_testbed::KubeTestbed,
    real_cluster::{big_node, client_ip, install, logs, ping, POD_WAIT},
    require_root,
    testbed::{Cidr, Pod, Scenario, Testbed},
    traffic,
};

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
        if let Err(e) = install(&mut clusters, &bed, plan, "ki", 215 + i as u8, &image) {
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
    let (ip_a, ip_b) = (client_ip(a).expect("pod a"), client_ip(b).expect("pod b"));
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

    if let Err(e) = KubeTestbed::offload_namespace(a, "demo") {
        panic!("offload namespace demo: {e:#}\n{}", logs(&clusters));
    }
    match big_node(a, b, pods, pods) {
        Ok(seen) => println!("the big node: {seen:#?}"),
        Err(e) => panic!("the big node: {e:#}\n{}", logs(&clusters)),
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
