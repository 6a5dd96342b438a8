//! What each peer's API server says: one task per `Peer` with
//! `spec.apiServer`, polling the remote's `ClusterFabric/local` and its
//! `Peer` for us with the credentials from our Secret. The URL is always
//! the one in the spec (never the credentials' kubeconfig's), the CA the
//! spec's bundle when given.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use kube::{
    api::Api,
    config::{KubeConfigOptions, Kubeconfig},
    Client, Config,
};
use tokio::{sync::Notify, task::JoinHandle};

use crate::{
    crd::{ClusterFabric, Peer},
    peer::{Remote, RemoteFacts},
};

/// The data key of a credentials Secret.
pub const KUBECONFIG_FIELD: &str = "kubeconfig";
/// Polls while all is well; faster while it is not.
const POLL_OK: Duration = Duration::from_secs(10);
/// Until the remote answers with its view of us.
const POLL_FAILING: Duration = Duration::from_secs(2);

/// Everything a task's result depends on: a change restarts the task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub url: String,
    pub ca_bundle: Option<String>,
    /// The credentials Secret's kubeconfig, or why it is unusable.
    pub kubeconfig: Result<String, String>,
    /// Our cluster name: the remote's `Peer` for us is named so.
    pub our_name: String,
    /// Offloading is configured: poll often (namespace grants and offers
    /// travel this way).
    pub fast: bool,
}

struct Task {
    target: Target,
    state: Arc<Mutex<Remote>>,
    handle: JoinHandle<()>,
}

impl Drop for Task {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

pub struct Remotes {
    wake: Arc<Notify>,
    tasks: Mutex<BTreeMap<String, Task>>,
}

impl Remotes {
    pub fn new(wake: Arc<Notify>) -> Self {
        Self {
            wake,
            tasks: Mutex::new(BTreeMap::new()),
        }
    }

    /// The last answer for peer `name` (starting or restarting its task
    /// when `target` changed).
    pub fn observe(&self, name: &str, target: Option<Target>) -> Remote {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        let Some(target) = target else {
            tasks.remove(name);
            return Remote::NotConfigured;
        };
        if let Some(task) = tasks.get(name) {
            if task.target == target {
                return task.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
            }
        }
        let initial = match &target.kubeconfig {
            Ok(_) => Remote::Unreachable(format!("{} not asked yet", target.url)),
            Err(why) => Remote::CredentialsUnusable(why.clone()),
        };
        let state = Arc::new(Mutex::new(initial.clone()));
        let handle = tokio::spawn(poll(target.clone(), state.clone(), self.wake.clone()));
        tasks.insert(
            name.to_owned(),
            Task {
                target,
                state,
                handle,
            },
        );
        initial
    }

    /// Stops the tasks of peers that are gone.
    pub fn retain(&self, names: &BTreeSet<String>) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|name, _| names.contains(name));
    }
}

async fn poll(target: Target, state: Arc<Mutex<Remote>>, wake: Arc<Notify>) {
    let client = match &target.kubeconfig {
        Ok(text) => client_for(&target, text, READ_TIMEOUT).await,
        Err(why) => Err(why.clone()),
    };
    loop {
        let answer = match &client {
            Ok(client) => read(client, &target).await,
            Err(why) => Remote::CredentialsUnusable(why.clone()),
        };
        // Settled once the remote answers and has allocated its view of us
        // (right after peering it has not yet: look again soon).
        let good = matches!(&answer, Remote::Read(facts) if facts.view_of_us.is_some());
        let changed = {
            let mut last = state.lock().unwrap_or_else(|p| p.into_inner());
            let changed = *last != answer;
            *last = answer;
            changed
        };
        if changed {
            wake.notify_one();
        }
        if client.is_err() {
            return;
        }
        let interval = if good && !target.fast {
            POLL_OK
        } else {
            POLL_FAILING
        };
        tokio::time::sleep(interval).await;
    }
}

