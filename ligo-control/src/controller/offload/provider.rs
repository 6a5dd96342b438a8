//! The provider's side, in each pass: for each peer we provide for, the
//! namespaces it asks for (created here, labelled with its name, and its
//! identity bound to `ligo-offload-guest` in each, and nothing wider), and
//! what it may still use here; both written into our `Peer` for it, which
//! it reads. A namespace of that name that is not the peer's is never
//! touched: the peer is told it is taken.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::{
    core::v1::Namespace,
    rbac::v1::{RoleBinding, RoleRef, Subject},
};
use kube::{
    api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
    Client, ResourceExt,
};
use serde_json::json;
use tracing::{info, warn};

use super::super::{peer::PeerOutcome, Stores, FIELD_MANAGER};
use crate::{
    crd::{NamespaceGrant, OffloadingStatus, ORIGIN_LABEL},
    offload::inventory,
    peer::Remote,
    peering::{IdentityNames, MANAGED_BY_LABEL},
};

/// The ClusterRole a consumer's identity gets in each namespace it is
/// granted (`manifests/base/rbac.yaml`).
pub const GUEST_ROLE: &str = "ligo-offload-guest";
/// The field manager of the provider's part of a Peer's status.
const MANAGER: &str = "ligo-control-provider";
/// Never handed to a peer, whatever it asks.
const RESERVED: [&str; 5] = [
    "default",
    "kube-system",
    "kube-public",
    "kube-node-lease",
    "ligo-system",
];

/// What earlier passes wrote that the stores may not show yet.
#[derive(Default)]
pub struct ProviderState {
    /// (peer, namespace) whose RoleBinding was applied by this process.
    bound: BTreeSet<(String, String)>,
    /// Namespaces created by this process (the store may lag).
    created: BTreeSet<String>,
}

fn owned_by(ns: &Namespace, peer: &str) -> bool {
    let labels = ns.labels();
    labels.get(ORIGIN_LABEL).map(String::as_str) == Some(peer)
        && labels.get(MANAGED_BY_LABEL).map(String::as_str) == Some(FIELD_MANAGER)
}

pub async fn pass(
    client: &Client,
    stores: &Stores,
    outcomes: &[PeerOutcome],
    identity_namespace: &str,
    state: &mut ProviderState,
) {
    let namespaces = stores.namespaces.state();
    // Shared, not copied: the store's pods are a cluster's worth.
    let nodes = stores.nodes.state();
    let pods = stores.pods.items();
    let ns_api: Api<Namespace> = Api::all(client.clone());
    let mut providing = BTreeSet::new();

    for outcome in outcomes {
        let peer = outcome.peer.name_any();
        let provide = outcome
            .peer
            .spec
            .offloading
            .as_ref()
            .is_some_and(|o| o.provide);
        if !provide {
            continue;
        }
        providing.insert(peer.clone());
        // What the peer asks for; unknown while it cannot be read (then
        // nothing is taken away: an outage is not a wish).
        let wish: Option<Vec<String>> = match &outcome.remote {
            Remote::Read(facts) => Some(
                facts
                    .offloading
                    .as_ref()
                    .filter(|o| o.consume)
                    .map(|o| o.namespaces.clone())
                    .unwrap_or_default(),
            ),
            _ => None,
        };
        let mut grants = Vec::new();
        for name in wish.iter().flatten() {
            let grant = |state: &str, message: String| NamespaceGrant {
                name: name.clone(),
                state: state.to_owned(),
                message,
            };
            if RESERVED.contains(&name.as_str()) {
                grants.push(grant(
                    "NamespaceReserved",
                    format!("namespace {name} is never offloaded into"),
                ));
                continue;
            }
            let existing = namespaces.iter().find(|n| n.name_any() == *name);
            match existing {
                Some(ns) if !owned_by(ns, &peer) => {
                    grants.push(grant(
                        "NamespaceTaken",
                        format!("namespace {name} exists in the provider and is not {peer}'s; offload another namespace or have the provider's operator free the name"),
                    ));
                    continue;
                }
                Some(ns) if ns.metadata.deletion_timestamp.is_some() => {
                    // Made again once gone, with its binding.
                    state.created.remove(name);
                    state.bound.retain(|(_, n)| n != name);
                    grants.push(grant(
                        "Terminating",
                        format!("namespace {name} is being deleted in the provider; it is made again once gone"),
                    ));
                    continue;
                }
                // The store shows it: should it vanish (deleted by
                // someone), it is made again.
                Some(_) => {
                    state.created.remove(name);
                }
                None if state.created.contains(name) => {}
                None => {
                    let object = Namespace {
                        metadata: ObjectMeta {
                            name: Some(name.clone()),
                            labels: Some(BTreeMap::from([
                                (ORIGIN_LABEL.to_owned(), peer.clone()),
                                (MANAGED_BY_LABEL.to_owned(), FIELD_MANAGER.to_owned()),
                                // A peer's pods get no more of our nodes
                                // than the baseline Pod Security level
                                // allows (enforced from Kubernetes 1.23).
                                (
                                    "pod-security.kubernetes.io/enforce".to_owned(),
                                    "baseline".to_owned(),
                                ),
                            ])),
                            ..ObjectMeta::default()
                        },
                        ..Namespace::default()
                    };
                    match ns_api.create(&PostParams::default(), &object).await {
                        Ok(_) => {
                            info!(peer = %peer, namespace = %name, "created namespace for the peer's pods");
                            state.created.insert(name.clone());
                            // A namespace made anew has no binding yet.
                            state.bound.retain(|(_, n)| n != name);
                        }
                        Err(e) => {
                            warn!(peer = %peer, namespace = %name, error = %e, "cannot create the namespace the peer asked for; retrying");
                            grants
                                .push(grant("Waiting", format!("creating namespace {name}: {e}")));
                            continue;
                        }
                    }
                }
            }
            if !state.bound.contains(&(peer.clone(), name.clone())) {
                match bind(client, &peer, name, identity_namespace).await {
                    Ok(()) => {
                        state.bound.insert((peer.clone(), name.clone()));
                    }
                    Err(e) => {
                        warn!(peer = %peer, namespace = %name, error = %e, "cannot bind the peer's identity in its namespace; retrying");
                        grants.push(grant("Waiting", format!("binding {GUEST_ROLE}: {e}")));
                        continue;
                    }
                }
            }
            grants.push(grant("Granted", String::new()));
        }
        // Namespaces the peer no longer asks for go, with all in them.
        if let Some(wish) = &wish {
            for ns in namespaces.iter().filter(|n| owned_by(n, &peer)) {
                if !wish.contains(&ns.name_any()) {
                    remove(&ns_api, ns, state, "the peer no longer offloads it").await;
                }
            }
        }
        let offered = inventory::to_quantities(&inventory::offered(&nodes, &pods, &peer));
        let previous = outcome
            .peer
            .status
            .as_ref()
            .and_then(|s| s.offloading.clone())
            .unwrap_or_default();
        let keep_grants = wish.is_none();
        let status = OffloadingStatus {
            offered,
            granted_namespaces: if keep_grants {
                previous.granted_namespaces.clone()
            } else {
                grants
            },
            virtual_node: None,
        };
        if status.offered != previous.offered
            || status.granted_namespaces != previous.granted_namespaces
        {
            write_status(client, &peer, &status).await;
        }
    }
    // Namespaces of peers we no longer provide for (or that are gone).
    for ns in namespaces.iter() {
        let labels = ns.labels();
        let (Some(origin), Some(FIELD_MANAGER)) = (
            labels.get(ORIGIN_LABEL),
            labels.get(MANAGED_BY_LABEL).map(String::as_str),
        ) else {
            continue;
        };
        if !providing.contains(origin) {
            remove(&ns_api, ns, state, "we no longer provide for its peer").await;
        }
    }
}

