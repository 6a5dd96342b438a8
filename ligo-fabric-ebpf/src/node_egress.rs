//! TC egress on a node's uplink. Routes installed by the daemon steer packets
//! for peer views out of the uplink toward the gateway; this program remaps
//! their destination from our view to the peer's real prefix and wraps them
//! in VXLAN toward the gateway (VNI = peer id).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use ligo_fabric_common::{
    checksum::replace_quoted_addr,
    headers::{
        clamped_mss, icmp_error, ipv4, is_icmp_error, ETH_HDR_LEN, ETH_P_IPV4, IPPROTO_ICMP,
        IPPROTO_TCP, IPPROTO_UDP, IPV4_HDR_LEN, TCP_CHECKSUM, UDP_CHECKSUM,
    },
    maps::{Direction, Role},
    prefix::PrefixRewrite,
    DropReason,
};

use crate::{
    counters::{count_drop, count_peer_traffic},
    encap::encapsulate,
    maps::{config, lpm_key, PEER_VIEWS},
};

#[classifier]
pub fn node_egress(ctx: TcContext) -> i32 {
    match try_node_egress(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            count_drop(reason);
            TC_ACT_SHOT as i32
        }
    }
}

fn try_node_egress(ctx: &TcContext) -> Result<i32, DropReason> {
    const PASS: Result<i32, DropReason> = Ok(TC_ACT_OK as i32);
    if crate::vlan::tagged(ctx) {
        return PASS;
    }
    let Some(cfg) = config() else { return PASS };
    if cfg.role() != Role::Node {
        return PASS;
    }
    let Ok(ethertype) = ctx.load::<[u8; 2]>(12) else {
        return PASS;
    };
    if ethertype != ETH_P_IPV4 {
        return PASS;
    }
    let Ok(ip) = ctx.load::<[u8; IPV4_HDR_LEN]>(ETH_HDR_LEN) else {
        return PASS;
    };
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    if ip[0] >> 4 != 4 || ihl < IPV4_HDR_LEN {
        return PASS;
    }
    let dst = [ip[16], ip[17], ip[18], ip[19]];
    let Some(view) = PEER_VIEWS.get(&lpm_key(dst)) else {
        return PASS;
    };
    let (peer_id, view_to_real, mss_clamp) = (view.peer_id, view.view_to_real, view.mss_clamp);
    let real_dst = view_to_real.apply(dst);

    // Destination rewrite. The helpers update checksums correctly whether the
    // skb carries a full checksum or CHECKSUM_PARTIAL (pseudo-header only).
    let (old, new) = (
        u32::from_ne_bytes(dst) as u64,
        u32::from_ne_bytes(real_dst) as u64,
    );
    let first_fragment =
        u16::from_be_bytes([ip[ipv4::FRAG], ip[ipv4::FRAG + 1]]) & ipv4::FRAG_OFFSET_MASK == 0;
    let l4 = ETH_HDR_LEN + ihl;
    let l4_update = match ip[ipv4::PROTOCOL] {
        IPPROTO_TCP if first_fragment => Some((l4 + TCP_CHECKSUM, BPF_F_PSEUDO_HDR as u64)),
        IPPROTO_UDP if first_fragment => Some((
            l4 + UDP_CHECKSUM,
            (BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0) as u64,
        )),
        _ => None,
    };
    if let Some((at, flags)) = l4_update {
        ctx.l4_csum_replace(at, old, new, flags | 4)
            .map_err(|_| DropReason::TruncatedInnerPacket)?;
    }
    if ip[ipv4::PROTOCOL] == IPPROTO_TCP && first_fragment {
        clamp_mss(ctx, l4, mss_clamp)?;
    }
    if ip[ipv4::PROTOCOL] == IPPROTO_ICMP && first_fragment && ihl == IPV4_HDR_LEN {
        let src = [
            ip[ipv4::SRC],
            ip[ipv4::SRC + 1],
            ip[ipv4::SRC + 2],
            ip[ipv4::SRC + 3],
        ];
        translate_icmp_error(ctx, l4, &view_to_real, src)?;
    }
    ctx.l3_csum_replace(ETH_HDR_LEN + ipv4::CHECKSUM, old, new, 4)
        .map_err(|_| DropReason::RewriteFailed)?;
    ctx.store(ETH_HDR_LEN + ipv4::DST, &real_dst, 0)
        .map_err(|_| DropReason::RewriteFailed)?;

    // Encapsulation toward the gateway. The inner Ethernet header is a copy
    // of the original, whose destination MAC is the gateway's (the steering
    // route goes via it).
    let inner_ip_len = encapsulate(ctx, cfg.underlay_ip, cfg.gateway_ip, &cfg, peer_id)?;
    count_peer_traffic(peer_id, Direction::ToPeer, inner_ip_len);
    Ok(TC_ACT_OK as i32)
}

