//! Layouts of the maps shared by the eBPF programs and the daemon.
//!
//! Addresses and ports are network-order byte arrays, so a value means the
//! same on both sides without endianness conversions; ids and counters are
//! native-endian integers (both sides run on the same host). Every type has a
//! size assertion: a layout change must be deliberate.

use crate::prefix::PrefixRewrite;

/// Map names, shared by the programs (`#[map(name = ...)]`) and the daemon.
/// Kernel object names hold 15 bytes at most.
pub mod names {
    pub const CONFIG: &str = "FABRIC_CONFIG";
    pub const PEER_VIEWS: &str = "PEER_VIEWS";
    pub const PEERS: &str = "PEERS";
    pub const PEER_ENDPOINTS: &str = "PEER_ENDPOINTS";
    pub const NODE_SLICES: &str = "NODE_SLICES";
    pub const POD_INTERFACES: &str = "POD_INTERFACES";
    pub const PEER_COUNTERS: &str = "PEER_COUNTERS";
    pub const DROP_COUNTERS: &str = "DROP_COUNTERS";
}

/// Capacities. The daemon refuses configurations that do not fit.
pub const MAX_PEERS: u32 = 4096;
pub const MAX_PEER_VIEWS: u32 = 16384;
pub const MAX_NODE_SLICES: u32 = 16384;
pub const MAX_POD_INTERFACES: u32 = 4096;

/// The role a program set runs in; 0 means "not configured yet", in which
/// case every program passes every packet untouched.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Unconfigured = 0,
    Node = 1,
    Gateway = 2,
}

/// Single entry of `FABRIC_CONFIG` (an array of one).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FabricConfig {
    /// This cluster's id: the VNI a gateway sends toward peer gateways.
    pub cluster_id: u32,
    /// This host's underlay address (outer source toward the gateway/nodes).
    pub underlay_ip: [u8; 4],
    /// Node role: the gateway's underlay address (outer destination, and the
    /// only accepted outer source of arriving fabric frames).
    pub gateway_ip: [u8; 4],
    /// Gateway role: the public address peer gateways send to.
    pub public_ip: [u8; 4],
    /// UDP destination port of fabric frames.
    pub fabric_port: [u8; 2],
    /// A [`Role`] discriminant.
    pub role: u8,
    pub _reserved: u8,
    /// Gateway role: interface toward the nodes.
    pub underlay_ifindex: u32,
    /// Gateway role: interface toward peer gateways.
    pub public_ifindex: u32,
}
const _: () = assert!(core::mem::size_of::<FabricConfig>() == 28);

impl FabricConfig {
    #[inline(always)]
    pub fn role(&self) -> Role {
        match self.role {
            1 => Role::Node,
            2 => Role::Gateway,
            _ => Role::Unconfigured,
        }
    }
}

/// Value of `PEER_VIEWS`, an LPM trie keyed by the destination address: which
/// peer a local view prefix belongs to and how to turn it into the peer's
/// real prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerView {
    pub peer_id: u32,
    pub view_to_real: PrefixRewrite,
    /// Largest TCP MSS a SYN toward this view may announce (0: no clamp):
    /// the route MTU less 40 bytes of IPv4 and TCP headers.
    pub mss_clamp: u16,
    pub _reserved: u16,
}
const _: () = assert!(core::mem::size_of::<PeerView>() == 20);

/// Value of `PEERS`, keyed by peer id (= the peer's cluster id = VNI).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// Turns the peer's real pod addresses into our view of them; its source
    /// side doubles as the check that an arriving source belongs to the peer.
    pub real_to_view: PrefixRewrite,
    /// Gateway role: the peer gateway's public endpoint.
    pub endpoint_ip: [u8; 4],
    pub endpoint_port: [u8; 2],
    /// Gateway role: [`TRANSPORT_PLAIN`] or [`TRANSPORT_WIREGUARD`].
    pub transport: u8,
    pub _reserved: u8,
}
const _: () = assert!(core::mem::size_of::<Peer>() == 20);

/// Frames for this peer are re-addressed and forwarded by the gateway
/// program.
pub const TRANSPORT_PLAIN: u8 = 0;
/// Frames for this peer go up the gateway's stack to the userspace
/// WireGuard tunnel.
pub const TRANSPORT_WIREGUARD: u8 = 1;

/// Value of `NODE_SLICES`, an LPM trie keyed by a local pod address: the
/// node that owns the pod CIDR slice.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeSlice {
    pub node_ip: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<NodeSlice>() == 4);

/// Direction of traffic relative to this cluster.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    ToPeer = 0,
    FromPeer = 1,
}

/// Key of `PEER_COUNTERS` (a per-CPU hash the daemon pre-populates).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerCounterKey {
    pub peer_id: u32,
    /// A [`Direction`] discriminant.
    pub direction: u32,
}
const _: () = assert!(core::mem::size_of::<PeerCounterKey>() == 8);

/// Value of `PEER_COUNTERS`: inner packets and inner IPv4 bytes, and when
/// the last one was counted (CLOCK_BOOTTIME nanoseconds; 0 = never).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    pub packets: u64,
    pub bytes: u64,
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<TrafficCounters>() == 24);

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are #[repr(C)], contain only integers and byte
    // arrays, have no padding (checked by the size assertions) and are valid
    // for any bit pattern.
    unsafe impl aya::Pod for FabricConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PeerView {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Peer {}
    // SAFETY: as above.
    unsafe impl aya::Pod for NodeSlice {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PeerCounterKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TrafficCounters {}
}
