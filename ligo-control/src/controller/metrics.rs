//! The controller's `/metrics` (and `/healthz`): per peer we run pods on,
//! the virtual node's readiness and capacity, pods offloaded and refused,
//! objects reflected and failed writes. Labels are the peer's name and,
//! for capacity, one of cpu, memory or pods: bounded by the peerings.
//! And the bytes the controller's heap holds, where its allocator counts.

use std::{
    net::SocketAddr,
    sync::{atomic::AtomicU64, Arc, OnceLock},
};

use axum::{extract::State, http::header, response::IntoResponse, routing::get, Router};
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tracing::{info, warn};

use crate::crd::VirtualNodeStatus;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CapacityLabel {
    pub peer: String,
    pub resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodsLabel {
    pub peer: String,
    pub state: String,
}

#[derive(Default)]
pub struct OffloadMetrics {
    ready: Family<PeerLabel, Gauge>,
    capacity: Family<CapacityLabel, Gauge<f64, AtomicU64>>,
    pods: Family<PodsLabel, Gauge>,
    reflected: Family<PeerLabel, Gauge>,
    errors: Family<PeerLabel, Counter>,
}

/// The heap's size in bytes, from the binary's counting allocator.
static HEAP_BYTES: OnceLock<fn() -> usize> = OnceLock::new();

/// Where `ligo_control_heap_bytes` reads from (set once, by `main`).
pub fn count_heap_with(bytes: fn() -> usize) {
    let _ = HEAP_BYTES.set(bytes);
}

/// What `/metrics` serves.
struct Served {
    registry: Registry,
    heap: Gauge,
}

/// Capacity resources exported (others would make the label unbounded).
const RESOURCES: [&str; 3] = ["cpu", "memory", "pods"];

impl OffloadMetrics {
    /// What a consumer task last reported for `peer`; `errors_before` is
    /// the count at its previous report (the counter only grows).
    pub fn record(&self, peer: &str, node: &VirtualNodeStatus, ready: bool, errors_before: u64) {
        let label = PeerLabel {
            peer: peer.to_owned(),
        };
        self.ready.get_or_create(&label).set(i64::from(ready));
        for resource in RESOURCES {
            let value = node
                .capacity
                .get(resource)
                .and_then(|q| crate::offload::quantity::parse(q).ok())
                .map_or(0.0, |m| m as f64 / 1000.0);
            self.capacity
                .get_or_create(&CapacityLabel {
                    peer: peer.to_owned(),
                    resource: resource.to_owned(),
                })
                .set(value);
        }
        for (state, count) in [
            ("offloaded", node.pods_offloaded),
            ("refused", node.pods_refused),
        ] {
            self.pods
                .get_or_create(&PodsLabel {
                    peer: peer.to_owned(),
                    state: state.to_owned(),
                })
                .set(i64::from(count));
        }
        self.reflected
            .get_or_create(&label)
            .set(i64::from(node.objects_reflected));
        self.errors
            .get_or_create(&label)
            .inc_by(node.reflection_errors.saturating_sub(errors_before));
    }

    /// Forgets a peer we no longer run pods on.
    pub fn forget(&self, peer: &str) {
        let label = PeerLabel {
            peer: peer.to_owned(),
        };
        self.ready.remove(&label);
        self.reflected.remove(&label);
        self.errors.remove(&label);
        for resource in RESOURCES {
            self.capacity.remove(&CapacityLabel {
                peer: peer.to_owned(),
                resource: resource.to_owned(),
            });
        }
        for state in ["offloaded", "refused"] {
            self.pods.remove(&PodsLabel {
                peer: peer.to_owned(),
                state: state.to_owned(),
            });
        }
    }

    fn registry(self: &Arc<Self>) -> Registry {
        let mut r = Registry::with_prefix("ligo");
        r.register(
            "virtual_node_ready",
            "1 when the virtual node for the peer is Ready",
            self.ready.clone(),
        );
        r.register(
            "virtual_node_capacity",
            "What the virtual node offers (CPU in cores, memory in bytes, pods)",
            self.capacity.clone(),
        );
        r.register(
            "offload_pods",
            "Pods bound to the virtual node, by state",
            self.pods.clone(),
        );
        r.register(
            "offload_reflected_objects",
            "ConfigMaps, Secrets, Services and endpoints held up to date in the peer",
            self.reflected.clone(),
        );
        r.register(
            "offload_write_errors",
            "Offloading writes that failed (each is retried)",
            self.errors.clone(),
        );
        r
    }
}

/// Serves `/metrics` and `/healthz` on `address`. A port already taken is
/// reported, not fatal: the controller's work does not depend on it.
pub async fn serve(address: SocketAddr, metrics: Arc<OffloadMetrics>) {
    let mut registry = metrics.registry();
    let heap = Gauge::default();
    if HEAP_BYTES.get().is_some() {
        registry.register(
            "control_heap_bytes",
            "Bytes the controller's heap holds (allocated, not yet freed)",
            heap.clone(),
        );
    }
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(Arc::new(Served { registry, heap }));
    match tokio::net::TcpListener::bind(address).await {
        Ok(listener) => {
            info!(%address, "serving /metrics and /healthz");
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    warn!(error = %e, "the metrics server stopped");
                }
            });
        }
        Err(e) => {
            warn!(%address, error = %e, "cannot serve /metrics: set --metrics-address to a free address")
        }
    }
}

async fn render(State(served): State<Arc<Served>>) -> impl IntoResponse {
    if let Some(bytes) = HEAP_BYTES.get() {
        served.heap.set(i64::try_from(bytes()).unwrap_or(i64::MAX));
    }
    let mut body = String::new();
    if let Err(e) = encode(&mut body, &served.registry) {
        body = format!("# encoding failed: {e}\n");
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}
