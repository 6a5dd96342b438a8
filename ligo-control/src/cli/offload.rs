//! `ligo-control offload namespace NS` and `unoffload namespace NS`: which
//! of our namespaces may run pods on which peers (`spec.offloading.namespaces`
//! of each Peer we consume). The provider mirrors each one under the same
//! name, or says why it cannot.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::{
    core::v1::Namespace,
    rbac::v1::{RoleBinding, RoleRef, Subject},
};
use kube::{
    api::{Api, ObjectMeta, Patch, PatchParams},
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
    /// Ligo's namespace (where the controller's ServiceAccount is).
    #[arg(long, default_value = "ligo-system")]
    pub ligo_namespace: String,
}

/// The RoleBinding that lets the controller read what it reflects from an
/// offloaded namespace (`manifests/base/rbac.yaml`: ligo-offload-reflector).
const READER_BINDING: &str = "ligo-offload-reflector";

fn reader_binding(namespace: &str, ligo_namespace: &str) -> RoleBinding {
    RoleBinding {
        metadata: ObjectMeta {
            name: Some(READER_BINDING.into()),
            namespace: Some(namespace.into()),
            labels: Some(std::collections::BTreeMap::from([(
                crate::peering::MANAGED_BY_LABEL.to_owned(),
                crate::controller::FIELD_MANAGER.to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name: READER_BINDING.into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: "ligo-control".into(),
            namespace: Some(ligo_namespace.into()),
            ..Subject::default()
        }]),
    }
}

/// Removes the controller's read access to each of `namespaces` that no
/// Peer offloads any more.
pub async fn drop_unused_read_access(
    cluster: &super::Cluster,
    namespaces: &[String],
) -> Result<()> {
    let peers = Api::<Peer>::all(cluster.client.clone())
        .list(&Default::default())
        .await
        .with_context(|| format!("{}: listing Peers", cluster.url))?;
    for namespace in namespaces {
        let used = peers.iter().any(|p| {
            p.spec
                .offloading
                .as_ref()
                .is_some_and(|o| o.namespaces.contains(namespace))
        });
        if used {
            continue;
        }
        let bindings: Api<RoleBinding> = Api::namespaced(cluster.client.clone(), namespace);
        match bindings.delete(READER_BINDING, &Default::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                return Err(anyhow::Error::from(e).context(format!(
                    "{}: removing the controller's read access to namespace {namespace}",
                    cluster.url
                )))
            }
        }
    }
    Ok(())
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
    if add {
        let bindings: Api<RoleBinding> = Api::namespaced(cluster.client.clone(), &args.name);
        Api::<Namespace>::all(cluster.client.clone())
            .get(&args.name)
            .await
            .with_context(|| {
                format!(
                    "{}: namespace {} must exist to be offloaded",
                    cluster.url, args.name
                )
            })?;
        bindings
            .patch(
                READER_BINDING,
                &PatchParams::apply("ligo-control-cli").force(),
                &Patch::Apply(&reader_binding(&args.name, &args.ligo_namespace)),
            )
            .await
            .with_context(|| {
                format!(
                    "{}: letting the controller read namespace {}",
                    cluster.url, args.name
                )
            })?;
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
    if !add {
        drop_unused_read_access(&cluster, std::slice::from_ref(&args.name)).await?;
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
