//! The `ligo.io/v1alpha1` custom resources, shared by `ligo-control` and
//! the fabric daemon. The YAML in `manifests/crds/` is generated from these
//! types (`ligo-control crds`); a test keeps the two equal. No CEL: the
//! schemas must install on 1.20 API servers.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The one `ClusterFabric` object's name.
pub const CLUSTER_FABRIC_NAME: &str = "local";
/// The label that makes a node a gateway unless the settings name another.
pub const DEFAULT_GATEWAY_LABEL: &str = "ligo.io/gateway";
pub const DEFAULT_WIREGUARD_PORT: u16 = 51820;
/// A gateway Node's address for peers when it has no ExternalIP (bare
/// metal, no cloud provider: the kubelet reports InternalIP only and would
/// overwrite an address patched into the status). Wins over ExternalIP.
pub const PUBLIC_IP_ANNOTATION: &str = "ligo.io/public-ip";
/// Virtual nodes carry this label (value: the peer's name); the fabric
/// daemons and node reports skip them (no daemon runs there).
pub const VIRTUAL_NODE_LABEL: &str = "ligo.io/virtual-node";
/// Objects Ligo makes in a provider for a consumer carry this label (value:
/// the consumer's cluster name); Ligo touches nothing without it.
pub const ORIGIN_LABEL: &str = "ligo.io/origin";

/// A condition as `metav1.Condition` has it (the list is a map keyed by
/// `type`, so server-side apply merges per condition).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// CamelCase, e.g. `ViewAllocated`, `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    /// CamelCase reason, e.g. `PoolsExhausted`.
    pub reason: String,
    pub message: String,
    /// RFC 3339; changes only when `status` does.
    pub last_transition_time: String,
    /// The `metadata.generation` this condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The local cluster's fabric settings: one object, named `local`.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "ligo.io",
    version = "v1alpha1",
    kind = "ClusterFabric",
    shortname = "ligofabric",
    status = "ClusterFabricStatus",
    printcolumn = r#"{"name":"Cluster","type":"string","jsonPath":".status.clusterName"}"#,
    printcolumn = r#"{"name":"ID","type":"integer","jsonPath":".status.clusterId"}"#,
    printcolumn = r#"{"name":"Pod CIDR","type":"string","jsonPath":".status.podCIDR"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterFabricSpec {
    /// This cluster's name among its peers (an RFC 1123 label). When not
    /// given: the About API's `cluster.clusterset.k8s.io` ClusterProperty
    /// where it is installed (and it must agree with it), else
    /// `cluster-<kube-system UID prefix>`; written here once chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_name: Option<String>,
    /// 1..2^24-1 (the VNI peers see us by); when not given, derived from
    /// the `kube-system` namespace's UID and written here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16_777_215))]
    pub cluster_id: Option<u32>,
    /// Our pod CIDR; when not given, detected from the Nodes'
    /// `spec.podCIDRs` (the /16 holding them) and written here, so it stays
    /// what peers' views were made for.
    #[serde(rename = "podCIDR", default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr: Option<String>,
    /// Our service CIDR: no peer view may overlap it.
    #[serde(
        rename = "serviceCIDR",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub service_cidr: Option<String>,
    /// Where peer views come from when a peer's real CIDR collides.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub view_pools: Vec<String>,
    /// Ranges no view may overlap (besides pod, service and node addresses).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reserved_ranges: Vec<String>,
    /// The node label that makes a node a gateway (default `ligo.io/gateway`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_node_label: Option<String>,
    /// WireGuard's UDP port on gateways (default 51820).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_port: Option<u16>,
    /// The URL peers reach our API server at (`ligo-control peer` uses it
    /// unless told another; it never takes the operator's kubeconfig URL,
    /// which may be a proxy or a loopback tunnel).
    #[serde(
        rename = "apiServerURL",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub api_server_url: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClusterFabricStatus {
    /// The name and id peers know us by, and our pod CIDR, once valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<u32>,
    #[serde(rename = "podCIDR", default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr: Option<String>,
    /// `ip:port` of each gateway peers can reach.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateway_endpoints: Vec<String>,
    /// The gateway's WireGuard public key (the private key stays in a Secret
    /// in `ligo-system`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_public_key: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// One remote cluster we peer with.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "ligo.io",
    version = "v1alpha1",
    kind = "Peer",
    status = "PeerStatus",
    printcolumn = r#"{"name":"Remote","type":"string","jsonPath":".spec.clusterName"}"#,
    printcolumn = r#"{"name":"View","type":"string","jsonPath":".spec.view"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PeerSpec {
    /// The remote cluster's name (an RFC 1123 label).
    pub cluster_name: String,
    /// The remote cluster's id (1..2^24).
    #[schemars(range(min = 1, max = 16_777_215))]
    pub cluster_id: u32,
    /// Its real pod CIDR.
    #[serde(rename = "podCIDR")]
    pub pod_cidr: String,
    /// `ip:port` of its gateways.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateway_endpoints: Vec<String>,
    /// Its gateways' WireGuard public key (base64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_public_key: Option<String>,
    /// How to reach its API server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_server: Option<ApiServer>,
    /// `wireguard` (default) or `plain`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// Our view of its pod CIDR (same prefix length): allocated here when
    /// empty, as `Service.spec.clusterIP` is, and immutable afterwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub view: Option<String>,
    /// Running pods across: ours there (a virtual node), its here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offloading: Option<OffloadingSpec>,
}

