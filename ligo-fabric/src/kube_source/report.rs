//! What the daemon has programmed, reported in its node's `NodeFabric`
//! status: the slices it uses for the node, the peers it programmed, the
//! last refusal, and on gateways each peer's link as the tunnel process sees
//! it. The controller reads these to say whether a `Peer` is Ready.
//!
//! The object is created (owned by its Node, so it goes with it) when
//! missing; its spec stays the operator's. Writes are server-side applies of
//! the status only, made when what is reported changes; link figures that
//! only count bytes are refreshed at most every [`FIGURES_EVERY`].

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Node;
use kube::{
    api::{Api, Patch, PatchParams},
    Client, Resource,
};
use ligo_api::{Condition, LinkStatus, NodeFabric, NodeFabricStatus, PeerLinkReport};
use serde_json::json;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    config::{FabricSpec, LocalConfig, LocalRole, Transport},
    tunnel::status::{StatusClient, TunnelStatus},
};

/// The field manager of what daemons write.
pub const FIELD_MANAGER: &str = "ligo-fabric";
/// How often link figures (bytes, handshake age) are refreshed when nothing
/// else changed.
pub const FIGURES_EVERY: Duration = Duration::from_secs(10);
/// How often a gateway asks its tunnel process (a link coming up is
/// reported within this).
const TUNNEL_POLL: Duration = Duration::from_millis(200);
/// The longest wait between failed writes.
const MAX_BACKOFF: Duration = Duration::from_secs(8);

/// What the daemon did with the last revision it was given.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Programmed {
    /// Revisions applied since the daemon started.
    pub revisions: i64,
    /// What is programmed now (absent until the first apply).
    pub state: Option<(LocalConfig, FabricSpec)>,
    /// Why the last revision was refused, when it was.
    pub refused: Option<String>,
}

/// The status to report (pure): slices of this node, programmed peers,
/// links, and a `Programmed` condition.
pub fn status_of(
    programmed: &Programmed,
    tunnel: Option<&Result<TunnelStatus, String>>,
    previous: &[Condition],
    now: &str,
) -> NodeFabricStatus {
    let mut status = NodeFabricStatus {
        programmed_generation: Some(programmed.revisions),
        ..NodeFabricStatus::default()
    };
    let mut condition = match &programmed.refused {
        Some(why) => ("False", "RevisionRefused", why.clone()),
        None => ("True", "Programmed", String::new()),
    };
    if let Some((local, spec)) = &programmed.state {
        let underlay = match &local.role {
            LocalRole::Node(n) => n.underlay_ip,
            LocalRole::Gateway(g) => g.underlay_ip,
        };
        status.pod_cidrs = spec
            .node_slices
            .iter()
            .filter(|(_, ip)| **ip == underlay)
            .map(|(net, _)| net.to_string())
            .collect();
        status.programmed_peers = spec.peers.values().map(|p| p.name.clone()).collect();
        status.programmed_peers.sort();
        if matches!(local.role, LocalRole::Gateway(_)) {
            status.peers = links(spec, tunnel);
        }
        if programmed.refused.is_none() {
            condition.2 = format!(
                "{} peer(s) and {} slice(s) programmed",
                status.programmed_peers.len(),
                status.pod_cidrs.len()
            );
        }
        if let Some(Err(why)) = tunnel {
            if spec.wireguard_peers().next().is_some() {
                condition = ("False", "TunnelProcessNotAnswering", why.clone());
            }
        }
    } else if programmed.refused.is_none() {
        condition = (
            "Unknown",
            "Starting",
            "the daemon has not programmed anything yet".into(),
        );
    }
    let (state, reason, message) = condition;
    let transition = previous
        .iter()
        .find(|c| c.type_ == "Programmed" && c.status == state)
        .map_or_else(|| now.to_owned(), |c| c.last_transition_time.clone());
    status.conditions = vec![Condition {
        type_: "Programmed".into(),
        status: state.into(),
        reason: reason.into(),
        message,
        last_transition_time: transition,
        observed_generation: None,
    }];
    status
}

/// Per peer: plain peers are up once programmed (there is no handshake);
/// WireGuard peers carry the tunnel's figures.
fn links(spec: &FabricSpec, tunnel: Option<&Result<TunnelStatus, String>>) -> Vec<PeerLinkReport> {
    let figures = tunnel.and_then(|t| t.as_ref().ok());
    let mut links: Vec<PeerLinkReport> = spec
        .peers
        .values()
        .map(|p| {
            let seen = figures.and_then(|t| t.peers.iter().find(|s| s.id == p.id));
            PeerLinkReport {
                peer: p.name.clone(),
                link: LinkStatus {
                    handshake_age_seconds: seen
                        .and_then(|s| s.latest_handshake_seconds_ago)
                        .map(|age| age as u64),
                    tx_bytes: seen.map_or(0, |s| s.tx_bytes),
                    rx_bytes: seen.map_or(0, |s| s.rx_bytes),
                    transport: Some(
                        match p.transport {
                            Transport::Plain => "plain",
                            Transport::Wireguard => "wireguard",
                        }
                        .into(),
                    ),
                },
            }
        })
        .collect();
    links.sort_by(|a, b| a.peer.cmp(&b.peer));
    links
}

