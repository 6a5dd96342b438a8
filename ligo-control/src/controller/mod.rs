//! `ligo-control run`: the I/O shell around the pure reconcilers.
//!
//! Level-triggered: every watched object lands in a reflector store; any
//! change (or a remote cluster's answer, or a periodic tick) wakes one loop
//! that reconciles the `ClusterFabric`, then every `Peer` in creation order,
//! from the stores, and writes only what differs. One pass sees all peers,
//! so two peers allocated in the same pass never get one view. Nothing is
//! written before every store has listed once.

pub(crate) mod backoff;
mod cluster;
pub mod metrics;
mod offload;
mod peer;
mod remote;
pub(crate) mod stores;

pub use offload::GUEST_ROLE;

pub use remote::KUBECONFIG_FIELD;

use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Secret};
use kube::{
    api::{Api, DynamicObject, GroupVersionKind},
    discovery::ApiResource,
    runtime::{
        reflector::{self, Store},
        watcher, WatchStreamExt,
    },
    Client,
};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::{
    crd::{ClusterFabric, NodeFabric, Peer},
    offload::inventory::PodUsage,
};
use stores::{kept_store, Kept};

/// The field manager of everything this controller writes.
pub const FIELD_MANAGER: &str = "ligo-control";
/// A full pass at least this often, even with no event (remote clusters
/// are polled by their own tasks; this catches anything missed).
const RESYNC: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Options {
    /// Where Secrets (the gateway key, peers' credentials) live.
    pub namespace: String,
    /// Where `/metrics` and `/healthz` are served.
    pub metrics_address: std::net::SocketAddr,
}

/// The stores one pass reads.
#[derive(Clone)]
pub struct Stores {
    pub fabrics: Store<ClusterFabric>,
    pub peers: Store<Peer>,
    pub nodes: Store<Node>,
    pub secrets: Store<Secret>,
    pub node_fabrics: Store<NodeFabric>,
    /// Every namespace (a provider creates the ones its peers ask for, and
    /// never takes one that is not theirs).
    pub namespaces: Store<Namespace>,
    /// Every pod, as much as the provider's offer reads of it.
    pub pods: Kept<PodUsage>,
}

/// Runs until the process is stopped.
pub async fn run(client: Client, options: Options) -> Result<()> {
    let wake = Arc::new(Notify::new());
    let (pods, _pods_watch) = kept_store(
        Api::all(client.clone()),
        watcher::Config::default(),
        PodUsage::of,
        "pods",
        &wake,
    );
    let stores = Stores {
        fabrics: watch(Api::all(client.clone()), watcher::Config::default(), &wake),
        peers: watch(Api::all(client.clone()), watcher::Config::default(), &wake),
        nodes: watch(Api::all(client.clone()), watcher::Config::default(), &wake),
        secrets: watch(
            Api::namespaced(client.clone(), &options.namespace),
            watcher::Config::default(),
            &wake,
        ),
        node_fabrics: watch(Api::all(client.clone()), watcher::Config::default(), &wake),
        namespaces: watch(Api::all(client.clone()), watcher::Config::default(), &wake),
        pods,
    };
    for (what, ready) in [
        ("ClusterFabric", stores.fabrics.wait_until_ready().await),
        ("Peer", stores.peers.wait_until_ready().await),
        ("Node", stores.nodes.wait_until_ready().await),
        ("Secret", stores.secrets.wait_until_ready().await),
        ("NodeFabric", stores.node_fabrics.wait_until_ready().await),
        ("Namespace", stores.namespaces.wait_until_ready().await),
    ] {
        ready.map_err(|_| anyhow::anyhow!("the {what} watch stopped before it listed"))?;
    }
    stores.pods.wait_listed().await;
    let cluster_uid = Api::<Namespace>::all(client.clone())
        .get("kube-system")
        .await
        .context("reading Namespace kube-system (its UID seeds the default cluster name and id)")?
        .metadata
        .uid
        .unwrap_or_default();
    info!(namespace = %options.namespace, "every watch has listed; reconciling");

    let metrics = Arc::new(metrics::OffloadMetrics::default());
    metrics::serve(options.metrics_address, metrics.clone()).await;
    let remotes = remote::Remotes::new(wake.clone());
    let mut pending_views = peer::PendingViews::new();
    let mut offloading = offload::Offloading::new(metrics);
    let mut about_cluster_name = read_about_cluster_name(&client).await;
    let mut last_about = tokio::time::Instant::now();
    loop {
        if last_about.elapsed() > RESYNC {
            about_cluster_name = read_about_cluster_name(&client).await;
            last_about = tokio::time::Instant::now();
        }
        let local = cluster::pass(
            &client,
            &options,
            &stores,
            &cluster_uid,
            about_cluster_name.as_deref(),
        )
        .await;
        let outcomes = peer::pass(
            &client,
            &stores,
            &remotes,
            local.as_ref(),
            &mut pending_views,
        )
        .await;
        offload::pass(
            &client,
            &stores,
            &outcomes,
            local.as_ref(),
            &options.namespace,
            &mut offloading,
        )
        .await;
        // Let a burst of events settle into one pass.
        tokio::select! {
            () = wake.notified() => tokio::time::sleep(Duration::from_millis(20)).await,
            () = tokio::time::sleep(RESYNC) => {}
        }
    }
}

/// A reflector store fed by a watch (with kube's default backoff) that
/// wakes the loop on every change.
fn watch<K>(api: Api<K>, config: watcher::Config, wake: &Arc<Notify>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&()).into_owned();
    let wake = wake.clone();
    let stream = reflector::reflector(writer, watcher(api, config))
        .backoff(backoff::WatchBackoff::default());
    tokio::spawn(async move {
        stream
            .for_each(|event| {
                match event {
                    Ok(_) => wake.notify_one(),
                    Err(e) => {
                        warn!(kind = %kind, error = %e, "watch failed; retrying with backoff")
                    }
                }
                futures::future::ready(())
            })
            .await;
    });
    reader
}

/// The About API's `cluster.clusterset.k8s.io`, where the API is installed.
async fn read_about_cluster_name(client: &Client) -> Option<String> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("about.k8s.io", "v1alpha1", "ClusterProperty"),
        "clusterproperties",
    );
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    match api.get_opt("cluster.clusterset.k8s.io").await {
        Ok(found) => found.and_then(|o| {
            o.data
                .pointer("/spec/value")
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        }),
        // Not installed (404 on the resource) or not allowed: no About API.
        Err(_) => None,
    }
}

/// Now, as conditions stamp it.
pub fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}
