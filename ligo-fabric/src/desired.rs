//! What the maps and routes must contain: a pure function of the local
//! configuration, the fabric spec and the host's facts, unit-tested without
//! a kernel.

use std::{collections::BTreeMap, net::Ipv4Addr};

use ipnetwork::Ipv4Network;
use ligo_fabric_common::{
    headers::TCP_IPV4_HEADERS,
    maps::{FabricConfig, NodeSlice, Peer, PeerView, Role, TRANSPORT_PLAIN, TRANSPORT_WIREGUARD},
    prefix::PrefixRewrite,
};

use crate::{
    config::{FabricSpec, LocalConfig, LocalRole, Transport},
    host::HostFacts,
};

/// Bytes the fabric adds in front of an inner IPv4 packet on the underlay:
/// outer IPv4 + UDP + VXLAN + inner Ethernet.
pub const ENCAP_OVERHEAD: u32 = ligo_fabric_common::headers::ENCAP_LEN as u32;

/// An LPM key as the maps store it.
pub type Prefix = (Ipv4Addr, u8);

fn prefix(net: Ipv4Network) -> Prefix {
    (net.network(), net.prefix())
}

/// A route that steers a peer view into the fabric on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SteeringRoute {
    pub destination: Ipv4Network,
    pub via: Ipv4Addr,
    /// Route MTU = uplink MTU - overhead: the larger of the node-to-gateway
    /// encapsulation and the gateway-to-gateway transport's (assuming the
    /// gateway's public link has the uplink's MTU).
    pub overhead: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DesiredState {
    /// FABRIC_CONFIG without interface indexes (resolved when applying).
    pub config: FabricConfig,
    pub peer_views: BTreeMap<Prefix, PeerView>,
    pub peers: BTreeMap<u32, Peer>,
    pub peer_endpoints: BTreeMap<[u8; 4], u32>,
    pub node_slices: BTreeMap<Prefix, NodeSlice>,
    pub routes: Vec<SteeringRoute>,
}

pub fn desired_state(local: &LocalConfig, spec: &FabricSpec, host: &HostFacts) -> DesiredState {
    let mut state = DesiredState {
        config: FabricConfig {
            cluster_id: spec.cluster_id,
            fabric_port: spec.fabric_port.to_be_bytes(),
            ..Default::default()
        },
        ..Default::default()
    };
    for peer in spec.peers.values() {
        let len = peer.pod_cidr.prefix();
        let real = peer.pod_cidr.network().octets();
        let view = peer.view_cidr.network().octets();
        state.peer_views.insert(
            prefix(peer.view_cidr),
            PeerView {
                peer_id: peer.id,
                view_to_real: PrefixRewrite::new(view, real, len),
                ..Default::default()
            },
        );
        let (endpoint_ip, endpoint_port) = match peer.endpoint {
            Some(ep) => (ep.ip().octets(), ep.port().to_be_bytes()),
            None => ([0; 4], [0; 2]),
        };
        state.peers.insert(
            peer.id,
            Peer {
                real_to_view: PrefixRewrite::new(real, view, len),
                endpoint_ip,
                endpoint_port,
                transport: match peer.transport {
                    Transport::Plain => TRANSPORT_PLAIN,
                    Transport::Wireguard => TRANSPORT_WIREGUARD,
                },
                _reserved: 0,
            },
        );
    }
    match &local.role {
        LocalRole::Node(node) => {
            state.config.role = Role::Node as u8;
            state.config.underlay_ip = node.underlay_ip.octets();
            // A node spec without a gateway steers nowhere: no routes.
            if let Some(gateway_ip) = spec.gateway_ip {
                state.config.gateway_ip = gateway_ip.octets();
                state.routes = spec
                    .peers
                    .values()
                    .map(|p| SteeringRoute {
                        destination: p.view_cidr,
                        via: gateway_ip,
                        overhead: ENCAP_OVERHEAD.max(p.transport.overhead()),
                    })
                    .collect();
                state.routes.sort();
            }
            if let Some(mtu) = host.underlay_mtu {
                state.clamp_mss_to(mtu);
            }
        }
        LocalRole::Gateway(gw) => {
            state.config.role = Role::Gateway as u8;
            state.config.underlay_ip = gw.underlay_ip.octets();
            state.config.public_ip = gw.public_ip.octets();
            // Only plain peers: WireGuard datagrams go to the tunnel's port.
            for peer in spec.peers.values() {
                if peer.transport != Transport::Plain {
                    continue;
                }
                if let Some(ep) = peer.endpoint {
                    state.peer_endpoints.insert(ep.ip().octets(), peer.id);
                }
            }
            for (net, node_ip) in &spec.node_slices {
                state.node_slices.insert(
                    prefix(*net),
                    NodeSlice {
                        node_ip: node_ip.octets(),
                    },
                );
            }
        }
    }
    state
}

