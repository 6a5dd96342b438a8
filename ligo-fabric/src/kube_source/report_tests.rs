use super::*;
use crate::{config::parse, tunnel::status::PeerStatus};

const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

fn gateway() -> Programmed {
    let cfg = parse(&format!(
        r#"
cluster_id = 1
pod_cidrs = ["10.244.0.0/16"]
[gateway]
underlay_interface = "eth0"
underlay_ip = "192.0.2.1"
public_interface = "eth1"
public_ip = "203.0.113.1"
node_slices = [{{ node_ip = "192.0.2.11", pod_cidr = "10.244.1.0/24" }},
               {{ node_ip = "192.0.2.1", pod_cidr = "10.244.0.0/24" }}]
private_key_file = "/etc/ligo/key"
[[peers]]
id = 3
name = "c"
pod_cidr = "10.244.0.0/16"
view_cidr = "10.246.0.0/16"
transport = "plain"
endpoint = "203.0.113.3:4799"
[[peers]]
id = 2
name = "b"
pod_cidr = "10.244.0.0/16"
view_cidr = "10.245.0.0/16"
endpoint = "203.0.113.2:51820"
public_key = "{KEY}"
"#
    ))
    .expect("a gateway configuration");
    Programmed {
        revisions: 4,
        state: Some((cfg.local, cfg.spec)),
        refused: None,
    }
}

fn tunnel(handshake: Option<f64>, rx_bytes: u64) -> TunnelStatus {
    TunnelStatus {
        public_key: KEY.into(),
        listen: "203.0.113.1:51820".into(),
        inner_mtu: 1440,
        peers: vec![PeerStatus {
            id: 2,
            name: "b".into(),
            public_key: KEY.into(),
            endpoint: "203.0.113.2:51820".into(),
            latest_handshake_seconds_ago: handshake,
            up: true,
            tx_bytes: 100,
            tx_packets: 1,
            rx_bytes,
            rx_packets: 1,
        }],
        drops: vec![],
    }
}

#[test]
fn a_gateway_reports_its_own_slices_its_peers_and_their_links() {
    let status = status_of(
        &gateway(),
        Some(&Ok(tunnel(Some(3.7), 200))),
        &[],
        "2026-12-06T12:00:00Z",
    );
    assert_eq!(
        status.pod_cidrs,
        ["10.244.0.0/24"],
        "only this node's slice"
    );
    assert_eq!(status.programmed_peers, ["b", "c"]);
    assert_eq!(status.programmed_generation, Some(4));
    let b = &status.peers[0];
    assert_eq!(
        (
            b.peer.as_str(),
            b.link.handshake_age_seconds,
            b.link.rx_bytes
        ),
        ("b", Some(3), 200)
    );
    assert_eq!(b.link.transport.as_deref(), Some("wireguard"));
    let c = &status.peers[1];
    assert_eq!((c.peer.as_str(), c.link.handshake_age_seconds), ("c", None));
    assert_eq!(c.link.transport.as_deref(), Some("plain"));
    let programmed = &status.conditions[0];
    assert_eq!(
        (programmed.status.as_str(), programmed.reason.as_str()),
        ("True", "Programmed")
    );
    assert!(
        programmed.message.contains("2 peer(s)"),
        "{}",
        programmed.message
    );
}

#[test]
fn a_refusal_and_a_silent_tunnel_process_turn_programmed_false() {
    let mut refused = gateway();
    refused.refused = Some("Peer/b: bad key".into());
    let status = status_of(&refused, None, &[], "2026-12-06T12:00:00Z");
    let c = &status.conditions[0];
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "RevisionRefused")
    );
    assert_eq!(c.message, "Peer/b: bad key");

    let silent = status_of(
        &gateway(),
        Some(&Err("does not answer on /run/x.sock".into())),
        &[],
        "2026-12-06T12:00:00Z",
    );
    let c = &silent.conditions[0];
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "TunnelProcessNotAnswering")
    );
    // The transition time stays while the status does.
    let later = status_of(
        &gateway(),
        Some(&Err("does not answer on /run/x.sock".into())),
        &silent.conditions,
        "2026-12-06T12:05:00Z",
    );
    assert_eq!(
        later.conditions[0].last_transition_time,
        "2026-12-06T12:00:00Z"
    );
}

#[test]
fn byte_counts_and_handshake_ageing_alone_are_not_worth_a_write() {
    let now = "2026-12-06T12:00:00Z";
    let before = status_of(&gateway(), Some(&Ok(tunnel(Some(1.0), 10))), &[], now);
    let busier = status_of(&gateway(), Some(&Ok(tunnel(Some(9.0), 99_999))), &[], now);
    assert!(!changed_beyond_figures(&before, &busier));
    let no_handshake = status_of(&gateway(), Some(&Ok(tunnel(None, 10))), &[], now);
    assert!(changed_beyond_figures(&no_handshake, &before));
    let mut fewer = gateway();
    if let Some((_, spec)) = &mut fewer.state {
        spec.peers.remove(&3);
    }
    let fewer = status_of(&fewer, Some(&Ok(tunnel(Some(1.0), 10))), &[], now);
    assert!(changed_beyond_figures(&before, &fewer));
}

#[test]
fn nothing_programmed_yet_is_unknown() {
    let status = status_of(&Programmed::default(), None, &[], "2026-12-06T12:00:00Z");
    assert_eq!(status.conditions[0].status, "Unknown");
    assert!(status.programmed_peers.is_empty());
}
