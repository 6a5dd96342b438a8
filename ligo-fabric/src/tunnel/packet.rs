//! Pure packet work of the userspace tunnel: reading fabric frames from
//! nodes, cutting GSO super-packets into packets that fit the tunnel, making
//! every checksum complete, and framing decrypted packets for a node.
//!
//! Frames from nodes reach the gateway's UDP socket as the node program
//! wrote them. Over a veth underlay a frame can be a whole TCP GSO
//! super-packet (up to 64 KiB) whose TCP checksum holds only the pseudo-header
//! sum (CHECKSUM_PARTIAL): the kernel would have finished both jobs on its way
//! out of a real NIC. Here the tunnel does them, and refuses anything whose
//! checksum is neither complete nor partial (corrupted on the way).

use std::{collections::HashMap, net::Ipv4Addr};

use ipnetwork::Ipv4Network;
use ligo_fabric_common::checksum::{fold_wide, ipv4_header_checksum_with_options, ones_sum};
use ligo_fabric_common::headers::{
    tunnel_source_mac, vni_from_bytes, ETH_HDR_LEN, ETH_P_IPV4, IPPROTO_TCP, IPPROTO_UDP,
    VXLAN_FLAGS, VXLAN_HDR_LEN,
};

use super::device::{VnetHeader, VNET_HDR_LEN};

/// VXLAN header + inner Ethernet header: the UDP payload before the inner
/// IPv4 packet.
pub const FABRIC_HEADER_LEN: usize = VXLAN_HDR_LEN + ETH_HDR_LEN;

/// Why the tunnel refused a packet. Each is a label of
/// `ligo_fabric_tunnel_drops_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TunnelDrop {
    /// A frame from a node that is not VXLAN carrying IPv4.
    MalformedFrame,
    /// Inner IPv4 header or lengths are wrong.
    MalformedPacket,
    /// TCP/UDP checksum neither complete nor pseudo-header-only.
    BadChecksum,
    /// Larger than the tunnel MTU and not TCP (which is re-segmented).
    TooBig,
    /// VNI names no WireGuard peer.
    UnknownPeer,
    /// A datagram that is not WireGuard, or is cut short.
    MalformedDatagram,
    /// Handshake or data failing authentication (wrong key, bad MAC/tag).
    AuthenticationFailed,
    /// A data counter seen before or too old: replay protection.
    Replayed,
    /// Decrypted packet's source outside the peer's pod CIDR.
    SourceNotAllowed,
    /// Decrypted packet for an address no local node owns.
    NoNodeForDestination,
    /// IPv6 inside the tunnel (the fabric carries IPv4).
    NotIpv4,
    /// Handshake refused under load (cookie sent) or other protocol states.
    HandshakeRefused,
    /// The socket refused to send.
    SendFailed,
}

