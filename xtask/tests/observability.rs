//! Observability end to end: a real Prometheus scrapes every daemon of the
//! testbed; traffic and a deliberate drop must show up through its query
//! API; every metric the Grafana dashboard queries must exist in a live
//! scrape; `inspect` must match the testbed. Needs root.

use std::{collections::BTreeSet, net::UdpSocket, process::Command, time::Duration};

use xtask::{
    daemon_binary, netns,
    prometheus::{http_get, Prometheus, Target},
    require_root,
    testbed::{Scenario, Testbed, FABRIC_PORT},
    traffic, workspace_root,
};

const TRANSFER: usize = 8 << 20;

fn fabric(prefix: &str, transport: &'static str) -> Testbed {
    let mut bed = Testbed::up(prefix, Scenario::identical_cidrs()).expect("testbed");
    bed.transport = transport;
    if let Err(e) = bed.start_fabric(&daemon_binary()) {
        panic!("{e:#}\n{}", bed.lab.logs());
    }
    bed
}

/// Metric names (without labels) in an OpenMetrics scrape.
fn scraped_names(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next().map(str::to_owned))
        .collect()
}

/// `ligo_fabric_*` names used in the dashboard's queries.
fn dashboard_metrics() -> BTreeSet<String> {
    let path = workspace_root().join("manifests/grafana-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard"))
            .expect("dashboard JSON");
    let mut names = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for (i, _) in expr.match_indices("ligo_fabric_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                names.insert(name);
            }
        }
    }
    names
}

#[test]
fn prometheus_sees_traffic_drops_and_every_dashboard_metric() {
    if !require_root("prometheus_sees_traffic_drops_and_every_dashboard_metric") {
        return;
    }
    // WireGuard between the gateways (the default), so the dashboard's
    // tunnel panels have something to show.
    let mut bed = fabric("lt-obs", "wireguard");
    let mon = bed.add_monitoring().expect("monitoring host");
    let targets: Vec<Target> = bed
        .metrics_endpoints()
        .into_iter()
        .map(|(cluster, host, address)| Target {
            labels: vec![("cluster", cluster.to_string()), ("host", host.to_string())],
            address,
        })
        .collect();
    let prometheus = Prometheus::start(&mut bed.lab, &mon, &targets).expect("prometheus");
    prometheus
        .wait_for("count(up == 1)", Duration::from_secs(30), |v| v == 6.0)
        .expect("all six daemons scraped");

    let bytes = |cluster: &str, host: &str, direction: &str| {
        format!("sum(ligo_fabric_peer_bytes_total{{cluster=\"{cluster}\",host=\"{host}\",direction=\"{direction}\"}})")
    };
    let any = |_: f64| true;
    let wait = Duration::from_secs(15);
    let watched = [
        ("a", "gw", "to_peer"),
        ("a", "n1", "to_peer"),
        ("b", "gw", "from_peer"),
        ("b", "n2", "from_peer"),
    ];
    let before: Vec<f64> = watched
        .iter()
        .map(|(c, h, d)| {
            prometheus
                .wait_for(&bytes(c, h, d), wait, any)
                .expect("baseline")
        })
        .collect();

    let (a, b) = (bed.pod(0, 0, 0), bed.pod(1, 1, 0));
    traffic::tcp_transfer(&a, &b, bed.address_seen_from_peer(&b), 7500, TRANSFER)
        .expect("transfer");
    for ((c, h, d), start) in watched.iter().zip(before) {
        prometheus
            .wait_for(&bytes(c, h, d), wait, |v| v - start >= TRANSFER as f64)
            .unwrap_or_else(|e| panic!("{c} {h} {d} did not rise by {TRANSFER} bytes: {e:#}"));
    }

    // A fabric-port datagram to a node from a host that is not its gateway
    // must be dropped as not_from_gateway, and counted exactly.
    let drops =
        "sum(ligo_fabric_drops_total{cluster=\"a\",host=\"n1\",reason=\"not_from_gateway\"})";
    let start = prometheus
        .wait_for(drops, wait, any)
        .expect("drops baseline");
    let n2 = bed.ns(&bed.scenario.a, "n2");
    netns::join(netns::within(&n2, || {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        for _ in 0..3 {
            socket.send_to(&[0x08; 64], ("192.0.2.11", FABRIC_PORT))?;
        }
        Ok(())
    }))
    .expect("send");
    prometheus
        .wait_for(drops, wait, |v| v == start + 3.0)
        .expect("3 drops under not_from_gateway");

    prometheus
        .wait_for(
            "sum(ligo_fabric_tunnel_peer_up{cluster=\"a\",host=\"gw\"})",
            wait,
            |v| v == 1.0,
        )
        .expect("A's gateway reports its WireGuard peer up");

    let (status, _) = http_get(&mon, "http://192.0.2.11:9477/readyz", &[]).expect("readyz");
    assert_eq!(status, 200);
    let (status, _) = http_get(&mon, "http://198.51.100.1:9477/healthz", &[]).expect("healthz");
    assert_eq!(status, 200);

    let mut live = BTreeSet::new();
    for address in ["192.0.2.11:9477", "192.0.2.1:9477"] {
        let (status, scrape) =
            http_get(&mon, &format!("http://{address}/metrics"), &[]).expect("scrape");
        assert_eq!(status, 200);
        live.extend(scraped_names(&scrape));
    }
    let wanted = dashboard_metrics();
    assert!(
        wanted.len() >= 10,
        "dashboard queries too few metrics: {wanted:?}"
    );
    let missing: Vec<_> = wanted.difference(&live).collect();
    assert!(
        missing.is_empty(),
        "dashboard queries metrics no daemon exports: {missing:?}"
    );
}

