//! The `Peer` pass: every peer in creation order, each reconciled against
//! the others as this pass leaves them (so a view given to one is taken
//! for the next), and what differs written.

use std::collections::{BTreeMap, BTreeSet};

use ipnetwork::Ipv4Network;
use kube::{
    api::{Api, Patch, PatchParams},
    Client, ResourceExt,
};
use serde_json::json;
use tracing::{info, warn};

use super::{
    cluster::Local,
    now_rfc3339,
    remote::{Remotes, Target, KUBECONFIG_FIELD},
    Stores, FIELD_MANAGER,
};
use crate::{
    conditions,
    crd::{LinkStatus, Peer},
    peer::{self, NodeReports, OtherPeer, PeerInputs},
};

/// Views written in an earlier pass that the store may not show yet.
pub type PendingViews = BTreeMap<String, String>;

/// What one pass learnt about a peer that offloading builds on.
pub struct PeerOutcome {
    pub peer: Peer,
    /// Its view as this pass leaves it.
    pub view: Option<Ipv4Network>,
    pub remote: crate::peer::Remote,
    /// Where and how its API server is reached, when the spec says.
    pub target: Option<Target>,
    /// The fabric's tunnel to it is up (else why not).
    pub tunnel: Result<(), String>,
}

pub async fn pass(
    client: &Client,
    stores: &Stores,
    remotes: &Remotes,
    local: Option<&Local>,
    pending: &mut PendingViews,
) -> Vec<PeerOutcome> {
    let mut outcomes = Vec::new();
    let mut peers = stores.peers.state();
    peers.sort_by_key(|p| (created(p), p.name_any()));
    let names: BTreeSet<String> = peers.iter().map(|p| p.name_any()).collect();
    remotes.retain(&names);
    // Until the store shows the spec with its view.
    pending.retain(|name, _| {
        peers
            .iter()
            .any(|p| p.name_any() == *name && p.spec.view.is_none())
    });
    let Some(local) = local else {
        return outcomes;
    };
    let api: Api<Peer> = Api::all(client.clone());

    // The view each peer holds, as this pass goes.
    let mut views: BTreeMap<String, Ipv4Network> = peers
        .iter()
        .filter_map(|p| {
            let name = p.name_any();
            let view = p
                .spec
                .view
                .clone()
                .or_else(|| pending.get(&name).cloned())?;
            Some((name, view.parse().ok()?))
        })
        .collect();

    for peer in &peers {
        let name = peer.name_any();
        let others: Vec<OtherPeer> = peers
            .iter()
            .filter(|o| o.name_any() != name)
            .map(|o| OtherPeer {
                name: o.name_any(),
                cluster_id: o.spec.cluster_id,
                view: views.get(&o.name_any()).copied(),
                created: created(o),
            })
            .collect();
        let mut spec = peer.spec.clone();
        if spec.view.is_none() {
            spec.view = pending.get(&name).cloned();
        }
        let target = remote_target(peer, stores, local);
        let remote = remotes.observe(&name, target.clone());
        let link = link_of(stores, &name);
        let nodes = node_reports(stores, &name);
        let plan = peer::reconcile(&PeerInputs {
            name: &name,
            created: &created(peer),
            spec: &spec,
            local: local.resolved.as_ref().map_err(Clone::clone),
            node_addresses: &local.node_addresses,
            others: &others,
            remote: &remote,
            link: link.as_ref(),
            nodes: &nodes,
        });

        if !plan.update.is_empty() {
            let mut fields = serde_json::Map::new();
            if let Some(view) = &plan.update.view {
                fields.insert("view".into(), json!(view));
            }
            if let Some(endpoints) = &plan.update.gateway_endpoints {
                fields.insert("gatewayEndpoints".into(), json!(endpoints));
            }
            if let Some(key) = &plan.update.wireguard_public_key {
                fields.insert("wireguardPublicKey".into(), json!(key));
            }
            // A merge patch with the version read: a view is written into
            // the spec we saw, or not at all (the next pass retries).
            let patch = json!({
                "metadata": {"resourceVersion": peer.resource_version()},
                "spec": fields,
            });
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    info!(peer = %name, update = ?plan.update, "updated Peer spec");
                    if let Some(view) = &plan.update.view {
                        pending.insert(name.clone(), view.clone());
                        if let Ok(net) = view.parse() {
                            views.insert(name.clone(), net);
                        }
                    }
                }
                Err(e) => warn!(peer = %name, error = %e, "cannot update the Peer spec; retrying"),
            }
        }

        let previous = peer.status.clone().unwrap_or_default();
        let mut status = plan.status.clone();
        status.conditions = conditions::merge(
            &previous.conditions,
            &plan.verdicts,
            peer.metadata.generation,
            &now_rfc3339(),
        );
        let same = conditions::same_apart_from_time(&previous.conditions, &status.conditions)
            && previous.remote_view == status.remote_view
            && previous.link == status.link;
        if !same {
            let patch = json!({
                "apiVersion": "ligo.io/v1alpha1",
                "kind": "Peer",
                "status": status,
            });
            if let Err(e) = api
                .patch_status(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .await
            {
                warn!(peer = %name, error = %e, "cannot write the Peer status");
            }
        }
        let tunnel = plan
            .verdicts
            .iter()
            .find(|v| v.type_ == "TunnelEstablished")
            .map_or(Err("not checked".to_owned()), |v| {
                if v.ok {
                    Ok(())
                } else {
                    Err(v.message.clone())
                }
            });
        outcomes.push(PeerOutcome {
            peer: (**peer).clone(),
            view: views.get(&name).copied(),
            remote,
            target,
            tunnel,
        });
    }
    outcomes
}