impl DesiredState {
    /// Node role: the MSS clamp of each view, from the uplink MTU less the
    /// route's overhead (as its route MTU) less IPv4 and TCP headers.
    fn clamp_mss_to(&mut self, uplink_mtu: u32) {
        for route in &self.routes {
            if let Some(view) = self.peer_views.get_mut(&prefix(route.destination)) {
                let mss = uplink_mtu
                    .saturating_sub(route.overhead)
                    .saturating_sub(TCP_IPV4_HEADERS);
                view.mss_clamp = u16::try_from(mss).unwrap_or(u16::MAX);
            }
        }
    }
}

/// The changes that turn `current` into `desired`: entries to insert or
/// overwrite (applied first) and keys to delete (applied after), so an entry
/// present in both states never disappears, not even for an instant.
#[derive(Debug, PartialEq, Eq)]
pub struct MapPlan<K, V> {
    pub upserts: Vec<(K, V)>,
    pub deletes: Vec<K>,
}

pub fn plan<K: Ord + Clone, V: PartialEq + Clone>(
    current: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
) -> MapPlan<K, V> {
    MapPlan {
        upserts: desired
            .iter()
            .filter(|(k, v)| current.get(k) != Some(v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        deletes: current
            .keys()
            .filter(|k| !desired.contains_key(k))
            .cloned()
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    const NODE: &str = r#"
cluster_id = 1
pod_cidrs = ["10.244.0.0/16"]
[node]
uplink = "eth0"
underlay_ip = "192.0.2.11"
gateway_ip = "192.0.2.1"
[[peers]]
id = 2
pod_cidr = "10.100.16.0/20"
view_cidr = "10.200.32.0/20"
"#;

    fn state_of(text: &str, host: HostFacts) -> DesiredState {
        let cfg = parse(text).unwrap();
        desired_state(&cfg.local, &cfg.spec, &host)
    }

    #[test]
    fn node_state_has_views_peers_and_routes() {
        let state = state_of(NODE, HostFacts::default());
        assert_eq!(state.config.role, Role::Node as u8);
        assert_eq!(state.config.gateway_ip, [192, 0, 2, 1]);
        assert_eq!(state.config.fabric_port, 4799u16.to_be_bytes());
        let view = state.peer_views[&(Ipv4Addr::new(10, 200, 32, 0), 20)];
        assert_eq!(view.peer_id, 2);
        assert_eq!(
            view.view_to_real.apply([10, 200, 33, 10]),
            [10, 100, 17, 10]
        );
        let peer = state.peers[&2];
        assert_eq!(
            peer.real_to_view.apply([10, 100, 17, 10]),
            [10, 200, 33, 10]
        );
        assert!(peer.real_to_view.matches([10, 100, 31, 1]));
        assert!(!peer.real_to_view.matches([10, 244, 1, 1]));
        assert_eq!(
            state.routes,
            vec![SteeringRoute {
                destination: "10.200.32.0/20".parse().unwrap(),
                via: Ipv4Addr::new(192, 0, 2, 1),
                overhead: 60,
            }]
        );
        assert!(state.node_slices.is_empty() && state.peer_endpoints.is_empty());
        let plain_text = format!("{NODE}transport = \"plain\"\n");
        let plain = state_of(&plain_text, HostFacts::default());
        assert_eq!(plain.routes[0].overhead, 50);
        let view = (Ipv4Addr::new(10, 200, 32, 0), 20);
        assert_eq!(
            state.peer_views[&view].mss_clamp, 0,
            "no clamp before the MTU is known"
        );
        let known = HostFacts {
            underlay_mtu: Some(1500),
            public_mtu: None,
        };
        assert_eq!(state_of(NODE, known).peer_views[&view].mss_clamp, 1400);
        assert_eq!(
            state_of(&plain_text, known).peer_views[&view].mss_clamp,
            1410
        );
    }

    #[test]
    fn plan_upserts_changes_and_deletes_leftovers() {
        let current = BTreeMap::from([(1, "a"), (2, "b"), (3, "c")]);
        let desired = BTreeMap::from([(2, "b"), (3, "C"), (4, "d")]);
        let p = plan(&current, &desired);
        assert_eq!(p.upserts, vec![(3, "C"), (4, "d")]);
        assert_eq!(p.deletes, vec![1]);
        assert_eq!(
            plan(&desired, &desired),
            MapPlan {
                upserts: vec![],
                deletes: vec![]
            }
        );
    }
}
