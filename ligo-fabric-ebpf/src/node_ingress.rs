//! XDP on a node's uplink (the choice for NICs with native XDP): fabric
//! frames from our gateway are decapsulated, their inner source is remapped
//! from the sending peer's real prefix to our view of it (the peer is named
//! by the VNI, never by the inner source, which may collide with our own
//! CIDR), and passed to the stack, which routes them to the pod whatever CNI
//! owns its interface.
//!
//! Checksums are updated incrementally (RFC 1624): frames reaching XDP from a
//! NIC carry complete checksums. `node_ingress_tc.rs` does the same at TC.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::generated::bpf_xdp_adjust_head,
    macros::xdp,
    programs::XdpContext,
    EbpfContext,
};
use ligo_fabric_common::{
    checksum::{replace_addr, udp_replace_addr},
    headers::{icmp_error, ipv4, outer, ENCAP_LEN},
    maps::{Direction, Role},
    DropReason,
};

use crate::{
    counters::{count_drop, count_peer_traffic},
    decap::{parse_arriving, ptr_at, FabricHeaders},
    maps::config,
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

fn try_node_ingress(ctx: &XdpContext) -> Result<u32, DropReason> {
    let Some(cfg) = config() else {
        return Ok(XDP_PASS);
    };
    if cfg.role() != Role::Node {
        return Ok(XDP_PASS);
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Some(frame) = parse_arriving(data, data_end, &cfg)? else {
        return Ok(XDP_PASS);
    };
    let h_ptr =
        ptr_at::<FabricHeaders>(data, data_end, 0).ok_or(DropReason::MalformedTunnelHeader)?;
    // SAFETY: ptr_at checked the bounds; XDP frames are writable and no
    // helper has moved the packet since parse_arriving.
    let h = unsafe { &mut *h_ptr };
    let (src, view_src) = (frame.src, frame.view_src);
    if let Some((at, is_udp)) = frame.l4_checksum {
        let check_ptr =
            ptr_at::<[u8; 2]>(data, data_end, at).ok_or(DropReason::TruncatedInnerPacket)?;
        // SAFETY: bounds checked just above.
        let check = unsafe { &mut *check_ptr };
        let old = u16::from_be_bytes(*check);
        let new = if is_udp {
            udp_replace_addr(old, src, view_src)
        } else {
            replace_addr(old, src, view_src)
        };
        *check = new.to_be_bytes();
    }
    let inner = outer::INNER_IP;
    let csum_at = inner + ipv4::CHECKSUM;
    let ip_check = replace_addr(
        u16::from_be_bytes([h[csum_at], h[csum_at + 1]]),
        src,
        view_src,
    );
    h[csum_at..csum_at + 2].copy_from_slice(&ip_check.to_be_bytes());
    h[inner + ipv4::SRC..inner + ipv4::SRC + 4].copy_from_slice(&view_src);

    if let Some(fix) = &frame.quote {
        let m_ptr = ptr_at::<[u8; icmp_error::LEN]>(data, data_end, fix.icmp)
            .ok_or(DropReason::TruncatedInnerPacket)?;
        // SAFETY: bounds checked just above; XDP frames are writable.
        let m = unsafe { &mut *m_ptr };
        let (c, q, d) = (
            icmp_error::CHECKSUM,
            icmp_error::QUOTED_CHECKSUM,
            icmp_error::QUOTED_DST,
        );
        m[c..c + 2].copy_from_slice(&fix.icmp_checksum);
        m[q..q + 2].copy_from_slice(&fix.quoted_checksum);
        m[d..d + 4].copy_from_slice(&fix.view_dst);
    }

    // The inner frame keeps the outer MAC addresses: the stack must see it
    // addressed to this host.
    let mut i = 0;
    while i < 12 {
        h[outer::INNER_ETH + i] = h[i];
        i += 1;
    }
    count_peer_traffic(frame.vni, Direction::FromPeer, frame.inner_len as u32);

    // SAFETY: valid XDP context; shrinking the head by the encapsulation we
    // just parsed cannot exceed the frame.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr().cast(), ENCAP_LEN as i32) } != 0 {
        return Err(DropReason::RewriteFailed);
    }
    Ok(XDP_PASS)
}
