//! Prometheus metrics (OpenMetrics text via prometheus-client) and the
//! `/metrics`, `/healthz`, `/readyz` endpoints.
//!
//! Map-backed metrics are read by a collector at scrape time, summing the
//! per-CPU values then and there: no polling thread, no drift between the
//! maps and what Prometheus sees.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, RwLock,
    },
};

use anyhow::{Context, Result};
use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use ligo_fabric_common::maps::{
    names, Direction, Role, MAX_NODE_SLICES, MAX_PEERS, MAX_PEER_VIEWS, MAX_POD_INTERFACES,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        gauge::ConstGauge,
        histogram::{exponential_buckets, Histogram},
        MetricType,
    },
    registry::Registry,
};
use tracing::{info, warn};

use crate::{
    clock,
    fabric_maps::{FabricMaps, Snapshot},
    tunnel::status::StatusClient,
};

/// Counters and state the daemon updates; shared with the HTTP handlers.
#[derive(Clone)]
pub struct DaemonMetrics {
    pub reconciles: Counter,
    pub reconcile_errors: Counter,
    pub config_rejections: Counter,
    pub reconcile_duration: Histogram,
    /// Programs attached and maps/routes equal to the running config.
    pub ready: Arc<AtomicBool>,
    /// Peer id -> name, for labels.
    pub peer_names: Arc<RwLock<BTreeMap<u32, String>>>,
    /// Asks the tunnel process for its live figures (gateways with
    /// WireGuard peers).
    pub tunnel: StatusClient,
}

impl DaemonMetrics {
    pub fn new() -> Self {
        Self {
            reconciles: Counter::default(),
            reconcile_errors: Counter::default(),
            config_rejections: Counter::default(),
            // 0.1 ms .. ~3 s
            reconcile_duration: Histogram::new(exponential_buckets(0.0001, 3.0, 10)),
            ready: Arc::new(AtomicBool::new(false)),
            peer_names: Arc::new(RwLock::new(BTreeMap::new())),
            tunnel: StatusClient::default(),
        }
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn set_peer_names(&self, names: BTreeMap<u32, String>) {
        if let Ok(mut guard) = self.peer_names.write() {
            *guard = names;
        }
    }
}

impl Default for DaemonMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Reads the pinned maps on every scrape.
#[derive(Debug)]
struct MapCollector {
    maps: Mutex<FabricMaps>,
    peer_names: Arc<RwLock<BTreeMap<u32, String>>>,
}

fn direction_label(direction: u32) -> &'static str {
    if direction == Direction::ToPeer as u32 {
        "to_peer"
    } else {
        "from_peer"
    }
}

