//! Reflection into the provider for one offloaded namespace: the shell
//! around [`crate::offload::reflect`]. Our ConfigMaps and Secrets are
//! watched by metadata only and read whole when an offloaded pod refers to
//! one and it changed; our Services and Endpoints are watched whole (they
//! are small); the provider's copies by metadata, by our origin label.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{ConfigMap, Endpoints, Secret, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    api::{Api, DeleteParams, DynamicObject, Patch, PatchParams},
    discovery::ApiResource,
    runtime::{reflector::Store, watcher},
    Client, Resource, ResourceExt,
};
use serde_json::Value;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::controller::stores::{listed, typed_store, AbortOnDrop};
use crate::{
    controller::FIELD_MANAGER,
    crd::ORIGIN_LABEL,
    offload::{
        pod_facts::PodFacts,
        reflect::{self, AddressMap, Held, Key, Kind, ReflectAction, ORIGIN_HASH_ANNOTATION},
    },
};

/// What one namespace's reflection did in a pass.
#[derive(Debug, Default, Clone, Copy)]
pub struct Outcome {
    /// Copies the provider holds up to date.
    pub reflected: u32,
    pub errors: u64,
}

pub struct NamespaceReflection {
    namespace: String,
    local: Client,
    remote: Client,
    /// Where the provider takes endpoints as discovery.k8s.io/v1
    /// EndpointSlices (discovered, not assumed).
    slices: bool,
    /// Kept without their data.
    config_maps: Store<ConfigMap>,
    secrets: Store<Secret>,
    services: Store<Service>,
    endpoints: Store<Endpoints>,
    held_config_maps: Store<ConfigMap>,
    held_secrets: Store<Secret>,
    held_services: Store<Service>,
    held_endpoints: Option<Store<Endpoints>>,
    held_slices: Option<Store<EndpointSlice>>,
    /// Referenced ConfigMaps and Secrets: the resourceVersion read and the
    /// copy made of it (None: never reflected, e.g. a token).
    read: BTreeMap<Key, (String, Option<Value>)>,
    /// Conflicts already reported (once each).
    reported: BTreeSet<Key>,
    /// When the watches started, and whether they have all listed.
    started: std::time::Instant,
    ready: bool,
    _watches: Vec<AbortOnDrop>,
}

impl NamespaceReflection {
    pub fn start(
        namespace: &str,
        local: &Client,
        remote: &Client,
        origin: &str,
        slices: bool,
        wake: &Arc<Notify>,
    ) -> Self {
        let all = watcher::Config::default;
        let ours = || watcher::Config::default().labels(&format!("{ORIGIN_LABEL}={origin}"));
        let mut w = Vec::new();
        let (l, r) = (local, remote);
        let config_maps = watch_in(&mut w, l, namespace, all(), strip_config_map, wake);
        let secrets = watch_in(&mut w, l, namespace, all(), strip_secret, wake);
        let services = watch_in(&mut w, l, namespace, all(), keep_whole, wake);
        let endpoints = watch_in(&mut w, l, namespace, all(), keep_whole, wake);
        let held_config_maps = watch_in(&mut w, r, namespace, ours(), strip_config_map, wake);
        let held_secrets = watch_in(&mut w, r, namespace, ours(), strip_secret, wake);
        let held_services = watch_in(&mut w, r, namespace, ours(), keep_whole, wake);
        let (held_endpoints, held_slices) = if slices {
            let s = watch_in(&mut w, r, namespace, ours(), keep_whole, wake);
            (None, Some(s))
        } else {
            let e = watch_in(&mut w, r, namespace, ours(), keep_whole, wake);
            (Some(e), None)
        };
        let watches = w;
        Self {
            namespace: namespace.to_owned(),
            local: local.clone(),
            remote: remote.clone(),
            slices,
            config_maps,
            secrets,
            services,
            endpoints,
            held_config_maps,
            held_secrets,
            held_services,
            held_endpoints,
            held_slices,
            read: BTreeMap::new(),
            reported: BTreeSet::new(),
            started: std::time::Instant::now(),
            ready: false,
            _watches: watches,
        }
    }

    fn all_listed(&self) -> bool {
        listed(&self.config_maps)
            && listed(&self.secrets)
            && listed(&self.services)
            && listed(&self.endpoints)
            && listed(&self.held_config_maps)
            && listed(&self.held_secrets)
            && listed(&self.held_services)
            && self.held_endpoints.as_ref().is_none_or(listed)
            && self.held_slices.as_ref().is_none_or(listed)
    }