/// Lowers the MSS a SYN announces to what fits the fabric route (the pod's
/// own MTU knows nothing of the encapsulation), so TCP never needs a
/// path-MTU round trip across the fabric.
#[inline(always)]
fn clamp_mss(ctx: &TcContext, l4: usize, clamp: u16) -> Result<(), DropReason> {
    let Ok(tcp) = ctx.load::<[u8; 24]>(l4) else {
        return Ok(());
    };
    let Some((old, new)) = clamped_mss(&tcp, clamp) else {
        return Ok(());
    };
    // A header field, not the pseudo-header: for CHECKSUM_PARTIAL skbs the
    // helper leaves the field alone (the sum is finished later over the new
    // bytes); for complete checksums it updates them.
    ctx.l4_csum_replace(
        l4 + TCP_CHECKSUM,
        u16::to_be(old) as u64,
        u16::to_be(new) as u64,
        2,
    )
    .map_err(|_| DropReason::RewriteFailed)?;
    ctx.store(l4 + 22, &new.to_be_bytes(), 0)
        .map_err(|_| DropReason::RewriteFailed)
}

/// An ICMP error about a packet the peer sent (port unreachable from a pod,
/// time exceeded or fragmentation needed from this node) quotes that packet
/// as it arrived here, its source in our view of the peer. The quoted
/// source goes back to the peer's real address by the same rule as the
/// destination, so the peer's kernel recognises its own packet (path MTU
/// discovery, traceroute). The error is sent from the address the packet
/// was for, so an error made by this node itself comes from inside our pod
/// CIDR, the only sources the peer accepts.
#[inline(always)]
fn translate_icmp_error(
    ctx: &TcContext,
    l4: usize,
    view_to_real: &PrefixRewrite,
    outer_src: [u8; 4],
) -> Result<(), DropReason> {
    let Ok(m) = ctx.load::<[u8; icmp_error::LEN]>(l4) else {
        return Ok(());
    };
    if !is_icmp_error(m[0]) || m[icmp_error::QUOTED_IP] != 0x45 {
        return Ok(());
    }
    let s = icmp_error::QUOTED_SRC;
    let quoted_src = [m[s], m[s + 1], m[s + 2], m[s + 3]];
    if !view_to_real.matches(quoted_src) {
        return Ok(());
    }
    let real = view_to_real.apply(quoted_src);
    let (c, q) = (icmp_error::CHECKSUM, icmp_error::QUOTED_CHECKSUM);
    let (icmp_check, quoted_check) = replace_quoted_addr(
        u16::from_be_bytes([m[c], m[c + 1]]),
        u16::from_be_bytes([m[q], m[q + 1]]),
        quoted_src,
        real,
    );
    let store = |at: usize, bytes: &[u8]| -> Result<(), DropReason> {
        match bytes.len() {
            2 => ctx.store(at, &[bytes[0], bytes[1]], 0),
            _ => ctx.store(at, &[bytes[0], bytes[1], bytes[2], bytes[3]], 0),
        }
        .map_err(|_| DropReason::RewriteFailed)
    };
    store(l4 + c, &icmp_check.to_be_bytes())?;
    store(l4 + q, &quoted_check.to_be_bytes())?;
    store(l4 + s, &real)?;
    let d = icmp_error::QUOTED_DST;
    let quoted_dst = [m[d], m[d + 1], m[d + 2], m[d + 3]];
    if quoted_dst != outer_src {
        ctx.l3_csum_replace(
            ETH_HDR_LEN + ipv4::CHECKSUM,
            u32::from_ne_bytes(outer_src) as u64,
            u32::from_ne_bytes(quoted_dst) as u64,
            4,
        )
        .map_err(|_| DropReason::RewriteFailed)?;
        store(ETH_HDR_LEN + ipv4::SRC, &quoted_dst)?;
    }
    Ok(())
}
