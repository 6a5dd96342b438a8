//! Header layouts of the fabric's wire format: VXLAN (RFC 7348) over UDP over
//! IPv4, carrying an inner Ethernet frame. Offsets are from the start of the
//! outer Ethernet header.

use crate::checksum::ipv4_header_checksum;

pub const ETH_HDR_LEN: usize = 14;
pub const IPV4_HDR_LEN: usize = 20;
pub const UDP_HDR_LEN: usize = 8;
pub const VXLAN_HDR_LEN: usize = 8;

pub const ETH_P_IPV4: [u8; 2] = [0x08, 0x00];
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Bytes inserted between the outer Ethernet header and the inner IPv4
/// packet: outer IPv4 + UDP + VXLAN + inner Ethernet.
pub const ENCAP_LEN: usize = IPV4_HDR_LEN + UDP_HDR_LEN + VXLAN_HDR_LEN + ETH_HDR_LEN;

/// Offsets within an IPv4 header.
pub mod ipv4 {
    pub const TOTAL_LEN: usize = 2;
    pub const FRAG: usize = 6;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: usize = 10;
    pub const SRC: usize = 12;
    pub const DST: usize = 16;
    /// Fragment offset bits of the flags/fragment field (network order u16).
    pub const FRAG_OFFSET_MASK: u16 = 0x1fff;
}

/// Offset of the checksum field within a TCP and a UDP header.
pub const TCP_CHECKSUM: usize = 16;
pub const UDP_CHECKSUM: usize = 6;

/// Offsets of an encapsulated fabric frame, from its first byte.
pub mod outer {
    use super::*;
    pub const IP: usize = ETH_HDR_LEN;
    pub const UDP: usize = IP + IPV4_HDR_LEN;
    pub const VXLAN: usize = UDP + UDP_HDR_LEN;
    pub const INNER_ETH: usize = VXLAN + VXLAN_HDR_LEN;
    pub const INNER_IP: usize = INNER_ETH + ETH_HDR_LEN;
}

/// VXLAN flags byte with the I bit ("VNI is valid"), the only flag we send
/// and the only one we accept.
pub const VXLAN_FLAGS: u8 = 0x08;

/// A VNI as the 3 bytes it occupies on the wire.
#[inline(always)]
pub const fn vni_to_bytes(vni: u32) -> [u8; 3] {
    [(vni >> 16) as u8, (vni >> 8) as u8, vni as u8]
}

#[inline(always)]
pub const fn vni_from_bytes(b: [u8; 3]) -> u32 {
    ((b[0] as u32) << 16) | ((b[1] as u32) << 8) | b[2] as u32
}

/// Outer UDP source port from a flow hash, in the dynamic range RFC 7348
/// recommends (49152..=65535), so ECMP and RSS spread flows.
#[inline(always)]
pub const fn vxlan_source_port(flow_hash: u32) -> u16 {
    let folded = (flow_hash ^ (flow_hash >> 16)) as u16;
    49152 | (folded & 0x3fff)
}

/// Decrypted WireGuard traffic enters a gateway's tunnel device (a TAP)
/// with the peer id in the Ethernet source address: a locally administered
/// unicast prefix, then the 24-bit id. The device's program reads it back to
/// choose the VNI.
pub const TUNNEL_MAC_PREFIX: [u8; 3] = [0x02, 0x4c, 0x47];

/// The source MAC that carries `peer_id` into the tunnel device.
pub const fn tunnel_source_mac(peer_id: u32) -> [u8; 6] {
    let v = vni_to_bytes(peer_id);
    [
        TUNNEL_MAC_PREFIX[0],
        TUNNEL_MAC_PREFIX[1],
        TUNNEL_MAC_PREFIX[2],
        v[0],
        v[1],
        v[2],
    ]
}

/// The peer id a tunnel-device frame's source MAC carries, if it has the
/// prefix.
pub const fn peer_from_tunnel_mac(mac: [u8; 6]) -> Option<u32> {
    if mac[0] != TUNNEL_MAC_PREFIX[0]
        || mac[1] != TUNNEL_MAC_PREFIX[1]
        || mac[2] != TUNNEL_MAC_PREFIX[2]
    {
        return None;
    }
    Some(vni_from_bytes([mac[3], mac[4], mac[5]]))
}

/// ICMP error messages (destination unreachable, time exceeded, parameter
/// problem): they quote the IPv4 header of the packet they are about.
#[inline(always)]
pub const fn is_icmp_error(icmp_type: u8) -> bool {
    matches!(icmp_type, 3 | 11 | 12)
}

/// Offsets in an ICMP error message, from its ICMP header.
pub mod icmp_error {
    pub const CHECKSUM: usize = 2;
    /// The quoted IPv4 header.
    pub const QUOTED_IP: usize = 8;
    pub const QUOTED_CHECKSUM: usize = QUOTED_IP + 10;
    pub const QUOTED_SRC: usize = QUOTED_IP + 12;
    pub const QUOTED_DST: usize = QUOTED_IP + 16;
    /// ICMP header and a quoted IPv4 header without options.
    pub const LEN: usize = QUOTED_IP + 20;
}

