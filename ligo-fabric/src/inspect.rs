//! `ligo-fabric inspect`: the state of a running daemon, read from its pinned
//! maps, as tables for people or JSON for scripts.

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr};

use ipnetwork::Ipv4Network;
use ligo_fabric_common::maps::{Direction, FabricConfig, Role, TrafficCounters};
use serde_json::{json, Value};

use crate::{clock, fabric_maps::Snapshot, routes::RouteTarget};

/// Peer id -> name, from the daemon's config when `inspect` was given it.
pub type PeerNames = BTreeMap<u32, String>;

fn ip(b: [u8; 4]) -> Ipv4Addr {
    Ipv4Addr::from(b)
}

fn role_name(cfg: &FabricConfig) -> &'static str {
    match cfg.role() {
        Role::Node => "node",
        Role::Gateway => "gateway",
        Role::Unconfigured => "unconfigured",
    }
}

fn cidr(network: [u8; 4], host_mask: [u8; 4]) -> String {
    let len = 32 - u32::from_be_bytes(host_mask).count_ones();
    format!("{}/{len}", ip(network))
}

/// A peer's gateway endpoint, or "-" where none is configured (nodes).
fn endpoint(p: &ligo_fabric_common::maps::Peer) -> String {
    if p.endpoint_ip == [0; 4] {
        return "-".into();
    }
    format!(
        "{}:{}",
        ip(p.endpoint_ip),
        u16::from_be_bytes(p.endpoint_port)
    )
}

fn direction_name(d: u32) -> &'static str {
    if d == Direction::ToPeer as u32 {
        "to_peer"
    } else {
        "from_peer"
    }
}

pub fn maps_json(s: &Snapshot) -> Value {
    let c = &s.config;
    json!({
        "config": {
            "role": role_name(c),
            "cluster_id": c.cluster_id,
            "underlay_ip": ip(c.underlay_ip).to_string(),
            "gateway_ip": ip(c.gateway_ip).to_string(),
            "public_ip": ip(c.public_ip).to_string(),
            "fabric_port": u16::from_be_bytes(c.fabric_port),
        },
        "peers": s.peers.iter().map(|(id, p)| json!({
            "id": id,
            "pod_cidr": cidr(p.real_to_view.from_network, p.real_to_view.host_mask),
            "view_cidr": cidr(p.real_to_view.to_network, p.real_to_view.host_mask),
            "endpoint": endpoint(p),
        })).collect::<Vec<_>>(),
        "peer_views": s.peer_views.iter().map(|((addr, len), v)| json!({
            "view_cidr": format!("{addr}/{len}"),
            "peer_id": v.peer_id,
            "pod_cidr": cidr(v.view_to_real.to_network, v.view_to_real.host_mask),
        })).collect::<Vec<_>>(),
        "peer_endpoints": s.peer_endpoints.iter().map(|(addr, id)| json!({
            "endpoint_ip": ip(*addr).to_string(), "peer_id": id,
        })).collect::<Vec<_>>(),
        "node_slices": s.node_slices.iter().map(|((addr, len), n)| json!({
            "pod_cidr": format!("{addr}/{len}"), "node_ip": ip(n.node_ip).to_string(),
        })).collect::<Vec<_>>(),
        "pod_interfaces": s.pod_interfaces.iter().collect::<Vec<_>>(),
        "counters": s.peer_counters.iter().map(|((peer, dir), c)| json!({
            "peer_id": peer, "direction": direction_name(*dir),
            "packets": c.packets, "bytes": c.bytes,
        })).collect::<Vec<_>>(),
        "drops": s.drops.iter().map(|(reason, n)| json!({
            "reason": reason.name(), "packets": n,
        })).collect::<Vec<_>>(),
    })
}

