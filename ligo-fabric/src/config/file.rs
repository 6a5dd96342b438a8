//! The TOML configuration file: one file holds a daemon's local settings
//! and a revision of the fabric spec. A bad file is refused whole, with
//! the field and the problem named.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use ligo_fabric_common::maps::MAX_NODE_SLICES;
use serde::Deserialize;

use super::{
    err,
    local::{self, GatewayLocal, IngressHook, LocalConfig, LocalRole, NodeLocal, PodDelivery},
    spec::{self, admit_peers, FabricSpec, PeerContext, PeerInput},
    ConfigError, Configuration, DEFAULT_FABRIC_PORT, DEFAULT_PIN_DIR, DEFAULT_WIREGUARD_PORT,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    cluster_id: u32,
    /// This cluster's real pod CIDRs.
    pod_cidrs: Vec<String>,
    #[serde(default)]
    fabric_port: Option<u16>,
    /// bpffs directory where maps are pinned (one per daemon).
    #[serde(default)]
    pin_dir: Option<PathBuf>,
    /// `ip:port` for `/metrics`, `/healthz` and `/readyz`.
    #[serde(default)]
    metrics_address: Option<String>,
    #[serde(default)]
    node: Option<NodeSection>,
    #[serde(default)]
    gateway: Option<GatewaySection>,
    #[serde(default)]
    peers: Vec<PeerInput>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeSection {
    /// Interface toward the gateway (the node's underlay NIC).
    uplink: String,
    underlay_ip: Ipv4Addr,
    gateway_ip: Ipv4Addr,
    /// Where arriving fabric frames are decapsulated: "xdp", "tc", or
    /// "auto" (the default: tc on veth uplinks, xdp elsewhere).
    #[serde(default)]
    ingress: IngressHook,
    /// How arriving packets reach pods: "direct" (the default) or "stack".
    #[serde(default)]
    pod_delivery: PodDelivery,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GatewaySection {
    underlay_interface: String,
    underlay_ip: Ipv4Addr,
    public_interface: String,
    public_ip: Ipv4Addr,
    #[serde(default)]
    node_slices: Vec<NodeSliceSection>,
    /// File holding this gateway's WireGuard private key (base64, as `wg
    /// genkey` writes it); must not be readable by group or others.
    #[serde(default)]
    private_key_file: Option<PathBuf>,
    /// UDP port WireGuard listens on, on `public_ip`.
    #[serde(default)]
    wireguard_port: Option<u16>,
    /// Unix socket where the tunnel process (`ligo-fabric tunnel`) serves
    /// its status to the daemon (metrics, `inspect tunnels`).
    #[serde(default)]
    wireguard_status_socket: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeSliceSection {
    node_ip: Ipv4Addr,
    pod_cidr: String,
}

/// Parses and validates a TOML configuration.
pub fn parse(text: &str) -> Result<Configuration, ConfigError> {
    let file: FileConfig = toml::from_str(text).map_err(|e| {
        let field = e
            .span()
            .map(|s| format!("line {}", text[..s.start].matches('\n').count() + 1))
            .unwrap_or_else(|| "config".into());
        err(field, e.message().to_string())
    })?;
    validate(file)
}

/// What the role section gives: the local role and its part of the spec.
struct RoleParts {
    role: LocalRole,
    gateway_ip: Option<Ipv4Addr>,
    node_slices: BTreeMap<ipnetwork::Ipv4Network, Ipv4Addr>,
    wireguard_port: u16,
}

fn validate(file: FileConfig) -> Result<Configuration, ConfigError> {
    let cluster_id = spec::check_cluster_id(file.cluster_id)?;
    let pod_cidrs = spec::parse_pod_cidrs(&file.pod_cidrs)?;
    let metrics_address = local::parse_metrics_address(file.metrics_address.as_deref())?;
    let fabric_port = file.fabric_port.unwrap_or(DEFAULT_FABRIC_PORT);
    if fabric_port == 0 {
        return Err(err("fabric_port", "0 is not a usable UDP port"));
    }
    let parts = match (file.node, file.gateway) {
        (Some(node), None) => node_role(node)?,
        (None, Some(gw)) => gateway_role(gw, &pod_cidrs, fabric_port)?,
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
    let ctx = PeerContext {
        cluster_id,
        pod_cidrs: &pod_cidrs,
        is_gateway: matches!(parts.role, LocalRole::Gateway(_)),
    };
    let inputs = file
        .peers
        .into_iter()
        .enumerate()
        .map(|(i, p)| (format!("peers[{i}]"), p));
    let (peers, problems) = admit_peers(ctx, inputs);
    if let Some(first) = problems.into_iter().next() {
        return Err(first.error);
    }
    if let LocalRole::Gateway(gw) = &parts.role {
        if let Some(peer) = peers
            .values()
            .find(|p| p.transport == spec::Transport::Wireguard)
        {
            if gw.private_key_file.is_none() {
                return Err(err(
                    "gateway.private_key_file",
                    format!("required: peer {} uses transport \"wireguard\"", peer.id),
                ));
            }
        }
    }
    Ok(Configuration {
        local: LocalConfig {
            pin_dir: file
                .pin_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_DIR)),
            metrics_address,
            role: parts.role,
        },
        spec: FabricSpec {
            cluster_id,
            pod_cidrs,
            fabric_port,
            wireguard_port: parts.wireguard_port,
            gateway_ip: parts.gateway_ip,
            node_slices: parts.node_slices,
            peers,
        },
    })
}

fn node_role(node: NodeSection) -> Result<RoleParts, ConfigError> {
    Ok(RoleParts {
        role: LocalRole::Node(NodeLocal {
            uplink: local::non_empty("node.uplink", node.uplink)?,
            underlay_ip: node.underlay_ip,
            ingress: node.ingress,
            pod_delivery: node.pod_delivery,
        }),
        gateway_ip: Some(node.gateway_ip),
        node_slices: BTreeMap::new(),
        wireguard_port: DEFAULT_WIREGUARD_PORT,
    })
}

fn gateway_role(
    gw: GatewaySection,
    pod_cidrs: &[ipnetwork::Ipv4Network],
    fabric_port: u16,
) -> Result<RoleParts, ConfigError> {
    if gw.node_slices.len() > MAX_NODE_SLICES as usize {
        return Err(err(
            "gateway.node_slices",
            format!(
                "{} entries exceed the map capacity of {MAX_NODE_SLICES}",
                gw.node_slices.len()
            ),
        ));
    }
    let mut node_slices = BTreeMap::new();
    for (i, slice) in gw.node_slices.iter().enumerate() {
        spec::add_node_slice(
            &mut node_slices,
            pod_cidrs,
            &format!("gateway.node_slices[{i}].pod_cidr"),
            &slice.pod_cidr,
            slice.node_ip,
        )?;
    }
    let wireguard_port = gw.wireguard_port.unwrap_or(DEFAULT_WIREGUARD_PORT);
    if wireguard_port == 0 || wireguard_port == fabric_port {
        return Err(err(
            "gateway.wireguard_port",
            format!("{wireguard_port} is not usable (0, or the fabric_port {fabric_port})"),
        ));
    }
    Ok(RoleParts {
        role: LocalRole::Gateway(GatewayLocal {
            underlay_interface: local::non_empty(
                "gateway.underlay_interface",
                gw.underlay_interface,
            )?,
            underlay_ip: gw.underlay_ip,
            public_interface: local::non_empty("gateway.public_interface", gw.public_interface)?,
            public_ip: gw.public_ip,
            private_key_file: gw.private_key_file,
            status_socket: local::status_socket(gw.wireguard_status_socket)?,
        }),
        gateway_ip: None,
        node_slices,
        wireguard_port,
    })
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
        assert_eq!(node.spec.fabric_port, DEFAULT_FABRIC_PORT);
        assert_eq!(node.spec.gateway_ip, Some(Ipv4Addr::new(192, 0, 2, 1)));
        assert_eq!(
            node.spec.peers[&2].view_cidr,
            "10.245.0.0/16".parse().unwrap()
        );
        assert_eq!(node.spec.peers[&2].origin, "peers[0]");
        assert_eq!(node.local.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
        let gw = parse(GATEWAY).unwrap();
        assert_eq!(gw.spec.node_slices.len(), 2);
        assert_eq!(gw.spec.gateway_ip, None);
        assert_eq!(
            gw.spec.peers[&2].endpoint,
            Some("203.0.113.2:51820".parse().unwrap())
        );
        assert_eq!(gw.spec.peers[&2].transport, spec::Transport::Wireguard);
        let wg = gw.spec.peers[&2].wireguard.as_ref().unwrap();
        assert_eq!(wg.persistent_keepalive, Some(5));
        assert_eq!(wg.public_key[..3], [0x1c, 0x88, 0x28]);
        assert_eq!(gw.spec.wireguard_port, DEFAULT_WIREGUARD_PORT);
        let LocalRole::Gateway(local) = &gw.local.role else {
            panic!("not a gateway")
        };
        assert_eq!(
            local.private_key_file,
            Some(PathBuf::from("/etc/ligo/wireguard.key"))
        );
        assert_eq!(
            local.status_socket,
            PathBuf::from(super::super::DEFAULT_WIREGUARD_STATUS_SOCKET)
        );
        let plain = parse(
            &GATEWAY
                .replace("public_key = \"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=\"\npersistent_keepalive = 5\n", "transport = \"plain\"\n")
                .replace("private_key_file = \"/etc/ligo/wireguard.key\"\n", ""),
        )
        .unwrap();
        assert_eq!(plain.spec.peers[&2].transport, spec::Transport::Plain);
        assert_eq!(plain.spec.wireguard_peers().count(), 0);
    }

    #[test]
    fn view_defaults_to_real_cidr_when_free() {
        let text = NODE.replace(
            "pod_cidr = \"10.244.0.0/16\"\nview_cidr = \"10.245.0.0/16\"",
            "pod_cidr = \"10.100.16.0/20\"",
        );
        let cfg = parse(&text).unwrap();
        assert_eq!(cfg.spec.peers[&2].view_cidr, cfg.spec.peers[&2].pod_cidr);
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