/// IPv4 and TCP headers without options: what an MSS leaves out of the MTU.
pub const TCP_IPV4_HEADERS: u32 = 40;

/// MSS clamping: for a TCP header (its first 24 bytes) of a SYN whose first
/// option is an MSS above `clamp`, the (old, new) MSS values. Senders put
/// the MSS option first (Linux, Windows, the BSDs), so only that place is
/// read: a fixed offset the verifier accepts.
#[inline(always)]
pub const fn clamped_mss(tcp: &[u8; 24], clamp: u16) -> Option<(u16, u16)> {
    const SYN: u8 = 0x02;
    const OPTION_MSS: u8 = 2;
    let data_offset = (tcp[12] >> 4) as usize * 4;
    if clamp == 0 || tcp[13] & SYN == 0 || data_offset < 24 {
        return None;
    }
    if tcp[20] != OPTION_MSS || tcp[21] != 4 {
        return None;
    }
    let mss = u16::from_be_bytes([tcp[22], tcp[23]]);
    if mss <= clamp {
        return None;
    }
    Some((mss, clamp))
}

/// What the encapsulating program knows about one packet.
#[derive(Clone, Copy, Debug)]
pub struct EncapParams {
    pub outer_src: [u8; 4],
    pub outer_dst: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub vni: u32,
    /// Length of the inner IPv4 packet (its Ethernet header excluded).
    pub inner_ip_len: u32,
    pub inner_dst_mac: [u8; 6],
    pub inner_src_mac: [u8; 6],
}