/// Which way pods may run across a peering (`ligo-control peer --offload`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct OffloadingSpec {
    /// We run pods there: a virtual node `ligo-<peer>` stands for it here.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub consume: bool,
    /// The peer may run its pods here, in the namespaces it asks for.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub provide: bool,
    /// Our namespaces whose pods may run there (`ligo-control offload
    /// namespace`); each is mirrored there under the same name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Caps on what the virtual node offers (`cpu`, `memory`, `pods`, as
    /// quantities); without one, what the peer offers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, String>,
}

/// Offloading as this side sees it.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct OffloadingStatus {
    /// As provider: what the peer's pods may still use here (the
    /// allocatable of our schedulable nodes minus the requests of every pod
    /// that is not the peer's), as quantities. The peer reads it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub offered: BTreeMap<String, String>,
    /// As provider: each namespace the peer asked for, and what became of it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub granted_namespaces: Vec<NamespaceGrant>,
    /// As consumer: the virtual node standing for the peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_node: Option<VirtualNodeStatus>,
}

/// One namespace a consumer asked its provider for.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceGrant {
    pub name: String,
    /// `Granted`, or why not (`NamespaceTaken`: a namespace of that name
    /// exists here and is not the peer's).
    pub state: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VirtualNodeStatus {
    pub name: String,
    /// Each offloaded namespace as the provider answered (`Granted`,
    /// `Waiting`, or why not, e.g. `NamespaceTaken`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<NamespaceGrant>,
    /// What it offers, as quantities.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub capacity: BTreeMap<String, String>,
    /// Pods bound to it and running (or about to) in the peer.
    pub pods_offloaded: u32,
    /// Pods bound to it that are refused (host namespaces, DaemonSets, a
    /// namespace not offloaded).
    pub pods_refused: u32,
    /// ConfigMaps and Secrets reflected for its pods.
    pub objects_reflected: u32,
    /// Writes that failed since the controller started (retried).
    pub reflection_errors: u64,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ApiServer {
    pub url: String,
    /// PEM CA bundle, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,
    /// A Secret in `ligo-system` holding a kubeconfig for the remote.
    pub credentials_secret: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PeerStatus {
    /// How the remote cluster sees our pod CIDR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_view: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<LinkStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offloading: Option<OffloadingStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LinkStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshake_age_seconds: Option<u64>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    /// `wireguard` or `plain` (a plain link has no handshake: it is up once
    /// the gateway programmed it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
}

/// What the fabric daemon on one node uses and has programmed; one per
/// Node, named after it and owned by it.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "ligo.io",
    version = "v1alpha1",
    kind = "NodeFabric",
    status = "NodeFabricStatus",
    printcolumn = r#"{"name":"Slices","type":"string","jsonPath":".status.podCIDRs"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NodeFabricSpec {
    /// Override of the node's pod CIDR slices, for CNIs that do not fill
    /// `Node.spec.podCIDRs`.
    #[serde(rename = "podCIDRs", default, skip_serializing_if = "Vec::is_empty")]
    pub pod_cidrs: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeFabricStatus {
    /// The slices the daemon uses for this node.
    #[serde(rename = "podCIDRs", default, skip_serializing_if = "Vec::is_empty")]
    pub pod_cidrs: Vec<String>,
    /// How many revisions of the desired state the daemon has applied since
    /// it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub programmed_generation: Option<i64>,
    /// The `Peer` objects this node's data path carries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub programmed_peers: Vec<String>,
    /// On gateways: each peer's link as the tunnel sees it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["peer"]))]
    pub peers: Vec<PeerLinkReport>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// One peer's link on one gateway.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PeerLinkReport {
    /// The `Peer` object's name.
    pub peer: String,
    #[serde(flatten)]
    pub link: LinkStatus,
}