fn created(peer: &Peer) -> String {
    peer.metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_default()
}

/// Where and how to read the remote, when the spec says.
fn remote_target(peer: &Peer, stores: &Stores, local: &Local) -> Option<Target> {
    let api_server = peer.spec.api_server.as_ref()?;
    let our_name = local.resolved.as_ref().ok()?.cluster_name.clone();
    let secret = stores
        .secrets
        .state()
        .into_iter()
        .find(|s| s.name_any() == api_server.credentials_secret);
    let kubeconfig = match secret {
        None => Err(format!(
            "spec.apiServer.credentialsSecret: Secret {:?} does not exist in the control plane's namespace",
            api_server.credentials_secret
        )),
        Some(s) => s
            .data
            .as_ref()
            .and_then(|d| d.get(KUBECONFIG_FIELD))
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .ok_or_else(|| {
                format!(
                    "Secret {:?} has no data.{KUBECONFIG_FIELD}",
                    api_server.credentials_secret
                )
            }),
    };
    let offloading = peer.spec.offloading.as_ref();
    Some(Target {
        url: api_server.url.clone(),
        ca_bundle: api_server.ca_bundle.clone(),
        kubeconfig,
        our_name,
        fast: offloading.is_some_and(|o| o.consume || o.provide),
    })
}

/// The freshest link report for `peer` among the gateways' NodeFabrics.
fn link_of(stores: &Stores, peer: &str) -> Option<LinkStatus> {
    stores
        .node_fabrics
        .state()
        .iter()
        .filter_map(|nf| nf.status.as_ref())
        .flat_map(|s| s.peers.iter())
        .filter(|r| r.peer == peer)
        .min_by_key(|r| r.link.handshake_age_seconds.unwrap_or(u64::MAX))
        .map(|r| r.link.clone())
}

/// Which nodes' daemons carry `peer`. A node whose Ready condition says it
/// is down is not waited for; one with no conditions (no kubelet reports
/// them) is.
fn node_reports(stores: &Stores, peer: &str) -> NodeReports {
    let fabrics = stores.node_fabrics.state();
    let mut reports = NodeReports::default();
    let mut nodes = stores.nodes.state();
    nodes.sort_by_key(|n| n.name_any());
    // No daemon runs on a virtual node.
    nodes.retain(|n| !n.labels().contains_key(crate::crd::VIRTUAL_NODE_LABEL));
    for node in nodes {
        let name = node.name_any();
        let status = fabrics
            .iter()
            .find(|nf| nf.name_any() == name)
            .and_then(|nf| nf.status.as_ref())
            .filter(|s| !s.conditions.is_empty());
        match status {
            Some(s) => {
                let refused = s
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "Programmed" && c.status != "True");
                if !refused && s.programmed_peers.iter().any(|p| p == peer) {
                    reports.programmed.push(name);
                } else {
                    reports.lagging.push(name);
                }
            }
            None if known_down(&node) => {}
            None => reports.silent.push(name),
        }
    }
    reports
}

fn known_down(node: &k8s_openapi::api::core::v1::Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|ready| ready.status != "True")
}
