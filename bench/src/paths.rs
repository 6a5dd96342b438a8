//! The three paths measured between a pod in cluster A and a pod in
//! cluster B, each built on a fresh copy of the same two-cluster testbed.

use std::net::Ipv4Addr;

use anyhow::Result;
use xtask::{
    netns::{self, ipc},
    testbed::{Cidr, ClusterPlan, Pod, Scenario, Testbed, WIREGUARD_PORT},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathKind {
    /// Plain routing node -> gateway -> gateway -> node, real addresses, no
    /// tunnel, no translation: this machine's ceiling.
    Direct,
    /// The reference design from kernel parts: VXLAN devices node<->gateway
    /// and gateway<->gateway, nftables prefix DNAT/SNAT with conntrack on
    /// the gateways, policy routing.
    KernelReference,
    /// The Ligo fabric, plain transport (node ingress at TC, the default
    /// on veth).
    LigoPlain,
    /// The same with the node ingress at XDP, to show why TC is the
    /// default on veth uplinks.
    LigoPlainXdp,
    /// The Ligo fabric with its default transport: WireGuard between the
    /// gateways (userspace, boringtun's protocol engine).
    LigoWireguard,
    /// Direct routing with boringtun-cli (crates.io, its defaults) as the
    /// WireGuard tunnel between the gateways: the userspace WireGuard users
    /// run today, with no translation and no fabric.
    BoringtunCli,
}

impl PathKind {
    pub const ALL: [PathKind; 6] = [
        PathKind::Direct,
        PathKind::KernelReference,
        PathKind::LigoPlain,
        PathKind::LigoPlainXdp,
        PathKind::LigoWireguard,
        PathKind::BoringtunCli,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::KernelReference => "kernel-reference",
            PathKind::LigoPlain => "ligo-plain",
            PathKind::LigoPlainXdp => "ligo-plain-xdp",
            PathKind::LigoWireguard => "ligo-wireguard",
            PathKind::BoringtunCli => "boringtun-cli",
        }
    }
}

/// Different CIDRs (so `direct` can route real addresses), and each side
/// remaps its view of the other, so every design translates both ways.
pub fn scenario() -> Scenario {
    let mut s = Scenario::different_cidrs();
    s.b.view_of_peer = Cidr::parse("10.246.0.0/16");
    s
}

/// A testbed wired for `kind`, and the (client, server) pods measured.
pub fn build(
    kind: PathKind,
    prefix: &str,
    daemon: &std::path::Path,
) -> Result<(Testbed, Pod, Pod)> {
    let mut bed = Testbed::up(prefix, scenario())?;
    match kind {
        PathKind::Direct => direct(&bed)?,
        PathKind::KernelReference => kernel_reference(&bed)?,
        PathKind::LigoPlain => {
            bed.transport = "plain";
            bed.start_fabric(daemon)?
        }
        PathKind::LigoPlainXdp => {
            bed.transport = "plain";
            bed.node_ingress = "xdp";
            bed.start_fabric(daemon)?
        }
        PathKind::LigoWireguard => {
            bed.transport = "wireguard";
            bed.start_fabric(daemon)?
        }
        PathKind::BoringtunCli => boringtun_cli(&mut bed)?,
    }
    let (client, server) = (bed.pod(0, 0, 0), bed.pod(1, 1, 0));
    Ok((bed, client, server))
}

/// The address the client uses for `server` on this path.
pub fn server_address(bed: &Testbed, kind: PathKind, server: &Pod) -> Ipv4Addr {
    match kind {
        PathKind::Direct | PathKind::BoringtunCli => server.ip,
        _ => bed.address_seen_from_peer(server),
    }
}

fn clusters(bed: &Testbed) -> [(&ClusterPlan, &ClusterPlan); 2] {
    [
        (&bed.scenario.a, &bed.scenario.b),
        (&bed.scenario.b, &bed.scenario.a),
    ]
}

fn direct(bed: &Testbed) -> Result<()> {
    direct_routes(bed, true)
}

/// Routes between real addresses on every host; between the gateways only
/// when `gateway_link` (otherwise the caller provides that hop).
fn direct_routes(bed: &Testbed, gateway_link: bool) -> Result<()> {
    for (own, peer) in clusters(bed) {
        let gw = bed.ns(own, "gw");
        netns::sysctl(&gw, "net.ipv4.ip_forward", "1")?;
        if gateway_link {
            ipc(&format!(
                "-n {gw} route add {} via {}",
                peer.pod_cidr, peer.public_ip
            ))?;
        }
        for (n, node) in ["n1", "n2"].iter().enumerate() {
            let node_ns = bed.ns(own, node);
            ipc(&format!(
                "-n {node_ns} route add {} via {}",
                peer.pod_cidr,
                own.underlay_ip(1)
            ))?;
            ipc(&format!(
                "-n {gw} route add {} via {}",
                own.node_slices[n],
                own.underlay_ip(11 + n as u8)
            ))?;
        }
    }
    Ok(())
}

/// What wg-quick sets on a tunnel over a 1500-byte link.
const BORINGTUN_CLI_MTU: u32 = 1420;