impl MapCollector {
    fn encode_snapshot(
        &self,
        snap: &Snapshot,
        encoder: &mut DescriptorEncoder,
    ) -> std::fmt::Result {
        let names = self
            .peer_names
            .read()
            .map(|n| n.clone())
            .unwrap_or_default();
        let peer_labels = |peer: u32, direction: u32| {
            vec![
                (
                    "peer",
                    names
                        .get(&peer)
                        .cloned()
                        .unwrap_or_else(|| format!("cluster-{peer}")),
                ),
                ("peer_id", peer.to_string()),
                ("direction", direction_label(direction).to_string()),
            ]
        };
        let role = snap.config.role();
        let role_name = match role {
            Role::Node => "node",
            Role::Gateway => "gateway",
            Role::Unconfigured => "unconfigured",
        };
        let mut info = encoder.encode_descriptor(
            "ligo_fabric_build_info",
            "Version and role of this daemon (always 1)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(1i64).encode(
            info.encode_family(&[("version", env!("CARGO_PKG_VERSION")), ("role", role_name)])?,
        )?;
        let node = role == Role::Node;

        let mut packets = encoder.encode_descriptor(
            "ligo_fabric_peer_packets",
            "Inner packets carried to or from a peer cluster",
            None,
            MetricType::Counter,
        )?;
        for ((peer, dir), c) in &snap.peer_counters {
            ConstCounter::new(c.packets)
                .encode(packets.encode_family(&peer_labels(*peer, *dir))?)?;
        }
        let mut bytes = encoder.encode_descriptor(
            "ligo_fabric_peer_bytes",
            "Inner IPv4 bytes carried to or from a peer cluster",
            None,
            MetricType::Counter,
        )?;
        for ((peer, dir), c) in &snap.peer_counters {
            ConstCounter::new(c.bytes).encode(bytes.encode_family(&peer_labels(*peer, *dir))?)?;
        }
        let mut last = encoder.encode_descriptor(
            "ligo_fabric_peer_last_packet_timestamp_seconds",
            "Unix time of the last packet to or from a peer (absent until the first)",
            None,
            MetricType::Gauge,
        )?;
        for ((peer, dir), c) in &snap.peer_counters {
            if let Some(ts) = clock::unix_seconds(c.last_seen_ns) {
                ConstGauge::new(ts).encode(last.encode_family(&peer_labels(*peer, *dir))?)?;
            }
        }
        if node {
            // On a node every packet counted to a peer was remapped and
            // encapsulated, every packet from a peer decapsulated and remapped.
            let mut remaps = encoder.encode_descriptor(
                "ligo_fabric_remap_translations",
                "Addresses translated between a peer view and the peer's real pod CIDR",
                None,
                MetricType::Counter,
            )?;
            for ((peer, dir), c) in &snap.peer_counters {
                ConstCounter::new(c.packets)
                    .encode(remaps.encode_family(&peer_labels(*peer, *dir))?)?;
            }
            let sum = |d: Direction| {
                snap.peer_counters
                    .iter()
                    .filter(|((_, dir), _)| *dir == d as u32)
                    .map(|(_, c)| c.packets)
                    .sum::<u64>()
            };
            ConstCounter::new(sum(Direction::ToPeer)).encode(encoder.encode_descriptor(
                "ligo_fabric_encapsulations",
                "Packets wrapped in the fabric's VXLAN encapsulation",
                None,
                MetricType::Counter,
            )?)?;
            ConstCounter::new(sum(Direction::FromPeer)).encode(encoder.encode_descriptor(
                "ligo_fabric_decapsulations",
                "Fabric frames unwrapped and delivered",
                None,
                MetricType::Counter,
            )?)?;
        }
        let mut drops = encoder.encode_descriptor(
            "ligo_fabric_drops",
            "Packets dropped by the fabric programs, by reason",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in &snap.drops {
            ConstCounter::new(*n).encode(drops.encode_family(&[("reason", reason.name())])?)?;
        }
        let entries = [
            (names::PEER_VIEWS, snap.peer_views.len(), MAX_PEER_VIEWS),
            (names::PEERS, snap.peers.len(), MAX_PEERS),
            (names::PEER_ENDPOINTS, snap.peer_endpoints.len(), MAX_PEERS),
            (names::NODE_SLICES, snap.node_slices.len(), MAX_NODE_SLICES),
            (
                names::POD_INTERFACES,
                snap.pod_interfaces.len(),
                MAX_POD_INTERFACES,
            ),
            (
                names::PEER_COUNTERS,
                snap.peer_counters.len(),
                MAX_PEERS * 2,
            ),
        ];
        let mut used = encoder.encode_descriptor(
            "ligo_fabric_map_entries",
            "Entries in each fabric map",
            None,
            MetricType::Gauge,
        )?;
        for (map, n, _) in &entries {
            ConstGauge::new(*n as i64)
                .encode(used.encode_family(&[("map", map.to_lowercase())])?)?;
        }
        let mut capacity = encoder.encode_descriptor(
            "ligo_fabric_map_capacity_entries",
            "Maximum entries of each fabric map",
            None,
            MetricType::Gauge,
        )?;
        for (map, _, max) in &entries {
            ConstGauge::new(i64::from(*max))
                .encode(capacity.encode_family(&[("map", map.to_lowercase())])?)?;
        }
        Ok(())
    }
}

impl Collector for MapCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let snapshot = match self.maps.lock() {
            Ok(maps) => maps.snapshot(),
            Err(_) => return Ok(()),
        };
        match snapshot {
            Ok(snap) => self.encode_snapshot(&snap, &mut encoder),
            Err(e) => {
                warn!(
                    error = format!("{e:#}"),
                    "reading the fabric maps for a scrape failed; map metrics omitted"
                );
                Ok(())
            }
        }
    }
}

/// Asks the tunnel process for its counters on every scrape.
#[derive(Debug)]
struct TunnelCollector(StatusClient);

