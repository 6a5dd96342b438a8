//! This daemon's own settings: which host it runs on and how it talks to
//! it. Fixed for the daemon's lifetime: a change needs a restart.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
};

use serde::Deserialize;

use super::{err, ConfigError};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/ligo";
/// Where `/metrics`, `/healthz` and `/readyz` are served by default.
pub const DEFAULT_METRICS_ADDRESS: &str = "0.0.0.0:9477";
pub const DEFAULT_WIREGUARD_STATUS_SOCKET: &str = "/run/ligo-fabric/wireguard.sock";

/// The hook of the node ingress program.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IngressHook {
    #[default]
    Auto,
    Xdp,
    Tc,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalConfig {
    /// bpffs directory where maps and links are pinned (one per daemon).
    pub pin_dir: PathBuf,
    /// `ip:port` for `/metrics`, `/healthz` and `/readyz`.
    pub metrics_address: SocketAddr,
    pub role: LocalRole,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalRole {
    Node(NodeLocal),
    Gateway(GatewayLocal),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLocal {
    /// Interface toward the gateway (the node's underlay NIC).
    pub uplink: String,
    pub underlay_ip: Ipv4Addr,
    pub ingress: IngressHook,
    pub pod_delivery: PodDelivery,
}

/// How arriving packets reach a pod on this node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PodDelivery {
    /// Straight into the pod's namespace (`bpf_redirect_peer`), skipping
    /// the node's stack: fastest, but the node's netfilter never sees the
    /// packet, so a conntrack-based FORWARD policy (kube-proxy's iptables
    /// mode drops ctstate INVALID) refuses the pod's answers.
    #[default]
    Direct,
    /// Through the node's stack, as any routed packet.
    Stack,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayLocal {
    /// Interface toward the nodes.
    pub underlay_interface: String,
    pub underlay_ip: Ipv4Addr,
    /// Interface toward peer gateways.
    pub public_interface: String,
    pub public_ip: Ipv4Addr,
    /// This gateway's WireGuard private key (base64, as `wg genkey`
    /// writes it); needed once a peer uses WireGuard.
    pub private_key_file: Option<PathBuf>,
    /// Where the tunnel process (`ligo-fabric tunnel`) serves its status
    /// to the daemon.
    pub status_socket: PathBuf,
}

/// An interface the local configuration names, with the field that names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamedInterface<'a> {
    pub field: &'static str,
    pub name: &'a str,
}

impl LocalConfig {
    pub fn is_gateway(&self) -> bool {
        matches!(self.role, LocalRole::Gateway(_))
    }

    /// The interface toward the underlay (the node's uplink or the
    /// gateway's interface toward its nodes).
    pub fn underlay_interface(&self) -> NamedInterface<'_> {
        match &self.role {
            LocalRole::Node(node) => NamedInterface {
                field: "node.uplink",
                name: &node.uplink,
            },
            LocalRole::Gateway(gw) => NamedInterface {
                field: "gateway.underlay_interface",
                name: &gw.underlay_interface,
            },
        }
    }

    /// The gateway's interface toward peer gateways.
    pub fn public_interface(&self) -> Option<NamedInterface<'_>> {
        match &self.role {
            LocalRole::Node(_) => None,
            LocalRole::Gateway(gw) => Some(NamedInterface {
                field: "gateway.public_interface",
                name: &gw.public_interface,
            }),
        }
    }

    pub fn underlay_ip(&self) -> Ipv4Addr {
        match &self.role {
            LocalRole::Node(node) => node.underlay_ip,
            LocalRole::Gateway(gw) => gw.underlay_ip,
        }
    }
}

pub(super) fn parse_metrics_address(text: Option<&str>) -> Result<SocketAddr, ConfigError> {
    let text = text.unwrap_or(DEFAULT_METRICS_ADDRESS);
    text.parse()
        .map_err(|_| err("metrics_address", format!("{text:?} is not an ip:port")))
}

pub(super) fn status_socket(path: Option<PathBuf>) -> Result<PathBuf, ConfigError> {
    let path = path.unwrap_or_else(|| PathBuf::from(DEFAULT_WIREGUARD_STATUS_SOCKET));
    if !path.is_absolute() {
        return Err(err(
            "gateway.wireguard_status_socket",
            format!("{} is not an absolute path", path.display()),
        ));
    }
    Ok(path)
}

pub(super) fn non_empty(field: &str, value: String) -> Result<String, ConfigError> {
    if value.trim().is_empty() {
        return Err(err(field, "must not be empty"));
    }
    Ok(value)
}
