//! The closed set of reasons a Ligo program drops a packet. Every drop is
//! counted under exactly one of these, indexed by its discriminant.

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// A frame addressed to the fabric port whose outer or VXLAN header is
    /// truncated or carries wrong flags.
    MalformedTunnelHeader = 0,
    /// The VXLAN network identifier names no configured peer.
    UnknownPeer = 1,
    /// A node received fabric traffic from an address other than its gateway.
    NotFromGateway = 2,
    /// The inner source address lies outside the sending peer's pod CIDR.
    SourceOutsidePeerCidr = 3,
    /// A gateway found no local node slice owning the inner destination.
    NoNodeForDestination = 4,
    /// A peer gateway sent a VNI other than its own cluster id.
    PeerVniMismatch = 5,
    /// The kernel refused to grow, shrink or rewrite the packet.
    RewriteFailed = 6,
    /// The encapsulated frame does not carry an IPv4 packet.
    InnerNotIpv4 = 7,
    /// A gateway received fabric traffic from a public address that is not a
    /// configured peer endpoint.
    UnknownEndpoint = 8,
    /// The inner packet ends before the header the rewrite has to update.
    TruncatedInnerPacket = 9,
}

impl DropReason {
    pub const COUNT: u32 = 10;

    pub const ALL: [DropReason; Self::COUNT as usize] = [
        Self::MalformedTunnelHeader,
        Self::UnknownPeer,
        Self::NotFromGateway,
        Self::SourceOutsidePeerCidr,
        Self::NoNodeForDestination,
        Self::PeerVniMismatch,
        Self::RewriteFailed,
        Self::InnerNotIpv4,
        Self::UnknownEndpoint,
        Self::TruncatedInnerPacket,
    ];

    /// Stable snake_case name used in `inspect` output and metric labels.
    pub const fn name(self) -> &'static str {
        match self {
            Self::MalformedTunnelHeader => "malformed_tunnel_header",
            Self::UnknownPeer => "unknown_peer",
            Self::NotFromGateway => "not_from_gateway",
            Self::SourceOutsidePeerCidr => "source_outside_peer_cidr",
            Self::NoNodeForDestination => "no_node_for_destination",
            Self::PeerVniMismatch => "peer_vni_mismatch",
            Self::RewriteFailed => "rewrite_failed",
            Self::InnerNotIpv4 => "inner_not_ipv4",
            Self::UnknownEndpoint => "unknown_endpoint",
            Self::TruncatedInnerPacket => "truncated_inner_packet",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_indexed_by_discriminant() {
        for (i, reason) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i);
        }
    }
}
