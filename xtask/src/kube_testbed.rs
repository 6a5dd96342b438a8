//! The two-cluster testbed ([`Testbed`]) run by Kubernetes: per cluster a
//! real control plane (etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler) on the cluster's underlay, `kubectl apply -k manifests/`
//! for real, Node objects for the testbed's gateway and nodes, and Ligo's
//! controller, fabric daemons and tunnel started from the pod templates the
//! API server holds ([`crate::workloads`]). Peering is `ligo-control peer`.

use std::{
    net::Ipv4Addr,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    control_binary,
    kube::{ControlPlane, ControlPlaneOptions},
    lab::Lab,
    testbed::{ClusterPlan, Scenario, Testbed},
    workloads::Placement,
    workspace_root,
};

/// The underlay host number the API server holds on each cluster's bridge.
const APISERVER_HOST: u8 = 240;
/// A second view pool block, for a cluster with two peers whose real CIDRs
/// both collide (the three-cluster tests); the first block is the plan's
/// `view_of_peer`.
pub const SPARE_POOL: &str = "10.247.0.0/16";
/// The testbed's hosts: (name, underlay host number).
pub const HOSTS: [(&str, u8); 3] = [("gw", 1), ("n1", 11), ("n2", 12)];

pub struct KubeTestbed {
    /// Dropped first (fields drop in order): the daemons then find no API
    /// server, which they tolerate, while the lab removes them.
    pub clusters: Vec<ControlPlane>,
    pub bed: Testbed,
}

impl KubeTestbed {
    /// Namespaces, both control planes, the manifests applied, the Nodes and
    /// `ClusterFabric/local` (name, id, pod CIDR, a view pool holding the
    /// scenario's view of the other cluster, the API server URL peers use).
    /// `index` picks the control planes' link-local /30s (index, index+1).
    pub fn up(prefix: &str, scenario: Scenario, index: u8) -> Result<Self> {
        Self::up_with(prefix, scenario, index, |_, _| {})
    }

    /// [`Self::up`], with each cluster's control plane options adjusted by
    /// `adjust(cluster index, options)`.
    pub fn up_with(
        prefix: &str,
        scenario: Scenario,
        index: u8,
        adjust: impl Fn(usize, &mut ControlPlaneOptions),
    ) -> Result<Self> {
        let bed = Testbed::up(prefix, scenario)?;
        let mut clusters = Vec::new();
        for (i, plan) in bed.scenario.plans().into_iter().enumerate() {
            let apiserver = plan.underlay_ip(APISERVER_HOST);
            let mut options = ControlPlaneOptions {
                controllers: true,
                cluster_cidr: plan.pod_cidr.to_string(),
                extra_addresses: vec![apiserver],
                ..ControlPlaneOptions::new(index + i as u8)
            };
            adjust(i, &mut options);
            let cp = ControlPlane::start(&format!("{prefix}-{}", plan.name), &options)?;
            cp.attach(&bed.ns(plan, "ul"), apiserver)?;
            install(&cp, plan).with_context(|| format!("installing Ligo in {}", plan.name))?;
            clusters.push(cp);
        }
        Ok(Self { clusters, bed })
    }

    /// Every cluster's plan, in the order of [`Self::clusters`].
    pub fn plans(&self) -> Vec<ClusterPlan> {
        self.bed.scenario.plans().into_iter().cloned().collect()
    }

    /// Starts the controller, then every fabric daemon and the tunnel, each
    /// from its workload's pod template, and waits until each is ready.
    pub fn start_ligo(&mut self) -> Result<()> {
        for (i, plan) in self.plans().iter().enumerate() {
            self.start_controller(i)?;
            let cp = &self.clusters[i];
            cp.wait_condition("clusterfabric", "local", "Ready", "True")?;
            // The gateway key Secret exists once the ClusterFabric is Ready.
            for (host, _) in HOSTS {
                self.start_daemon(plan, host)?;
            }
            self.start_tunnel(plan)?;
        }
        Ok(())
    }

    /// `ligo-control run` as the Deployment's pod template says, as process
    /// `<cluster>-control` (in the root namespace: it reaches its own API
    /// server and the other's over the link-local veths).
    pub fn start_controller(&mut self, cluster: usize) -> Result<()> {
        let cp = &self.clusters[cluster];
        let name = self.plans()[cluster].name;
        let workload = cp.workload("deployment", "ligo-control", "control")?;
        workload.start(
            cp,
            &mut self.bed.lab,
            &Placement {
                node: "gw",
                netns: None,
                apiserver: link_local(cp)?,
            },
            &format!("{name}-control"),
        )
    }

