//! Traffic and drop accounting. Both maps are per-CPU: no atomics on the
//! packet path; the daemon sums the CPUs when it reads them.

use aya_ebpf::helpers::generated::bpf_ktime_get_boot_ns;
use ligo_fabric_common::{
    maps::{Direction, PeerCounterKey},
    DropReason,
};

use crate::maps::{DROP_COUNTERS, PEER_COUNTERS};

#[inline(always)]
pub fn count_drop(reason: DropReason) {
    if let Some(counter) = DROP_COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: the pointer comes from a per-CPU array slot of this CPU,
        // which no one else writes while this program runs.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
pub fn count_peer_traffic(peer_id: u32, direction: Direction, bytes: u32) {
    let key = PeerCounterKey {
        peer_id,
        direction: direction as u32,
    };
    if let Some(counters) = PEER_COUNTERS.get_ptr_mut(&key) {
        // SAFETY: per-CPU value of an entry the daemon created; only this
        // CPU writes it. bpf_ktime_get_boot_ns has no preconditions.
        unsafe {
            (*counters).packets += 1;
            (*counters).bytes += bytes as u64;
            (*counters).last_seen_ns = bpf_ktime_get_boot_ns();
        }
    }
}
