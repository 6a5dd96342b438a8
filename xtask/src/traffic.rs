//! Traffic between testbed pods, with checks that can fail: content hashes,
//! the address each side sees, and that replies come back from the address
//! the request went to.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest, Sha256};

use crate::netns::{self, exec, join, within};
use crate::testbed::Pod;

const TIMEOUT: Duration = Duration::from_secs(20);

/// ICMP echo from `from` to `to` with iputils ping (count replies required).
pub fn ping(from: &Pod, to: Ipv4Addr, count: u32) -> Result<String> {
    exec(
        &from.netns,
        "ping",
        &[
            "-c",
            &count.to_string(),
            "-i",
            "0.2",
            "-W",
            "2",
            &to.to_string(),
        ],
    )
    .with_context(|| format!("ping {} -> {to}", from.ip))
}

/// Deterministic pseudo-random payload.
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[derive(Debug)]
pub struct TcpOutcome {
    /// Source address of the connection as the server saw it.
    pub server_saw: Ipv4Addr,
    pub bytes: usize,
}

/// Sends `len` bytes from `client` to `server` (listening on its own IP) at
/// address `server_addr`; the server hashes what it received and sends the
/// hash back; both hashes must match the payload's.
pub fn tcp_transfer(
    client: &Pod,
    server: &Pod,
    server_addr: Ipv4Addr,
    port: u16,
    len: usize,
) -> Result<TcpOutcome> {
    let listener_ns = server.netns.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server_thread = within(&listener_ns, move || {
        let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))?;
        let _ = ready_tx.send(());
        let (mut stream, peer) = listener.accept()?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0usize;
        loop {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            total += n;
        }
        stream.write_all(&hasher.finalize())?;
        let SocketAddr::V4(peer) = peer else {
            bail!("IPv6 peer")
        };
        Ok((*peer.ip(), total))
    });
    ready_rx
        .recv_timeout(TIMEOUT)
        .context("TCP server did not start")?;
    let data = payload(len, u64::from(port));
    let expected: [u8; 32] = Sha256::digest(&data).into();
    let client_thread = within(&client.netns, move || {
        let addr = SocketAddr::V4(SocketAddrV4::new(server_addr, port));
        let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        stream.set_write_timeout(Some(TIMEOUT))?;
        stream.write_all(&data)?;
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut digest = [0u8; 32];
        stream.read_exact(&mut digest)?;
        Ok(digest)
    });
    let digest = join(client_thread)
        .with_context(|| format!("TCP client {} -> {server_addr}:{port}", client.ip))?;
    let (server_saw, bytes) = join(server_thread).context("TCP server")?;
    ensure!(bytes == len, "server received {bytes} bytes, {len} sent");
    ensure!(
        digest == expected,
        "content hash differs: the payload was corrupted in transit"
    );
    Ok(TcpOutcome { server_saw, bytes })
}

#[derive(Debug)]
pub struct UdpOutcome {
    /// Source address as the server saw it.
    pub server_saw: Ipv4Addr,
    /// Source address of the reply as the client saw it.
    pub reply_from: Ipv4Addr,
}

/// Sends `count` datagrams from `client` to `server_addr`; the server echoes
/// each one with the sender address it saw; every echo must come back intact.
pub fn udp_exchange(
    client: &Pod,
    server: &Pod,
    server_addr: Ipv4Addr,
    port: u16,
    count: usize,
) -> Result<UdpOutcome> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server_thread = within(&server.netns, move || {
        let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))?;
        socket.set_read_timeout(Some(TIMEOUT))?;
        let _ = ready_tx.send(());
        let mut seen = None;
        let mut buf = [0u8; 2048];
        for _ in 0..count {
            let (n, from) = socket.recv_from(&mut buf)?;
            let SocketAddr::V4(from) = from else {
                bail!("IPv6 sender")
            };
            seen = Some(*from.ip());
            socket.send_to(&buf[..n], from)?;
        }
        seen.context("no datagram")
    });
    ready_rx
        .recv_timeout(TIMEOUT)
        .context("UDP server did not start")?;
    let client_thread = within(&client.netns, move || {
        let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut reply_from = None;
        let mut buf = [0u8; 2048];
        for i in 0..count {
            let msg = payload(64 + i * 13 % 1000, i as u64 + 7);
            socket.send_to(&msg, SocketAddrV4::new(server_addr, port))?;
            let (n, from) = socket
                .recv_from(&mut buf)
                .with_context(|| format!("no echo for datagram {i}"))?;
            ensure!(buf[..n] == msg[..], "datagram {i} came back altered");
            let SocketAddr::V4(from) = from else {
                bail!("IPv6 reply")
            };
            reply_from = Some(*from.ip());
        }
        reply_from.context("no reply")
    });
    let reply_from = join(client_thread)
        .with_context(|| format!("UDP client {} -> {server_addr}:{port}", client.ip))?;
    let server_saw = join(server_thread).context("UDP server")?;
    Ok(UdpOutcome {
        server_saw,
        reply_from,
    })
}

/// Turns tx checksum offload off in a pod, so its packets carry complete
/// checksums that the receiving kernel verifies.
pub fn disable_tx_checksum_offload(pod: &Pod) -> Result<()> {
    netns::exec(&pod.netns, "ethtool", &["-K", "eth0", "tx", "off"]).map(drop)
}
