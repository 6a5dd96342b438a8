//! The watches offloading keeps: each a reflector store fed in its own
//! task (stopped when its guard drops) that wakes the consumer's loop.

use std::{fmt::Debug, sync::Arc};

use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    api::{Api, DynamicObject},
    discovery::ApiResource,
    runtime::{
        reflector::{self, store::Writer, Store},
        watcher, WatchStreamExt,
    },
    Resource,
};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tracing::warn;

/// Stops a store's task when dropped.
pub struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Whether a store has listed once (before that, it is not the truth).
pub fn listed<K: kube::runtime::reflector::Lookup + Clone + 'static>(store: &Store<K>) -> bool
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store
        .wait_until_ready()
        .now_or_never()
        .is_some_and(|r| r.is_ok())
}

fn drive<K, S>(writer: Writer<K>, stream: S, what: &'static str, wake: &Arc<Notify>) -> AbortOnDrop
where
    K: kube::runtime::reflector::Lookup + Clone + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    let wake = wake.clone();
    let stream = reflector::reflector(writer, stream);
    AbortOnDrop(tokio::spawn(async move {
        stream
            .for_each(|event| {
                match event {
                    Ok(_) => wake.notify_one(),
                    Err(e) => {
                        warn!(watch = what, error = %e, "a watch failed; retrying with backoff")
                    }
                }
                futures::future::ready(())
            })
            .await;
    }))
}

/// Pods as JSON (so fields this client does not know pass through),
/// without their managed fields (most of an object's size, of no use
/// here), each passed through `strip` (its `data`: spec and status).
pub fn pod_store(
    api: Api<DynamicObject>,
    config: watcher::Config,
    strip: fn(&mut serde_json::Value),
    wake: &Arc<Notify>,
) -> (Store<DynamicObject>, AbortOnDrop) {
    let writer = Writer::new(ApiResource::erase::<Pod>(&()));
    let reader = writer.as_reader();
    let stream = watcher(api, config)
        .backoff(crate::controller::backoff::WatchBackoff::default())
        .modify(move |o: &mut DynamicObject| {
            o.metadata.managed_fields = None;
            strip(&mut o.data);
        });
    (reader, drive(writer, stream, "pods", wake))
}

/// Objects of one kind, each passed through `strip` before it is kept
/// (ConfigMaps and Secrets are kept without their data: they are read
/// whole only when an offloaded pod refers to one).
pub fn typed_store<K>(
    api: Api<K>,
    config: watcher::Config,
    strip: fn(&mut K),
    wake: &Arc<Notify>,
) -> (Store<K>, AbortOnDrop)
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, config)
        .backoff(crate::controller::backoff::WatchBackoff::default())
        .modify(move |o: &mut K| {
            o.meta_mut().managed_fields = None;
            strip(o);
        });
    (reader, drive(writer, stream, "objects", wake))
}
