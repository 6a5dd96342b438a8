//! VXLAN encapsulation of the packet in the skb, shared by the programs that
//! send fabric frames: node_egress (node to gateway) and gateway_tunnel
//! (decrypted WireGuard traffic, gateway to node).

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_ENCAP_L2_ETH,
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO,
    },
    helpers::bpf_get_hash_recalc,
    programs::TcContext,
    EbpfContext,
};
use ligo_fabric_common::{
    headers::{encap_header, vxlan_source_port, EncapParams, ENCAP_LEN, ETH_HDR_LEN},
    maps::FabricConfig,
    DropReason,
};

/// `BPF_ADJ_ROOM_ENCAP_L2(len)`: the inner L2 header length, for GSO.
const ENCAP_L2_ETH_LEN: u64 = (ETH_HDR_LEN as u64) << 56;
/// Tunnel GSO flags, so GSO super-packets stay whole (segmented, if ever,
/// with correct outer headers) and keep their segment size.
const ENCAP_FLAGS: u64 = (BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
    | BPF_F_ADJ_ROOM_ENCAP_L2_ETH
    | BPF_F_ADJ_ROOM_FIXED_GSO) as u64
    | ENCAP_L2_ETH_LEN;

/// Grows room after the MAC header and writes outer IPv4, UDP, VXLAN (VNI =
/// `vni`) and an inner Ethernet header copied from the current one. The
/// outer UDP source port comes from the flow hash. Returns the inner IPv4
/// packet's length.
#[inline(always)]
pub fn encapsulate(
    ctx: &TcContext,
    outer_src: [u8; 4],
    outer_dst: [u8; 4],
    cfg: &FabricConfig,
    vni: u32,
) -> Result<u32, DropReason> {
    let inner_ip_len = ctx.len().saturating_sub(ETH_HDR_LEN as u32);
    let macs = ctx
        .load::<[u8; 12]>(0)
        .map_err(|_| DropReason::RewriteFailed)?;
    // SAFETY: the context pointer is the live __sk_buff of this invocation.
    let flow_hash = unsafe { bpf_get_hash_recalc(ctx.as_ptr().cast()) };
    ctx.adjust_room(ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, ENCAP_FLAGS)
        .map_err(|_| DropReason::RewriteFailed)?;
    let header = encap_header(&EncapParams {
        outer_src,
        outer_dst,
        src_port: vxlan_source_port(flow_hash),
        dst_port: u16::from_be_bytes(cfg.fabric_port),
        vni,
        inner_ip_len,
        inner_dst_mac: [macs[0], macs[1], macs[2], macs[3], macs[4], macs[5]],
        inner_src_mac: [macs[6], macs[7], macs[8], macs[9], macs[10], macs[11]],
    });
    ctx.store(ETH_HDR_LEN, &header, 0)
        .map_err(|_| DropReason::RewriteFailed)?;
    Ok(inner_ip_len)
}
