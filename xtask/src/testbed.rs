//! Two simulated clusters in network namespaces, joined by the Ligo fabric.
//!
//! Per cluster: an underlay bridge (in its own namespace), a gateway and two
//! nodes on it, two pods per node (Calico-style: a /32 on the pod, the node
//! end of its veth as next hop); the two gateways share an "internet" veth. Underlay and
//! public addresses come from the TEST-NET ranges; nothing touches the
//! host's own interfaces. Dropping a [`Testbed`] stops the daemons and
//! removes every namespace, mount and file it made, also after a failure;
//! [`Testbed::up`] first clears leftovers of a killed run with the same name.

use std::{
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::netns::{self, ip};

pub const FABRIC_PORT: u16 = 4799;

/// An IPv4 prefix (network, length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr(pub Ipv4Addr, pub u8);

impl Cidr {
    pub fn parse(s: &str) -> Self {
        let (addr, len) = s.split_once('/').unwrap_or((s, "32"));
        Cidr(addr.parse().unwrap_or(Ipv4Addr::UNSPECIFIED), len.parse().unwrap_or(32))
    }
    fn mask(self) -> u32 {
        if self.1 == 0 { 0 } else { u32::MAX << (32 - self.1) }
    }
    /// The address with `host` as host bits.
    pub fn host(self, host: u32) -> Ipv4Addr {
        Ipv4Addr::from((u32::from(self.0) & self.mask()) | (host & !self.mask()))
    }
    /// `addr` (inside `self`) moved into `to`, keeping its host bits.
    pub fn translate(self, addr: Ipv4Addr, to: Cidr) -> Ipv4Addr {
        to.host(u32::from(addr) & !self.mask())
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.0, self.1)
    }
}

/// One cluster's addressing.
#[derive(Clone, Debug)]
pub struct ClusterPlan {
    pub name: &'static str,
    pub id: u32,
    pub pod_cidr: Cidr,
    pub node_slices: [Cidr; 2],
    /// This cluster's view of the other cluster's pod CIDR.
    pub view_of_peer: Cidr,
    /// First three octets of the underlay /24.
    pub underlay: [u8; 3],
    pub public_ip: Ipv4Addr,
}

impl ClusterPlan {
    fn underlay_ip(&self, host: u8) -> Ipv4Addr {
        let [a, b, c] = self.underlay;
        Ipv4Addr::new(a, b, c, host)
    }
}

#[derive(Clone, Debug)]
pub struct Scenario {
    pub a: ClusterPlan,
    pub b: ClusterPlan,
}

impl Scenario {
    /// Both clusters use 10.244.0.0/16 — the normal case. Each chooses its
    /// own (different) view of the other.
    pub fn identical_cidrs() -> Self {
        Self {
            a: ClusterPlan {
                name: "a",
                id: 1,
                pod_cidr: Cidr::parse("10.244.0.0/16"),
                node_slices: [Cidr::parse("10.244.1.0/24"), Cidr::parse("10.244.2.0/24")],
                view_of_peer: Cidr::parse("10.245.0.0/16"),
                underlay: [192, 0, 2],
                public_ip: Ipv4Addr::new(203, 0, 113, 1),
            },
            b: ClusterPlan {
                name: "b",
                id: 2,
                pod_cidr: Cidr::parse("10.244.0.0/16"),
                node_slices: [Cidr::parse("10.244.1.0/24"), Cidr::parse("10.244.2.0/24")],
                view_of_peer: Cidr::parse("10.246.0.0/16"),
                underlay: [198, 51, 100],
                public_ip: Ipv4Addr::new(203, 0, 113, 2),
            },
        }
    }

    /// A 10.244.0.0/16, B 10.100.16.0/20. A sees B through the remapped,
    /// non-octet-aligned 10.200.32.0/20; B sees A as it is (no collision).
    pub fn different_cidrs() -> Self {
        let mut s = Self::identical_cidrs();
        s.a.view_of_peer = Cidr::parse("10.200.32.0/20");
        s.b.pod_cidr = Cidr::parse("10.100.16.0/20");
        s.b.node_slices = [Cidr::parse("10.100.16.0/24"), Cidr::parse("10.100.17.0/24")];
        s.b.view_of_peer = s.a.pod_cidr;
        s
    }
}

