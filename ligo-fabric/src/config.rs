//! The daemon's configuration file (TOML) and its validation.
//!
//! Validation is complete before anything is applied: a config either turns
//! into a [`ValidConfig`] or into a [`ConfigError`] naming the field and the
//! problem.

use std::{
    collections::BTreeMap,
    fmt,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
};

use ipnetwork::Ipv4Network;
use ligo_fabric_common::maps::{MAX_NODE_SLICES, MAX_PEERS, MAX_PEER_VIEWS};
use serde::Deserialize;

/// Default UDP port of fabric frames. Chosen to collide with no common CNI:
/// Flannel/Cilium VXLAN 8472, Calico 4789, Geneve 6081/6091.
pub const DEFAULT_FABRIC_PORT: u16 = 4799;
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/ligo";
/// Where `/metrics`, `/healthz` and `/readyz` are served by default.
pub const DEFAULT_METRICS_ADDRESS: &str = "0.0.0.0:9477";
/// VNIs are 24 bits; 0 is reserved as "no peer".
const MAX_CLUSTER_ID: u32 = 0x00ff_ffff;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub cluster_id: u32,
    /// This cluster's real pod CIDRs.
    pub pod_cidrs: Vec<String>,
    #[serde(default)]
    pub fabric_port: Option<u16>,
    /// bpffs directory where maps are pinned (one per daemon).
    #[serde(default)]
    pub pin_dir: Option<PathBuf>,
    /// `ip:port` for `/metrics`, `/healthz` and `/readyz`.
    #[serde(default)]
    pub metrics_address: Option<String>,
    #[serde(default)]
    pub node: Option<NodeSection>,
    #[serde(default)]
    pub gateway: Option<GatewaySection>,
    #[serde(default)]
    pub peers: Vec<PeerSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// Interface toward the gateway (the node's underlay NIC).
    pub uplink: String,
    pub underlay_ip: Ipv4Addr,
    pub gateway_ip: Ipv4Addr,
    /// Where arriving fabric frames are decapsulated: "xdp", "tc", or
    /// "auto" (the default: tc on veth uplinks, xdp elsewhere).
    #[serde(default)]
    pub ingress: IngressHook,
}

