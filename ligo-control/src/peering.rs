//! What peering two clusters creates, as pure functions of what each side
//! says about itself: in each cluster an identity for the other (a
//! ServiceAccount whose role reads our settings and its own `Peer`, and
//! nothing else), and the other's credentials and `Peer`. `ligo-control
//! peer` applies these; applying the same objects by hand peers too.

use std::collections::BTreeMap;

use base64::{engine::general_purpose::STANDARD, Engine as _};
use k8s_openapi::{
    api::{
        core::v1::{Secret, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject},
    },
    ByteString,
};
use kube::api::ObjectMeta;

use crate::{
    cluster::CLUSTER_FABRIC_NAME,
    controller::FIELD_MANAGER,
    crd::{ApiServer, OffloadingSpec, Peer, PeerSpec},
};

/// Every object peering makes carries these labels.
pub const PEER_LABEL: &str = "ligo.io/peer";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// One side of a peering, as its `ClusterFabric` status and the operator
/// describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Side {
    pub name: String,
    pub id: u32,
    pub pod_cidr: String,
    pub gateway_endpoints: Vec<String>,
    pub wireguard_public_key: Option<String>,
    /// Where the other side reaches this side's API server.
    pub api_server_url: String,
}

/// The identity cluster `host` keeps for `guest`: its objects' names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityNames {
    pub service_account: String,
    pub token_secret: String,
    pub role: String,
}

impl IdentityNames {
    pub fn for_guest(guest: &str) -> Self {
        let base = format!("ligo-peer-{guest}");
        Self {
            token_secret: format!("{base}-token"),
            service_account: base.clone(),
            role: base,
        }
    }
}

/// The Secret in one cluster that holds the credentials for `remote`.
pub fn credentials_secret_name(remote: &str) -> String {
    format!("ligo-credentials-{remote}")
}

fn meta(name: &str, namespace: Option<&str>, guest: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespace.map(str::to_owned),
        labels: Some(BTreeMap::from([
            (PEER_LABEL.to_owned(), guest.to_owned()),
            (MANAGED_BY_LABEL.to_owned(), FIELD_MANAGER.to_owned()),
        ])),
        ..ObjectMeta::default()
    }
}

/// The objects that let `guest` read what it needs of the host cluster:
/// `ClusterFabric/local` and its own `Peer` (named after it), `get` only.
pub fn identity(
    namespace: &str,
    guest: &str,
) -> (ServiceAccount, ClusterRole, ClusterRoleBinding, Secret) {
    let names = IdentityNames::for_guest(guest);
    let account = ServiceAccount {
        metadata: meta(&names.service_account, Some(namespace), guest),
        ..ServiceAccount::default()
    };
    let rule = |resource: &str, name: &str| PolicyRule {
        api_groups: Some(vec!["ligo.io".into()]),
        resources: Some(vec![resource.into()]),
        resource_names: Some(vec![name.into()]),
        verbs: vec!["get".into()],
        ..PolicyRule::default()
    };
    let role = ClusterRole {
        metadata: meta(&names.role, None, guest),
        rules: Some(vec![
            rule("clusterfabrics", CLUSTER_FABRIC_NAME),
            rule("peers", guest),
        ]),
        ..ClusterRole::default()
    };
    let binding = ClusterRoleBinding {
        metadata: meta(&names.role, None, guest),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name: names.role.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: names.service_account.clone(),
            namespace: Some(namespace.into()),
            ..Subject::default()
        }]),
    };
    let mut token_meta = meta(&names.token_secret, Some(namespace), guest);
    token_meta.annotations = Some(BTreeMap::from([(
        "kubernetes.io/service-account.name".to_owned(),
        names.service_account.clone(),
    )]));
    let token = Secret {
        metadata: token_meta,
        type_: Some("kubernetes.io/service-account-token".into()),
        ..Secret::default()
    };
    (account, role, binding, token)
}