/// Direct routing with a boringtun-cli tunnel between the gateways,
/// configured with `wg` as a user would (and its MTU as wg-quick sets it).
fn boringtun_cli(bed: &mut Testbed) -> Result<()> {
    direct_routes(bed, false)?;
    bed.write_keys()?;
    let plans = [bed.scenario.a.clone(), bed.scenario.b.clone()];
    for (i, own) in plans.iter().enumerate() {
        let peer = &plans[1 - i];
        let gw = bed.ns(own, "gw");
        // boringtun-cli's control socket is /var/run/wireguard/<name>.sock,
        // shared by all namespaces: one name per gateway.
        let wg_if = format!("wgb{}", own.name);
        let key = bed.private_key_path(own).to_string_lossy().into_owned();
        let port = WIREGUARD_PORT.to_string();
        let endpoint = format!("{}:{WIREGUARD_PORT}", peer.public_ip);
        let allowed = peer.pod_cidr.to_string();
        let peer_key = bed.keys[1 - i].public.clone();
        bed.lab.start_boringtun_cli(
            &gw,
            &format!("{gw}-boringtun"),
            &[],
            &wg_if,
            &[
                "private-key",
                &key,
                "listen-port",
                &port,
                "peer",
                &peer_key,
                "endpoint",
                &endpoint,
                "allowed-ips",
                &allowed,
            ],
        )?;
        // wg-quick's MTU for a 1500-byte link (1500 - 80): what its users
        // get. The TUN default of 1500 would fragment every full datagram.
        ipc(&format!(
            "-n {gw} link set {wg_if} mtu {BORINGTUN_CLI_MTU} up"
        ))?;
        ipc(&format!("-n {gw} route add {} dev {wg_if}", peer.pod_cidr))?;
    }
    Ok(())
}

const TUNNEL_PORT: u16 = 4789;
const POLICY_TABLE: u32 = 100;

fn kernel_reference(bed: &Testbed) -> Result<()> {
    for (own, peer) in clusters(bed) {
        let gw = bed.ns(own, "gw");
        let gw_ip = own.underlay_ip(1);
        netns::sysctl(&gw, "net.ipv4.ip_forward", "1")?;
        // Per-node tunnels, each with its own VNI (one VNI per socket).
        for (n, node) in ["n1", "n2"].iter().enumerate() {
            let i = n + 1;
            let node_ns = bed.ns(own, node);
            let node_ip = own.underlay_ip(11 + n as u8);
            let vni = 100 + i;
            for line in [
                format!("-n {node_ns} link add vxgw type vxlan id {vni} local {node_ip} remote {gw_ip} dstport {TUNNEL_PORT} dev eth0"),
                format!("-n {node_ns} link set vxgw up"),
                format!("-n {node_ns} addr add 172.31.{i}.2/30 dev vxgw"),
                format!("-n {node_ns} route add {} via 172.31.{i}.1 dev vxgw", own.view_of_peer),
                format!("-n {gw} link add vx{node} type vxlan id {vni} local {gw_ip} remote {node_ip} dstport {TUNNEL_PORT} dev eth0"),
                format!("-n {gw} link set vx{node} up"),
                format!("-n {gw} addr add 172.31.{i}.1/30 dev vx{node}"),
                format!("-n {gw} route add {} via 172.31.{i}.2 dev vx{node} table {POLICY_TABLE}", own.node_slices[n]),
                format!("-n {gw} route add {} via 172.31.{i}.2 dev vx{node}", own.node_slices[n]),
            ] {
                ipc(&line)?;
            }
        }
        // Gateway-to-gateway tunnel; arrivals from the peer use the policy table.
        let (mine, theirs) = if own.name == "a" { (1, 2) } else { (2, 1) };
        for line in [
            format!("-n {gw} link add vxpeer type vxlan id 1000 local {} remote {} dstport {TUNNEL_PORT} dev eth1", own.public_ip, peer.public_ip),
            format!("-n {gw} link set vxpeer up"),
            format!("-n {gw} addr add 172.31.100.{mine}/30 dev vxpeer"),
            format!("-n {gw} route add {} via 172.31.100.{theirs} dev vxpeer", peer.pod_cidr),
            format!("-n {gw} rule add iif vxpeer lookup {POLICY_TABLE} pref 100"),
        ] {
            ipc(&line)?;
        }
        // Prefix DNAT toward the peer's real CIDR, prefix SNAT of arrivals
        // into our view of the peer; conntrack undoes both for replies.
        let rules = format!(
            "table ip ligo_reference {{\n\
             \tchain prerouting {{ type nat hook prerouting priority dstnat; ip daddr {view} dnat ip prefix to {real}; }}\n\
             \tchain postrouting {{ type nat hook postrouting priority srcnat; iifname \"vxpeer\" ip saddr {peer_real} snat ip prefix to {our_view}; }}\n\
             }}\n",
            view = own.view_of_peer,
            real = peer.pod_cidr,
            peer_real = peer.pod_cidr,
            our_view = own.view_of_peer,
        );
        let path = std::env::temp_dir().join(format!("{gw}.nft"));
        std::fs::write(&path, rules)?;
        netns::exec(&gw, "nft", &["-f", &path.to_string_lossy()])?;
        let _ = std::fs::remove_file(&path);
    }
    Ok(())
}
