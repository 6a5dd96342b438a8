//! End to end: two simulated clusters in network namespaces, real daemons,
//! real kernel stacks on both ends. Needs root (skipped with a message
//! otherwise; under CI=true it must run).

use std::{fs, thread, time::Duration};

use anyhow::{ensure, Context, Result};
use xtask::{
    daemon_binary, netns, require_root,
    testbed::{Pod, Scenario, Testbed},
    traffic,
};

const TRANSFER_BYTES: usize = 8 << 20;

fn fabric(prefix: &str, scenario: Scenario) -> Testbed {
    fabric_with(prefix, scenario, "auto", "wireguard")
}

fn fabric_with(
    prefix: &str,
    scenario: Scenario,
    ingress: &'static str,
    transport: &'static str,
) -> Testbed {
    let mut bed = Testbed::up(prefix, scenario).expect("testbed");
    bed.node_ingress = ingress;
    bed.transport = transport;
    if let Err(e) = bed.start_fabric(&daemon_binary()) {
        panic!("{e:#}\n{}", bed.lab.logs());
    }
    bed
}

/// ICMP, a TCP transfer with content hash, and UDP echoes from `from` to
/// `to`; checks the addresses each side sees.
fn exchange(bed: &Testbed, from: &Pod, to: &Pod, port: u16) -> Result<()> {
    let dst = bed.address_seen_from_peer(to);
    let src_seen = bed.address_seen_from_peer(from);
    traffic::ping(from, dst, 3)?;
    let tcp = traffic::tcp_transfer(from, to, dst, port, TRANSFER_BYTES)?;
    ensure!(
        tcp.server_saw == src_seen,
        "TCP server saw {}, expected {src_seen}",
        tcp.server_saw
    );
    let udp = traffic::udp_exchange(from, to, dst, port, 50)?;
    ensure!(
        udp.server_saw == src_seen,
        "UDP server saw {}, expected {src_seen}",
        udp.server_saw
    );
    ensure!(
        udp.reply_from == dst,
        "UDP reply came from {}, expected {dst}",
        udp.reply_from
    );
    Ok(())
}

/// Two pod pairs (crossing nodes differently), both directions each.
fn exchange_everywhere(bed: &Testbed) -> Result<()> {
    let pairs = [
        (bed.pod(0, 0, 0), bed.pod(1, 1, 1)),
        (bed.pod(0, 1, 1), bed.pod(1, 0, 0)),
    ];
    for (i, (a, b)) in pairs.iter().enumerate() {
        let port = 7100 + 10 * i as u16;
        exchange(bed, a, b, port).with_context(|| format!("A {} -> B {}", a.ip, b.ip))?;
        exchange(bed, b, a, port + 1).with_context(|| format!("B {} -> A {}", b.ip, a.ip))?;
    }
    Ok(())
}

fn counters(bed: &Testbed, ns: &str) -> serde_json::Value {
    bed.lab.inspect(&daemon_binary(), ns).expect("inspect")
}

/// The gateway tunnel's figures (`inspect tunnels -o json`) in the shape of
/// the map counters: one entry per direction, drops by reason.
fn tunnel_counters(bed: &Testbed, ns: &str) -> serde_json::Value {
    let status = bed
        .lab
        .inspect_tunnels(&daemon_binary(), ns)
        .expect("inspect tunnels");
    let peer = status["peers"]
        .get(0)
        .unwrap_or_else(|| panic!("no peer in {status:#}"));
    serde_json::json!({
        "counters": [
            { "direction": "to_peer", "bytes": peer["tx_bytes"], "packets": peer["tx_packets"] },
            { "direction": "from_peer", "bytes": peer["rx_bytes"], "packets": peer["rx_packets"] },
        ],
        "drops": status["drops"].as_array()
            .unwrap_or_else(|| panic!("no drops array in {status:#}"))
            .iter()
            .map(|d| serde_json::json!({ "reason": d[0], "packets": d[1] }))
            .collect::<Vec<_>>(),
    })
}

