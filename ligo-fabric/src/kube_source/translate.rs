//! From Kubernetes objects to the daemon's inputs: pure, so every rule is
//! unit-tested. Our Node gives the role (the gateway label), the underlay
//! address (InternalIP) and, on gateways, the public one (the
//! `ligo.io/public-ip` annotation, else ExternalIP, else InternalIP); the interfaces are the host's that hold those addresses.
//! `ClusterFabric/local`'s status gives the id and pod CIDR, every Node the
//! pod CIDR slices, and each `Peer` with a view one peer.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
};

use ipnetwork::Ipv4Network;
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use ligo_api::{
    ClusterFabric, NodeFabric, Peer, CLUSTER_FABRIC_NAME, DEFAULT_GATEWAY_LABEL,
    PUBLIC_IP_ANNOTATION,
};

use crate::config::{
    admit_peers, FabricSpec, GatewayLocal, IngressHook, LocalConfig, LocalRole, NodeLocal,
    PeerContext, PeerInput, PeerProblem, PodDelivery, Transport, DEFAULT_FABRIC_PORT,
    DEFAULT_WIREGUARD_PORT,
};

/// Keepalives toward every WireGuard peer of a cluster: the session is
/// made as soon as the peer is configured (so `ligo-control peer --wait`
/// sees the tunnel up within a round trip) and a dead peer is reported
/// within 2 × 10 + 3 s.
pub const KEEPALIVE_SECONDS: u16 = 10;

/// What the DaemonSet passes the daemon (flags and the downward API).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonFlags {
    /// `NODE_NAME`: the Node this daemon runs on.
    pub node_name: String,
    pub pin_dir: PathBuf,
    pub metrics_address: SocketAddr,
    pub ingress: IngressHook,
    pub pod_delivery: PodDelivery,
    /// The gateway key Secret's `private-key`, where it is mounted.
    pub private_key_file: Option<PathBuf>,
    pub status_socket: PathBuf,
}

/// An IPv4 address on one of this host's interfaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAddress {
    pub interface: String,
    pub address: Ipv4Addr,
}

/// The objects, as the watches last saw them.
pub struct Observed<'a> {
    pub fabrics: &'a [ClusterFabric],
    pub nodes: &'a [Node],
    pub node_fabrics: &'a [NodeFabric],
    pub peers: &'a [Peer],
}

#[derive(Debug, Clone, PartialEq)]
pub struct Translation {
    pub local: LocalConfig,
    pub spec: FabricSpec,
    /// Peers left out, each with why (the others are used).
    pub problems: Vec<PeerProblem>,
}