impl TunnelDrop {
    pub const ALL: [TunnelDrop; 13] = [
        TunnelDrop::MalformedFrame,
        TunnelDrop::MalformedPacket,
        TunnelDrop::BadChecksum,
        TunnelDrop::TooBig,
        TunnelDrop::UnknownPeer,
        TunnelDrop::MalformedDatagram,
        TunnelDrop::AuthenticationFailed,
        TunnelDrop::Replayed,
        TunnelDrop::SourceNotAllowed,
        TunnelDrop::NoNodeForDestination,
        TunnelDrop::NotIpv4,
        TunnelDrop::HandshakeRefused,
        TunnelDrop::SendFailed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            TunnelDrop::MalformedFrame => "malformed_frame",
            TunnelDrop::MalformedPacket => "malformed_packet",
            TunnelDrop::BadChecksum => "bad_checksum",
            TunnelDrop::TooBig => "too_big",
            TunnelDrop::UnknownPeer => "unknown_peer",
            TunnelDrop::MalformedDatagram => "malformed_datagram",
            TunnelDrop::AuthenticationFailed => "authentication_failed",
            TunnelDrop::Replayed => "replayed",
            TunnelDrop::SourceNotAllowed => "source_not_allowed",
            TunnelDrop::NoNodeForDestination => "no_node_for_destination",
            TunnelDrop::NotIpv4 => "not_ipv4",
            TunnelDrop::HandshakeRefused => "handshake_refused",
            TunnelDrop::SendFailed => "send_failed",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Splits a fabric frame's UDP payload into (VNI, inner IPv4 packet).
pub fn parse_fabric_payload(payload: &[u8]) -> Result<(u32, &[u8]), TunnelDrop> {
    if payload.len() < FABRIC_HEADER_LEN || payload[0] != VXLAN_FLAGS {
        return Err(TunnelDrop::MalformedFrame);
    }
    if payload[VXLAN_HDR_LEN + 12..FABRIC_HEADER_LEN] != ETH_P_IPV4 {
        return Err(TunnelDrop::MalformedFrame);
    }
    let vni = vni_from_bytes([payload[4], payload[5], payload[6]]);
    Ok((vni, &payload[FABRIC_HEADER_LEN..]))
}

fn pseudo_header_sum(ip: &[u8], protocol: u8, l4_len: usize) -> u64 {
    ones_sum(&ip[12..20], 0) + u64::from(protocol) + l4_len as u64
}

/// What a TCP/UDP checksum field holds.
#[derive(Debug, PartialEq, Eq)]
enum L4Checksum {
    Complete,
    /// Only the pseudo-header sum (CHECKSUM_PARTIAL); the rest is ours to add.
    PseudoHeaderOnly,
    Corrupt,
}

fn classify_checksum(ip: &[u8], protocol: u8, l4: &[u8], field: usize) -> L4Checksum {
    let stored = u16::from_be_bytes([l4[field], l4[field + 1]]);
    if protocol == IPPROTO_UDP && stored == 0 {
        return L4Checksum::Complete; // "no checksum"
    }
    // The cheap test first: a super-packet is always pseudo-header-only,
    // and recomputing a checksum that was in fact complete is harmless.
    let pseudo = pseudo_header_sum(ip, protocol, l4.len());
    let partial = fold_wide(pseudo);
    if stored == partial || (partial == 0xffff && stored == 0) {
        return L4Checksum::PseudoHeaderOnly;
    }
    if fold_wide(ones_sum(l4, pseudo)) == 0xffff {
        return L4Checksum::Complete;
    }
    L4Checksum::Corrupt
}

/// Writes a complete checksum into the L4 header (`field` is its offset).
fn complete_checksum(ip: &[u8], protocol: u8, l4: &mut [u8], field: usize) {
    l4[field..field + 2].copy_from_slice(&[0, 0]);
    let mut check = !fold_wide(ones_sum(l4, pseudo_header_sum(ip, protocol, l4.len())));
    if protocol == IPPROTO_UDP && check == 0 {
        check = 0xffff;
    }
    l4[field..field + 2].copy_from_slice(&check.to_be_bytes());
}

const TCP_CHECK: usize = 16;
const UDP_CHECK: usize = 6;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Calls `emit` with each packet of at most `mtu` bytes that carries
/// `packet` through the tunnel, checksums complete. `scratch` holds one
/// packet at a time. Returns the number of packets emitted.
///
/// - A packet that fits goes as it is, its TCP/UDP checksum completed if it
///   held only the pseudo-header sum.
/// - A larger TCP packet (a GSO super-packet) is cut into segments as the
///   kernel's TCP segmentation would: same headers, consecutive sequence
///   numbers and IP ids, FIN/PSH only on the last and CWR only on the first.
/// - Anything else larger is refused ([`TunnelDrop::TooBig`]): routes toward
///   the fabric carry the tunnel MTU, so senders learn it.
pub fn for_each_tunnel_packet(
    packet: &[u8],
    mtu: usize,
    scratch: &mut Vec<u8>,
    mut emit: impl FnMut(&[u8]),
) -> Result<usize, TunnelDrop> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return Err(TunnelDrop::MalformedPacket);
    }
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    if ihl < 20 || total < ihl || total > packet.len() {
        return Err(TunnelDrop::MalformedPacket);
    }
    let packet = &packet[..total];
    let protocol = packet[9];
    let fragment = u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff != 0;
    let checked_l4 = !fragment && (protocol == IPPROTO_TCP || protocol == IPPROTO_UDP);
    let field = if protocol == IPPROTO_TCP {
        TCP_CHECK
    } else {
        UDP_CHECK
    };
    let state = if checked_l4 {
        let l4 = &packet[ihl..];
        if l4.len() < field + 2 {
            return Err(TunnelDrop::MalformedPacket);
        }
        classify_checksum(&packet[..ihl], protocol, l4, field)
    } else {
        L4Checksum::Complete
    };
    if state == L4Checksum::Corrupt {
        return Err(TunnelDrop::BadChecksum);
    }