/// A read of the remote's objects must answer within this.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A client for the remote, or why the credentials cannot make one.
pub async fn client_for(
    target: &Target,
    kubeconfig: &str,
    read_timeout: Duration,
) -> Result<Client, String> {
    let unusable = |why: String| why;
    let parsed = Kubeconfig::from_yaml(kubeconfig).map_err(|e| {
        unusable(format!(
            "the credentials Secret's kubeconfig does not parse: {e}"
        ))
    })?;
    let mut config = Config::from_custom_kubeconfig(parsed, &KubeConfigOptions::default())
        .await
        .map_err(|e| {
            unusable(format!(
                "the credentials Secret's kubeconfig is unusable: {e}"
            ))
        })?;
    config.cluster_url = target
        .url
        .parse()
        .map_err(|e| unusable(format!("spec.apiServer.url {:?}: {e}", target.url)))?;
    if let Some(bundle) = &target.ca_bundle {
        config.root_cert = Some(pem_certificates(bundle).map_err(unusable)?);
    }
    config.connect_timeout = Some(Duration::from_secs(3));
    config.read_timeout = Some(read_timeout);
    Client::try_from(config).map_err(|e| unusable(format!("cannot build a client: {e}")))
}

async fn read(client: &Client, target: &Target) -> Remote {
    let fabrics: Api<ClusterFabric> = Api::all(client.clone());
    let peers: Api<Peer> = Api::all(client.clone());
    let fabric = match fabrics.get_opt(crate::cluster::CLUSTER_FABRIC_NAME).await {
        Ok(f) => f,
        Err(e) => return classify(&target.url, e),
    };
    let ours = match peers.get_opt(&target.our_name).await {
        Ok(p) => p,
        Err(e) => return classify(&target.url, e),
    };
    let status = fabric.and_then(|f| f.status).unwrap_or_default();
    let (offloading, offloading_status) = match &ours {
        Some(p) => (
            p.spec.offloading.clone(),
            p.status.as_ref().and_then(|s| s.offloading.clone()),
        ),
        None => (None, None),
    };
    Remote::Read(Box::new(RemoteFacts {
        offloading,
        offloading_status,
        cluster_name: status.cluster_name,
        cluster_id: status.cluster_id,
        pod_cidr: status.pod_cidr,
        gateway_endpoints: status.gateway_endpoints,
        wireguard_public_key: status.wireguard_public_key,
        view_of_us: ours.and_then(|p| p.spec.view),
    }))
}

fn classify(url: &str, error: kube::Error) -> Remote {
    match error {
        kube::Error::Api(status) if status.code == 401 || status.code == 403 => {
            Remote::Refused(format!(
                "{url} refused our credentials ({} {}): {}",
                status.code, status.reason, status.message
            ))
        }
        kube::Error::Api(status) => Remote::Refused(format!(
            "{url} answered {} {}: {}",
            status.code, status.reason, status.message
        )),
        other => Remote::Unreachable(format!("{url} did not answer: {other}")),
    }
}

/// The DER certificates of a PEM bundle (given base64-encoded, as
/// `certificate-authority-data` is).
fn pem_certificates(bundle_base64: &str) -> Result<Vec<Vec<u8>>, String> {
    let pem = STANDARD
        .decode(bundle_base64.trim())
        .map_err(|_| "spec.apiServer.caBundle is not base64".to_owned())?;
    let pem =
        String::from_utf8(pem).map_err(|_| "spec.apiServer.caBundle is not PEM".to_owned())?;
    let mut certificates = Vec::new();
    let mut body: Option<String> = None;
    for line in pem.lines().map(str::trim) {
        match (line, &mut body) {
            ("-----BEGIN CERTIFICATE-----", None) => body = Some(String::new()),
            ("-----END CERTIFICATE-----", Some(b)) => {
                let der = STANDARD.decode(b.as_bytes()).map_err(|_| {
                    "spec.apiServer.caBundle holds a malformed certificate".to_owned()
                })?;
                certificates.push(der);
                body = None;
            }
            (text, Some(b)) => b.push_str(text),
            _ => {}
        }
    }
    if certificates.is_empty() {
        return Err("spec.apiServer.caBundle holds no PEM certificate".into());
    }
    Ok(certificates)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pem_bundle_yields_each_certificate() {
        let pem = "junk\n-----BEGIN CERTIFICATE-----\nAQID\nBA==\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nBQY=\n-----END CERTIFICATE-----\n";
        let certs = pem_certificates(&STANDARD.encode(pem)).expect("two");
        assert_eq!(certs, vec![vec![1, 2, 3, 4], vec![5, 6]]);
        assert!(pem_certificates(&STANDARD.encode("nothing")).is_err());
        assert!(pem_certificates("%%%").is_err());
    }
}
