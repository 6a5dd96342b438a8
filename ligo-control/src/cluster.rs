//! The local cluster's fabric settings (`ClusterFabric/local`): what they
//! resolve to, what the controller fills in when they are not given, and
//! the conditions. Pure: the shell (`controller::cluster`) reads the
//! objects and writes the result.

use std::{collections::BTreeMap, net::Ipv4Addr};

use ipnetwork::Ipv4Network;

use crate::{
    conditions::{summary, Verdict},
    crd::{ClusterFabricSpec, ClusterFabricStatus},
    validate::{self, FieldError},
};

pub use ligo_api::{CLUSTER_FABRIC_NAME, DEFAULT_GATEWAY_LABEL, DEFAULT_WIREGUARD_PORT};
/// A detected pod CIDR is at least this wide: the usual `--cluster-cidr`
/// holds many /24 node slices, and a CIDR that grew with each new node
/// would invalidate the views peers made for it.
const DETECTED_POD_CIDR_PREFIX: u8 = 16;

/// What the controller reads of one Node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFacts {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// `spec.podCIDRs` (or `spec.podCIDR`), unparsed.
    pub pod_cidrs: Vec<String>,
    pub internal_ip: Option<Ipv4Addr>,
    pub external_ip: Option<Ipv4Addr>,
}

/// The gateway's WireGuard key, as the Secret holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyState {
    /// No Secret yet: the controller makes one.
    Missing,
    /// The Secret exists but holds no usable key (never overwritten: an
    /// operator may have put it there).
    Invalid(String),
    Present {
        public_key: String,
    },
}

pub struct ClusterInputs<'a> {
    pub spec: &'a ClusterFabricSpec,
    pub generation: Option<i64>,
    pub nodes: &'a [NodeFacts],
    /// The About API's `cluster.clusterset.k8s.io` value, where installed.
    pub about_cluster_name: Option<&'a str>,
    /// The `kube-system` namespace's UID: the seed of default name and id.
    pub cluster_uid: &'a str,
    pub key: &'a KeyState,
}

/// Fields the controller writes into an empty spec (so they stay what
/// they are: peers' views and ids depend on them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecFill {
    pub cluster_name: Option<String>,
    pub cluster_id: Option<u32>,
    pub pod_cidr: Option<String>,
}

