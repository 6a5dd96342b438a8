//! The gateway's userspace WireGuard tunnel (boringtun's protocol engine),
//! for peers with `transport = "wireguard"`.
//!
//! - Outbound: the gateway program passes node frames for such peers up the
//!   stack to a UDP socket on `underlay_ip:fabric_port`. A worker reads them
//!   in batches (recvmmsg + GRO), cuts GSO super-packets to the tunnel MTU,
//!   encrypts each packet and sends runs of equal-sized datagrams to the
//!   peer with one UDP GSO send.
//! - Inbound: a worker reads WireGuard datagrams from `public_ip:port`
//!   (recvmmsg + GRO), decrypts, checks the inner source against the peer's
//!   pod CIDR (cryptokey routing), coalesces TCP segments as GRO would and
//!   writes them to the tunnel device (a TAP, see `device`), one GSO
//!   super-packet per write; its program wraps them in VXLAN for the node.
//! - One outbound and one inbound worker per core, each with its own
//!   SO_REUSEPORT sockets; the peer table is an immutable snapshot each
//!   worker re-reads only when its generation changes. A peer's protocol
//!   state sits behind that peer's own mutex, taken once per batch.
//! - A timer thread drives handshakes, rekeying and keepalives, and reports
//!   peers that stop answering.

pub mod batch;
pub mod config;
pub mod device;
pub mod handover;
pub mod keys;
pub mod packet;
pub mod status;

use std::{
    collections::HashMap,
    io::IoSliceMut,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    os::unix::net::UnixDatagram,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
        Arc, Condvar, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use boringtun::{
    noise::{
        errors::WireGuardError, handshake::parse_handshake_anon, rate_limiter::RateLimiter, Packet,
        Tunn, TunnResult,
    },
    x25519,
};
use quinn_udp::RecvMeta;
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{info, warn};

pub use self::config::{PeerSpec, TunnelConfig, TunnelSpec};

use self::{
    batch::{BatchSocket, GsoBatch},
    device::TunnelDevice,
    keys::{public_key_base64, SecretKey},
    packet::{for_each_tunnel_packet, parse_fabric_payload, Coalescer, SliceTable, TunnelDrop},
};

/// Handshake initiations per second per peer before cookies are demanded.
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// Receive buffers per worker, each big enough for a GRO batch or a
/// GSO super-frame.
const RECV_BATCH: usize = 16;
const RECV_BUF: usize = 65_536;
/// How often WireGuard timers run.
const TIMER_TICK: Duration = Duration::from_millis(100);
/// Session indices (24 bits before boringtun's shift) carry the epoch of
/// the process that made them in their top bit, so during a hand-over
/// (`handover.rs`) each process knows which datagrams are the other's.
const EPOCH_SHIFT: u32 = 23;
const SLOT_MASK: u32 = (1 << EPOCH_SHIFT) - 1;

/// A peer's live state, shared by all workers.
struct PeerTunnel {
    spec: PeerSpec,
    /// Our session indices for this peer: `epoch << 23 | slot`, shifted by
    /// 8 (boringtun keeps a session ring in the low byte).
    index: u32,
    tunn: Mutex<Tunn>,
    /// Current endpoint (roaming updates it): IPv4 << 16 | port.
    endpoint: AtomicU64,
    tx_bytes: AtomicU64,
    tx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    rx_packets: AtomicU64,
    /// Milliseconds since the tunnel started (0 = never).
    last_rx_ms: AtomicU64,
    /// First send after the last receive (0 = none pending).
    unanswered_since_ms: AtomicU64,
    up: AtomicBool,
}

fn pack(addr: SocketAddrV4) -> u64 {
    (u64::from(u32::from(*addr.ip())) << 16) | u64::from(addr.port())
}

fn unpack(v: u64) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from((v >> 16) as u32), v as u16)
}

