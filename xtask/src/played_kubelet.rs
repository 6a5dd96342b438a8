//! A provider's kubelet played by the harness, for tests that need more
//! pods than real containers fit on this machine: it reports its nodes
//! Ready with the allocatable it is given, and for each pod the real
//! scheduler bound to one of them it makes the pod's network namespace on
//! that node with the next address of the node's slice, then writes the
//! status a kubelet would (Running with that IP; or Succeeded for pods
//! labelled `ligo-test/completes=true`). A pod being deleted loses its
//! namespace and gets its final delete, as from a kubelet.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::Duration,
};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::{lab::attach_pod, netns, testbed::Cidr};

/// One node this kubelet plays.
#[derive(Clone, Debug)]
pub struct PlayedNode {
    pub name: String,
    /// The node's network namespace (pods hang off it).
    pub netns: String,
    /// Its pod CIDR slice; pods get hosts 100 and up.
    pub slice: Cidr,
}

/// A pod's sandbox: its namespace and address.
#[derive(Clone, Debug)]
pub struct Sandbox {
    pub netns: String,
    pub ip: std::net::Ipv4Addr,
    pub node: String,
}

pub struct PlayedKubelet {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
    /// By pod UID.
    pub sandboxes: Arc<Mutex<BTreeMap<String, Sandbox>>>,
}

const LABEL_COMPLETES: &str = "ligo-test/completes";

impl PlayedKubelet {
    /// Reports `nodes` Ready with `allocatable` (a JSON map of quantities)
    /// and starts serving their pods; `ns_prefix` names pod namespaces.
    pub fn start(
        kubeconfig: PathBuf,
        ns_prefix: &str,
        nodes: Vec<PlayedNode>,
        allocatable: Value,
    ) -> Result<Self> {
        let kubectl = Kubectl(kubeconfig);
        for node in &nodes {
            let status = json!({"status": {
                "allocatable": allocatable, "capacity": allocatable,
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                    "message": "played by the test harness", "lastHeartbeatTime": now(), "lastTransitionTime": now()}],
            }});
            kubectl
                .run(&[
                    "patch",
                    "node",
                    &node.name,
                    "--subresource=status",
                    "--type=merge",
                    "-p",
                    &status.to_string(),
                ])
                .with_context(|| format!("reporting node {} Ready", node.name))?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let sandboxes = Arc::new(Mutex::new(BTreeMap::new()));
        let (stop2, boxes, prefix) = (stop.clone(), sandboxes.clone(), ns_prefix.to_owned());
        let handle = thread::spawn(move || {
            let mut next = 0u32;
            while !stop2.load(Ordering::Relaxed) {
                if let Err(e) = serve(&kubectl, &prefix, &nodes, &boxes, &mut next) {
                    eprintln!("played kubelet: {e:#}");
                }
                thread::sleep(Duration::from_millis(200));
            }
        });
        Ok(Self {
            stop,
            handle: Some(handle),
            sandboxes,
        })
    }

    /// The sandbox of the pod with this UID, once made.
    pub fn sandbox(&self, uid: &str) -> Option<Sandbox> {
        self.sandboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(uid)
            .cloned()
    }
}

impl Drop for PlayedKubelet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        for sandbox in self
            .sandboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            netns::delete(&sandbox.netns);
        }
    }
}

struct Kubectl(PathBuf);

impl Kubectl {
    fn run(&self, args: &[&str]) -> Result<String> {
        let kubeconfig = self.0.to_string_lossy();
        let mut full = vec!["--kubeconfig", &kubeconfig, "--request-timeout", "10s"];
        full.extend_from_slice(args);
        netns::run("kubectl", &full)
    }
}

fn now() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn serve(
    kubectl: &Kubectl,
    prefix: &str,
    nodes: &[PlayedNode],
    sandboxes: &Mutex<BTreeMap<String, Sandbox>>,
    next: &mut u32,
) -> Result<()> {
    let list: Value = serde_json::from_str(&kubectl.run(&["get", "pods", "-A", "-o", "json"])?)?;
    let pods = list["items"].as_array().cloned().unwrap_or_default();
    let mut boxes = sandboxes.lock().unwrap_or_else(|e| e.into_inner());
    // Pods that are gone lose their namespace.
    let live: Vec<&str> = pods
        .iter()
        .filter_map(|p| p["metadata"]["uid"].as_str())
        .collect();
    boxes.retain(|uid, sandbox| {
        let keep = live.contains(&uid.as_str());
        if !keep {
            netns::delete(&sandbox.netns);
        }
        keep
    });
    for pod in &pods {
        let Some(node) = nodes
            .iter()
            .find(|n| Some(n.name.as_str()) == pod["spec"]["nodeName"].as_str())
        else {
            continue;
        };
        let (ns, name, uid) = (
            pod["metadata"]["namespace"].as_str().unwrap_or_default(),
            pod["metadata"]["name"].as_str().unwrap_or_default(),
            pod["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
        if pod["metadata"]["deletionTimestamp"].is_string() {
            if let Some(sandbox) = boxes.remove(&uid) {
                netns::delete(&sandbox.netns);
            }
            kubectl.run(&[
                "delete",
                "pod",
                "-n",
                ns,
                name,
                "--grace-period=0",
                "--force",
                "--wait=false",
            ])?;
            continue;
        }
        if boxes.contains_key(&uid)
            || matches!(
                pod["status"]["phase"].as_str(),
                Some("Succeeded" | "Failed")
            )
        {
            continue;
        }
        *next += 1;
        let sandbox = Sandbox {
            netns: format!("{prefix}k{next}"),
            ip: node.slice.host(100 + *next),
            node: node.name.clone(),
        };
        netns::add(&sandbox.netns)?;
        attach_pod(&node.netns, &format!("k{next}"), &sandbox.netns, sandbox.ip)?;
        let completes = pod["metadata"]["labels"][LABEL_COMPLETES].as_str() == Some("true");
        let started = now();
        let state = if completes {
            json!({"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": started, "finishedAt": started}})
        } else {
            json!({"running": {"startedAt": started}})
        };
        let containers: Vec<Value> = pod["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                json!({"name": c["name"], "image": c["image"], "imageID": "", "ready": !completes,
                "restartCount": 0, "started": !completes, "state": state})
            })
            .collect();
        let ready = if completes { "False" } else { "True" };
        let condition =
            |t: &str, s: &str| json!({"type": t, "status": s, "lastTransitionTime": started});
        let status = json!({"status": {
            "phase": if completes { "Succeeded" } else { "Running" },
            "podIP": sandbox.ip.to_string(), "podIPs": [{"ip": sandbox.ip.to_string()}],
            "startTime": started,
            "conditions": [condition("Initialized", "True"), condition("Ready", ready),
                condition("ContainersReady", ready), condition("PodScheduled", "True")],
            "containerStatuses": containers,
        }});
        kubectl.run(&[
            "patch",
            "pod",
            "-n",
            ns,
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            &status.to_string(),
        ])?;
        boxes.insert(uid, sandbox);
    }
    Ok(())
}