/// A kubeconfig that reaches `url` with `token`, trusting `ca_pem` only.
pub fn kubeconfig(cluster: &str, url: &str, ca_pem: &[u8], token: &str) -> String {
    let ca = STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: {cluster}
  cluster:
    server: {url}
    certificate-authority-data: {ca}
users:
- name: ligo-peer
  user:
    token: {token}
contexts:
- name: {cluster}
  context:
    cluster: {cluster}
    user: ligo-peer
current-context: {cluster}
"
    )
}

/// The Secret in `host` holding `kubeconfig` for `remote`.
pub fn credentials(namespace: &str, remote: &str, kubeconfig: &str) -> Secret {
    Secret {
        metadata: meta(&credentials_secret_name(remote), Some(namespace), remote),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            crate::controller::KUBECONFIG_FIELD.to_owned(),
            ByteString(kubeconfig.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    }
}

/// The `Peer` one cluster keeps for `remote` (its view left empty: the
/// host's controller allocates it).
pub fn peer(
    remote: &Side,
    ca_pem: &[u8],
    transport: Option<&str>,
    offloading: Option<OffloadingSpec>,
) -> Peer {
    let mut peer = Peer::new(
        &remote.name,
        PeerSpec {
            cluster_name: remote.name.clone(),
            cluster_id: remote.id,
            pod_cidr: remote.pod_cidr.clone(),
            gateway_endpoints: remote.gateway_endpoints.clone(),
            wireguard_public_key: remote.wireguard_public_key.clone(),
            api_server: Some(ApiServer {
                url: remote.api_server_url.clone(),
                ca_bundle: Some(STANDARD.encode(ca_pem)),
                credentials_secret: credentials_secret_name(&remote.name),
            }),
            transport: transport.map(str::to_owned),
            view: None,
            offloading,
        },
    );
    peer.metadata.labels = meta(&remote.name, None, &remote.name).labels;
    peer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_may_get_our_settings_and_its_own_peer_and_nothing_else() {
        let (account, role, binding, token) = identity("ligo-system", "b");
        assert_eq!(account.metadata.name.as_deref(), Some("ligo-peer-b"));
        let rules = role.rules.expect("rules");
        assert_eq!(rules.len(), 2);
        for rule in &rules {
            assert_eq!(rule.verbs, ["get"], "read only, one object each");
            assert_eq!(
                rule.api_groups.as_deref(),
                Some(&["ligo.io".to_string()][..])
            );
        }
        assert_eq!(
            rules[0].resource_names.as_deref(),
            Some(&["local".to_string()][..])
        );
        assert_eq!(
            rules[1].resources.as_deref(),
            Some(&["peers".to_string()][..])
        );
        assert_eq!(
            rules[1].resource_names.as_deref(),
            Some(&["b".to_string()][..])
        );
        let subject = &binding.subjects.expect("subjects")[0];
        assert_eq!(
            (subject.name.as_str(), subject.namespace.as_deref()),
            ("ligo-peer-b", Some("ligo-system"))
        );
        assert_eq!(binding.role_ref.name, "ligo-peer-b");
        assert_eq!(
            token.metadata.annotations.expect("annotations")["kubernetes.io/service-account.name"],
            "ligo-peer-b"
        );
    }

    #[test]
    fn the_peer_names_the_remote_and_trusts_only_its_ca() {
        let remote = Side {
            name: "b".into(),
            id: 2,
            pod_cidr: "10.244.0.0/16".into(),
            gateway_endpoints: vec!["203.0.113.2:51820".into()],
            wireguard_public_key: Some("k".into()),
            api_server_url: "https://203.0.113.2:6443".into(),
        };
        let p = peer(&remote, b"PEM", None, None);
        assert_eq!(p.metadata.name.as_deref(), Some("b"));
        assert_eq!(p.spec.view, None);
        let api = p.spec.api_server.expect("apiServer");
        assert_eq!(api.credentials_secret, "ligo-credentials-b");
        assert_eq!(api.ca_bundle.as_deref(), Some("UEVN"));
        let config = kubeconfig("b", &api.url, b"PEM", "tok");
        assert!(config.contains("server: https://203.0.113.2:6443"));
        assert!(config.contains("certificate-authority-data: UEVN"));
        assert!(config.contains("token: tok"));
    }
}
