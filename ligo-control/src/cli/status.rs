//! `ligo-control status [-o json]`: this cluster, and per peer the names,
//! ids, both views, endpoints, link and conditions.

use anyhow::{Context, Result};
use kube::{api::Api, ResourceExt};
use serde::Serialize;

use super::{connect, Access};
use crate::crd::{ClusterFabric, Condition, LinkStatus, OffloadingStatus, Peer};

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub access: Access,
    /// `text` (default) or `json`.
    #[arg(short = 'o', long = "output", default_value = "text")]
    pub output: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub cluster_name: Option<String>,
    pub cluster_id: Option<u32>,
    #[serde(rename = "podCIDR")]
    pub pod_cidr: Option<String>,
    pub gateway_endpoints: Vec<String>,
    pub conditions: Vec<Condition>,
    pub peers: Vec<PeerReport>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerReport {
    pub name: String,
    pub cluster_id: u32,
    #[serde(rename = "podCIDR")]
    pub pod_cidr: String,
    /// Where we reach its pods.
    pub view: Option<String>,
    /// Where it reaches ours.
    pub remote_view: Option<String>,
    pub gateway_endpoints: Vec<String>,
    pub link: Option<LinkStatus>,
    /// Running pods across: our virtual node for it, and what we offer it.
    pub offloading: Option<OffloadingReport>,
    pub conditions: Vec<Condition>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OffloadingReport {
    pub consume: bool,
    pub provide: bool,
    pub namespaces: Vec<String>,
    #[serde(flatten)]
    pub status: OffloadingStatus,
}

pub async fn status(args: StatusArgs) -> Result<()> {
    let cluster = connect(
        args.access.kubeconfig.as_ref(),
        args.access.context.as_deref(),
    )
    .await?;
    let fabric = Api::<ClusterFabric>::all(cluster.client.clone())
        .get_opt(crate::cluster::CLUSTER_FABRIC_NAME)
        .await
        .with_context(|| format!("{}: reading ClusterFabric/local", cluster.url))?;
    let own = fabric.and_then(|f| f.status).unwrap_or_default();
    let mut peers = Api::<Peer>::all(cluster.client.clone())
        .list(&Default::default())
        .await
        .with_context(|| format!("{}: listing Peers", cluster.url))?
        .items;
    peers.sort_by_key(|p| p.name_any());
    let report = Report {
        cluster_name: own.cluster_name,
        cluster_id: own.cluster_id,
        pod_cidr: own.pod_cidr,
        gateway_endpoints: own.gateway_endpoints,
        conditions: own.conditions,
        peers: peers
            .into_iter()
            .map(|p| {
                let status = p.status.clone().unwrap_or_default();
                PeerReport {
                    name: p.name_any(),
                    cluster_id: p.spec.cluster_id,
                    pod_cidr: p.spec.pod_cidr.clone(),
                    view: p.spec.view.clone(),
                    remote_view: status.remote_view,
                    gateway_endpoints: p.spec.gateway_endpoints.clone(),
                    link: status.link,
                    offloading: p.spec.offloading.as_ref().map(|o| OffloadingReport {
                        consume: o.consume,
                        provide: o.provide,
                        namespaces: o.namespaces.clone(),
                        status: status.offloading.clone().unwrap_or_default(),
                    }),
                    conditions: status.conditions,
                }
            })
            .collect(),
    };
    match args.output.as_str() {
        "json" => println!("{}", serde_json::to_string_pretty(&report)?),
        "text" => print!("{}", text(&report)),
        other => anyhow::bail!("-o {other}: text or json"),
    }
    Ok(())
}

fn or_dash(value: &Option<String>) -> &str {
    value.as_deref().unwrap_or("-")
}

/// The report as an operator reads it.
pub fn text(report: &Report) -> String {
    let mut out = format!(
        "cluster {} (id {}), pods {}, gateways {}\n",
        or_dash(&report.cluster_name),
        report.cluster_id.map_or("-".into(), |i| i.to_string()),
        or_dash(&report.pod_cidr),
        report.gateway_endpoints.join(", ")
    );
    out.push_str(&conditions_line(&report.conditions));
    for p in &report.peers {
        out.push_str(&format!(
            "\npeer {} (id {}): pods {} seen here as {}; it sees ours as {}\n  gateways {}\n",
            p.name,
            p.cluster_id,
            p.pod_cidr,
            or_dash(&p.view),
            or_dash(&p.remote_view),
            p.gateway_endpoints.join(", ")
        ));
        match &p.link {
            Some(l) => out.push_str(&format!(
                "  link: handshake {} ago, {} bytes sent, {} received\n",
                l.handshake_age_seconds
                    .map_or("never".into(), |s| format!("{s} s")),
                l.tx_bytes,
                l.rx_bytes
            )),
            None => out.push_str("  link: not reported\n"),
        }
        if let Some(o) = &p.offloading {
            out.push_str(&offloading_lines(o));
        }
        out.push_str(&format!("  {}", conditions_line(&p.conditions)));
    }
    out
}

fn quantities(map: &std::collections::BTreeMap<String, String>) -> String {
    if map.is_empty() {
        return "-".into();
    }
    map.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn offloading_lines(o: &OffloadingReport) -> String {
    let mut out = String::new();
    if o.consume {
        match &o.status.virtual_node {
            Some(v) => {
                out.push_str(&format!(
                    "  virtual node {}: {}; {} pods offloaded, {} refused; {} objects reflected, {} write errors\n",
                    v.name,
                    quantities(&v.capacity),
                    v.pods_offloaded,
                    v.pods_refused,
                    v.objects_reflected,
                    v.reflection_errors
                ));
                for n in &v.namespaces {
                    let why = if n.message.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", n.message)
                    };
                    out.push_str(&format!("    namespace {}: {}{why}\n", n.name, n.state));
                }
            }
            None => out.push_str("  virtual node: not reported yet\n"),
        }
        if o.namespaces.is_empty() {
            out.push_str("    no namespace offloaded (ligo-control offload namespace NS)\n");
        }
    }
    if o.provide {
        out.push_str(&format!(
            "  we offer it: {}\n",
            quantities(&o.status.offered)
        ));
        for g in &o.status.granted_namespaces {
            out.push_str(&format!("    its namespace {} here: {}\n", g.name, g.state));
        }
    }
    out
}

fn conditions_line(conditions: &[Condition]) -> String {
    let mut line: Vec<String> = conditions
        .iter()
        .map(|c| format!("{}{}", if c.status == "True" { "✓" } else { "✗" }, c.type_))
        .collect();
    if let Some(failing) = conditions
        .iter()
        .find(|c| c.status != "True" && c.type_ != "Ready")
    {
        line.push(format!("— {}: {}", failing.reason, failing.message));
    }
    format!("{}\n", line.join(" "))
}