pub fn maps_table(s: &Snapshot) -> String {
    let c = &s.config;
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "role {}  cluster {}  underlay {}  gateway {}  public {}  port {}",
        role_name(c),
        c.cluster_id,
        ip(c.underlay_ip),
        ip(c.gateway_ip),
        ip(c.public_ip),
        u16::from_be_bytes(c.fabric_port)
    );
    let _ = writeln!(
        out,
        "\nPEERS\n{:<8} {:<20} {:<20} {:<22}",
        "ID", "POD CIDR", "VIEW CIDR", "ENDPOINT"
    );
    for (id, p) in &s.peers {
        let _ = writeln!(
            out,
            "{:<8} {:<20} {:<20} {:<22}",
            id,
            cidr(p.real_to_view.from_network, p.real_to_view.host_mask),
            cidr(p.real_to_view.to_network, p.real_to_view.host_mask),
            endpoint(p)
        );
    }
    let _ = writeln!(
        out,
        "\nPEER VIEWS\n{:<20} {:<8} {:<20}",
        "VIEW CIDR", "PEER", "REWRITTEN TO"
    );
    for ((addr, len), v) in &s.peer_views {
        let _ = writeln!(
            out,
            "{:<20} {:<8} {:<20}",
            format!("{addr}/{len}"),
            v.peer_id,
            cidr(v.view_to_real.to_network, v.view_to_real.host_mask)
        );
    }
    let _ = writeln!(out, "\nNODE SLICES\n{:<20} {:<16}", "POD CIDR", "NODE");
    for ((addr, len), n) in &s.node_slices {
        let _ = writeln!(out, "{:<20} {:<16}", format!("{addr}/{len}"), ip(n.node_ip));
    }
    let _ = writeln!(
        out,
        "\nCOUNTERS\n{:<8} {:<10} {:>12} {:>14}",
        "PEER", "DIRECTION", "PACKETS", "BYTES"
    );
    for ((peer, dir), cnt) in &s.peer_counters {
        let _ = writeln!(
            out,
            "{:<8} {:<10} {:>12} {:>14}",
            peer,
            direction_name(*dir),
            cnt.packets,
            cnt.bytes
        );
    }
    let _ = writeln!(out, "\nDROPS\n{:<26} {:>12}", "REASON", "PACKETS");
    for (reason, n) in &s.drops {
        let _ = writeln!(out, "{:<26} {:>12}", reason.name(), n);
    }
    out
}

fn traffic(s: &Snapshot, peer: u32, direction: Direction) -> TrafficCounters {
    s.peer_counters
        .get(&(peer, direction as u32))
        .copied()
        .unwrap_or_default()
}

fn peer_name(names: &PeerNames, id: u32) -> String {
    names.get(&id).cloned().unwrap_or_else(|| "-".into())
}

fn traffic_json(c: TrafficCounters) -> Value {
    json!({
        "packets": c.packets,
        "bytes": c.bytes,
        "last_packet_unix_seconds": clock::unix_seconds(c.last_seen_ns),
        "last_packet_age_seconds": clock::age(c.last_seen_ns).map(|a| a.as_secs_f64()),
    })
}

fn drops_json(s: &Snapshot) -> Value {
    s.drops
        .iter()
        .map(|(reason, n)| (reason.name().to_string(), json!(n)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// `inspect peers`: per peer, the mapping, the endpoint, traffic both ways
/// and when the last packet went each way; then drops by reason.
pub fn peers_json(s: &Snapshot, names: &PeerNames) -> Value {
    json!({
        "role": role_name(&s.config),
        "peers": s.peers.iter().map(|(id, p)| json!({
            "id": id,
            "name": names.get(id),
            "pod_cidr": cidr(p.real_to_view.from_network, p.real_to_view.host_mask),
            "view_cidr": cidr(p.real_to_view.to_network, p.real_to_view.host_mask),
            "endpoint": endpoint(p),
            "to_peer": traffic_json(traffic(s, *id, Direction::ToPeer)),
            "from_peer": traffic_json(traffic(s, *id, Direction::FromPeer)),
        })).collect::<Vec<_>>(),
        "drops": drops_json(s),
    })
}

pub fn peers_table(s: &Snapshot, names: &PeerNames) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<6} {:<14} {:<18} {:<18} {:<20} {:>10} {:>12} {:<12} {:>10} {:>12} {:<12}",
        "PEER",
        "NAME",
        "POD CIDR",
        "VIEW CIDR",
        "ENDPOINT",
        "TX PKTS",
        "TX BYTES",
        "LAST TX",
        "RX PKTS",
        "RX BYTES",
        "LAST RX"
    );
    for (id, p) in &s.peers {
        let (tx, rx) = (
            traffic(s, *id, Direction::ToPeer),
            traffic(s, *id, Direction::FromPeer),
        );
        let _ = writeln!(
            out,
            "{:<6} {:<14} {:<18} {:<18} {:<20} {:>10} {:>12} {:<12} {:>10} {:>12} {:<12}",
            id,
            peer_name(names, *id),
            cidr(p.real_to_view.from_network, p.real_to_view.host_mask),
            cidr(p.real_to_view.to_network, p.real_to_view.host_mask),
            endpoint(p),
            tx.packets,
            tx.bytes,
            clock::human_age(tx.last_seen_ns),
            rx.packets,
            rx.bytes,
            clock::human_age(rx.last_seen_ns),
        );
    }
    let dropped: Vec<_> = s.drops.iter().filter(|(_, n)| *n > 0).collect();
    if dropped.is_empty() {
        let _ = writeln!(out, "\nno drops");
    } else {
        let _ = writeln!(out, "\nDROPS (all peers)");
        for (reason, n) in dropped {
            let _ = writeln!(out, "{:<26} {:>12}", reason.name(), n);
        }
    }
    out
}

