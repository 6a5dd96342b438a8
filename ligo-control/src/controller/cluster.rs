//! The `ClusterFabric` pass: read it, the Nodes and the key Secret from the
//! stores, run [`crate::cluster::reconcile`], write what differs.

use std::{collections::BTreeMap, net::Ipv4Addr};

use k8s_openapi::{api::core::v1::Secret, ByteString};
use kube::{
    api::{Api, ObjectMeta, Patch, PatchParams, PostParams},
    Client, ResourceExt,
};
use serde_json::json;
use tracing::{info, warn};

use super::{now_rfc3339, Options, Stores, FIELD_MANAGER};
use crate::{
    cluster::{self, ClusterInputs, NodeFacts, Resolved, CLUSTER_FABRIC_NAME},
    conditions,
    crd::{ClusterFabric, ClusterFabricSpec},
    keys,
};

/// What the peer pass needs of this one: our resolved settings (or why
/// there are none yet) and the nodes' addresses.
pub struct Local {
    pub resolved: Result<Resolved, String>,
    pub node_addresses: Vec<Ipv4Addr>,
}

pub async fn pass(
    client: &Client,
    options: &Options,
    stores: &Stores,
    cluster_uid: &str,
    about_cluster_name: Option<&str>,
) -> Option<Local> {
    let api: Api<ClusterFabric> = Api::all(client.clone());
    let Some(fabric) = stores
        .fabrics
        .state()
        .into_iter()
        .find(|f| f.name_any() == CLUSTER_FABRIC_NAME)
    else {
        // Made here, not by the manifests (a CR applied with its CRD in one
        // `kubectl apply` fails before the CRD is established).
        let empty = ClusterFabric::new(CLUSTER_FABRIC_NAME, ClusterFabricSpec::default());
        match api.create(&PostParams::default(), &empty).await {
            Ok(_) => info!("created ClusterFabric/{CLUSTER_FABRIC_NAME} with defaults"),
            Err(e) => warn!(error = %e, "cannot create ClusterFabric/{CLUSTER_FABRIC_NAME}"),
        }
        return None;
    };
    let nodes: Vec<NodeFacts> = stores.nodes.state().iter().map(|n| node_facts(n)).collect();
    let secret = stores
        .secrets
        .state()
        .into_iter()
        .find(|s| s.name_any() == keys::GATEWAY_KEY_SECRET);
    let private_key = secret.as_ref().map(|s| {
        s.data
            .as_ref()
            .and_then(|d| d.get(keys::PRIVATE_KEY_FIELD))
            .map(|b| b.0.clone())
            .unwrap_or_default()
    });
    let key = keys::key_state(&options.namespace, private_key.as_deref());
    let plan = cluster::reconcile(&ClusterInputs {
        spec: &fabric.spec,
        generation: fabric.metadata.generation,
        nodes: &nodes,
        about_cluster_name,
        cluster_uid,
        key: &key,
    });

    if plan.create_key {
        create_key(client, options).await;
    }
    if !plan.fill.is_empty() {
        let mut spec = serde_json::Map::new();
        if let Some(name) = &plan.fill.cluster_name {
            spec.insert("clusterName".into(), json!(name));
        }
        if let Some(id) = plan.fill.cluster_id {
            spec.insert("clusterId".into(), json!(id));
        }
        if let Some(cidr) = &plan.fill.pod_cidr {
            spec.insert("podCIDR".into(), json!(cidr));
        }
        let patch = json!({
            "apiVersion": "ligo.io/v1alpha1",
            "kind": "ClusterFabric",
            "spec": spec,
        });
        match api
            .patch(
                CLUSTER_FABRIC_NAME,
                &PatchParams::apply(FIELD_MANAGER),
                &Patch::Apply(&patch),
            )
            .await
        {
            Ok(_) => info!(filled = ?plan.fill, "filled in ClusterFabric/{CLUSTER_FABRIC_NAME}"),
            Err(e) => warn!(error = %e, "cannot fill in ClusterFabric/{CLUSTER_FABRIC_NAME}"),
        }
    }

    let previous = fabric.status.clone().unwrap_or_default();
    let mut status = plan.status.clone();
    status.conditions = conditions::merge(
        &previous.conditions,
        &plan.verdicts,
        fabric.metadata.generation,
        &now_rfc3339(),
    );
    let unchanged = conditions::same_apart_from_time(&previous.conditions, &status.conditions) && {
        let (mut a, mut b) = (previous.clone(), status.clone());
        a.conditions.clear();
        b.conditions.clear();
        a == b
    };
    if !unchanged {
        let patch = json!({
            "apiVersion": "ligo.io/v1alpha1",
            "kind": "ClusterFabric",
            "status": status,
        });
        if let Err(e) = api
            .patch_status(
                CLUSTER_FABRIC_NAME,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
        {
            warn!(error = %e, "cannot write ClusterFabric/{CLUSTER_FABRIC_NAME} status");
        }
    }

    let resolved = plan.resolved.clone();
    let mut node_addresses: Vec<Ipv4Addr> = nodes
        .iter()
        .flat_map(|n| n.internal_ip.into_iter().chain(n.external_ip))
        .collect();
    node_addresses.sort();
    node_addresses.dedup();
    Some(Local {
        resolved,
        node_addresses,
    })
}

async fn create_key(client: &Client, options: &Options) {
    let (private, public) = match keys::generate() {
        Ok(pair) => pair,
        Err(e) => {
            warn!(error = %e, "no randomness for the gateway key");
            return;
        }
    };
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(keys::GATEWAY_KEY_SECRET.into()),
            namespace: Some(options.namespace.clone()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                FIELD_MANAGER.to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            (
                keys::PRIVATE_KEY_FIELD.to_owned(),
                ByteString(private.into_bytes()),
            ),
            (
                keys::PUBLIC_KEY_FIELD.to_owned(),
                ByteString(public.into_bytes()),
            ),
        ])),
        ..Secret::default()
    };
    let api: Api<Secret> = Api::namespaced(client.clone(), &options.namespace);
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => info!(
            secret = %format!("{}/{}", options.namespace, keys::GATEWAY_KEY_SECRET),
            "generated the gateway's WireGuard key"
        ),
        // Made meanwhile (another replica, an operator): theirs stays.
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => warn!(error = %e, "cannot create the gateway key Secret"),
    }
}

pub fn node_facts(node: &k8s_openapi::api::core::v1::Node) -> NodeFacts {
    let spec = node.spec.clone().unwrap_or_default();
    let mut pod_cidrs = spec.pod_cidrs.unwrap_or_default();
    if pod_cidrs.is_empty() {
        pod_cidrs.extend(spec.pod_cidr);
    }
    let addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.clone())
        .unwrap_or_default();
    let address = |kind: &str| {
        addresses
            .iter()
            .find(|a| a.type_ == kind)
            .and_then(|a| a.address.parse::<Ipv4Addr>().ok())
    };
    NodeFacts {
        name: node.name_any(),
        labels: node.labels().clone(),
        pod_cidrs,
        internal_ip: address("InternalIP"),
        // A malformed annotation is ignored here; the gateway's daemon
        // refuses it by name (its NodeFabric says so).
        external_ip: node
            .annotations()
            .get(ligo_api::PUBLIC_IP_ANNOTATION)
            .and_then(|a| a.parse().ok())
            .or_else(|| address("ExternalIP")),
    }
}
