//! What a provider offers one consumer: the allocatable of its schedulable
//! nodes minus the requests of every pod running there that is not the
//! consumer's (the consumer's own pods are already counted by its
//! scheduler against the virtual node, so they must not be counted twice).

use std::{
    borrow::Borrow,
    collections::{BTreeMap, BTreeSet},
};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;

use super::quantity::{self, Millis};
use crate::crd::{ORIGIN_LABEL, VIRTUAL_NODE_LABEL};

/// Resources as thousandths, by name (`cpu`, `memory`, `pods`, `nvidia.com/gpu`, …).
pub type Resources = BTreeMap<String, Millis>;

/// A node pods may be scheduled to: not cordoned, Ready, no NoSchedule or
/// NoExecute taint, and not itself a virtual node (a provider that also
/// consumes never re-offers what it rents).
pub fn schedulable(node: &Node) -> bool {
    if node.labels().contains_key(VIRTUAL_NODE_LABEL) {
        return false;
    }
    let spec = node.spec.as_ref();
    if spec.and_then(|s| s.unschedulable).unwrap_or(false) {
        return false;
    }
    let tainted = spec
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.effect != "PreferNoSchedule"));
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True");
    ready && !tainted
}

/// What `pod` reserves on its node: the larger of its containers' summed
/// requests and any one init container's, plus its overhead, and one pod.
pub fn requests(pod: &Pod) -> Resources {
    let mut total = Resources::new();
    let Some(spec) = pod.spec.as_ref() else {
        return total;
    };
    for container in &spec.containers {
        add(&mut total, requests_of(container.resources.as_ref()), 1);
    }
    for init in spec.init_containers.iter().flatten() {
        for (name, value) in requests_of(init.resources.as_ref()) {
            let entry = total.entry(name).or_default();
            *entry = (*entry).max(value);
        }
    }
    if let Some(overhead) = &spec.overhead {
        add(&mut total, parse_all(overhead), 1);
    }
    *total.entry("pods".into()).or_default() += 1000;
    total
}

fn requests_of(resources: Option<&k8s_openapi::api::core::v1::ResourceRequirements>) -> Resources {
    resources
        .and_then(|r| r.requests.as_ref())
        .map(parse_all)
        .unwrap_or_default()
}

/// Quantities that do not parse count as zero: the API server validated
/// them, so this only happens with forms newer than this parser.
fn parse_all(
    map: &BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
) -> Resources {
    map.iter()
        .filter_map(|(k, v)| Some((k.clone(), quantity::parse(&v.0).ok()?)))
        .collect()
}

fn add(total: &mut Resources, more: Resources, sign: i128) {
    for (name, value) in more {
        *total.entry(name).or_default() += sign * value;
    }
}

/// What the offer reads of a pod (a cluster's pods are the largest list
/// the controller watches: this is all it keeps of each).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodUsage {
    pub node: Option<String>,
    pub terminal: bool,
    /// The consumer it is a copy for, if it is one.
    pub origin: Option<String>,
    pub requests: Resources,
}

impl PodUsage {
    pub fn of(pod: &Pod) -> PodUsage {
        PodUsage {
            node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            terminal: matches!(
                pod.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            ),
            origin: pod.labels().get(ORIGIN_LABEL).cloned(),
            requests: requests(pod),
        }
    }
}

/// What `consumer` may still use here, never below zero.
pub fn offered<N: Borrow<Node>, P: Borrow<PodUsage>>(
    nodes: &[N],
    pods: &[P],
    consumer: &str,
) -> Resources {
    let mut free = Resources::new();
    let mut usable = BTreeSet::new();
    for node in nodes.iter().map(Borrow::borrow).filter(|n| schedulable(n)) {
        usable.insert(node.name_any());
        if let Some(allocatable) = node.status.as_ref().and_then(|s| s.allocatable.as_ref()) {
            add(&mut free, parse_all(allocatable), 1);
        }
    }
    for pod in pods.iter().map(Borrow::borrow) {
        let on_usable = pod.node.as_ref().is_some_and(|n| usable.contains(n));
        let theirs = pod.origin.as_deref() == Some(consumer);
        if on_usable && !pod.terminal && !theirs {
            add(&mut free, pod.requests.clone(), -1);
        }
    }
    free.into_iter().map(|(k, v)| (k, v.max(0))).collect()
}

/// `offered` capped by the peering's `limits` (a limit on a resource the
/// provider does not offer offers nothing of it).
pub fn capped(offered: &Resources, limits: &BTreeMap<String, String>) -> Result<Resources, String> {
    let mut out = offered.clone();
    for (name, text) in limits {
        let limit =
            quantity::parse(text).map_err(|e| format!("spec.offloading.limits.{name}: {e}"))?;
        if let Some(v) = out.get_mut(name) {
            *v = (*v).min(limit);
        }
    }
    Ok(out)
}

