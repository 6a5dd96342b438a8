//! The big node at scale: `n` pods of one Deployment offloaded at once,
//! until all are Running in the consumer, against the same Deployment on a
//! node of the consumer (the same run's baseline: its ReplicaSet
//! controller, scheduler and a kubelet, without Ligo). The controller's
//! memory per mirrored pod, and API requests per pod on both servers.
//! 1,000 real containers do not fit this machine (~14 MB of containerd
//! shim each): every kubelet here is played by [`FastKubelet`] (status
//! written as a kubelet would, at once, no containers), and the report
//! says so.

use std::{
    collections::BTreeSet,
    path::Path,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    api::{Api, DeleteParams, Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{watcher, WatchStreamExt},
    Client, Config,
};
use serde_json::json;
use tokio::sync::{Notify, Semaphore};
use xtask::{kube::ControlPlane, kube_testbed::KubeTestbed, testbed::Scenario};

use crate::stats::Samples;

#[derive(Default)]
pub struct OffloadFigures {
    /// (pods, seconds until all Running in the consumer) per run.
    pub offloaded_s: Vec<(usize, Samples)>,
    /// The same Deployment on a (played) node of the consumer.
    pub baseline_s: Vec<(usize, Samples)>,
    /// (pods, per mirrored pod in KiB: the controller's heap, its RSS) per
    /// run; and the RSS with them in the first run, MiB.
    pub per_pod_kib: Vec<(usize, Samples, Samples, f64)>,
    /// (pods, requests on both servers offloaded, on the consumer's for the
    /// baseline).
    pub requests: Vec<(usize, f64, f64)>,
}

/// A kubelet for `nodes` played in-process: the nodes Ready with room for
/// `pods_per_node` pods; each pod bound to one gets Running and an address
/// in `cidr_base`/16 at once; a pod being deleted gets its final delete.
pub struct FastKubelet {
    stop: Arc<Notify>,
    thread: Option<thread::JoinHandle<()>>,
}

impl FastKubelet {
    pub fn start(
        kubeconfig: &Path,
        nodes: &[&str],
        pods_per_node: u32,
        cidr_base: [u8; 2],
    ) -> Result<Self> {
        let runtime = tokio::runtime::Runtime::new()?;
        let client = runtime.block_on(client_for(kubeconfig))?;
        let nodes: Vec<String> = nodes.iter().map(|n| (*n).to_owned()).collect();
        runtime.block_on(ready_nodes(&client, &nodes, pods_per_node))?;
        let stop = Arc::new(Notify::new());
        let stopped = stop.clone();
        let thread = thread::spawn(move || {
            runtime.block_on(async move {
                tokio::select! {
                    () = stopped.notified() => {}
                    () = serve(client, nodes, cidr_base) => {}
                }
            });
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for FastKubelet {
    fn drop(&mut self) {
        self.stop.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn client_for(kubeconfig: &Path) -> Result<Client> {
    let config = Config::from_custom_kubeconfig(
        Kubeconfig::read_from(kubeconfig)?,
        &KubeConfigOptions::default(),
    )
    .await?;
    Ok(Client::try_from(config)?)
}

async fn ready_nodes(client: &Client, nodes: &[String], pods: u32) -> Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    let room = json!({"cpu": "64", "memory": "256Gi", "pods": pods.to_string()});
    for node in nodes {
        let status = json!({"status": {"allocatable": room, "capacity": room,
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "played by the bench"}]}});
        api.patch_status(node, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
    }
    Ok(())
}

async fn serve(client: Client, nodes: Vec<String>, base: [u8; 2]) {
    let pods: Api<Pod> = Api::all(client.clone());
    let next = Arc::new(AtomicU32::new(0));
    let writes = Arc::new(Semaphore::new(32));
    let mut started = BTreeSet::new();
    let mut events = watcher(pods, watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .boxed();
    while let Ok(Some(pod)) = events.try_next().await {
        let on_ours = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_ref())
            .is_some_and(|n| nodes.contains(n));
        if !on_ours {
            continue;
        }
        let (ns, name, uid) = (
            pod.metadata.namespace.clone().unwrap_or_default(),
            pod.metadata.name.clone().unwrap_or_default(),
            pod.metadata.uid.clone().unwrap_or_default(),
        );
        let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let permit = writes.clone();
        if pod.metadata.deletion_timestamp.is_some() {
            tokio::spawn(async move {
                let _p = permit.acquire().await;
                let _ = api
                    .delete(
                        &name,
                        &DeleteParams {
                            grace_period_seconds: Some(0),
                            ..Default::default()
                        },
                    )
                    .await;
            });
            continue;
        }
        if !started.insert(uid) {
            continue;
        }
        let k = next.fetch_add(1, Ordering::Relaxed);
        let ip = format!("{}.{}.{}.{}", base[0], base[1], 100 + k / 250, 1 + k % 250);
        tokio::spawn(async move {
            let _p = permit.acquire().await;
            let now = k8s_openapi::jiff::Timestamp::now()
                .round(k8s_openapi::jiff::Unit::Second)
                .map(|t| t.to_string())
                .unwrap_or_default();
            let ready = |t: &str| json!({"type": t, "status": "True", "lastTransitionTime": now});
            let containers: Vec<_> = pod.spec.iter().flat_map(|s| s.containers.iter()).map(|c| json!({
                "name": c.name, "image": c.image, "imageID": "", "ready": true, "restartCount": 0, "started": true,
                "state": {"running": {"startedAt": now}}})).collect();
            let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "startTime": now,
                "conditions": [ready("Initialized"), ready("Ready"), ready("ContainersReady"), ready("PodScheduled")],
                "containerStatuses": containers}});
            let _ = api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await;
        });
    }
}

fn deployment(name: &str, n: usize, placement: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  replicas: {n}\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec:\n      {placement}\n      containers: [{{name: c, image: busybox:1.36}}]\n"
    )
}

/// The phases of the pods of `app` in `demo`, one per pod.
fn phases(cp: &ControlPlane, app: &str) -> Result<Vec<String>> {
    let phases = cp.kubectl(&[
        "get",
        "pods",
        "-n",
        "demo",
        "-l",
        &format!("app={app}"),
        "-o",
        "jsonpath={range .items[*]}{.status.phase}{\"\\n\"}{end}",
    ])?;
    Ok(phases.lines().map(str::to_owned).collect())
}

/// Pods of `app` in `demo` that are Running.
fn running(cp: &ControlPlane, app: &str) -> Result<usize> {
    Ok(phases(cp, app)?.iter().filter(|p| *p == "Running").count())
}

fn count(cp: &ControlPlane, app: &str) -> Result<usize> {
    Ok(phases(cp, app)?.len())
}

/// Applies a Deployment of `n` pods and returns the seconds until all run.
fn run_until_running(cp: &ControlPlane, name: &str, n: usize, placement: &str) -> Result<f64> {
    let started = Instant::now();
    cp.apply(&deployment(name, n, placement))?;
    cp.wait_for(
        &format!("{n} {name} pods Running"),
        Duration::from_secs(600),
        || {
            thread::sleep(Duration::from_millis(400));
            Ok((running(cp, name)? == n).then_some(()))
        },
    )?;
    Ok(started.elapsed().as_secs_f64())
}

fn remove(cp: &ControlPlane, name: &str, others: &[&ControlPlane]) -> Result<()> {
    cp.kubectl(&["delete", "deployment", "-n", "demo", name, "--wait=false"])?;
    cp.wait_for(
        &format!("{name}'s pods gone"),
        Duration::from_secs(600),
        || {
            thread::sleep(Duration::from_millis(500));
            Ok((count(cp, name)? == 0).then_some(()))
        },
    )?;
    for other in others {
        other.wait_for(
            &format!("{name}'s copies gone"),
            Duration::from_secs(600),
            || {
                thread::sleep(Duration::from_millis(500));
                Ok((count(other, name)? == 0).then_some(()))
            },
        )?;
    }
    Ok(())
}

/// Pods offloaded once before anything is measured.
const WARM_UP: usize = 20;

pub fn measure(sizes: &[usize], repetitions: u32) -> Result<OffloadFigures> {
    let qps = |_: usize, o: &mut xtask::kube::ControlPlaneOptions| o.controllers_qps = Some(200);
    let mut kb = KubeTestbed::up_with("lb-off", Scenario::identical_cidrs(), 245, qps)?;
    let result = measure_on(&mut kb, sizes, repetitions);
    if result.is_err() {
        eprintln!("{}", kb.logs());
    }
    result
}

fn measure_on(kb: &mut KubeTestbed, sizes: &[usize], repetitions: u32) -> Result<OffloadFigures> {
    kb.start_ligo()?;
    let most = sizes.iter().copied().max().unwrap_or(0) as u32;
    let (a, b) = (&kb.clusters[0], &kb.clusters[1]);
    // B's nodes and A's n1 are played; A's n1 is the baseline's node.
    let _b_kubelet = FastKubelet::start(&b.kubeconfig, &["n1", "n2"], most + 50, [10, 244])?;
    let _a_kubelet = FastKubelet::start(&a.kubeconfig, &["n1"], most + 50, [10, 244])?;
    a.kubectl(&["label", "node", "n1", "bench/baseline=true"])?;
    kb.peer_with(&["--offload", "out", "--wait", "--timeout", "60s"])?;
    KubeTestbed::offload_namespace(a, "demo")?;
    let offloaded = "nodeSelector: {type: virtual-kubelet}\n      tolerations: [{key: virtual-node.ligo.io/not-allowed, operator: Exists, effect: NoSchedule}]";
    let baseline = "nodeSelector: {bench/baseline: \"true\"}";
    // One warm-up, not counted: what the controller sets up once for
    // offloading (connections to the provider, each thread's heap) is not
    // a cost per pod.
    eprintln!("bench: offload: warm-up, {WARM_UP} pods");
    run_until_running(a, "offloaded", WARM_UP, offloaded)?;
    remove(a, "offloaded", &[b])?;
    let mut f = OffloadFigures::default();
    for &n in sizes {
        let (mut off, mut base) = (Samples::default(), Samples::default());
        let (mut heap, mut rss, mut rss_with) = (Samples::default(), Samples::default(), 0.0);
        for rep in 0..repetitions {
            eprintln!("bench: offload: {n} pods, {}/{repetitions}", rep + 1);
            let before = crate::kubernetes::requests(a)?;
            base.push(run_until_running(a, "baseline", n, baseline)?);
            let base_requests = crate::kubernetes::requests(a)? - before;
            remove(a, "baseline", &[])?;

            let mem_before = settled_memory(kb)?;
            let before = crate::kubernetes::requests(a)? + crate::kubernetes::requests(b)?;
            off.push(run_until_running(a, "offloaded", n, offloaded)?);
            let off_requests =
                crate::kubernetes::requests(a)? + crate::kubernetes::requests(b)? - before;
            let mem_after = settled_memory(kb)?;
            let per_pod = |before: f64, after: f64| (after - before) * 1024.0 / n as f64;
            heap.push(per_pod(mem_before.heap_mib, mem_after.heap_mib));
            rss.push(per_pod(mem_before.rss_mib, mem_after.rss_mib));
            if rep == 0 {
                rss_with = mem_after.rss_mib;
                f.requests.push((n, off_requests, base_requests));
            }
            remove(a, "offloaded", &[b])?;
        }
        f.per_pod_kib.push((n, heap, rss, rss_with));
        f.offloaded_s.push((n, off));
        f.baseline_s.push((n, base));
    }
    Ok(f)
}

struct Memory {
    rss_mib: f64,
    heap_mib: f64,
}

/// The controller's memory at rest: the median of samples over 5 s, taken
/// 3 s after the last change (a pass in flight holds transient copies).
/// The heap is what its allocator holds (`ligo_control_heap_bytes`, from
/// A's controller: the first started serves the root namespace's 9478).
fn settled_memory(kb: &KubeTestbed) -> Result<Memory> {
    thread::sleep(Duration::from_secs(3));
    let (mut rss, mut heap) = (Samples::default(), Samples::default());
    for _ in 0..5 {
        rss.push(crate::kubernetes::rss_mib(kb, "a-control")?);
        let body = ureq::get("http://127.0.0.1:9478/metrics")
            .call()?
            .into_body()
            .read_to_string()?;
        let bytes: f64 = body
            .lines()
            .find_map(|l| l.strip_prefix("ligo_control_heap_bytes "))
            .and_then(|v| v.trim().parse().ok())
            .context("A's controller serves no ligo_control_heap_bytes")?;
        heap.push(bytes / (1024.0 * 1024.0));
        thread::sleep(Duration::from_secs(1));
    }
    eprintln!(
        "bench: offload: controller RSS {:.1} MiB ({:.1}–{:.1}), heap {:.2} MiB",
        rss.median(),
        rss.min(),
        rss.max(),
        heap.median()
    );
    Ok(Memory {
        rss_mib: rss.median(),
        heap_mib: heap.median(),
    })
}

pub fn markdown(f: &OffloadFigures, title: &str, machine: &str, command: &str) -> String {
    let mut md = format!("# {title}\n\n{machine}\n\nCommand: `{command}`\n\n");
    md.push_str(&format!("Two simulated 1.20 clusters (identical pod CIDRs), Ligo installed from the manifests; kube-controller-manager and kube-scheduler at `--kube-api-qps=200` in both. Every kubelet is played by the bench (`FastKubelet`: the nodes Ready, each bound pod's status written Running with an address at once, no containers): 1,000 real containers do not fit this machine. The baseline is the same Deployment on a node of the consumer, in the same run: the consumer's ReplicaSet controller, scheduler and a kubelet without Ligo. Before anything is measured, {WARM_UP} pods are offloaded and removed once (what the controller sets up once, such as its connections to the provider and its threads' heaps, is not a cost per pod); requests are each size's first run; memory is measured in every run, each time the median of 5 samples over 5 s taken 3 s after the last change, before and with the pods.\n\n"));
    md.push_str("| pods | offloaded: until all Running in the consumer, s (median, min–max) | baseline on a node of the consumer, s | ratio |\n|---|---|---|---|\n");
    for ((n, off), (_, base)) in f.offloaded_s.iter().zip(&f.baseline_s) {
        md.push_str(&format!(
            "| {n} | {:.1} ({:.1}–{:.1}) | {:.1} ({:.1}–{:.1}) | {:.2}x |\n",
            off.median(),
            off.min(),
            off.max(),
            base.median(),
            base.min(),
            base.max(),
            off.median() / base.median()
        ));
    }
    md.push_str("\n| pods | controller heap per mirrored pod, KiB (median, min–max of the runs) | controller RSS per mirrored pod, KiB | controller RSS with them, MiB | API requests per pod, offloaded (both servers) | baseline (consumer's server) |\n|---|---|---|---|---|---|\n");
    for ((n, heap, rss, rss_with), (_, off, base)) in f.per_pod_kib.iter().zip(&f.requests) {
        md.push_str(&format!(
            "| {n} | {:.1} ({:.1}–{:.1}) | {:.1} ({:.1}–{:.1}) | {rss_with:.1} | {:.1} | {:.1} |\n",
            heap.median(),
            heap.min(),
            heap.max(),
            rss.median(),
            rss.min(),
            rss.max(),
            off / *n as f64,
            base / *n as f64
        ));
    }
    md.push_str("\nThe heap is what the controller's allocator holds (`ligo_control_heap_bytes`, counted by `cap`); RSS adds what the allocator keeps for reuse, which moves by about ±2 MiB between runs: ±20 KiB per pod at 100 pods.\n");
    md
}
