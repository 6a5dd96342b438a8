//! State every thread of the tunnel shares: sockets, the device, the peer
//! table and its generation, drop counters, and the hand-over state (the
//! epoch of our session indices, pausing the workers, the channel to the
//! partner process).

use std::{
    net::SocketAddr,
    os::unix::net::UnixDatagram,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
        Arc, Condvar, Mutex,
    },
    time::{Duration, Instant},
};

use boringtun::{
    noise::{rate_limiter::RateLimiter, TunnResult},
    x25519,
};

use super::{
    batch::BatchSocket,
    device::TunnelDevice,
    inbound::receiver_index,
    packet::TunnelDrop,
    peers::{PeerTable, PeerTunnel},
    EPOCH_SHIFT,
};

pub(super) struct Shared {
    pub(super) stop: AtomicBool,
    /// 0 or 1: the top bit of our session indices (see EPOCH_SHIFT).
    pub(super) epoch: u32,
    pub(super) next_slot: AtomicU32,
    /// Workers leave the sockets alone (and timers rest) while set: the
    /// other process of a hand-over reads them.
    pub(super) paused: AtomicBool,
    /// Workers currently resting.
    pub(super) parked: AtomicUsize,
    /// Timers rest too once a hand-over switched to the partner.
    pub(super) timers_paused: AtomicBool,
    /// During a hand-over, the channel to the other process: datagrams of
    /// its sessions go there, with the sender's address in front.
    pub(super) partner: Mutex<Option<Arc<UnixDatagram>>>,
    /// Signalled when `partner` is set or the tunnel stops: the partner
    /// thread sleeps on it outside hand-overs instead of polling.
    pub(super) partner_changed: Condvar,
    /// When a datagram last crossed the partner channel.
    pub(super) last_forward_ms: AtomicU64,
    /// Datagrams passed to the current partner: said with PAUSED, so the
    /// new process delivers them all before it reads the sockets itself.
    pub(super) forwarded: AtomicU64,
    /// Datagrams received from a partner and written out (or dropped).
    pub(super) partner_delivered: AtomicU64,
    pub(super) started: Instant,
    pub(super) table: Mutex<Arc<PeerTable>>,
    pub(super) generation: AtomicU64,
    pub(super) drops: [AtomicU64; TunnelDrop::ALL.len()],
    pub(super) private: x25519::StaticSecret,
    pub(super) public: x25519::PublicKey,
    pub(super) limiter: Arc<RateLimiter>,
    pub(super) inner_mtu: usize,
    pub(super) fabric: Vec<BatchSocket>,
    pub(super) wireguard: Vec<BatchSocket>,
    pub(super) device: TunnelDevice,
}

impl Shared {
    pub(super) fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub(super) fn count_drop(&self, reason: TunnelDrop) {
        self.drops[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn snapshot(&self) -> Arc<PeerTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Shared {
    /// Whether `datagram` is for a session another process made (the
    /// hand-over partner's, if there is one).
    pub(super) fn other_epoch(&self, datagram: &[u8]) -> bool {
        receiver_index(datagram).is_some_and(|i| i >> EPOCH_SHIFT != self.epoch)
    }

    /// Hands a datagram of the partner's sessions over; false when there
    /// is no partner (or it is gone).
    pub(super) fn forward(&self, from: SocketAddr, datagram: &[u8]) -> bool {
        let partner = self
            .partner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (Some(partner), SocketAddr::V4(from)) = (partner, from) else {
            return false;
        };
        let mut message = Vec::with_capacity(6 + datagram.len());
        message.extend_from_slice(&from.ip().octets());
        message.extend_from_slice(&from.port().to_be_bytes());
        message.extend_from_slice(datagram);
        let sent = partner.send(&message).is_ok();
        if sent {
            self.forwarded.fetch_add(1, Ordering::SeqCst);
            self.last_forward_ms.store(self.now_ms(), Ordering::Relaxed);
        }
        sent
    }

    /// Sends a handshake initiation to every peer now: the sessions it
    /// makes become the ones peers send with.
    pub(super) fn initiate_handshakes(&self) {
        self.initiate_handshakes_with(|_| true);
    }

    /// Sends a handshake initiation now to the peers `wanted` picks.
    pub(super) fn initiate_handshakes_with(&self, wanted: impl Fn(&PeerTunnel) -> bool) {
        let mut buf = vec![0u8; 256];
        let now = self.now_ms();
        for peer in self.snapshot().by_id.values().filter(|p| wanted(p)) {
            let mut tunn = peer.tunn();
            if let TunnResult::WriteToNetwork(datagram) =
                tunn.format_handshake_initiation(&mut buf, false)
            {
                if self.wireguard[0]
                    .send_one(peer.endpoint(), datagram)
                    .is_ok()
                {
                    peer.sent(1, 0, now);
                }
            }
        }
    }

    pub(super) fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }

    /// Pauses the workers and timers and waits until every worker has
    /// finished what it was doing (so nothing we read is sent after the
    /// partner's first).
    pub(super) fn pause_and_wait(&self) {
        self.set_paused(true);
        self.timers_paused.store(true, Ordering::Relaxed);
        let workers = self.fabric.len() + self.wireguard.len();
        while self.parked.load(Ordering::SeqCst) < workers && !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub(super) fn resume(&self) {
        self.timers_paused.store(false, Ordering::Relaxed);
        self.set_paused(false);
    }

    pub(super) fn set_partner(&self, partner: Option<UnixDatagram>) {
        let mut current = self.partner.lock().unwrap_or_else(|e| e.into_inner());
        self.forwarded.store(0, Ordering::SeqCst);
        *current = partner.map(Arc::new);
        drop(current);
        self.partner_changed.notify_all();
    }

    /// The hand-over partner's channel, waiting until there is one or the
    /// tunnel stops (`None`).
    pub(super) fn wait_for_partner(&self) -> Option<Arc<UnixDatagram>> {
        let guard = self.partner.lock().unwrap_or_else(|e| e.into_inner());
        let guard = self
            .partner_changed
            .wait_while(guard, |partner| {
                partner.is_none() && !self.stop.load(Ordering::Relaxed)
            })
            .unwrap_or_else(|e| e.into_inner());
        guard.clone()
    }
}

/// Re-reads the peer table when it changed since `generation`.
pub(super) fn refresh(shared: &Shared, table: &mut Arc<PeerTable>, generation: &mut u64) {
    let now = shared.generation.load(Ordering::Acquire);
    if now != *generation {
        *table = shared.snapshot();
        *generation = now;
    }
}
