//! The consumer's writes for the pods bound to its virtual node: each
//! [`Action`] carried out (many at a time, none repeated while its result
//! is not seen yet), Events, and the NotReady report of an outage.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Instant,
};

use futures::StreamExt;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams, Preconditions};
use serde_json::json;
use tracing::{info, warn};

use super::{facts_of, Shell, CONCURRENT_WRITES, IN_FLIGHT};
use crate::{
    controller::stores::Kept,
    offload::{
        pod_facts::PodFacts,
        pods::{self, Action},
    },
};

impl Shell {
    /// Carries out `actions`, skipping a create or delete already made
    /// whose result the watches do not show yet (`copies` and `pods`: the
    /// keys they show now).
    pub(super) async fn execute(
        &mut self,
        actions: Vec<Action>,
        copies: &BTreeSet<(String, String)>,
        pods: &BTreeSet<(String, String)>,
    ) {
        self.in_flight.retain(|(what, ns_name), at| {
            let key = (
                what.split_once('/')
                    .map(|(_, ns)| ns.to_owned())
                    .unwrap_or_default(),
                ns_name.clone(),
            );
            let shown = match what.split_once('/').map(|(w, _)| w) {
                Some("create") => copies.contains(&key),
                Some("delete") => !copies.contains(&key),
                _ => !pods.contains(&key),
            };
            !shown && at.elapsed() < IN_FLIGHT
        });
        self.rejections()
            .retain(|key, _| pods.contains(key) && !copies.contains(key));
        self.written_patches().retain(|key, _| pods.contains(key));
        let mut todo = Vec::new();
        for action in actions {
            let key = match &action {
                Action::CreateRemote(ns, name, _) => Some(("create", ns, name)),
                Action::DeleteRemote {
                    namespace, name, ..
                } => Some(("delete", namespace, name)),
                Action::FinishDelete(ns, name, _) => Some(("finish", ns, name)),
                _ => None,
            };
            if let Some((what, ns, name)) = key {
                let k = (format!("{what}/{ns}"), name.clone());
                if self.in_flight.contains_key(&k) {
                    continue;
                }
                self.in_flight.insert(k, Instant::now());
            }
            todo.push(action);
        }
        let this = &*self;
        let failures: Vec<String> = futures::stream::iter(todo)
            .map(|action| async move { this.apply(action).await.err() })
            .buffer_unordered(CONCURRENT_WRITES)
            .filter_map(futures::future::ready)
            .collect()
            .await;
        for failure in &failures {
            warn!(peer = %self.target.peer, error = %failure, "an offloading write failed; retrying");
        }
        self.errors += failures.len() as u64;
    }