/// `inspect counters`: the raw per-peer counters and every drop reason.
pub fn counters_json(s: &Snapshot, names: &PeerNames) -> Value {
    json!({
        "counters": s.peer_counters.iter().map(|((peer, dir), c)| json!({
            "peer_id": peer,
            "peer": names.get(peer),
            "direction": direction_name(*dir),
            "packets": c.packets,
            "bytes": c.bytes,
        })).collect::<Vec<_>>(),
        "drops": drops_json(s),
    })
}

pub fn counters_table(s: &Snapshot, names: &PeerNames) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<6} {:<14} {:<10} {:>12} {:>14}",
        "PEER", "NAME", "DIRECTION", "PACKETS", "BYTES"
    );
    for ((peer, dir), c) in &s.peer_counters {
        let _ = writeln!(
            out,
            "{:<6} {:<14} {:<10} {:>12} {:>14}",
            peer,
            peer_name(names, *peer),
            direction_name(*dir),
            c.packets,
            c.bytes
        );
    }
    let _ = writeln!(out, "\n{:<26} {:>12}", "DROP REASON", "PACKETS");
    for (reason, n) in &s.drops {
        let _ = writeln!(out, "{:<26} {:>12}", reason.name(), n);
    }
    out
}

/// `inspect routes`: the steering routes the daemon owns in this namespace.
pub fn routes_json(
    routes: &BTreeMap<Ipv4Network, RouteTarget>,
    interface_names: &BTreeMap<u32, String>,
) -> Value {
    json!(routes
        .iter()
        .map(|(dst, t)| json!({
            "destination": dst.to_string(),
            "via": t.via.to_string(),
            "interface": interface_names.get(&t.oif),
            "mtu": t.mtu,
        }))
        .collect::<Vec<_>>())
}

pub fn routes_table(
    routes: &BTreeMap<Ipv4Network, RouteTarget>,
    interface_names: &BTreeMap<u32, String>,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:<16} {:<12} {:>6}",
        "DESTINATION", "VIA", "DEV", "MTU"
    );
    for (dst, t) in routes {
        let dev = interface_names
            .get(&t.oif)
            .cloned()
            .unwrap_or_else(|| t.oif.to_string());
        let _ = writeln!(
            out,
            "{:<20} {:<16} {:<12} {:>6}",
            dst.to_string(),
            t.via.to_string(),
            dev,
            t.mtu
        );
    }
    out
}

/// The tunnel state a gateway daemon serves at `/tunnels`.
pub fn fetch_tunnels(address: std::net::SocketAddr) -> anyhow::Result<serde_json::Value> {
    use anyhow::Context as _;
    let url = format!("http://{address}/tunnels");
    let mut response = ureq::get(&url).call().map_err(|e| match e {
        ureq::Error::StatusCode(404) => anyhow::anyhow!(
            "the daemon at {address} runs no WireGuard tunnel (not a gateway, or no peer uses transport = \"wireguard\")"
        ),
        e => anyhow::anyhow!("cannot reach the daemon at {url}: {e}; is it running, and is this its metrics_address?"),
    })?;
    let body = response
        .body_mut()
        .read_to_string()
        .context("reading /tunnels")?;
    serde_json::from_str(&body).context("parsing /tunnels")
}

/// `inspect tunnels` as a table.
pub fn tunnels_table(status: &serde_json::Value) -> String {
    let mut out = format!(
        "listen {}  public key {}  inner MTU {}\n\n",
        status["listen"].as_str().unwrap_or("?"),
        status["public_key"].as_str().unwrap_or("?"),
        status["inner_mtu"]
    );
    out += &format!(
        "{:<14} {:<46} {:<22} {:>10} {:>5} {:>14} {:>14}\n",
        "PEER", "PUBLIC KEY", "ENDPOINT", "HANDSHAKE", "UP", "SENT", "RECEIVED"
    );
    for p in status["peers"].as_array().into_iter().flatten() {
        let handshake = p["latest_handshake_seconds_ago"]
            .as_f64()
            .map(|s| format!("{s:.0}s ago"))
            .unwrap_or_else(|| "never".into());
        out += &format!(
            "{:<14} {:<46} {:<22} {:>10} {:>5} {:>14} {:>14}\n",
            p["name"].as_str().unwrap_or("?"),
            p["public_key"].as_str().unwrap_or("?"),
            p["endpoint"].as_str().unwrap_or("?"),
            handshake,
            if p["up"].as_bool() == Some(true) {
                "yes"
            } else {
                "NO"
            },
            format!("{} B", p["tx_bytes"]),
            format!("{} B", p["rx_bytes"]),
        );
    }
    let drops: Vec<String> = status["drops"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d[1].as_u64().unwrap_or(0) > 0)
        .map(|d| format!("{} {}", d[0].as_str().unwrap_or("?"), d[1]))
        .collect();
    out += &format!(
        "\ndrops: {}\n",
        if drops.is_empty() {
            "none".into()
        } else {
            drops.join(", ")
        }
    );
    out
}
