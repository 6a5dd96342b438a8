//! A reference model of what the node programs do with any frame: the
//! decision alone (translate, pass untouched, or drop with which reason),
//! written from the wire format rather than from the programs' code. The
//! hostile-frame corpus test runs every frame through the real programs
//! and checks them against it.
//!
//! Offsets, the VNI and the tunnel MAC are read here from the RFCs' layouts
//! (`wire` below), not through the programs' `headers` helpers; a test
//! checks the two derivations agree. The one piece of arithmetic shared
//! with the programs is [`PrefixRewrite`]'s prefix match (which peer or
//! slice an address belongs to); `tests/properties.rs` checks it against a
//! mask computed from scratch.

use crate::{prefix::PrefixRewrite, DropReason};

/// The fabric frame's layout, from RFC 894 (Ethernet), RFC 791 (IPv4 without
/// options), RFC 768 (UDP) and RFC 7348 (VXLAN).
mod wire {
    pub const ETH_P_IPV4: [u8; 2] = [0x08, 0x00];
    pub const IPPROTO_TCP: u8 = 6;
    pub const IPPROTO_UDP: u8 = 17;
    /// VXLAN flags with only the I bit (VNI valid).
    pub const VXLAN_FLAGS: u8 = 0x08;
    /// Tunnel-device source MACs: 02:4c:47 and then the 24-bit peer id.
    pub const TUNNEL_MAC_PREFIX: [u8; 3] = [0x02, 0x4c, 0x47];
    pub mod outer {
        /// After the 14-byte outer Ethernet header.
        pub const IP: usize = 14;
        /// After a 20-byte IPv4 header.
        pub const UDP: usize = IP + 20;
        /// After the 8-byte UDP header.
        pub const VXLAN: usize = UDP + 8;
        /// After the 8-byte VXLAN header.
        pub const INNER_ETH: usize = VXLAN + 8;
        pub const INNER_IP: usize = INNER_ETH + 14;
    }

    /// The 24-bit VNI in VXLAN bytes 4..7.
    pub fn vni(f: &[u8]) -> u32 {
        u32::from_be_bytes([
            0,
            f[outer::VXLAN + 4],
            f[outer::VXLAN + 5],
            f[outer::VXLAN + 6],
        ])
    }

    /// The peer id a tunnel-device frame's source MAC carries.
    pub fn tunnel_peer(f: &[u8]) -> Option<u32> {
        (f[6..9] == TUNNEL_MAC_PREFIX).then(|| u32::from_be_bytes([0, f[9], f[10], f[11]]))
    }
}

use wire::{outer, ETH_P_IPV4, IPPROTO_TCP, IPPROTO_UDP, VXLAN_FLAGS};

/// What a program does with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not for the fabric: passed on untouched.
    Pass,
    /// Rewritten (and re-encapsulated or decapsulated) as the fabric does.
    Translate,
    Drop(DropReason),
}

/// The configuration a node runs with, as the model sees it.
pub struct NodeModel<'a> {
    pub fabric_port: u16,
    pub gateway_ip: [u8; 4],
    /// (peer id, real -> our view) for every peer.
    pub peers: &'a [(u32, PrefixRewrite)],
    /// (our view -> the peer's real) for every view.
    pub views: &'a [PrefixRewrite],
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn addr(b: &[u8], at: usize) -> [u8; 4] {
    [b[at], b[at + 1], b[at + 2], b[at + 3]]
}

/// Whether `f` (at least `min_len` long) is an unfragmented IPv4 UDP
/// datagram without options to the fabric port: what the programs look at.
fn to_fabric_port(f: &[u8], min_len: usize, port: u16) -> bool {
    let ip = outer::IP;
    f.len() >= min_len
        && [f[12], f[13]] == ETH_P_IPV4
        && f[ip] == 0x45
        && f[ip + 9] == IPPROTO_UDP
        && be16(f, ip + 6) & 0x3fff == 0
        && be16(f, outer::UDP + 2) == port
}

/// Offset of the TCP/UDP checksum of the IPv4 packet at `ip`, when the
/// packet is a first fragment of either.
fn l4_checksum_at(frame: &[u8], ip: usize) -> Option<usize> {
    let ihl = usize::from(frame[ip] & 0x0f) * 4;
    let first_fragment = be16(frame, ip + 6) & 0x1fff == 0;
    match frame[ip + 9] {
        IPPROTO_TCP if first_fragment => Some(ip + ihl + 16),
        IPPROTO_UDP if first_fragment => Some(ip + ihl + 6),
        _ => None,
    }
}