impl SpecFill {
    pub fn is_empty(&self) -> bool {
        *self == SpecFill::default()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClusterPlan {
    pub fill: SpecFill,
    pub create_key: bool,
    /// Status without conditions (the shell merges [`Self::verdicts`]).
    pub status: ClusterFabricStatus,
    pub verdicts: Vec<Verdict>,
    /// The settings with the fill applied, or the first invalid field.
    pub resolved: Result<Resolved, String>,
}

/// The settings as they resolve: everything peers and daemons use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub cluster_name: String,
    pub cluster_id: u32,
    pub pod_cidr: Ipv4Network,
    pub service_cidr: Option<Ipv4Network>,
    pub view_pools: Vec<Ipv4Network>,
    pub reserved_ranges: Vec<Ipv4Network>,
    pub gateway_label: String,
    pub wireguard_port: u16,
}

pub fn reconcile(inputs: &ClusterInputs) -> ClusterPlan {
    let spec = inputs.spec;
    let mut fill = SpecFill::default();
    let mut verdicts = Vec::new();

    let name = match (&spec.cluster_name, inputs.about_cluster_name) {
        (Some(name), _) => name.clone(),
        (None, Some(about)) => {
            fill.cluster_name = Some(about.to_owned());
            about.to_owned()
        }
        (None, None) => {
            let name = default_cluster_name(inputs.cluster_uid);
            fill.cluster_name = Some(name.clone());
            name
        }
    };
    let id = spec.cluster_id.unwrap_or_else(|| {
        let id = default_cluster_id(inputs.cluster_uid);
        fill.cluster_id = Some(id);
        id
    });
    let pod_cidr = match &spec.pod_cidr {
        Some(text) => Ok(text.clone()),
        None => match detect_pod_cidr(inputs.nodes) {
            Some(net) => {
                fill.pod_cidr = Some(net.to_string());
                Ok(net.to_string())
            }
            None => Err(FieldError {
                field: "spec.podCIDR".into(),
                message: "not given, and no Node has spec.podCIDRs to detect it from; set it to the cluster's pod CIDR (kube-controller-manager's --cluster-cidr)".into(),
            }),
        },
    };

    let resolved = resolve(spec, &name, id, pod_cidr, inputs.about_cluster_name);
    match &resolved {
        Ok(_) => verdicts.push(Verdict::ok("Valid", "Valid", "the settings are valid")),
        Err(e) => verdicts.push(Verdict::failed(
            "Valid",
            "InvalidSettings",
            format!("ClusterFabric/{CLUSTER_FABRIC_NAME} {e}"),
        )),
    }

    let label = spec
        .gateway_node_label
        .clone()
        .unwrap_or_else(|| DEFAULT_GATEWAY_LABEL.to_owned());
    let port = spec.wireguard_port.unwrap_or(DEFAULT_WIREGUARD_PORT);
    let endpoints = gateway_endpoints(inputs.nodes, &label, port);
    if endpoints.is_empty() {
        verdicts.push(Verdict::failed(
            "GatewayFound",
            "NoGatewayNode",
            format!("no Node with an address carries the label {label}; make one a gateway: kubectl label node NODE {label}="),
        ));
    } else {
        verdicts.push(Verdict::ok(
            "GatewayFound",
            "GatewayFound",
            format!("gateway endpoints {}", endpoints.join(", ")),
        ));
    }

    let public_key = match inputs.key {
        KeyState::Present { public_key } => {
            verdicts.push(Verdict::ok(
                "KeyReady",
                "KeyReady",
                "the gateway key Secret holds a key",
            ));
            Some(public_key.clone())
        }
        KeyState::Missing => {
            verdicts.push(Verdict::failed(
                "KeyReady",
                "KeyPending",
                "generating the gateway's WireGuard key",
            ));
            None
        }
        KeyState::Invalid(why) => {
            verdicts.push(Verdict::failed("KeyReady", "KeyInvalid", why.clone()));
            None
        }
    };
    verdicts.push(summary(&verdicts));

    let status = match &resolved {
        Ok(r) => ClusterFabricStatus {
            cluster_name: Some(r.cluster_name.clone()),
            cluster_id: Some(r.cluster_id),
            pod_cidr: Some(r.pod_cidr.to_string()),
            gateway_endpoints: endpoints,
            wireguard_public_key: public_key,
            conditions: Vec::new(),
        },
        Err(_) => ClusterFabricStatus {
            gateway_endpoints: endpoints,
            wireguard_public_key: public_key,
            ..ClusterFabricStatus::default()
        },
    };
    ClusterPlan {
        // An invalid spec is not filled in: the user fixes it first.
        fill: if resolved.is_ok() {
            fill
        } else {
            SpecFill::default()
        },
        create_key: *inputs.key == KeyState::Missing,
        status,
        verdicts,
        resolved: resolved.map_err(|e| format!("ClusterFabric/{CLUSTER_FABRIC_NAME} {e}")),
    }
}

/// The settings with defaults applied, or the first invalid field.
pub fn resolve(
    spec: &ClusterFabricSpec,
    name: &str,
    id: u32,
    pod_cidr: Result<String, FieldError>,
    about_cluster_name: Option<&str>,
) -> Result<Resolved, FieldError> {
    validate::dns_label("spec.clusterName", name)?;
    if let Some(about) = about_cluster_name {
        if about != name {
            return Err(FieldError {
                field: "spec.clusterName".into(),
                message: format!("is {name:?} but the About API's ClusterProperty cluster.clusterset.k8s.io says {about:?}; the two must agree"),
            });
        }
    }
    validate::cluster_id("spec.clusterId", id)?;
    let pod_cidr = validate::cidr("spec.podCIDR", &pod_cidr?)?;
    let service_cidr = spec
        .service_cidr
        .as_deref()
        .map(|s| validate::cidr("spec.serviceCIDR", s))
        .transpose()?;
    let view_pools = validate::cidrs("spec.viewPools", &spec.view_pools)?;
    let reserved_ranges = validate::cidrs("spec.reservedRanges", &spec.reserved_ranges)?;
    let wireguard_port = spec.wireguard_port.unwrap_or(DEFAULT_WIREGUARD_PORT);
    if wireguard_port == 0 {
        return Err(FieldError {
            field: "spec.wireguardPort".into(),
            message: "0 is not a port".into(),
        });
    }
    Ok(Resolved {
        cluster_name: name.to_owned(),
        cluster_id: id,
        pod_cidr,
        service_cidr,
        view_pools,
        reserved_ranges,
        gateway_label: spec
            .gateway_node_label
            .clone()
            .unwrap_or_else(|| DEFAULT_GATEWAY_LABEL.to_owned()),
        wireguard_port,
    })
}

/// `cluster-` and the UID's first 8 hex digits.
pub fn default_cluster_name(uid: &str) -> String {
    let hex: String = uid
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(8)
        .collect::<String>()
        .to_ascii_lowercase();
    format!("cluster-{hex}")
}

/// 1..2^24 from the UID (FNV-1a): the same after every restart.
pub fn default_cluster_id(uid: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in uid.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % validate::MAX_CLUSTER_ID + 1
}

/// The /16 (or wider, if needed) holding every node's pod CIDR slices.
pub fn detect_pod_cidr(nodes: &[NodeFacts]) -> Option<Ipv4Network> {
    let slices: Vec<Ipv4Network> = nodes
        .iter()
        .flat_map(|n| &n.pod_cidrs)
        .filter_map(|s| s.parse::<Ipv4Network>().ok())
        .collect();
    let first = slices.iter().min_by_key(|s| u32::from(s.network()))?;
    let mut prefix = first.prefix().min(DETECTED_POD_CIDR_PREFIX);
    loop {
        let candidate = Ipv4Network::new(first.network(), prefix).ok()?;
        let candidate = Ipv4Network::new(candidate.network(), prefix).ok()?;
        if slices
            .iter()
            .all(|s| s.prefix() >= candidate.prefix() && candidate.contains(s.network()))
        {
            return Some(candidate);
        }
        prefix = prefix.checked_sub(1)?;
    }
}

/// `ip:port` of every gateway node (its ExternalIP, else its InternalIP),
/// sorted.
pub fn gateway_endpoints(nodes: &[NodeFacts], label: &str, port: u16) -> Vec<String> {
    let mut endpoints: Vec<String> = nodes
        .iter()
        .filter(|n| n.labels.contains_key(label))
        .filter_map(|n| n.external_ip.or(n.internal_ip))
        .map(|ip| format!("{ip}:{port}"))
        .collect();
    endpoints.sort();
    endpoints.dedup();
    endpoints
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, slice: &str, ip: [u8; 4], gateway: bool) -> NodeFacts {
        let mut labels = BTreeMap::new();
        if gateway {
            labels.insert(DEFAULT_GATEWAY_LABEL.to_owned(), String::new());
        }
        NodeFacts {
            name: name.into(),
            labels,
            pod_cidrs: vec![slice.into()],
            internal_ip: Some(Ipv4Addr::from(ip)),
            external_ip: None,
        }
    }