/// A pod of the testbed.
#[derive(Clone, Debug)]
pub struct Pod {
    pub netns: String,
    pub ip: Ipv4Addr,
    /// 0 = cluster a, 1 = cluster b.
    pub cluster: usize,
}

pub struct Testbed {
    pub prefix: String,
    pub scenario: Scenario,
    run_dir: PathBuf,
    daemons: Vec<(String, Child)>,
    torn_down: bool,
}

const NODES: [&str; 2] = ["n1", "n2"];

impl Testbed {
    /// Builds the topology; daemons are started by [`Testbed::start_fabric`].
    pub fn up(prefix: &str, scenario: Scenario) -> Result<Self> {
        let run_dir = PathBuf::from(format!("/run/ligo-testbed/{prefix}"));
        clear_leftovers(prefix, &run_dir);
        fs::create_dir_all(run_dir.join("bpffs"))?;
        let bed = Self { prefix: prefix.into(), scenario, run_dir, daemons: vec![], torn_down: false };
        bed.build().with_context(|| format!("building testbed {prefix}"))?;
        Ok(bed)
    }

    pub fn ns(&self, cluster: &ClusterPlan, host: &str) -> String {
        format!("{}-{}-{}", self.prefix, cluster.name, host)
    }

    fn clusters(&self) -> [&ClusterPlan; 2] {
        [&self.scenario.a, &self.scenario.b]
    }

    /// Pods: cluster (0/1), node (0/1), index (0/1).
    pub fn pod(&self, cluster: usize, node: usize, index: usize) -> Pod {
        let plan = self.clusters()[cluster];
        Pod {
            netns: self.ns(plan, &format!("{}p{}", NODES[node], index + 1)),
            ip: plan.node_slices[node].host(10 + index as u32),
            cluster,
        }
    }

    pub fn all_pods(&self) -> Vec<Pod> {
        let mut pods = vec![];
        for c in 0..2 {
            for n in 0..2 {
                for i in 0..2 {
                    pods.push(self.pod(c, n, i));
                }
            }
        }
        pods
    }

    /// The address pods of the other cluster use to reach `pod`.
    pub fn address_seen_from_peer(&self, pod: &Pod) -> Ipv4Addr {
        let own = self.clusters()[pod.cluster];
        let other = self.clusters()[1 - pod.cluster];
        own.pod_cidr.translate(pod.ip, other.view_of_peer)
    }

    fn build(&self) -> Result<()> {
        let [a, b] = self.clusters();
        for plan in [a, b] {
            self.build_cluster(plan)?;
        }
        let (gw_a, gw_b) = (self.ns(a, "gw"), self.ns(b, "gw"));
        netns::veth(&gw_a, "eth1", &gw_b, "eth1")?;
        ip(&["-n", &gw_a, "addr", "add", &format!("{}/24", a.public_ip), "dev", "eth1"])?;
        ip(&["-n", &gw_b, "addr", "add", &format!("{}/24", b.public_ip), "dev", "eth1"])?;
        Ok(())
    }

