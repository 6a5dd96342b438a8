//! The virtual node that stands for a provider in the consumer, as the
//! virtual-kubelet conventions have it: `type=virtual-kubelet`, a
//! NoSchedule taint only pods meant to run elsewhere tolerate, a Lease in
//! `kube-node-lease`, and a status whose capacity is the provider's live
//! offer. `Ready` follows the provider's API server, `NetworkUnavailable`
//! the fabric's link: each only from its own cause.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{Node, NodeCondition, NodeSpec, NodeStatus, NodeSystemInfo, Taint},
    },
    apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::Time},
    jiff::Timestamp,
};
use kube::api::ObjectMeta;

use super::inventory::{to_quantities, Resources};
use crate::crd::VIRTUAL_NODE_LABEL;

/// The taint pods must tolerate to be scheduled onto a virtual node.
pub const TAINT_KEY: &str = "virtual-node.ligo.io/not-allowed";
/// As the kubelet: the Lease lasts 40 s and is renewed every 10 s.
pub const LEASE_SECONDS: i32 = 40;
pub const LEASE_NAMESPACE: &str = "kube-node-lease";

pub fn node_name(peer: &str) -> String {
    format!("ligo-{peer}")
}

/// Why the virtual node is not fully usable, each from its own cause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// The provider's API server answers (else why not).
    pub provider: Result<(), String>,
    /// The fabric's tunnel to the provider is up (else why not).
    pub network: Result<(), String>,
}

/// The Node's metadata and spec (what `apply` writes; the status is
/// written separately, as a kubelet does).
pub fn node(peer: &str, cluster_id: u32) -> Node {
    let name = node_name(peer);
    Node {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(BTreeMap::from([
                ("type".to_owned(), "virtual-kubelet".to_owned()),
                ("kubernetes.io/role".to_owned(), "agent".to_owned()),
                ("kubernetes.io/hostname".to_owned(), name),
                ("kubernetes.io/os".to_owned(), "linux".to_owned()),
                (VIRTUAL_NODE_LABEL.to_owned(), peer.to_owned()),
                ("ligo.io/cluster-id".to_owned(), cluster_id.to_string()),
                (
                    crate::peering::MANAGED_BY_LABEL.to_owned(),
                    crate::controller::FIELD_MANAGER.to_owned(),
                ),
            ])),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            taints: Some(vec![Taint {
                key: TAINT_KEY.to_owned(),
                value: Some("true".to_owned()),
                effect: "NoSchedule".to_owned(),
                time_added: None,
            }]),
            ..NodeSpec::default()
        }),
        status: None,
    }
}

/// The status: capacity = allocatable = what the provider offers (capped),
/// conditions from `health`, keeping each condition's transition time
/// while its status holds.
pub fn status(
    capacity: &Resources,
    health: &Health,
    previous: &[NodeCondition],
    now: Timestamp,
) -> NodeStatus {
    let quantities: BTreeMap<String, Quantity> = to_quantities(capacity)
        .into_iter()
        .map(|(k, v)| (k, Quantity(v)))
        .collect();
    let condition = |type_: &str, status: bool, reason: &str, message: String| {
        let status = if status { "True" } else { "False" }.to_owned();
        let since = previous
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .and_then(|c| c.last_transition_time.clone())
            .unwrap_or(Time(now));
        NodeCondition {
            type_: type_.to_owned(),
            status,
            reason: Some(reason.to_owned()),
            message: Some(message),
            last_heartbeat_time: Some(Time(now)),
            last_transition_time: Some(since),
        }
    };
    let (ready, ready_reason, ready_message) = match &health.provider {
        Ok(()) => (
            true,
            "ProviderReachable",
            "the provider's API server answers".to_owned(),
        ),
        Err(why) => (false, "ProviderUnreachable", why.clone()),
    };
    let (network_down, network_reason, network_message) = match &health.network {
        Ok(()) => (
            false,
            "TunnelEstablished",
            "the fabric's tunnel to the provider is up".to_owned(),
        ),
        Err(why) => (true, "TunnelDown", why.clone()),
    };
    let calm = |type_: &str, reason: &str| {
        condition(
            type_,
            false,
            reason,
            "not reported by a virtual node".to_owned(),
        )
    };
    NodeStatus {
        capacity: Some(quantities.clone()),
        allocatable: Some(quantities),
        conditions: Some(vec![
            condition("Ready", ready, ready_reason, ready_message),
            condition(
                "NetworkUnavailable",
                network_down,
                network_reason,
                network_message,
            ),
            calm("MemoryPressure", "KubeletHasSufficientMemory"),
            calm("DiskPressure", "KubeletHasNoDiskPressure"),
            calm("PIDPressure", "KubeletHasSufficientPID"),
        ]),
        node_info: Some(NodeSystemInfo {
            architecture: "amd64".into(),
            operating_system: "linux".into(),
            kubelet_version: format!("v0.0.0-ligo-{}", env!("CARGO_PKG_VERSION")),
            kube_proxy_version: String::new(),
            container_runtime_version: "ligo://remote".into(),
            ..NodeSystemInfo::default()
        }),
        ..NodeStatus::default()
    }
}