/// Whether `new` differs from `old` in more than the link figures.
fn changed_beyond_figures(old: &NodeFabricStatus, new: &NodeFabricStatus) -> bool {
    let strip = |s: &NodeFabricStatus| {
        let mut s = s.clone();
        for p in &mut s.peers {
            p.link.tx_bytes = 0;
            p.link.rx_bytes = 0;
            // A fresh handshake (age None -> Some) matters; its ageing does not.
            p.link.handshake_age_seconds = p.link.handshake_age_seconds.map(|_| 0);
        }
        for c in &mut s.conditions {
            c.last_transition_time.clear();
        }
        s
    };
    strip(old) != strip(new)
}

/// Keeps `NodeFabric/<node>`'s status equal to what `programmed` says,
/// until the sender goes away.
pub async fn report(
    client: Client,
    node_name: String,
    mut programmed: watch::Receiver<Programmed>,
    tunnel: StatusClient,
) {
    let api: Api<NodeFabric> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client);
    let mut last: Option<NodeFabricStatus> = None;
    let mut last_write = Instant::now();
    let mut poll = tokio::time::interval(TUNNEL_POLL);
    let mut backoff = Duration::ZERO;
    loop {
        if !backoff.is_zero() {
            tokio::time::sleep(backoff).await;
        }
        tokio::select! {
            changed = programmed.changed() => if changed.is_err() { return },
            _ = poll.tick() => {}
        }
        let current = programmed.borrow().clone();
        // The status socket is a blocking Unix socket (answers within 1 s).
        let asked = tunnel.clone();
        let figures = tokio::task::spawn_blocking(move || asked.fetch())
            .await
            .ok()
            .flatten()
            .map(|answer| answer.map_err(|e| format!("{e:#}")));
        let previous = last
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default();
        let status = status_of(&current, figures.as_ref(), &previous, &now_rfc3339());
        let due = match &last {
            None => true,
            Some(old) => {
                changed_beyond_figures(old, &status)
                    || (old != &status && last_write.elapsed() >= FIGURES_EVERY)
            }
        };
        if !due {
            continue;
        }
        match write(&api, &nodes, &node_name, &status).await {
            Ok(()) => {
                if last.is_none() || !backoff.is_zero() {
                    info!(node = %node_name, "reporting what is programmed in NodeFabric/{node_name}");
                }
                last = Some(status);
                last_write = Instant::now();
                backoff = Duration::ZERO;
            }
            Err(e) => {
                if backoff.is_zero() {
                    warn!(
                        node = %node_name,
                        error = format!("{e:#}"),
                        "cannot write the NodeFabric status (the data path is unaffected); retrying with backoff"
                    );
                }
                backoff = (backoff * 2).clamp(Duration::from_millis(500), MAX_BACKOFF);
            }
        }
    }
}

/// Creates the object (owned by the Node) when missing, then applies the
/// status.
async fn write(
    api: &Api<NodeFabric>,
    nodes: &Api<Node>,
    name: &str,
    status: &NodeFabricStatus,
) -> Result<()> {
    if api.get_opt(name).await?.is_none() {
        let node = nodes
            .get(name)
            .await
            .with_context(|| format!("reading Node {name}"))?;
        let owner = node
            .controller_owner_ref(&())
            .map(|mut o| {
                o.controller = Some(false);
                o
            })
            .context("the Node has no uid")?;
        let object = json!({
            "apiVersion": NodeFabric::api_version(&()),
            "kind": NodeFabric::kind(&()),
            "metadata": {"name": name, "ownerReferences": [owner]},
            // Required by the schema; its fields stay the operator's.
            "spec": {},
        });
        api.patch(
            name,
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(&object),
        )
        .await
        .with_context(|| format!("creating NodeFabric/{name}"))?;
    }
    let mut status_json = serde_json::to_value(status).context("encoding the status")?;
    // An emptied map-list is sent as [], not left out: a 1.20 server turns
    // the last entry removed by apply into null and refuses it.
    if let Some(fields) = status_json.as_object_mut() {
        fields.entry("peers").or_insert_with(|| json!([]));
    }
    let patch = json!({
        "apiVersion": NodeFabric::api_version(&()),
        "kind": NodeFabric::kind(&()),
        "status": status_json,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .with_context(|| format!("writing NodeFabric/{name} status"))?;
    Ok(())
}

/// Now, as conditions stamp it (RFC 3339, whole seconds).
fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

#[cfg(test)]
#[path = "report_tests.rs"]
mod tests;
