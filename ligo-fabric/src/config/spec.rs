//! The fabric spec: the cluster-wide desired state a daemon applies (cluster
//! id, pod CIDRs, ports, the gateway's address, node slices, peers). A
//! source (the file today) delivers revisions of it.
//!
//! Peers are validated one at a time ([`admit_peers`]): a problem is reported
//! against the one peer it concerns, so a source that carries a peer per
//! object can leave a bad one out and apply the rest. The file source
//! refuses the whole file instead.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
};

use ipnetwork::Ipv4Network;
use ligo_fabric_common::maps::{MAX_PEERS, MAX_PEER_VIEWS};
use serde::Deserialize;

use super::{err, ConfigError, MAX_CLUSTER_ID};

/// Default UDP port of fabric frames. Chosen to collide with no common CNI:
/// Flannel/Cilium VXLAN 8472, Calico 4789, Geneve 6081/6091.
pub const DEFAULT_FABRIC_PORT: u16 = 4799;
/// WireGuard's customary port.
pub const DEFAULT_WIREGUARD_PORT: u16 = 51820;
/// IPv4 (20) + UDP (8) + WireGuard data message header (16) + AEAD tag (16).
pub const WIREGUARD_OVERHEAD: u32 = 60;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FabricSpec {
    /// Also the VNI our gateway sends with.
    pub cluster_id: u32,
    /// This cluster's real pod CIDRs.
    pub pod_cidrs: Vec<Ipv4Network>,
    pub fabric_port: u16,
    /// UDP port our gateway's WireGuard listens on.
    pub wireguard_port: u16,
    /// Where nodes send fabric frames: the gateway's underlay address
    /// (node role).
    pub gateway_ip: Option<Ipv4Addr>,
    /// Local node pod CIDR slices -> owning node (gateway role).
    pub node_slices: BTreeMap<Ipv4Network, Ipv4Addr>,
    /// Peers by id.
    pub peers: BTreeMap<u32, PeerConfig>,
}

impl FabricSpec {
    pub fn wireguard_peers(&self) -> impl Iterator<Item = &PeerConfig> {
        self.peers
            .values()
            .filter(|p| p.transport == Transport::Wireguard)
    }
}

/// Gateway-to-gateway transport of a peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    #[default]
    Wireguard,
    Plain,
}

impl Transport {
    /// Bytes the gateway-to-gateway hop adds to an inner packet.
    pub fn overhead(self) -> u32 {
        match self {
            // Outer IPv4 + UDP + VXLAN + inner Ethernet.
            Transport::Plain => ligo_fabric_common::headers::ENCAP_LEN as u32,
            // Outer IPv4 + UDP + WireGuard data header and tag.
            Transport::Wireguard => WIREGUARD_OVERHEAD,
        }
    }
}

/// A peer as a source states it, before validation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerInput {
    /// The peer's cluster id (also the VNI that names it on the wire).
    pub id: u32,
    #[serde(default)]
    pub name: Option<String>,
    /// The peer's real pod CIDR.
    pub pod_cidr: String,
    /// Our view of it; defaults to the real CIDR when that collides with
    /// nothing.
    #[serde(default)]
    pub view_cidr: Option<String>,
    /// The peer gateway's public `ip:port` (gateway role).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// How frames travel between the gateways: "wireguard" (the default)
    /// or "plain" (unencrypted; for trusted links and measurements).
    #[serde(default)]
    pub transport: Transport,
    /// The peer gateway's WireGuard public key (base64), gateway role.
    #[serde(default)]
    pub public_key: Option<String>,
    /// Optional WireGuard preshared key file, gateway role.
    #[serde(default)]
    pub preshared_key_file: Option<PathBuf>,
    /// Seconds between keepalives when the link is idle (off when unset).
    #[serde(default)]
    pub persistent_keepalive: Option<u16>,
}