impl NodeModel<'_> {
    /// A frame arriving on the uplink.
    pub fn ingress(&self, f: &[u8]) -> Outcome {
        let ip = outer::IP;
        if !to_fabric_port(f, outer::VXLAN, self.fabric_port) {
            return Outcome::Pass;
        }
        if addr(f, ip + 12) != self.gateway_ip {
            return Outcome::Drop(DropReason::NotFromGateway);
        }
        let inner = outer::INNER_IP;
        if f.len() < inner + 20 || f[outer::VXLAN] != VXLAN_FLAGS {
            return Outcome::Drop(DropReason::MalformedTunnelHeader);
        }
        let vni = wire::vni(f);
        let Some((_, real_to_view)) = self.peers.iter().find(|(id, _)| *id == vni) else {
            return Outcome::Drop(DropReason::UnknownPeer);
        };
        let eth = outer::INNER_ETH;
        if [f[eth + 12], f[eth + 13]] != ETH_P_IPV4 || f[inner] >> 4 != 4 || f[inner] & 0x0f < 5 {
            return Outcome::Drop(DropReason::InnerNotIpv4);
        }
        if !real_to_view.matches(addr(f, inner + 12)) {
            return Outcome::Drop(DropReason::SourceOutsidePeerCidr);
        }
        if let Some(at) = l4_checksum_at(f, inner) {
            if at + 2 > f.len() {
                return Outcome::Drop(DropReason::TruncatedInnerPacket);
            }
        }
        Outcome::Translate
    }

    /// A frame leaving by the uplink.
    pub fn egress(&self, f: &[u8]) -> Outcome {
        let ip = 14;
        if f.len() < ip + 20 || [f[12], f[13]] != ETH_P_IPV4 || f[ip] >> 4 != 4 || f[ip] & 0x0f < 5
        {
            return Outcome::Pass;
        }
        let dst = addr(f, ip + 16);
        if !self.views.iter().any(|v| v.matches(dst)) {
            return Outcome::Pass;
        }
        if let Some(at) = l4_checksum_at(f, ip) {
            if at + 2 > f.len() {
                return Outcome::Drop(DropReason::TruncatedInnerPacket);
            }
        }
        Outcome::Translate
    }
}

/// The configuration a gateway runs with (plain transport), as the model
/// sees it.
pub struct GatewayModel<'a> {
    pub fabric_port: u16,
    pub underlay_ip: [u8; 4],
    pub public_ip: [u8; 4],
    /// (peer id, endpoint address) of every peer.
    pub peers: &'a [(u32, [u8; 4])],
    /// Local node slices: (prefix, node).
    pub slices: &'a [(PrefixRewrite, [u8; 4])],
}

impl GatewayModel<'_> {
    /// A frame arriving on either gateway interface. `Translate` means
    /// re-addressed and redirected.
    pub fn ingress(&self, f: &[u8]) -> Outcome {
        let ip = outer::IP;
        if !to_fabric_port(f, outer::UDP + 4, self.fabric_port) {
            return Outcome::Pass;
        }
        let (src, dst) = (addr(f, ip + 12), addr(f, ip + 16));
        let from_peer = if dst == self.public_ip {
            self.peers
                .iter()
                .find(|(_, e)| *e == src)
                .map(|(id, _)| *id)
        } else {
            None
        };
        if from_peer.is_none() && dst != self.underlay_ip {
            if dst == self.public_ip {
                return Outcome::Drop(DropReason::UnknownEndpoint);
            }
            return Outcome::Pass;
        }
        if f.len() < outer::INNER_ETH || f[outer::VXLAN] != VXLAN_FLAGS {
            return Outcome::Drop(DropReason::MalformedTunnelHeader);
        }
        if f.len() < outer::INNER_ETH + 14 {
            return Outcome::Drop(DropReason::MalformedTunnelHeader);
        }
        if [f[outer::INNER_ETH + 12], f[outer::INNER_ETH + 13]] != ETH_P_IPV4 {
            return Outcome::Drop(DropReason::InnerNotIpv4);
        }
        let vni = wire::vni(f);
        match from_peer {
            Some(peer) => {
                if vni != peer {
                    return Outcome::Drop(DropReason::PeerVniMismatch);
                }
                if f.len() < outer::INNER_IP + 20 {
                    return Outcome::Drop(DropReason::TruncatedInnerPacket);
                }
                let inner_dst = addr(f, outer::INNER_IP + 16);
                // Longest prefix: any slice holding it will do for the model
                // as long as slices do not overlap (validation ensures it).
                if !self.slices.iter().any(|(s, _)| s.matches(inner_dst)) {
                    return Outcome::Drop(DropReason::NoNodeForDestination);
                }
                Outcome::Translate
            }
            None => {
                if !self.peers.iter().any(|(id, _)| *id == vni) {
                    return Outcome::Drop(DropReason::UnknownPeer);
                }
                Outcome::Translate
            }
        }
    }

    /// The node a peer's frame for `inner_dst` goes to.
    pub fn node_for(&self, inner_dst: [u8; 4]) -> Option<[u8; 4]> {
        self.slices
            .iter()
            .find(|(s, _)| s.matches(inner_dst))
            .map(|(_, node)| *node)
    }
}