async fn remove(api: &Api<Namespace>, ns: &Namespace, state: &mut ProviderState, why: &str) {
    if ns.metadata.deletion_timestamp.is_some() {
        return;
    }
    let name = ns.name_any();
    state.created.remove(&name);
    state.bound.retain(|(_, n)| *n != name);
    match api.delete(&name, &DeleteParams::default()).await {
        Ok(_) => info!(namespace = %name, reason = why, "deleting an offloaded namespace"),
        Err(e) => {
            warn!(namespace = %name, error = %e, "cannot delete an offloaded namespace; retrying")
        }
    }
}

/// The peer's identity may manage pods, config and services in `namespace`,
/// and nowhere else.
async fn bind(
    client: &Client,
    peer: &str,
    namespace: &str,
    identity_namespace: &str,
) -> kube::Result<()> {
    let names = IdentityNames::for_guest(peer);
    let binding = RoleBinding {
        metadata: ObjectMeta {
            name: Some(names.role.clone()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                (ORIGIN_LABEL.to_owned(), peer.to_owned()),
                (MANAGED_BY_LABEL.to_owned(), FIELD_MANAGER.to_owned()),
            ])),
            ..ObjectMeta::default()
        },
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name: GUEST_ROLE.into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: names.service_account,
            namespace: Some(identity_namespace.to_owned()),
            ..Subject::default()
        }]),
    };
    Api::<RoleBinding>::namespaced(client.clone(), namespace)
        .patch(
            &names.role,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&binding),
        )
        .await
        .map(drop)
}

async fn write_status(client: &Client, peer: &str, status: &OffloadingStatus) {
    let patch = json!({
        "apiVersion": "ligo.io/v1alpha1",
        "kind": "Peer",
        "status": {"offloading": {
            "offered": status.offered,
            "grantedNamespaces": status.granted_namespaces,
        }},
    });
    let api: Api<crate::crd::Peer> = Api::all(client.clone());
    if let Err(e) = api
        .patch_status(
            peer,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
    {
        warn!(peer = %peer, error = %e, "cannot write the offer into the Peer status; retrying");
    }
}
