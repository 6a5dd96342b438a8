//! TC ingress on a gateway's interfaces. Fabric frames are forwarded by
//! rewriting their outer headers in place (the inner packet is untouched):
//!
//! - from a local node (outer dst = our underlay address, VNI = peer id):
//!   re-address to the peer gateway's endpoint, VNI = our cluster id;
//! - from a peer gateway (outer src = its endpoint, VNI = its cluster id):
//!   re-address to the node whose pod CIDR slice holds the inner destination.
//!
//! Then `bpf_redirect_neigh` sends the frame out of the right interface with
//! L2 addresses from the kernel's neighbour table.

use core::ptr;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::generated::bpf_redirect_neigh,
    macros::classifier,
    programs::TcContext,
};
use ligo_fabric_common::{
    headers::{
        outer, retarget_outer_ipv4, vni_from_bytes, vni_to_bytes, ETH_HDR_LEN, ETH_P_IPV4,
        IPPROTO_UDP, IPV4_HDR_LEN, VXLAN_FLAGS,
    },
    maps::{Direction, FabricConfig, Role, TRANSPORT_WIREGUARD},
    DropReason,
};

use crate::{
    counters::{count_drop, count_peer_traffic},
    maps::{config, lpm_key, peer, NODE_SLICES, PEER_ENDPOINTS},
};

#[classifier]
pub fn gateway(ctx: TcContext) -> i32 {
    match try_gateway(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            count_drop(reason);
            TC_ACT_SHOT as i32
        }
    }
}

fn try_gateway(ctx: &TcContext) -> Result<i32, DropReason> {
    const PASS: Result<i32, DropReason> = Ok(TC_ACT_OK as i32);
    if crate::vlan::tagged(ctx) {
        return PASS;
    }
    let Some(cfg) = config() else { return PASS };
    if cfg.role() != Role::Gateway {
        return PASS;
    }
    let Ok(ethertype) = ctx.load::<[u8; 2]>(12) else {
        return PASS;
    };
    if ethertype != ETH_P_IPV4 {
        return PASS;
    }
    let Ok(ip) = ctx.load::<[u8; IPV4_HDR_LEN]>(outer::IP) else {
        return PASS;
    };
    let fragment = ip[6] & 0x3f != 0 || ip[7] != 0;
    if ip[0] != 0x45 || ip[9] != IPPROTO_UDP || fragment {
        return PASS;
    }
    let Ok(udp_ports) = ctx.load::<[u8; 4]>(outer::UDP) else {
        return PASS;
    };
    if [udp_ports[2], udp_ports[3]] != cfg.fabric_port {
        return PASS;
    }
    let src = [ip[12], ip[13], ip[14], ip[15]];
    let dst = [ip[16], ip[17], ip[18], ip[19]];
    let from_peer_endpoint = if dst == cfg.public_ip {
        // SAFETY: not preallocated (see maps.rs); the value is copied at once.
        unsafe { PEER_ENDPOINTS.get(&src) }.copied()
    } else {
        None
    };
    if from_peer_endpoint.is_none() && dst != cfg.underlay_ip {
        if dst == cfg.public_ip {
            return Err(DropReason::UnknownEndpoint);
        }
        return PASS;
    }

    let vxlan = ctx
        .load::<[u8; 8]>(outer::VXLAN)
        .map_err(|_| DropReason::MalformedTunnelHeader)?;
    if vxlan[0] != VXLAN_FLAGS {
        return Err(DropReason::MalformedTunnelHeader);
    }
    let vni = vni_from_bytes([vxlan[4], vxlan[5], vxlan[6]]);
    let inner_ethertype = ctx
        .load::<[u8; 2]>(outer::INNER_ETH + 12)
        .map_err(|_| DropReason::MalformedTunnelHeader)?;
    if inner_ethertype != ETH_P_IPV4 {
        return Err(DropReason::InnerNotIpv4);
    }
    let inner_len = ctx.len().saturating_sub(outer::INNER_IP as u32);

    match from_peer_endpoint {
        Some(peer_id) => from_peer(ctx, &cfg, ip, peer_id, vni, inner_len),
        None => from_node(ctx, &cfg, ip, vni, inner_len),
    }
}

