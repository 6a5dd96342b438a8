//! The consumer's side: one task per peer we run pods on. It keeps the
//! virtual node (its status every change and heartbeat, its Lease every
//! 10 s), watches the pods bound to it here and their copies in the
//! namespaces the provider granted, and carries out what
//! [`crate::offload::pods::plan`] says, many writes at a time.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::StreamExt;
use ipnetwork::Ipv4Network;
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Node, NodeCondition, NodeStatus, Pod},
};
use kube::{
    api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams, Preconditions},
    discovery::ApiResource,
    runtime::watcher,
    Client,
};
use serde_json::json;
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use super::super::{
    metrics::OffloadMetrics,
    remote::Target,
    stores::{kept_store, AbortOnDrop, Kept},
    FIELD_MANAGER,
};
use super::reflection::NamespaceReflection;
use crate::{
    crd::{NamespaceGrant, VirtualNodeStatus, ORIGIN_LABEL},
    offload::{
        inventory,
        pod_facts::PodFacts,
        pods::{self, Action, NamespaceState},
        reflect::AddressMap,
        virtual_node::{self, Health},
    },
};

/// As the kubelet: a Lease renewal every 10 s, a status at least every
/// minute even when nothing changed.
const LEASE_RENEW: Duration = Duration::from_secs(10);
const STATUS_HEARTBEAT: Duration = Duration::from_secs(60);
/// Writes in flight at once (the API servers' default per-client budget
/// is far above this; the scheduler and kubelets share the server).
const CONCURRENT_WRITES: usize = 32;
/// A write already made is not repeated for this long while the watch
/// catches up.
const IN_FLIGHT: Duration = Duration::from_secs(10);
/// The field manager of the consumer's part of a Peer's status.
const MANAGER: &str = "ligo-control-consumer";

/// What the task is for; a change restarts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerTarget {
    pub remote: Target,
    pub peer: String,
    pub peer_cluster_id: u32,
    pub remote_cidr: Ipv4Network,
    pub view: Ipv4Network,
    pub our_name: String,
    /// Our pod CIDR, and the provider's view of it (once it has one):
    /// reflected endpoints are given in its terms.
    pub our_cidr: Ipv4Network,
    pub our_cidr_there: Option<Ipv4Network>,
}

/// What the task follows as it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerInputs {
    /// Our namespaces offloaded to the peer.
    pub namespaces: Vec<String>,
    /// The provider's answer for each.
    pub grants: Vec<NamespaceGrant>,
    pub offered: BTreeMap<String, String>,
    pub limits: BTreeMap<String, String>,
    pub provider: Result<(), String>,
    pub network: Result<(), String>,
}

pub struct ConsumerTask {
    pub target: ConsumerTarget,
    pub inputs: watch::Sender<ConsumerInputs>,
    handle: tokio::task::JoinHandle<()>,
}