    if total <= mtu {
        if state == L4Checksum::Complete {
            emit(packet);
        } else {
            scratch.clear();
            scratch.extend_from_slice(packet);
            let (ip, l4) = scratch.split_at_mut(ihl);
            complete_checksum(ip, protocol, l4, field);
            emit(scratch);
        }
        return Ok(1);
    }
    if protocol != IPPROTO_TCP || fragment {
        return Err(TunnelDrop::TooBig);
    }
    let tcp = &packet[ihl..];
    if tcp.len() < 20 {
        return Err(TunnelDrop::MalformedPacket);
    }
    let thl = usize::from(tcp[12] >> 4) * 4;
    if thl < 20 || tcp.len() < thl || mtu <= ihl + thl {
        return Err(TunnelDrop::MalformedPacket);
    }
    let mss = mtu - ihl - thl;
    let payload = &tcp[thl..];
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let id = u16::from_be_bytes([packet[4], packet[5]]);
    let count = payload.len().div_ceil(mss);
    for (i, chunk) in payload.chunks(mss).enumerate() {
        scratch.clear();
        scratch.extend_from_slice(&packet[..ihl + thl]);
        scratch.extend_from_slice(chunk);
        let len = scratch.len() as u16;
        let (ip, l4) = scratch.split_at_mut(ihl);
        ip[2..4].copy_from_slice(&len.to_be_bytes());
        ip[4..6].copy_from_slice(&id.wrapping_add(i as u16).to_be_bytes());
        let check = ipv4_header_checksum_with_options(ip);
        ip[10..12].copy_from_slice(&check.to_be_bytes());
        let segment_seq = seq.wrapping_add((i * mss) as u32);
        l4[4..8].copy_from_slice(&segment_seq.to_be_bytes());
        if i + 1 < count {
            l4[13] &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            l4[13] &= !TCP_CWR;
        }
        complete_checksum(ip, protocol, l4, field);
        emit(scratch);
    }
    Ok(count)
}

/// Source and destination MACs of frames written to the tunnel device: the
/// source carries the peer id (see `tunnel_source_mac`).
fn device_ethernet(peer: u32) -> [u8; ETH_HDR_LEN] {
    let mut eth = [0u8; ETH_HDR_LEN];
    eth[..6].copy_from_slice(&[0x02, 0x4c, 0x47, 0xff, 0xff, 0xff]);
    eth[6..12].copy_from_slice(&tunnel_source_mac(peer));
    eth[12..].copy_from_slice(&ETH_P_IPV4);
    eth
}

const TCP_ACK: u8 = 0x10;
/// Largest IPv4 packet a coalesced frame may become.
const MAX_COALESCED: usize = 65_535;

/// The TCP segment being grown.
#[derive(Debug)]
struct OpenSegment {
    peer: u32,
    ihl: usize,
    thl: usize,
    segment_size: usize,
    segments: usize,
    next_seq: u32,
    /// A shorter segment or PSH ended the run.
    closed: bool,
}