    fn key() -> KeyState {
        KeyState::Present {
            public_key: "pub".into(),
        }
    }

    #[test]
    fn empty_settings_are_filled_from_the_cluster_and_stay_put() {
        let nodes = [
            node("gw", "10.244.0.0/24", [192, 168, 0, 1], true),
            node("n1", "10.244.7.0/24", [192, 168, 0, 2], false),
        ];
        let spec = ClusterFabricSpec::default();
        let uid = "4f6c2b1e-0000-4000-8000-000000000001";
        let plan = reconcile(&ClusterInputs {
            spec: &spec,
            generation: Some(1),
            nodes: &nodes,
            about_cluster_name: None,
            cluster_uid: uid,
            key: &key(),
        });
        assert_eq!(plan.fill.cluster_name.as_deref(), Some("cluster-4f6c2b1e"));
        assert_eq!(plan.fill.pod_cidr.as_deref(), Some("10.244.0.0/16"));
        let id = plan.fill.cluster_id.expect("an id");
        assert!((1..1 << 24).contains(&id));
        assert_eq!(plan.status.gateway_endpoints, ["192.168.0.1:51820"]);
        assert!(plan.verdicts.iter().all(|v| v.ok), "{:?}", plan.verdicts);

        // Once written, nothing more is filled, even when nodes change.
        let filled = ClusterFabricSpec {
            cluster_name: plan.fill.cluster_name.clone(),
            cluster_id: Some(id),
            pod_cidr: plan.fill.pod_cidr.clone(),
            ..ClusterFabricSpec::default()
        };
        let more = [
            nodes[0].clone(),
            node("n9", "10.99.0.0/24", [192, 168, 0, 9], false),
        ];
        let again = reconcile(&ClusterInputs {
            spec: &filled,
            generation: Some(2),
            nodes: &more,
            about_cluster_name: None,
            cluster_uid: uid,
            key: &key(),
        });
        assert!(again.fill.is_empty());
        assert_eq!(again.status.pod_cidr.as_deref(), Some("10.244.0.0/16"));
        assert_eq!(again.status.cluster_id, Some(id));
    }