impl Drop for ConsumerTask {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

impl ConsumerTask {
    pub fn start(
        local: Client,
        target: ConsumerTarget,
        inputs: ConsumerInputs,
        metrics: Arc<OffloadMetrics>,
    ) -> Self {
        let (sender, receiver) = watch::channel(inputs);
        let handle = tokio::spawn(run(local, target.clone(), receiver, metrics));
        Self {
            target,
            inputs: sender,
            handle,
        }
    }
}

struct Shell {
    local: Client,
    remote: Client,
    target: ConsumerTarget,
    node: String,
    pod_resource: ApiResource,
    /// The node's metadata and spec are applied (once per task, and again
    /// if the node went missing).
    node_applied: bool,
    last_status: Option<(NodeStatus, Instant)>,
    last_lease: Option<Instant>,
    last_summary: Option<VirtualNodeStatus>,
    metrics: Arc<OffloadMetrics>,
    /// The error count the metrics already hold.
    errors_recorded: u64,
    in_flight: BTreeMap<(String, String), Instant>,
    errors: u64,
    /// Pods whose copy the provider refuses to create, with what it said
    /// (reported on the pod once per new answer, not on every retry).
    rejected: std::sync::Mutex<BTreeMap<(String, String), String>>,
}

async fn run(
    local: Client,
    target: ConsumerTarget,
    mut inputs: watch::Receiver<ConsumerInputs>,
    metrics: Arc<OffloadMetrics>,
) {
    let kubeconfig = match &target.remote.kubeconfig {
        Ok(k) => k.clone(),
        Err(_) => return, // the Peer's CredentialsValid condition says why
    };
    let remote = match super::super::remote::client_for(
        &target.remote,
        &kubeconfig,
        crate::cli::WATCH_READ_TIMEOUT,
    )
    .await
    {
        Ok(c) => c,
        Err(why) => {
            warn!(peer = %target.peer, error = %why, "cannot reach the provider to run pods there");
            return;
        }
    };
    let wake = Arc::new(Notify::new());
    let pod_resource = ApiResource::erase::<Pod>(&());
    let node = virtual_node::node_name(&target.peer);
    let (local_pods, _local_watch) = kept_store(
        Api::all_with(local.clone(), &pod_resource),
        watcher::Config::default().fields(&format!("spec.nodeName={node}")),
        facts_of,
        "pods on the virtual node",
        &wake,
    );
    let mut copies: BTreeMap<String, (Kept<PodFacts>, AbortOnDrop)> = BTreeMap::new();
    let mut reflections: BTreeMap<String, NamespaceReflection> = BTreeMap::new();
    // discovery.k8s.io/v1 where the provider serves it; core/v1 Endpoints
    // otherwise (1.20 and older).
    let slices = remote
        .list_api_group_resources("discovery.k8s.io/v1")
        .await
        .is_ok_and(|list| list.resources.iter().any(|r| r.name == "endpointslices"));
    info!(peer = %target.peer, endpoint_slices = slices, "the provider's endpoints API");
    let mut shell = Shell {
        local,
        remote,
        target: target.clone(),
        node,
        pod_resource,
        node_applied: false,
        last_status: None,
        last_lease: None,
        last_summary: None,
        metrics,
        errors_recorded: 0,
        in_flight: BTreeMap::new(),
        errors: 0,
        rejected: Default::default(),
    };
    info!(peer = %target.peer, node = %shell.node, "running pods on the peer through a virtual node");
    let mut unreadable_since: Option<Instant> = None;
    loop {
        let now_inputs = inputs.borrow_and_update().clone();
        let granted: BTreeSet<String> = now_inputs
            .grants
            .iter()
            .filter(|g| g.state == "Granted" && now_inputs.namespaces.contains(&g.name))
            .map(|g| g.name.clone())
            .collect();
        copies.retain(|ns, _| granted.contains(ns));
        reflections.retain(|ns, _| granted.contains(ns));
        for ns in &granted {
            if !copies.contains_key(ns) {
                let store = kept_store(
                    Api::namespaced_with(shell.remote.clone(), ns, &shell.pod_resource),
                    watcher::Config::default()
                        .labels(&format!("{ORIGIN_LABEL}={}", target.our_name)),
                    facts_of,
                    "the pods' copies",
                    &wake,
                );
                copies.insert(ns.clone(), store);
                reflections.insert(
                    ns.clone(),
                    NamespaceReflection::start(
                        ns,
                        &shell.local,
                        &shell.remote,
                        &target.our_name,
                        slices,
                        &wake,
                    ),
                );
            }
        }
        let namespaces: BTreeMap<String, NamespaceState> = now_inputs
            .namespaces
            .iter()
            .map(|ns| {
                let grant = now_inputs.grants.iter().find(|g| g.name == *ns);
                let state = match grant {
                    Some(g) if g.state == "Granted" => match copies.get(ns) {
                        Some((store, _)) if store.listed() => NamespaceState::Ready,
                        _ => NamespaceState::Waiting,
                    },
                    Some(g) if g.state == "Waiting" || g.state == "Terminating" => {
                        NamespaceState::Waiting
                    }
                    Some(g) => NamespaceState::Refused(g.state.clone(), g.message.clone()),
                    None => NamespaceState::Waiting,
                };
                (ns.clone(), state)
            })
            .collect();

        let capacity = shell.upkeep_node(&now_inputs).await;
        // While the provider cannot be read, what its copies last said is
        // not the truth: nothing is copied either way. Past the grace
        // period its pods are reported NotReady here (so Services stop
        // sending to them); they are not touched otherwise.
        match &now_inputs.provider {
            Ok(()) => unreadable_since = None,
            Err(why) => {
                let since = *unreadable_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= Duration::from_secs(pods::PROVIDER_GRACE_SECONDS)
                    && local_pods.listed()
                {
                    shell.report_not_ready(&local_pods, why).await;
                }
            }
        }
        if local_pods.listed() && now_inputs.provider.is_ok() {
            let pods = local_pods.items();
            let copies_now: Vec<Arc<PodFacts>> =
                copies.values().flat_map(|(s, _)| s.items()).collect();
            let ctx = pods::Context {
                origin: &target.our_name,
                namespaces: &namespaces,
                remote_cidr: target.remote_cidr,
                view: target.view,
                now: k8s_openapi::jiff::Timestamp::now().as_second(),
            };
            let actions = pods::plan(&pods, &copies_now, &ctx);
            let keys = |list: &[Arc<PodFacts>]| -> BTreeSet<(String, String)> {
                list.iter().map(|p| p.key()).collect()
            };
            shell
                .execute(actions, &keys(&copies_now), &keys(&pods))
                .await;
            let mut reflected = 0;
            if let Some(there) = target.our_cidr_there {
                let addresses = AddressMap {
                    our_cidr: target.our_cidr,
                    our_cidr_there: there,
                    view: target.view,
                    remote_cidr: target.remote_cidr,
                };
                for (ns, reflection) in reflections.iter_mut() {
                    let running_there: Vec<&PodFacts> = pods
                        .iter()
                        .map(|p| &**p)
                        .filter(|p| p.namespace == *ns)
                        .filter(|p| pods::refusal(p, &namespaces).is_none())
                        .collect();
                    let outcome = reflection
                        .reconcile(&running_there, &target.our_name, &addresses)
                        .await;
                    reflected += outcome.reflected;
                    shell.errors += outcome.errors;
                }
            }
            let refused = pods
                .iter()
                .filter(|p| pods::refusal(p, &namespaces).is_some())
                .count();
            let finished = pods.iter().filter(|p| p.terminal()).count();
            shell
                .summarize(
                    VirtualNodeStatus {
                        name: shell.node.clone(),
                        namespaces: namespaces
                            .iter()
                            .map(|(name, state)| {
                                let (state, message) = match state {
                                    NamespaceState::Ready => ("Granted".to_owned(), String::new()),
                                    NamespaceState::Waiting => (
                                        "Waiting".to_owned(),
                                        "the provider has not granted it yet".to_owned(),
                                    ),
                                    NamespaceState::Refused(r, m) => (r.clone(), m.clone()),
                                };
                                NamespaceGrant {
                                    name: name.clone(),
                                    state,
                                    message,
                                }
                            })
                            .collect(),
                        capacity: inventory::to_quantities(&capacity),
                        pods_offloaded: (pods.len() - refused - finished.min(pods.len() - refused))
                            as u32,
                        pods_refused: refused as u32,
                        objects_reflected: reflected,
                        reflection_errors: shell.errors,
                    },
                    now_inputs.provider.is_ok(),
                )
                .await;
        }
        tokio::select! {
            () = wake.notified() => tokio::time::sleep(Duration::from_millis(20)).await,
            changed = inputs.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(LEASE_RENEW) => {}
        }
    }
}

impl Shell {
    /// The virtual node, its status and its Lease; returns its capacity.
    async fn upkeep_node(&mut self, inputs: &ConsumerInputs) -> inventory::Resources {
        let nodes: Api<Node> = Api::all(self.local.clone());
        if !self.node_applied {
            let node = virtual_node::node(&self.target.peer, self.target.peer_cluster_id);
            match nodes
                .patch(
                    &self.node,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&node),
                )
                .await
            {
                Ok(_) => {
                    self.node_applied = true;
                    self.last_status = None;
                }
                Err(e) => {
                    self.errors += 1;
                    warn!(node = %self.node, error = %e, "cannot create the virtual node; retrying");
                }
            }
        }
        let offered = inventory::from_quantities(&inputs.offered);
        let capacity = match inventory::capped(&offered, &inputs.limits) {
            Ok(c) => c,
            Err(why) => {
                warn!(peer = %self.target.peer, error = %why, "ignoring the virtual node's limits");
                offered
            }
        };
        let health = Health {
            provider: inputs.provider.clone(),
            network: inputs.network.clone(),
        };
        let previous: Vec<NodeCondition> = self
            .last_status
            .as_ref()
            .and_then(|(s, _)| s.conditions.clone())
            .unwrap_or_default();
        let now = k8s_openapi::jiff::Timestamp::now();
        let status = virtual_node::status(&capacity, &health, &previous, now);
        let due = match &self.last_status {
            Some((last, at)) => {
                !virtual_node::same_status(last, &status) || at.elapsed() >= STATUS_HEARTBEAT
            }
            None => true,
        };
        if self.node_applied && due {
            match nodes
                .patch_status(
                    &self.node,
                    &PatchParams::default(),
                    &Patch::Merge(&json!({ "status": status })),
                )
                .await
            {
                Ok(_) => self.last_status = Some((status, Instant::now())),
                Err(kube::Error::Api(e)) if e.code == 404 => self.node_applied = false,
                Err(e) => {
                    self.errors += 1;
                    warn!(node = %self.node, error = %e, "cannot write the virtual node's status; retrying");
                }
            }
        }
        if self.node_applied && self.last_lease.is_none_or(|t| t.elapsed() >= LEASE_RENEW) {
            let lease = virtual_node::lease(&self.target.peer, now);
            let leases: Api<Lease> =
                Api::namespaced(self.local.clone(), virtual_node::LEASE_NAMESPACE);
            match leases
                .patch(
                    &self.node,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&lease),
                )
                .await
            {
                Ok(_) => self.last_lease = Some(Instant::now()),
                Err(e) => {
                    self.errors += 1;
                    warn!(node = %self.node, error = %e, "cannot renew the virtual node's Lease; retrying");
                }
            }
        }
        capacity
    }

    /// Carries out `actions`, skipping a create or delete already made
    /// whose result the watches do not show yet (`copies` and `pods`: the
    /// keys they show now).
    async fn execute(
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

    async fn apply(&self, action: Action) -> Result<(), String> {
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
                let params = DeleteParams {
                    grace_period_seconds: grace_seconds.and_then(|g| u32::try_from(g).ok()),
                    preconditions: Some(Preconditions { uid: Some(uid), resource_version: None }),
                    ..DeleteParams::default()
                };
                match remote(&namespace).delete(&name, &params).await {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
                    Err(e) => Err(format!("deleting pod {namespace}/{name} in the provider: {e}")),
                }
            }
            Action::RestoreRemote(ns, name, patch) => remote(&ns)
                .patch(&name, &PatchParams::default(), &Patch::Strategic(&patch))
                .await
                .map(|_| info!(pod = %format!("{ns}/{name}"), "restored the copy edited in the provider"))
                .map_err(|e| format!("restoring pod {ns}/{name} in the provider: {e}")),
            Action::PatchStatus(ns, name, status) => local(&ns)
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&json!({ "status": status })))
                .await
                .map(drop)
                .map_err(|e| format!("writing the status of pod {ns}/{name}: {e}")),
            Action::FinishDelete(ns, name, uid) => {
                let params = DeleteParams {
                    grace_period_seconds: Some(0),
                    preconditions: Some(Preconditions { uid: Some(uid), resource_version: None }),
                    ..DeleteParams::default()
                };
                match local(&ns).delete(&name, &params).await {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
                    Err(e) => Err(format!("finishing the deletion of pod {ns}/{name}: {e}")),
                }
            }
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
    async fn report_not_ready(&mut self, pods: &Kept<PodFacts>, why: &str) {
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

    /// A Warning Event on a pod, as `kubectl describe` shows it.
    async fn event(&self, ns: &str, pod: &str, reason: &str, message: &str) {
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

    /// The virtual node's line in our `Peer` for the provider.
    async fn summarize(&mut self, summary: VirtualNodeStatus, ready: bool) {
        self.metrics
            .record(&self.target.peer, &summary, ready, self.errors_recorded);
        self.errors_recorded = summary.reflection_errors;
        if self.last_summary.as_ref() == Some(&summary) {
            return;
        }
        let mut node = serde_json::to_value(&summary).unwrap_or_default();
        // Sent as [] when empty (a 1.20 server refuses the null that an
        // emptied map-list becomes otherwise).
        if let Some(fields) = node.as_object_mut() {
            fields.entry("namespaces").or_insert_with(|| json!([]));
        }
        let patch = json!({
            "apiVersion": "ligo.io/v1alpha1",
            "kind": "Peer",
            "status": {"offloading": {"virtualNode": node}},
        });
        let api: Api<crate::crd::Peer> = Api::all(self.local.clone());
        match api
            .patch_status(
                &self.target.peer,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
        {
            Ok(_) => self.last_summary = Some(summary),
            Err(e) => {
                warn!(peer = %self.target.peer, error = %e, "cannot write the virtual node's summary")
            }
        }
    }
}

/// What is kept of a pod or a copy: its facts, not the object.
fn facts_of(pod: &DynamicObject) -> PodFacts {
    PodFacts::of(&serde_json::to_value(pod).unwrap_or_default())
}
