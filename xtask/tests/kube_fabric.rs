//! The fabric run by Kubernetes, end to end: per cluster a real control
//! plane with `kubectl apply -k manifests/` applied for real, the testbed's
//! namespaces as the Nodes, and Ligo's controller, fabric daemons and
//! tunnel started from the pod templates the API server holds. Then
//! `ligo-control peer --wait`, ICMP/TCP/UDP both ways through the views
//! the controllers allocated, `unpeer` (traffic stops, nothing left on
//! either side), and peering again. Identical and different pod CIDRs,
//! over WireGuard.

use std::{net::Ipv4Addr, sync::Mutex, time::Duration};

use anyhow::{ensure, Context, Result};
use xtask::{
    kube_testbed::{KubeTestbed, SPARE_POOL},
    require_root,
    testbed::{Cidr, Pod, Scenario},
    traffic,
};

/// One two-cluster bed at a time: each is four API servers' worth of work
/// for two cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const TRANSFER_BYTES: usize = 2 << 20;

/// The view cluster `of` allocated for the other cluster, read back from
/// its Peer object.
fn allocated_view(kb: &KubeTestbed, of: usize) -> Result<String> {
    let other = kb.plans()[1 - of].name;
    kb.clusters[of].jsonpath("peer", other, "{.spec.view}")
}

/// ICMP, a hashed TCP transfer and UDP echoes from `from` to `to`, with
/// the addresses each side sees checked against the scenario's views.
fn exchange(kb: &KubeTestbed, from: &Pod, to: &Pod, port: u16) -> Result<()> {
    let dst = kb.bed.address_seen_from_peer(to);
    let src_seen = kb.bed.address_seen_from_peer(from);
    exchange_at(from, to, dst, src_seen, port)
}

/// [`exchange`] with `to` at `dst`, `from` expected to arrive as `src_seen`.
fn exchange_at(from: &Pod, to: &Pod, dst: Ipv4Addr, src_seen: Ipv4Addr, port: u16) -> Result<()> {
    traffic::ping(from, dst, 2)?;
    let tcp = traffic::tcp_transfer(from, to, dst, port, TRANSFER_BYTES)?;
    ensure!(
        tcp.server_saw == src_seen,
        "TCP server saw {}, expected {src_seen}",
        tcp.server_saw
    );
    let udp = traffic::udp_exchange(from, to, dst, port, 20)?;
    ensure!(
        udp.server_saw == src_seen && udp.reply_from == dst,
        "UDP: server saw {}, reply from {}; expected {src_seen} and {dst}",
        udp.server_saw,
        udp.reply_from
    );
    Ok(())
}

fn exchange_both_ways(kb: &KubeTestbed) -> Result<()> {
    let (a, b) = (kb.bed.pod(0, 0, 0), kb.bed.pod(1, 1, 1));
    exchange(kb, &a, &b, 7400).context("A -> B")?;
    exchange(kb, &b, &a, 7401).context("B -> A")?;
    Ok(())
}

