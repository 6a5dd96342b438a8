//! WireGuard's timers (handshake retries, rekeying, keepalives), the rate
//! limiter's window, and peers that stop answering.

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use boringtun::noise::TunnResult;
use tracing::{info, warn};

use super::{
    peers::PeerTunnel,
    shared::{refresh, Shared},
    TIMER_TICK,
};

/// WireGuard's timers (handshake retries, rekeying, keepalives), the rate
/// limiter's window, and the report of peers that stop answering.
pub(super) fn timers(shared: &Shared) {
    let mut buf = vec![0u8; 2048];
    let mut table = shared.snapshot();
    let mut generation = 0;
    let mut last_reset = Instant::now();
    let sender = &shared.wireguard[0];
    while !shared.stop.load(Ordering::Relaxed) {
        std::thread::sleep(TIMER_TICK);
        if shared.timers_paused.load(Ordering::Relaxed) {
            continue;
        }
        refresh(shared, &mut table, &mut generation);
        if last_reset.elapsed() >= Duration::from_secs(1) {
            shared.limiter.reset_count();
            last_reset = Instant::now();
        }
        let now = shared.now_ms();
        for peer in table.by_id.values() {
            let mut tunn = peer.tunn();
            if let TunnResult::WriteToNetwork(datagram) = tunn.update_timers(&mut buf) {
                if sender.send_one(peer.endpoint(), datagram).is_ok() {
                    peer.sent(1, 0, now);
                }
            }
            drop(tunn);
            report_liveness(peer, now);
        }
    }
}

fn report_liveness(peer: &PeerTunnel, now_ms: u64) {
    let since = peer.unanswered_since_ms.load(Ordering::Relaxed);
    let silent = since != 0
        && Duration::from_millis(now_ms.saturating_sub(since)) > peer.unreachable_after();
    let was_up = peer.up.swap(!silent, Ordering::Relaxed);
    if was_up && silent {
        warn!(
            peer = peer.spec.name,
            endpoint = %peer.endpoint(),
            seconds = peer.unreachable_after().as_secs(),
            "peer gateway stopped answering: no authenticated packet since we last sent. Check that its daemon runs and the path to its endpoint; traffic resumes by itself when it answers"
        );
    } else if !was_up && !silent {
        info!(peer = peer.spec.name, endpoint = %peer.endpoint(), "peer gateway answers again");
    }
}
