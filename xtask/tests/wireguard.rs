//! WireGuard between gateways, checked against a peer nobody here wrote:
//! cluster A runs the Ligo fabric; in B's gateway namespace, boringtun-cli
//! (crates.io) configured with `wg` (Debian's wireguard-tools) stands in for
//! B's gateway and pod. Needs root (skipped with a message otherwise; under
//! CI=true it must run).

use std::{fs, net::Ipv4Addr, thread, time::Duration};

use anyhow::{ensure, Context, Result};
use xtask::{
    daemon_binary,
    lab::Lab,
    netns, require_root,
    testbed::{Pod, Scenario, Testbed, WireguardKeys, WIREGUARD_PORT},
    traffic,
};

/// The address of B's stand-in pod (inside B's pod CIDR 10.100.16.0/20),
/// and how A sees it (A's view of B is 10.200.32.0/20).
const B_POD: Ipv4Addr = Ipv4Addr::new(10, 100, 31, 1);
const B_POD_SEEN_FROM_A: Ipv4Addr = Ipv4Addr::new(10, 200, 47, 1);

struct Interop {
    bed: Testbed,
    /// boringtun-cli's interface; its control socket lives in
    /// /var/run/wireguard, shared by all namespaces, so each test has its own.
    wg_if: String,
    b_gw: String,
    /// A's gateway namespace and its config file.
    a_gw: String,
}

/// Cluster A's daemons, and boringtun-cli as B's gateway.
fn interop(prefix: &str, wg_if: &str) -> Interop {
    let mut bed = Testbed::up(prefix, Scenario::different_cidrs()).expect("testbed");
    bed.write_keys().expect("keys");
    let a = bed.scenario.a.clone();
    for host in ["gw", "n1", "n2"] {
        let ns = bed.ns(&a, host);
        let config = bed.daemon_config(&a, host);
        let started = bed
            .lab
            .start_daemon(&daemon_binary(), &ns, &config)
            .and_then(|()| match host {
                "gw" => bed.lab.start_tunnel(&daemon_binary(), &ns),
                _ => Ok(()),
            });
        if let Err(e) = started {
            panic!("{e:#}\n{}", bed.lab.logs());
        }
    }
    let b = bed.scenario.b.clone();
    let b_gw = bed.ns(&b, "gw");
    let a_gw = bed.ns(&a, "gw");
    let setup = start_boringtun(&mut bed, &b_gw, wg_if).and_then(|()| {
        netns::exec(
            &b_gw,
            "ip",
            &["addr", "add", &format!("{B_POD}/32"), "dev", "lo"],
        )?;
        netns::exec(
            &b_gw,
            "ip",
            &[
                "route",
                "add",
                "10.244.0.0/16",
                "dev",
                wg_if,
                "src",
                &B_POD.to_string(),
            ],
        )?;
        // Roaming moves B's address; keep the subnet route when the first
        // address goes.
        netns::sysctl(&b_gw, "net.ipv4.conf.eth1.promote_secondaries", "1")
    });
    if let Err(e) = setup {
        panic!("{e:#}\n{}", bed.lab.logs());
    }
    Interop {
        bed,
        wg_if: wg_if.to_owned(),
        b_gw,
        a_gw,
    }
}

/// boringtun-cli in the foreground (the lab stops it), configured by `wg`.
fn start_boringtun(bed: &mut Testbed, ns: &str, wg_if: &str) -> Result<()> {
    let b = bed.scenario.b.clone();
    let key_path = bed.private_key_path(&b).to_string_lossy().into_owned();
    let a_public = bed.keys[0].public.clone();
    let a_endpoint = format!("{}:{WIREGUARD_PORT}", bed.scenario.a.public_ip);
    let port = WIREGUARD_PORT.to_string();
    bed.lab.start_boringtun_cli(
        ns,
        "boringtun",
        &["--disable-connected-udp"],
        wg_if,
        &[
            "private-key",
            &key_path,
            "listen-port",
            &port,
            "peer",
            &a_public,
            "endpoint",
            &a_endpoint,
            "allowed-ips",
            "10.244.0.0/16",
            "persistent-keepalive",
            "1",
        ],
    )?;
    netns::exec(ns, "ip", &["link", "set", wg_if, "up"]).map(drop)
}

