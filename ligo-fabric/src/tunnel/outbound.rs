//! Outbound: node frames in (GSO super-frames cut to the tunnel MTU),
//! encrypted datagrams out in UDP GSO runs.

use boringtun::noise::TunnResult;

use super::{
    batch::{BatchSocket, GsoBatch},
    packet::{for_each_tunnel_packet, parse_fabric_payload, TunnelDrop},
    peers::PeerTable,
    shared::Shared,
    sockets::{serve, Received},
    RECV_BUF,
};

/// Node frames in, encrypted datagrams out.
pub(super) fn outbound(shared: &Shared, worker: usize) {
    let wireguard = &shared.wireguard[worker];
    let mut scratch = Vec::with_capacity(RECV_BUF);
    let mut batch = GsoBatch::new(wireguard.state.max_gso_segments());
    serve(shared, &shared.fabric[worker], |received| match received {
        Received::Datagram(table, _, frame) => {
            if let Err(reason) =
                encrypt_frame(shared, table, frame, &mut scratch, &mut batch, wireguard)
            {
                shared.count_drop(reason);
            }
        }
        Received::BatchDone => {
            batch.flush(wireguard);
        }
    });
}

fn encrypt_frame(
    shared: &Shared,
    table: &PeerTable,
    frame: &[u8],
    scratch: &mut Vec<u8>,
    batch: &mut GsoBatch,
    wireguard: &BatchSocket,
) -> Result<(), TunnelDrop> {
    let (vni, inner) = parse_fabric_payload(frame)?;
    let peer = table.by_id.get(&vni).ok_or(TunnelDrop::UnknownPeer)?;
    let endpoint = peer.endpoint();
    let mut tunn = peer.tunn();
    let (mut packets, mut bytes) = (0u64, 0u64);
    let mut failure = None;
    for_each_tunnel_packet(inner, shared.inner_mtu, scratch, |packet| {
        let reserved = packet.len() + 32;
        let room = batch.reserve(endpoint, reserved.max(148), wireguard);
        let kept = match tunn.encapsulate(packet, room) {
            TunnResult::WriteToNetwork(datagram) if datagram.first() == Some(&4) => {
                packets += 1;
                bytes += packet.len() as u64;
                datagram.len()
            }
            // No session yet: boringtun queued the packet and asks to send
            // a handshake initiation.
            TunnResult::WriteToNetwork(handshake) => {
                let _ = wireguard.send_one(endpoint, handshake);
                0
            }
            TunnResult::Err(_) => {
                failure = Some(TunnelDrop::HandshakeRefused);
                0
            }
            _ => 0,
        };
        batch.commit(reserved.max(148), kept);
    })?;
    drop(tunn);
    peer.sent(packets, bytes, shared.now_ms());
    failure.map_or(Ok(()), Err)
}
