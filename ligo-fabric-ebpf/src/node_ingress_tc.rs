//! TC ingress on a node's uplink: the same job as `node_ingress` (XDP), for
//! uplinks where XDP costs more than it saves. On veth, an XDP program makes
//! the peer segment every GSO packet and the frames are copied into XDP
//! buffers; here a 64 KiB GSO frame is decapsulated in one piece
//! (`bpf_skb_adjust_room`, gso_size kept) and the checksum helpers handle
//! CHECKSUM_PARTIAL packets correctly. Delivery may then skip this node's
//! stack (`deliver.rs`).

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_DECAP_L3_IPV4,
        BPF_F_ADJ_ROOM_FIXED_GSO, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM,
        TC_ACT_OK, TC_ACT_SHOT,
    },
    macros::classifier,
    programs::TcContext,
};
use ligo_fabric_common::{
    headers::{icmp_error, ipv4, outer, ENCAP_LEN},
    maps::{Direction, Role},
    DropReason,
};

use crate::{
    counters::{count_drop, count_peer_traffic},
    decap::{parse_arriving, HEADERS_READ},
    deliver::to_pod_or_stack,
    maps::config,
};

#[classifier]
pub fn node_ingress_tc(ctx: TcContext) -> i32 {
    match try_node_ingress_tc(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            count_drop(reason);
            TC_ACT_SHOT as i32
        }
    }
}

fn try_node_ingress_tc(ctx: &TcContext) -> Result<i32, DropReason> {
    const PASS: Result<i32, DropReason> = Ok(TC_ACT_OK as i32);
    if crate::vlan::tagged(ctx) {
        return PASS;
    }
    let Some(cfg) = config() else { return PASS };
    if cfg.role() != Role::Node {
        return PASS;
    }
    // Headers may sit in paged data: make what we read linear.
    let want = (HEADERS_READ as u32).min(ctx.len());
    if ctx.pull_data(want).is_err() {
        return PASS;
    }
    let Some(frame) = parse_arriving(ctx.data(), ctx.data_end(), &cfg)? else {
        return PASS;
    };
    let (old, new) = (
        u32::from_ne_bytes(frame.src) as u64,
        u32::from_ne_bytes(frame.view_src) as u64,
    );
    if let Some((at, is_udp)) = frame.l4_checksum {
        let flags = if is_udp {
            (BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0) as u64
        } else {
            BPF_F_PSEUDO_HDR as u64
        };
        ctx.l4_csum_replace(at, old, new, flags | 4)
            .map_err(|_| DropReason::RewriteFailed)?;
    }
    let inner = outer::INNER_IP;
    ctx.l3_csum_replace(inner + ipv4::CHECKSUM, old, new, 4)
        .map_err(|_| DropReason::RewriteFailed)?;
    ctx.store(inner + ipv4::SRC, &frame.view_src, 0)
        .map_err(|_| DropReason::RewriteFailed)?;
    if let Some(fix) = &frame.quote {
        // Plain stores (the fix carries the checksums); RECOMPUTE_CSUM keeps
        // a CHECKSUM_COMPLETE skb's sum right.
        let flags = BPF_F_RECOMPUTE_CSUM as u64;
        ctx.store(fix.icmp + icmp_error::CHECKSUM, &fix.icmp_checksum, flags)
            .and_then(|()| {
                ctx.store(
                    fix.icmp + icmp_error::QUOTED_CHECKSUM,
                    &fix.quoted_checksum,
                    flags,
                )
            })
            .and_then(|()| ctx.store(fix.icmp + icmp_error::QUOTED_DST, &fix.view_dst, flags))
            .map_err(|_| DropReason::RewriteFailed)?;
    }
    count_peer_traffic(frame.vni, Direction::FromPeer, frame.inner_len as u32);
    // Remove outer IPv4 + UDP + VXLAN + inner Ethernet after the outer MAC
    // header, which stays (it is addressed to this host).
    ctx.adjust_room(
        -(ENCAP_LEN as i32),
        BPF_ADJ_ROOM_MAC,
        (BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_DECAP_L3_IPV4) as u64,
    )
    .map_err(|_| DropReason::RewriteFailed)?;
    Ok(to_pod_or_stack(ctx))
}
