//! Offloading's I/O shell, run after the `Peer` pass: the provider's side
//! in the pass itself ([`provider`]), the consumer's side as one task per
//! peer we run pods on ([`consumer`]), and the sweep that removes a
//! virtual node (its Lease and the pods bound to it) once its peering no
//! longer runs pods there.

mod consumer;
mod provider;
mod reflection;

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Node, Pod},
};
use kube::{
    api::{Api, DeleteParams, ListParams, Patch, PatchParams},
    Client, ResourceExt,
};
use tracing::{info, warn};

use self::consumer::{ConsumerInputs, ConsumerTarget, ConsumerTask};
pub use self::provider::GUEST_ROLE;
use super::{cluster::Local, peer::PeerOutcome, Stores};
use crate::{
    crd::{NamespaceGrant, VIRTUAL_NODE_LABEL},
    offload::virtual_node,
    peer::Remote,
};

/// Offloading's state across passes.
pub struct Offloading {
    metrics: std::sync::Arc<super::metrics::OffloadMetrics>,
    consumers: BTreeMap<String, ConsumerTask>,
    provider: provider::ProviderState,
    /// Each provider's last answer (grants, offer): kept while it cannot be
    /// read, so an outage changes nothing but the node's Ready condition.
    last_answer: BTreeMap<String, (Vec<NamespaceGrant>, BTreeMap<String, String>)>,
    /// How each provider sees our pod CIDR, once known.
    views_of_us: BTreeMap<String, ipnetwork::Ipv4Network>,
    /// Virtual nodes removed by this process whose pods may not all be gone
    /// yet (the scheduler may bind one just before the node goes).
    removed_nodes: BTreeSet<String>,
}

impl Offloading {
    pub fn new(metrics: std::sync::Arc<super::metrics::OffloadMetrics>) -> Self {
        Self {
            metrics,
            consumers: BTreeMap::new(),
            provider: provider::ProviderState::default(),
            last_answer: BTreeMap::new(),
            views_of_us: BTreeMap::new(),
            removed_nodes: BTreeSet::new(),
        }
    }
}

pub async fn pass(
    client: &Client,
    stores: &Stores,
    outcomes: &[PeerOutcome],
    local: Option<&Local>,
    identity_namespace: &str,
    state: &mut Offloading,
) {
    // Without our own settings no peer was reconciled: change nothing.
    let Some(Ok(resolved)) = local.map(|l| l.resolved.as_ref()) else {
        return;
    };
    provider::pass(
        client,
        stores,
        outcomes,
        identity_namespace,
        &mut state.provider,
    )
    .await;

    let mut consuming = BTreeSet::new();
    for outcome in outcomes {
        let peer = outcome.peer.name_any();
        let Some(settings) = outcome.peer.spec.offloading.as_ref().filter(|o| o.consume) else {
            continue;
        };
        let (Some(remote), Some(view), Ok(remote_cidr)) = (
            outcome.target.clone(),
            outcome.view,
            outcome.peer.spec.pod_cidr.parse(),
        ) else {
            continue; // the Peer's conditions say what is missing
        };
        consuming.insert(peer.clone());
        let provider = match &outcome.remote {
            Remote::Read(facts) => {
                let status = facts.offloading_status.clone().unwrap_or_default();
                state
                    .last_answer
                    .insert(peer.clone(), (status.granted_namespaces, status.offered));
                Ok(())
            }
            Remote::Unreachable(why) | Remote::Refused(why) | Remote::CredentialsUnusable(why) => {
                Err(why.clone())
            }
            Remote::NotConfigured => Err("spec.apiServer is not set".to_owned()),
        };
        let (grants, offered) = state.last_answer.get(&peer).cloned().unwrap_or_default();
        let inputs = ConsumerInputs {
            namespaces: settings.namespaces.clone(),
            grants,
            offered,
            limits: settings.limits.clone(),
            provider,
            network: outcome.tunnel.clone(),
        };
        let target = ConsumerTarget {
            remote,
            peer: peer.clone(),
            peer_cluster_id: outcome.peer.spec.cluster_id,
            remote_cidr,
            view,
            our_name: resolved.cluster_name.clone(),
            our_cidr: resolved.pod_cidr,
            // The last one known: an outage of the provider does not
            // restart the task (a view never changes once allocated).
            our_cidr_there: outcome
                .peer
                .status
                .as_ref()
                .and_then(|s| s.remote_view.as_deref())
                .or(match &outcome.remote {
                    Remote::Read(facts) => facts.view_of_us.as_deref(),
                    _ => None,
                })
                .and_then(|v| v.parse().ok())
                .map(|v| *state.views_of_us.entry(peer.clone()).or_insert(v))
                .or_else(|| state.views_of_us.get(&peer).copied()),
        };
        match state.consumers.get(&peer) {
            Some(task) if task.target == target => {
                task.inputs.send_if_modified(|current| {
                    let changed = *current != inputs;
                    *current = inputs;
                    changed
                });
            }
            _ => {
                state.consumers.insert(
                    peer.clone(),
                    ConsumerTask::start(client.clone(), target, inputs, state.metrics.clone()),
                );
            }
        }
    }
    for peer in state.consumers.keys().filter(|p| !consuming.contains(*p)) {
        state.metrics.forget(peer);
    }
    state.consumers.retain(|peer, _| consuming.contains(peer));
    state.last_answer.retain(|peer, _| consuming.contains(peer));
    state.views_of_us.retain(|peer, _| consuming.contains(peer));
    sweep(client, stores, &consuming, &mut state.removed_nodes).await;
}