/// A peer's WireGuard settings (gateway role). Public material only: the
/// preshared key stays in its file until the tunnel reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerWireguard {
    pub public_key: [u8; 32],
    pub preshared_key_file: Option<PathBuf>,
    pub persistent_keepalive: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub id: u32,
    pub name: String,
    /// Where the source stated this peer (`peers[0]` in a file): errors
    /// found later, reading its key file say, name it.
    pub origin: String,
    pub pod_cidr: Ipv4Network,
    pub view_cidr: Ipv4Network,
    pub endpoint: Option<SocketAddrV4>,
    pub transport: Transport,
    /// Gateway role with `transport = "wireguard"`.
    pub wireguard: Option<PeerWireguard>,
}

/// What a peer is checked against besides the other peers.
#[derive(Debug, Clone, Copy)]
pub struct PeerContext<'a> {
    pub cluster_id: u32,
    pub pod_cidrs: &'a [Ipv4Network],
    pub is_gateway: bool,
}

/// A peer left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerProblem {
    /// The peer's origin (`peers[1]`).
    pub origin: String,
    pub error: ConfigError,
}

/// Validates each peer alone, then against those admitted before it (in the
/// order given): ids, views and endpoints must not collide. Returns the
/// peers admitted and a problem for each one left out.
pub fn admit_peers(
    ctx: PeerContext<'_>,
    inputs: impl IntoIterator<Item = (String, PeerInput)>,
) -> (BTreeMap<u32, PeerConfig>, Vec<PeerProblem>) {
    let capacity = MAX_PEERS.min(MAX_PEER_VIEWS) as usize;
    let mut admitted: BTreeMap<u32, PeerConfig> = BTreeMap::new();
    let mut problems = Vec::new();
    for (origin, input) in inputs {
        let checked = validate_peer(ctx, &origin, input).and_then(|peer| {
            if admitted.len() >= capacity {
                return Err(err(
                    origin.clone(),
                    format!("no room: the peer maps hold {capacity} peers"),
                ));
            }
            check_collisions(&peer, &admitted)?;
            Ok(peer)
        });
        match checked {
            Ok(peer) => {
                admitted.insert(peer.id, peer);
            }
            Err(error) => problems.push(PeerProblem { origin, error }),
        }
    }
    (admitted, problems)
}

/// The checks that need only the peer and the local cluster.
fn validate_peer(
    ctx: PeerContext<'_>,
    origin: &str,
    p: PeerInput,
) -> Result<PeerConfig, ConfigError> {
    let field = |name: &str| format!("{origin}.{name}");
    if p.id == 0 || p.id > MAX_CLUSTER_ID {
        return Err(err(
            field("id"),
            format!("{} is outside 1..={MAX_CLUSTER_ID}", p.id),
        ));
    }
    if p.id == ctx.cluster_id {
        return Err(err(
            field("id"),
            format!("{} is this cluster's own id", p.id),
        ));
    }
    let pod_cidr = parse_network(&field("pod_cidr"), &p.pod_cidr)?;
    let view_text = p.view_cidr.as_deref().unwrap_or(&p.pod_cidr);
    let view_field = if p.view_cidr.is_some() {
        field("view_cidr")
    } else {
        field("pod_cidr")
    };
    let view_cidr = parse_network(&view_field, view_text)?;
    if view_cidr.prefix() != pod_cidr.prefix() {
        return Err(err(
            view_field,
            format!(
                "prefix length /{} differs from the peer's pod_cidr /{}: a view must be the same size as the CIDR it stands for",
                view_cidr.prefix(),
                pod_cidr.prefix()
            ),
        ));
    }
    if let Some(local) = ctx.pod_cidrs.iter().find(|l| overlaps(**l, view_cidr)) {
        let hint = if p.view_cidr.is_none() {
            "; set view_cidr to a free block of the same size"
        } else {
            ""
        };
        return Err(err(
            view_field,
            format!("view {view_cidr} collides with the local pod CIDR {local}{hint}"),
        ));
    }
    let endpoint = match p.endpoint {
        Some(text) => {
            let ep = text.parse::<SocketAddrV4>().map_err(|_| {
                err(
                    field("endpoint"),
                    format!("{text:?} is not an IPv4 address:port"),
                )
            })?;
            if ep.port() == 0 {
                return Err(err(field("endpoint"), "port 0 is not usable"));
            }
            Some(ep)
        }
        None if ctx.is_gateway => {
            return Err(err(
                field("endpoint"),
                "required on a gateway (the peer gateway's public ip:port)",
            ))
        }
        None => None,
    };
    let wireguard = peer_wireguard(
        &field,
        ctx.is_gateway,
        p.transport,
        p.public_key,
        p.preshared_key_file,
        p.persistent_keepalive,
    )?;
    Ok(PeerConfig {
        id: p.id,
        name: p.name.unwrap_or_else(|| format!("cluster-{}", p.id)),
        origin: origin.to_owned(),
        pod_cidr,
        view_cidr,
        endpoint,
        transport: p.transport,
        wireguard,
    })
}