    #[test]
    fn the_about_api_names_the_cluster_and_must_agree() {
        let nodes = [node("gw", "10.244.0.0/24", [192, 168, 0, 1], true)];
        let empty = ClusterFabricSpec::default();
        let plan = reconcile(&ClusterInputs {
            spec: &empty,
            generation: Some(1),
            nodes: &nodes,
            about_cluster_name: Some("prod-eu"),
            cluster_uid: "u",
            key: &key(),
        });
        assert_eq!(plan.fill.cluster_name.as_deref(), Some("prod-eu"));

        let named = ClusterFabricSpec {
            cluster_name: Some("prod-us".into()),
            ..ClusterFabricSpec::default()
        };
        let plan = reconcile(&ClusterInputs {
            spec: &named,
            generation: Some(1),
            nodes: &nodes,
            about_cluster_name: Some("prod-eu"),
            cluster_uid: "u",
            key: &key(),
        });
        let valid = &plan.verdicts[0];
        assert!(!valid.ok);
        assert!(
            valid.message.contains("spec.clusterName"),
            "{}",
            valid.message
        );
        assert!(valid.message.contains("prod-eu"), "{}", valid.message);
        assert!(
            plan.fill.is_empty(),
            "nothing is filled into an invalid spec"
        );
        assert_eq!(plan.status.cluster_name, None);
    }

    #[test]
    fn a_malformed_cidr_is_named_and_ready_is_false() {
        let spec = ClusterFabricSpec {
            cluster_name: Some("a".into()),
            cluster_id: Some(1),
            pod_cidr: Some("10.244.0.0/16".into()),
            view_pools: vec!["10.200.0.0/16".into(), "10.300.0.0/16".into()],
            ..ClusterFabricSpec::default()
        };
        let nodes = [node("gw", "10.244.0.0/24", [192, 168, 0, 1], true)];
        let plan = reconcile(&ClusterInputs {
            spec: &spec,
            generation: Some(3),
            nodes: &nodes,
            about_cluster_name: None,
            cluster_uid: "u",
            key: &key(),
        });
        let ready = plan.verdicts.last().expect("Ready");
        assert_eq!(ready.type_, "Ready");
        assert!(!ready.ok);
        assert_eq!(ready.reason, "InvalidSettings");
        assert!(
            ready.message.contains("spec.viewPools[1]"),
            "{}",
            ready.message
        );
    }

    #[test]
    fn no_gateway_and_no_key_are_reported_and_a_key_is_asked_for() {
        let spec = ClusterFabricSpec {
            pod_cidr: Some("10.244.0.0/16".into()),
            ..ClusterFabricSpec::default()
        };
        let nodes = [node("n1", "10.244.0.0/24", [192, 168, 0, 2], false)];
        let plan = reconcile(&ClusterInputs {
            spec: &spec,
            generation: Some(1),
            nodes: &nodes,
            about_cluster_name: None,
            cluster_uid: "u",
            key: &KeyState::Missing,
        });
        assert!(plan.create_key);
        let gateway = plan
            .verdicts
            .iter()
            .find(|v| v.type_ == "GatewayFound")
            .expect("GatewayFound");
        assert!(!gateway.ok);
        assert!(
            gateway.message.contains("kubectl label node"),
            "{}",
            gateway.message
        );
        let invalid_key = reconcile(&ClusterInputs {
            spec: &spec,
            generation: Some(1),
            nodes: &nodes,
            about_cluster_name: None,
            cluster_uid: "u",
            key: &KeyState::Invalid("bad".into()),
        });
        assert!(
            !invalid_key.create_key,
            "an operator's Secret is never replaced"
        );
    }

    #[test]
    fn detection_widens_only_as_far_as_the_slices_need() {
        let at = |slices: &[&str]| {
            let nodes: Vec<NodeFacts> = slices
                .iter()
                .map(|s| NodeFacts {
                    pod_cidrs: vec![(*s).into()],
                    ..NodeFacts::default()
                })
                .collect();
            detect_pod_cidr(&nodes).map(|n| n.to_string())
        };
        assert_eq!(at(&["10.244.3.0/24"]).as_deref(), Some("10.244.0.0/16"));
        assert_eq!(
            at(&["10.244.3.0/24", "10.245.0.0/24"]).as_deref(),
            Some("10.244.0.0/15")
        );
        assert_eq!(at(&["10.0.0.0/8"]).as_deref(), Some("10.0.0.0/8"));
        assert_eq!(at(&[]), None);
    }

    #[test]
    fn default_ids_are_stable_and_in_range() {
        let a = default_cluster_id("0b6e2a44-1111-4222-8333-944455556666");
        assert_eq!(
            a,
            default_cluster_id("0b6e2a44-1111-4222-8333-944455556666")
        );
        assert_ne!(
            a,
            default_cluster_id("0b6e2a44-1111-4222-8333-944455556667")
        );
        for uid in ["", "x", "ffffffff"] {
            assert!((1..1 << 24).contains(&default_cluster_id(uid)));
        }
    }
}