    /// The `ligo-fabric` DaemonSet's container on `host`, as process `<ns>`;
    /// waits until it reports ready.
    pub fn start_daemon(&mut self, plan: &ClusterPlan, host: &str) -> Result<()> {
        self.spawn_daemon(plan, host)?;
        self.bed
            .lab
            .wait_for_log(&self.bed.ns(plan, host), "fabric ready")
    }

    /// Like [`Self::start_daemon`], without waiting.
    pub fn spawn_daemon(&mut self, plan: &ClusterPlan, host: &str) -> Result<()> {
        let cp = &self.clusters[self.index_of(plan)];
        let ns = self.bed.ns(plan, host);
        let workload = cp.workload("daemonset", "ligo-fabric", "fabric")?;
        workload.start(
            cp,
            &mut self.bed.lab,
            &Placement {
                node: host,
                netns: Some(&ns),
                apiserver: plan.underlay_ip(APISERVER_HOST),
            },
            &ns,
        )
    }

    /// The `ligo-tunnel` DaemonSet's container on the gateway.
    pub fn start_tunnel(&mut self, plan: &ClusterPlan) -> Result<()> {
        let cp = &self.clusters[self.index_of(plan)];
        let ns = self.bed.ns(plan, "gw");
        let workload = cp.workload("daemonset", "ligo-tunnel", "tunnel")?;
        workload.start(
            cp,
            &mut self.bed.lab,
            &Placement {
                node: "gw",
                netns: Some(&ns),
                apiserver: plan.underlay_ip(APISERVER_HOST),
            },
            &Lab::tunnel_process(&ns),
        )
    }

    /// Cuts (or restores) the path between a cluster's nodes and its API
    /// server; the root namespace keeps reaching it over link-local, as an
    /// operator would from outside.
    pub fn partition(&self, cluster: usize, cut: bool) -> Result<()> {
        let state = if cut { "down" } else { "up" };
        crate::netns::ip(&[
            "-n",
            &self.clusters[cluster].netns,
            "link",
            "set",
            "ul0",
            state,
        ])
        .map(drop)
    }

    /// `ligo-fabric inspect maps -o json` of the daemon on `host`.
    pub fn inspect(&self, plan: &ClusterPlan, host: &str) -> Result<serde_json::Value> {
        let ns = self.bed.ns(plan, host);
        let pins = self.bed.lab.pin_dir(&ns).join("ligo");
        let out = crate::netns::run(
            &crate::daemon_binary().to_string_lossy(),
            &[
                "inspect",
                "maps",
                "--pin-dir",
                &pins.to_string_lossy(),
                "-o",
                "json",
            ],
        )?;
        serde_json::from_str(&out).context("inspect printed invalid JSON")
    }

    fn index_of(&self, plan: &ClusterPlan) -> usize {
        self.plans()
            .iter()
            .position(|p| p.name == plan.name)
            .unwrap_or_default()
    }

    /// `ligo-control ARGS`: (succeeded, stdout + stderr).
    pub fn ligo_control(args: &[&str]) -> Result<(bool, String)> {
        let out = Command::new(control_binary())
            .args(args)
            .output()
            .context("running ligo-control")?;
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        Ok((out.status.success(), text))
    }

    /// Creates namespace `ns` in `cp` and offloads it with `ligo-control
    /// offload namespace NS --wait`; returns its output.
    pub fn offload_namespace(cp: &ControlPlane, ns: &str) -> Result<String> {
        cp.kubectl(&["create", "namespace", ns])?;
        let kubeconfig = cp.kubeconfig.to_string_lossy().into_owned();
        let (ok, out) = Self::ligo_control(&[
            "offload",
            "namespace",
            ns,
            "--wait",
            "--kubeconfig",
            &kubeconfig,
        ])?;
        if !ok {
            bail!("ligo-control offload namespace {ns} failed:\n{out}");
        }
        Ok(out)
    }

    /// `ligo-control peer --wait` from A's side; returns its output and how
    /// long it took.
    pub fn peer(&self) -> Result<(String, Duration)> {
        self.peer_with(&["--wait", "--timeout", "60s"])
    }

    /// `ligo-control peer EXTRA…` from A's side.
    pub fn peer_with(&self, extra: &[&str]) -> Result<(String, Duration)> {
        self.peer_between(0, 1, extra)
    }