/// A frame from peer gateway `peer_id`: deliver to the owning local node.
fn from_peer(
    ctx: &TcContext,
    cfg: &FabricConfig,
    mut ip: [u8; IPV4_HDR_LEN],
    peer_id: u32,
    vni: u32,
    inner_len: u32,
) -> Result<i32, DropReason> {
    if vni != peer_id {
        return Err(DropReason::PeerVniMismatch);
    }
    let inner_dst = ctx
        .load::<[u8; 4]>(outer::INNER_IP + 16)
        .map_err(|_| DropReason::TruncatedInnerPacket)?;
    let node_ip = NODE_SLICES
        .get(&lpm_key(inner_dst))
        .map(|slice| slice.node_ip)
        .ok_or(DropReason::NoNodeForDestination)?;
    retarget_outer_ipv4(&mut ip, cfg.underlay_ip, node_ip);
    write_outer(ctx, &ip, cfg.fabric_port, None)?;
    count_peer_traffic(peer_id, Direction::FromPeer, inner_len);
    Ok(redirect_neigh(cfg.underlay_ifindex))
}

/// A frame from a local node for peer `vni`: send to that peer's gateway,
/// or up the stack to the userspace WireGuard tunnel that encrypts it.
fn from_node(
    ctx: &TcContext,
    cfg: &FabricConfig,
    mut ip: [u8; IPV4_HDR_LEN],
    vni: u32,
    inner_len: u32,
) -> Result<i32, DropReason> {
    let peer = peer(vni).ok_or(DropReason::UnknownPeer)?;
    if peer.transport == TRANSPORT_WIREGUARD {
        // Counted here like plain traffic, so the gateway's map counters
        // show both directions whatever the transport.
        count_peer_traffic(vni, Direction::ToPeer, inner_len);
        return Ok(TC_ACT_OK as i32);
    }
    retarget_outer_ipv4(&mut ip, cfg.public_ip, peer.endpoint_ip);
    write_outer(ctx, &ip, peer.endpoint_port, Some(cfg.cluster_id))?;
    count_peer_traffic(vni, Direction::ToPeer, inner_len);
    Ok(redirect_neigh(cfg.public_ifindex))
}

/// Stores the rewritten outer IPv4 header, the UDP destination port with a
/// zero UDP checksum (the addresses it covered changed; 0 is valid for
/// VXLAN over IPv4), and optionally a new VNI.
fn write_outer(
    ctx: &TcContext,
    ip: &[u8; IPV4_HDR_LEN],
    dst_port: [u8; 2],
    vni: Option<u32>,
) -> Result<(), DropReason> {
    ctx.store(ETH_HDR_LEN, ip, 0)
        .map_err(|_| DropReason::RewriteFailed)?;
    ctx.store(outer::UDP + 2, &dst_port, 0)
        .map_err(|_| DropReason::RewriteFailed)?;
    ctx.store(outer::UDP + 6, &[0u8; 2], 0)
        .map_err(|_| DropReason::RewriteFailed)?;
    if let Some(vni) = vni {
        ctx.store(outer::VXLAN + 4, &vni_to_bytes(vni), 0)
            .map_err(|_| DropReason::RewriteFailed)?;
    }
    Ok(())
}

#[inline(always)]
pub(crate) fn redirect_neigh(ifindex: u32) -> i32 {
    // SAFETY: a null neighbour parameter with length 0 asks the kernel to
    // resolve the next hop from its FIB; valid from TC programs.
    unsafe { bpf_redirect_neigh(ifindex, ptr::null_mut(), 0, 0) as i32 }
}