    fn build_cluster(&self, plan: &ClusterPlan) -> Result<()> {
        let underlay = self.ns(plan, "ul");
        netns::add(&underlay)?;
        ip(&["-n", &underlay, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &underlay, "link", "set", "br0", "up"])?;
        let hosts = [("gw", 1u8), ("n1", 11), ("n2", 12)];
        for (host, octet) in hosts {
            let ns = self.ns(plan, host);
            netns::add(&ns)?;
            netns::veth(&underlay, host, &ns, "eth0")?;
            ip(&["-n", &underlay, "link", "set", host, "master", "br0"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", plan.underlay_ip(octet)), "dev", "eth0"])?;
        }
        for (n, node) in NODES.iter().enumerate() {
            let ns = self.ns(plan, node);
            netns::sysctl(&ns, "net.ipv4.ip_forward", "1")?;
            // In-cluster pod routing between the nodes, as any CNI provides.
            let other = 1 - n;
            ip(&[
                "-n", &ns, "route", "add", &plan.node_slices[other].to_string(),
                "via", &plan.underlay_ip(11 + other as u8).to_string(),
            ])?;
            for i in 0..2 {
                let pod_ns = self.ns(plan, &format!("{node}p{}", i + 1));
                let pod_ip = plan.node_slices[n].host(10 + i as u32);
                let host_if = format!("pod{}", i + 1);
                netns::add(&pod_ns)?;
                netns::veth(&ns, &host_if, &pod_ns, "eth0")?;
                ip(&["-n", &pod_ns, "addr", "add", &format!("{pod_ip}/32"), "dev", "eth0"])?;
                ip(&["-n", &pod_ns, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"])?;
                ip(&["-n", &pod_ns, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0"])?;
                // The pod's next hop is the node end of its veth (as with Calico).
                let node_mac = interface_mac(&ns, &host_if)?;
                ip(&["-n", &pod_ns, "neigh", "add", "169.254.1.1", "lladdr", &node_mac, "dev", "eth0", "nud", "permanent"])?;
                ip(&["-n", &ns, "route", "add", &format!("{pod_ip}/32"), "dev", &host_if])?;
            }
        }
        Ok(())
    }

    fn pin_root(&self) -> PathBuf {
        self.run_dir.join("bpffs")
    }

    /// The daemon configuration for `host` ("gw", "n1", "n2") of a cluster.
    pub fn daemon_config(&self, plan: &ClusterPlan, host: &str) -> String {
        let peer = if plan.name == "a" { &self.scenario.b } else { &self.scenario.a };
        let mut c = String::new();
        let _ = writeln!(c, "cluster_id = {}\npod_cidrs = [\"{}\"]\nfabric_port = {FABRIC_PORT}", plan.id, plan.pod_cidr);
        let _ = writeln!(c, "pin_dir = \"{}\"", self.pin_root().join(self.ns(plan, host)).display());
        if host == "gw" {
            let _ = writeln!(
                c,
                "[gateway]\nunderlay_interface = \"eth0\"\nunderlay_ip = \"{}\"\npublic_interface = \"eth1\"\npublic_ip = \"{}\"",
                plan.underlay_ip(1),
                plan.public_ip
            );
            let _ = writeln!(c, "node_slices = [");
            for (n, slice) in plan.node_slices.iter().enumerate() {
                let _ = writeln!(c, "  {{ node_ip = \"{}\", pod_cidr = \"{slice}\" }},", plan.underlay_ip(11 + n as u8));
            }
            let _ = writeln!(c, "]");
        } else {
            let octet = if host == "n1" { 11 } else { 12 };
            let _ = writeln!(
                c,
                "[node]\nuplink = \"eth0\"\nunderlay_ip = \"{}\"\ngateway_ip = \"{}\"",
                plan.underlay_ip(octet),
                plan.underlay_ip(1)
            );
        }
        let _ = writeln!(c, "[[peers]]\nid = {}\nname = \"cluster-{}\"\npod_cidr = \"{}\"", peer.id, peer.name, peer.pod_cidr);
        if plan.view_of_peer != peer.pod_cidr {
            let _ = writeln!(c, "view_cidr = \"{}\"", plan.view_of_peer);
        }
        if host == "gw" {
            let _ = writeln!(c, "endpoint = \"{}:{FABRIC_PORT}\"", peer.public_ip);
        }
        c
    }

    pub fn config_path(&self, ns: &str) -> PathBuf {
        self.run_dir.join(format!("{ns}.toml"))
    }

    pub fn log_path(&self, ns: &str) -> PathBuf {
        self.run_dir.join(format!("{ns}.log"))
    }

    pub fn pin_dir(&self, ns: &str) -> PathBuf {
        self.pin_root().join(ns)
    }

    /// Mounts the bpffs for pinned maps and starts a daemon on every gateway
    /// and node, waiting until each reports ready.
    pub fn start_fabric(&mut self, daemon: &Path) -> Result<()> {
        let pin_root = self.pin_root();
        netns::run("mount", &["-t", "bpf", "bpf", &pin_root.to_string_lossy()])?;
        let plans: Vec<ClusterPlan> = self.clusters().into_iter().cloned().collect();
        for plan in &plans {
            for host in ["gw", "n1", "n2"] {
                let ns = self.ns(plan, host);
                fs::write(self.config_path(&ns), self.daemon_config(plan, host))?;
                self.start_daemon(daemon, &ns)?;
            }
        }
        Ok(())
    }

    pub fn start_daemon(&mut self, daemon: &Path, ns: &str) -> Result<()> {
        let log_path = self.log_path(ns);
        let log = fs::File::create(&log_path)?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(daemon)
            .arg("run")
            .arg("--config")
            .arg(self.config_path(ns))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", daemon.display()))?;
        fs::write(self.run_dir.join(format!("{ns}.pid")), child.id().to_string())?;
        self.daemons.push((ns.to_owned(), child));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            if log.contains("fabric ready") {
                return Ok(());
            }
            let exited = self
                .daemons
                .iter_mut()
                .find(|(n, _)| n == ns)
                .and_then(|(_, c)| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                bail!("daemon in {ns} exited ({status}) before it was ready:\n{log}");
            }
            if Instant::now() > deadline {
                bail!("daemon in {ns} not ready after 20 s:\n{log}");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops one daemon with SIGTERM and waits for it; returns its log.
    pub fn stop_daemon(&mut self, ns: &str) -> Result<String> {
        if let Some(pos) = self.daemons.iter().position(|(n, _)| n == ns) {
            let (_, mut child) = self.daemons.remove(pos);
            terminate(&mut child);
        }
        Ok(fs::read_to_string(self.log_path(ns)).unwrap_or_default())
    }

    /// `ligo-fabric inspect maps -o json` for the daemon in `ns`.
    pub fn inspect(&self, daemon: &Path, ns: &str) -> Result<serde_json::Value> {
        let out = netns::run(
            &daemon.to_string_lossy(),
            &["inspect", "maps", "--pin-dir", &self.pin_dir(ns).to_string_lossy(), "-o", "json"],
        )?;
        serde_json::from_str(&out).context("inspect printed invalid JSON")
    }

    /// The daemon logs, for failure reports.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (ns, _) in &self.daemons {
            let _ = writeln!(out, "--- {ns} ---\n{}", fs::read_to_string(self.log_path(ns)).unwrap_or_default());
        }
        out
    }

    /// Leaves the testbed and its daemons running after `self` is dropped.
    pub fn detach(mut self) {
        self.torn_down = true;
        self.daemons.clear();
    }

    /// Stops the daemons (each removes what it installed), then deletes the
    /// namespaces, the bpffs mount and the run directory.
    pub fn down(&mut self) -> Result<()> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        for (_, mut child) in self.daemons.drain(..) {
            terminate(&mut child);
        }
        clear_leftovers(&self.prefix, &self.run_dir);
        Ok(())
    }
}

/// The MAC address of interface `name` in namespace `ns`.
fn interface_mac(ns: &str, name: &str) -> Result<String> {
    let out = ip(&["-n", ns, "-br", "link", "show", name])?;
    out.split_whitespace()
        .nth(2)
        .map(str::to_owned)
        .with_context(|| format!("no MAC address for {name} in {ns}: {out}"))
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let _ = self.down();
    }
}

fn terminate(child: &mut Child) {
    // `ip netns exec` execs the daemon, so this pid is the daemon itself.
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Removes everything a testbed named `prefix` may have left behind.
pub fn remove(prefix: &str) {
    clear_leftovers(prefix, &PathBuf::from(format!("/run/ligo-testbed/{prefix}")));
}

/// Removes what a testbed with this prefix may have left behind: daemons
/// (by recorded pid), namespaces, the bpffs mount and the run directory.
fn clear_leftovers(prefix: &str, run_dir: &Path) {
    if let Ok(entries) = fs::read_dir(run_dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "pid") {
                if let Some(pid) = fs::read_to_string(&path).ok().and_then(|s| s.trim().parse::<i32>().ok()) {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
    }
    if let Ok(names) = netns::list() {
        for ns in names.iter().filter(|n| n.starts_with(&format!("{prefix}-"))) {
            netns::delete(ns);
        }
    }
    let bpffs = run_dir.join("bpffs");
    let _ = Command::new("umount").arg(&bpffs).stderr(Stdio::null()).status();
    let _ = fs::remove_dir_all(run_dir);
}
