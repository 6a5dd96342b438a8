//! Two simulated clusters in network namespaces, joined by the Ligo fabric.
//!
//! Per cluster: an underlay bridge (in its own namespace), a gateway and two
//! nodes on it, two pods per node (Calico-style: a /32 on the pod, the node
//! end of its veth as next hop); the two gateways share an "internet" veth. Underlay and
//! public addresses come from the TEST-NET ranges; nothing touches the
//! host's own interfaces. Its [`Lab`] removes everything it made, also
//! after a failure, and clears leftovers of a killed run with the same name.

use std::{fmt::Write as _, net::Ipv4Addr, path::Path};

use anyhow::{Context, Result};

use crate::{
    lab::{attach_pod, Lab},
    netns::{self, ipc},
};

pub const FABRIC_PORT: u16 = 4799;
/// WireGuard port of the gateways (the daemon's default).
pub const WIREGUARD_PORT: u16 = 51820;
/// Where every daemon serves /metrics (the daemon's default port).
pub const METRICS_PORT: u16 = 9477;

/// An IPv4 prefix (network, length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr(pub Ipv4Addr, pub u8);

impl Cidr {
    pub fn parse(s: &str) -> Self {
        let (addr, len) = s.split_once('/').unwrap_or((s, "32"));
        Cidr(
            addr.parse().unwrap_or(Ipv4Addr::UNSPECIFIED),
            len.parse().unwrap_or(32),
        )
    }
    fn mask(self) -> u32 {
        if self.1 == 0 {
            0
        } else {
            u32::MAX << (32 - self.1)
        }
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
    pub fn underlay_ip(&self, host: u8) -> Ipv4Addr {
        let [a, b, c] = self.underlay;
        Ipv4Addr::new(a, b, c, host)
    }
}

#[derive(Clone, Debug)]
pub struct Scenario {
    pub a: ClusterPlan,
    pub b: ClusterPlan,
    /// More clusters (the Kubernetes tests' third one): their gateways join
    /// a's and b's on one public bridge. Daemon configuration files are
    /// written for a and b only.
    pub more: Vec<ClusterPlan>,
    /// The gateways' public side on a bridge (namespace `inet`) rather than
    /// one veth between two gateways: others (API servers) can join it.
    pub public_bridge: bool,
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
            more: Vec::new(),
            public_bridge: false,
        }
    }

    /// Every cluster: a, b, then the others.
    pub fn plans(&self) -> Vec<&ClusterPlan> {
        let mut plans = vec![&self.a, &self.b];
        plans.extend(self.more.iter());
        plans
    }

    /// Three clusters on 10.244.0.0/16: a, b as in [`Self::identical_cidrs`]
    /// and c (id 3), which sees a as 10.246.0.0/16 (as b does: the two never
    /// meet). a sees b as 10.245.0.0/16 and c as the next free block of its
    /// pools (the Kubernetes testbed's spare pool, 10.247.0.0/16).
    pub fn three_identical_cidrs() -> Self {
        let mut s = Self::identical_cidrs();
        s.more.push(ClusterPlan {
            name: "c",
            id: 3,
            underlay: [198, 18, 3],
            public_ip: Ipv4Addr::new(203, 0, 113, 3),
            ..s.b.clone()
        });
        s
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
    /// Namespaces, daemons and their files; dropping it removes them all.
    pub lab: Lab,
    pub scenario: Scenario,
    /// `node.ingress` in the node configs: "auto", "xdp" or "tc".
    pub node_ingress: &'static str,
    /// Gateway-to-gateway transport: "wireguard" (the default) or "plain".
    pub transport: &'static str,
    /// Each cluster's gateway WireGuard key pair (private, public).
    pub keys: [WireguardKeys; 2],
}

/// A WireGuard key pair, base64 as `wg` prints it.
#[derive(Clone, Debug)]
pub struct WireguardKeys {
    pub private: String,
    pub public: String,
}

impl WireguardKeys {
    /// A fresh key pair from the kernel's random source.
    pub fn generate() -> Result<Self> {
        use base64::Engine as _;
        use std::io::Read as _;
        let mut secret = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut secret))
            .context("reading /dev/urandom")?;
        let private = boringtun::x25519::StaticSecret::from(secret);
        let public = boringtun::x25519::PublicKey::from(&private);
        let b64 = base64::engine::general_purpose::STANDARD;
        Ok(Self {
            private: b64.encode(private.to_bytes()),
            public: b64.encode(public.as_bytes()),
        })
    }
}

const NODES: [&str; 2] = ["n1", "n2"];