    pub(super) async fn apply(&self, action: Action) -> Result<(), String> {
        let local = |ns: &str| {
            Api::<DynamicObject>::namespaced_with(self.local.clone(), ns, &self.pod_resource)
        };
        let remote = |ns: &str| {
            Api::<DynamicObject>::namespaced_with(self.remote.clone(), ns, &self.pod_resource)
        };
        match action {
            Action::CreateRemote(ns, name, uid) => {
                // Made from the pod read whole (only its facts are kept),
                // if it is still this pod and not going.
                let pod = match local(&ns).get_opt(&name).await {
                    Ok(Some(pod)) => pod,
                    Ok(None) => return Ok(()),
                    Err(e) => return Err(format!("reading pod {ns}/{name} to copy it: {e}")),
                };
                if pod.metadata.uid.as_deref() != Some(uid.as_str())
                    || pod.metadata.deletion_timestamp.is_some()
                {
                    return Ok(());
                }
                let whole = serde_json::to_value(&pod).map_err(|e| e.to_string())?;
                let object: DynamicObject =
                    serde_json::from_value(pods::copy(&whole, &self.target.our_name))
                        .map_err(|e| e.to_string())?;
                let key = (ns.clone(), name.clone());
                match remote(&ns).create(&PostParams::default(), &object).await {
                    Ok(_) => {
                        self.rejections().remove(&key);
                        Ok(())
                    }
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
                    // The provider's admission said no (quota, Pod
                    // Security, a webhook): the pod shows why, and the
                    // copy is tried again (quota frees up, policies
                    // change). A terminating namespace is only waited for.
                    Err(kube::Error::Api(e))
                        if matches!(e.code, 400 | 403 | 422)
                            && !e.message.contains("being terminated") =>
                    {
                        let message = format!(
                            "the provider refused the copy ({} {}): {}; retrying",
                            e.code, e.reason, e.message
                        );
                        let new = self.rejections().insert(key, message.clone()) != Some(message.clone());
                        if new {
                            warn!(pod = %format!("{ns}/{name}"), "{message}");
                            self.event(&ns, &name, "OffloadRejected", &message).await;
                            let status = json!({"reason": "OffloadRejected", "message": message});
                            let _ = local(&ns)
                                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&json!({ "status": status })))
                                .await;
                        }
                        Err(format!("creating pod {ns}/{name} in the provider: {message}"))
                    }
                    Err(e) => Err(format!("creating pod {ns}/{name} in the provider: {e}")),
                }
            }
            Action::DeleteRemote { namespace, name, uid, grace_seconds } => {
                let grace = grace_seconds.and_then(|g| u32::try_from(g).ok());
                delete_if_still(&remote(&namespace), &name, uid, grace)
                    .await
                    .map_err(|e| format!("deleting pod {namespace}/{name} in the provider: {e}"))
            }
            Action::RestoreRemote(ns, name, patch) => remote(&ns)
                .patch(&name, &PatchParams::default(), &Patch::Strategic(&patch))
                .await
                .map(|_| info!(pod = %format!("{ns}/{name}"), "restored the copy edited in the provider"))
                .map_err(|e| format!("restoring pod {ns}/{name} in the provider: {e}")),
            Action::PatchStatus(ns, name, status) => {
                let written = local(&ns)
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&json!({ "status": status })))
                    .await
                    .map_err(|e| format!("writing the status of pod {ns}/{name}: {e}"))?;
                let written = pods::Written {
                    patch: pods::patch_digest(&status),
                    status_after: facts_of(&written).status_digest(),
                };
                self.written_patches().insert((ns, name), written);
                Ok(())
            }
            Action::FinishDelete(ns, name, uid) => delete_if_still(&local(&ns), &name, uid, Some(0))
                .await
                .map_err(|e| format!("finishing the deletion of pod {ns}/{name}: {e}")),
            Action::Refuse(ns, name, refusal) => {
                let status = json!({"reason": refusal.reason, "message": refusal.message});
                warn!(pod = %format!("{ns}/{name}"), reason = %refusal.reason, "{}", refusal.message);
                self.event(&ns, &name, &refusal.reason, &refusal.message).await;
                local(&ns)
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&json!({ "status": status })))
                    .await
                    .map(drop)
                    .map_err(|e| format!("recording the refusal of pod {ns}/{name}: {e}"))
            }
            Action::Bounce(ns, name, refusal) => {
                warn!(pod = %format!("{ns}/{name}"), reason = %refusal.reason, "{}", refusal.message);
                self.event(&ns, &name, &refusal.reason, &refusal.message).await;
                let status = json!({"phase": "Failed", "reason": refusal.reason, "message": refusal.message});
                local(&ns)
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&json!({ "status": status })))
                    .await
                    .map(drop)
                    .map_err(|e| format!("failing pod {ns}/{name}: {e}"))
            }
        }
    }

    /// Reports every Ready pod bound to the virtual node NotReady (the
    /// provider has not been readable for the grace period).
    pub(super) async fn report_not_ready(&mut self, pods: &Kept<PodFacts>, why: &str) {
        let now = crate::controller::now_rfc3339();
        for pod in pods.items() {
            let Some(patch) = pods::not_ready_patch(&pod, why, &now) else {
                continue;
            };
            let (ns, name) = pod.key();
            let api =
                Api::<DynamicObject>::namespaced_with(self.local.clone(), &ns, &self.pod_resource);
            match api
                .patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(&json!({ "status": patch })),
                )
                .await
            {
                Ok(_) => {
                    info!(pod = %format!("{ns}/{name}"), "reported NotReady: the provider has not answered for the grace period")
                }
                Err(e) => {
                    self.errors += 1;
                    warn!(pod = %format!("{ns}/{name}"), error = %e, "cannot report the pod NotReady; retrying");
                }
            }
        }
    }

    fn rejections(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), String>> {
        self.rejected.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn written_patches(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), pods::Written>> {
        self.written.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops status patches already written whose pods still show what the
    /// server made of them.
    pub(super) fn skip_written(&self, actions: &mut Vec<Action>, pods: &[Arc<PodFacts>]) {
        let by_key: BTreeMap<(&str, &str), &PodFacts> = pods
            .iter()
            .map(|p| ((p.namespace.as_str(), p.name.as_str()), &**p))
            .collect();
        let written = self.written_patches();
        actions.retain(|action| {
            let Action::PatchStatus(ns, name, patch) = action else {
                return true;
            };
            let done = by_key
                .get(&(ns.as_str(), name.as_str()))
                .is_some_and(|pod| {
                    pods::already_written(pod, patch, written.get(&(ns.clone(), name.clone())))
                });
            !done
        });
    }

    /// A Warning Event on a pod, as `kubectl describe` shows it.
    pub(super) async fn event(&self, ns: &str, pod: &str, reason: &str, message: &str) {
        let now = crate::controller::now_rfc3339();
        let event = json!({
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": format!("{pod}."), "namespace": ns},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": pod, "namespace": ns},
            "reason": reason,
            "message": message,
            "type": "Warning",
            "source": {"component": "ligo-control", "host": self.node},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        });
        let api: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(self.local.clone(), ns);
        let Ok(event) = serde_json::from_value(event) else {
            return;
        };
        if let Err(e) = api.create(&PostParams::default(), &event).await {
            warn!(pod = %format!("{ns}/{pod}"), error = %e, "cannot record an Event");
        }
    }
}

/// Deletes pod `name` if it is still the one with `uid` (gone already, or
/// another pod of that name now: nothing to do).
async fn delete_if_still(
    api: &Api<DynamicObject>,
    name: &str,
    uid: String,
    grace_seconds: Option<u32>,
) -> Result<(), kube::Error> {
    let params = DeleteParams {
        grace_period_seconds: grace_seconds,
        preconditions: Some(Preconditions {
            uid: Some(uid),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}
