//! Inbound: WireGuard datagrams in (by session index or, for handshakes,
//! the sender's static key), decrypted and checked packets out to the
//! tunnel device, coalesced as GRO would; and the datagrams a hand-over
//! partner passes on for our sessions.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use boringtun::noise::{
    errors::WireGuardError, handshake::parse_handshake_anon, Packet, TunnResult,
};

use super::{
    batch::BatchSocket,
    packet::{Coalescer, TunnelDrop},
    peers::{PeerTable, PeerTunnel},
    shared::{refresh, Shared},
    sockets::{serve, Received},
    RECV_BUF,
};

/// The receiver index of a handshake response, cookie reply or data
/// datagram (without boringtun's low byte).
pub(super) fn receiver_index(datagram: &[u8]) -> Option<u32> {
    let at = match datagram.first()? {
        2 => 8,
        3 | 4 => 4,
        _ => return None,
    };
    let b = datagram.get(at..at + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) >> 8)
}

/// Datagrams the hand-over partner read that belong to our sessions.
pub(super) fn from_partner(shared: &Shared, queue: usize) {
    let mut buf = vec![0u8; RECV_BUF + 6];
    let mut plain = vec![0u8; RECV_BUF];
    let mut coalescer = Coalescer::default();
    let mut write = |frame: &[u8]| {
        if shared.device.write(queue, frame).is_err() {
            shared.count_drop(TunnelDrop::SendFailed);
        }
    };
    let mut table = shared.snapshot();
    let mut generation = 0;
    while !shared.stop.load(Ordering::Relaxed) {
        let Some(partner) = shared.wait_for_partner() else {
            continue;
        };
        let _ = partner.set_read_timeout(Some(Duration::from_millis(100)));
        let Ok(n) = partner.recv(&mut buf) else {
            coalescer.flush(&mut write);
            continue;
        };
        refresh(shared, &mut table, &mut generation);
        if n < 6 {
            shared.partner_delivered.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        shared
            .last_forward_ms
            .store(shared.now_ms(), Ordering::Relaxed);
        let from = SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::new(buf[0], buf[1], buf[2], buf[3]),
            u16::from_be_bytes([buf[4], buf[5]]),
        ));
        decrypt_datagram(
            shared,
            &table,
            from,
            &buf[6..n],
            &mut plain,
            &mut |peer, packet| coalescer.push(peer, packet, &mut write),
            &shared.wireguard[0],
        );
        coalescer.flush(&mut write);
        shared.partner_delivered.fetch_add(1, Ordering::SeqCst);
    }
}

/// Why a datagram found no peer of ours.
enum NoPeer {
    /// Refused and counted.
    Dropped,
    /// Under load: send this many bytes of cookie reply back.
    Cookie(usize),
}

/// Which peer a WireGuard datagram is for, by its receiver index (our
/// session index, shifted by 8 as boringtun keeps a session ring below it)
/// or, for a handshake initiation, by the sender's static key.
fn peer_for_datagram(
    shared: &Shared,
    table: &PeerTable,
    from: SocketAddr,
    datagram: &[u8],
    cookie: &mut [u8],
) -> Result<Arc<PeerTunnel>, NoPeer> {
    let by_index = || -> Result<Arc<PeerTunnel>, NoPeer> {
        let index = receiver_index(datagram).ok_or_else(|| {
            shared.count_drop(TunnelDrop::MalformedDatagram);
            NoPeer::Dropped
        })?;
        table.by_index.get(&index).cloned().ok_or_else(|| {
            shared.count_drop(TunnelDrop::UnknownPeer);
            NoPeer::Dropped
        })
    };
    match datagram.first() {
        Some(2..=4) => by_index(),
        Some(1) => {
            let packet = match shared
                .limiter
                .verify_packet(Some(from.ip()), datagram, cookie)
            {
                Ok(Packet::HandshakeInit(p)) => p,
                Ok(_) => {
                    shared.count_drop(TunnelDrop::MalformedDatagram);
                    return Err(NoPeer::Dropped);
                }
                Err(TunnResult::WriteToNetwork(reply)) => {
                    shared.count_drop(TunnelDrop::HandshakeRefused);
                    return Err(NoPeer::Cookie(reply.len()));
                }
                Err(TunnResult::Err(e)) => {
                    shared.count_drop(classify(&e));
                    return Err(NoPeer::Dropped);
                }
                Err(_) => return Err(NoPeer::Dropped),
            };
            let half =
                parse_handshake_anon(&shared.private, &shared.public, &packet).map_err(|e| {
                    shared.count_drop(classify(&e));
                    NoPeer::Dropped
                })?;
            table
                .by_key
                .get(&half.peer_static_public)
                .cloned()
                .ok_or_else(|| {
                    shared.count_drop(TunnelDrop::UnknownPeer);
                    NoPeer::Dropped
                })
        }
        _ => {
            shared.count_drop(TunnelDrop::MalformedDatagram);
            Err(NoPeer::Dropped)
        }
    }
}