    /// `ligo-control peer EXTRA…` between clusters `local` and `remote`.
    pub fn peer_between(
        &self,
        local: usize,
        remote: usize,
        extra: &[&str],
    ) -> Result<(String, Duration)> {
        let (a, b) = self.kubeconfigs(local, remote);
        let started = Instant::now();
        let mut args = vec!["peer", "--kubeconfig", &a, "--remote-kubeconfig", &b];
        args.extend_from_slice(extra);
        let (ok, out) = Self::ligo_control(&args)?;
        let took = started.elapsed();
        if !ok {
            bail!("ligo-control peer failed:\n{out}\n{}", self.logs());
        }
        Ok((out, took))
    }

    /// `ligo-control unpeer` from A's side.
    pub fn unpeer(&self) -> Result<(String, Duration)> {
        self.unpeer_between(0, 1)
    }

    /// `ligo-control unpeer` between clusters `local` and `remote`.
    pub fn unpeer_between(&self, local: usize, remote: usize) -> Result<(String, Duration)> {
        let (a, b) = self.kubeconfigs(local, remote);
        let started = Instant::now();
        let (ok, out) =
            Self::ligo_control(&["unpeer", "--kubeconfig", &a, "--remote-kubeconfig", &b])?;
        let took = started.elapsed();
        if !ok {
            bail!("ligo-control unpeer failed:\n{out}\n{}", self.logs());
        }
        Ok((out, took))
    }

    fn kubeconfigs(&self, local: usize, remote: usize) -> (String, String) {
        (
            self.clusters[local]
                .kubeconfig
                .to_string_lossy()
                .into_owned(),
            self.clusters[remote]
                .kubeconfig
                .to_string_lossy()
                .into_owned(),
        )
    }

    /// Every process's log tail, for a failure message.
    pub fn logs(&self) -> String {
        let mut all = self.bed.lab.logs();
        for cp in &self.clusters {
            all.push_str(&cp.logs());
        }
        all
    }
}

/// Where the root namespace reaches `cp`'s API server.
fn link_local(cp: &ControlPlane) -> Result<Ipv4Addr> {
    let host = cp
        .url
        .trim_start_matches("https://")
        .split(':')
        .next()
        .unwrap_or_default();
    host.parse()
        .with_context(|| format!("the API server URL {} holds no IPv4 address", cp.url))
}

/// `kubectl apply -k manifests/` (twice: the first creates the CRDs, which
/// must be established before anything refers to them), the Nodes, and
/// `ClusterFabric/local`.
fn install(cp: &ControlPlane, plan: &ClusterPlan) -> Result<()> {
    let manifests = workspace_root().join("manifests");
    cp.kubectl(&["apply", "-k", &manifests.to_string_lossy()])?;
    cp.wait_crds_established()?;
    // The gateway holds no pods here; its slice is the one after the nodes'.
    let gateway_slice = next_slice(plan);
    cp.add_node("gw", &gateway_slice, &plan.underlay_ip(1).to_string(), true)?;
    cp.set_node_addresses(
        "gw",
        &plan.underlay_ip(1).to_string(),
        Some(&plan.public_ip.to_string()),
    )?;
    for (i, (host, octet)) in HOSTS.iter().skip(1).enumerate() {
        cp.add_node(
            host,
            &plan.node_slices[i].to_string(),
            &plan.underlay_ip(*octet).to_string(),
            false,
        )?;
    }
    apply_cluster_fabric(cp, plan)
}

/// `ClusterFabric/local` for `plan`: name, id, pod CIDR, view pools (the
/// plan's view of its peer, then the spare block), and the API server URL
/// peers use.
pub fn apply_cluster_fabric(cp: &ControlPlane, plan: &ClusterPlan) -> Result<()> {
    cp.apply(&format!(
        "apiVersion: ligo.io/v1alpha1\nkind: ClusterFabric\nmetadata: {{name: local}}\nspec: {{clusterName: {}, clusterId: {}, podCIDR: \"{}\", serviceCIDR: 10.96.0.0/24, viewPools: [\"{}\", \"{SPARE_POOL}\"], apiServerURL: \"{}\"}}\n",
        plan.name, plan.id, plan.pod_cidr, plan.view_of_peer, cp.url
    ))?;
    Ok(())
}

/// The /24 after the second node's slice.
fn next_slice(plan: &ClusterPlan) -> String {
    let last = plan.node_slices[1];
    let next = Ipv4Addr::from(u32::from(last.0) + 256);
    format!("{next}/24")
}