/// The manifests' ServiceAccounts, tried with the tokens their containers
/// were given: each may do its job and nothing else.
fn least_privilege(kb: &KubeTestbed) -> Result<()> {
    let cp = &kb.clusters[0];
    let token = |process: &str| {
        std::fs::read_to_string(
            kb.bed
                .lab
                .file(&format!("{process}-serviceaccount"))
                .join("token"),
        )
        .with_context(|| format!("the token {process} was given"))
    };
    let daemon = token(&kb.bed.ns(&kb.bed.scenario.a, "n1"))?;
    let controller = token("a-control")?;
    let as_ = |token: &str, args: &[&str]| {
        let mut full = vec!["--token", token];
        full.extend_from_slice(args);
        cp.kubectl(&full)
    };
    for (who, token, allowed, refused) in [
        (
            "ligo-fabric",
            &daemon,
            vec![vec!["get", "nodefabric", "n1"], vec!["get", "peers"]],
            vec![
                vec!["get", "secrets", "-n", "ligo-system"],
                vec!["delete", "peer", "b"],
                vec![
                    "patch",
                    "clusterfabric",
                    "local",
                    "--type=merge",
                    "-p",
                    "{\"spec\":{\"wireguardPort\":1}}",
                ],
                vec!["get", "pods", "-A"],
                vec!["delete", "node", "n2"],
            ],
        ),
        (
            "ligo-control",
            &controller,
            vec![
                vec!["get", "secret", "ligo-gateway-key", "-n", "ligo-system"],
                vec!["get", "nodes"],
                vec!["get", "pods", "-A"],
            ],
            vec![
                vec!["get", "secrets", "-n", "kube-system"],
                vec!["get", "configmaps", "-A"],
                vec!["create", "deployment", "x", "--image=busybox"],
                vec!["delete", "nodefabric", "n1"],
                vec![
                    "create",
                    "rolebinding",
                    "x",
                    "--clusterrole=cluster-admin",
                    "--user=x",
                ],
                vec![
                    "create",
                    "clusterrolebinding",
                    "x",
                    "--clusterrole=ligo-offload-guest",
                    "--user=x",
                ],
            ],
        ),
    ] {
        for args in allowed {
            as_(token, &args).with_context(|| format!("{who} may {args:?}"))?;
        }
        for args in refused {
            match as_(token, &args) {
                Ok(out) => anyhow::bail!("{who} could {args:?}: {out}"),
                Err(e) => ensure!(
                    format!("{e:#}").contains("Forbidden")
                        || format!("{e:#}").contains("forbidden"),
                    "{who} {args:?} failed, but not as forbidden: {e:#}"
                ),
            }
        }
    }
    Ok(())
}

fn peer_unpeer_and_peer_again(prefix: &str, scenario: Scenario, index: u8) {
    let identical = scenario.a.pod_cidr == scenario.b.pod_cidr;
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut kb = KubeTestbed::up(prefix, scenario, index).unwrap_or_else(|e| panic!("{e:#}"));
    if let Err(e) = kb.start_ligo() {
        panic!("{e:#}\n{}", kb.logs());
    }
    let (out, took) = kb.peer().unwrap_or_else(|e| panic!("{e:#}"));
    println!("peer --wait took {took:?}:\n{out}");
    assert!(out.contains("Ready after"), "{out}");

    // The controllers allocated the views the scenario expects (each
    // cluster's pool holds exactly that block; a free real CIDR is kept).
    for (i, plan) in kb.plans().iter().enumerate() {
        let view = allocated_view(&kb, i).expect("view");
        assert_eq!(view, plan.view_of_peer.to_string(), "{}'s view", plan.name);
    }
    if let Err(e) = exchange_both_ways(&kb) {
        panic!("{e:#}\n{}", kb.logs());
    }

    if identical {
        if let Err(e) = least_privilege(&kb) {
            panic!("{e:#}");
        }
    }

    // Every daemon reports the peer programmed; the gateway its link.
    for (i, plan) in kb.plans().iter().enumerate() {
        let other = kb.plans()[1 - i].name;
        for host in ["gw", "n1", "n2"] {
            let peers = kb.clusters[i]
                .jsonpath("nodefabric", host, "{.status.programmedPeers}")
                .unwrap_or_default();
            assert!(
                peers.contains(other),
                "{} {host}: programmedPeers {peers}",
                plan.name
            );
        }
        let link = kb.clusters[i]
            .jsonpath("peer", other, "{.status.link.handshakeAgeSeconds}")
            .unwrap_or_default();
        assert!(
            !link.is_empty(),
            "{}: no handshake age in Peer/{other}",
            plan.name
        );
    }

    let (out, took) = kb.unpeer().unwrap_or_else(|e| panic!("{e:#}"));
    println!("unpeer took {took:?}:\n{out}");
    for (i, plan) in kb.plans().iter().enumerate() {
        let other = kb.plans()[1 - i].name;
        let left = kb.clusters[i].peering_objects(other);
        assert!(left.is_empty(), "{} keeps {left:?}", plan.name);
    }
    // Traffic stops: the daemons drop the peer as soon as its Peer goes.
    let (a, b) = (kb.bed.pod(0, 0, 0), kb.bed.pod(1, 1, 1));
    let dst = kb.bed.address_seen_from_peer(&b);
    let stopped = kb.clusters[0].wait_for(
        "traffic to stop after unpeer",
        Duration::from_secs(10),
        || Ok(traffic::ping(&a, dst, 1).is_err().then_some(())),
    );
    if let Err(e) = stopped {
        panic!("{e:#}\n{}", kb.logs());
    }
    for (i, plan) in kb.plans().iter().enumerate() {
        let peers = kb.clusters[i]
            .jsonpath("nodefabric", "n1", "{.status.programmedPeers}")
            .unwrap_or_default();
        assert!(peers.is_empty(), "{} n1 still carries {peers}", plan.name);
    }

    // Peering again works, with the same views (the pools give them again).
    let (_, took) = kb.peer().unwrap_or_else(|e| panic!("{e:#}"));
    println!("peer again took {took:?}");
    if let Err(e) = exchange_both_ways(&kb) {
        panic!("{e:#}\n{}", kb.logs());
    }
}

