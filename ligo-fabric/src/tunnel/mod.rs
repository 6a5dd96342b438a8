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
//!
//! Here: starting, updating and stopping the tunnel. By concern: `config`
//! (what it runs with, and how the daemon hands it over), `peers` (the peer
//! table), `shared` (state all threads share, hand-over state included),
//! `sockets` (binding, the receive loop), `outbound`, `inbound`, `timers`,
//! `packet` (pure packet code), `batch` (GSO sends), `device` (the TAP),
//! `keys`, `status` (figures and the status socket), `handover`.

pub mod batch;
pub mod config;
pub mod device;
pub mod handover;
mod inbound;
pub mod keys;
mod outbound;
pub mod packet;
mod peers;
mod shared;
mod sockets;
pub mod status;
mod timers;

use std::{
    net::UdpSocket,
    os::unix::net::UnixDatagram,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
        Arc, Condvar, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use boringtun::{noise::rate_limiter::RateLimiter, x25519};
use tracing::info;

pub use self::{
    config::{PeerSpec, TunnelConfig, TunnelSpec},
    status::{PeerStatus, StatusSource, TunnelStatus},
};

use self::{
    batch::BatchSocket,
    device::TunnelDevice,
    inbound::{from_partner, inbound},
    keys::public_key_base64,
    outbound::outbound,
    peers::{build_table, PeerTable},
    shared::Shared,
    sockets::{reuseport_socket, SocketRole},
    timers::timers,
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

/// The running tunnel. Dropping it stops the workers.
pub struct Tunnel {
    shared: Arc<Shared>,
    config: TunnelConfig,
    threads: Vec<JoinHandle<()>>,
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
            forwarded: AtomicU64::new(0),
            partner_delivered: AtomicU64::new(0),
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

        // The threads belong to the tunnel from the first one on: if a later
        // one cannot start, dropping the tunnel stops and joins those that
        // did.
        let mut tunnel = Tunnel {
            shared: shared.clone(),
            config,
            threads: Vec::new(),
        };
        for i in 0..workers {
            let s = shared.clone();
            tunnel
                .threads
                .push(spawn(format!("ligo-wg-out-{i}"), move || outbound(&s, i))?);
            let s = shared.clone();
            tunnel
                .threads
                .push(spawn(format!("ligo-wg-in-{i}"), move || inbound(&s, i))?);
        }
        let s = shared.clone();
        tunnel
            .threads
            .push(spawn("ligo-wg-timers".into(), move || timers(&s))?);
        let s = shared.clone();
        tunnel
            .threads
            .push(spawn("ligo-wg-partner".into(), move || {
                from_partner(&s, workers)
            })?);
        if !paused {
            shared.initiate_handshakes_with(|p| p.spec.persistent_keepalive.is_some());
        }
        let config = &tunnel.config;
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
        Ok(tunnel)
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
        // A peer with keepalives is one we keep a session with: like
        // wireguard-go, start it now rather than at the first keepalive, so
        // a new peering is usable (and reported up) within a round trip.
        if !self.shared.paused.load(Ordering::Relaxed) {
            self.shared.initiate_handshakes_with(|p| {
                p.spec.persistent_keepalive.is_some()
                    && old.by_id.get(&p.spec.id).is_none_or(|o| o.index != p.index)
            });
        }
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

    /// Waits until the partner thread has written out `count` datagrams
    /// the partner passed; false if that took longer than `limit`.
    pub fn wait_partner_delivered(&self, count: u64, limit: Duration) -> bool {
        let started = Instant::now();
        while self.shared.partner_delivered.load(Ordering::SeqCst) < count {
            if started.elapsed() >= limit {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        true
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
