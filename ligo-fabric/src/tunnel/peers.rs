//! The peer table: each peer's live state (its boringtun `Tunn` behind its
//! own mutex, endpoint, counters, liveness) and the immutable snapshot the
//! workers read, rebuilt as a whole when the configuration changes.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use boringtun::{noise::Tunn, x25519};
use tracing::info;

use super::{
    keys::SecretKey, packet::SliceTable, shared::Shared, PeerSpec, TunnelConfig, EPOCH_SHIFT,
    SLOT_MASK,
};

/// A peer's live state, shared by all workers.
pub(super) struct PeerTunnel {
    pub(super) spec: PeerSpec,
    /// Our session indices for this peer: `epoch << 23 | slot`, shifted by
    /// 8 (boringtun keeps a session ring in the low byte).
    pub(super) index: u32,
    pub(super) tunn: Mutex<Tunn>,
    /// Current endpoint (roaming updates it): IPv4 << 16 | port.
    pub(super) endpoint: AtomicU64,
    pub(super) tx_bytes: AtomicU64,
    pub(super) tx_packets: AtomicU64,
    pub(super) rx_bytes: AtomicU64,
    pub(super) rx_packets: AtomicU64,
    /// Milliseconds since the tunnel started (0 = never).
    pub(super) last_rx_ms: AtomicU64,
    /// First send after the last receive (0 = none pending).
    pub(super) unanswered_since_ms: AtomicU64,
    pub(super) up: AtomicBool,
}

fn pack(addr: SocketAddrV4) -> u64 {
    (u64::from(u32::from(*addr.ip())) << 16) | u64::from(addr.port())
}

fn unpack(v: u64) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from((v >> 16) as u32), v as u16)
}

impl PeerTunnel {
    pub(super) fn new(spec: PeerSpec, private: &SecretKey, shared: &Shared) -> Self {
        let slot = shared.next_slot.fetch_add(1, Ordering::Relaxed) & SLOT_MASK;
        let index = shared.epoch << EPOCH_SHIFT | slot;
        let tunn = Tunn::new(
            x25519::StaticSecret::from(private.0),
            x25519::PublicKey::from(spec.public_key),
            spec.preshared_key.as_ref().map(|k| k.0),
            spec.persistent_keepalive,
            index,
            Some(shared.limiter.clone()),
        );
        PeerTunnel {
            index,
            endpoint: AtomicU64::new(pack(spec.endpoint)),
            spec,
            tunn: Mutex::new(tunn),
            tx_bytes: AtomicU64::new(0),
            tx_packets: AtomicU64::new(0),
            rx_bytes: AtomicU64::new(0),
            rx_packets: AtomicU64::new(0),
            last_rx_ms: AtomicU64::new(0),
            unanswered_since_ms: AtomicU64::new(0),
            up: AtomicBool::new(true),
        }
    }

    pub(super) fn endpoint(&self) -> SocketAddr {
        SocketAddr::V4(unpack(self.endpoint.load(Ordering::Relaxed)))
    }

    pub(super) fn tunn(&self) -> std::sync::MutexGuard<'_, Tunn> {
        // A worker that panicked while holding the lock leaves a state that
        // boringtun keeps consistent per call; keep using it.
        self.tunn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The peer proved itself from `from`: WireGuard roaming moves the
    /// endpoint there.
    pub(super) fn authenticated_from(&self, from: SocketAddr, now_ms: u64) {
        self.last_rx_ms.store(now_ms, Ordering::Relaxed);
        self.unanswered_since_ms.store(0, Ordering::Relaxed);
        let SocketAddr::V4(from) = from else { return };
        let old = self.endpoint.swap(pack(from), Ordering::Relaxed);
        if old != pack(from) {
            info!(
                peer = self.spec.name,
                from = %unpack(old),
                to = %from,
                "peer endpoint moved; following it"
            );
        }
    }

    pub(super) fn sent(&self, packets: u64, bytes: u64, now_ms: u64) {
        if packets == 0 {
            return;
        }
        self.tx_packets.fetch_add(packets, Ordering::Relaxed);
        self.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
        let _ = self.unanswered_since_ms.compare_exchange(
            0,
            now_ms.max(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// How long without an answer before the peer is reported down: two
    /// keepalive intervals and a margin, or WireGuard's passive keepalive
    /// (10 s) and a margin when keepalives are off.
    pub(super) fn unreachable_after(&self) -> Duration {
        match self.spec.persistent_keepalive {
            Some(k) => Duration::from_secs(2 * u64::from(k) + 3),
            None => Duration::from_secs(15),
        }
    }
}

/// An immutable snapshot of the peers; replaced as a whole on reload.
#[derive(Default)]
pub(super) struct PeerTable {
    /// By peer id, which is also the VNI.
    pub(super) by_id: HashMap<u32, Arc<PeerTunnel>>,
    /// By session index (without boringtun's low byte).
    pub(super) by_index: HashMap<u32, Arc<PeerTunnel>>,
    pub(super) by_key: HashMap<[u8; 32], Arc<PeerTunnel>>,
    pub(super) slices: SliceTable,
}

pub(super) fn build_table(
    config: &TunnelConfig,
    old: &PeerTable,
    shared_key: &Shared,
) -> PeerTable {
    let private = &config.private_key;
    let mut table = PeerTable {
        slices: SliceTable::new(config.node_slices.iter().map(|(n, a)| (n, a))),
        ..Default::default()
    };
    for spec in &config.peers {
        let peer = match old.by_id.get(&spec.id) {
            // Same identity and keys: keep the sessions; follow a changed
            // configured endpoint.
            Some(p)
                if PeerSpec {
                    endpoint: p.spec.endpoint,
                    ..spec.clone()
                } == p.spec =>
            {
                if p.spec.endpoint != spec.endpoint {
                    p.endpoint.store(pack(spec.endpoint), Ordering::Relaxed);
                }
                p.clone()
            }
            _ => Arc::new(PeerTunnel::new(spec.clone(), private, shared_key)),
        };
        table.by_key.insert(spec.public_key, peer.clone());
        table.by_index.insert(peer.index, peer.clone());
        table.by_id.insert(spec.id, peer);
    }
    table
}