/// The checks against peers already admitted.
fn check_collisions(
    peer: &PeerConfig,
    admitted: &BTreeMap<u32, PeerConfig>,
) -> Result<(), ConfigError> {
    let field = |name: &str| format!("{}.{name}", peer.origin);
    if admitted.contains_key(&peer.id) {
        return Err(err(field("id"), format!("duplicate peer id {}", peer.id)));
    }
    if let Some(other) = admitted
        .values()
        .find(|o| overlaps(o.view_cidr, peer.view_cidr))
    {
        let view_field = if peer.view_cidr == peer.pod_cidr {
            "pod_cidr"
        } else {
            "view_cidr"
        };
        return Err(err(
            field(view_field),
            format!(
                "view {} overlaps the view {} of peer {}",
                peer.view_cidr, other.view_cidr, other.id
            ),
        ));
    }
    if let Some(ep) = peer.endpoint {
        if let Some(other) = admitted
            .values()
            .find(|o| o.endpoint.map(|e| *e.ip()) == Some(*ep.ip()))
        {
            return Err(err(
                field("endpoint"),
                format!("{} is already the endpoint of peer {}: peers are told apart by endpoint address", ep.ip(), other.id),
            ));
        }
    }
    Ok(())
}

/// The WireGuard part of a peer: required on gateways for `wireguard`
/// peers, refused where it would be ignored.
fn peer_wireguard(
    field: &dyn Fn(&str) -> String,
    is_gateway: bool,
    transport: Transport,
    public_key: Option<String>,
    preshared_key_file: Option<PathBuf>,
    persistent_keepalive: Option<u16>,
) -> Result<Option<PeerWireguard>, ConfigError> {
    let given = [
        ("public_key", public_key.is_some()),
        ("preshared_key_file", preshared_key_file.is_some()),
        ("persistent_keepalive", persistent_keepalive.is_some()),
    ];
    let unused_because = if !is_gateway {
        Some("only gateways use WireGuard settings")
    } else if transport == Transport::Plain {
        Some("only used with transport = \"wireguard\"")
    } else {
        None
    };
    if let Some(why) = unused_because {
        if let Some((name, _)) = given.iter().find(|(_, set)| *set) {
            return Err(err(field(name), why));
        }
        return Ok(None);
    }
    let text = public_key.ok_or_else(|| {
        err(
            field("public_key"),
            "required for transport = \"wireguard\" (the peer gateway's base64 public key)",
        )
    })?;
    let public_key = decode_key(&text)
        .ok_or_else(|| err(field("public_key"), "not a base64 WireGuard key (32 bytes)"))?;
    if persistent_keepalive == Some(0) {
        return Err(err(
            field("persistent_keepalive"),
            "0 seconds; leave it out to turn keepalives off",
        ));
    }
    Ok(Some(PeerWireguard {
        public_key,
        preshared_key_file,
        persistent_keepalive,
    }))
}

/// Checks the cluster id (sent as a 24-bit VNI).
pub(super) fn check_cluster_id(id: u32) -> Result<u32, ConfigError> {
    if id == 0 || id > MAX_CLUSTER_ID {
        return Err(err(
            "cluster_id",
            format!("{id} is outside 1..={MAX_CLUSTER_ID} (it is sent as a 24-bit VNI)"),
        ));
    }
    Ok(id)
}

