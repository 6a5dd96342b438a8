//! Watches fed in their own task (stopped when its guard drops) that wake
//! a loop: a reflector store of stripped objects (`typed_store`), or a
//! store of only what each object comes to (`kept_store`), for the lists
//! that grow with the cluster's pods.

use std::{
    collections::BTreeMap,
    fmt::Debug,
    sync::{Arc, RwLock},
};

use futures::{FutureExt, Stream, StreamExt};
use kube::{
    api::Api,
    runtime::{
        reflector::{self, store::Writer, Store},
        watcher, WatchStreamExt,
    },
    Resource, ResourceExt,
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

/// What a watch's objects come to (`T`, made from each as it arrives),
/// by namespace and name; the objects themselves are not kept.
pub struct Kept<T> {
    state: Arc<RwLock<KeptState<T>>>,
}

struct KeptState<T> {
    listed: bool,
    items: BTreeMap<(String, String), Arc<T>>,
    /// Filled while the watch lists again; swapped in once it has.
    relisting: BTreeMap<(String, String), Arc<T>>,
}

impl<T> Clone for Kept<T> {
    fn clone(&self) -> Self {
        Kept {
            state: self.state.clone(),
        }
    }
}

impl<T> Kept<T> {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, KeptState<T>> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the watch has listed once (before that, it is not the truth).
    pub fn listed(&self) -> bool {
        self.read().listed
    }

    pub fn items(&self) -> Vec<Arc<T>> {
        self.read().items.values().cloned().collect()
    }

    /// Waits until the watch has listed once.
    pub async fn wait_listed(&self) {
        while !self.listed() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// A [`Kept`] store of `keep(object)` for every object `api` watches.
pub fn kept_store<K, T>(
    api: Api<K>,
    config: watcher::Config,
    keep: fn(&K) -> T,
    what: &'static str,
    wake: &Arc<Notify>,
) -> (Kept<T>, AbortOnDrop)
where
    K: Resource + Clone + Debug + DeserializeOwned + Send + 'static,
    T: Send + Sync + 'static,
{
    let kept = Kept {
        state: Arc::new(RwLock::new(KeptState {
            listed: false,
            items: BTreeMap::new(),
            relisting: BTreeMap::new(),
        })),
    };
    let state = kept.state.clone();
    let wake = wake.clone();
    let key = |o: &K| (o.namespace().unwrap_or_default(), o.name_any());
    let stream = watcher(api, config).backoff(crate::controller::backoff::WatchBackoff::default());
    let task = tokio::spawn(async move {
        stream
            .for_each(|event| {
                let mut s = state.write().unwrap_or_else(|e| e.into_inner());
                let changed = event.is_ok();
                match event {
                    Ok(watcher::Event::Apply(o)) => {
                        s.items.insert(key(&o), Arc::new(keep(&o)));
                    }
                    Ok(watcher::Event::Delete(o)) => {
                        s.items.remove(&key(&o));
                    }
                    Ok(watcher::Event::Init) => s.relisting.clear(),
                    Ok(watcher::Event::InitApply(o)) => {
                        s.relisting.insert(key(&o), Arc::new(keep(&o)));
                    }
                    Ok(watcher::Event::InitDone) => {
                        s.items = std::mem::take(&mut s.relisting);
                        s.listed = true;
                    }
                    Err(e) => {
                        warn!(watch = what, error = %e, "a watch failed; retrying with backoff")
                    }
                }
                drop(s);
                if changed {
                    wake.notify_one();
                }
                futures::future::ready(())
            })
            .await;
    });
    (kept, AbortOnDrop(task))
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