impl Testbed {
    /// Builds the topology; daemons are started by [`Testbed::start_fabric`].
    pub fn up(prefix: &str, scenario: Scenario) -> Result<Self> {
        let bed = Self {
            lab: Lab::new(prefix)?,
            scenario,
            node_ingress: "auto",
            transport: "wireguard",
            keys: [WireguardKeys::generate()?, WireguardKeys::generate()?],
        };
        bed.build()
            .with_context(|| format!("building testbed {prefix}"))?;
        Ok(bed)
    }

    pub fn ns(&self, cluster: &ClusterPlan, host: &str) -> String {
        self.lab.ns(&format!("{}-{host}", cluster.name))
    }

    fn clusters(&self) -> [&ClusterPlan; 2] {
        [&self.scenario.a, &self.scenario.b]
    }

    /// Pods: cluster (0 = a, 1 = b, then the others), node (0/1), index (0/1).
    pub fn pod(&self, cluster: usize, node: usize, index: usize) -> Pod {
        let plan = self.scenario.plans()[cluster];
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
        let plans = self.scenario.plans();
        for plan in &plans {
            self.build_cluster(plan)?;
        }
        if plans.len() == 2 && !self.scenario.public_bridge {
            let (a, b) = (plans[0], plans[1]);
            let (gw_a, gw_b) = (self.ns(a, "gw"), self.ns(b, "gw"));
            netns::veth(&gw_a, "eth1", &gw_b, "eth1")?;
        } else {
            // More than two gateways: one public bridge for all.
            let internet = self.lab.ns("inet");
            netns::add(&internet)?;
            ipc(&format!("-n {internet} link add br0 type bridge"))?;
            ipc(&format!("-n {internet} link set br0 up"))?;
            for plan in &plans {
                let port = format!("gw-{}", plan.name);
                netns::veth(&internet, &port, &self.ns(plan, "gw"), "eth1")?;
                ipc(&format!("-n {internet} link set {port} master br0"))?;
            }
        }
        for plan in &plans {
            ipc(&format!(
                "-n {} addr add {}/24 dev eth1",
                self.ns(plan, "gw"),
                plan.public_ip
            ))?;
        }
        Ok(())
    }

    fn build_cluster(&self, plan: &ClusterPlan) -> Result<()> {
        let underlay = self.ns(plan, "ul");
        netns::add(&underlay)?;
        ipc(&format!("-n {underlay} link add br0 type bridge"))?;
        ipc(&format!("-n {underlay} link set br0 up"))?;
        for (host, octet) in [("gw", 1u8), ("n1", 11), ("n2", 12)] {
            let ns = self.ns(plan, host);
            netns::add(&ns)?;
            netns::veth(&underlay, host, &ns, "eth0")?;
            ipc(&format!("-n {underlay} link set {host} master br0"))?;
            ipc(&format!(
                "-n {ns} addr add {}/24 dev eth0",
                plan.underlay_ip(octet)
            ))?;
        }
        for (n, node) in NODES.iter().enumerate() {
            let ns = self.ns(plan, node);
            netns::sysctl(&ns, "net.ipv4.ip_forward", "1")?;
            // In-cluster pod routing between the nodes, as any CNI provides.
            let other = 1 - n;
            let other_ip = plan.underlay_ip(11 + other as u8);
            ipc(&format!(
                "-n {ns} route add {} via {other_ip}",
                plan.node_slices[other]
            ))?;
            for i in 0..2 {
                let pod_ns = self.ns(plan, &format!("{node}p{}", i + 1));
                netns::add(&pod_ns)?;
                let pod_ip = plan.node_slices[n].host(10 + i as u32);
                attach_pod(&ns, &format!("pod{}", i + 1), &pod_ns, pod_ip)?;
            }
        }
        Ok(())
    }

    /// Where a cluster's gateway keeps its WireGuard private key.
    pub fn private_key_path(&self, plan: &ClusterPlan) -> std::path::PathBuf {
        self.lab.file(&format!("{}-wireguard.key", plan.name))
    }

    fn keys_of(&self, plan: &ClusterPlan) -> &WireguardKeys {
        &self.keys[usize::from(plan.name != "a")]
    }