/// Parses the local pod CIDRs: at least one, none overlapping another.
pub(super) fn parse_pod_cidrs(texts: &[String]) -> Result<Vec<Ipv4Network>, ConfigError> {
    if texts.is_empty() {
        return Err(err("pod_cidrs", "at least one local pod CIDR is required"));
    }
    let mut pod_cidrs: Vec<Ipv4Network> = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let field = format!("pod_cidrs[{i}]");
        let net = parse_network(&field, text)?;
        if let Some(j) = pod_cidrs.iter().position(|o| overlaps(*o, net)) {
            return Err(err(field, format!("{net} overlaps pod_cidrs[{j}]")));
        }
        pod_cidrs.push(net);
    }
    Ok(pod_cidrs)
}

/// Adds a node's pod CIDR slice: inside the pod CIDRs, overlapping no other.
pub(super) fn add_node_slice(
    slices: &mut BTreeMap<Ipv4Network, Ipv4Addr>,
    pod_cidrs: &[Ipv4Network],
    field: &str,
    pod_cidr: &str,
    node_ip: Ipv4Addr,
) -> Result<(), ConfigError> {
    let net = parse_network(field, pod_cidr)?;
    if !pod_cidrs
        .iter()
        .any(|p| p.contains(net.network()) && p.prefix() <= net.prefix())
    {
        return Err(err(field, format!("{net} is not inside any of pod_cidrs")));
    }
    if let Some(other) = slices.keys().find(|o| overlaps(**o, net)) {
        return Err(err(field, format!("{net} overlaps the slice {other}")));
    }
    slices.insert(net, node_ip);
    Ok(())
}

pub(super) fn parse_network(field: &str, text: &str) -> Result<Ipv4Network, ConfigError> {
    let net: Ipv4Network = text
        .parse()
        .map_err(|e| err(field, format!("{text:?} is not an IPv4 CIDR ({e})")))?;
    if net.ip() != net.network() {
        return Err(err(
            field,
            format!(
                "{text} has host bits set; did you mean {}/{}?",
                net.network(),
                net.prefix()
            ),
        ));
    }
    Ok(net)
}

fn overlaps(a: Ipv4Network, b: Ipv4Network) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

/// Decodes a base64 WireGuard key (as `wg genkey`/`wg pubkey` print it).
pub fn decode_key(text: &str) -> Option<[u8; 32]> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()?;
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(id: u32, pod_cidr: &str, view_cidr: Option<&str>) -> PeerInput {
        PeerInput {
            id,
            name: None,
            pod_cidr: pod_cidr.into(),
            view_cidr: view_cidr.map(Into::into),
            endpoint: None,
            transport: Transport::Plain,
            public_key: None,
            preshared_key_file: None,
            persistent_keepalive: None,
        }
    }

    /// A per-object source leaves a bad peer out and keeps the others: the
    /// problem names the one peer it concerns.
    #[test]
    fn one_bad_peer_does_not_block_the_others() {
        let pod_cidrs = ["10.244.0.0/16".parse().unwrap()];
        let ctx = PeerContext {
            cluster_id: 1,
            pod_cidrs: &pod_cidrs,
            is_gateway: false,
        };
        let (admitted, problems) = admit_peers(
            ctx,
            [
                (
                    "Peer/a".to_owned(),
                    input(2, "10.244.0.0/16", Some("10.245.0.0/16")),
                ),
                // Its default view is our own pod CIDR.
                ("Peer/b".to_owned(), input(3, "10.244.0.0/16", None)),
                // Collides with a's view.
                (
                    "Peer/c".to_owned(),
                    input(4, "10.9.0.0/16", Some("10.245.0.0/16")),
                ),
                ("Peer/d".to_owned(), input(5, "10.100.16.0/20", None)),
            ],
        );
        assert_eq!(admitted.keys().copied().collect::<Vec<_>>(), [2, 5]);
        assert_eq!(admitted[&2].origin, "Peer/a");
        let named: Vec<_> = problems
            .iter()
            .map(|p| (p.origin.as_str(), p.error.field.as_str()))
            .collect();
        assert_eq!(
            named,
            [
                ("Peer/b", "Peer/b.pod_cidr"),
                ("Peer/c", "Peer/c.view_cidr")
            ]
        );
        assert!(problems[1]
            .error
            .problem
            .contains("overlaps the view 10.245.0.0/16 of peer 2"));
    }
}