/// Whether two statuses differ in what matters (not heartbeat times).
pub fn same_status(a: &NodeStatus, b: &NodeStatus) -> bool {
    let strip = |s: &NodeStatus| {
        let mut s = s.clone();
        for c in s.conditions.iter_mut().flatten() {
            c.last_heartbeat_time = None;
        }
        (s.capacity, s.allocatable, s.conditions)
    };
    strip(a) == strip(b)
}

/// The node's Lease, renewed `now`.
pub fn lease(peer: &str, now: Timestamp) -> Lease {
    let name = node_name(peer);
    Lease {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(LEASE_NAMESPACE.to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(name),
            lease_duration_seconds: Some(LEASE_SECONDS),
            renew_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                now,
            )),
            ..LeaseSpec::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond<'a>(s: &'a NodeStatus, t: &str) -> &'a NodeCondition {
        s.conditions
            .as_ref()
            .and_then(|c| c.iter().find(|c| c.type_ == t))
            .expect("condition")
    }

    #[test]
    fn each_condition_follows_only_its_own_cause() {
        let capacity = Resources::from([("cpu".into(), 4500), ("pods".into(), 218_000)]);
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().expect("time");
        let t1: Timestamp = "2026-01-01T00:01:00Z".parse().expect("time");
        let up = Health {
            provider: Ok(()),
            network: Ok(()),
        };
        let s0 = status(&capacity, &up, &[], t0);
        assert_eq!(cond(&s0, "Ready").status, "True");
        assert_eq!(cond(&s0, "NetworkUnavailable").status, "False");
        assert_eq!(s0.allocatable.as_ref().expect("alloc")["cpu"].0, "4500m");
        assert_eq!(s0.capacity.as_ref().expect("cap")["pods"].0, "218");

        // The tunnel drops: only NetworkUnavailable moves.
        let tunnel_down = Health {
            network: Err("no handshake for 200 s".into()),
            ..up.clone()
        };
        let s1 = status(
            &capacity,
            &tunnel_down,
            s0.conditions.as_deref().unwrap_or(&[]),
            t1,
        );
        assert_eq!(cond(&s1, "Ready").status, "True");
        assert_eq!(
            cond(&s1, "Ready").last_transition_time,
            Some(Time(t0)),
            "Ready held"
        );
        assert_eq!(cond(&s1, "NetworkUnavailable").status, "True");
        assert_eq!(
            cond(&s1, "NetworkUnavailable").last_transition_time,
            Some(Time(t1))
        );
        assert!(!same_status(&s0, &s1));

        // The provider stops answering: only Ready moves.
        let api_down = Health {
            provider: Err("https://b did not answer".into()),
            ..up.clone()
        };
        let s2 = status(
            &capacity,
            &api_down,
            s0.conditions.as_deref().unwrap_or(&[]),
            t1,
        );
        assert_eq!(cond(&s2, "Ready").status, "False");
        assert_eq!(
            cond(&s2, "Ready").reason.as_deref(),
            Some("ProviderUnreachable")
        );
        assert_eq!(cond(&s2, "NetworkUnavailable").status, "False");

        // A heartbeat alone is no change.
        let again = status(&capacity, &up, s0.conditions.as_deref().unwrap_or(&[]), t1);
        assert!(same_status(&s0, &again));
    }

    #[test]
    fn the_node_is_tainted_and_labelled_as_a_virtual_kubelet() {
        let n = node("b", 2);
        assert_eq!(n.metadata.name.as_deref(), Some("ligo-b"));
        let labels = n.metadata.labels.expect("labels");
        assert_eq!(labels["type"], "virtual-kubelet");
        assert_eq!(labels[VIRTUAL_NODE_LABEL], "b");
        let taint = &n.spec.and_then(|s| s.taints).expect("taints")[0];
        assert_eq!(
            (taint.key.as_str(), taint.effect.as_str()),
            (TAINT_KEY, "NoSchedule")
        );
    }
}