fn inspect(ns: &str, args: &[&str]) -> std::process::Output {
    let mut full = vec!["netns", "exec", ns];
    let daemon = daemon_binary();
    let daemon = daemon.to_string_lossy();
    full.push(&daemon);
    full.push("inspect");
    full.extend_from_slice(args);
    Command::new("ip").args(&full).output().expect("inspect")
}

fn inspect_json(ns: &str, args: &[&str]) -> serde_json::Value {
    let out = inspect(ns, args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("inspect JSON")
}

#[test]
fn inspect_reports_the_testbed_state() {
    if !require_root("inspect_reports_the_testbed_state") {
        return;
    }
    let bed = fabric("lt-insp", "plain");
    let (a_gw, a_n1) = (bed.ns(&bed.scenario.a, "gw"), bed.ns(&bed.scenario.a, "n1"));
    let gw_config = bed.lab.config_path(&a_gw);
    let gw_config = gw_config.to_string_lossy();
    let (a, b) = (bed.pod(0, 0, 0), bed.pod(1, 0, 1));
    traffic::ping(&a, bed.address_seen_from_peer(&b), 2).expect("ping");

    let peers = inspect_json(&a_gw, &["peers", "--config", &gw_config, "-o", "json"]);
    assert_eq!(peers["role"], "gateway");
    let peer = &peers["peers"][0];
    assert_eq!(peer["id"], 2);
    assert_eq!(peer["name"], "cluster-b");
    assert_eq!(peer["pod_cidr"], "10.244.0.0/16");
    assert_eq!(peer["view_cidr"], "10.245.0.0/16");
    assert_eq!(peer["endpoint"], format!("203.0.113.2:{FABRIC_PORT}"));
    assert!(peer["to_peer"]["packets"].as_u64() >= Some(2), "{peers:#}");
    assert!(
        peer["from_peer"]["packets"].as_u64() >= Some(2),
        "{peers:#}"
    );
    assert!(
        peer["from_peer"]["last_packet_age_seconds"]
            .as_f64()
            .is_some_and(|age| age < 30.0),
        "{peers:#}"
    );

    let maps = inspect_json(&a_gw, &["maps", "--config", &gw_config, "-o", "json"]);
    let slices: Vec<(String, String)> = maps["node_slices"]
        .as_array()
        .expect("slices")
        .iter()
        .map(|s| {
            (
                s["pod_cidr"].as_str().unwrap_or_default().into(),
                s["node_ip"].as_str().unwrap_or_default().into(),
            )
        })
        .collect();
    assert_eq!(
        slices,
        vec![
            ("10.244.1.0/24".into(), "192.0.2.11".into()),
            ("10.244.2.0/24".into(), "192.0.2.12".into())
        ]
    );

    let table = inspect(&a_gw, &["peers", "--config", &gw_config]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("cluster-b")
            && table.contains("203.0.113.2:4799")
            && table.contains("no drops"),
        "{table}"
    );

    let routes = inspect_json(&a_n1, &["routes", "-o", "json"]);
    assert_eq!(routes[0]["destination"], "10.245.0.0/16");
    assert_eq!(routes[0]["via"], "192.0.2.1");
    assert_eq!(routes[0]["interface"], "eth0");
    assert_eq!(routes[0]["mtu"], 1450);

    // No daemon behind the pin dir: a clear error, not a panic.
    let out = inspect(&a_n1, &["peers", "--pin-dir", "/run/ligo-no-such-daemon"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is a ligo-fabric daemon running"), "{err}");
}
