//! The Kubernetes half, on two simulated clusters installed from the
//! manifests (`xtask::kube_testbed`): how long `ligo-control peer --wait`
//! and `unpeer` take and when the first packet crosses / the last one stops,
//! API requests per peering, and the controller's and daemons' memory with
//! 100 peers. Each figure beside a baseline measured in the same run.

use std::{
    fmt::Write as _,
    fs,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use xtask::{
    kube::ControlPlane,
    kube_testbed::KubeTestbed,
    netns::{join, within},
    testbed::{Scenario, WireguardKeys},
};

use crate::stats::Samples;

#[derive(Default)]
pub struct KubeFigures {
    /// `peer --wait` wall time, s.
    pub peer_s: Samples,
    /// From `peer` starting to the first echo across, s.
    pub first_packet_s: Samples,
    pub unpeer_s: Samples,
    /// From `unpeer` starting to the last echo across, s.
    pub last_packet_s: Samples,
    /// Baseline: one `kubectl create` + `delete` of a ConfigMap, s.
    pub kubectl_write_s: Samples,
    /// Requests A's API server served during a peering, and during an idle
    /// window as long (baseline).
    pub requests_peering: Samples,
    pub requests_idle: Samples,
    /// RSS in MiB: (process, with 0 peers, with `peers`).
    pub rss_mib: Vec<(String, f64, f64)>,
    pub peers: usize,
}

const PORT: u16 = 7900;

/// Runs `repetitions` peer/unpeer rounds, then loads cluster A with
/// `many` peers for the memory figures.
pub fn measure(repetitions: u32, many: usize) -> Result<KubeFigures> {
    let mut kb = KubeTestbed::up("lb-kube", Scenario::identical_cidrs(), 241)?;
    let result = measure_on(&mut kb, repetitions, many);
    if result.is_err() {
        eprintln!("{}", kb.logs());
    }
    result
}

fn measure_on(kb: &mut KubeTestbed, repetitions: u32, many: usize) -> Result<KubeFigures> {
    kb.start_ligo()?;
    let mut f = KubeFigures {
        peers: many,
        ..KubeFigures::default()
    };
    let (a, b) = (kb.bed.pod(0, 0, 0), kb.bed.pod(1, 1, 1));
    let dst = kb.bed.address_seen_from_peer(&b);
    let probe = Probe::start(&a.netns, &b.netns, dst)?;
    for rep in 0..repetitions {
        eprintln!("bench: kubernetes: peering {}/{repetitions}", rep + 1);
        f.kubectl_write_s.push(kubectl_write(&kb.clusters[0], rep)?);
        let idle_before = requests(&kb.clusters[0])?;
        let started = Instant::now();
        let (_, took) = kb.peer()?;
        f.peer_s.push(took.as_secs_f64());
        let first = probe.first_reply_since(started, Duration::from_secs(10))?;
        f.first_packet_s.push(first.as_secs_f64());
        // Everything the peering set off settles within a second more.
        thread::sleep(Duration::from_secs(1));
        let window = started.elapsed();
        let after = requests(&kb.clusters[0])?;
        f.requests_peering.push(after - idle_before);
        thread::sleep(window);
        f.requests_idle.push(requests(&kb.clusters[0])? - after);

        let started = Instant::now();
        let (_, took) = kb.unpeer()?;
        f.unpeer_s.push(took.as_secs_f64());
        thread::sleep(Duration::from_secs(2));
        let last = probe.last_reply_since(started)?;
        f.last_packet_s.push(last.as_secs_f64());
    }
    probe.stop();

    eprintln!("bench: kubernetes: memory with {many} peers");
    let processes = rss_processes(kb);
    let before: Vec<f64> = processes
        .iter()
        .map(|(_, n)| rss_mib(kb, n))
        .collect::<Result<_>>()?;
    add_peers(&kb.clusters[0], many)?;
    let wanted = many.to_string();
    kb.clusters[0].wait_for(
        &format!("every node's daemon to carry {many} peers"),
        Duration::from_secs(120),
        || {
            let counts: Vec<String> = ["gw", "n1", "n2"]
                .iter()
                .map(|n| {
                    kb.clusters[0]
                        .jsonpath("nodefabric", n, "{.status.programmedPeers[*]}")
                        .map(|s| s.split_whitespace().count().to_string())
                })
                .collect::<Result<_>>()?;
            Ok(counts.iter().all(|c| *c == wanted).then_some(()))
        },
    )?;
    thread::sleep(Duration::from_secs(2));
    for ((label, name), before) in processes.iter().zip(before) {
        f.rss_mib.push((label.clone(), before, rss_mib(kb, name)?));
    }
    Ok(f)
}

/// The Ligo processes of cluster A: (label, lab process name).
fn rss_processes(kb: &KubeTestbed) -> Vec<(String, String)> {
    let plan = &kb.bed.scenario.a;
    let gw = kb.bed.ns(plan, "gw");
    vec![
        ("ligo-control run".into(), "a-control".into()),
        ("ligo-fabric run (gateway)".into(), gw.clone()),
        ("ligo-fabric run (node)".into(), kb.bed.ns(plan, "n1")),
        (
            "ligo-fabric tunnel".into(),
            xtask::lab::Lab::tunnel_process(&gw),
        ),
    ]
}

pub fn rss_mib(kb: &KubeTestbed, process: &str) -> Result<f64> {
    let pid = fs::read_to_string(kb.bed.lab.pid_path(process))
        .with_context(|| format!("pid of {process}"))?;
    let status = fs::read_to_string(format!("/proc/{}/status", pid.trim()))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("VmRSS of {process}"))?;
    Ok(kib / 1024.0)
}

