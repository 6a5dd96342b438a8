//! Validation of fabric frames arriving at a node, shared by the two node
//! ingress programs (XDP and TC): everything up to, but not including,
//! writing the packet.

use core::mem::size_of;

use ligo_fabric_common::{
    checksum::replace_quoted_addr,
    headers::{
        icmp_error, ipv4, is_icmp_error, outer, vni_from_bytes, ETH_P_IPV4, IPPROTO_ICMP,
        IPPROTO_TCP, IPPROTO_UDP, IPV4_HDR_LEN, TCP_CHECKSUM, UDP_CHECKSUM, VXLAN_FLAGS,
    },
    maps::FabricConfig,
    prefix::PrefixRewrite,
    DropReason,
};

use crate::maps::peer;

/// A pointer to a `T` at `offset` of the packet `[data, data_end)`, if the
/// packet holds it entirely.
#[inline(always)]
pub fn ptr_at<T>(data: usize, data_end: usize, offset: usize) -> Option<*mut T> {
    if data + offset + size_of::<T>() > data_end {
        return None;
    }
    Some((data + offset) as *mut T)
}

/// Outer headers plus the inner Ethernet and IPv4 (no options) headers.
pub type FabricHeaders = [u8; outer::INNER_IP + IPV4_HDR_LEN];

/// How many bytes the node ingress programs read directly.
pub const HEADERS_READ: usize = outer::INNER_IP + 60 + 18;

/// A valid fabric frame from our gateway, and the rewrite it needs.
pub struct ArrivingFrame {
    pub vni: u32,
    pub src: [u8; 4],
    pub view_src: [u8; 4],
    /// Offset of the inner TCP/UDP checksum (first fragments only), and
    /// whether it is UDP's (where 0 means "none").
    pub l4_checksum: Option<(usize, bool)>,
    pub inner_len: u16,
    /// An ICMP error quoting one of our packets to the peer: its quoted
    /// destination (the peer's real address) moves into our view too.
    pub quote: Option<QuoteFix>,
}

/// The writes that translate the destination quoted in an ICMP error.
pub struct QuoteFix {
    /// Offset of the ICMP header in the frame.
    pub icmp: usize,
    pub view_dst: [u8; 4],
    pub icmp_checksum: [u8; 2],
    pub quoted_checksum: [u8; 2],
}

/// `Ok(None)`: not fabric traffic, pass it. `Err`: fabric traffic to drop.
#[inline(always)]
pub fn parse_arriving(
    data: usize,
    data_end: usize,
    cfg: &FabricConfig,
) -> Result<Option<ArrivingFrame>, DropReason> {
    let Some(outer_ptr) = ptr_at::<[u8; outer::VXLAN]>(data, data_end, 0) else {
        return Ok(None);
    };
    // SAFETY: ptr_at checked that these bytes lie inside the packet.
    let o = unsafe { &*outer_ptr };
    let ip = outer::IP;
    let fragment = o[ip + 6] & 0x3f != 0 || o[ip + 7] != 0;
    if [o[12], o[13]] != ETH_P_IPV4 || o[ip] != 0x45 || o[ip + 9] != IPPROTO_UDP || fragment {
        return Ok(None);
    }
    if [o[outer::UDP + 2], o[outer::UDP + 3]] != cfg.fabric_port {
        return Ok(None);
    }
    let outer_src = [o[ip + 12], o[ip + 13], o[ip + 14], o[ip + 15]];
    if outer_src != cfg.gateway_ip {
        return Err(DropReason::NotFromGateway);
    }

    let h_ptr =
        ptr_at::<FabricHeaders>(data, data_end, 0).ok_or(DropReason::MalformedTunnelHeader)?;
    // SAFETY: ptr_at checked the bounds.
    let h = unsafe { &*h_ptr };
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

    // Locate the L4 checksum (first fragments of TCP/UDP only) before
    // anything is written, so a truncated packet is dropped untouched.
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    let first_fragment = u16::from_be_bytes([h[inner + ipv4::FRAG], h[inner + ipv4::FRAG + 1]])
        & ipv4::FRAG_OFFSET_MASK
        == 0;
    let l4_checksum = match h[inner + ipv4::PROTOCOL] {
        IPPROTO_TCP if first_fragment => Some((inner + ihl + TCP_CHECKSUM, false)),
        IPPROTO_UDP if first_fragment => Some((inner + ihl + UDP_CHECKSUM, true)),
        _ => None,
    };
    if let Some((at, _)) = l4_checksum {
        ptr_at::<[u8; 2]>(data, data_end, at).ok_or(DropReason::TruncatedInnerPacket)?;
    }
    let quote =
        if h[inner + ipv4::PROTOCOL] == IPPROTO_ICMP && first_fragment && ihl == IPV4_HDR_LEN {
            quote_fix(data, data_end, inner + IPV4_HDR_LEN, &peer.real_to_view)
        } else {
            None
        };
    Ok(Some(ArrivingFrame {
        vni,
        src,
        view_src: peer.real_to_view.apply(src),
        l4_checksum,
        inner_len: u16::from_be_bytes([h[inner + ipv4::TOTAL_LEN], h[inner + ipv4::TOTAL_LEN + 1]]),
        quote,
    }))
}

/// For an ICMP error at `icmp` whose quoted destination lies in the peer's
/// real CIDR (an error about a packet we sent it), the translation of that
/// address into our view, with both checksums. The sender's kernel matches
/// the error to its socket by the quoted header, so it must read as sent.
#[inline(always)]
fn quote_fix(
    data: usize,
    data_end: usize,
    icmp: usize,
    real_to_view: &PrefixRewrite,
) -> Option<QuoteFix> {
    let m_ptr = ptr_at::<[u8; icmp_error::LEN]>(data, data_end, icmp)?;
    // SAFETY: ptr_at checked the bounds.
    let m = unsafe { &*m_ptr };
    if !is_icmp_error(m[0]) || m[icmp_error::QUOTED_IP] != 0x45 {
        return None;
    }
    let d = icmp_error::QUOTED_DST;
    let quoted_dst = [m[d], m[d + 1], m[d + 2], m[d + 3]];
    if !real_to_view.matches(quoted_dst) {
        return None;
    }
    let view_dst = real_to_view.apply(quoted_dst);
    let c = icmp_error::CHECKSUM;
    let q = icmp_error::QUOTED_CHECKSUM;
    let (icmp_checksum, quoted_checksum) = replace_quoted_addr(
        u16::from_be_bytes([m[c], m[c + 1]]),
        u16::from_be_bytes([m[q], m[q + 1]]),
        quoted_dst,
        view_dst,
    );
    Some(QuoteFix {
        icmp,
        view_dst,
        icmp_checksum: icmp_checksum.to_be_bytes(),
        quoted_checksum: quoted_checksum.to_be_bytes(),
    })
}
