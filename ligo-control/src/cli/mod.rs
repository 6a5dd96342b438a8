//! The operator's commands: `peer`, `unpeer`, `status`. Each prints one
//! ✓/✗ line per step, and a failure names what failed (the cluster, the
//! URL, the object and the field).

pub mod offload;
pub mod peer;
pub mod status;

use std::{path::PathBuf, time::Duration};

use anyhow::{bail, Context, Result};
use kube::{api::Api, Client, Config};

use crate::{
    cluster::CLUSTER_FABRIC_NAME,
    conditions,
    crd::{ClusterFabric, ClusterFabricStatus},
};

/// How to reach a cluster, as kubectl takes it.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct Access {
    /// A kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or the
    /// in-cluster service account).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long)]
    pub context: Option<String>,
}

/// A client for one cluster, and how to name it in messages.
pub struct Cluster {
    pub client: Client,
    /// What the operator called it (`--kubeconfig FILE`, a context).
    pub label: String,
    pub url: String,
}

/// Connects with `kubeconfig`/`context` (either may be absent) and checks
/// the API server answers.
pub async fn connect(kubeconfig: Option<&PathBuf>, context: Option<&str>) -> Result<Cluster> {
    connect_with(kubeconfig, context, CLI_READ_TIMEOUT).await
}

/// A CLI call that hangs for more than this is reported, not waited on.
const CLI_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Watches idle for minutes (the server closes them after ~5): a reader's
/// timeout must be longer, or every quiet watch fails and re-lists.
pub const WATCH_READ_TIMEOUT: Duration = Duration::from_secs(330);

/// [`connect`] with reads that may take up to `read_timeout`.
pub async fn connect_with(
    kubeconfig: Option<&PathBuf>,
    context: Option<&str>,
    read_timeout: Duration,
) -> Result<Cluster> {
    let options = kube::config::KubeConfigOptions {
        context: context.map(str::to_owned),
        ..Default::default()
    };
    let label = match (kubeconfig, context) {
        (Some(path), Some(ctx)) => format!("{} (context {ctx})", path.display()),
        (Some(path), None) => path.display().to_string(),
        (None, Some(ctx)) => format!("context {ctx}"),
        (None, None) => "the default kubeconfig".to_owned(),
    };
    let mut config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Config::from_custom_kubeconfig(file, &options)
                .await
                .with_context(|| format!("using {label}"))?
        }
        None if context.is_some() => Config::from_kubeconfig(&options)
            .await
            .with_context(|| format!("using {label}"))?,
        None => Config::infer()
            .await
            .context("no kubeconfig and not in a cluster: pass --kubeconfig")?,
    };
    config.connect_timeout = Some(Duration::from_secs(5));
    config.read_timeout = Some(read_timeout);
    let url = config.cluster_url.to_string();
    let client = Client::try_from(config).context("building the Kubernetes client")?;
    client
        .apiserver_version()
        .await
        .with_context(|| format!("{url} ({label}) did not answer"))?;
    Ok(Cluster { client, label, url })
}

/// `ClusterFabric/local`'s status, when the controller calls it Ready.
pub async fn ready_settings(cluster: &Cluster) -> Result<(ClusterFabric, ClusterFabricStatus)> {
    let api: Api<ClusterFabric> = Api::all(cluster.client.clone());
    let fabric = match api.get_opt(CLUSTER_FABRIC_NAME).await {
        Ok(Some(f)) => f,
        Ok(None) => bail!(
            "{}: no ClusterFabric/{CLUSTER_FABRIC_NAME}: is Ligo installed there? (kubectl apply -k manifests/)",
            cluster.url
        ),
        Err(kube::Error::Api(e)) if e.code == 404 => bail!(
            "{}: the ligo.io CRDs are not installed (kubectl apply -k manifests/)",
            cluster.url
        ),
        Err(e) => return Err(e).with_context(|| format!("{}: reading ClusterFabric/{CLUSTER_FABRIC_NAME}", cluster.url)),
    };
    let status = fabric.status.clone().unwrap_or_default();
    if !conditions::is_true(&status.conditions, "Ready") {
        let why = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| format!("{}: {}", c.reason, c.message))
            .unwrap_or_else(|| "no status yet: is ligo-control running there?".into());
        bail!(
            "{}: ClusterFabric/{CLUSTER_FABRIC_NAME} is not Ready ({why})",
            cluster.url
        );
    }
    Ok((fabric, status))
}

/// `✓ what`.
pub fn ok(what: impl std::fmt::Display) {
    println!("✓ {what}");
}