impl Interop {
    fn daemon_log(&self) -> String {
        fs::read_to_string(self.bed.lab.log_path(&self.a_gw)).unwrap_or_default()
    }

    /// The log of A's tunnel process (`ligo-fabric tunnel`).
    fn tunnel_log(&self) -> String {
        fs::read_to_string(self.bed.lab.log_path(&Lab::tunnel_process(&self.a_gw)))
            .unwrap_or_default()
    }

    fn a_pod(&self) -> Pod {
        self.bed.pod(0, 0, 0)
    }

    fn b_pod(&self) -> Pod {
        Pod {
            netns: self.b_gw.clone(),
            ip: B_POD,
            cluster: 1,
        }
    }

    /// A's gateway tunnel state (`inspect tunnels -o json`).
    fn tunnels(&self) -> serde_json::Value {
        self.bed
            .lab
            .inspect_tunnels(&daemon_binary(), &self.a_gw)
            .expect("inspect tunnels")
    }

    fn drops(&self, reason: &str) -> u64 {
        self.tunnels()["drops"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d[0] == reason)
            .and_then(|d| d[1].as_u64())
            .unwrap_or(0)
    }

    fn traffic_both_ways(&self, port: u16) -> Result<()> {
        let (a, b) = (self.a_pod(), self.b_pod());
        traffic::ping(&a, B_POD_SEEN_FROM_A, 3).context("ping A -> boringtun side")?;
        netns::exec(
            &b.netns,
            "ping",
            &[
                "-c",
                "3",
                "-i",
                "0.2",
                "-W",
                "2",
                "-I",
                &B_POD.to_string(),
                &a.ip.to_string(),
            ],
        )
        .context("ping boringtun side -> A")?;
        let up = traffic::tcp_transfer(&a, &b, B_POD_SEEN_FROM_A, port, 4 << 20)
            .context("TCP A -> B")?;
        ensure!(
            up.server_saw == a.ip,
            "B saw {} not {}",
            up.server_saw,
            a.ip
        );
        let down = traffic::tcp_transfer(&b, &a, a.ip, port + 1, 4 << 20).context("TCP B -> A")?;
        ensure!(
            down.server_saw == B_POD_SEEN_FROM_A,
            "A saw {} not {B_POD_SEEN_FROM_A}",
            down.server_saw
        );
        let udp =
            traffic::udp_exchange(&a, &b, B_POD_SEEN_FROM_A, port + 2, 20).context("UDP A -> B")?;
        ensure!(udp.reply_from == B_POD_SEEN_FROM_A);
        let udp = traffic::udp_exchange(&b, &a, a.ip, port + 3, 20).context("UDP B -> A")?;
        ensure!(udp.server_saw == B_POD_SEEN_FROM_A);
        Ok(())
    }
}

fn python(ns: &str, script: &str) -> Result<String> {
    netns::exec(ns, "python3", &["-c", script])
}

