//! Steering routes on nodes: one route per peer view, via the gateway, out of
//! the uplink, with an MTU that leaves room for the encapsulation. Routes we
//! own carry our routing protocol number, so reconciliation never touches
//! anyone else's. The same netlink handle answers the daemon's questions
//! about links (which are veths, their names).

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{Context, Result};
use futures::TryStreamExt;
use ipnetwork::Ipv4Network;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteMetric, RouteProtocol,
};
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::desired::{plan, SteeringRoute};

/// Our `rtm_protocol` (shown by `ip route` as "proto 76").
pub const ROUTE_PROTOCOL: u8 = 76;
const MAIN_TABLE: u8 = 254;

/// What we install for one destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteTarget {
    pub via: Ipv4Addr,
    pub oif: u32,
    pub mtu: u32,
}

pub struct RouteManager {
    handle: Handle,
}

impl RouteManager {
    pub fn new() -> Result<Self> {
        let (connection, handle, _) =
            rtnetlink::new_connection().context("opening a netlink socket for routes")?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// Our routes currently in the main table.
    pub async fn current(&self) -> Result<BTreeMap<Ipv4Network, RouteTarget>> {
        let query = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let mut stream = self.handle.route().get(query).execute();
        let mut routes = BTreeMap::new();
        while let Some(msg) = stream.try_next().await.context("listing routes")? {
            if msg.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL) {
                continue;
            }
            let mut dst = None;
            let mut target = RouteTarget {
                via: Ipv4Addr::UNSPECIFIED,
                oif: 0,
                mtu: 0,
            };
            for attr in &msg.attributes {
                match attr {
                    RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = Some(*a),
                    RouteAttribute::Gateway(RouteAddress::Inet(a)) => target.via = *a,
                    RouteAttribute::Oif(i) => target.oif = *i,
                    RouteAttribute::Metrics(metrics) => {
                        for m in metrics {
                            if let RouteMetric::Mtu(mtu) = m {
                                target.mtu = *mtu;
                            }
                        }
                    }
                    _ => {}
                }
            }
            let dst = dst.unwrap_or(Ipv4Addr::UNSPECIFIED);
            let net =
                Ipv4Network::new(dst, msg.header.destination_prefix_length).with_context(|| {
                    format!(
                        "kernel returned a bad prefix {dst}/{}",
                        msg.header.destination_prefix_length
                    )
                })?;
            routes.insert(net, target);
        }
        Ok(routes)
    }

    fn message(destination: Ipv4Network, target: Option<RouteTarget>) -> RouteMessage {
        let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(destination.network(), destination.prefix())
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL));
        builder.get_mut().header.table = MAIN_TABLE;
        if let Some(t) = target {
            builder = builder.gateway(t.via).output_interface(t.oif);
        }
        let mut msg = builder.build();
        if let Some(t) = target {
            msg.attributes
                .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(t.mtu)]));
        }
        msg
    }

    /// Makes our routes equal `desired`, by difference: changed and new
    /// routes are replaced in place (no gap), stale ones deleted last.
    /// `uplink_mtu` less each route's overhead is the route's MTU.
    pub async fn reconcile(
        &self,
        desired: &[SteeringRoute],
        oif: u32,
        uplink_mtu: u32,
    ) -> Result<usize> {
        let current = self.current().await?;
        let desired: BTreeMap<Ipv4Network, RouteTarget> = desired
            .iter()
            .map(|r| {
                (
                    r.destination,
                    RouteTarget {
                        via: r.via,
                        oif,
                        mtu: uplink_mtu.saturating_sub(r.overhead),
                    },
                )
            })
            .collect();
        let changes = plan(&current, &desired);
        for (destination, target) in &changes.upserts {
            self.handle
                .route()
                .add(Self::message(*destination, Some(*target)))
                .replace()
                .execute()
                .await
                .with_context(|| format!("installing route {destination} via {}", target.via))?;
        }
        for destination in &changes.deletes {
            self.delete(*destination).await?;
        }
        Ok(changes.upserts.len() + changes.deletes.len())
    }

    async fn delete(&self, destination: Ipv4Network) -> Result<()> {
        self.handle
            .route()
            .del(Self::message(destination, None))
            .execute()
            .await
            .with_context(|| format!("removing route {destination}"))
    }

    /// Interface index -> name, for display.
    pub async fn interface_names(&self) -> Result<BTreeMap<u32, String>> {
        let mut links = self.handle.link().get().execute();
        let mut names = BTreeMap::new();
        while let Some(link) = links.try_next().await.context("listing interfaces")? {
            for attr in link.attributes {
                if let netlink_packet_route::link::LinkAttribute::IfName(name) = attr {
                    names.insert(link.header.index, name);
                }
            }
        }
        Ok(names)
    }

    /// Indexes of the veth interfaces in this namespace, but `except`.
    pub async fn veth_indexes(&self, except: u32) -> Result<std::collections::BTreeSet<u32>> {
        use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo};
        let mut links = self.handle.link().get().execute();
        let mut found = std::collections::BTreeSet::new();
        while let Some(link) = links.try_next().await.context("listing interfaces")? {
            let is_veth = link.attributes.iter().any(|a| {
                matches!(a, LinkAttribute::LinkInfo(infos)
                    if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))))
            });
            if is_veth && link.header.index != except {
                found.insert(link.header.index);
            }
        }
        Ok(found)
    }

    /// Whether interface `index` is a veth.
    pub async fn is_veth(&self, index: u32) -> Result<bool> {
        use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo};
        let mut links = self.handle.link().get().match_index(index).execute();
        while let Some(link) = links.try_next().await.context("reading the uplink")? {
            for attr in link.attributes {
                if let LinkAttribute::LinkInfo(infos) = attr {
                    return Ok(infos
                        .iter()
                        .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))));
                }
            }
        }
        Ok(false)
    }

    /// The MTU of interface `index`.
    pub async fn link_mtu(&self, index: u32) -> Result<u32> {
        use netlink_packet_route::link::LinkAttribute;
        let mut links = self.handle.link().get().match_index(index).execute();
        while let Some(link) = links.try_next().await.context("reading an interface MTU")? {
            for attr in link.attributes {
                if let LinkAttribute::Mtu(mtu) = attr {
                    return Ok(mtu);
                }
            }
        }
        anyhow::bail!("interface {index} reports no MTU")
    }

    /// Deletes interface `name` if it exists; whether it did.
    pub async fn delete_link(&self, name: &str) -> Result<bool> {
        let Ok(index) = nix::net::if_::if_nametoindex(name) else {
            return Ok(false);
        };
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .with_context(|| format!("deleting interface {name}"))?;
        Ok(true)
    }

    /// Removes every route we own.
    pub async fn remove_all(&self) -> Result<usize> {
        let current = self.current().await?;
        for destination in current.keys() {
            self.delete(*destination).await?;
        }
        Ok(current.len())
    }
}