#[test]
fn clusters_with_identical_cidrs_peer_from_the_manifests_and_carry_traffic() {
    if !require_root("clusters_with_identical_cidrs_peer_from_the_manifests_and_carry_traffic") {
        return;
    }
    peer_unpeer_and_peer_again("kfi", Scenario::identical_cidrs(), 221);
}

#[test]
fn clusters_with_different_cidrs_peer_from_the_manifests_and_carry_traffic() {
    if !require_root("clusters_with_different_cidrs_peer_from_the_manifests_and_carry_traffic") {
        return;
    }
    let mut scenario = Scenario::different_cidrs();
    // Each keeps the other's real CIDR as its view: it collides with
    // nothing local (identical CIDRs exercise the pools).
    scenario.a.view_of_peer = scenario.b.pod_cidr;
    peer_unpeer_and_peer_again("kfd", scenario, 223);
}

#[test]
fn three_clusters_on_one_cidr_a_talks_to_b_and_c_at_once() {
    if !require_root("three_clusters_on_one_cidr_a_talks_to_b_and_c_at_once") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut kb = KubeTestbed::up("kf3", Scenario::three_identical_cidrs(), 227)
        .unwrap_or_else(|e| panic!("{e:#}"));
    if let Err(e) = kb.start_ligo() {
        panic!("{e:#}\n{}", kb.logs());
    }
    for remote in [1, 2] {
        if let Err(e) = kb.peer_between(0, remote, &["--wait", "--timeout", "60s"]) {
            panic!("{e:#}\n{}", kb.logs());
        }
    }
    // A's two views differ (b's from the first pool block, c's from the
    // spare one); b and c each see A through their own pool.
    let view = |cluster: usize, peer: &str| {
        kb.clusters[cluster]
            .jsonpath("peer", peer, "{.spec.view}")
            .unwrap_or_default()
    };
    let (a_sees_b, a_sees_c) = (view(0, "b"), view(0, "c"));
    assert_eq!(a_sees_b, "10.245.0.0/16");
    assert_eq!(a_sees_c, SPARE_POOL);
    assert_eq!(view(1, "a"), "10.246.0.0/16");
    assert_eq!(view(2, "a"), "10.246.0.0/16");

    let pods = Cidr::parse("10.244.0.0/16");
    let a_as_seen = Cidr::parse("10.246.0.0/16");
    let (a1, a2) = (kb.bed.pod(0, 0, 0), kb.bed.pod(0, 1, 1));
    let (b, c) = (kb.bed.pod(1, 1, 1), kb.bed.pod(2, 0, 0));
    let to_b = pods.translate(b.ip, Cidr::parse(&a_sees_b));
    let to_c = pods.translate(c.ip, Cidr::parse(&a_sees_c));
    let outcome = std::thread::scope(|s| {
        let ab = s.spawn(|| {
            exchange_at(&a1, &b, to_b, pods.translate(a1.ip, a_as_seen), 7410)?;
            exchange_at(&b, &a1, pods.translate(a1.ip, a_as_seen), to_b, 7411)
        });
        let ac = s.spawn(|| {
            exchange_at(&a2, &c, to_c, pods.translate(a2.ip, a_as_seen), 7420)?;
            exchange_at(&c, &a2, pods.translate(a2.ip, a_as_seen), to_c, 7421)
        });
        [("A <-> B", ab.join()), ("A <-> C", ac.join())]
    });
    for (pair, result) in outcome {
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{pair}: {e:#}\n{}", kb.logs()),
            Err(_) => panic!("{pair}: the exchange panicked"),
        }
    }
}