/// Userspace GRO for the tunnel device: consecutive in-order TCP segments of
/// one flow become one frame with a virtio-net GSO header, which the kernel
/// then carries as a single GSO packet (the receiving pod sees what GRO
/// would have given it). Everything else is written as it is.
///
/// Frames are `[virtio-net header][Ethernet][IPv4]`.
#[derive(Debug, Default)]
pub struct Coalescer {
    frame: Vec<u8>,
    open: Option<OpenSegment>,
}

/// IPv4 header offset within a frame.
const FRAME_IP: usize = VNET_HDR_LEN + ETH_HDR_LEN;

/// (ihl, thl, payload length) of a TCP segment that may be coalesced: plain
/// IPv4 header, not a fragment, only ACK (and PSH) set, some payload.
fn coalescable(packet: &[u8]) -> Option<(usize, usize, usize)> {
    if packet.len() < 40 || packet[0] != 0x45 || packet[9] != IPPROTO_TCP {
        return None;
    }
    if u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff != 0 {
        return None;
    }
    if usize::from(u16::from_be_bytes([packet[2], packet[3]])) != packet.len() {
        return None;
    }
    let thl = usize::from(packet[20 + 12] >> 4) * 4;
    let flags = packet[20 + 13];
    if thl < 20 || packet.len() <= 20 + thl || flags & !TCP_PSH != TCP_ACK {
        return None;
    }
    Some((20, thl, packet.len() - 20 - thl))
}

impl Coalescer {
    /// Adds a decrypted packet from `peer`; `write` receives each finished
    /// frame.
    pub fn push(&mut self, peer: u32, packet: &[u8], write: &mut impl FnMut(&[u8])) {
        let Some((ihl, thl, len)) = coalescable(packet) else {
            self.flush(write);
            self.frame.clear();
            self.frame.extend_from_slice(&VnetHeader::default().bytes());
            self.frame.extend_from_slice(&device_ethernet(peer));
            self.frame.extend_from_slice(packet);
            write(&self.frame);
            self.frame.clear();
            return;
        };
        let seq = u32::from_be_bytes([packet[24], packet[25], packet[26], packet[27]]);
        if let Some(open) = &mut self.open {
            let first = &self.frame[FRAME_IP..];
            let (ip, tcp) = (&packet[..ihl], &packet[ihl..ihl + thl]);
            let (open_ip, open_tcp) = (&first[..open.ihl], &first[open.ihl..open.ihl + open.thl]);
            let joins = open.peer == peer
                && !open.closed
                && open.thl == thl
                && seq == open.next_seq
                && len <= open.segment_size
                && self.frame.len() - FRAME_IP + len <= MAX_COALESCED
                && ip[..2] == open_ip[..2]
                && ip[6..10] == open_ip[6..10]
                && ip[12..20] == open_ip[12..20]
                && tcp[..4] == open_tcp[..4]
                && tcp[8..13] == open_tcp[8..13]
                && tcp[14..16] == open_tcp[14..16]
                && tcp[20..] == open_tcp[20..];
            if joins {
                self.frame.extend_from_slice(&packet[ihl + thl..]);
                open.segments += 1;
                open.next_seq = seq.wrapping_add(len as u32);
                if len < open.segment_size || tcp[13] & TCP_PSH != 0 {
                    open.closed = true;
                    self.frame[FRAME_IP + ihl + 13] |= tcp[13] & TCP_PSH;
                }
                return;
            }
        }
        self.flush(write);
        self.frame.clear();
        self.frame.extend_from_slice(&VnetHeader::default().bytes());
        self.frame.extend_from_slice(&device_ethernet(peer));
        self.frame.extend_from_slice(packet);
        self.open = Some(OpenSegment {
            peer,
            ihl,
            thl,
            segment_size: len,
            segments: 1,
            next_seq: seq.wrapping_add(len as u32),
            closed: packet[ihl + 13] & TCP_PSH != 0,
        });
    }