/// `n` Peer objects applied by hand (the GitOps path), each with its own
/// /24, gateway endpoint and key.
fn add_peers(cp: &ControlPlane, n: usize) -> Result<()> {
    let mut yaml = String::new();
    for i in 0..n {
        let keys = WireguardKeys::generate()?;
        let _ = write!(
            yaml,
            "---\napiVersion: ligo.io/v1alpha1\nkind: Peer\nmetadata: {{name: p{i}}}\nspec: {{clusterName: p{i}, clusterId: {}, podCIDR: \"172.16.{i}.0/24\", gatewayEndpoints: [\"198.18.{}.{}:51820\"], wireguardPublicKey: \"{}\"}}\n",
            1000 + i,
            i / 250,
            1 + i % 250,
            keys.public
        );
    }
    cp.apply(&yaml).map(drop)
}

/// A ConfigMap created and deleted with kubectl: a client's write round
/// trips, the floor any CLI that writes pays.
fn kubectl_write(cp: &ControlPlane, rep: u32) -> Result<f64> {
    let name = format!("bench-baseline-{rep}");
    let started = Instant::now();
    cp.kubectl(&["create", "configmap", &name, "-n", "default"])?;
    cp.kubectl(&["delete", "configmap", &name, "-n", "default"])?;
    Ok(started.elapsed().as_secs_f64())
}

/// Requests the API server has served (every `apiserver_request_total`).
pub fn requests(cp: &ControlPlane) -> Result<f64> {
    let metrics = cp.kubectl(&["get", "--raw", "/metrics"])?;
    Ok(metrics
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// A UDP echo every 5 ms from a pod of A to a pod of B, recording when
/// echoes come back.
struct Probe {
    replies: Arc<Mutex<Vec<Instant>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Result<()>>>,
}

impl Probe {
    fn start(client_ns: &str, server_ns: &str, dst: Ipv4Addr) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let replies = Arc::new(Mutex::new(Vec::new()));
        let server_stop = stop.clone();
        let server = within(server_ns, move || {
            let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT))?;
            socket.set_read_timeout(Some(Duration::from_millis(100)))?;
            let mut buf = [0u8; 64];
            while !server_stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    socket.send_to(&buf[..n], from)?;
                }
            }
            Ok(())
        });
        let (client_stop, client_replies) = (stop.clone(), replies.clone());
        let client = within(client_ns, move || {
            let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
            socket.set_read_timeout(Some(Duration::from_millis(5)))?;
            let mut buf = [0u8; 64];
            while !client_stop.load(Ordering::Relaxed) {
                // Sending fails while no route exists: that is a miss too.
                let _ = socket.send_to(b"probe", SocketAddrV4::new(dst, PORT));
                while let Ok(n) = socket.recv(&mut buf) {
                    if n == 5 {
                        client_replies
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(Instant::now());
                    }
                }
            }
            Ok(())
        });
        Ok(Self {
            replies,
            stop,
            threads: vec![server, client],
        })
    }

    fn first_reply_since(&self, since: Instant, timeout: Duration) -> Result<Duration> {
        while since.elapsed() < timeout {
            let replies = self.replies.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(t) = replies.iter().find(|t| **t >= since) {
                return Ok(*t - since);
            }
            drop(replies);
            thread::sleep(Duration::from_millis(5));
        }
        bail!("no echo within {timeout:?} of peering")
    }

    /// When the last echo since `since` came back (zero: none did).
    fn last_reply_since(&self, since: Instant) -> Result<Duration> {
        let replies = self.replies.lock().unwrap_or_else(|e| e.into_inner());
        Ok(replies
            .iter()
            .rfind(|t| **t >= since)
            .map_or(Duration::ZERO, |t| *t - since))
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = join(t);
        }
    }
}

/// The report's Markdown.
pub fn markdown(f: &KubeFigures, title: &str, machine: &str, command: &str) -> String {
    let mut md = format!("# {title}\n\n{machine}. Command: `{command}`.\n\n");
    md.push_str("Two simulated clusters (each etcd + kube-apiserver + controller-manager + scheduler v1.20.2, network namespaces as nodes), both on 10.244.0.0/16, Ligo installed from `manifests/` and run from its pod templates; peering over WireGuard. Medians, with the spread (min–max) over the repetitions.\n\n");
    md.push_str("| figure | value | baseline (same run) | ratio |\n|---|---|---|---|\n");
    let base = f.kubectl_write_s.median();
    for (name, s) in [
        ("`peer --wait` (both Peers Ready)", &f.peer_s),
        ("`peer` start to first echo across", &f.first_packet_s),
        ("`unpeer`", &f.unpeer_s),
        ("`unpeer` start to last echo across", &f.last_packet_s),
    ] {
        let _ = writeln!(
            md,
            "| {name} | {} s | kubectl create + delete of a ConfigMap: {} s | {:.1}x |",
            s.show(3),
            f.kubectl_write_s.show(3),
            s.median() / base
        );
    }
    let _ = writeln!(
        md,
        "| API requests to A's server during a peering (`peer --wait` and 1 s after) | {} | the same window idle: {} | {:.1}x |",
        f.requests_peering.show(0),
        f.requests_idle.show(0),
        f.requests_peering.median() / f.requests_idle.median().max(1.0)
    );
    let _ = writeln!(
        md,
        "\nMemory (VmRSS, MiB) of cluster A's processes with 0 and with {} peers (Peer objects applied by hand, each with a WireGuard key and endpoint):\n\n| process | 0 peers | {} peers | ratio |\n|---|---|---|---|",
        f.peers, f.peers
    );
    for (name, before, after) in &f.rss_mib {
        let _ = writeln!(
            md,
            "| {name} | {before:.1} | {after:.1} | {:.2}x |",
            after / before
        );
    }
    md
}
