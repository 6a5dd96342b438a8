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

use ipnetwork::Ipv4Network;
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Node, NodeCondition, NodeStatus, Pod},
};
use kube::{
    api::{Api, DynamicObject, Patch, PatchParams},
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
        pods::{self, NamespaceState},
        reflect::AddressMap,
        virtual_node::{self, Health},
    },
};

mod writes;

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
    /// The last status patch written to each pod, and what the server
    /// made of it (so a field it drops is not written on every pass).
    written: std::sync::Mutex<BTreeMap<(String, String), pods::Written>>,
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
        written: Default::default(),
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
            let mut actions = pods::plan(&pods, &copies_now, &ctx);
            shell.skip_written(&mut actions, &pods);
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
