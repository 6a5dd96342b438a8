//! What the daemon is told, in three parts that come from different places:
//!
//! - [`LocalConfig`] (`local.rs`): facts about this host and this daemon —
//!   interfaces, underlay address, pin directory, metrics address, key file
//!   paths, the tunnel's status socket. What a DaemonSet passes a pod
//!   (file, flags, environment). Fixed for the daemon's lifetime.
//! - [`FabricSpec`] (`spec.rs`): the cluster-wide desired state — cluster
//!   id, pod CIDRs, ports, the gateway's address, node slices, peers with
//!   their views, endpoints and public keys. What Kubernetes objects carry;
//!   it changes at run time and arrives as revisions from a source
//!   (`crate::source`).
//! - Host facts (`crate::host`): read from the kernel (link MTUs).
//!
//! The desired maps and routes are a pure function of the three
//! (`crate::desired`). Today's source is the TOML file (`file.rs`), which
//! holds both the local part and a spec; validation is complete before
//! anything is applied, and every error names the field.

mod file;
mod local;
mod spec;

use std::{fmt, path::Path};

use anyhow::{Context, Result};

pub use self::{
    file::parse,
    local::{
        GatewayLocal, IngressHook, LocalConfig, LocalRole, NamedInterface, NodeLocal, PodDelivery,
        DEFAULT_METRICS_ADDRESS, DEFAULT_PIN_DIR, DEFAULT_WIREGUARD_STATUS_SOCKET,
    },
    spec::{
        admit_peers, decode_key, FabricSpec, PeerConfig, PeerContext, PeerInput, PeerProblem,
        PeerWireguard, Transport, DEFAULT_FABRIC_PORT, DEFAULT_WIREGUARD_PORT, WIREGUARD_OVERHEAD,
    },
};

/// VNIs are 24 bits; 0 is reserved as "no peer".
pub const MAX_CLUSTER_ID: u32 = 0x00ff_ffff;

/// What a configuration file holds: this daemon's local settings and a
/// revision of the fabric spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Configuration {
    pub local: LocalConfig,
    pub spec: FabricSpec,
}

/// Reads and validates a configuration file.
pub fn read_file(path: &Path) -> Result<Configuration> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    parse(&text).with_context(|| format!("invalid config {}", path.display()))
}

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

pub(crate) fn err(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        problem: problem.into(),
    }
}