/// The handshake completes with boringtun-cli and ICMP, TCP and UDP flow
/// both ways; A's gateway shows the handshake, the peer's key and traffic.
/// Then hostile datagrams are dropped and counted by reason, and the tunnel
/// keeps working.
#[test]
fn boringtun_cli_peer_interoperates_and_bad_datagrams_are_counted() {
    if !require_root("boringtun_cli_peer_interoperates_and_bad_datagrams_are_counted") {
        return;
    }
    let mut w = interop("lt-wgi", "wgi0");
    if let Err(e) = w.traffic_both_ways(7400) {
        panic!("{e:#}\n{}", w.bed.lab.logs());
    }
    let status = w.tunnels();
    let peer = &status["peers"][0];
    assert_eq!(peer["public_key"], w.bed.keys[1].public.as_str());
    assert!(
        peer["latest_handshake_seconds_ago"].as_f64().is_some(),
        "{status:#}"
    );
    assert!(
        peer["tx_bytes"].as_u64().unwrap_or(0) >= 4 << 20,
        "{status:#}"
    );
    assert!(
        peer["rx_bytes"].as_u64().unwrap_or(0) >= 4 << 20,
        "{status:#}"
    );
    assert_eq!(peer["up"], true);
    let private = fs::read_to_string(w.bed.private_key_path(&w.bed.scenario.a)).expect("key");
    assert!(
        !status.to_string().contains(private.trim()),
        "the private key appears in inspect output"
    );
    for log in [w.daemon_log(), w.tunnel_log()] {
        assert!(
            !log.contains(private.trim()),
            "the private key appears in a log"
        );
    }

    let target = format!("('{}', {WIREGUARD_PORT})", w.bed.scenario.a.public_ip);
    let send = |payload: &str| {
        python(
            &w.b_gw,
            &format!(
                "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto({payload}, {target})"
            ),
        )
        .expect("send datagram");
        thread::sleep(Duration::from_millis(300));
    };

    // Not WireGuard at all.
    let before = w.drops("malformed_datagram");
    send("b'hello, not wireguard'");
    // A handshake initiation cut short.
    send("b'\\x01\\x00\\x00\\x00' + bytes(96)");
    assert_eq!(
        w.drops("malformed_datagram"),
        before + 2,
        "garbage and truncated handshake"
    );

    // A full-size initiation whose MAC does not match A's key.
    let before = w.drops("authentication_failed");
    send("b'\\x01\\x00\\x00\\x00' + bytes(range(144))");
    assert_eq!(
        w.drops("authentication_failed"),
        before + 1,
        "forged handshake"
    );

    // A real initiation, made by a second boringtun-cli, from a key A does
    // not know.
    let before = w.drops("unknown_peer");
    let stranger = WireguardKeys::generate().expect("keys");
    let stranger_key = w.bed.lab.file("stranger.key");
    fs::write(&stranger_key, &stranger.private).expect("write key");
    let a_public = w.bed.keys[0].public.clone();
    let a_endpoint = format!("{}:{WIREGUARD_PORT}", w.bed.scenario.a.public_ip);
    w.bed
        .lab
        .start_boringtun_cli(
            &w.b_gw,
            "stranger",
            &[],
            "wgi1",
            &[
                "private-key",
                &stranger_key.to_string_lossy(),
                "listen-port",
                "51821",
                "peer",
                &a_public,
                "endpoint",
                &a_endpoint,
                "allowed-ips",
                "10.99.0.0/16",
                "persistent-keepalive",
                "1",
            ],
        )
        .expect("second boringtun-cli, configured by wg");
    netns::exec(&w.b_gw, "ip", &["link", "set", "wgi1", "up"]).expect("up");
    let mut refused = false;
    for _ in 0..50 {
        if w.drops("unknown_peer") > before {
            refused = true;
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        refused,
        "a stranger's handshake was not counted as unknown_peer"
    );

    // A data datagram of the real peer, captured and sent again.
    let before = w.drops("replayed");
    let replay = format!(
        r#"
import threading, time, subprocess
from scapy.all import sniff, sendp, IP, UDP, conf
conf.verb = 0
def traffic():
    time.sleep(0.5)
    subprocess.run(["ping", "-c", "3", "-i", "0.2", "-s", "200", "-I", "{B_POD}", "{a}"], capture_output=True)
threading.Thread(target=traffic).start()
pkts = sniff(iface="eth1", count=1, timeout=10,
             lfilter=lambda p: UDP in p and p[IP].dst == "{a_public}" and p[UDP].dport == {WIREGUARD_PORT} and bytes(p[UDP].payload)[:1] == b'\x04' and len(p[UDP].payload) > 100)
assert pkts, "no data datagram seen"
time.sleep(1)
# A capture on the sending side holds the UDP checksum before offload (the
# pseudo-header sum only): let scapy compute it; the WireGuard message is
# sent byte for byte as captured.
pkt = pkts[0].copy()
del pkt[UDP].chksum
for _ in range(3):
    sendp(pkt, iface="eth1")
print("replayed", pkts[0].summary(), len(pkts[0]))
"#,
        a = w.a_pod().ip,
        a_public = w.bed.scenario.a.public_ip,
    );
    match python(&w.b_gw, &replay) {
        Ok(out) => eprintln!("{out}"),
        Err(e) => panic!("{e:#}"),
    }
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        w.drops("replayed"),
        before + 3,
        "replayed datagrams: {:#}",
        w.tunnels()
    );

    if let Err(e) = w.traffic_both_ways(7420) {
        panic!(
            "tunnel broken after hostile input: {e:#}\n{}",
            w.bed.lab.logs()
        );
    }
}