/// A counter of `inspect -o json`. A missing array, direction or field is a
/// changed JSON shape and fails the test: it must never read as zero.
fn counter(json: &serde_json::Value, direction: &str, field: &str) -> u64 {
    let entries = json["counters"]
        .as_array()
        .unwrap_or_else(|| panic!("no counters array in {json:#}"));
    let entry = entries
        .iter()
        .find(|c| c["direction"] == direction)
        .unwrap_or_else(|| panic!("no {direction} counters in {json:#}"));
    entry[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{direction}.{field} is not a number in {json:#}"))
}

/// The sum of every drop reason's packets; the same strictness as `counter`.
fn total_drops(json: &serde_json::Value) -> u64 {
    json["drops"]
        .as_array()
        .unwrap_or_else(|| panic!("no drops array in {json:#}"))
        .iter()
        .map(|d| {
            d["packets"]
                .as_u64()
                .unwrap_or_else(|| panic!("a drop entry without packets in {json:#}"))
        })
        .sum()
}

fn check_counters(bed: &Testbed) {
    // Every host saw traffic both ways: 2 pairs x 2 directions x 8 MiB.
    let min_bytes = 2 * TRANSFER_BYTES as u64;
    for cluster in [&bed.scenario.a, &bed.scenario.b] {
        let gw_ns = bed.ns(cluster, "gw");
        let gw = if bed.transport == "wireguard" {
            tunnel_counters(bed, &gw_ns)
        } else {
            counters(bed, &gw_ns)
        };
        for direction in ["to_peer", "from_peer"] {
            let bytes = counter(&gw, direction, "bytes");
            assert!(
                bytes >= min_bytes,
                "{} gateway {direction} counted {bytes} bytes, < {min_bytes}",
                cluster.name
            );
        }
        for host in ["gw", "n1", "n2"] {
            let json = counters(bed, &bed.ns(cluster, host));
            assert_eq!(
                total_drops(&json),
                0,
                "drops on {} {host}: {json:#}",
                cluster.name
            );
        }
    }
}

fn run_scenario(prefix: &str, scenario: Scenario, ingress: &'static str, transport: &'static str) {
    let bed = fabric_with(prefix, scenario, ingress, transport);
    if let Err(e) = exchange_everywhere(&bed) {
        panic!("{e:#}\n{}", bed.lab.logs());
    }
    check_counters(&bed);
}

#[test]
fn identical_pod_cidrs_talk_both_ways_over_wireguard() {
    if require_root("identical_pod_cidrs_talk_both_ways_over_wireguard") {
        run_scenario("lt-same", Scenario::identical_cidrs(), "auto", "wireguard");
    }
}

#[test]
fn identical_pod_cidrs_talk_both_ways_over_plain() {
    if require_root("identical_pod_cidrs_talk_both_ways_over_plain") {
        run_scenario("lt-psame", Scenario::identical_cidrs(), "auto", "plain");
    }
}

#[test]
fn different_pod_cidrs_through_a_remapped_non_octet_view_over_wireguard() {
    if require_root("different_pod_cidrs_through_a_remapped_non_octet_view_over_wireguard") {
        run_scenario("lt-diff", Scenario::different_cidrs(), "auto", "wireguard");
    }
}

#[test]
fn different_pod_cidrs_through_a_remapped_non_octet_view_over_plain() {
    if require_root("different_pod_cidrs_through_a_remapped_non_octet_view_over_plain") {
        run_scenario("lt-pdiff", Scenario::different_cidrs(), "auto", "plain");
    }
}

/// The XDP node ingress (the choice for NICs), forced on the veth testbed.
#[test]
fn xdp_node_ingress_talks_both_ways() {
    if require_root("xdp_node_ingress_talks_both_ways") {
        run_scenario("lt-xdp", Scenario::different_cidrs(), "xdp", "plain");
    }
}

/// With checksum offload off in the pods, packets carry complete checksums
/// and the receiving kernel verifies them: any error in our incremental
/// updates (both remap directions, both node hooks) or in the tunnel's
/// segmentation shows up as lost data.
#[test]
fn receivers_verify_full_checksums() {
    if !require_root("receivers_verify_full_checksums") {
        return;
    }
    for (prefix, ingress, transport) in [
        ("lt-csum-t", "tc", "plain"),
        ("lt-csum-x", "xdp", "plain"),
        ("lt-csum-w", "tc", "wireguard"),
    ] {
        receivers_verify_full_checksums_with(prefix, ingress, transport);
    }
}

fn receivers_verify_full_checksums_with(
    prefix: &str,
    ingress: &'static str,
    transport: &'static str,
) {
    let bed = fabric_with(prefix, Scenario::different_cidrs(), ingress, transport);
    let (a, b) = (bed.pod(0, 0, 0), bed.pod(1, 1, 0));
    for pod in [&a, &b] {
        traffic::disable_tx_checksum_offload(pod).expect("ethtool");
    }
    let result = exchange(&bed, &a, &b, 7200).and_then(|()| exchange(&bed, &b, &a, 7201));
    if let Err(e) = result {
        panic!("{e:#}\n{}", bed.lab.logs());
    }
    for pod in [&a, &b] {
        let snmp = netns::exec(&pod.netns, "cat", &["/proc/net/snmp"]).expect("snmp");
        for (proto, field) in [("Tcp:", "InCsumErrors"), ("Udp:", "InCsumErrors")] {
            assert_eq!(
                snmp_value(&snmp, proto, field),
                Some(0),
                "{} {proto} {field} in {}",
                pod.ip,
                pod.netns
            );
        }
    }
}

fn snmp_value(snmp: &str, proto: &str, field: &str) -> Option<u64> {
    let mut lines = snmp.lines().filter(|l| l.starts_with(proto));
    let header = lines.next()?;
    let values = lines.next()?;
    let idx = header.split_whitespace().position(|f| f == field)?;
    values.split_whitespace().nth(idx)?.parse().ok()
}

fn wait_for_log(bed: &Testbed, ns: &str, needle: &str, occurrences: usize) -> Result<()> {
    for _ in 0..100 {
        let log = fs::read_to_string(bed.lab.log_path(ns)).unwrap_or_default();
        if log.matches(needle).count() >= occurrences {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("{ns} never logged {needle:?} {occurrences} times")
}

fn log_len(bed: &Testbed, ns: &str) -> usize {
    fs::metadata(bed.lab.log_path(ns)).map_or(0, |m| m.len() as usize)
}

/// Waits until the log past `offset` holds every needle; returns that part.
fn wait_for_log_after(bed: &Testbed, ns: &str, offset: usize, needles: &[&str]) -> Result<String> {
    for _ in 0..100 {
        let log = fs::read_to_string(bed.lab.log_path(ns)).unwrap_or_default();
        let new = log.get(offset..).unwrap_or_default();
        if needles.iter().all(|n| new.contains(n)) {
            return Ok(new.to_owned());
        }
        thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("{ns} never logged {needles:?}")
}

fn hangup(bed: &Testbed, ns: &str) {
    let pid: i32 = fs::read_to_string(bed.lab.pid_path(ns))
        .expect("pid")
        .trim()
        .parse()
        .expect("pid number");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP");
}

/// A node's view of the peer changes on SIGHUP: the new route and map
/// entries replace the old ones, traffic follows the new mapping, replies
/// come from the new view. A broken config is then refused and changes
/// nothing.
#[test]
fn reload_moves_a_view_and_refuses_bad_config() {
    if !require_root("reload_moves_a_view_and_refuses_bad_config") {
        return;
    }
    let bed = fabric("lt-reload", Scenario::identical_cidrs());
    let a_node = bed.ns(&bed.scenario.a, "n1");
    let (a, b) = (bed.pod(0, 0, 0), bed.pod(1, 0, 0));
    let old_dst = bed.address_seen_from_peer(&b);
    traffic::ping(&a, old_dst, 1).expect("ping before reload");

    let config_path = bed.lab.config_path(&a_node);
    let config = fs::read_to_string(&config_path).expect("config");
    assert!(config.contains("view_cidr = \"10.245.0.0/16\""));
    fs::write(
        &config_path,
        config.replace("10.245.0.0/16", "10.247.0.0/16"),
    )
    .expect("write");
    hangup(&bed, &a_node);
    wait_for_log(&bed, &a_node, "configuration applied", 2).expect("reload");

    let routes = netns::ip(&["-n", &a_node, "route", "show", "proto", "76"]).expect("routes");
    assert!(
        routes.contains("10.247.0.0/16 via 192.0.2.1 dev eth0"),
        "{routes}"
    );
    assert!(
        routes.contains("mtu 1440"),
        "route MTU must leave room for the WireGuard transport (60 bytes): {routes}"
    );
    assert!(
        !routes.contains("10.245.0.0/16"),
        "stale route left: {routes}"
    );
    let new_dst = "10.247.1.10".parse().expect("addr");
    let udp = traffic::udp_exchange(&a, &b, new_dst, 7300, 5).expect("udp via new view");
    assert_eq!(udp.reply_from, new_dst);
    assert!(
        traffic::ping(&a, old_dst, 1).is_err(),
        "old view still reachable"
    );

    // Broken configurations, one after another: each is refused with a
    // message naming the field, and the running state stays as it was.
    let applied = config.replace("10.245.0.0/16", "10.247.0.0/16");
    let state_before = (mapping_state(&bed, &a_node), proto76_routes(&a_node));
    let bad: [(String, &str); 6] = [
        (
            applied.replace("10.247.0.0/16", "10.247.0.0/20"),
            "peers[0].view_cidr: prefix length /20 differs",
        ),
        (
            applied.replace("10.247.0.0/16", "10.244.0.0/16"),
            "peers[0].view_cidr: view 10.244.0.0/16 collides with the local pod CIDR",
        ),
        (
            format!("{applied}\n[[peers]]\nid = 2\npod_cidr = \"10.9.0.0/16\"\n"),
            "peers[1].id: duplicate peer id 2",
        ),
        (
            applied.replace("cluster_id = 1", "cluster_id = 1\nmtu = 9000"),
            "unknown field `mtu`",
        ),
        (
            applied.replace("gateway_ip = \"192.0.2.1\"", "gateway_ip = \"192.0.2\""),
            "invalid IPv4 address",
        ),
        (
            applied.replace("uplink = \"eth0\"", "uplink = \"eth9\""),
            "need a restart",
        ),
    ];
    for (i, (text, expected)) in bad.iter().enumerate() {
        // Only what the daemon logs after this write counts: the file
        // change and the SIGHUP may each produce a rejection, and an
        // earlier case's may still be on its way.
        let offset = log_len(&bed, &a_node);
        fs::write(&config_path, text).expect("write");
        hangup(&bed, &a_node);
        let rejected = if expected.contains("restart") {
            "changes the role, an interface"
        } else {
            "new configuration rejected"
        };
        let log = wait_for_log_after(&bed, &a_node, offset, &[rejected, expected])
            .unwrap_or_else(|e| panic!("case {i}: {e:#}"));
        assert!(
            log.contains(expected),
            "case {i}: {expected:?} not in {log}"
        );
    }
    assert_eq!(
        (mapping_state(&bed, &a_node), proto76_routes(&a_node)),
        state_before,
        "refused configurations changed the running state"
    );
    traffic::udp_exchange(&a, &b, new_dst, 7301, 5)
        .expect("traffic unchanged after refused configs");
}

/// The daemon's mapping tables (config, peers, views, slices) without the
/// counters, which move with traffic.
fn mapping_state(bed: &Testbed, ns: &str) -> serde_json::Value {
    let mut json = bed.lab.inspect(&daemon_binary(), ns).expect("inspect");
    if let Some(map) = json.as_object_mut() {
        map.remove("counters");
        map.remove("drops");
    }
    json
}

fn proto76_routes(ns: &str) -> String {
    netns::ip(&["-n", ns, "route", "show", "proto", "76"]).expect("routes")
}

/// Over WireGuard (the largest overhead): a SYN's MSS is clamped to the
/// fabric route (MTU 1440 - 40), and DF-marked UDP datagrams of exactly the
/// route MTU arrive whole, every one.
#[test]
fn mss_is_clamped_and_df_datagrams_at_the_route_mtu_pass() {
    if !require_root("mss_is_clamped_and_df_datagrams_at_the_route_mtu_pass") {
        return;
    }
    let bed = fabric_with("lt-mtu", Scenario::different_cidrs(), "auto", "wireguard");
    let (a, b) = (bed.pod(0, 0, 0), bed.pod(1, 1, 0));
    let dst = bed.address_seen_from_peer(&b);
    let server = std::process::Command::new("ip")
        .args(["netns", "exec", &b.netns, "python3", "-c"])
        .arg(
            r#"
import socket
IP_MTU_DISCOVER, IP_PMTUDISC_DO = 10, 2
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", 7600)); t.listen(1)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 7601)); u.settimeout(5)
c, _ = t.accept()
print("mss", c.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG), flush=True)
sizes = []
try:
    while len(sizes) < 20:
        sizes.append(len(u.recv(65535)))
except socket.timeout:
    pass
print("udp", len(sizes), min(sizes or [0]), max(sizes or [0]), flush=True)
"#,
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("server");
    thread::sleep(Duration::from_millis(500));
    let client = format!(
        r#"
import socket, time
t = socket.create_connection(("{dst}", 7600), timeout=5)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO: DF set
for _ in range(20):
    u.sendto(bytes(1440 - 28), ("{dst}", 7601))
    time.sleep(0.01)
"#
    );
    netns::exec(&a.netns, "python3", &["-c", &client]).expect("client");
    let out = server.wait_with_output().expect("server output");
    let text = String::from_utf8_lossy(&out.stdout);
    let mss: u32 = text
        .lines()
        .find_map(|l| l.strip_prefix("mss "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no MSS reported: {text}\n{}", bed.lab.logs()));
    assert!(
        mss <= 1400,
        "MSS {mss} not clamped to the route (1440 - 40)"
    );
    let udp = text.lines().find(|l| l.starts_with("udp")).unwrap_or("");
    assert_eq!(
        udp, "udp 20 1412 1412",
        "DF datagrams at the route MTU: {text}"
    );
}

/// Peers and node slices are added and removed by SIGHUP on the source
/// node, both gateways and the destination node while a 10,000 packets/s
/// stream crosses the fabric through an entry present before and after
/// every change: not one packet is lost, reordered or mistranslated.
#[test]
fn config_changes_under_traffic_lose_nothing() {
    if !require_root("config_changes_under_traffic_lose_nothing") {
        return;
    }
    let bed = fabric_with("lt-atomic", Scenario::different_cidrs(), "auto", "plain");
    let (a, b) = (bed.pod(0, 0, 0), bed.pod(1, 1, 0));
    let dst = bed.address_seen_from_peer(&b);
    let source_seen = bed.address_seen_from_peer(&a);
    let (plan_a, plan_b) = (bed.scenario.a.clone(), bed.scenario.b.clone());
    // (namespace, original config, config with extra entries)
    let extra_peer = "[[peers]]\nid = 3\nname = \"cluster-c\"\npod_cidr = \"10.50.0.0/16\"\nview_cidr = \"10.51.0.0/16\"\ntransport = \"plain\"\n";
    let changes: Vec<(String, String, String)> = [
        (&plan_a, "n1", extra_peer.to_string()),
        (&plan_a, "gw", format!("{extra_peer}endpoint = \"203.0.113.9:4799\"\n")),
        (&plan_b, "gw", String::new()),
        (&plan_b, "n2", extra_peer.to_string()),
    ]
    .into_iter()
    .map(|(plan, host, extra)| {
        let ns = bed.ns(plan, host);
        let original = fs::read_to_string(bed.lab.config_path(&ns)).expect("config");
        let changed = if extra.is_empty() {
            // B's gateway: one more node slice.
            original.replace(
                "node_slices = [",
                "node_slices = [\n  { node_ip = \"198.51.100.13\", pod_cidr = \"10.100.30.0/24\" },",
            )
        } else {
            format!("{original}{extra}")
        };
        assert_ne!(changed, original);
        (ns, original, changed)
    })
    .collect();

    let result = traffic::udp_stream(&a, &b, dst, source_seen, 7800, 10_000, || {
        let mut applied = vec![1usize; changes.len()];
        for _round in 0..5 {
            for (i, (ns, original, changed)) in changes.iter().enumerate() {
                for text in [changed, original] {
                    fs::write(bed.lab.config_path(ns), text)?;
                    hangup(&bed, ns);
                    applied[i] += 1;
                    wait_for_log(&bed, ns, "configuration applied", applied[i])?;
                }
            }
        }
        Ok(())
    });
    let (outcome, ()) = match result {
        Ok(r) => r,
        Err(e) => panic!("{e:#}\n{}", bed.lab.logs()),
    };
    assert!(outcome.sent >= 10_000, "stream too short: {outcome:?}");
    assert_eq!(outcome.received, outcome.sent, "lost packets: {outcome:?}");
    assert_eq!(outcome.reordered, 0, "{outcome:?}");
    assert_eq!(outcome.duplicates, 0, "{outcome:?}");
    assert_eq!(outcome.mistranslated, 0, "{outcome:?}");
}

/// ICMP errors cross the fabric with their quoted packet translated: a DF
/// datagram too big for the destination pod's link makes the sender's
/// kernel learn the smaller path MTU from the fragmentation-needed error
/// the destination node sends, and tracepath from a pod in A reaches a pod
/// in B (the port-unreachable of the destination comes back as such).
#[test]
fn path_mtu_discovery_and_tracepath_work_across_the_fabric() {
    if !require_root("path_mtu_discovery_and_tracepath_work_across_the_fabric") {
        return;
    }
    // Identical CIDRs: both sides remap, so both translations are needed.
    let bed = fabric("lt-pmtu", Scenario::identical_cidrs());
    let (a, b) = (bed.pod(0, 0, 0), bed.pod(1, 1, 0));
    let dst = bed.address_seen_from_peer(&b);

    let trace = netns::exec(&a.netns, "tracepath", &["-n", "-m", "6", &dst.to_string()])
        .unwrap_or_else(|e| panic!("tracepath: {e:#}\n{}", bed.lab.logs()));
    assert!(
        trace.contains("reached"),
        "tracepath did not reach {dst}:\n{trace}"
    );

    // B's pod link gets a smaller MTU than the fabric route.
    let b_node = bed.ns(&bed.scenario.b, "n2");
    let host_end = netns::exec(&b_node, "ip", &["-o", "route", "get", &b.ip.to_string()])
        .expect("route to the pod");
    let dev = host_end
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .expect("pod interface")
        .to_owned();
    netns::exec(&b_node, "ip", &["link", "set", &dev, "mtu", "1300"]).expect("mtu");
    netns::exec(&b.netns, "ip", &["link", "set", "eth0", "mtu", "1300"]).expect("mtu");
    let probe = format!(
        r#"
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO
s.connect(("{dst}", 7900))
print("before", s.getsockopt(socket.IPPROTO_IP, 14))  # IP_MTU
s.send(bytes(1400 - 28))
time.sleep(1)
try:
    s.send(bytes(1400 - 28))
    print("second send accepted")
except OSError as e:
    print("second send refused", e.errno)
print("after", s.getsockopt(socket.IPPROTO_IP, 14))
"#
    );
    let out = netns::exec(&a.netns, "python3", &["-c", &probe])
        .unwrap_or_else(|e| panic!("probe: {e:#}"));
    assert!(
        out.contains("after 1300") && out.contains("second send refused 90"),
        "the sender did not learn the path MTU from the far side:\n{out}\n{}",
        bed.lab.logs()
    );
}
