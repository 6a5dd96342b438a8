//! `ligo-fabric inspect`: the state of a running daemon, read from its pinned
//! maps, as tables for people or JSON for scripts.

use std::{fmt::Write as _, net::Ipv4Addr};

use ligo_fabric_common::maps::{Direction, FabricConfig, Role};
use serde_json::{json, Value};

use crate::fabric_maps::Snapshot;

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
            "endpoint": format!("{}:{}", ip(p.endpoint_ip), u16::from_be_bytes(p.endpoint_port)),
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
            format!(
                "{}:{}",
                ip(p.endpoint_ip),
                u16::from_be_bytes(p.endpoint_port)
            )
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
