//! The Kubernetes source of the daemon's desired state: watches of
//! `ClusterFabric`, `Node`, `NodeFabric` and `Peer` objects, translated
//! ([`translate`]) into the same revisions the file source sends.
//!
//! Nothing is sent before every watch has listed once (a partial view would
//! remove peers that are merely not listed yet). While the API server is
//! unreachable the stores keep the last state and nothing is sent, so the
//! data path keeps forwarding; the watches catch up by themselves when it
//! returns.

pub mod report;
pub mod translate;

pub use report::Programmed;

use std::{sync::Arc, time::Duration};

use anyhow::{anyhow, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::{
    api::Api,
    runtime::{
        reflector::{self, Store},
        watcher, WatchStreamExt,
    },
    Client,
};
use ligo_api::{ClusterFabric, NodeFabric, Peer};
use tokio::sync::{mpsc, Notify};
use tracing::{info, warn};

use crate::source::{Revision, SpecRevision};
use translate::{translate, Observed, Translation};
pub use translate::{DaemonFlags, HostAddress};

/// The watches' stores.
#[derive(Clone)]
struct Stores {
    fabrics: Store<ClusterFabric>,
    nodes: Store<Node>,
    node_fabrics: Store<NodeFabric>,
    peers: Store<Peer>,
}

/// Starts the watches; revisions arrive once all have listed, then on
/// every change that changes the translation.
pub fn watch(client: Client, flags: DaemonFlags) -> mpsc::Receiver<Revision> {
    let (sender, receiver) = mpsc::channel(4);
    let wake = Arc::new(Notify::new());
    let stores = Stores {
        fabrics: store(Api::all(client.clone()), &wake),
        nodes: store(Api::all(client.clone()), &wake),
        node_fabrics: store(Api::all(client.clone()), &wake),
        peers: store(Api::all(client), &wake),
    };
    tokio::spawn(async move {
        for ready in [
            stores.fabrics.wait_until_ready().await,
            stores.nodes.wait_until_ready().await,
            stores.node_fabrics.wait_until_ready().await,
            stores.peers.wait_until_ready().await,
        ] {
            if ready.is_err() {
                return;
            }
        }
        info!("every watch has listed: the desired state is known");
        let mut last: Option<Result<Translation, String>> = None;
        loop {
            let next = translated(&stores, &flags);
            if last.as_ref() != Some(&next) {
                let revision = match &next {
                    Ok(t) => {
                        for problem in &t.problems {
                            warn!(peer = %problem.origin, error = %problem.error, "peer left out until its objects are fixed; the others are used");
                        }
                        Revision::Spec(Box::new(SpecRevision {
                            reason: "Kubernetes objects changed",
                            local: Some(t.local.clone()),
                            spec: t.spec.clone(),
                        }))
                    }
                    Err(why) => Revision::Rejected {
                        reason: "Kubernetes objects",
                        error: anyhow!("{why}"),
                    },
                };
                if sender.send(revision).await.is_err() {
                    return;
                }
                last = Some(next);
            }
            // A burst of events becomes one revision.
            wake.notified().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    receiver
}

fn translated(stores: &Stores, flags: &DaemonFlags) -> Result<Translation, String> {
    let fabrics = owned(&stores.fabrics);
    let nodes = owned(&stores.nodes);
    let node_fabrics = owned(&stores.node_fabrics);
    let peers = owned(&stores.peers);
    let host = host_addresses().map_err(|e| format!("listing this host's addresses: {e}"))?;
    translate(
        flags,
        &Observed {
            fabrics: &fabrics,
            nodes: &nodes,
            node_fabrics: &node_fabrics,
            peers: &peers,
        },
        &host,
    )
}

fn owned<K: kube::Resource<DynamicType = ()> + Clone>(store: &Store<K>) -> Vec<K> {
    store.state().iter().map(|k| (**k).clone()).collect()
}

/// The IPv4 addresses of this network namespace's interfaces.
pub fn host_addresses() -> Result<Vec<HostAddress>, nix::Error> {
    Ok(nix::ifaddrs::getifaddrs()?
        .filter_map(|ifa| {
            let address = ifa.address?.as_sockaddr_in()?.ip();
            Some(HostAddress {
                interface: ifa.interface_name,
                address,
            })
        })
        .collect())
}

fn store<K>(api: Api<K>, wake: &Arc<Notify>) -> Store<K>
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
    let stream =
        reflector::reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
    tokio::spawn(async move {
        stream
            .for_each(|event| {
                match event {
                    Ok(_) => wake.notify_one(),
                    Err(e) => warn!(
                        kind = %kind,
                        error = %e,
                        "cannot watch the API server; forwarding on the last state meanwhile, retrying with backoff"
                    ),
                }
                futures::future::ready(())
            })
            .await;
    });
    reader
}