    /// Writes the segment being grown, if any.
    pub fn flush(&mut self, write: &mut impl FnMut(&[u8])) {
        let Some(open) = self.open.take() else {
            return;
        };
        if open.segments > 1 {
            let total = self.frame.len() - FRAME_IP;
            let (head, packet) = self.frame.split_at_mut(FRAME_IP);
            packet[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            let check = ipv4_header_checksum_with_options(&packet[..open.ihl]);
            packet[10..12].copy_from_slice(&check.to_be_bytes());
            // CHECKSUM_PARTIAL: the field holds the pseudo-header sum and the
            // kernel (or the segmentation) completes it.
            let partial = fold_wide(pseudo_header_sum(
                &packet[..open.ihl],
                IPPROTO_TCP,
                total - open.ihl,
            ));
            packet[open.ihl + TCP_CHECK..open.ihl + TCP_CHECK + 2]
                .copy_from_slice(&partial.to_be_bytes());
            let vnet = VnetHeader {
                needs_csum: true,
                tcp4_gso_size: Some(open.segment_size as u16),
                hdr_len: (ETH_HDR_LEN + open.ihl + open.thl) as u16,
                csum_start: (ETH_HDR_LEN + open.ihl) as u16,
                csum_offset: TCP_CHECK as u16,
            };
            head[..VNET_HDR_LEN].copy_from_slice(&vnet.bytes());
        }
        write(&self.frame);
        self.frame.clear();
    }
}

/// Local node pod CIDR slices, looked up longest prefix first.
#[derive(Debug, Default, Clone)]
pub struct SliceTable {
    /// (prefix length, masked network -> node), longest first.
    by_length: Vec<(u8, HashMap<u32, Ipv4Addr>)>,
}

impl SliceTable {
    pub fn new<'a>(slices: impl IntoIterator<Item = (&'a Ipv4Network, &'a Ipv4Addr)>) -> Self {
        let mut table = SliceTable::default();
        for (net, node) in slices {
            let len = net.prefix();
            let at = match table.by_length.iter().position(|(l, _)| *l <= len) {
                Some(i) if table.by_length[i].0 == len => i,
                Some(i) => {
                    table.by_length.insert(i, (len, HashMap::new()));
                    i
                }
                None => {
                    table.by_length.push((len, HashMap::new()));
                    table.by_length.len() - 1
                }
            };
            table.by_length[at]
                .1
                .insert(u32::from(net.network()), *node);
        }
        table
    }