/// Removes the virtual nodes of peers we no longer run pods on: cordoned
/// first (so nothing new is bound), then the pods bound to them (their
/// copies go with the namespaces the provider removes), their Leases, the
/// nodes; pods bound to a removed node are swept until none is left.
async fn sweep(
    client: &Client,
    stores: &Stores,
    consuming: &BTreeSet<String>,
    removed: &mut BTreeSet<String>,
) {
    let nodes: Api<Node> = Api::all(client.clone());
    for node in stores.nodes.state() {
        let Some(peer) = node.labels().get(VIRTUAL_NODE_LABEL) else {
            continue;
        };
        if consuming.contains(peer) || node.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let name = node.name_any();
        info!(node = %name, peer = %peer, "removing the virtual node: its peering no longer runs pods there");
        let cordon = serde_json::json!({"spec": {"unschedulable": true}});
        if let Err(e) = nodes
            .patch(&name, &PatchParams::default(), &Patch::Merge(&cordon))
            .await
        {
            warn!(node = %name, error = %e, "cannot cordon the virtual node; retrying");
            continue;
        }
        removed.insert(name);
    }
    let mut done = Vec::new();
    for name in removed.iter() {
        if consuming
            .iter()
            .any(|p| virtual_node::node_name(p) == *name)
        {
            done.push(name.clone()); // its peering runs pods again
            continue;
        }
        if remove_pods_of(client, name).await {
            let leases: Api<Lease> = Api::namespaced(client.clone(), virtual_node::LEASE_NAMESPACE);
            let _ = leases.delete(name, &DeleteParams::default()).await;
            match nodes.delete(name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    // Gone, and the pods bound to it with it.
                    if remove_pods_of(client, name).await {
                        done.push(name.clone());
                    }
                }
                Err(e) => {
                    warn!(node = %name, error = %e, "cannot delete the virtual node; retrying")
                }
            }
        }
    }
    for name in done {
        removed.remove(&name);
    }
}

/// Deletes the pods bound to virtual node `name`; true once there is none.
async fn remove_pods_of(client: &Client, name: &str) -> bool {
    let pods: Api<Pod> = Api::all(client.clone());
    let list = match pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={name}")))
        .await
    {
        Ok(list) => list,
        Err(e) => {
            warn!(node = %name, error = %e, "cannot list the pods of a removed virtual node; retrying");
            return false;
        }
    };
    if list.items.is_empty() {
        return true;
    }
    for pod in list {
        let ns = pod.namespace().unwrap_or_default();
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        };
        if let Err(e) = Api::<Pod>::namespaced(client.clone(), &ns)
            .delete(&pod.name_any(), &params)
            .await
        {
            warn!(pod = %format!("{ns}/{}", pod.name_any()), error = %e, "cannot remove a pod of a removed virtual node; retrying");
        }
    }
    false
}
