//! Map definitions. Layouts and names come from `ligo_fabric_common::maps`;
//! all maps are pinned by name so the daemon and `ligo-fabric inspect` can
//! open them from the pin directory.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray, PerCpuHashMap},
};
use ligo_fabric_common::{
    maps::{
        FabricConfig, NodeSlice, Peer, PeerCounterKey, PeerView, TrafficCounters, MAX_NODE_SLICES,
        MAX_PEERS, MAX_PEER_VIEWS, MAX_POD_INTERFACES,
    },
    DropReason,
};

#[map(name = "FABRIC_CONFIG")]
pub static FABRIC_CONFIG: Array<FabricConfig> = Array::pinned(1, 0);

/// Our views of peers' pod CIDRs, keyed by view prefix.
#[map(name = "PEER_VIEWS")]
pub static PEER_VIEWS: LpmTrie<[u8; 4], PeerView> = LpmTrie::pinned(MAX_PEER_VIEWS, 0);

/// Peers by id (VNI). Not preallocated, so a reader never sees an element
/// recycled by a concurrent update.
#[map(name = "PEERS")]
pub static PEERS: HashMap<u32, Peer> = HashMap::pinned(MAX_PEERS, BPF_F_NO_PREALLOC);

/// Gateway role: peer gateway public address -> peer id.
#[map(name = "PEER_ENDPOINTS")]
pub static PEER_ENDPOINTS: HashMap<[u8; 4], u32> = HashMap::pinned(MAX_PEERS, BPF_F_NO_PREALLOC);

/// Gateway role: local per-node pod CIDR slices.
#[map(name = "NODE_SLICES")]
pub static NODE_SLICES: LpmTrie<[u8; 4], NodeSlice> = LpmTrie::pinned(MAX_NODE_SLICES, 0);

/// Node role: host ends of pod veths, which `deliver` may redirect into.
/// Filled by the daemon from the interfaces it sees.
#[map(name = "POD_INTERFACES")]
pub static POD_INTERFACES: HashMap<u32, u8> =
    HashMap::pinned(MAX_POD_INTERFACES, BPF_F_NO_PREALLOC);

/// Per-peer, per-direction traffic; entries are created by the daemon.
#[map(name = "PEER_COUNTERS")]
pub static PEER_COUNTERS: PerCpuHashMap<PeerCounterKey, TrafficCounters> =
    PerCpuHashMap::pinned(MAX_PEERS * 2, 0);

/// Drops, indexed by `DropReason`.
#[map(name = "DROP_COUNTERS")]
pub static DROP_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(DropReason::COUNT, 0);

/// `LIGO_BUILD_MARKER` (a decimal number) when the programs were built, 0
/// when unset. A marker build stores it in every program's instructions
/// (below), so it loads as different programs, with different kernel tags,
/// from a build without one: how the restart test proves an upgrade really
/// swapped the programs.
const BUILD_MARKER: u32 = parse_marker(option_env!("LIGO_BUILD_MARKER"));

const fn parse_marker(text: Option<&str>) -> u32 {
    let Some(text) = text else { return 0 };
    let bytes = text.as_bytes();
    let mut value = 0u32;
    let mut i = 0;
    while i < bytes.len() {
        assert!(
            bytes[i].is_ascii_digit(),
            "LIGO_BUILD_MARKER must be a decimal number"
        );
        value = value * 10 + (bytes[i] - b'0') as u32;
        i += 1;
    }
    value
}

/// A copy of the current configuration, or `None` before the daemon wrote it.
#[inline(always)]
pub fn config() -> Option<FabricConfig> {
    // Folded away in a build without a marker: the packet path pays
    // nothing; a marker build carries one stack write.
    if BUILD_MARKER != 0 {
        let mut marker = 0u32;
        // SAFETY: `marker` is a live, aligned local; the volatile store
        // exists only to keep BUILD_MARKER in the instructions.
        unsafe { core::ptr::write_volatile(&mut marker, BUILD_MARKER) };
    }
    FABRIC_CONFIG.get(0).copied()
}

#[inline(always)]
pub fn lpm_key(addr: [u8; 4]) -> Key<[u8; 4]> {
    Key::new(32, addr)
}

#[inline(always)]
pub fn peer(peer_id: u32) -> Option<Peer> {
    // SAFETY: PEERS is not preallocated: elements are freed after an RCU
    // grace period, so the value stays valid while we copy it out.
    unsafe { PEERS.get(&peer_id) }.copied()
}
