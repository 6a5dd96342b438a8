use serde_json::json;

use super::*;

fn node(name: &str, gateway: bool, slice: &str, internal: &str, external: Option<&str>) -> Node {
    let mut addresses = vec![json!({"type": "InternalIP", "address": internal})];
    if let Some(e) = external {
        addresses.push(json!({"type": "ExternalIP", "address": e}));
    }
    let labels = if gateway {
        json!({"ligo.io/gateway": ""})
    } else {
        json!({})
    };
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": {"podCIDR": slice, "podCIDRs": [slice]},
        "status": {"addresses": addresses},
    }))
    .expect("a Node")
}

fn fabric(status: bool) -> ClusterFabric {
    let status = if status {
        json!({"clusterName": "a", "clusterId": 1, "podCIDR": "10.244.0.0/16"})
    } else {
        json!({})
    };
    serde_json::from_value(json!({
        "apiVersion": "ligo.io/v1alpha1", "kind": "ClusterFabric",
        "metadata": {"name": "local"},
        "spec": {"wireguardPort": 51999},
        "status": status,
    }))
    .expect("a ClusterFabric")
}

const KEY_B: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

fn peer(name: &str, id: u32, view: Option<&str>, key: &str) -> Peer {
    serde_json::from_value(json!({
        "apiVersion": "ligo.io/v1alpha1", "kind": "Peer",
        "metadata": {"name": name, "creationTimestamp": format!("2026-01-01T00:00:0{id}Z")},
        "spec": {
            "clusterName": name, "clusterId": id, "podCIDR": "10.244.0.0/16",
            "gatewayEndpoints": ["203.0.113.9:51820", "203.0.113.2:51820"],
            "wireguardPublicKey": key, "view": view,
        },
    }))
    .expect("a Peer")
}

fn flags(node: &str) -> DaemonFlags {
    DaemonFlags {
        node_name: node.into(),
        pin_dir: "/sys/fs/bpf/ligo".into(),
        metrics_address: "0.0.0.0:9477".parse().expect("address"),
        ingress: IngressHook::Auto,
        pod_delivery: PodDelivery::Stack,
        private_key_file: Some("/etc/ligo/key/private-key".into()),
        status_socket: "/run/ligo-fabric/wireguard.sock".into(),
    }
}

fn host(pairs: &[(&str, &str)]) -> Vec<HostAddress> {
    pairs
        .iter()
        .map(|(i, a)| HostAddress {
            interface: (*i).into(),
            address: a.parse().expect("address"),
        })
        .collect()
}

fn nodes() -> Vec<Node> {
    vec![
        node(
            "gw",
            true,
            "10.244.0.0/24",
            "192.168.1.1",
            Some("203.0.113.1"),
        ),
        node("n1", false, "10.244.1.0/24", "192.168.1.2", None),
    ]
}