    /// Brings the provider's copies to what `pods` (this namespace's pods
    /// that run there) and our Services need.
    pub async fn reconcile(
        &mut self,
        pods: &[&PodFacts],
        origin: &str,
        addresses: &AddressMap,
    ) -> Outcome {
        let mut outcome = Outcome::default();
        if !self.ready {
            if !self.all_listed() {
                if self.started.elapsed() > std::time::Duration::from_secs(10) {
                    warn!(namespace = %self.namespace, "the watches of what is reflected into the provider have not listed yet: check the controller's read access there (ligo-control offload namespace binds it)");
                    self.started = std::time::Instant::now();
                }
                return outcome;
            }
            self.ready = true;
            info!(namespace = %self.namespace, endpoint_slices = self.slices, "reflecting the namespace's Services and the objects its offloaded pods refer to");
        }
        let mut wanted: BTreeMap<Key, Value> = BTreeMap::new();
        let mut unread: BTreeSet<Key> = BTreeSet::new();
        let referenced: BTreeSet<Key> = pods
            .iter()
            .flat_map(|p| p.references.iter().cloned())
            .collect();
        self.read.retain(|k, _| referenced.contains(k));
        for key in referenced {
            let version = match key.0 {
                Kind::ConfigMap => version_of(&self.config_maps, &key.2),
                _ => version_of(&self.secrets, &key.2),
            };
            // Missing here: the copy fails there as it would here.
            let Some(version) = version else { continue };
            if self.read.get(&key).map(|(v, _)| v) != Some(&version) {
                match self.read_config(&key, origin).await {
                    Ok(copy) => {
                        self.read.insert(key.clone(), (version, copy));
                    }
                    Err(e) => {
                        warn!(object = %describe(&key), error = %e, "cannot read an object an offloaded pod refers to; retrying");
                        outcome.errors += 1;
                        // The copy there stays as it is (the last one read
                        // is kept, or, unread yet, it is not deleted).
                        match self.read.get(&key) {
                            Some((_, Some(copy))) => {
                                wanted.insert(key, copy.clone());
                            }
                            _ => {
                                unread.insert(key);
                            }
                        }
                        continue;
                    }
                }
            }
            if let Some((_, Some(copy))) = self.read.get(&key) {
                wanted.insert(key, copy.clone());
            }
        }
        let endpoints: BTreeMap<String, Value> = self
            .endpoints
            .state()
            .iter()
            .filter_map(|e| Some((e.name_any(), serde_json::to_value(&**e).ok()?)))
            .collect();
        for service in self.services.state() {
            let name = service.name_any();
            let Ok(local) = serde_json::to_value(&*service) else {
                continue;
            };
            wanted.insert(
                (Kind::Service, self.namespace.clone(), name.clone()),
                reflect::service_copy(&local, origin),
            );
            if let Some(eps) = endpoints.get(&name) {
                if self.slices {
                    for slice in reflect::endpoint_slice_copies(eps, origin, addresses) {
                        let slice_name = slice["metadata"]["name"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned();
                        let key = (Kind::EndpointSlice, self.namespace.clone(), slice_name);
                        wanted.insert(key, slice);
                    }
                } else {
                    let key = (Kind::Endpoints, self.namespace.clone(), name.clone());
                    wanted.insert(key, reflect::endpoints_copy(eps, origin, addresses));
                }
            }
        }
        let mut held = BTreeMap::new();
        held.extend(held_of(&self.held_config_maps, Kind::ConfigMap, origin));
        held.extend(held_of(&self.held_secrets, Kind::Secret, origin));
        held.extend(held_of(&self.held_services, Kind::Service, origin));
        if let Some(s) = &self.held_endpoints {
            held.extend(held_of(s, Kind::Endpoints, origin));
        }
        if let Some(s) = &self.held_slices {
            held.extend(held_of(s, Kind::EndpointSlice, origin));
        }
        // A same-named object that is not ours is seen only on a write:
        // the held stores list ours alone.
        let actions = reflect::plan(&wanted, &held, &unread);
        tracing::debug!(namespace = %self.namespace, pods = pods.len(), wanted = wanted.len(), held = held.len(), actions = actions.len(), "reflection pass");
        let fresh = wanted.len() as u32;
        let mut failed = 0u32;
        for action in actions {
            if let Err(e) = self.apply(action).await {
                warn!(namespace = %self.namespace, error = %e, "a reflection into the provider failed; retrying");
                failed += 1;
            }
        }
        outcome.errors += u64::from(failed);
        outcome.reflected = fresh.saturating_sub(failed);
        outcome
    }

    async fn read_config(&self, key: &Key, origin: &str) -> Result<Option<Value>, kube::Error> {
        let object = match key.0 {
            Kind::ConfigMap => serde_json::to_value(
                Api::<ConfigMap>::namespaced(self.local.clone(), &key.1)
                    .get(&key.2)
                    .await?,
            ),
            _ => serde_json::to_value(
                Api::<Secret>::namespaced(self.local.clone(), &key.1)
                    .get(&key.2)
                    .await?,
            ),
        };
        let Ok(mut object) = object else {
            return Ok(None);
        };
        if object.get("kind").is_none() {
            object["kind"] = Value::from(if key.0 == Kind::ConfigMap {
                "ConfigMap"
            } else {
                "Secret"
            });
        }
        if key.0 == Kind::Secret {
            if let Some(why) = reflect::never_reflected(&object) {
                info!(object = %describe(key), "not reflected: {why}");
                return Ok(None);
            }
        }
        Ok(Some(reflect::config_copy(&object, origin)))
    }

    async fn apply(&mut self, action: ReflectAction) -> Result<(), String> {
        match action {
            ReflectAction::Put(key, object) => {
                let api = self.remote_api(key.0);
                // A same-named object that is not ours: the create-or-update
                // below would take it over, so look first.
                let existing = api
                    .get_opt(&key.2)
                    .await
                    .map_err(|e| format!("{}: {e}", describe(&key)))?;
                if let Some(e) = existing {
                    if e.labels().get(ORIGIN_LABEL).is_none() {
                        if self.reported.insert(key.clone()) {
                            warn!(object = %describe(&key), "the provider holds an object of this name that is not ours; it is left alone and the pods that need it will not start there");
                        }
                        return Err(format!(
                            "{} exists in the provider and is not ours",
                            describe(&key)
                        ));
                    }
                }
                api.patch(
                    &key.2,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&object),
                )
                .await
                .map(drop)
                .map_err(|e| format!("writing {}: {e}", describe(&key)))
            }
            ReflectAction::Delete(key) => match self
                .remote_api(key.0)
                .delete(&key.2, &DeleteParams::default())
                .await
            {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
                Err(e) => Err(format!("deleting {}: {e}", describe(&key))),
            },
            ReflectAction::Conflict(key) => Err(format!(
                "{} exists in the provider and is not ours",
                describe(&key)
            )),
        }
    }

