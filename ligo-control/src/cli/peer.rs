//! `ligo-control peer` and `unpeer`.
//!
//! `peer` checks both clusters first and creates nothing until every check
//! passed; if a later step fails, what this run created is removed again
//! (objects that were there before are left as they were), so a failed
//! peering leaves no half of itself behind.

use std::{
    fmt::Debug,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use k8s_openapi::api::{
    core::v1::{Secret, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use kube::{
    api::{Api, DeleteParams, DynamicObject, Patch, PatchParams},
    discovery::ApiResource,
    Resource,
};
use serde::{de::DeserializeOwned, Serialize};

use super::{connect, ok, ready_settings, Access, Cluster};
use crate::{
    conditions,
    crd::{ClusterFabric, ClusterFabricStatus, OffloadingSpec, Peer},
    peering::{self, credentials_secret_name, IdentityNames, Side},
};

/// The field manager of what the CLI applies.
const CLI_MANAGER: &str = "ligo-control-cli";
/// How long a new ServiceAccount token may take to be issued.
const TOKEN_WAIT: Duration = Duration::from_secs(20);

#[derive(clap::Args, Debug)]
pub struct PeerArgs {
    #[command(flatten)]
    pub local: Access,
    /// The other cluster's kubeconfig.
    #[arg(long, value_name = "FILE")]
    pub remote_kubeconfig: Option<PathBuf>,
    /// The other cluster's kubeconfig context.
    #[arg(long)]
    pub remote_context: Option<String>,
    /// Where the other cluster reaches ours (default: our ClusterFabric's
    /// spec.apiServerURL; never the URL of the kubeconfig used here).
    #[arg(long, value_name = "URL")]
    pub api_server_url: Option<String>,
    /// Where we reach the other cluster (default: its spec.apiServerURL).
    #[arg(long, value_name = "URL")]
    pub remote_api_server_url: Option<String>,
    /// `wireguard` (default) or `plain`.
    #[arg(long)]
    pub transport: Option<String>,
    /// Run pods across: `out` (ours on the other cluster, through a virtual
    /// node here), `in` (its here) or `both`.
    #[arg(long, value_enum)]
    pub offload: Option<OffloadDirection>,
    /// Return once traffic can flow both ways (both Peers Ready).
    #[arg(long)]
    pub wait: bool,
    /// How long `--wait` waits, e.g. 90s or 2m.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Ligo's namespace in both clusters.
    #[arg(long, default_value = "ligo-system")]
    pub namespace: String,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffloadDirection {
    Out,
    In,
    Both,
}

impl OffloadDirection {
    /// The offloading settings of the Peer that `host` keeps for the other
    /// cluster (`host_is_local`: the cluster `peer` was run against).
    fn settings(direction: Option<Self>, host_is_local: bool) -> Option<OffloadingSpec> {
        let direction = direction?;
        let out = matches!(direction, Self::Out | Self::Both);
        let inbound = matches!(direction, Self::In | Self::Both);
        let (consume, provide) = if host_is_local {
            (out, inbound)
        } else {
            (inbound, out)
        };
        Some(OffloadingSpec {
            consume,
            provide,
            ..OffloadingSpec::default()
        })
    }
}

#[derive(clap::Args, Debug)]
pub struct UnpeerArgs {
    #[command(flatten)]
    pub local: Access,
    #[arg(long, value_name = "FILE")]
    pub remote_kubeconfig: Option<PathBuf>,
    #[arg(long)]
    pub remote_context: Option<String>,
    /// The peer's cluster name, when its API server cannot be asked.
    #[arg(long)]
    pub peer: Option<String>,
    /// Remove our side even when the other cluster cannot be reached (a
    /// peer that is gone for good).
    #[arg(long)]
    pub force: bool,
    #[arg(long, default_value = "ligo-system")]
    pub namespace: String,
}

/// `90s`, `2m`, `1h`, or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 90s or 2m"))?;
    let seconds = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{text:?}: the unit is s, m or h")),
    };
    Ok(Duration::from_secs(seconds))
}

/// What this run created, removed again if the run fails.
#[derive(Default)]
struct Undo(Vec<(Api<DynamicObject>, String)>);

impl Undo {
    async fn run(self) {
        for (api, name) in self.0.into_iter().rev() {
            let _ = api.delete(&name, &DeleteParams::default()).await;
        }
    }
}

/// Server-side applies `object` with `api`; records it for undo when it is
/// new.
async fn apply<K>(
    api: &Api<K>,
    erased: Api<DynamicObject>,
    object: &K,
    undo: &mut Undo,
    cluster: &Cluster,
) -> Result<()>
where
    K: Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
{
    let name = object.meta().name.clone().unwrap_or_default();
    let kind = K::kind(&()).into_owned();
    let existed = api
        .get_opt(&name)
        .await
        .with_context(|| format!("{}: reading {kind}/{name}", cluster.url))?
        .is_some();
    api.patch(
        &name,
        &PatchParams::apply(CLI_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .with_context(|| format!("{}: applying {kind}/{name}", cluster.url))?;
    if !existed {
        undo.0.push((erased, name));
    }
    Ok(())
}

fn erased<K: Resource<DynamicType = ()>>(
    cluster: &Cluster,
    namespace: Option<&str>,
) -> Api<DynamicObject> {
    let resource = ApiResource::erase::<K>(&());
    match namespace {
        Some(ns) => Api::namespaced_with(cluster.client.clone(), ns, &resource),
        None => Api::all_with(cluster.client.clone(), &resource),
    }
}

fn side(
    cluster: &Cluster,
    fabric: &ClusterFabric,
    status: &ClusterFabricStatus,
    url_flag: Option<&String>,
    flag: &str,
) -> Result<Side> {
    let name = status
        .cluster_name
        .clone()
        .context("no status.clusterName")?;
    let api_server_url = url_flag
        .cloned()
        .or_else(|| fabric.spec.api_server_url.clone())
        .ok_or_else(|| anyhow!(
            "{}: ClusterFabric/local has no spec.apiServerURL; pass {flag} with the URL the other cluster reaches {name}'s API server at",
            cluster.url
        ))?;
    Ok(Side {
        name,
        id: status.cluster_id.context("no status.clusterId")?,
        pod_cidr: status.pod_cidr.clone().context("no status.podCIDR")?,
        gateway_endpoints: status.gateway_endpoints.clone(),
        wireguard_public_key: status.wireguard_public_key.clone(),
        api_server_url,
    })
}

pub async fn peer(args: PeerArgs) -> Result<()> {
    let started = Instant::now();
    if let Some(t) = &args.transport {
        if t != "wireguard" && t != "plain" {
            bail!("--transport {t:?}: wireguard or plain");
        }
    }
    let a = connect(
        args.local.kubeconfig.as_ref(),
        args.local.context.as_deref(),
    )
    .await?;
    ok(format_args!("{} answers ({})", a.url, a.label));
    let b = connect(
        args.remote_kubeconfig.as_ref(),
        args.remote_context.as_deref(),
    )
    .await?;
    ok(format_args!("{} answers ({})", b.url, b.label));
    let (fabric_a, status_a) = ready_settings(&a).await?;
    let (fabric_b, status_b) = ready_settings(&b).await?;
    let side_a = side(
        &a,
        &fabric_a,
        &status_a,
        args.api_server_url.as_ref(),
        "--api-server-url",
    )?;
    let side_b = side(
        &b,
        &fabric_b,
        &status_b,
        args.remote_api_server_url.as_ref(),
        "--remote-api-server-url",
    )?;
    for (s, c) in [(&side_a, &a), (&side_b, &b)] {
        ok(format_args!(
            "{} is cluster {} (id {}, pods {}, gateways {})",
            c.url,
            s.name,
            s.id,
            s.pod_cidr,
            s.gateway_endpoints.join(", ")
        ));
    }
    if side_a.name == side_b.name {
        bail!(
            "both clusters are named {:?} (is it the same cluster twice?); rename one in its ClusterFabric/local spec.clusterName",
            side_a.name
        );
    }
    if side_a.id == side_b.id {
        bail!(
            "both clusters have id {}; give one another id in its ClusterFabric/local spec.clusterId",
            side_a.id
        );
    }
    ok(format_args!(
        "names and ids differ ({} / {})",
        side_a.name, side_b.name
    ));

    let mut undo = Undo::default();
    match create(&args, &a, &b, &side_a, &side_b, &mut undo).await {
        Ok(()) => {}
        Err(e) => {
            undo.run().await;
            return Err(e.context("peering failed; what this run created was removed again"));
        }
    }
    ok(format_args!(
        "peered {} and {}: identities, credentials and Peers created in both",
        side_a.name, side_b.name
    ));
    if args.wait {
        wait_ready(&a, &b, &side_a, &side_b, args.timeout).await?;
        ok(format_args!(
            "traffic can flow both ways: {} and {} Ready after {:.2} s",
            side_a.name,
            side_b.name,
            started.elapsed().as_secs_f64()
        ));
    }
    Ok(())
}

async fn create(
    args: &PeerArgs,
    a: &Cluster,
    b: &Cluster,
    side_a: &Side,
    side_b: &Side,
    undo: &mut Undo,
) -> Result<()> {
    let ns = args.namespace.as_str();
    // Each cluster's identity for the other.
    for (host, guest) in [(a, side_b), (b, side_a)] {
        let (account, role, binding, token) = peering::identity(ns, &guest.name);
        apply(
            &Api::namespaced(host.client.clone(), ns),
            erased::<ServiceAccount>(host, Some(ns)),
            &account,
            undo,
            host,
        )
        .await?;
        apply(
            &Api::all(host.client.clone()),
            erased::<ClusterRole>(host, None),
            &role,
            undo,
            host,
        )
        .await?;
        apply(
            &Api::all(host.client.clone()),
            erased::<ClusterRoleBinding>(host, None),
            &binding,
            undo,
            host,
        )
        .await?;
        apply(
            &Api::namespaced(host.client.clone(), ns),
            erased::<Secret>(host, Some(ns)),
            &token,
            undo,
            host,
        )
        .await?;
    }
    let (token_a, ca_a) = issued_token(a, ns, &side_b.name).await?;
    let (token_b, ca_b) = issued_token(b, ns, &side_a.name).await?;
    ok(format_args!("each cluster issued a token for the other"));
    // Each cluster's credentials for, and Peer of, the other.
    for (host, remote, token, ca, host_is_local) in [
        (a, side_b, &token_b, &ca_b, true),
        (b, side_a, &token_a, &ca_a, false),
    ] {
        let config = peering::kubeconfig(&remote.name, &remote.api_server_url, ca, token);
        let secret = peering::credentials(ns, &remote.name, &config);
        apply(
            &Api::namespaced(host.client.clone(), ns),
            erased::<Secret>(host, Some(ns)),
            &secret,
            undo,
            host,
        )
        .await?;
        let peer = peering::peer(
            remote,
            ca,
            args.transport.as_deref(),
            OffloadDirection::settings(args.offload, host_is_local),
        );
        apply(
            &Api::all(host.client.clone()),
            erased::<Peer>(host, None),
            &peer,
            undo,
            host,
        )
        .await?;
    }
    Ok(())
}

/// The token and CA the host's token controller put into the identity's
/// token Secret.
async fn issued_token(host: &Cluster, ns: &str, guest: &str) -> Result<(String, Vec<u8>)> {
    let names = IdentityNames::for_guest(guest);
    let api: Api<Secret> = Api::namespaced(host.client.clone(), ns);
    let deadline = Instant::now() + TOKEN_WAIT;
    loop {
        if let Some(secret) = api.get_opt(&names.token_secret).await? {
            let data = secret.data.unwrap_or_default();
            if let (Some(token), Some(ca)) = (data.get("token"), data.get("ca.crt")) {
                let token =
                    String::from_utf8(token.0.clone()).context("a token that is not text")?;
                return Ok((token, ca.0.clone()));
            }
        }
        if Instant::now() > deadline {
            bail!(
                "{}: no token in Secret {ns}/{} after {} s: is kube-controller-manager running there with --service-account-private-key-file?",
                host.url,
                names.token_secret,
                TOKEN_WAIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_ready(
    a: &Cluster,
    b: &Cluster,
    side_a: &Side,
    side_b: &Side,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut waiting = Vec::new();
        for (host, remote) in [(a, side_b), (b, side_a)] {
            let peer = Api::<Peer>::all(host.client.clone())
                .get_opt(&remote.name)
                .await?;
            let conditions = peer
                .and_then(|p| p.status)
                .map(|s| s.conditions)
                .unwrap_or_default();
            if !conditions::is_true(&conditions, "Ready") {
                let failing: Vec<String> = conditions
                    .iter()
                    .filter(|c| c.status != "True" && c.type_ != "Ready")
                    .map(|c| format!("{} {}: {}", c.type_, c.reason, c.message))
                    .collect();
                waiting.push(format!(
                    "{}'s Peer/{}: {}",
                    host.url,
                    remote.name,
                    failing.join("; ")
                ));
            }
        }
        if waiting.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "not Ready after {} s (gateways {} / {}):\n  {}",
                timeout.as_secs(),
                endpoints(side_a),
                endpoints(side_b),
                waiting.join("\n  ")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn endpoints(side: &Side) -> String {
    side.gateway_endpoints
        .iter()
        .map(|e| format!("udp://{e}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub async fn unpeer(args: UnpeerArgs) -> Result<()> {
    let a = connect(
        args.local.kubeconfig.as_ref(),
        args.local.context.as_deref(),
    )
    .await?;
    ok(format_args!("{} answers ({})", a.url, a.label));
    let (_, status_a) = ready_or_named(&a).await?;
    let name_a = status_a
        .cluster_name
        .clone()
        .context("our ClusterFabric has no status.clusterName")?;
    let remote = if args.remote_kubeconfig.is_some() || args.remote_context.is_some() {
        connect(
            args.remote_kubeconfig.as_ref(),
            args.remote_context.as_deref(),
        )
        .await
    } else {
        Err(anyhow!("no --remote-kubeconfig or --remote-context given"))
    };
    let (b, name_b) = match (remote, &args.peer) {
        (Ok(b), _) => {
            let (_, status_b) = ready_or_named(&b).await?;
            let name_b = status_b.cluster_name.context("the remote ClusterFabric has no status.clusterName")?;
            if let Some(p) = &args.peer {
                if *p != name_b {
                    bail!("--peer {p} but the remote cluster is named {name_b}");
                }
            }
            (Some(b), name_b)
        }
        (Err(e), Some(name)) if args.force => {
            println!("⚠ the remote cluster cannot be reached ({e:#}); --force: removing {name_a}'s side only");
            (None, name.clone())
        }
        (Err(e), _) => bail!(
            "{e:#}; nothing was removed. If the peer is gone for good: unpeer --peer NAME --force removes our side only"
        ),
    };
    let ns = args.namespace.as_str();
    // Peers first (the daemons stop using them), then credentials, then
    // identities; each delete is idempotent.
    let mut sides = vec![(&a, name_b.as_str())];
    if let Some(b) = &b {
        sides.push((b, name_a.as_str()));
    }
    // The namespaces each side offloaded to the other (their read access
    // goes once no peer offloads them).
    let mut offloaded = Vec::new();
    for (host, remote) in &sides {
        let peer = Api::<Peer>::all(host.client.clone())
            .get_opt(remote)
            .await
            .ok()
            .flatten();
        let namespaces = peer
            .and_then(|p| p.spec.offloading)
            .map(|o| o.namespaces)
            .unwrap_or_default();
        offloaded.push(namespaces);
    }
    for (host, remote) in &sides {
        delete(erased::<Peer>(host, None), remote, host).await?;
    }
    for ((host, _), namespaces) in sides.iter().zip(&offloaded) {
        super::offload::drop_unused_read_access(host, namespaces).await?;
    }
    for (host, remote) in &sides {
        delete(
            erased::<Secret>(host, Some(ns)),
            &credentials_secret_name(remote),
            host,
        )
        .await?;
    }
    for (host, guest) in &sides {
        let names = IdentityNames::for_guest(guest);
        delete(erased::<ClusterRoleBinding>(host, None), &names.role, host).await?;
        delete(erased::<ClusterRole>(host, None), &names.role, host).await?;
        delete(erased::<Secret>(host, Some(ns)), &names.token_secret, host).await?;
        delete(
            erased::<ServiceAccount>(host, Some(ns)),
            &names.service_account,
            host,
        )
        .await?;
    }
    ok(format_args!(
        "unpeered {name_a} and {name_b}: nothing of the peering is left"
    ));
    Ok(())
}

/// The settings' status (Ready or not: unpeering must work either way).
async fn ready_or_named(cluster: &Cluster) -> Result<(ClusterFabric, ClusterFabricStatus)> {
    let fabric = Api::<ClusterFabric>::all(cluster.client.clone())
        .get_opt(crate::cluster::CLUSTER_FABRIC_NAME)
        .await
        .with_context(|| format!("{}: reading ClusterFabric/local", cluster.url))?
        .with_context(|| format!("{}: no ClusterFabric/local", cluster.url))?;
    let status = fabric.status.clone().unwrap_or_default();
    Ok((fabric, status))
}

async fn delete(api: Api<DynamicObject>, name: &str, host: &Cluster) -> Result<()> {
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e).with_context(|| format!("{}: deleting {name}", host.url)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_kubectl_writes_them() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("15"), Ok(Duration::from_secs(15)));
        assert!(parse_duration("2d").is_err());
        assert!(parse_duration("m").is_err());
    }
}
