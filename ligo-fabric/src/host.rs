//! Facts read from this host that the desired state depends on: interface
//! indexes and link MTUs. Read once here, for the daemon and the tunnel.

use anyhow::{Context, Result};

use crate::{
    config::{LocalConfig, NamedInterface},
    routes::RouteManager,
};

/// Interface indexes of the interfaces the local configuration names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interfaces {
    /// The node's uplink, or the gateway's interface toward its nodes.
    pub underlay: u32,
    /// The gateway's interface toward peer gateways.
    pub public: Option<u32>,
}

/// What the kernel says about the links the fabric uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// MTU of the underlay link (the node's uplink): route MTUs and MSS
    /// clamps derive from it. `None`: not known, no clamp.
    pub underlay_mtu: Option<u32>,
    /// MTU of the gateway's public link: the tunnel's inner MTU.
    pub public_mtu: Option<u32>,
}

pub fn ifindex(interface: NamedInterface<'_>) -> Result<u32> {
    nix::net::if_::if_nametoindex(interface.name).with_context(|| {
        format!(
            "{}: no interface named {:?} in this network namespace",
            interface.field, interface.name
        )
    })
}

impl Interfaces {
    pub fn resolve(local: &LocalConfig) -> Result<Self> {
        Ok(Interfaces {
            underlay: ifindex(local.underlay_interface())?,
            public: local.public_interface().map(ifindex).transpose()?,
        })
    }
}

impl HostFacts {
    pub async fn read(netlink: &RouteManager, interfaces: Interfaces) -> Result<Self> {
        let public_mtu = match interfaces.public {
            Some(index) => Some(netlink.link_mtu(index).await?),
            None => None,
        };
        Ok(HostFacts {
            underlay_mtu: Some(netlink.link_mtu(interfaces.underlay).await?),
            public_mtu,
        })
    }
}
