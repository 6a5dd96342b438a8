//! What the control-plane tests do to a [`ControlPlane`]: install the
//! CRDs, add hand-made Nodes, run `ligo-control`, read conditions.

use std::time::Duration;

use anyhow::{Context, Result};

use crate::{control_binary, kube::ControlPlane, workspace_root};

/// How long a condition may take to turn.
pub const CONDITION_WAIT: Duration = Duration::from_secs(30);

impl ControlPlane {
    /// `manifests/crds` applied and Established, and `ligo-system`.
    pub fn install_crds(&self) -> Result<()> {
        let crds = workspace_root().join("manifests/crds");
        self.kubectl(&["apply", "-k", &crds.to_string_lossy()])?;
        self.wait_crds_established()?;
        self.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: ligo-system}\n")?;
        Ok(())
    }

    /// Waits until the API server serves Ligo's CRDs.
    pub fn wait_crds_established(&self) -> Result<()> {
        self.kubectl(&[
            "wait",
            "--for",
            "condition=Established",
            "crd/clusterfabrics.ligo.io",
            "crd/peers.ligo.io",
            "crd/nodefabrics.ligo.io",
            "--timeout",
            &format!("{}s", CONDITION_WAIT.as_secs()),
        ])
        .map(drop)
    }

    /// Every object a peering with `remote` leaves here (`kind/name`).
    pub fn peering_objects(&self, remote: &str) -> Vec<String> {
        let mut left = Vec::new();
        for (kind, name, namespaced) in [
            ("peer", remote.to_owned(), false),
            ("secret", format!("ligo-credentials-{remote}"), true),
            ("serviceaccount", format!("ligo-peer-{remote}"), true),
            ("secret", format!("ligo-peer-{remote}-token"), true),
            ("clusterrole", format!("ligo-peer-{remote}"), false),
            ("clusterrolebinding", format!("ligo-peer-{remote}"), false),
        ] {
            let mut args = vec!["get", kind, &name, "--ignore-not-found", "-o", "name"];
            if namespaced {
                args.extend(["-n", "ligo-system"]);
            }
            if !self.kubectl(&args).unwrap_or_default().trim().is_empty() {
                left.push(format!("{kind}/{name}"));
            }
        }
        left
    }

    /// A Node object (no kubelet) with pod CIDR `slice` and InternalIP
    /// `ip`, labelled a gateway when `gateway`.
    pub fn add_node(&self, name: &str, slice: &str, ip: &str, gateway: bool) -> Result<()> {
        let labels = if gateway {
            "{ligo.io/gateway: \"\"}"
        } else {
            "{}"
        };
        self.apply(&format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {labels}}}\nspec: {{podCIDR: \"{slice}\", podCIDRs: [\"{slice}\"]}}\n"
        ))?;
        self.set_node_address(name, ip)
    }

    /// Sets a Node's InternalIP and, when given, its ExternalIP (as a
    /// kubelet or cloud provider reports them).
    pub fn set_node_addresses(
        &self,
        name: &str,
        internal: &str,
        external: Option<&str>,
    ) -> Result<()> {
        let mut addresses = format!("{{\"type\":\"InternalIP\",\"address\":\"{internal}\"}}");
        if let Some(external) = external {
            addresses.push_str(&format!(
                ",{{\"type\":\"ExternalIP\",\"address\":\"{external}\"}}"
            ));
        }
        self.kubectl(&[
            "patch",
            "node",
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            &format!("{{\"status\":{{\"addresses\":[{addresses}]}}}}"),
        ])
        .map(drop)
    }

    /// Sets a Node's InternalIP (as a kubelet reports it).
    pub fn set_node_address(&self, name: &str, ip: &str) -> Result<()> {
        self.set_node_addresses(name, ip, None)
    }

    /// `ligo-control run` against this cluster, as process `ligo-control`.
    pub fn start_controller(&mut self) -> Result<()> {
        let kubeconfig = self.kubeconfig.to_string_lossy().into_owned();
        self.start_process(
            "ligo-control",
            &control_binary(),
            &[
                "run",
                "--kubeconfig",
                &kubeconfig,
                "--namespace",
                "ligo-system",
            ],
        )
    }

    /// Condition `type_` of `kind/name`: (status, reason, message).
    pub fn condition(
        &self,
        kind: &str,
        name: &str,
        type_: &str,
    ) -> Option<(String, String, String)> {
        let field = |f: &str| format!("{{.status.conditions[?(@.type==\"{type_}\")].{f}}}");
        let out = self
            .jsonpath(
                kind,
                name,
                &format!(
                    "{}|{}|{}",
                    field("status"),
                    field("reason"),
                    field("message")
                ),
            )
            .ok()?;
        let mut parts = out.splitn(3, '|');
        let status = parts.next()?.to_owned();
        if status.is_empty() {
            return None;
        }
        Some((status, parts.next()?.to_owned(), parts.next()?.to_owned()))
    }

    /// Waits until condition `type_` of `kind/name` is `status`; returns
    /// its reason and message.
    pub fn wait_condition(
        &self,
        kind: &str,
        name: &str,
        type_: &str,
        status: &str,
    ) -> Result<(String, String)> {
        self.wait_for(
            &format!("{kind}/{name} {type_}={status}"),
            CONDITION_WAIT,
            || {
                Ok(self
                    .condition(kind, name, type_)
                    .filter(|(s, _, _)| s == status)
                    .map(|(_, reason, message)| (reason, message)))
            },
        )
        .with_context(|| format!("waiting on {kind}/{name}"))
    }
}