/// The hook of the node ingress program.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IngressHook {
    #[default]
    Auto,
    Xdp,
    Tc,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    pub underlay_interface: String,
    pub underlay_ip: Ipv4Addr,
    pub public_interface: String,
    pub public_ip: Ipv4Addr,
    #[serde(default)]
    pub node_slices: Vec<NodeSliceSection>,
    /// File holding this gateway's WireGuard private key (base64, as `wg
    /// genkey` writes it); must not be readable by group or others.
    #[serde(default)]
    pub private_key_file: Option<PathBuf>,
    /// UDP port WireGuard listens on, on `public_ip`.
    #[serde(default)]
    pub wireguard_port: Option<u16>,
    /// Unix socket where the tunnel process (`ligo-fabric tunnel`) serves
    /// its status to the daemon (metrics, `inspect tunnels`).
    #[serde(default)]
    pub wireguard_status_socket: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSliceSection {
    pub node_ip: Ipv4Addr,
    pub pod_cidr: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSection {
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

/// IPv4 (20) + UDP (8) + WireGuard data message header (16) + AEAD tag (16).
pub const WIREGUARD_OVERHEAD: u32 = 60;
/// WireGuard's customary port.
pub const DEFAULT_WIREGUARD_PORT: u16 = 51820;
pub const DEFAULT_WIREGUARD_STATUS_SOCKET: &str = "/run/ligo-fabric/wireguard.sock";

/// A configuration error: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

impl std::error::Error for ConfigError {}

fn err(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        problem: problem.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleConfig {
    Node {
        uplink: String,
        underlay_ip: Ipv4Addr,
        gateway_ip: Ipv4Addr,
        ingress: IngressHook,
    },
    Gateway {
        underlay_interface: String,
        underlay_ip: Ipv4Addr,
        public_interface: String,
        public_ip: Ipv4Addr,
        /// Local node pod CIDR slices -> owning node.
        node_slices: BTreeMap<Ipv4Network, Ipv4Addr>,
        /// Present when at least one peer uses WireGuard.
        wireguard: Option<GatewayWireguard>,
    },
}

/// This gateway's WireGuard settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayWireguard {
    pub private_key_file: PathBuf,
    pub port: u16,
    pub status_socket: PathBuf,
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
    pub pod_cidr: Ipv4Network,
    pub view_cidr: Ipv4Network,
    pub endpoint: Option<SocketAddrV4>,
    pub transport: Transport,
    /// Gateway role with `transport = "wireguard"`.
    pub wireguard: Option<PeerWireguard>,
}

/// A configuration that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidConfig {
    pub cluster_id: u32,
    pub pod_cidrs: Vec<Ipv4Network>,
    pub fabric_port: u16,
    pub pin_dir: PathBuf,
    pub metrics_address: SocketAddr,
    pub role: RoleConfig,
    /// Peers by id.
    pub peers: BTreeMap<u32, PeerConfig>,
}

/// Parses and validates a TOML configuration.
pub fn parse(text: &str) -> Result<ValidConfig, ConfigError> {
    let file: FileConfig = toml::from_str(text).map_err(|e| {
        let field = e
            .span()
            .map(|s| format!("line {}", text[..s.start].matches('\n').count() + 1))
            .unwrap_or_else(|| "config".into());
        err(field, e.message().to_string())
    })?;
    validate(file)
}

fn parse_network(field: &str, text: &str) -> Result<Ipv4Network, ConfigError> {
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

pub fn validate(file: FileConfig) -> Result<ValidConfig, ConfigError> {
    if file.cluster_id == 0 || file.cluster_id > MAX_CLUSTER_ID {
        return Err(err(
            "cluster_id",
            format!(
                "{} is outside 1..={MAX_CLUSTER_ID} (it is sent as a 24-bit VNI)",
                file.cluster_id
            ),
        ));
    }
    if file.pod_cidrs.is_empty() {
        return Err(err("pod_cidrs", "at least one local pod CIDR is required"));
    }
    let mut pod_cidrs = Vec::new();
    for (i, text) in file.pod_cidrs.iter().enumerate() {
        let field = format!("pod_cidrs[{i}]");
        let net = parse_network(&field, text)?;
        if let Some(j) = pod_cidrs.iter().position(|o| overlaps(*o, net)) {
            return Err(err(field, format!("{net} overlaps pod_cidrs[{j}]")));
        }
        pod_cidrs.push(net);
    }
    let metrics_text = file
        .metrics_address
        .as_deref()
        .unwrap_or(DEFAULT_METRICS_ADDRESS);
    let metrics_address: SocketAddr = metrics_text.parse().map_err(|_| {
        err(
            "metrics_address",
            format!("{metrics_text:?} is not an ip:port"),
        )
    })?;
    let fabric_port = file.fabric_port.unwrap_or(DEFAULT_FABRIC_PORT);
    if fabric_port == 0 {
        return Err(err("fabric_port", "0 is not a usable UDP port"));
    }

    let mut gateway_keys = None;
    let mut role = match (file.node, file.gateway) {
        (Some(node), None) => RoleConfig::Node {
            uplink: non_empty("node.uplink", node.uplink)?,
            underlay_ip: node.underlay_ip,
            gateway_ip: node.gateway_ip,
            ingress: node.ingress,
        },
        (None, Some(gw)) => {
            let mut node_slices = BTreeMap::new();
            if gw.node_slices.len() > MAX_NODE_SLICES as usize {
                return Err(err(
                    "gateway.node_slices",
                    format!(
                        "{} entries exceed the map capacity of {MAX_NODE_SLICES}",
                        gw.node_slices.len()
                    ),
                ));
            }
            for (i, slice) in gw.node_slices.iter().enumerate() {
                let field = format!("gateway.node_slices[{i}].pod_cidr");
                let net = parse_network(&field, &slice.pod_cidr)?;
                if !pod_cidrs
                    .iter()
                    .any(|p| p.contains(net.network()) && p.prefix() <= net.prefix())
                {
                    return Err(err(field, format!("{net} is not inside any of pod_cidrs")));
                }
                if let Some(other) = node_slices.keys().find(|o| overlaps(**o, net)) {
                    return Err(err(field, format!("{net} overlaps the slice {other}")));
                }
                node_slices.insert(net, slice.node_ip);
            }
            let wireguard_port = gw.wireguard_port.unwrap_or(DEFAULT_WIREGUARD_PORT);
            if wireguard_port == 0 || wireguard_port == fabric_port {
                return Err(err(
                    "gateway.wireguard_port",
                    format!("{wireguard_port} is not usable (0, or the fabric_port {fabric_port})"),
                ));
            }
            let status_socket = gw
                .wireguard_status_socket
                .unwrap_or_else(|| PathBuf::from(DEFAULT_WIREGUARD_STATUS_SOCKET));
            if !status_socket.is_absolute() {
                return Err(err(
                    "gateway.wireguard_status_socket",
                    format!("{} is not an absolute path", status_socket.display()),
                ));
            }
            gateway_keys = Some((gw.private_key_file, wireguard_port, status_socket));
            RoleConfig::Gateway {
                underlay_interface: non_empty("gateway.underlay_interface", gw.underlay_interface)?,
                underlay_ip: gw.underlay_ip,
                public_interface: non_empty("gateway.public_interface", gw.public_interface)?,
                public_ip: gw.public_ip,
                node_slices,
                wireguard: None,
            }
        }
        (Some(_), Some(_)) => {
            return Err(err(
                "node/gateway",
                "set exactly one of [node] and [gateway], not both",
            ))
        }
        (None, None) => {
            return Err(err(
                "node/gateway",
                "one of [node] or [gateway] is required",
            ))
        }
    };
    let is_gateway = matches!(role, RoleConfig::Gateway { .. });

    if file.peers.len() > MAX_PEERS as usize || file.peers.len() > MAX_PEER_VIEWS as usize {
        return Err(err(
            "peers",
            format!(
                "{} peers exceed the map capacity of {MAX_PEERS}",
                file.peers.len()
            ),
        ));
    }
    let mut peers: BTreeMap<u32, PeerConfig> = BTreeMap::new();
    for (i, p) in file.peers.into_iter().enumerate() {
        let field = |name: &str| format!("peers[{i}].{name}");
        if p.id == 0 || p.id > MAX_CLUSTER_ID {
            return Err(err(
                field("id"),
                format!("{} is outside 1..={MAX_CLUSTER_ID}", p.id),
            ));
        }
        if p.id == file.cluster_id {
            return Err(err(
                field("id"),
                format!("{} is this cluster's own id", p.id),
            ));
        }
        if peers.contains_key(&p.id) {
            return Err(err(field("id"), format!("duplicate peer id {}", p.id)));
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
        if let Some(local) = pod_cidrs.iter().find(|l| overlaps(**l, view_cidr)) {
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
        if let Some(other) = peers.values().find(|o| overlaps(o.view_cidr, view_cidr)) {
            return Err(err(
                view_field,
                format!(
                    "view {view_cidr} overlaps the view {} of peer {}",
                    other.view_cidr, other.id
                ),
            ));
        }
        let endpoint = match p.endpoint {
            Some(text) => Some(text.parse::<SocketAddrV4>().map_err(|_| {
                err(
                    field("endpoint"),
                    format!("{text:?} is not an IPv4 address:port"),
                )
            })?),
            None if is_gateway => {
                return Err(err(
                    field("endpoint"),
                    "required on a gateway (the peer gateway's public ip:port)",
                ))
            }
            None => None,
        };
        if let Some(ep) = endpoint {
            if ep.port() == 0 {
                return Err(err(field("endpoint"), "port 0 is not usable"));
            }
            if let Some(other) = peers
                .values()
                .find(|o| o.endpoint.map(|e| *e.ip()) == Some(*ep.ip()))
            {
                return Err(err(
                    field("endpoint"),
                    format!("{} is already the endpoint of peer {}: peers are told apart by endpoint address", ep.ip(), other.id),
                ));
            }
        }
        let wireguard = peer_wireguard(
            &field,
            is_gateway,
            p.transport,
            p.public_key,
            p.preshared_key_file,
            p.persistent_keepalive,
        )?;
        peers.insert(
            p.id,
            PeerConfig {
                id: p.id,
                name: p.name.unwrap_or_else(|| format!("cluster-{}", p.id)),
                pod_cidr,
                view_cidr,
                endpoint,
                transport: p.transport,
                wireguard,
            },
        );
    }
    if let (RoleConfig::Gateway { wireguard, .. }, Some((key_file, port, status_socket))) =
        (&mut role, gateway_keys)
    {
        if let Some(peer) = peers.values().find(|p| p.transport == Transport::Wireguard) {
            let private_key_file = key_file.ok_or_else(|| {
                err(
                    "gateway.private_key_file",
                    format!("required: peer {} uses transport \"wireguard\"", peer.id),
                )
            })?;
            *wireguard = Some(GatewayWireguard {
                private_key_file,
                port,
                status_socket,
            });
        }
    }

    Ok(ValidConfig {
        cluster_id: file.cluster_id,
        pod_cidrs,
        fabric_port,
        pin_dir: file
            .pin_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_DIR)),
        metrics_address,
        role,
        peers,
    })
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

/// Decodes a base64 WireGuard key (as `wg genkey`/`wg pubkey` print it).
pub fn decode_key(text: &str) -> Option<[u8; 32]> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()?;
    bytes.try_into().ok()
}

fn non_empty(field: &str, value: String) -> Result<String, ConfigError> {
    if value.trim().is_empty() {
        return Err(err(field, "must not be empty"));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: &str = r#"
cluster_id = 1
pod_cidrs = ["10.244.0.0/16"]
[node]
uplink = "eth0"
underlay_ip = "192.0.2.11"
gateway_ip = "192.0.2.1"
[[peers]]
id = 2
pod_cidr = "10.244.0.0/16"
view_cidr = "10.245.0.0/16"
"#;

    const GATEWAY: &str = r#"
cluster_id = 1
pod_cidrs = ["10.244.0.0/16"]
fabric_port = 4800
[gateway]
underlay_interface = "eth0"
underlay_ip = "192.0.2.1"
public_interface = "eth1"
public_ip = "203.0.113.1"
private_key_file = "/etc/ligo/wireguard.key"
node_slices = [
  { node_ip = "192.0.2.11", pod_cidr = "10.244.1.0/24" },
  { node_ip = "192.0.2.12", pod_cidr = "10.244.2.0/24" },
]
[[peers]]
id = 2
pod_cidr = "10.100.16.0/20"
view_cidr = "10.200.32.0/20"
endpoint = "203.0.113.2:51820"
public_key = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
persistent_keepalive = 5
"#;

    #[test]
    fn valid_node_and_gateway_configs_parse() {
        let node = parse(NODE).unwrap();
        assert_eq!(node.fabric_port, DEFAULT_FABRIC_PORT);
        assert_eq!(node.peers[&2].view_cidr, "10.245.0.0/16".parse().unwrap());
        let gw = parse(GATEWAY).unwrap();
        let RoleConfig::Gateway { node_slices, .. } = &gw.role else {
            panic!("not a gateway")
        };
        assert_eq!(node_slices.len(), 2);
        assert_eq!(
            gw.peers[&2].endpoint,
            Some("203.0.113.2:51820".parse().unwrap())
        );
        assert_eq!(gw.peers[&2].transport, Transport::Wireguard);
        let wg = gw.peers[&2].wireguard.as_ref().unwrap();
        assert_eq!(wg.persistent_keepalive, Some(5));
        assert_eq!(wg.public_key[..3], [0x1c, 0x88, 0x28]);
        let RoleConfig::Gateway { wireguard, .. } = &gw.role else {
            panic!("not a gateway")
        };
        assert_eq!(
            wireguard,
            &Some(GatewayWireguard {
                private_key_file: "/etc/ligo/wireguard.key".into(),
                port: DEFAULT_WIREGUARD_PORT,
                status_socket: DEFAULT_WIREGUARD_STATUS_SOCKET.into(),
            })
        );
        let plain = parse(
            &GATEWAY
                .replace("public_key = \"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=\"\npersistent_keepalive = 5\n", "transport = \"plain\"\n")
                .replace("private_key_file = \"/etc/ligo/wireguard.key\"\n", ""),
        )
        .unwrap();
        assert_eq!(plain.peers[&2].transport, Transport::Plain);
        assert!(matches!(
            plain.role,
            RoleConfig::Gateway {
                wireguard: None,
                ..
            }
        ));
    }

    #[test]
    fn view_defaults_to_real_cidr_when_free() {
        let text = NODE.replace(
            "pod_cidr = \"10.244.0.0/16\"\nview_cidr = \"10.245.0.0/16\"",
            "pod_cidr = \"10.100.16.0/20\"",
        );
        let cfg = parse(&text).unwrap();
        assert_eq!(cfg.peers[&2].view_cidr, cfg.peers[&2].pod_cidr);
    }

    /// Each invalid input must name the offending field and say what is wrong.
    #[test]
    fn invalid_configs_name_the_field_and_the_problem() {
        let cases: &[(&str, &str, &str, &str)] = &[
            (NODE, "view_cidr = \"10.245.0.0/16\"", "view_cidr = \"10.245.0.0/20\"", "peers[0].view_cidr: prefix length /20 differs"),
            (NODE, "view_cidr = \"10.245.0.0/16\"", "view_cidr = \"10.244.0.0/16\"", "peers[0].view_cidr: view 10.244.0.0/16 collides with the local pod CIDR"),
            (NODE, "view_cidr = \"10.245.0.0/16\"\n", "", "peers[0].pod_cidr: view 10.244.0.0/16 collides with the local pod CIDR 10.244.0.0/16; set view_cidr"),
            (NODE, "view_cidr = \"10.245.0.0/16\"", "view_cidr = \"10.245.1.0/16\"", "peers[0].view_cidr: 10.245.1.0/16 has host bits set; did you mean 10.245.0.0/16?"),
            (NODE, "id = 2", "id = 1", "peers[0].id: 1 is this cluster's own id"),
            (NODE, "cluster_id = 1", "cluster_id = 16777216", "cluster_id: 16777216 is outside"),
            (NODE, "uplink = \"eth0\"", "uplink = \"eth0\"\nmtu = 1", "unknown field `mtu`"),
            (NODE, "underlay_ip = \"192.0.2.11\"", "underlay_ip = \"192.0.2.311\"", "invalid IPv4 address"),
            (NODE, "[node]", "[gateway]", "line 7: unknown field `gateway_ip`"),
            (NODE, "pod_cidrs = [\"10.244.0.0/16\"]", "pod_cidrs = []", "pod_cidrs: at least one"),
            (NODE, "cluster_id = 1", "cluster_id = 1\nmetrics_address = \"localhost\"", "metrics_address: \"localhost\" is not an ip:port"),
            (GATEWAY, "endpoint = \"203.0.113.2:51820\"", "endpoint = \"peer-gw:4800\"", "peers[0].endpoint: \"peer-gw:4800\" is not an IPv4 address:port"),
            (GATEWAY, "endpoint = \"203.0.113.2:51820\"\n", "", "peers[0].endpoint: required on a gateway"),
            (GATEWAY, "public_key = \"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=\"\n", "", "peers[0].public_key: required for transport = \"wireguard\""),
            (GATEWAY, "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=", "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8y", "peers[0].public_key: not a base64 WireGuard key"),
            (GATEWAY, "private_key_file = \"/etc/ligo/wireguard.key\"\n", "", "gateway.private_key_file: required: peer 2 uses transport \"wireguard\""),
            (GATEWAY, "private_key_file = \"/etc/ligo/wireguard.key\"\n", "private_key_file = \"/etc/ligo/wireguard.key\"\nwireguard_status_socket = \"wg.sock\"\n", "gateway.wireguard_status_socket: wg.sock is not an absolute path"),
            (GATEWAY, "persistent_keepalive = 5", "persistent_keepalive = 5\ntransport = \"plain\"", "peers[0].public_key: only used with transport = \"wireguard\""),
            (GATEWAY, "persistent_keepalive = 5", "persistent_keepalive = 0", "peers[0].persistent_keepalive: 0 seconds"),
            (GATEWAY, "public_ip = \"203.0.113.1\"", "public_ip = \"203.0.113.1\"\nwireguard_port = 4800", "gateway.wireguard_port: 4800 is not usable (0, or the fabric_port 4800)"),
            (GATEWAY, "persistent_keepalive = 5", "persistent_keepalive = 5\ntransport = \"quantum\"", "unknown variant `quantum`"),
            (NODE, "view_cidr = \"10.245.0.0/16\"", "view_cidr = \"10.245.0.0/16\"\npublic_key = \"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=\"", "peers[0].public_key: only gateways use WireGuard settings"),
            (GATEWAY, "10.244.2.0/24", "10.244.1.128/25", "gateway.node_slices[1].pod_cidr: 10.244.1.128/25 overlaps the slice 10.244.1.0/24"),
            (GATEWAY, "10.244.2.0/24", "10.99.2.0/24", "gateway.node_slices[1].pod_cidr: 10.99.2.0/24 is not inside any of pod_cidrs"),
        ];
        for (base, from, to, expected) in cases {
            assert!(base.contains(from), "test case base lacks {from:?}");
            let text = base.replacen(from, to, 1);
            let error = parse(&text)
                .expect_err(&format!("accepted: {to:?}"))
                .to_string();
            assert!(
                error.contains(expected),
                "for {to:?}: got {error:?}, want {expected:?}"
            );
        }
    }

    #[test]
    fn duplicate_peer_ids_and_overlapping_views_are_refused() {
        let dup = format!("{NODE}\n[[peers]]\nid = 2\npod_cidr = \"10.1.0.0/16\"\n");
        assert_eq!(
            parse(&dup).unwrap_err().to_string(),
            "peers[1].id: duplicate peer id 2"
        );
        let overlap = format!("{NODE}\n[[peers]]\nid = 3\npod_cidr = \"10.244.0.0/17\"\nview_cidr = \"10.245.128.0/17\"\n");
        let e = parse(&overlap).unwrap_err().to_string();
        assert!(e.starts_with("peers[1].view_cidr: view 10.245.128.0/17 overlaps the view 10.245.0.0/16 of peer 2"), "{e}");
    }

    #[test]
    fn both_roles_are_refused() {
        let text = format!("{NODE}\n[gateway]\nunderlay_interface=\"a\"\nunderlay_ip=\"1.1.1.1\"\npublic_interface=\"b\"\npublic_ip=\"2.2.2.2\"\n");
        assert!(parse(&text)
            .unwrap_err()
            .to_string()
            .starts_with("node/gateway: set exactly one"));
    }
}
