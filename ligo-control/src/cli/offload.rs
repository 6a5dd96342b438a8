//! `ligo-control offload namespace NS` and `unoffload namespace NS`: which
//! of our namespaces may run pods on which peers (`spec.offloading.namespaces`
//! of each Peer we consume). The provider mirrors each one under the same
//! name, or says why it cannot.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kube::{
    api::{Api, Patch, PatchParams},
    ResourceExt,
};
use serde_json::json;

use super::{connect, ok, Access};
use crate::crd::Peer;

#[derive(clap::Args, Debug)]
pub struct OffloadArgs {
    #[command(flatten)]
    pub access: Access,
    /// What to offload (only `namespace` so far).
    #[arg(value_parser = ["namespace"])]
    pub kind: String,
    /// The namespace.
    pub name: String,
    /// The peer (default: every peer we run pods on).
    #[arg(long)]
    pub peer: Option<String>,
    /// Return once every such peer granted the namespace.
    #[arg(long)]
    pub wait: bool,
    #[arg(long, default_value = "1m", value_parser = super::peer::parse_duration)]
    pub timeout: Duration,
}

pub async fn offload(args: OffloadArgs, add: bool) -> Result<()> {
    let cluster = connect(
        args.access.kubeconfig.as_ref(),
        args.access.context.as_deref(),
    )
    .await?;
    let api: Api<Peer> = Api::all(cluster.client.clone());
    let peers = api
        .list(&Default::default())
        .await
        .with_context(|| format!("{}: listing Peers", cluster.url))?;
    let chosen: Vec<Peer> = peers
        .into_iter()
        .filter(|p| args.peer.as_ref().is_none_or(|n| p.name_any() == *n))
        .collect();
    if let Some(name) = &args.peer {
        if chosen.is_empty() {
            bail!("Peer {name} does not exist in {}", cluster.url);
        }
    }
    let consuming: Vec<&Peer> = chosen
        .iter()
        .filter(|p| p.spec.offloading.as_ref().is_some_and(|o| o.consume))
        .collect();
    if consuming.is_empty() {
        bail!(
            "no Peer{} runs our pods (spec.offloading.consume); peer with `ligo-control peer --offload out`",
            args.peer.as_ref().map(|p| format!(" named {p}")).unwrap_or_default()
        );
    }
    for peer in &consuming {
        let name = peer.name_any();
        let mut namespaces = peer
            .spec
            .offloading
            .as_ref()
            .map(|o| o.namespaces.clone())
            .unwrap_or_default();
        let had = namespaces.contains(&args.name);
        if add && !had {
            namespaces.push(args.name.clone());
        } else if !add && had {
            namespaces.retain(|n| *n != args.name);
        } else {
            ok(format_args!(
                "Peer {name}: namespace {} already {}",
                args.name,
                if add { "offloaded" } else { "not offloaded" }
            ));
            continue;
        }
        // Written into the spec we read, or not at all.
        let patch = json!({
            "metadata": {"resourceVersion": peer.resource_version()},
            "spec": {"offloading": {"namespaces": namespaces}},
        });
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| {
                format!(
                    "{}: updating Peer {name} spec.offloading.namespaces",
                    cluster.url
                )
            })?;
        ok(format_args!(
            "Peer {name}: namespace {} {}",
            args.name,
            if add {
                "offloaded"
            } else {
                "no longer offloaded"
            }
        ));
    }
    if !(add && args.wait) {
        return Ok(());
    }
    let started = Instant::now();
    for peer in &consuming {
        let name = peer.name_any();
        loop {
            let current = api
                .get(&name)
                .await
                .with_context(|| format!("reading Peer {name}"))?;
            let grant = current
                .status
                .and_then(|s| s.offloading)
                .and_then(|o| o.virtual_node)
                .and_then(|v| v.namespaces.into_iter().find(|g| g.name == args.name));
            match grant {
                Some(g) if g.state == "Granted" => {
                    ok(format_args!("{name} runs namespace {}'s pods ({:.2} s)", args.name, started.elapsed().as_secs_f64()));
                    break;
                }
                Some(g) if g.state != "Waiting" => bail!("{name} refused namespace {}: {} ({})", args.name, g.message, g.state),
                _ if started.elapsed() > args.timeout => bail!(
                    "{name} has not granted namespace {} after {:?}: see `kubectl get peer {name} -o yaml` and the controller's log",
                    args.name,
                    args.timeout
                ),
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
    Ok(())
}