#[test]
fn a_gateway_gets_both_interfaces_every_slice_and_the_peers_with_views() {
    let fabrics = [fabric(true)];
    let nodes = nodes();
    let peers = [
        peer("b", 2, Some("10.128.0.0/16"), KEY_B),
        peer("c", 3, None, KEY_B),
        peer("d", 4, Some("10.129.0.0/16"), "not-a-key"),
    ];
    let t = translate(
        &flags("gw"),
        &Observed {
            fabrics: &fabrics,
            nodes: &nodes,
            node_fabrics: &[],
            peers: &peers,
        },
        &host(&[
            ("lo", "127.0.0.1"),
            ("eth0", "192.168.1.1"),
            ("eth1", "203.0.113.1"),
        ]),
    )
    .expect("a translation");
    match &t.local.role {
        LocalRole::Gateway(g) => {
            assert_eq!(g.underlay_interface, "eth0");
            assert_eq!(g.public_interface, "eth1");
            assert_eq!(g.public_ip, Ipv4Addr::new(203, 0, 113, 1));
            assert_eq!(
                g.private_key_file.as_deref(),
                Some(std::path::Path::new("/etc/ligo/key/private-key"))
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(t.spec.cluster_id, 1);
    assert_eq!(t.spec.wireguard_port, 51999);
    assert_eq!(t.spec.node_slices.len(), 2);
    assert_eq!(
        t.spec
            .node_slices
            .get(&"10.244.1.0/24".parse().expect("net")),
        Some(&Ipv4Addr::new(192, 168, 1, 2))
    );
    // b is in; c waits for its view (no problem); d's key is refused, by name.
    assert_eq!(t.spec.peers.keys().copied().collect::<Vec<_>>(), [2]);
    let b = &t.spec.peers[&2];
    assert_eq!(
        b.view_cidr,
        "10.128.0.0/16".parse::<Ipv4Network>().expect("net")
    );
    assert_eq!(
        b.endpoint,
        Some("203.0.113.2:51820".parse().expect("endpoint")),
        "the lowest endpoint"
    );
    assert_eq!(t.problems.len(), 1);
    assert_eq!(t.problems[0].origin, "Peer/d");
}

#[test]
fn a_node_uses_the_interface_holding_its_internal_ip_and_the_gateways_address() {
    let fabrics = [fabric(true)];
    let nodes = nodes();
    let t = translate(
        &flags("n1"),
        &Observed {
            fabrics: &fabrics,
            nodes: &nodes,
            node_fabrics: &[],
            peers: &[],
        },
        &host(&[("ens5", "192.168.1.2")]),
    )
    .expect("a translation");
    match &t.local.role {
        LocalRole::Node(n) => {
            assert_eq!(n.uplink, "ens5");
            assert_eq!(n.underlay_ip, Ipv4Addr::new(192, 168, 1, 2));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(t.spec.gateway_ip, Some(Ipv4Addr::new(192, 168, 1, 1)));
}

#[test]
fn a_node_fabric_overrides_the_slices_of_its_node() {
    let fabrics = [fabric(true)];
    let nodes = nodes();
    let node_fabrics: Vec<NodeFabric> = vec![serde_json::from_value(json!({
        "apiVersion": "ligo.io/v1alpha1", "kind": "NodeFabric",
        "metadata": {"name": "n1"},
        "spec": {"podCIDRs": ["10.244.64.0/20"]},
    }))
    .expect("a NodeFabric")];
    let t = translate(
        &flags("gw"),
        &Observed {
            fabrics: &fabrics,
            nodes: &nodes,
            node_fabrics: &node_fabrics,
            peers: &[],
        },
        &host(&[("eth0", "192.168.1.1"), ("eth1", "203.0.113.1")]),
    )
    .expect("a translation");
    let slices: Vec<String> = t.spec.node_slices.keys().map(ToString::to_string).collect();
    assert_eq!(slices, ["10.244.0.0/24", "10.244.64.0/20"]);
}

#[test]
fn what_is_missing_is_named() {
    let nodes = nodes();
    let observe = |fabrics: &[ClusterFabric], node: &str, host_addresses: &[HostAddress]| {
        translate(
            &flags(node),
            &Observed {
                fabrics,
                nodes: &nodes,
                node_fabrics: &[],
                peers: &[],
            },
            host_addresses,
        )
        .expect_err("something is missing")
    };
    let here = host(&[("eth0", "192.168.1.2")]);
    assert!(observe(&[], "n1", &here).contains("no ClusterFabric/local"));
    assert!(observe(&[fabric(false)], "n1", &here).contains("status.clusterId"));
    assert!(observe(&[fabric(true)], "n9", &here).contains("NODE_NAME"));
    let e = observe(&[fabric(true)], "n1", &host(&[("eth0", "10.0.0.1")]));
    assert!(
        e.contains("192.168.1.2") && e.contains("hostNetwork"),
        "{e}"
    );
}

#[test]
fn only_the_gateway_gets_wireguard_keys_and_keepalives() {
    let fabrics = [fabric(true)];
    let nodes = nodes();
    let peers = [peer("b", 2, Some("10.128.0.0/16"), KEY_B)];
    let observed = Observed {
        fabrics: &fabrics,
        nodes: &nodes,
        node_fabrics: &[],
        peers: &peers,
    };
    let on_node = translate(&flags("n1"), &observed, &host(&[("eth0", "192.168.1.2")]))
        .expect("a translation");
    assert!(on_node.problems.is_empty(), "{:?}", on_node.problems);
    assert_eq!(on_node.spec.peers[&2].wireguard, None);
    let on_gateway = translate(
        &flags("gw"),
        &observed,
        &host(&[("eth0", "192.168.1.1"), ("eth1", "203.0.113.1")]),
    )
    .expect("a translation");
    let wireguard = on_gateway.spec.peers[&2]
        .wireguard
        .as_ref()
        .expect("WireGuard settings on the gateway");
    assert_eq!(wireguard.persistent_keepalive, Some(10));
    assert_eq!(wireguard.public_key[..3], [0, 1, 2]);
}

#[test]
fn the_public_ip_annotation_wins_and_a_bad_one_is_named() {
    let fabrics = [fabric(true)];
    let mut nodes = nodes();
    nodes[0]
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(PUBLIC_IP_ANNOTATION.into(), "198.51.100.7".into());
    let host_addresses = host(&[
        ("eth0", "192.168.1.1"),
        ("eth1", "203.0.113.1"),
        ("wan", "198.51.100.7"),
    ]);
    let observe = |nodes: &[Node]| {
        translate(
            &flags("gw"),
            &Observed {
                fabrics: &fabrics,
                nodes,
                node_fabrics: &[],
                peers: &[],
            },
            &host_addresses,
        )
    };
    match observe(&nodes).expect("a translation").local.role {
        LocalRole::Gateway(g) => {
            assert_eq!(g.public_ip, Ipv4Addr::new(198, 51, 100, 7));
            assert_eq!(g.public_interface, "wan");
        }
        other => panic!("{other:?}"),
    }
    nodes[0]
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(PUBLIC_IP_ANNOTATION.into(), "gw.example".into());
    let e = observe(&nodes).expect_err("a bad annotation");
    assert!(
        e.contains("ligo.io/public-ip") && e.contains("gw.example"),
        "{e}"
    );
}