impl PeerTunnel {
    fn new(spec: PeerSpec, private: &SecretKey, shared: &Shared) -> Self {
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

    fn endpoint(&self) -> SocketAddr {
        SocketAddr::V4(unpack(self.endpoint.load(Ordering::Relaxed)))
    }

    fn tunn(&self) -> std::sync::MutexGuard<'_, Tunn> {
        // A worker that panicked while holding the lock leaves a state that
        // boringtun keeps consistent per call; keep using it.
        self.tunn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The peer proved itself from `from`: WireGuard roaming moves the
    /// endpoint there.
    fn authenticated_from(&self, from: SocketAddr, now_ms: u64) {
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

    fn sent(&self, packets: u64, bytes: u64, now_ms: u64) {
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
    fn unreachable_after(&self) -> Duration {
        match self.spec.persistent_keepalive {
            Some(k) => Duration::from_secs(2 * u64::from(k) + 3),
            None => Duration::from_secs(15),
        }
    }
}

/// An immutable snapshot of the peers; replaced as a whole on reload.
#[derive(Default)]
struct PeerTable {
    /// By peer id, which is also the VNI.
    by_id: HashMap<u32, Arc<PeerTunnel>>,
    /// By session index (without boringtun's low byte).
    by_index: HashMap<u32, Arc<PeerTunnel>>,
    by_key: HashMap<[u8; 32], Arc<PeerTunnel>>,
    slices: SliceTable,
}

struct Shared {
    stop: AtomicBool,
    /// 0 or 1: the top bit of our session indices (see EPOCH_SHIFT).
    epoch: u32,
    next_slot: AtomicU32,
    /// Workers leave the sockets alone (and timers rest) while set: the
    /// other process of a hand-over reads them.
    paused: AtomicBool,
    /// Workers currently resting.
    parked: AtomicUsize,
    /// Timers rest too once a hand-over switched to the partner.
    timers_paused: AtomicBool,
    /// During a hand-over, the channel to the other process: datagrams of
    /// its sessions go there, with the sender's address in front.
    partner: Mutex<Option<Arc<UnixDatagram>>>,
    /// Signalled when `partner` is set or the tunnel stops: the partner
    /// thread sleeps on it outside hand-overs instead of polling.
    partner_changed: Condvar,
    /// When a datagram last crossed the partner channel.
    last_forward_ms: AtomicU64,
    started: Instant,
    table: Mutex<Arc<PeerTable>>,
    generation: AtomicU64,
    drops: [AtomicU64; TunnelDrop::ALL.len()],
    private: x25519::StaticSecret,
    public: x25519::PublicKey,
    limiter: Arc<RateLimiter>,
    inner_mtu: usize,
    fabric: Vec<BatchSocket>,
    wireguard: Vec<BatchSocket>,
    device: TunnelDevice,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn count_drop(&self, reason: TunnelDrop) {
        self.drops[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Arc<PeerTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The running tunnel. Dropping it stops the workers.
pub struct Tunnel {
    shared: Arc<Shared>,
    config: TunnelConfig,
    threads: Vec<JoinHandle<()>>,
}

/// Per-peer figures for metrics and `inspect tunnels`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    pub id: u32,
    pub name: String,
    pub public_key: String,
    pub endpoint: String,
    pub latest_handshake_seconds_ago: Option<f64>,
    pub up: bool,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub rx_bytes: u64,
    pub rx_packets: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TunnelStatus {
    pub public_key: String,
    pub listen: String,
    pub inner_mtu: usize,
    pub peers: Vec<PeerStatus>,
    pub drops: Vec<(String, u64)>,
}

/// The running tunnel's state and its listen address.
type RunningTunnel = (Arc<Shared>, String);

/// A handle the metrics endpoint reads; empty until a tunnel runs.
#[derive(Clone, Default)]
pub struct StatusSource(Arc<Mutex<Option<RunningTunnel>>>);

impl StatusSource {
    pub fn status(&self) -> Option<TunnelStatus> {
        let guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (shared, listen) = guard.as_ref()?;
        Some(status(shared, listen))
    }

    /// The running tunnel's state (for a hand-over).
    fn running(&self) -> Option<Arc<Shared>> {
        let guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        guard.as_ref().map(|(shared, _)| shared.clone())
    }

    fn set(&self, value: Option<(Arc<Shared>, String)>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = value;
    }
}

fn status(shared: &Shared, listen: &str) -> TunnelStatus {
    let table = shared.snapshot();
    let mut peers: Vec<PeerStatus> = table
        .by_id
        .values()
        .map(|p| {
            let (handshake, ..) = p.tunn().stats();
            PeerStatus {
                id: p.spec.id,
                name: p.spec.name.clone(),
                public_key: public_key_base64(&p.spec.public_key),
                endpoint: p.endpoint().to_string(),
                latest_handshake_seconds_ago: handshake.map(|d| d.as_secs_f64()),
                up: p.up.load(Ordering::Relaxed),
                tx_bytes: p.tx_bytes.load(Ordering::Relaxed),
                tx_packets: p.tx_packets.load(Ordering::Relaxed),
                rx_bytes: p.rx_bytes.load(Ordering::Relaxed),
                rx_packets: p.rx_packets.load(Ordering::Relaxed),
            }
        })
        .collect();
    peers.sort_by_key(|p| p.id);
    TunnelStatus {
        public_key: public_key_base64(shared.public.as_bytes()),
        listen: listen.to_string(),
        inner_mtu: shared.inner_mtu,
        peers,
        drops: TunnelDrop::ALL
            .iter()
            .map(|r| {
                (
                    r.label().to_string(),
                    shared.drops[r.index()].load(Ordering::Relaxed),
                )
            })
            .collect(),
    }
}

/// Which socket: frames to and from nodes, or WireGuard to peers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SocketRole {
    Fabric,
    Wireguard,
}

fn reuseport_socket(addr: SocketAddrV4, role: SocketRole) -> Result<BatchSocket> {
    let what = match role {
        SocketRole::Fabric => "fabric (from nodes)",
        SocketRole::Wireguard => "WireGuard",
    };
    let make = || -> std::io::Result<UdpSocket> {
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        socket.set_reuse_port(true)?;
        if role == SocketRole::Fabric {
            // Fabric frames carry UDP checksum 0 (RFC 7348 allows it over
            // IPv4), as the gateway program sends them. It also keeps the
            // frame from reaching a node over veth as CHECKSUM_PARTIAL for
            // the outer header, which the node program's inner checksum
            // updates would misread.
            set_no_udp_checksum(&socket)?;
        }
        // Best effort: bursts of GSO-sized batches need deep buffers.
        let _ = socket.set_recv_buffer_size(8 << 20);
        let _ = socket.set_send_buffer_size(8 << 20);
        socket.bind(&addr.into())?;
        Ok(socket.into())
    };
    let socket = make().with_context(|| format!("binding the {what} socket on {addr}"))?;
    BatchSocket::new(socket).with_context(|| format!("setting up the {what} socket on {addr}"))
}

fn set_no_udp_checksum(socket: &Socket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: SO_NO_CHECK takes an int; the pointer and length describe `on`.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NO_CHECK,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn build_table(config: &TunnelConfig, old: &PeerTable, shared_key: &Shared) -> PeerTable {
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

/// Sockets and session-index epoch a taking-over process inherits from
/// the one it replaces (`handover.rs`).
pub struct Inherited {
    pub epoch: u32,
    pub wireguard: Vec<UdpSocket>,
    pub fabric: Vec<UdpSocket>,
    pub partner: UnixDatagram,
}

impl Tunnel {
    /// Binds the sockets and starts the workers and the timer thread.
    pub fn start(config: TunnelConfig, source: &StatusSource) -> Result<Tunnel> {
        Self::start_with(config, source, None)
    }

    /// Starts on the sockets of the process it takes over from, its
    /// workers paused (that process still reads the sockets) until
    /// [`Tunnel::resume`].
    pub fn take_over(
        config: TunnelConfig,
        source: &StatusSource,
        inherited: Inherited,
    ) -> Result<Tunnel> {
        Self::start_with(config, source, Some(inherited))
    }

    fn start_with(
        config: TunnelConfig,
        source: &StatusSource,
        inherited: Option<Inherited>,
    ) -> Result<Tunnel> {
        let (epoch, fabric, wireguard, partner) = match inherited {
            Some(i) => {
                let wrap = |sockets: Vec<UdpSocket>| -> Result<Vec<BatchSocket>> {
                    sockets
                        .into_iter()
                        .map(|s| BatchSocket::new(s).context("taking over a tunnel socket"))
                        .collect()
                };
                (
                    i.epoch,
                    wrap(i.fabric)?,
                    wrap(i.wireguard)?,
                    Some(Arc::new(i.partner)),
                )
            }
            None => {
                let workers = std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1);
                let mut fabric = Vec::new();
                let mut wireguard = Vec::new();
                for _ in 0..workers {
                    fabric.push(reuseport_socket(config.underlay, SocketRole::Fabric)?);
                    wireguard.push(reuseport_socket(config.public, SocketRole::Wireguard)?);
                }
                (0, fabric, wireguard, None)
            }
        };
        if fabric.is_empty() || fabric.len() != wireguard.len() {
            bail!(
                "{} fabric and {} WireGuard sockets: need the same number, at least one",
                fabric.len(),
                wireguard.len()
            );
        }
        let workers = fabric.len();
        let paused = partner.is_some();
        // One queue per inbound worker and one for datagrams a hand-over
        // partner passes on.
        let device = TunnelDevice::open(workers + 1)?;
        let private = x25519::StaticSecret::from(config.private_key.0);
        let public = x25519::PublicKey::from(&private);
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            epoch,
            next_slot: AtomicU32::new(1),
            paused: AtomicBool::new(paused),
            parked: AtomicUsize::new(0),
            timers_paused: AtomicBool::new(false),
            partner: Mutex::new(partner),
            partner_changed: Condvar::new(),
            last_forward_ms: AtomicU64::new(0),
            started: Instant::now(),
            table: Mutex::new(Arc::new(PeerTable::default())),
            generation: AtomicU64::new(0),
            drops: Default::default(),
            limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            private,
            public,
            inner_mtu: config.inner_mtu,
            fabric,
            wireguard,
            device,
        });
        let table = build_table(&config, &PeerTable::default(), &shared);
        *shared.table.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
        shared.generation.fetch_add(1, Ordering::Release);

        let mut threads = Vec::new();
        for i in 0..workers {
            let s = shared.clone();
            threads.push(spawn(format!("ligo-wg-out-{i}"), move || outbound(&s, i))?);
            let s = shared.clone();
            threads.push(spawn(format!("ligo-wg-in-{i}"), move || inbound(&s, i))?);
        }
        let s = shared.clone();
        threads.push(spawn("ligo-wg-timers".into(), move || timers(&s))?);
        let s = shared.clone();
        threads.push(spawn("ligo-wg-partner".into(), move || {
            from_partner(&s, workers)
        })?);
        source.set(Some((shared.clone(), config.public.to_string())));
        info!(
            listen = %config.public,
            public_key = public_key_base64(shared.public.as_bytes()),
            peers = config.peers.len(),
            workers,
            inner_mtu = config.inner_mtu,
            epoch,
            "WireGuard tunnel up"
        );
        Ok(Tunnel {
            shared,
            config,
            threads,
        })
    }

    /// Takes a new configuration. Peers whose keys are unchanged keep their
    /// sessions; a new private key or address needs a new tunnel (the
    /// caller restarts it).
    pub fn needs_restart_for(&self, config: &TunnelConfig) -> bool {
        self.config.private_key != config.private_key
            || self.config.public != config.public
            || self.config.underlay != config.underlay
            || self.config.inner_mtu != config.inner_mtu
    }

    pub fn update(&mut self, config: TunnelConfig) {
        let old = self.shared.snapshot();
        let table = build_table(&config, &old, &self.shared);
        *self.shared.table.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
        self.shared.generation.fetch_add(1, Ordering::Release);
        self.config = config;
    }

    /// Sends a handshake initiation to every peer now (a taking-over
    /// process makes its own sessions).
    pub fn initiate_handshakes(&self) {
        self.shared.initiate_handshakes();
    }

    /// Whether every peer has a session with us.
    pub fn sessions_ready(&self) -> bool {
        self.shared
            .snapshot()
            .by_id
            .values()
            .all(|p| p.tunn().stats().0.is_some())
    }

    /// Lets paused workers read the sockets.
    pub fn resume(&self) {
        self.shared.resume();
    }

    /// Time since a datagram last crossed the hand-over channel.
    pub fn partner_quiet_for(&self) -> Duration {
        let last = self.shared.last_forward_ms.load(Ordering::Relaxed);
        Duration::from_millis(self.shared.now_ms().saturating_sub(last))
    }

    /// Closes the hand-over channel.
    pub fn end_partnership(&self) {
        self.shared.set_partner(None);
    }

    /// Stops the workers (see `Drop`) and the status it gave `source`.
    pub fn stop(self, source: &StatusSource) {
        source.set(None);
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        {
            // Under the partner lock, so the partner thread cannot miss it
            // between its check and its wait.
            let _partner = self
                .shared
                .partner
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.shared.stop.store(true, Ordering::Relaxed);
        }
        self.shared.partner_changed.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(f)
        .with_context(|| format!("starting thread {name}"))
}

/// The receiver index of a handshake response, cookie reply or data
/// datagram (without boringtun's low byte).
fn receiver_index(datagram: &[u8]) -> Option<u32> {
    let at = match datagram.first()? {
        2 => 8,
        3 | 4 => 4,
        _ => return None,
    };
    let b = datagram.get(at..at + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) >> 8)
}

impl Shared {
    /// Whether `datagram` is for a session another process made (the
    /// hand-over partner's, if there is one).
    fn other_epoch(&self, datagram: &[u8]) -> bool {
        receiver_index(datagram).is_some_and(|i| i >> EPOCH_SHIFT != self.epoch)
    }

    /// Hands a datagram of the partner's sessions over; false when there
    /// is no partner (or it is gone).
    fn forward(&self, from: SocketAddr, datagram: &[u8]) -> bool {
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
            self.last_forward_ms.store(self.now_ms(), Ordering::Relaxed);
        }
        sent
    }

    /// Sends a handshake initiation to every peer now: the sessions it
    /// makes become the ones peers send with.
    fn initiate_handshakes(&self) {
        let mut buf = vec![0u8; 256];
        let now = self.now_ms();
        for peer in self.snapshot().by_id.values() {
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

    fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }

    /// Pauses the workers and timers and waits until every worker has
    /// finished what it was doing (so nothing we read is sent after the
    /// partner's first).
    fn pause_and_wait(&self) {
        self.set_paused(true);
        self.timers_paused.store(true, Ordering::Relaxed);
        let workers = self.fabric.len() + self.wireguard.len();
        while self.parked.load(Ordering::SeqCst) < workers && !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn resume(&self) {
        self.timers_paused.store(false, Ordering::Relaxed);
        self.set_paused(false);
    }

    fn set_partner(&self, partner: Option<UnixDatagram>) {
        *self.partner.lock().unwrap_or_else(|e| e.into_inner()) = partner.map(Arc::new);
        self.partner_changed.notify_all();
    }

    /// The hand-over partner's channel, waiting until there is one or the
    /// tunnel stops (`None`).
    fn wait_for_partner(&self) -> Option<Arc<UnixDatagram>> {
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

/// Datagrams the hand-over partner read that belong to our sessions.
fn from_partner(shared: &Shared, queue: usize) {
    let mut buf = vec![0u8; RECV_BUF + 6];
    let mut plain = vec![0u8; RECV_BUF];
    let mut coalescer = Coalescer::default();
    let mut write = |frame: &[u8]| {
        if shared.device.write(queue, frame).is_err() {
            shared.count_drop(TunnelDrop::SendFailed);
        }
    };
    let mut table = shared.snapshot();
    let mut generation = 0;
    while !shared.stop.load(Ordering::Relaxed) {
        let Some(partner) = shared.wait_for_partner() else {
            continue;
        };
        let _ = partner.set_read_timeout(Some(Duration::from_millis(100)));
        let Ok(n) = partner.recv(&mut buf) else {
            coalescer.flush(&mut write);
            continue;
        };
        refresh(shared, &mut table, &mut generation);
        if n < 6 {
            continue;
        }
        shared
            .last_forward_ms
            .store(shared.now_ms(), Ordering::Relaxed);
        let from = SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::new(buf[0], buf[1], buf[2], buf[3]),
            u16::from_be_bytes([buf[4], buf[5]]),
        ));
        decrypt_datagram(
            shared,
            &table,
            from,
            &buf[6..n],
            &mut plain,
            &mut |peer, packet| coalescer.push(peer, packet, &mut write),
            &shared.wireguard[0],
        );
        coalescer.flush(&mut write);
    }
}

/// Re-reads the peer table when it changed since `generation`.
fn refresh(shared: &Shared, table: &mut Arc<PeerTable>, generation: &mut u64) {
    let now = shared.generation.load(Ordering::Acquire);
    if now != *generation {
        *table = shared.snapshot();
        *generation = now;
    }
}

/// Receives a batch into `bufs`; `None` on timeout or a transient error.
fn receive(sender: &BatchSocket, bufs: &mut [Vec<u8>], metas: &mut [RecvMeta]) -> Option<usize> {
    // Short enough that a pause (hand-over) or shutdown is noticed fast.
    if !sender.wait_readable(50) {
        return None;
    }
    let mut slices: Vec<IoSliceMut<'_>> = bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
    match sender
        .state
        .recv((&sender.socket).into(), &mut slices, metas)
    {
        Ok(n) => Some(n),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::Interrupted
            ) =>
        {
            None
        }
        Err(e) => {
            warn!(error = %e, "tunnel socket receive failed; retrying");
            std::thread::sleep(Duration::from_millis(10));
            None
        }
    }
}

/// What a worker does with each received datagram, and after each batch.
enum Received<'a> {
    Datagram(&'a PeerTable, SocketAddr, &'a [u8]),
    BatchDone,
}

/// A worker's loop: receives batches on `socket` until shutdown (GRO
/// batches split at their stride), with the peer table current.
fn serve(shared: &Shared, socket: &BatchSocket, mut handle: impl FnMut(Received<'_>)) {
    let mut bufs = vec![vec![0u8; RECV_BUF]; RECV_BATCH];
    let mut metas = vec![RecvMeta::default(); RECV_BATCH];
    let mut table = shared.snapshot();
    let mut generation = 0;
    while !shared.stop.load(Ordering::Relaxed) {
        if shared.paused.load(Ordering::SeqCst) {
            shared.parked.fetch_add(1, Ordering::SeqCst);
            while shared.paused.load(Ordering::SeqCst) && !shared.stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(1));
            }
            shared.parked.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let Some(n) = receive(socket, &mut bufs, &mut metas) else {
            continue;
        };
        refresh(shared, &mut table, &mut generation);
        for (buf, meta) in bufs.iter().zip(&metas).take(n) {
            for datagram in buf[..meta.len].chunks(meta.stride.max(1)) {
                handle(Received::Datagram(&table, meta.addr, datagram));
            }
        }
        handle(Received::BatchDone);
    }
}

/// Node frames in, encrypted datagrams out.
fn outbound(shared: &Shared, worker: usize) {
    let wireguard = &shared.wireguard[worker];
    let mut scratch = Vec::with_capacity(RECV_BUF);
    let mut batch = GsoBatch::new(wireguard.state.max_gso_segments());
    serve(shared, &shared.fabric[worker], |received| match received {
        Received::Datagram(table, _, frame) => {
            if let Err(reason) =
                encrypt_frame(shared, table, frame, &mut scratch, &mut batch, wireguard)
            {
                shared.count_drop(reason);
            }
        }
        Received::BatchDone => {
            batch.flush(wireguard);
        }
    });
}

fn encrypt_frame(
    shared: &Shared,
    table: &PeerTable,
    frame: &[u8],
    scratch: &mut Vec<u8>,
    batch: &mut GsoBatch,
    wireguard: &BatchSocket,
) -> Result<(), TunnelDrop> {
    let (vni, inner) = parse_fabric_payload(frame)?;
    let peer = table.by_id.get(&vni).ok_or(TunnelDrop::UnknownPeer)?;
    let endpoint = peer.endpoint();
    let mut tunn = peer.tunn();
    let (mut packets, mut bytes) = (0u64, 0u64);
    let mut failure = None;
    for_each_tunnel_packet(inner, shared.inner_mtu, scratch, |packet| {
        let reserved = packet.len() + 32;
        let room = batch.reserve(endpoint, reserved.max(148), wireguard);
        let kept = match tunn.encapsulate(packet, room) {
            TunnResult::WriteToNetwork(datagram) if datagram.first() == Some(&4) => {
                packets += 1;
                bytes += packet.len() as u64;
                datagram.len()
            }
            // No session yet: boringtun queued the packet and asks to send
            // a handshake initiation.
            TunnResult::WriteToNetwork(handshake) => {
                let _ = wireguard.send_one(endpoint, handshake);
                0
            }
            TunnResult::Err(_) => {
                failure = Some(TunnelDrop::HandshakeRefused);
                0
            }
            _ => 0,
        };
        batch.commit(reserved.max(148), kept);
    })?;
    drop(tunn);
    peer.sent(packets, bytes, shared.now_ms());
    failure.map_or(Ok(()), Err)
}

/// Why a datagram found no peer of ours.
enum NoPeer {
    /// Refused and counted.
    Dropped,
    /// Under load: send this many bytes of cookie reply back.
    Cookie(usize),
}

/// Which peer a WireGuard datagram is for, by its receiver index (our
/// session index, shifted by 8 as boringtun keeps a session ring below it)
/// or, for a handshake initiation, by the sender's static key.
fn peer_for_datagram(
    shared: &Shared,
    table: &PeerTable,
    from: SocketAddr,
    datagram: &[u8],
    cookie: &mut [u8],
) -> Result<Arc<PeerTunnel>, NoPeer> {
    let by_index = || -> Result<Arc<PeerTunnel>, NoPeer> {
        let index = receiver_index(datagram).ok_or_else(|| {
            shared.count_drop(TunnelDrop::MalformedDatagram);
            NoPeer::Dropped
        })?;
        table.by_index.get(&index).cloned().ok_or_else(|| {
            shared.count_drop(TunnelDrop::UnknownPeer);
            NoPeer::Dropped
        })
    };
    match datagram.first() {
        Some(2..=4) => by_index(),
        Some(1) => {
            let packet = match shared
                .limiter
                .verify_packet(Some(from.ip()), datagram, cookie)
            {
                Ok(Packet::HandshakeInit(p)) => p,
                Ok(_) => {
                    shared.count_drop(TunnelDrop::MalformedDatagram);
                    return Err(NoPeer::Dropped);
                }
                Err(TunnResult::WriteToNetwork(reply)) => {
                    shared.count_drop(TunnelDrop::HandshakeRefused);
                    return Err(NoPeer::Cookie(reply.len()));
                }
                Err(TunnResult::Err(e)) => {
                    shared.count_drop(classify(&e));
                    return Err(NoPeer::Dropped);
                }
                Err(_) => return Err(NoPeer::Dropped),
            };
            let half =
                parse_handshake_anon(&shared.private, &shared.public, &packet).map_err(|e| {
                    shared.count_drop(classify(&e));
                    NoPeer::Dropped
                })?;
            table
                .by_key
                .get(&half.peer_static_public)
                .cloned()
                .ok_or_else(|| {
                    shared.count_drop(TunnelDrop::UnknownPeer);
                    NoPeer::Dropped
                })
        }
        _ => {
            shared.count_drop(TunnelDrop::MalformedDatagram);
            Err(NoPeer::Dropped)
        }
    }
}

fn classify(e: &WireGuardError) -> TunnelDrop {
    match e {
        WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter => TunnelDrop::Replayed,
        WireGuardError::WrongKey
        | WireGuardError::InvalidMac
        | WireGuardError::InvalidAeadTag
        | WireGuardError::WrongTai64nTimestamp
        | WireGuardError::InvalidTai64nTimestamp => TunnelDrop::AuthenticationFailed,
        WireGuardError::WrongIndex | WireGuardError::NoCurrentSession => TunnelDrop::UnknownPeer,
        WireGuardError::UnderLoad | WireGuardError::UnexpectedPacket => {
            TunnelDrop::HandshakeRefused
        }
        _ => TunnelDrop::MalformedDatagram,
    }
}

/// WireGuard datagrams in; decrypted packets out to the tunnel device,
/// whose program sends them on to the nodes.
fn inbound(shared: &Shared, worker: usize) {
    let wireguard = &shared.wireguard[worker];
    let mut plain = vec![0u8; RECV_BUF];
    let mut coalescer = Coalescer::default();
    let mut write = |frame: &[u8]| {
        if shared.device.write(worker, frame).is_err() {
            shared.count_drop(TunnelDrop::SendFailed);
        }
    };
    serve(shared, wireguard, |received| match received {
        Received::Datagram(table, from, datagram) => {
            if shared.other_epoch(datagram) {
                // What we decrypted before reaches the device before what
                // the partner decrypts of this: order across a hand-over's
                // session switch.
                coalescer.flush(&mut write);
                if shared.forward(from, datagram) {
                    return;
                }
            }
            decrypt_datagram(
                shared,
                table,
                from,
                datagram,
                &mut plain,
                &mut |peer, packet| coalescer.push(peer, packet, &mut write),
                wireguard,
            )
        }
        Received::BatchDone => coalescer.flush(&mut write),
    });
}

fn decrypt_datagram(
    shared: &Shared,
    table: &PeerTable,
    from: SocketAddr,
    datagram: &[u8],
    plain: &mut [u8],
    deliver: &mut impl FnMut(u32, &[u8]),
    wireguard: &BatchSocket,
) {
    let from = match from {
        // The socket is IPv4; map an IPv4-mapped address back.
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(ip) => SocketAddr::new(IpAddr::V4(ip), v6.port()),
            None => return shared.count_drop(TunnelDrop::MalformedDatagram),
        },
        v4 => v4,
    };
    let peer = match peer_for_datagram(shared, table, from, datagram, plain) {
        Ok(peer) => peer,
        Err(NoPeer::Cookie(len)) => {
            let _ = wireguard.send_one(from, &plain[..len]);
            return;
        }
        Err(NoPeer::Dropped) => return,
    };
    let now = shared.now_ms();
    let mut tunn = peer.tunn();
    match tunn.decapsulate(Some(from.ip()), datagram, plain) {
        TunnResult::WriteToTunnelV4(packet, source) => {
            peer.authenticated_from(from, now);
            if !peer.spec.pod_cidr.contains(source) {
                return shared.count_drop(TunnelDrop::SourceNotAllowed);
            }
            let Some(dst) = packet.get(16..20) else {
                return shared.count_drop(TunnelDrop::MalformedPacket);
            };
            if table
                .slices
                .lookup([dst[0], dst[1], dst[2], dst[3]])
                .is_none()
            {
                return shared.count_drop(TunnelDrop::NoNodeForDestination);
            }
            peer.rx_packets.fetch_add(1, Ordering::Relaxed);
            peer.rx_bytes
                .fetch_add(packet.len() as u64, Ordering::Relaxed);
            deliver(peer.spec.id, packet);
        }
        TunnResult::WriteToTunnelV6(..) => shared.count_drop(TunnelDrop::NotIpv4),
        TunnResult::WriteToNetwork(reply) => {
            if matches!(datagram.first(), Some(1) | Some(2)) {
                peer.authenticated_from(from, now);
            }
            let _ = wireguard.send_one(from, reply);
            // A completed handshake releases the packets boringtun queued
            // while it ran.
            for _ in 0..256 {
                match tunn.decapsulate(None, &[], plain) {
                    TunnResult::WriteToNetwork(queued) => {
                        let _ = wireguard.send_one(peer.endpoint(), queued);
                    }
                    _ => break,
                }
            }
        }
        TunnResult::Done => {
            // A keepalive (authenticated, empty) or a cookie reply.
            if datagram.first() == Some(&4) {
                peer.authenticated_from(from, now);
            }
        }
        TunnResult::Err(e) => shared.count_drop(classify(&e)),
    }
}

/// WireGuard's timers (handshake retries, rekeying, keepalives), the rate
/// limiter's window, and the report of peers that stop answering.
fn timers(shared: &Shared) {
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