    pub fn lookup(&self, addr: [u8; 4]) -> Option<Ipv4Addr> {
        let addr = u32::from_be_bytes(addr);
        self.by_length.iter().find_map(|(len, nets)| {
            let mask = u32::MAX.checked_shl(32 - u32::from(*len)).unwrap_or(0);
            nets.get(&(addr & mask)).copied()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The enum, `ALL` and the labels are three lists: they must agree.
    /// `index` relies on `ALL` being in declaration order.
    #[test]
    fn every_tunnel_drop_has_its_place_and_its_own_label() {
        let mut labels = std::collections::HashSet::new();
        for (i, reason) in TunnelDrop::ALL.iter().enumerate() {
            assert_eq!(reason.index(), i, "{reason:?} out of order in ALL");
            let snake: String = format!("{reason:?}")
                .chars()
                .enumerate()
                .flat_map(|(k, c)| {
                    let sep = (k > 0 && c.is_ascii_uppercase()).then_some('_');
                    sep.into_iter()
                        .chain(std::iter::once(c.to_ascii_lowercase()))
                })
                .collect();
            assert_eq!(reason.label(), snake, "label of {reason:?}");
            assert!(labels.insert(reason.label()), "duplicate label");
        }
        // The last variant declared closes ALL (a variant added after it
        // and left out of ALL would make this fail).
        assert_eq!(TunnelDrop::SendFailed.index() + 1, TunnelDrop::ALL.len());
    }
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

    const SRC: [u8; 4] = [10, 244, 1, 2];
    const DST: [u8; 4] = [10, 100, 17, 3];

    fn tcp_packet(payload: &[u8], seq: u32, fin: bool) -> Vec<u8> {
        let mut b = PacketBuilder::ipv4(SRC, DST, 63)
            .tcp(40000, 5201, seq, 512)
            .psh()
            .ack(7)
            .cwr();
        if fin {
            b = b.fin();
        }
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    /// Turns a complete TCP/UDP checksum into what a CHECKSUM_PARTIAL skb
    /// carries: the pseudo-header sum only.
    fn make_partial(packet: &mut [u8], field: usize) {
        let ihl = usize::from(packet[0] & 0xf) * 4;
        let l4_len = packet.len() - ihl;
        let sum = fold_wide(pseudo_header_sum(&packet[..ihl], packet[9], l4_len));
        packet[ihl + field..ihl + field + 2].copy_from_slice(&sum.to_be_bytes());
    }

    /// Parses with etherparse and checks both checksums from scratch.
    fn assert_valid_tcp(seg: &[u8]) -> (u32, Vec<u8>, bool, bool, bool, u16) {
        let sliced = SlicedPacket::from_ip(seg).unwrap();
        let ip = sliced.net.unwrap();
        let etherparse::NetSlice::Ipv4(ip) = ip else {
            panic!("not ipv4")
        };
        let header = ip.header().to_header();
        assert_eq!(
            header.header_checksum,
            header.calc_header_checksum(),
            "ip checksum"
        );
        let Some(TransportSlice::Tcp(tcp)) = sliced.transport else {
            panic!("not tcp")
        };
        let expected = tcp
            .to_header()
            .calc_checksum_ipv4(&header, tcp.payload())
            .unwrap();
        assert_eq!(tcp.checksum(), expected, "tcp checksum");
        (
            tcp.sequence_number(),
            tcp.payload().to_vec(),
            tcp.fin(),
            tcp.psh(),
            tcp.cwr(),
            header.identification,
        )
    }

    #[test]
    fn a_super_packet_is_cut_like_the_kernel_cuts_it() {
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut packet = tcp_packet(&payload, 1000, true);
        make_partial(&mut packet, TCP_CHECK);
        let mtu = 1440;
        let mut segments = Vec::new();
        let n =
            for_each_tunnel_packet(&packet, mtu, &mut Vec::new(), |s| segments.push(s.to_vec()))
                .unwrap();
        assert_eq!(n, segments.len());
        let mss = mtu - 20 - 20;
        assert_eq!(n, payload.len().div_ceil(mss));
        let mut joined = Vec::new();
        for (i, seg) in segments.iter().enumerate() {
            assert!(seg.len() <= mtu);
            let (seq, data, fin, psh, cwr, id) = assert_valid_tcp(seg);
            assert_eq!(seq, 1000 + (i * mss) as u32);
            let last = i + 1 == n;
            assert_eq!((fin, psh, cwr), (last, last, i == 0), "flags of {i}");
            assert_eq!(id, i as u16);
            joined.extend(data);
        }
        assert_eq!(joined, payload);
    }

    #[test]
    fn a_fitting_packet_keeps_its_bytes_and_gets_a_complete_checksum() {
        let packet = tcp_packet(b"hello", 5, false);
        let mut out = Vec::new();
        for_each_tunnel_packet(&packet, 1440, &mut Vec::new(), |s| out = s.to_vec()).unwrap();
        assert_eq!(out, packet, "a complete packet passes unchanged");

        let mut partial = packet.clone();
        make_partial(&mut partial, TCP_CHECK);
        assert_ne!(partial, packet);
        for_each_tunnel_packet(&partial, 1440, &mut Vec::new(), |s| out = s.to_vec()).unwrap();
        assert_eq!(out, packet, "the partial checksum is completed");

        let mut udp = Vec::new();
        PacketBuilder::ipv4(SRC, DST, 64)
            .udp(1, 2)
            .write(&mut udp, b"odd length payload!")
            .unwrap();
        let mut partial_udp = udp.clone();
        make_partial(&mut partial_udp, UDP_CHECK);
        for_each_tunnel_packet(&partial_udp, 1440, &mut Vec::new(), |s| out = s.to_vec()).unwrap();
        assert_eq!(out, udp);
    }

    #[test]
    fn corrupt_truncated_and_oversized_packets_are_refused() {
        let mut corrupt = tcp_packet(b"payload", 1, false);
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0x40;
        let none = |_: &[u8]| panic!("emitted");
        assert_eq!(
            for_each_tunnel_packet(&corrupt, 1440, &mut Vec::new(), none),
            Err(TunnelDrop::BadChecksum)
        );
        let packet = tcp_packet(b"payload", 1, false);
        assert_eq!(
            for_each_tunnel_packet(&packet[..packet.len() - 1], 1440, &mut Vec::new(), none),
            Err(TunnelDrop::MalformedPacket)
        );
        assert_eq!(
            for_each_tunnel_packet(&packet[..10], 1440, &mut Vec::new(), none),
            Err(TunnelDrop::MalformedPacket)
        );
        let mut big_udp = Vec::new();
        PacketBuilder::ipv4(SRC, DST, 64)
            .udp(1, 2)
            .write(&mut big_udp, &[0u8; 2000])
            .unwrap();
        assert_eq!(
            for_each_tunnel_packet(&big_udp, 1440, &mut Vec::new(), none),
            Err(TunnelDrop::TooBig)
        );
    }

    /// The VXLAN + inner Ethernet header of a frame for a node. The inner MAC
    /// addresses are locally administered placeholders: nodes strip them.
    fn fabric_header(vni: u32) -> [u8; FABRIC_HEADER_LEN] {
        use ligo_fabric_common::headers::vni_to_bytes;
        let mut h = [0u8; FABRIC_HEADER_LEN];
        h[0] = VXLAN_FLAGS;
        h[4..7].copy_from_slice(&vni_to_bytes(vni));
        let eth = VXLAN_HDR_LEN;
        h[eth..eth + 6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
        h[eth + 6..eth + 12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
        h[eth + 12..eth + 14].copy_from_slice(&ETH_P_IPV4);
        h
    }

    #[test]
    fn fabric_frames_round_trip() {
        let packet = tcp_packet(b"x", 1, false);
        let mut frame = fabric_header(0x00ab_cdef).to_vec();
        frame.extend_from_slice(&packet);
        assert_eq!(parse_fabric_payload(&frame), Ok((0x00ab_cdef, &packet[..])));
        frame[0] = 0;
        assert_eq!(
            parse_fabric_payload(&frame),
            Err(TunnelDrop::MalformedFrame)
        );
        assert_eq!(
            parse_fabric_payload(&frame[..5]),
            Err(TunnelDrop::MalformedFrame)
        );
    }

    #[test]
    fn slices_match_longest_prefix_first() {
        let slices: Vec<(Ipv4Network, Ipv4Addr)> = vec![
            (
                "10.244.0.0/16".parse().unwrap(),
                Ipv4Addr::new(192, 0, 2, 11),
            ),
            (
                "10.244.2.0/24".parse().unwrap(),
                Ipv4Addr::new(192, 0, 2, 12),
            ),
            (
                "10.100.16.0/20".parse().unwrap(),
                Ipv4Addr::new(192, 0, 2, 13),
            ),
        ];
        let table = SliceTable::new(slices.iter().map(|(n, a)| (n, a)));
        assert_eq!(
            table.lookup([10, 244, 2, 9]),
            Some(Ipv4Addr::new(192, 0, 2, 12))
        );
        assert_eq!(
            table.lookup([10, 244, 3, 9]),
            Some(Ipv4Addr::new(192, 0, 2, 11))
        );
        assert_eq!(
            table.lookup([10, 100, 31, 1]),
            Some(Ipv4Addr::new(192, 0, 2, 13))
        );
        assert_eq!(table.lookup([10, 100, 32, 1]), None);
    }

    #[test]
    fn consecutive_segments_coalesce_into_one_gso_frame_that_splits_back() {
        let payload: Vec<u8> = (0..6000u32).map(|i| (i % 253) as u8).collect();
        let mss = 1388;
        let mut segments = Vec::new();
        for (i, chunk) in payload.chunks(mss).enumerate() {
            let mut b = PacketBuilder::ipv4(SRC, DST, 63)
                .tcp(40000, 5201, 1000 + (i * mss) as u32, 512)
                .ack(7);
            if (i + 1) * mss >= payload.len() {
                b = b.psh();
            }
            let mut seg = Vec::new();
            b.write(&mut seg, chunk).unwrap();
            seg[4..6].copy_from_slice(&(i as u16).to_be_bytes());
            let check = ipv4_header_checksum_with_options(&seg[..20]);
            seg[10..12].copy_from_slice(&check.to_be_bytes());
            segments.push(seg);
        }
        let mut frames = Vec::new();
        let mut c = Coalescer::default();
        for seg in &segments {
            c.push(7, seg, &mut |f| frames.push(f.to_vec()));
        }
        c.flush(&mut |f| frames.push(f.to_vec()));
        assert_eq!(frames.len(), 1, "one frame for the run");
        let frame = &frames[0];
        let vnet = &frame[..VNET_HDR_LEN];
        assert_eq!(vnet[0], 1, "needs checksum");
        assert_eq!(vnet[1], 1, "TCPv4 GSO");
        assert_eq!(u16::from_ne_bytes([vnet[4], vnet[5]]), mss as u16);
        assert_eq!(u16::from_ne_bytes([vnet[6], vnet[7]]), 14 + 20);
        assert_eq!(
            ligo_fabric_common::headers::peer_from_tunnel_mac(
                frame[VNET_HDR_LEN + 6..VNET_HDR_LEN + 12]
                    .try_into()
                    .unwrap()
            ),
            Some(7)
        );
        let packet = &frame[FRAME_IP..];
        assert_eq!(packet.len(), 40 + payload.len());
        assert_eq!(&packet[40..], &payload[..]);
        // The kernel would cut it back; so does our own segmentation, and
        // the pieces are the original segments, byte for byte.
        let mut again = Vec::new();
        for_each_tunnel_packet(packet, 40 + mss, &mut Vec::new(), |s| {
            again.push(s.to_vec())
        })
        .unwrap();
        assert_eq!(again, segments);
    }

    #[test]
    fn other_packets_and_gaps_are_not_merged() {
        let seg = |seq: u32, data: &[u8]| {
            let mut out = Vec::new();
            PacketBuilder::ipv4(SRC, DST, 63)
                .tcp(40000, 5201, seq, 512)
                .ack(7)
                .write(&mut out, data)
                .unwrap();
            out
        };
        let mut udp = Vec::new();
        PacketBuilder::ipv4(SRC, DST, 63)
            .udp(1, 2)
            .write(&mut udp, b"x")
            .unwrap();
        let mut frames = Vec::new();
        let mut c = Coalescer::default();
        let mut w = |f: &[u8]| frames.push(f.to_vec());
        c.push(1, &seg(100, &[1; 100]), &mut w);
        c.push(1, &seg(300, &[2; 100]), &mut w); // gap: new run
        c.push(2, &seg(400, &[3; 100]), &mut w); // other peer: new run
        c.push(2, &udp, &mut w); // not TCP: alone
        c.flush(&mut w);
        assert_eq!(frames.len(), 4);
        for f in &frames {
            assert_eq!(
                f[..VNET_HDR_LEN],
                [0; VNET_HDR_LEN],
                "no GSO for single packets"
            );
        }
        assert_eq!(&frames[3][FRAME_IP..], &udp[..]);
    }
}