pub fn to_quantities(resources: &Resources) -> BTreeMap<String, String> {
    resources
        .iter()
        .map(|(k, v)| (k.clone(), quantity::format(*v)))
        .collect()
}

pub fn from_quantities(map: &BTreeMap<String, String>) -> Resources {
    map.iter()
        .filter_map(|(k, v)| Some((k.clone(), quantity::parse(v).ok()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(
        name: &str,
        ready: &str,
        allocatable: serde_json::Value,
        extra: serde_json::Value,
    ) -> Node {
        let mut n = json!({
            "metadata": {"name": name, "labels": {}},
            "spec": {},
            "status": {"allocatable": allocatable, "conditions": [{"type": "Ready", "status": ready}]},
        });
        if let (Some(spec), Some(extra)) = (n["spec"].as_object_mut(), extra.as_object()) {
            spec.extend(extra.clone());
        }
        serde_json::from_value(n).expect("node")
    }

    fn pod(node: &str, cpu: &str, memory: &str, phase: &str, origin: Option<&str>) -> Pod {
        let labels = origin
            .map(|o| json!({ORIGIN_LABEL: o}))
            .unwrap_or(json!({}));
        serde_json::from_value(json!({
            "metadata": {"name": "p", "labels": labels},
            "spec": {"nodeName": node, "containers": [
                {"name": "c", "resources": {"requests": {"cpu": cpu, "memory": memory}}}
            ]},
            "status": {"phase": phase},
        }))
        .expect("pod")
    }

    #[test]
    fn free_capacity_is_allocatable_minus_other_pods_requests() {
        let nodes = [
            node(
                "n1",
                "True",
                json!({"cpu": "4", "memory": "8Gi", "pods": "110"}),
                json!({}),
            ),
            node(
                "n2",
                "True",
                json!({"cpu": "2", "memory": "4Gi", "pods": "110"}),
                json!({}),
            ),
            node(
                "down",
                "False",
                json!({"cpu": "64", "pods": "110"}),
                json!({}),
            ),
            node(
                "cordoned",
                "True",
                json!({"cpu": "64", "pods": "110"}),
                json!({"unschedulable": true}),
            ),
            node(
                "tainted",
                "True",
                json!({"cpu": "64", "pods": "110"}),
                json!({"taints": [{"key": "k", "effect": "NoSchedule"}]}),
            ),
        ];
        let pods = [
            pod("n1", "500m", "1Gi", "Running", None),
            pod("n2", "1", "512Mi", "Pending", Some("other")),
            // Not counted: finished, the consumer's own, or on an unusable node.
            pod("n1", "3", "1Gi", "Succeeded", None),
            pod("n1", "3", "1Gi", "Running", Some("a")),
            pod("down", "3", "1Gi", "Running", None),
        ];
        let free = offered(&nodes, &pods.each_ref().map(PodUsage::of), "a");
        assert_eq!(free["cpu"], 4500, "6 CPUs minus 1.5");
        assert_eq!(
            free["memory"],
            (12 * 1024 - 1024 - 512) as i128 * 1024 * 1024 * 1000
        );
        assert_eq!(free["pods"], 218_000);
        let capped = capped(&free, &BTreeMap::from([("cpu".into(), "2".into())])).expect("valid");
        assert_eq!(capped["cpu"], 2000);
        assert_eq!(capped["pods"], 218_000, "no limit: what is offered");
        assert!(capped_err());
    }

    fn capped_err() -> bool {
        capped(
            &Resources::new(),
            &BTreeMap::from([("cpu".into(), "lots".into())]),
        )
        .is_err_and(|e| e.contains("spec.offloading.limits.cpu"))
    }

    #[test]
    fn init_containers_reserve_their_peak_and_nothing_goes_negative() {
        let mut p = pod("n1", "100m", "1Mi", "Running", None);
        let spec = p.spec.as_mut().expect("spec");
        spec.init_containers = Some(vec![serde_json::from_value(json!(
            {"name": "i", "resources": {"requests": {"cpu": "2"}}}
        ))
        .expect("container")]);
        assert_eq!(requests(&p)["cpu"], 2000);
        let nodes = [node(
            "n1",
            "True",
            json!({"cpu": "1", "pods": "1"}),
            json!({}),
        )];
        assert_eq!(offered(&nodes, &[PodUsage::of(&p)], "a")["cpu"], 0);
    }
}
