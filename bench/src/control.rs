//! Control-plane speed on the live testbed: from a configuration change
//! (SIGHUP) to the first packet that uses the new mapping.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use xtask::{
    netns::{join, within},
    testbed::{Cidr, Pod, Testbed},
};

/// Moves A's view of B on the client's node to a new prefix and measures
/// from SIGHUP to the first echo received through the new view.
pub fn config_change_to_first_packet_ms(bed: &Testbed, client: &Pod, server: &Pod) -> Result<f64> {
    const PORT: u16 = 7800;
    let node = bed.ns(&bed.scenario.a, "n1");
    let old_view = bed.scenario.a.view_of_peer;
    let new_view = Cidr(
        Ipv4Addr::new(10, 201, old_view.0.octets()[2], 0),
        old_view.1,
    );
    let new_dst = bed.scenario.b.pod_cidr.translate(server.ip, new_view);

    let server_thread = within(&server.netns, move || {
        let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT))?;
        socket.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut buf = [0u8; 64];
        // Echo until the client has gone quiet.
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            socket.send_to(&buf[..n], from)?;
        }
        Ok(())
    });
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let client_thread = within(&client.netns, move || {
        let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
        socket.set_read_timeout(Some(Duration::from_micros(500)))?;
        let _ = started_tx.send(());
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = [0u8; 64];
        while Instant::now() < deadline {
            let _ = socket.send_to(b"probe", SocketAddrV4::new(new_dst, PORT));
            if let Ok((_, from)) = socket.recv_from(&mut buf) {
                if from.ip() == std::net::IpAddr::V4(new_dst) {
                    return Ok(Instant::now());
                }
            }
        }
        bail!("no reply through the new view {new_dst} within 5 s")
    });
    started_rx
        .recv_timeout(Duration::from_secs(5))
        .context("probe thread did not start")?;

    let config_path = bed.lab.config_path(&node);
    let config = fs::read_to_string(&config_path)?;
    let changed = config.replace(
        &format!("view_cidr = \"{old_view}\""),
        &format!("view_cidr = \"{new_view}\""),
    );
    anyhow::ensure!(
        changed != config,
        "the node config has no view_cidr {old_view}"
    );
    fs::write(&config_path, changed)?;
    let pid: i32 = fs::read_to_string(bed.lab.pid_path(&node))?
        .trim()
        .parse()?;
    let signalled = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGHUP,
    )?;
    let first_reply = join(client_thread)?;
    join(server_thread)?;
    Ok(first_reply.duration_since(signalled).as_secs_f64() * 1e3)
}
