//! Pod-to-pod measurements on one path: TCP throughput (iperf3), small-UDP
//! packet rate (iperf3), request/response latency (our own UDP ping-pong
//! with an HDR histogram), and CPU used per gigabit.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use serde_json::Value;
use xtask::{
    netns::{join, within},
    testbed::Pod,
};

const IPERF_PORT: u16 = 5201;

/// Busy and total CPU time from /proc/stat (USER_HZ): the whole machine
/// first, then each core.
fn cpu_jiffies() -> Result<Vec<(u64, u64)>> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let lines: Vec<(u64, u64)> = stat
        .lines()
        .take_while(|l| l.starts_with("cpu"))
        .map(|line| {
            let fields: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|f| f.parse().ok())
                .collect();
            let total: u64 = fields.iter().sum();
            let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
            (total - idle, total)
        })
        .collect();
    anyhow::ensure!(!lines.is_empty(), "empty /proc/stat");
    Ok(lines)
}

fn iperf_server(server: &Pod) -> Result<Child> {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            &server.netns,
            "iperf3",
            "-s",
            "-1",
            "-p",
            &IPERF_PORT.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 server: is iperf3 installed? (./x bootstrap)")
}

fn iperf_client(client: &Pod, dst: Ipv4Addr, extra: &[&str]) -> Result<Value> {
    // The server needs a moment to listen; retry refused connections.
    let mut last_err = String::new();
    for _ in 0..50 {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &client.netns,
                "iperf3",
                "-c",
                &dst.to_string(),
            ])
            .args(["-p", &IPERF_PORT.to_string(), "-J"])
            .args(extra)
            .output()?;
        let json: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        // iperf3 may exit 0 and still report an error in its JSON.
        match json["error"].as_str() {
            None if out.status.success() => return Ok(json),
            Some(e) => last_err = e.to_owned(),
            None => last_err = format!("iperf3 exited with {}", out.status),
        }
        if !last_err.contains("connect") {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "iperf3 {client_ip} -> {dst}: {last_err}",
        client_ip = client.ip
    )
}

#[derive(Clone, Debug)]
pub struct Throughput {
    pub gbit_per_s: f64,
    /// CPU-seconds (all cores) per gigabit carried.
    pub cpu_s_per_gbit: f64,
    /// Each core's busy share during the run, percent.
    pub core_busy_pct: Vec<f64>,
}

/// TCP throughput with `streams` parallel streams for `seconds`.
pub fn tcp_throughput(
    client: &Pod,
    server: &Pod,
    dst: Ipv4Addr,
    streams: u32,
    seconds: u32,
) -> Result<Throughput> {
    let mut srv = iperf_server(server)?;
    let before = cpu_jiffies()?;
    let json = iperf_client(
        client,
        dst,
        &["-t", &seconds.to_string(), "-P", &streams.to_string()],
    );
    let after = cpu_jiffies()?;
    let _ = srv.kill();
    let _ = srv.wait();
    let json = json?;
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3 reported no received rate: {}", json["error"]))?;
    let bytes = json["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
    let cpu_s = (after[0].0 - before[0].0) as f64 / 100.0;
    let gbits = bytes * 8.0 / 1e9;
    let core_busy_pct = before
        .iter()
        .zip(&after)
        .skip(1)
        .map(|(b, a)| 100.0 * (a.0 - b.0) as f64 / (a.1 - b.1).max(1) as f64)
        .collect();
    Ok(Throughput {
        gbit_per_s: bps / 1e9,
        cpu_s_per_gbit: if gbits > 0.0 { cpu_s / gbits } else { f64::NAN },
        core_busy_pct,
    })
}

/// Received UDP packets per second with 64-byte datagrams, unthrottled.
pub fn udp_pps(client: &Pod, server: &Pod, dst: Ipv4Addr, seconds: u32) -> Result<f64> {
    let mut srv = iperf_server(server)?;
    let json = iperf_client(
        client,
        dst,
        &["-u", "-b", "0", "-l", "64", "-t", &seconds.to_string()],
    );
    let _ = srv.kill();
    let _ = srv.wait();
    let json = json?;
    let sum = &json["end"]["sum"];
    let packets = sum["packets"]
        .as_f64()
        .with_context(|| format!("iperf3 reported no packet count: {}", json["error"]))?;
    let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
    let secs = sum["seconds"].as_f64().unwrap_or(f64::from(seconds));
    Ok((packets - lost) / secs)
}

#[derive(Clone, Copy, Debug)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
}

/// UDP request/response round trips, one at a time.
pub fn latency(client: &Pod, server: &Pod, dst: Ipv4Addr, samples: u64) -> Result<Latency> {
    const PORT: u16 = 7700;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let total = samples + 1000;
    let server_thread = within(&server.netns, move || {
        let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT))?;
        socket.set_read_timeout(Some(Duration::from_secs(5)))?;
        let _ = ready_tx.send(());
        let mut buf = [0u8; 64];
        for _ in 0..total {
            let (n, from) = socket.recv_from(&mut buf)?;
            socket.send_to(&buf[..n], from)?;
        }
        Ok(())
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("latency server did not start")?;
    let client_thread = within(&client.netns, move || {
        let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        socket.connect(SocketAddrV4::new(dst, PORT))?;
        let mut histogram = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3)?;
        let mut buf = [0u8; 64];
        for i in 0..total {
            let msg = i.to_be_bytes();
            let start = Instant::now();
            socket.send(&msg)?;
            let n = socket.recv(&mut buf)?;
            let rtt = start.elapsed();
            if n != msg.len() || buf[..n] != msg {
                bail!("ping-pong reply {i} does not match its request");
            }
            if i >= 1000 {
                histogram.record(rtt.as_nanos().max(1) as u64)?;
            }
        }
        Ok(histogram)
    });
    let histogram = join(client_thread)?;
    join(server_thread)?;
    let us = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    anyhow::ensure!(
        histogram.len() == samples,
        "recorded {} of {samples} samples",
        histogram.len()
    );
    Ok(Latency {
        p50_us: us(0.5),
        p99_us: us(0.99),
        p999_us: us(0.999),
    })
}