impl GatewayModel<'_> {
    /// A frame written to the tunnel device (decrypted WireGuard traffic,
    /// the peer id in its source MAC). `Translate` means encapsulated toward
    /// the owning node and redirected.
    pub fn tunnel_device(&self, f: &[u8]) -> Outcome {
        if f.len() < 14 {
            return Outcome::Drop(DropReason::TruncatedInnerPacket);
        }
        if [f[12], f[13]] != ETH_P_IPV4 {
            return Outcome::Drop(DropReason::InnerNotIpv4);
        }
        let known = wire::tunnel_peer(f).is_some_and(|id| self.peers.iter().any(|(p, _)| *p == id));
        if !known {
            return Outcome::Drop(DropReason::UnknownPeer);
        }
        if f.len() < 14 + 20 {
            return Outcome::Drop(DropReason::TruncatedInnerPacket);
        }
        if self.node_for(addr(f, 14 + 16)).is_none() {
            return Outcome::Drop(DropReason::NoNodeForDestination);
        }
        Outcome::Translate
    }
}

/// The configuration the hostile-frame corpus
/// (`ligo-fabric/tests/corpus/hostile.py`) is built for: cluster A of the
/// testbed's different-CIDRs scenario (pods 10.244.0.0/16; peer 2's
/// 10.100.16.0/20 seen as 10.200.32.0/20; node 192.0.2.11 behind gateway
/// 192.0.2.1, public 203.0.113.1; peer gateway 203.0.113.2). Shared by the
/// BPF_PROG_TEST_RUN and the live-testbed corpus tests.
pub mod corpus {
    use super::{GatewayModel, NodeModel};
    use crate::prefix::PrefixRewrite;

    pub const FABRIC_PORT: u16 = 4799;
    /// Peer 2's real pod CIDR → our view of it.
    pub const REAL_TO_VIEW: PrefixRewrite =
        PrefixRewrite::new([10, 100, 16, 0], [10, 200, 32, 0], 20);
    pub const NODE: NodeModel<'static> = NodeModel {
        fabric_port: FABRIC_PORT,
        gateway_ip: [192, 0, 2, 1],
        peers: &[(2, REAL_TO_VIEW)],
        views: &[REAL_TO_VIEW.reversed()],
    };
    pub const GATEWAY: GatewayModel<'static> = GatewayModel {
        fabric_port: FABRIC_PORT,
        underlay_ip: [192, 0, 2, 1],
        public_ip: [203, 0, 113, 1],
        peers: &[(2, [203, 0, 113, 2])],
        slices: &[
            (
                PrefixRewrite::new([10, 244, 1, 0], [10, 244, 1, 0], 24),
                [192, 0, 2, 11],
            ),
            (
                PrefixRewrite::new([10, 244, 2, 0], [10, 244, 2, 0], 24),
                [192, 0, 2, 12],
            ),
        ],
    };
}

#[cfg(test)]
mod tests {
    use super::wire;
    use crate::headers;

    /// The model's layout, derived from the RFCs, and the programs' agree.
    #[test]
    fn the_model_and_the_programs_read_the_same_layout() {
        assert_eq!(
            [
                wire::outer::IP,
                wire::outer::UDP,
                wire::outer::VXLAN,
                wire::outer::INNER_ETH,
                wire::outer::INNER_IP
            ],
            [
                headers::outer::IP,
                headers::outer::UDP,
                headers::outer::VXLAN,
                headers::outer::INNER_ETH,
                headers::outer::INNER_IP
            ]
        );
        assert_eq!(wire::ETH_P_IPV4, headers::ETH_P_IPV4);
        assert_eq!(wire::VXLAN_FLAGS, headers::VXLAN_FLAGS);
        assert_eq!(wire::TUNNEL_MAC_PREFIX, headers::TUNNEL_MAC_PREFIX);
        let mut f = [0u8; 64];
        f[wire::outer::VXLAN + 4..wire::outer::VXLAN + 7]
            .copy_from_slice(&headers::vni_to_bytes(0x0a0b0c));
        assert_eq!(wire::vni(&f), 0x0a0b0c);
        f[6..12].copy_from_slice(&headers::tunnel_source_mac(0x123456));
        assert_eq!(wire::tunnel_peer(&f), Some(0x123456));
    }
}