/// The [`ENCAP_LEN`] bytes to insert after the outer Ethernet header.
///
/// The outer IPv4 header has DF set (routes toward the fabric leave room for
/// the encapsulation, so the outer packet is never fragmented) and a computed
/// checksum; the outer UDP checksum is 0, as RFC 7348 allows for IPv4.
/// Lengths of GSO super-packets above 64 KiB saturate: segmentation rewrites
/// them per segment.
#[inline(always)]
pub fn encap_header(p: &EncapParams) -> [u8; ENCAP_LEN] {
    let mut h = [0u8; ENCAP_LEN];
    let ip_len = saturating_u16(p.inner_ip_len + ENCAP_LEN as u32);
    let udp_len = saturating_u16(p.inner_ip_len + (ENCAP_LEN - IPV4_HDR_LEN) as u32);

    let mut ip = [0u8; IPV4_HDR_LEN];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64; // TTL
    ip[9] = IPPROTO_UDP;
    ip[12..16].copy_from_slice(&p.outer_src);
    ip[16..20].copy_from_slice(&p.outer_dst);
    let csum = ipv4_header_checksum(&ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    h[..IPV4_HDR_LEN].copy_from_slice(&ip);

    let udp = IPV4_HDR_LEN;
    h[udp..udp + 2].copy_from_slice(&p.src_port.to_be_bytes());
    h[udp + 2..udp + 4].copy_from_slice(&p.dst_port.to_be_bytes());
    h[udp + 4..udp + 6].copy_from_slice(&udp_len.to_be_bytes());

    let vxlan = udp + UDP_HDR_LEN;
    h[vxlan] = VXLAN_FLAGS;
    h[vxlan + 4..vxlan + 7].copy_from_slice(&vni_to_bytes(p.vni));

    let eth = vxlan + VXLAN_HDR_LEN;
    h[eth..eth + 6].copy_from_slice(&p.inner_dst_mac);
    h[eth + 6..eth + 12].copy_from_slice(&p.inner_src_mac);
    h[eth + 12..eth + 14].copy_from_slice(&ETH_P_IPV4);
    h
}

/// Points an existing outer IPv4 header (no options) at new endpoints,
/// resets its TTL and recomputes its checksum. Used by the gateway, which
/// forwards fabric frames by rewriting their outer header in place.
#[inline(always)]
pub fn retarget_outer_ipv4(header: &mut [u8; IPV4_HDR_LEN], src: [u8; 4], dst: [u8; 4]) {
    header[8] = 64;
    header[12..16].copy_from_slice(&src);
    header[16..20].copy_from_slice(&dst);
    let csum = ipv4_header_checksum(header);
    header[10..12].copy_from_slice(&csum.to_be_bytes());
}

#[inline(always)]
const fn saturating_u16(v: u32) -> u16 {
    if v > u16::MAX as u32 {
        u16::MAX
    } else {
        v as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{SlicedPacket, TransportSlice};

    extern crate std;
    use std::vec::Vec;

    fn params(inner_len: u32) -> EncapParams {
        EncapParams {
            outer_src: [192, 0, 2, 11],
            outer_dst: [192, 0, 2, 1],
            src_port: 50123,
            dst_port: 4799,
            vni: 0x0a0b0c,
            inner_ip_len: inner_len,
            inner_dst_mac: [2, 0, 0, 0, 0, 1],
            inner_src_mac: [2, 0, 0, 0, 0, 2],
        }
    }

    #[test]
    fn encap_header_decodes_as_vxlan_with_an_independent_parser() {
        // An inner ICMP packet built by etherparse.
        let builder = etherparse::PacketBuilder::ipv4([10, 244, 1, 10], [10, 100, 17, 10], 64)
            .icmpv4_echo_request(1, 2);
        let payload = [0xabu8; 32];
        let mut inner = Vec::new();
        builder.write(&mut inner, &payload).unwrap();

        let mut frame = Vec::new();
        frame.extend_from_slice(&[2, 0, 0, 0, 0, 9, 2, 0, 0, 0, 0, 8, 0x08, 0x00]);
        frame.extend_from_slice(&encap_header(&params(inner.len() as u32)));
        frame.extend_from_slice(&inner);

        let outer = SlicedPacket::from_ethernet(&frame).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = outer.net else {
            panic!("no outer ipv4")
        };
        let h = ip.header();
        assert_eq!(h.source(), [192, 0, 2, 11]);
        assert_eq!(h.destination(), [192, 0, 2, 1]);
        assert!(h.dont_fragment());
        assert_eq!(h.total_len() as usize, frame.len() - ETH_HDR_LEN);
        assert_eq!(h.to_header().calc_header_checksum(), h.header_checksum());
        let Some(TransportSlice::Udp(udp)) = outer.transport else {
            panic!("no udp")
        };
        assert_eq!(udp.source_port(), 50123);
        assert_eq!(udp.destination_port(), 4799);
        assert_eq!(udp.length() as usize, frame.len() - outer::UDP);
        assert_eq!(udp.checksum(), 0);

        let vxlan = &frame[outer::VXLAN..outer::INNER_ETH];
        assert_eq!(vxlan[0], VXLAN_FLAGS);
        assert_eq!(vni_from_bytes([vxlan[4], vxlan[5], vxlan[6]]), 0x0a0b0c);
        let inner_frame = SlicedPacket::from_ethernet(&frame[outer::INNER_ETH..]).unwrap();
        let Some(etherparse::LinkSlice::Ethernet2(eth)) = inner_frame.link else {
            panic!()
        };
        assert_eq!(eth.destination(), [2, 0, 0, 0, 0, 1]);
        assert_eq!(eth.source(), [2, 0, 0, 0, 0, 2]);
        let Some(etherparse::NetSlice::Ipv4(inner_ip)) = inner_frame.net else {
            panic!()
        };
        assert_eq!(inner_ip.header().destination(), [10, 100, 17, 10]);
    }

    #[test]
    fn oversize_gso_lengths_saturate() {
        let h = encap_header(&params(70_000));
        assert_eq!(u16::from_be_bytes([h[2], h[3]]), u16::MAX);
    }

    #[test]
    fn retarget_keeps_a_valid_checksum() {
        let mut h = [0u8; IPV4_HDR_LEN];
        h.copy_from_slice(&encap_header(&params(100))[..IPV4_HDR_LEN]);
        retarget_outer_ipv4(&mut h, [203, 0, 113, 1], [203, 0, 113, 2]);
        let parsed = etherparse::Ipv4HeaderSlice::from_slice(&h).unwrap();
        assert_eq!(parsed.source(), [203, 0, 113, 1]);
        assert_eq!(parsed.destination(), [203, 0, 113, 2]);
        assert_eq!(
            parsed.to_header().calc_header_checksum(),
            parsed.header_checksum()
        );
    }

    #[test]
    fn source_port_stays_in_dynamic_range() {
        for hash in [0u32, 1, 0xffff_ffff, 0x1234_5678, 0x8000_0000] {
            assert!(vxlan_source_port(hash) >= 49152);
        }
        assert_ne!(
            vxlan_source_port(0x0001_0000),
            vxlan_source_port(0x0002_0000)
        );
    }

    #[test]
    fn tunnel_macs_carry_the_peer_id() {
        let mac = tunnel_source_mac(0x00ab_cdef);
        assert_eq!(mac, [0x02, 0x4c, 0x47, 0xab, 0xcd, 0xef]);
        assert_eq!(peer_from_tunnel_mac(mac), Some(0x00ab_cdef));
        assert_eq!(peer_from_tunnel_mac([0x02, 0, 0, 0, 0, 1]), None);
    }

    #[test]
    fn syn_mss_above_the_clamp_is_lowered_and_nothing_else() {
        let mut syn = Vec::new();
        etherparse::PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(1000, 80, 1, 64240)
            .syn()
            .options(&[
                etherparse::TcpOptionElement::MaximumSegmentSize(1460),
                etherparse::TcpOptionElement::SelectiveAcknowledgementPermitted,
            ])
            .unwrap()
            .write(&mut syn, &[])
            .unwrap();
        let tcp: [u8; 24] = syn[20..44].try_into().unwrap();
        assert_eq!(clamped_mss(&tcp, 1400), Some((1460, 1400)));
        assert_eq!(clamped_mss(&tcp, 1460), None, "already small enough");
        assert_eq!(clamped_mss(&tcp, 0), None, "no clamp");
        let mut ack = tcp;
        ack[13] = 0x10;
        assert_eq!(clamped_mss(&ack, 1400), None, "not a SYN");
        let mut other_first = tcp;
        other_first[20] = 4;
        assert_eq!(clamped_mss(&other_first, 1400), None, "MSS not first");
    }
}