    fn remote_api(&self, kind: Kind) -> Api<DynamicObject> {
        let resource = match kind {
            Kind::ConfigMap => ApiResource::erase::<ConfigMap>(&()),
            Kind::Secret => ApiResource::erase::<Secret>(&()),
            Kind::Service => ApiResource::erase::<Service>(&()),
            Kind::Endpoints => ApiResource::erase::<Endpoints>(&()),
            Kind::EndpointSlice => ApiResource::erase::<EndpointSlice>(&()),
        };
        Api::namespaced_with(self.remote.clone(), &self.namespace, &resource)
    }
}

/// A store of `K` in `namespace` of `client`'s cluster, its guard kept
/// beside the others.
fn watch_in<K>(
    guards: &mut Vec<AbortOnDrop>,
    client: &Client,
    namespace: &str,
    config: watcher::Config,
    strip: fn(&mut K),
    wake: &Arc<Notify>,
) -> Store<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, guard) = typed_store(
        Api::namespaced(client.clone(), namespace),
        config,
        strip,
        wake,
    );
    guards.push(guard);
    store
}

fn describe(key: &Key) -> String {
    format!("{:?} {}/{}", key.0, key.1, key.2)
}

fn strip_config_map(c: &mut ConfigMap) {
    c.data = None;
    c.binary_data = None;
}

fn strip_secret(s: &mut Secret) {
    s.data = None;
    s.string_data = None;
}

fn keep_whole<K>(_: &mut K) {}

fn version_of<K: Resource<DynamicType = ()> + Clone>(
    store: &Store<K>,
    name: &str,
) -> Option<String> {
    store
        .state()
        .iter()
        .find(|o| o.meta().name.as_deref() == Some(name))
        .and_then(|o| o.meta().resource_version.clone())
}

fn held_of<K: Resource<DynamicType = ()> + Clone>(
    store: &Store<K>,
    kind: Kind,
    origin: &str,
) -> Vec<(Key, Held)> {
    store
        .state()
        .iter()
        .filter(|o| o.meta().deletion_timestamp.is_none())
        .map(|o| {
            let meta = o.meta();
            let key = (
                kind,
                meta.namespace.clone().unwrap_or_default(),
                meta.name.clone().unwrap_or_default(),
            );
            let ours = meta
                .labels
                .as_ref()
                .and_then(|l| l.get(ORIGIN_LABEL))
                .map(String::as_str)
                == Some(origin);
            let hash = meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(ORIGIN_HASH_ANNOTATION))
                .cloned();
            (key, Held { ours, hash })
        })
        .collect()
}