    /// Writes the gateways' private keys, readable by the owner only.
    pub fn write_keys(&self) -> Result<()> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        for plan in self.clusters() {
            let path = self.private_key_path(plan);
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("writing {}", path.display()))?;
            std::io::Write::write_all(&mut file, self.keys_of(plan).private.as_bytes())?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(())
    }

    /// The daemon configuration for `host` ("gw", "n1", "n2") of a cluster.
    pub fn daemon_config(&self, plan: &ClusterPlan, host: &str) -> String {
        let peer = if plan.name == "a" {
            &self.scenario.b
        } else {
            &self.scenario.a
        };
        let wireguard = self.transport == "wireguard";
        let mut c = String::new();
        let _ = writeln!(
            c,
            "cluster_id = {}\npod_cidrs = [\"{}\"]\nfabric_port = {FABRIC_PORT}",
            plan.id, plan.pod_cidr
        );
        let _ = writeln!(
            c,
            "pin_dir = \"{}\"",
            self.lab.pin_dir(&self.ns(plan, host)).display()
        );
        if host == "gw" {
            let _ = writeln!(
                c,
                "[gateway]\nunderlay_interface = \"eth0\"\nunderlay_ip = \"{}\"\npublic_interface = \"eth1\"\npublic_ip = \"{}\"",
                plan.underlay_ip(1),
                plan.public_ip
            );
            let _ = writeln!(c, "node_slices = [");
            for (n, slice) in plan.node_slices.iter().enumerate() {
                let _ = writeln!(
                    c,
                    "  {{ node_ip = \"{}\", pod_cidr = \"{slice}\" }},",
                    plan.underlay_ip(11 + n as u8)
                );
            }
            let _ = writeln!(c, "]");
            // Each gateway its own socket (and desired file beside it), in
            // the lab's directory, plain transport too: never the host's
            // default path, which every gateway of the lab would share.
            let _ = writeln!(
                c,
                "wireguard_status_socket = \"{}\"",
                self.lab.wireguard_socket(&self.ns(plan, host)).display()
            );
            if wireguard {
                let _ = writeln!(
                    c,
                    "private_key_file = \"{}\"",
                    self.private_key_path(plan).display()
                );
            }
        } else {
            let octet = if host == "n1" { 11 } else { 12 };
            let _ = writeln!(
                c,
                "[node]\nuplink = \"eth0\"\nunderlay_ip = \"{}\"\ngateway_ip = \"{}\"\ningress = \"{}\"",
                plan.underlay_ip(octet),
                plan.underlay_ip(1),
                self.node_ingress
            );
        }
        let _ = writeln!(
            c,
            "[[peers]]\nid = {}\nname = \"cluster-{}\"\npod_cidr = \"{}\"",
            peer.id, peer.name, peer.pod_cidr
        );
        if plan.view_of_peer != peer.pod_cidr {
            let _ = writeln!(c, "view_cidr = \"{}\"", plan.view_of_peer);
        }
        let _ = writeln!(c, "transport = \"{}\"", self.transport);
        if host == "gw" && wireguard {
            let _ = writeln!(
                c,
                "endpoint = \"{}:{WIREGUARD_PORT}\"\npublic_key = \"{}\"\npersistent_keepalive = 1",
                peer.public_ip,
                self.keys_of(peer).public
            );
        } else if host == "gw" {
            let _ = writeln!(c, "endpoint = \"{}:{FABRIC_PORT}\"", peer.public_ip);
        }
        c
    }

    /// A monitoring host on both underlays (.250 in each) from which every
    /// daemon's metrics endpoint is reachable. Returns its namespace.
    pub fn add_monitoring(&self) -> Result<String> {
        let mon = self.lab.add_ns("mon")?;
        for plan in self.clusters() {
            let underlay = self.ns(plan, "ul");
            let ifname = format!("ul{}", plan.name);
            netns::veth(&underlay, "mon", &mon, &ifname)?;
            ipc(&format!("-n {underlay} link set mon master br0"))?;
            ipc(&format!(
                "-n {mon} addr add {}/24 dev {ifname}",
                plan.underlay_ip(250)
            ))?;
        }
        Ok(mon)
    }

    /// Every daemon's metrics endpoint: (cluster, host, ip:port).
    pub fn metrics_endpoints(&self) -> Vec<(&'static str, &'static str, String)> {
        let mut out = vec![];
        for plan in self.clusters() {
            for (host, octet) in [("gw", 1u8), ("n1", 11), ("n2", 12)] {
                out.push((
                    plan.name,
                    host,
                    format!("{}:{METRICS_PORT}", plan.underlay_ip(octet)),
                ));
            }
        }
        out
    }

    /// Starts a daemon on every gateway and node (and the tunnel process on
    /// WireGuard gateways), waiting until each reports ready.
    pub fn start_fabric(&mut self, daemon: &Path) -> Result<()> {
        let plans: Vec<ClusterPlan> = self.clusters().into_iter().cloned().collect();
        self.write_keys()?;
        for plan in &plans {
            for host in ["gw", "n1", "n2"] {
                let ns = self.ns(plan, host);
                let config = self.daemon_config(plan, host);
                self.lab.start_daemon(daemon, &ns, &config)?;
                if host == "gw" && self.transport == "wireguard" {
                    self.lab.start_tunnel(daemon, &ns)?;
                }
            }
        }
        Ok(())
    }
}