/// The daemon's local settings and fabric spec, or what is missing (the
/// message names the object and the field).
pub fn translate(
    flags: &DaemonFlags,
    observed: &Observed,
    host: &[HostAddress],
) -> Result<Translation, String> {
    let fabric = observed
        .fabrics
        .iter()
        .find(|f| f.name_any() == CLUSTER_FABRIC_NAME)
        .ok_or_else(|| format!("no ClusterFabric/{CLUSTER_FABRIC_NAME}: is Ligo installed (kubectl apply -k manifests/)?"))?;
    let status = fabric.status.clone().unwrap_or_default();
    let waiting = |field: &str| {
        format!("ClusterFabric/{CLUSTER_FABRIC_NAME} has no status.{field} yet: is ligo-control running, and is the ClusterFabric Valid?")
    };
    let cluster_id = status.cluster_id.ok_or_else(|| waiting("clusterId"))?;
    let pod_cidr: Ipv4Network = status
        .pod_cidr
        .as_deref()
        .ok_or_else(|| waiting("podCIDR"))?
        .parse()
        .map_err(|_| waiting("podCIDR"))?;
    let label = fabric
        .spec
        .gateway_node_label
        .clone()
        .unwrap_or_else(|| DEFAULT_GATEWAY_LABEL.to_owned());
    let wireguard_port = fabric.spec.wireguard_port.unwrap_or(DEFAULT_WIREGUARD_PORT);

    let node = observed
        .nodes
        .iter()
        .find(|n| n.name_any() == flags.node_name)
        .ok_or_else(|| {
            format!(
                "Node {:?} not found: NODE_NAME must be this node's name (the DaemonSet sets it from spec.nodeName)",
                flags.node_name
            )
        })?;
    let underlay_ip = address(node, "InternalIP").ok_or_else(|| {
        format!(
            "Node {} has no InternalIP in status.addresses",
            flags.node_name
        )
    })?;
    let holder = |ip: Ipv4Addr, what: &str| {
        host.iter()
            .find(|h| h.address == ip)
            .map(|h| h.interface.clone())
            .ok_or_else(|| {
                format!(
                    "no interface of this host holds Node {}'s {what} {ip}: is the daemon in the host's network namespace (hostNetwork: true)?",
                    flags.node_name
                )
            })
    };
    let underlay_interface = holder(underlay_ip, "InternalIP")?;
    let is_gateway = node.labels().contains_key(&label);
    let role = if is_gateway {
        let public_ip = match node.annotations().get(PUBLIC_IP_ANNOTATION) {
            Some(text) => text.parse().map_err(|_| {
                format!(
                    "Node {} annotation {PUBLIC_IP_ANNOTATION}: {text:?} is not an IPv4 address",
                    flags.node_name
                )
            })?,
            None => address(node, "ExternalIP").unwrap_or(underlay_ip),
        };
        LocalRole::Gateway(GatewayLocal {
            public_interface: holder(public_ip, "ExternalIP")?,
            public_ip,
            underlay_interface,
            underlay_ip,
            private_key_file: flags.private_key_file.clone(),
            status_socket: flags.status_socket.clone(),
        })
    } else {
        LocalRole::Node(NodeLocal {
            uplink: underlay_interface,
            underlay_ip,
            ingress: flags.ingress,
            pod_delivery: flags.pod_delivery,
        })
    };
    let local = LocalConfig {
        pin_dir: flags.pin_dir.clone(),
        metrics_address: flags.metrics_address,
        role,
    };

    let mut gateways: Vec<&Node> = observed
        .nodes
        .iter()
        .filter(|n| n.labels().contains_key(&label))
        .collect();
    gateways.sort_by_key(|n| n.name_any());
    let gateway_ip = gateways.iter().find_map(|n| address(n, "InternalIP"));
    let node_slices = node_slices(observed);

    let mut peers: Vec<&Peer> = observed.peers.iter().collect();
    peers.sort_by_key(|p| {
        (
            p.metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string()),
            p.name_any(),
        )
    });
    let is_wireguard_gateway = |t: Transport| is_gateway && t == Transport::Wireguard;
    let inputs = peers.into_iter().filter_map(|p| {
        // A peer without a view is not allocated yet: not a problem.
        let view = p.spec.view.clone()?;
        let mut endpoints = p.spec.gateway_endpoints.clone();
        endpoints.sort();
        let transport = match p.spec.transport.as_deref() {
            Some("plain") => Transport::Plain,
            _ => Transport::Wireguard,
        };
        Some((
            format!("Peer/{}", p.name_any()),
            PeerInput {
                id: p.spec.cluster_id,
                name: Some(p.name_any()),
                pod_cidr: p.spec.pod_cidr.clone(),
                view_cidr: Some(view),
                endpoint: endpoints.into_iter().next(),
                transport,
                // Nodes carry no WireGuard settings (the file source
                // refuses them there too).
                public_key: is_wireguard_gateway(transport)
                    .then(|| p.spec.wireguard_public_key.clone())
                    .flatten(),
                preshared_key_file: None,
                persistent_keepalive: is_wireguard_gateway(transport).then_some(KEEPALIVE_SECONDS),
            },
        ))
    });
    let pod_cidrs = [pod_cidr];
    let (admitted, problems) = admit_peers(
        PeerContext {
            cluster_id,
            pod_cidrs: &pod_cidrs,
            is_gateway,
        },
        inputs,
    );
    Ok(Translation {
        local,
        spec: FabricSpec {
            cluster_id,
            pod_cidrs: pod_cidrs.to_vec(),
            fabric_port: DEFAULT_FABRIC_PORT,
            wireguard_port,
            gateway_ip,
            node_slices,
            peers: admitted,
        },
        problems,
    })
}

fn address(node: &Node, kind: &str) -> Option<Ipv4Addr> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == kind)?
        .address
        .parse()
        .ok()
}

/// Each node's pod CIDR slices (its NodeFabric's override, else
/// `spec.podCIDRs`) to its InternalIP.
fn node_slices(observed: &Observed) -> BTreeMap<Ipv4Network, Ipv4Addr> {
    let mut slices = BTreeMap::new();
    for node in observed.nodes {
        let Some(ip) = address(node, "InternalIP") else {
            continue;
        };
        let name = node.name_any();
        let overridden = observed
            .node_fabrics
            .iter()
            .find(|nf| nf.name_any() == name)
            .map(|nf| nf.spec.pod_cidrs.clone())
            .filter(|c| !c.is_empty());
        let texts = overridden.unwrap_or_else(|| {
            let spec = node.spec.clone().unwrap_or_default();
            let mut cidrs = spec.pod_cidrs.unwrap_or_default();
            if cidrs.is_empty() {
                cidrs.extend(spec.pod_cidr);
            }
            cidrs
        });
        for text in texts {
            if let Ok(net) = text.parse::<Ipv4Network>() {
                slices.insert(net, ip);
            }
        }
    }
    slices
}

#[cfg(test)]
#[path = "translate_tests.rs"]
mod tests;
