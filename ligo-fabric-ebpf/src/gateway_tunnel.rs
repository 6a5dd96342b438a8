//! TC ingress on a gateway's tunnel device (a TAP the userspace WireGuard
//! tunnel writes decrypted packets into, GSO super-packets included). The
//! frame's source MAC carries the peer id; the program wraps the packet in
//! VXLAN toward the node whose pod CIDR slice holds the destination (VNI =
//! peer id) and redirects it out of the underlay: arriving frames look
//! exactly like those of the plain transport.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use ligo_fabric_common::{
    headers::{peer_from_tunnel_mac, ETH_HDR_LEN, ETH_P_IPV4},
    maps::{Direction, Role},
    DropReason,
};

use crate::{
    counters::{count_drop, count_peer_traffic},
    encap::encapsulate,
    gateway::redirect_neigh,
    maps::{config, lpm_key, peer, NODE_SLICES},
};

#[classifier]
pub fn gateway_tunnel(ctx: TcContext) -> i32 {
    match try_gateway_tunnel(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            count_drop(reason);
            TC_ACT_SHOT as i32
        }
    }
}

fn try_gateway_tunnel(ctx: &TcContext) -> Result<i32, DropReason> {
    let Some(cfg) = config() else {
        return Ok(TC_ACT_OK as i32);
    };
    if cfg.role() != Role::Gateway {
        return Ok(TC_ACT_OK as i32);
    }
    let eth = ctx
        .load::<[u8; ETH_HDR_LEN]>(0)
        .map_err(|_| DropReason::TruncatedInnerPacket)?;
    if [eth[12], eth[13]] != ETH_P_IPV4 {
        return Err(DropReason::InnerNotIpv4);
    }
    let source_mac = [eth[6], eth[7], eth[8], eth[9], eth[10], eth[11]];
    let peer_id = peer_from_tunnel_mac(source_mac).ok_or(DropReason::UnknownPeer)?;
    if peer(peer_id).is_none() {
        return Err(DropReason::UnknownPeer);
    }
    let inner_dst = ctx
        .load::<[u8; 4]>(ETH_HDR_LEN + 16)
        .map_err(|_| DropReason::TruncatedInnerPacket)?;
    let node_ip = NODE_SLICES
        .get(&lpm_key(inner_dst))
        .map(|slice| slice.node_ip)
        .ok_or(DropReason::NoNodeForDestination)?;
    let inner_len = encapsulate(ctx, cfg.underlay_ip, node_ip, &cfg, peer_id)?;
    count_peer_traffic(peer_id, Direction::FromPeer, inner_len);
    Ok(redirect_neigh(cfg.underlay_ifindex))
}
