//! Real Kubernetes nodes (kubelet + containerd + kube-proxy) in the
//! testbed's namespaces, started by `xtask/kube/node.sh`; dropping one
//! stops every process of it.

use std::{net::Ipv4Addr, path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

use crate::{kube::kube_bin_dir, workspace_root};

pub struct RealNode {
    pub name: String,
    pub netns: String,
    pub dir: PathBuf,
}

/// How a node joins its cluster.
pub struct Joining<'a> {
    /// A kubeconfig whose server the node's namespace reaches.
    pub kubeconfig: &'a std::path::Path,
    /// One that works from the root namespace (to see the Node Ready).
    pub admin_kubeconfig: &'a std::path::Path,
    pub node_ip: Ipv4Addr,
    /// Where the `kubernetes` Service leads.
    pub apiserver_ip: Ipv4Addr,
    /// The API server's network namespace (it learns the node's pod route).
    pub apiserver_netns: &'a str,
    pub cluster_cidr: String,
    /// Docker-archive images to import besides busybox and pause.
    pub images: &'a [PathBuf],
}

impl RealNode {
    /// Starts the node and returns once its Node is Ready.
    pub fn start(name: &str, netns: &str, dir: PathBuf, joining: &Joining) -> Result<Self> {
        let node = RealNode {
            name: name.to_owned(),
            netns: netns.to_owned(),
            dir,
        };
        // What a killed run of the same node left.
        let _ = node.script("stop").output();
        let mut images: Vec<String> = ["busybox.tar", "pause.tar"]
            .iter()
            .map(|i| {
                kube_bin_dir()
                    .join("images")
                    .join(i)
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        images.extend(
            joining
                .images
                .iter()
                .map(|i| i.to_string_lossy().into_owned()),
        );
        let out = node
            .script("start")
            .env("KUBECONFIG", joining.kubeconfig)
            .env("ADMIN_KUBECONFIG", joining.admin_kubeconfig)
            .env("NODE_IP", joining.node_ip.to_string())
            .env("APISERVER_IP", joining.apiserver_ip.to_string())
            .env("APISERVER_NETNS", joining.apiserver_netns)
            .env("CLUSTER_CIDR", &joining.cluster_cidr)
            .env("KUBE_BIN", kube_bin_dir())
            .env("IMAGES", images.join(" "))
            .output()
            .context("running node.sh")?;
        if !out.status.success() {
            bail!(
                "node {name} did not start: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(node)
    }

    fn script(&self, action: &str) -> Command {
        let mut command = Command::new("bash");
        command
            .arg(workspace_root().join("xtask/kube/node.sh"))
            .args([action, &self.name, &self.netns])
            .arg(&self.dir);
        command
    }

    /// The process id of container `id` (`containerd://…` or bare).
    pub fn container_pid(&self, id: &str) -> Result<u32> {
        let id = id.trim_start_matches("containerd://");
        let sock = self.dir.join("containerd.sock");
        let tasks = crate::netns::run(
            "ctr",
            &["-a", &sock.to_string_lossy(), "-n", "k8s.io", "tasks", "ls"],
        )?;
        tasks
            .lines()
            .find(|l| l.starts_with(id))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .with_context(|| format!("no task {id} on node {}", self.name))
    }

    /// The last lines of the node's logs.
    pub fn logs(&self) -> String {
        let mut all = String::new();
        for log in ["kubelet.log", "containerd.log", "kube-proxy.log", "run.log"] {
            let text = std::fs::read_to_string(self.dir.join(log)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(10).collect();
            all.push_str(&format!("--- {} {log} ---\n", self.name));
            for line in tail.iter().rev() {
                all.push_str(line);
                all.push('\n');
            }
        }
        all
    }
}

/// Stops every process a run of node `name` left (an interrupted demo).
pub fn stop_leftover(name: &str, netns: &str, dir: PathBuf) {
    drop(RealNode {
        name: name.to_owned(),
        netns: netns.to_owned(),
        dir,
    });
}

impl Drop for RealNode {
    fn drop(&mut self) {
        let _ = self.script("stop").output();
    }
}

/// The image the manifests name, built by `xtask/kube/make-image.sh` from
/// the release binaries (built when missing) into `out`.
pub fn ligo_image(out: &std::path::Path) -> Result<PathBuf> {
    let root = workspace_root();
    let status = Command::new("cargo")
        .args([
            "build",
            "--release",
            "-p",
            "ligo-fabric",
            "-p",
            "ligo-control",
        ])
        .current_dir(&root)
        .status()
        .context("building the release binaries")?;
    if !status.success() {
        bail!("cargo build --release failed ({status})");
    }
    let out_text = crate::netns::run(
        "bash",
        &[
            &root.join("xtask/kube/make-image.sh").to_string_lossy(),
            &out.to_string_lossy(),
            &root.join("target/release").to_string_lossy(),
        ],
    )?;
    Ok(PathBuf::from(out_text.trim()))
}
