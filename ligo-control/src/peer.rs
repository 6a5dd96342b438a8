//! One `Peer`: its validation, its view (allocated into the spec when
//! empty, then immutable), what the remote cluster says about itself, and
//! the conditions. Pure: the shell (`controller::peer`) reads the local
//! objects and the remote cluster and writes the result.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use crate::{
    cluster::Resolved,
    conditions::{summary, Verdict},
    crd::{LinkStatus, PeerSpec, PeerStatus},
    ipam::{self, AddressSpace},
    validate::{self, FieldError},
};

/// Another `Peer` object of this cluster, as far as this one cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherPeer {
    pub name: String,
    pub cluster_id: u32,
    pub view: Option<Ipv4Network>,
    /// `metadata.creationTimestamp`: the older of two clashing peers wins.
    pub created: String,
}

/// What the shell learnt from the remote cluster's API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Remote {
    /// `spec.apiServer` is not set: the remote is not checked (its facts
    /// are whatever the spec says).
    NotConfigured,
    /// The credentials Secret is missing or holds no usable kubeconfig.
    CredentialsUnusable(String),
    /// The API server did not answer (names the URL).
    Unreachable(String),
    /// It answered but refused our credentials.
    Refused(String),
    Read(Box<RemoteFacts>),
}

/// The remote cluster's own `ClusterFabric` status and its `Peer` for us.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteFacts {
    pub cluster_name: Option<String>,
    pub cluster_id: Option<u32>,
    pub pod_cidr: Option<String>,
    pub gateway_endpoints: Vec<String>,
    pub wireguard_public_key: Option<String>,
    /// `spec.view` of the remote's `Peer` for us: how it sees our CIDR.
    pub view_of_us: Option<String>,
    /// Its `Peer` for us: its offloading settings (as consumer, the
    /// namespaces it asks us for) and status (as provider, its offer and
    /// what became of the namespaces we asked for).
    pub offloading: Option<crate::crd::OffloadingSpec>,
    pub offloading_status: Option<crate::crd::OffloadingStatus>,
}

pub struct PeerInputs<'a> {
    pub name: &'a str,
    pub created: &'a str,
    pub spec: &'a PeerSpec,
    /// Our settings, or why they are not usable yet.
    pub local: Result<&'a Resolved, String>,
    /// Our node addresses (a view must not cover them).
    pub node_addresses: &'a [Ipv4Addr],
    pub others: &'a [OtherPeer],
    pub remote: &'a Remote,
    /// The gateway daemon's report of this peer's link, once it has one.
    pub link: Option<&'a LinkStatus>,
    /// What the nodes' daemons report of this peer.
    pub nodes: &'a NodeReports,
}

/// Which nodes' fabric daemons carry a peer (from their `NodeFabric`
/// status), sorted by node name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeReports {
    /// The daemon reports the peer programmed.
    pub programmed: Vec<String>,
    /// The daemon reports, but not this peer (yet), or refused a revision.
    pub lagging: Vec<String>,
    /// A node that is not known to be down, whose daemon never reported.
    pub silent: Vec<String>,
}

/// Spec fields to write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerSpecUpdate {
    /// Set once, when `spec.view` was empty.
    pub view: Option<String>,
    /// The remote's current gateway endpoints and key, when they differ
    /// from the spec (a moved gateway, a rotated key reach us this way).
    pub gateway_endpoints: Option<Vec<String>>,
    pub wireguard_public_key: Option<String>,
}