/// B's address changes in the middle of a transfer: A follows the new
/// endpoint and the transfer completes intact. Then B goes silent: A
/// reports it within seconds, and traffic resumes when B is back.
#[test]
fn roaming_peer_is_followed_and_a_silent_peer_is_reported() {
    if !require_root("roaming_peer_is_followed_and_a_silent_peer_is_reported") {
        return;
    }
    let mut w = interop("lt-wgr", "wgr0");
    traffic::ping(&w.a_pod(), B_POD_SEEN_FROM_A, 2).expect("tunnel up");
    let b_gw = w.b_gw.clone();
    let mover = thread::spawn(move || -> Result<()> {
        thread::sleep(Duration::from_millis(700));
        netns::exec(
            &b_gw,
            "ip",
            &["addr", "add", "203.0.113.3/24", "dev", "eth1"],
        )?;
        netns::exec(
            &b_gw,
            "ip",
            &["addr", "del", "203.0.113.2/24", "dev", "eth1"],
        )?;
        Ok(())
    });
    let transfer = traffic::tcp_transfer(&w.a_pod(), &w.b_pod(), B_POD_SEEN_FROM_A, 7500, 64 << 20);
    mover.join().expect("mover").expect("moving B's address");
    if let Err(e) = transfer {
        panic!("transfer across the move: {e:#}\n{}", w.bed.lab.logs());
    }
    let status = w.tunnels();
    assert_eq!(
        status["peers"][0]["endpoint"], "203.0.113.3:51820",
        "A did not follow B: {status:#}"
    );
    let log = w.tunnel_log();
    assert!(log.contains("peer endpoint moved"), "{log}");

    // B stops answering.
    w.bed
        .lab
        .stop_daemon("boringtun")
        .expect("stop boringtun-cli");
    let silent_since = std::time::Instant::now();
    let _ = traffic::ping(&w.a_pod(), B_POD_SEEN_FROM_A, 1);
    let mut reported = None;
    while silent_since.elapsed() < Duration::from_secs(15) {
        if w.tunnels()["peers"][0]["up"] == false {
            reported = Some(silent_since.elapsed());
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    let after = reported.expect("a silent peer was never reported down");
    assert!(after <= Duration::from_secs(8), "reported after {after:?}");
    let log = w.tunnel_log();
    assert!(log.contains("peer gateway stopped answering"), "{log}");
    let metrics = netns::join(netns::within(&w.a_gw, || {
        Ok(ureq::get("http://127.0.0.1:9477/metrics")
            .call()?
            .body_mut()
            .read_to_string()?)
    }))
    .expect("scrape");
    assert!(
        metrics.contains("ligo_fabric_tunnel_peer_up{peer=\"cluster-b\",peer_id=\"2\"} 0"),
        "{metrics}"
    );

    // B is back (a new process, the same key): traffic resumes.
    let (b_gw, wg_if) = (w.b_gw.clone(), w.wg_if.clone());
    start_boringtun(&mut w.bed, &b_gw, &wg_if).expect("boringtun-cli again");
    netns::exec(
        &w.b_gw,
        "ip",
        &[
            "route",
            "replace",
            "10.244.0.0/16",
            "dev",
            &wg_if,
            "src",
            &B_POD.to_string(),
        ],
    )
    .expect("route");
    let mut resumed = false;
    for _ in 0..20 {
        if traffic::ping(&w.a_pod(), B_POD_SEEN_FROM_A, 1).is_ok() {
            resumed = true;
            break;
        }
    }
    assert!(resumed, "traffic did not resume\n{}", w.bed.lab.logs());
    thread::sleep(Duration::from_millis(500));
    assert_eq!(w.tunnels()["peers"][0]["up"], true);
}

/// A reload whose key file group or others could read is refused like any
/// invalid field: the daemon's log names the field and the fix, and the
/// tunnel is never handed the revision (the daemon is the only reader of
/// desired state), so it runs on unchanged; once the mode is fixed the same
/// file applies, and the daemon hands the tunnel the new configuration.
#[test]
fn a_key_file_others_can_read_is_refused_on_reload() {
    if !require_root("a_key_file_others_can_read_is_refused_on_reload") {
        return;
    }
    let w = interop("lt-wgk", "wgk0");
    traffic::ping(&w.a_pod(), B_POD_SEEN_FROM_A, 2).expect("tunnel up");
    let key = w.bed.private_key_path(&w.bed.scenario.a);
    let config_path = w.bed.lab.config_path(&w.a_gw);
    let config = fs::read_to_string(&config_path).expect("config");
    let changed = config.replace("persistent_keepalive = 1", "persistent_keepalive = 2");
    assert_ne!(changed, config);
    let desired = w.bed.lab.wireguard_socket(&w.a_gw);
    let desired = ligo_fabric::tunnel::config::desired_path(&desired);
    let handed_over = fs::read_to_string(&desired).expect("the daemon's tunnel configuration");
    assert!(
        handed_over.contains("\"persistent_keepalive\": 1"),
        "{handed_over}"
    );
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).expect("chmod");
    fs::write(&config_path, &changed).expect("write");
    let daemon_refused = (0..100).any(|_| {
        let log = w.daemon_log();
        let found = log.contains("new configuration rejected")
            && log.contains("gateway.private_key_file")
            && log.contains("chmod 600");
        if !found {
            thread::sleep(Duration::from_millis(50));
        }
        found
    });
    assert!(daemon_refused, "refusal not logged:\n{}", w.bed.lab.logs());
    assert_eq!(
        fs::read_to_string(&desired).expect("desired"),
        handed_over,
        "a refused revision reached the tunnel"
    );
    assert!(
        !w.tunnel_log().contains("tunnel configuration applied"),
        "{}",
        w.tunnel_log()
    );
    traffic::ping(&w.a_pod(), B_POD_SEEN_FROM_A, 2).expect("tunnel unchanged");

    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).expect("chmod");
    fs::write(
        &config_path,
        changed.replace("persistent_keepalive = 2", "persistent_keepalive = 3"),
    )
    .expect("write");
    assert!(
        (0..100).any(|_| {
            let daemon = w.daemon_log().matches("configuration applied").count();
            let tunnel = w.tunnel_log().contains("tunnel configuration applied");
            thread::sleep(Duration::from_millis(50));
            daemon >= 2 && tunnel
        }),
        "the fixed file was not applied:\n{}",
        w.bed.lab.logs()
    );
    let handed_over = fs::read_to_string(&desired).expect("desired");
    assert!(
        handed_over.contains("\"persistent_keepalive\": 3"),
        "{handed_over}"
    );
    traffic::ping(&w.a_pod(), B_POD_SEEN_FROM_A, 2).expect("tunnel after the fix");
}