impl Collector for TunnelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let Some(fetched) = self.0.fetch() else {
            return Ok(());
        };
        let running = encoder.encode_descriptor(
            "ligo_fabric_tunnel_process_up",
            "1 while the gateway's WireGuard tunnel process answers the daemon, 0 when it does not (not running, or stuck)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::from(fetched.is_ok())).encode(running)?;
        let Ok(status) = fetched else {
            return Ok(());
        };
        let labels = |p: &crate::tunnel::PeerStatus| {
            vec![("peer", p.name.clone()), ("peer_id", p.id.to_string())]
        };
        let mut up = encoder.encode_descriptor(
            "ligo_fabric_tunnel_peer_up",
            "1 while the peer gateway answers over WireGuard, 0 once it stopped answering",
            None,
            MetricType::Gauge,
        )?;
        for p in &status.peers {
            ConstGauge::new(i64::from(p.up)).encode(up.encode_family(&labels(p))?)?;
        }
        let mut age = encoder.encode_descriptor(
            "ligo_fabric_tunnel_handshake_age_seconds",
            "Seconds since the latest completed WireGuard handshake (absent before the first)",
            None,
            MetricType::Gauge,
        )?;
        for p in &status.peers {
            if let Some(seconds) = p.latest_handshake_seconds_ago {
                ConstGauge::new(seconds).encode(age.encode_family(&labels(p))?)?;
            }
        }
        for (name, help, pick) in [
            (
                "ligo_fabric_tunnel_bytes",
                "Inner bytes through the WireGuard tunnel",
                true,
            ),
            (
                "ligo_fabric_tunnel_packets",
                "Inner packets through the WireGuard tunnel",
                false,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for p in &status.peers {
                for (direction, bytes, packets) in [
                    ("to_peer", p.tx_bytes, p.tx_packets),
                    ("from_peer", p.rx_bytes, p.rx_packets),
                ] {
                    let mut l = labels(p);
                    l.push(("direction", direction.to_string()));
                    ConstCounter::new(if pick { bytes } else { packets })
                        .encode(family.encode_family(&l)?)?;
                }
            }
        }
        let mut drops = encoder.encode_descriptor(
            "ligo_fabric_tunnel_drops",
            "Packets and datagrams the WireGuard tunnel refused, by reason",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in &status.drops {
            ConstCounter::new(*n).encode(drops.encode_family(&[("reason", reason.clone())])?)?;
        }
        Ok(())
    }
}

fn registry(metrics: &DaemonMetrics, maps: FabricMaps) -> Registry {
    let mut registry = Registry::default();
    registry.register(
        "ligo_fabric_reconciles",
        "Configurations applied to maps and routes",
        metrics.reconciles.clone(),
    );
    registry.register(
        "ligo_fabric_reconcile_errors",
        "Configurations that failed to apply (the previous one was restored)",
        metrics.reconcile_errors.clone(),
    );
    registry.register(
        "ligo_fabric_config_rejections",
        "Configuration files refused by validation; the running state was kept",
        metrics.config_rejections.clone(),
    );
    registry.register(
        "ligo_fabric_reconcile_duration_seconds",
        "Time to apply a configuration to maps and routes",
        metrics.reconcile_duration.clone(),
    );
    registry.register_collector(Box::new(MapCollector {
        maps: Mutex::new(maps),
        peer_names: metrics.peer_names.clone(),
    }));
    registry.register_collector(Box::new(TunnelCollector(metrics.tunnel.clone())));
    registry
}

struct HttpState {
    registry: Registry,
    ready: Arc<AtomicBool>,
    tunnel: StatusClient,
}

/// `/tunnels`: the WireGuard tunnel's state as JSON (public material only),
/// for `ligo-fabric inspect tunnels`.
async fn tunnels_handler(State(state): State<Arc<HttpState>>) -> impl IntoResponse {
    let client = state.tunnel.clone();
    let fetched = tokio::task::spawn_blocking(move || client.fetch())
        .await
        .ok()
        .flatten();
    match fetched {
        Some(Ok(status)) => (
            StatusCode::OK,
            serde_json::to_string_pretty(&status).unwrap_or_default(),
        ),
        Some(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}\n")),
        None => (
            StatusCode::NOT_FOUND,
            "this gateway has no WireGuard peers\n".to_string(),
        ),
    }
}

async fn metrics_handler(State(state): State<Arc<HttpState>>) -> impl IntoResponse {
    // Collectors read the maps and ask the tunnel process over its Unix
    // socket (up to its answer timeout): blocking work, kept off the
    // runtime's worker so /readyz and /healthz answer meanwhile.
    let encoded = tokio::task::spawn_blocking(move || {
        let mut body = String::new();
        prometheus_client::encoding::text::encode(&mut body, &state.registry).map(|()| body)
    })
    .await;
    match encoded {
        Ok(Ok(body)) => (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Ok(Err(_)) | Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            "encoding failed\n".into(),
        ),
    }
}

async fn ready_handler(State(state): State<Arc<HttpState>>) -> impl IntoResponse {
    if state.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: programs not attached or configuration not applied\n",
        )
    }
}

/// Binds `address` and serves the endpoints until the runtime stops.
pub async fn serve(address: SocketAddr, metrics: &DaemonMetrics, maps: FabricMaps) -> Result<()> {
    let state = Arc::new(HttpState {
        registry: registry(metrics, maps),
        ready: metrics.ready.clone(),
        tunnel: metrics.tunnel.clone(),
    });
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready_handler))
        .route("/tunnels", get(tunnels_handler))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("metrics_address: cannot listen on {address}"))?;
    info!(%address, "serving /metrics, /healthz, /readyz");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!(error = %e, "metrics server stopped");
        }
    });
    Ok(())
}