impl PeerSpecUpdate {
    pub fn is_empty(&self) -> bool {
        *self == PeerSpecUpdate::default()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PeerPlan {
    pub update: PeerSpecUpdate,
    /// Status without conditions (the shell merges [`Self::verdicts`]).
    pub status: PeerStatus,
    pub verdicts: Vec<Verdict>,
}

pub fn reconcile(inputs: &PeerInputs) -> PeerPlan {
    let mut verdicts = Vec::new();
    let mut update = PeerSpecUpdate::default();
    let spec = inputs.spec;
    let valid = validate_peer(inputs);
    match &valid {
        Ok(_) => verdicts.push(Verdict::ok("Valid", "Valid", "the spec is valid")),
        Err((reason, e)) => verdicts.push(Verdict::failed(
            "Valid",
            reason,
            format!("Peer/{} {e}", inputs.name),
        )),
    }

    let view = match (&valid, &inputs.local) {
        (Err(_), _) => Err(Verdict::failed(
            "ViewAllocated",
            "InvalidSpec",
            "waiting for a valid spec",
        )),
        (Ok(_), Err(why)) => Err(Verdict::failed(
            "ViewAllocated",
            "LocalSettingsNotReady",
            why.clone(),
        )),
        (Ok(pod_cidr), Ok(local)) => view_for(inputs, *pod_cidr, local),
    };
    match view {
        Ok((view, newly)) => {
            if newly {
                update.view = Some(view.to_string());
            }
            verdicts.push(Verdict::ok(
                "ViewAllocated",
                "Allocated",
                format!("we reach {} at {view}", spec.pod_cidr),
            ));
        }
        Err(v) => verdicts.push(v),
    }

    let mut status = PeerStatus {
        link: inputs.link.cloned(),
        ..PeerStatus::default()
    };
    match inputs.remote {
        Remote::NotConfigured => {
            verdicts.push(Verdict::ok(
                "CredentialsValid",
                "NotConfigured",
                "spec.apiServer is not set: the remote is taken as the spec states it",
            ));
            verdicts.push(Verdict::ok(
                "RemoteIdentityVerified",
                "NotConfigured",
                "spec.apiServer is not set: nothing to verify against",
            ));
        }
        Remote::CredentialsUnusable(why) => {
            verdicts.push(Verdict::failed(
                "CredentialsValid",
                "CredentialsUnusable",
                why.clone(),
            ));
            verdicts.push(unverified());
        }
        Remote::Unreachable(why) => {
            verdicts.push(Verdict::failed(
                "CredentialsValid",
                "RemoteUnreachable",
                why.clone(),
            ));
            verdicts.push(unverified());
        }
        Remote::Refused(why) => {
            verdicts.push(Verdict::failed(
                "CredentialsValid",
                "CredentialsRefused",
                why.clone(),
            ));
            verdicts.push(unverified());
        }
        Remote::Read(facts) => {
            verdicts.push(Verdict::ok(
                "CredentialsValid",
                "Accepted",
                "the remote API server accepted our credentials",
            ));
            match verify_identity(spec, facts) {
                Ok(()) => {
                    verdicts.push(Verdict::ok(
                        "RemoteIdentityVerified",
                        "Verified",
                        format!(
                            "the remote calls itself {} (id {})",
                            spec.cluster_name, spec.cluster_id
                        ),
                    ));
                    if !facts.gateway_endpoints.is_empty()
                        && facts.gateway_endpoints != spec.gateway_endpoints
                    {
                        update.gateway_endpoints = Some(facts.gateway_endpoints.clone());
                    }
                    if facts.wireguard_public_key.is_some()
                        && facts.wireguard_public_key != spec.wireguard_public_key
                    {
                        update.wireguard_public_key = facts.wireguard_public_key.clone();
                    }
                    status.remote_view = facts.view_of_us.clone();
                }
                Err(why) => verdicts.push(Verdict::failed(
                    "RemoteIdentityVerified",
                    "IdentityMismatch",
                    why,
                )),
            }
        }
    }

    let plain = spec.transport.as_deref() == Some("plain");
    verdicts.push(match inputs.link {
        Some(_) if plain => Verdict::ok(
            "TunnelEstablished",
            "PlainTransport",
            "the gateway programmed this peer (plain transport: no handshake to wait for)",
        ),
        Some(link) if link.handshake_age_seconds.is_some_and(|age| age < 180) => Verdict::ok(
            "TunnelEstablished",
            "HandshakeRecent",
            format!(
                "last handshake {} s ago",
                link.handshake_age_seconds.unwrap_or_default()
            ),
        ),
        Some(_) => Verdict::failed(
            "TunnelEstablished",
            "NoRecentHandshake",
            "the gateway has no recent handshake with this peer; check that its gateway runs and that UDP reaches spec.gatewayEndpoints",
        ),
        None => Verdict::failed(
            "TunnelEstablished",
            "NotReported",
            "no gateway daemon has reported this peer's link yet",
        ),
    });
    verdicts.push(nodes_programmed(inputs.nodes));
    verdicts.push(summary(&verdicts));
    PeerPlan {
        update,
        status,
        verdicts,
    }
}

/// Traffic flows from every node only once every node's daemon carries the
/// peer.
fn nodes_programmed(nodes: &NodeReports) -> Verdict {
    const TYPE: &str = "NodesProgrammed";
    if !nodes.lagging.is_empty() {
        return Verdict::failed(
            TYPE,
            "NodesLagging",
            format!(
                "the fabric daemons of {} do not carry this peer yet (see their NodeFabric status)",
                nodes.lagging.join(", ")
            ),
        );
    }
    if !nodes.silent.is_empty() {
        return Verdict::failed(
            TYPE,
            "NodesNotReporting",
            format!(
                "no fabric daemon reports from {}: is the ligo-fabric DaemonSet running there?",
                nodes.silent.join(", ")
            ),
        );
    }
    if nodes.programmed.is_empty() {
        return Verdict::failed(TYPE, "NoNodes", "no node's fabric daemon reports yet");
    }
    Verdict::ok(
        TYPE,
        "AllNodes",
        format!("programmed on {} node(s)", nodes.programmed.len()),
    )
}

fn unverified() -> Verdict {
    Verdict::failed(
        "RemoteIdentityVerified",
        "RemoteNotRead",
        "the remote cluster could not be read (see CredentialsValid)",
    )
}

/// The spec's own fields, then its clashes with us and with other peers.
/// Returns the real pod CIDR.
fn validate_peer(inputs: &PeerInputs) -> Result<Ipv4Network, (&'static str, FieldError)> {
    let spec = inputs.spec;
    let invalid = |e| ("InvalidSpec", e);
    validate::dns_label("spec.clusterName", &spec.cluster_name).map_err(invalid)?;
    if inputs.name != spec.cluster_name {
        return Err(invalid(FieldError {
            field: "metadata.name".into(),
            message: format!(
                "must be the remote's cluster name {:?}: the remote finds its Peer for us by our name",
                spec.cluster_name
            ),
        }));
    }
    validate::cluster_id("spec.clusterId", spec.cluster_id).map_err(invalid)?;
    let pod_cidr = validate::cidr("spec.podCIDR", &spec.pod_cidr).map_err(invalid)?;
    for (i, e) in spec.gateway_endpoints.iter().enumerate() {
        validate::endpoint(&format!("spec.gatewayEndpoints[{i}]"), e).map_err(invalid)?;
    }
    if let Some(key) = &spec.wireguard_public_key {
        validate::wireguard_key("spec.wireguardPublicKey", key).map_err(invalid)?;
    }
    match spec.transport.as_deref() {
        None | Some("wireguard") | Some("plain") => {}
        Some(other) => {
            return Err(invalid(FieldError {
                field: "spec.transport".into(),
                message: format!("{other:?} is not a transport: wireguard (default) or plain"),
            }))
        }
    }
    if let Ok(local) = &inputs.local {
        if local.cluster_name == spec.cluster_name && local.cluster_id == spec.cluster_id {
            return Err((
                "PeeredWithItself",
                FieldError {
                    field: "spec".into(),
                    message: format!(
                        "names this cluster itself ({}, id {}): a cluster cannot peer with itself",
                        local.cluster_name, local.cluster_id
                    ),
                },
            ));
        }
        if local.cluster_name == spec.cluster_name {
            return Err((
                "DuplicateClusterName",
                FieldError {
                    field: "spec.clusterName".into(),
                    message: format!("both clusters are named {:?}; rename one (ClusterFabric/local spec.clusterName)", spec.cluster_name),
                },
            ));
        }
        if local.cluster_id == spec.cluster_id {
            return Err((
                "DuplicateClusterId",
                FieldError {
                    field: "spec.clusterId".into(),
                    message: format!("both clusters have id {}; give one another id (ClusterFabric/local spec.clusterId)", spec.cluster_id),
                },
            ));
        }
    }
    // Of two peers with one id, the older keeps it.
    if let Some(older) = inputs.others.iter().find(|o| {
        o.cluster_id == spec.cluster_id
            && (o.created.as_str(), o.name.as_str()) < (inputs.created, inputs.name)
    }) {
        return Err((
            "DuplicateClusterId",
            FieldError {
                field: "spec.clusterId".into(),
                message: format!("id {} is already Peer/{}'s", spec.cluster_id, older.name),
            },
        ));
    }
    Ok(pod_cidr)
}

/// The view, and whether it is new (to be written into the spec).
fn view_for(
    inputs: &PeerInputs,
    pod_cidr: Ipv4Network,
    local: &Resolved,
) -> Result<(Ipv4Network, bool), Verdict> {
    let mut taken = vec![local.pod_cidr];
    taken.extend(local.service_cidr);
    taken.extend(local.reserved_ranges.iter().copied());
    taken.extend(
        inputs
            .node_addresses
            .iter()
            .filter_map(|ip| Ipv4Network::new(*ip, 32).ok()),
    );
    let others: Vec<(&str, Ipv4Network)> = inputs
        .others
        .iter()
        .filter_map(|o| o.view.map(|v| (o.name.as_str(), v)))
        .collect();
    taken.extend(others.iter().map(|(_, v)| *v));

    if let Some(text) = &inputs.spec.view {
        let view = validate::cidr("spec.view", text).map_err(|e| {
            Verdict::failed(
                "ViewAllocated",
                "InvalidView",
                format!("Peer/{} {e}", inputs.name),
            )
        })?;
        if view.prefix() != pod_cidr.prefix() {
            return Err(Verdict::failed(
                "ViewAllocated",
                "InvalidView",
                format!(
                    "Peer/{} spec.view {view} must have the prefix length of spec.podCIDR {pod_cidr}",
                    inputs.name
                ),
            ));
        }
        let clash = |net: &Ipv4Network| overlaps(view, *net);
        if let Some((other, _)) = others.iter().find(|(_, v)| clash(v)) {
            return Err(Verdict::failed(
                "ViewAllocated",
                "ViewConflict",
                format!("Peer/{} spec.view {view} overlaps Peer/{other}'s view; a view is immutable, so delete and re-create one of the two without spec.view", inputs.name),
            ));
        }
        if let Some(net) = taken.iter().find(|n| clash(n)) {
            return Err(Verdict::failed(
                "ViewAllocated",
                "ViewConflict",
                format!(
                    "Peer/{} spec.view {view} overlaps our address space ({net})",
                    inputs.name
                ),
            ));
        }
        return Ok((view, false));
    }
    let space = AddressSpace {
        taken,
        pools: local.view_pools.clone(),
    };
    ipam::allocate_view(pod_cidr, &space)
        .map(|view| (view, true))
        .map_err(|e| {
            Verdict::failed(
                "ViewAllocated",
                e.reason(),
                format!("Peer/{}: {e}", inputs.name),
            )
        })
}

fn overlaps(a: Ipv4Network, b: Ipv4Network) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

/// The remote must be who the spec says; its pod CIDR may not move (our
/// view was made for its size).
fn verify_identity(spec: &PeerSpec, facts: &RemoteFacts) -> Result<(), String> {
    let name = facts.cluster_name.as_deref().unwrap_or("(not set)");
    if facts.cluster_name.as_deref() != Some(spec.cluster_name.as_str()) {
        return Err(format!(
            "spec.clusterName is {:?} but the remote's ClusterFabric calls it {name:?}: these credentials lead to another cluster",
            spec.cluster_name
        ));
    }
    if facts.cluster_id != Some(spec.cluster_id) {
        return Err(format!(
            "spec.clusterId is {} but the remote's ClusterFabric says {}",
            spec.cluster_id,
            facts
                .cluster_id
                .map_or("(not set)".into(), |i| i.to_string())
        ));
    }
    if facts.pod_cidr.as_deref() != Some(spec.pod_cidr.as_str()) {
        return Err(format!(
            "spec.podCIDR is {} but the remote's ClusterFabric says {}; re-peer to take a new pod CIDR",
            spec.pod_cidr,
            facts.pod_cidr.as_deref().unwrap_or("(not set)")
        ));
    }
    Ok(())
}

#[cfg(test)]
#[path = "peer_tests.rs"]
mod tests;
