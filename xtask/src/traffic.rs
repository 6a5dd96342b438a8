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

/// What a sequence-numbered UDP stream delivered.
#[derive(Debug)]
pub struct StreamOutcome {
    pub sent: u64,
    pub received: u64,
    /// Datagrams that arrived after a later one.
    pub reordered: u64,
    pub duplicates: u64,
    /// Datagrams from an unexpected source or with a corrupted payload.
    pub mistranslated: u64,
}

/// Streams `rate` datagrams per second from `client` to `server_addr` while
/// `during` runs, then a second more; each carries its sequence number and
/// a payload derived from it, which the receiver checks, along with the
/// source address it sees (`expected_source`).
pub fn udp_stream<T>(
    client: &Pod,
    server: &Pod,
    server_addr: Ipv4Addr,
    expected_source: Ipv4Addr,
    port: u16,
    rate: u32,
    during: impl FnOnce() -> Result<T>,
) -> Result<(StreamOutcome, T)> {
    const LEN: usize = 200;
    fn body(seq: u64) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[..8].copy_from_slice(&seq.to_be_bytes());
        for (i, byte) in b[8..].iter_mut().enumerate() {
            *byte = (seq as usize).wrapping_mul(31).wrapping_add(i) as u8;
        }
        b
    }
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_rx = stop.clone();
    let receiver = within(&server.netns, move || {
        let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))?;
        socket.set_read_timeout(Some(Duration::from_millis(1500)))?;
        // Seconds of traffic in the buffer: a receiver starved of CPU on a
        // busy 2-core machine must not count as fabric loss.
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::RcvBufForce, &(32 << 20))?;
        let _ = ready_tx.send(());
        let mut seen = std::collections::HashSet::new();
        let (mut highest, mut out) = (
            None::<u64>,
            StreamOutcome {
                sent: 0,
                received: 0,
                reordered: 0,
                duplicates: 0,
                mistranslated: 0,
            },
        );
        let mut buf = [0u8; 2048];
        loop {
            match socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    let SocketAddr::V4(from) = from else { continue };
                    if n != LEN || *from.ip() != expected_source {
                        out.mistranslated += 1;
                        continue;
                    }
                    let seq = u64::from_be_bytes(buf[..8].try_into().unwrap_or_default());
                    if buf[..LEN] != body(seq) {
                        out.mistranslated += 1;
                        continue;
                    }
                    if !seen.insert(seq) {
                        out.duplicates += 1;
                        continue;
                    }
                    out.received += 1;
                    if highest.is_some_and(|h| seq < h) {
                        out.reordered += 1;
                    }
                    highest = highest.max(Some(seq));
                }
                Err(_) if stop_rx.load(std::sync::atomic::Ordering::Relaxed) => return Ok(out),
                Err(_) => {}
            }
        }
    });
    ready_rx
        .recv_timeout(TIMEOUT)
        .context("stream receiver did not start")?;
    let stop_tx = stop.clone();
    let sender_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender_flag = sender_stop.clone();
    let sender = within(&client.netns, move || {
        let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
        let target = SocketAddrV4::new(server_addr, port);
        let started = std::time::Instant::now();
        let mut seq = 0u64;
        while !sender_flag.load(std::sync::atomic::Ordering::Relaxed) {
            // Paced by the clock: send what is due, then sleep a little.
            let due = (started.elapsed().as_secs_f64() * f64::from(rate)) as u64;
            while seq < due {
                socket.send_to(&body(seq), target)?;
                seq += 1;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(seq)
    });
    std::thread::sleep(Duration::from_millis(500));
    let during_result = during();
    std::thread::sleep(Duration::from_secs(1));
    sender_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = join(sender).context("stream sender")?;
    std::thread::sleep(Duration::from_millis(500));
    stop_tx.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut outcome = join(receiver).context("stream receiver")?;
    outcome.sent = sent;
    Ok((outcome, during_result?))
}