fn classify(e: &WireGuardError) -> TunnelDrop {
    match e {
        WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter => TunnelDrop::Replayed,
        WireGuardError::WrongKey
        | WireGuardError::InvalidMac
        | WireGuardError::InvalidAeadTag
        | WireGuardError::WrongTai64nTimestamp
        | WireGuardError::InvalidTai64nTimestamp => TunnelDrop::AuthenticationFailed,
        WireGuardError::WrongIndex | WireGuardError::NoCurrentSession => TunnelDrop::UnknownPeer,
        WireGuardError::UnderLoad | WireGuardError::UnexpectedPacket => {
            TunnelDrop::HandshakeRefused
        }
        _ => TunnelDrop::MalformedDatagram,
    }
}

/// WireGuard datagrams in; decrypted packets out to the tunnel device,
/// whose program sends them on to the nodes.
pub(super) fn inbound(shared: &Shared, worker: usize) {
    let wireguard = &shared.wireguard[worker];
    let mut plain = vec![0u8; RECV_BUF];
    let mut coalescer = Coalescer::default();
    let mut write = |frame: &[u8]| {
        if shared.device.write(worker, frame).is_err() {
            shared.count_drop(TunnelDrop::SendFailed);
        }
    };
    serve(shared, wireguard, |received| match received {
        Received::Datagram(table, from, datagram) => {
            if shared.other_epoch(datagram) {
                // What we decrypted before reaches the device before what
                // the partner decrypts of this: order across a hand-over's
                // session switch.
                coalescer.flush(&mut write);
                if shared.forward(from, datagram) {
                    return;
                }
            }
            decrypt_datagram(
                shared,
                table,
                from,
                datagram,
                &mut plain,
                &mut |peer, packet| coalescer.push(peer, packet, &mut write),
                wireguard,
            )
        }
        Received::BatchDone => coalescer.flush(&mut write),
    });
}

fn decrypt_datagram(
    shared: &Shared,
    table: &PeerTable,
    from: SocketAddr,
    datagram: &[u8],
    plain: &mut [u8],
    deliver: &mut impl FnMut(u32, &[u8]),
    wireguard: &BatchSocket,
) {
    let from = match from {
        // The socket is IPv4; map an IPv4-mapped address back.
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(ip) => SocketAddr::new(IpAddr::V4(ip), v6.port()),
            None => return shared.count_drop(TunnelDrop::MalformedDatagram),
        },
        v4 => v4,
    };
    let peer = match peer_for_datagram(shared, table, from, datagram, plain) {
        Ok(peer) => peer,
        Err(NoPeer::Cookie(len)) => {
            let _ = wireguard.send_one(from, &plain[..len]);
            return;
        }
        Err(NoPeer::Dropped) => return,
    };
    let now = shared.now_ms();
    let mut tunn = peer.tunn();
    match tunn.decapsulate(Some(from.ip()), datagram, plain) {
        TunnResult::WriteToTunnelV4(packet, source) => {
            peer.authenticated_from(from, now);
            if !peer.spec.pod_cidr.contains(source) {
                return shared.count_drop(TunnelDrop::SourceNotAllowed);
            }
            let Some(dst) = packet.get(16..20) else {
                return shared.count_drop(TunnelDrop::MalformedPacket);
            };
            if table
                .slices
                .lookup([dst[0], dst[1], dst[2], dst[3]])
                .is_none()
            {
                return shared.count_drop(TunnelDrop::NoNodeForDestination);
            }
            peer.rx_packets.fetch_add(1, Ordering::Relaxed);
            peer.rx_bytes
                .fetch_add(packet.len() as u64, Ordering::Relaxed);
            deliver(peer.spec.id, packet);
        }
        TunnResult::WriteToTunnelV6(..) => shared.count_drop(TunnelDrop::NotIpv4),
        TunnResult::WriteToNetwork(reply) => {
            if matches!(datagram.first(), Some(1) | Some(2)) {
                peer.authenticated_from(from, now);
            }
            let _ = wireguard.send_one(from, reply);
            // A completed handshake releases the packets boringtun queued
            // while it ran.
            for _ in 0..256 {
                match tunn.decapsulate(None, &[], plain) {
                    TunnResult::WriteToNetwork(queued) => {
                        let _ = wireguard.send_one(peer.endpoint(), queued);
                    }
                    _ => break,
                }
            }
        }
        TunnResult::Done => {
            // A keepalive (authenticated, empty) or a cookie reply.
            if datagram.first() == Some(&4) {
                peer.authenticated_from(from, now);
            }
        }
        TunnResult::Err(e) => shared.count_drop(classify(&e)),
    }
}
