//! The tunnel's UDP sockets (SO_REUSEPORT, one pair per worker) and the
//! receive loop every worker runs.

use std::{
    io::IoSliceMut,
    net::{SocketAddr, SocketAddrV4, UdpSocket},
    sync::atomic::Ordering,
    time::Duration,
};

use anyhow::{Context, Result};
use quinn_udp::RecvMeta;
use socket2::{Domain, Protocol, Socket, Type};
use tracing::warn;

use super::{
    batch::BatchSocket,
    peers::PeerTable,
    shared::{refresh, Shared},
    RECV_BATCH, RECV_BUF,
};

/// Which socket: frames to and from nodes, or WireGuard to peers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum SocketRole {
    Fabric,
    Wireguard,
}

pub(super) fn reuseport_socket(addr: SocketAddrV4, role: SocketRole) -> Result<BatchSocket> {
    let what = match role {
        SocketRole::Fabric => "fabric (from nodes)",
        SocketRole::Wireguard => "WireGuard",
    };
    let make = || -> std::io::Result<UdpSocket> {
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        socket.set_reuse_port(true)?;
        if role == SocketRole::Fabric {
            // Fabric frames carry UDP checksum 0 (RFC 7348 allows it over
            // IPv4), as the gateway program sends them. It also keeps the
            // frame from reaching a node over veth as CHECKSUM_PARTIAL for
            // the outer header, which the node program's inner checksum
            // updates would misread.
            set_no_udp_checksum(&socket)?;
        }
        // Best effort: bursts of GSO-sized batches need deep buffers.
        let _ = socket.set_recv_buffer_size(8 << 20);
        let _ = socket.set_send_buffer_size(8 << 20);
        socket.bind(&addr.into())?;
        Ok(socket.into())
    };
    let socket = make().with_context(|| format!("binding the {what} socket on {addr}"))?;
    BatchSocket::new(socket).with_context(|| format!("setting up the {what} socket on {addr}"))
}

fn set_no_udp_checksum(socket: &Socket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: SO_NO_CHECK takes an int; the pointer and length describe `on`.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NO_CHECK,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Receives a batch into `bufs`; `None` on timeout or a transient error.
fn receive(sender: &BatchSocket, bufs: &mut [Vec<u8>], metas: &mut [RecvMeta]) -> Option<usize> {
    // Short enough that a pause (hand-over) or shutdown is noticed fast.
    if !sender.wait_readable(50) {
        return None;
    }
    let mut slices: Vec<IoSliceMut<'_>> = bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
    match sender
        .state
        .recv((&sender.socket).into(), &mut slices, metas)
    {
        Ok(n) => Some(n),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::Interrupted
            ) =>
        {
            None
        }
        Err(e) => {
            warn!(error = %e, "tunnel socket receive failed; retrying");
            std::thread::sleep(Duration::from_millis(10));
            None
        }
    }
}

/// What a worker does with each received datagram, and after each batch.
pub(super) enum Received<'a> {
    Datagram(&'a PeerTable, SocketAddr, &'a [u8]),
    BatchDone,
}

/// A worker's loop: receives batches on `socket` until shutdown (GRO
/// batches split at their stride), with the peer table current.
pub(super) fn serve(shared: &Shared, socket: &BatchSocket, mut handle: impl FnMut(Received<'_>)) {
    let mut bufs = vec![vec![0u8; RECV_BUF]; RECV_BATCH];
    let mut metas = vec![RecvMeta::default(); RECV_BATCH];
    let mut table = shared.snapshot();
    let mut generation = 0;
    while !shared.stop.load(Ordering::Relaxed) {
        if shared.paused.load(Ordering::SeqCst) {
            shared.parked.fetch_add(1, Ordering::SeqCst);
            while shared.paused.load(Ordering::SeqCst) && !shared.stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(1));
            }
            shared.parked.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let Some(n) = receive(socket, &mut bufs, &mut metas) else {
            continue;
        };
        refresh(shared, &mut table, &mut generation);
        for (buf, meta) in bufs.iter().zip(&metas).take(n) {
            for datagram in buf[..meta.len].chunks(meta.stride.max(1)) {
                handle(Received::Datagram(&table, meta.addr, datagram));
            }
        }
        handle(Received::BatchDone);
    }
}
