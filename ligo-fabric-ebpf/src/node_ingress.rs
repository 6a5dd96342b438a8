//! XDP on a node's uplink: fabric frames from our gateway are decapsulated,
//! their inner source is remapped from the sending peer's real prefix to our
//! view of it (the peer is named by the VNI, never by the inner source, which
//! may collide with our own CIDR), and passed to the stack, which routes them
//! to the pod whatever CNI owns its interface.
//!
//! Checksums are updated incrementally (RFC 1624): frames reaching XDP from a
//! NIC carry complete checksums.

use core::mem::size_of;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::generated::bpf_xdp_adjust_head,
    macros::xdp,
    programs::XdpContext,
    EbpfContext,
};
use ligo_fabric_common::{
    checksum::{replace_addr, udp_replace_addr},
    headers::{
        ipv4, outer, vni_from_bytes, ENCAP_LEN, ETH_P_IPV4, IPPROTO_TCP, IPPROTO_UDP, IPV4_HDR_LEN,
        TCP_CHECKSUM, UDP_CHECKSUM, VXLAN_FLAGS,
    },
    maps::{Direction, Role},
    DropReason,
};

use crate::{
    counters::{count_drop, count_peer_traffic},
    maps::{config, peer},
};

#[xdp]
pub fn node_ingress(ctx: XdpContext) -> u32 {
    match try_node_ingress(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            count_drop(reason);
            XDP_DROP
        }
    }
}

/// A pointer to a `T` at `offset`, if the frame holds it entirely.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + offset + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Outer headers plus the inner Ethernet and IPv4 (no options) headers.
type FabricHeaders = [u8; outer::INNER_IP + IPV4_HDR_LEN];

fn try_node_ingress(ctx: &XdpContext) -> Result<u32, DropReason> {
    const PASS: Result<u32, DropReason> = Ok(XDP_PASS);
    let Some(cfg) = config() else { return PASS };
    if cfg.role() != Role::Node {
        return PASS;
    }
    let Some(outer_ptr) = ptr_at::<[u8; outer::VXLAN]>(ctx, 0) else {
        return PASS;
    };
    // SAFETY: ptr_at checked that these bytes lie inside the frame.
    let o = unsafe { &*outer_ptr };
    let ip = outer::IP;
    let fragment = o[ip + 6] & 0x3f != 0 || o[ip + 7] != 0;
    if [o[12], o[13]] != ETH_P_IPV4 || o[ip] != 0x45 || o[ip + 9] != IPPROTO_UDP || fragment {
        return PASS;
    }
    if [o[outer::UDP + 2], o[outer::UDP + 3]] != cfg.fabric_port {
        return PASS;
    }
    let outer_src = [o[ip + 12], o[ip + 13], o[ip + 14], o[ip + 15]];
    if outer_src != cfg.gateway_ip {
        return Err(DropReason::NotFromGateway);
    }

    let h_ptr = ptr_at::<FabricHeaders>(ctx, 0).ok_or(DropReason::MalformedTunnelHeader)?;
    // SAFETY: ptr_at checked the bounds; XDP frames are writable.
    let h = unsafe { &mut *h_ptr };
    if h[outer::VXLAN] != VXLAN_FLAGS {
        return Err(DropReason::MalformedTunnelHeader);
    }
    let vni = vni_from_bytes([
        h[outer::VXLAN + 4],
        h[outer::VXLAN + 5],
        h[outer::VXLAN + 6],
    ]);
    let peer = peer(vni).ok_or(DropReason::UnknownPeer)?;
    let inner = outer::INNER_IP;
    let version_ihl = h[inner];
    if [h[outer::INNER_ETH + 12], h[outer::INNER_ETH + 13]] != ETH_P_IPV4
        || version_ihl >> 4 != 4
        || version_ihl & 0x0f < 5
    {
        return Err(DropReason::InnerNotIpv4);
    }
    let src_at = inner + ipv4::SRC;
    let src = [h[src_at], h[src_at + 1], h[src_at + 2], h[src_at + 3]];
    if !peer.real_to_view.matches(src) {
        return Err(DropReason::SourceOutsidePeerCidr);
    }
    let view_src = peer.real_to_view.apply(src);

    // Locate the L4 checksum (first fragments of TCP/UDP only) before
    // writing anything, so a truncated packet is dropped untouched.
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    let first_fragment = u16::from_be_bytes([h[inner + ipv4::FRAG], h[inner + ipv4::FRAG + 1]])
        & ipv4::FRAG_OFFSET_MASK
        == 0;
    let l4_checksum = match h[inner + ipv4::PROTOCOL] {
        IPPROTO_TCP if first_fragment => Some((inner + ihl + TCP_CHECKSUM, false)),
        IPPROTO_UDP if first_fragment => Some((inner + ihl + UDP_CHECKSUM, true)),
        _ => None,
    };
    let l4_checksum = match l4_checksum {
        Some((at, is_udp)) => Some((
            ptr_at::<[u8; 2]>(ctx, at).ok_or(DropReason::TruncatedInnerPacket)?,
            is_udp,
        )),
        None => None,
    };

    if let Some((check_ptr, is_udp)) = l4_checksum {
        // SAFETY: bounds checked by ptr_at above; no helper has moved packet
        // data since.
        let check = unsafe { &mut *check_ptr };
        let old = u16::from_be_bytes(*check);
        let new = if is_udp {
            udp_replace_addr(old, src, view_src)
        } else {
            replace_addr(old, src, view_src)
        };
        *check = new.to_be_bytes();
    }
    let csum_at = inner + ipv4::CHECKSUM;
    let ip_check = replace_addr(
        u16::from_be_bytes([h[csum_at], h[csum_at + 1]]),
        src,
        view_src,
    );
    h[csum_at..csum_at + 2].copy_from_slice(&ip_check.to_be_bytes());
    h[src_at..src_at + 4].copy_from_slice(&view_src);

    // The inner frame keeps the outer MAC addresses: the stack must see it
    // addressed to this host.
    let mut i = 0;
    while i < 12 {
        h[outer::INNER_ETH + i] = h[i];
        i += 1;
    }
    let inner_len =
        u16::from_be_bytes([h[inner + ipv4::TOTAL_LEN], h[inner + ipv4::TOTAL_LEN + 1]]);
    count_peer_traffic(vni, Direction::FromPeer, inner_len as u32);

    // SAFETY: valid XDP context; shrinking the head by the encapsulation we
    // just parsed cannot exceed the frame.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr().cast(), ENCAP_LEN as i32) } != 0 {
        return Err(DropReason::RewriteFailed);
    }
    Ok(XDP_PASS)
}
