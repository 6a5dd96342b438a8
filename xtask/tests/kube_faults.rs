//! Faults of the Kubernetes half, on the fabric installed from the
//! manifests (see kube_fabric.rs): the controller killed mid-peering and
//! restarted; the nodes cut off from their API server for 30 s under a
//! 10,000 packets/s stream, with a daemon restarted while it cannot read
//! and a change made meanwhile (nothing lost; the change applied once the
//! API server is back).

use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Result};
use xtask::{kube_testbed::KubeTestbed, require_root, testbed::Scenario, traffic};

/// How long the nodes cannot reach their API server.
const OUTAGE: Duration = Duration::from_secs(30);

#[test]
fn controller_crash_and_api_server_outage_lose_nothing() {
    if !require_root("controller_crash_and_api_server_outage_lose_nothing") {
        return;
    }
    let mut kb = KubeTestbed::up("kft", Scenario::identical_cidrs(), 225)
        .unwrap_or_else(|e| panic!("{e:#}"));
    if let Err(e) = kb.start_ligo() {
        panic!("{e:#}\n{}", kb.logs());
    }

    // The controller of A dies right after the Peers are created, before it
    // allocated anything; its successor finishes the job from the objects.
    let (out, _) = kb.peer_with(&[]).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(out.contains("Peers created in both"), "{out}");
    kb.bed
        .lab
        .kill_daemon("a-control")
        .expect("kill the controller");
    kb.start_controller(0).expect("restart the controller");
    for (i, other) in [(0, "b"), (1, "a")] {
        if let Err(e) = kb.clusters[i].wait_condition("peer", other, "Ready", "True") {
            panic!("{e:#}\n{}", kb.logs());
        }
    }
    let view = kb.clusters[0]
        .jsonpath("peer", "b", "{.spec.view}")
        .unwrap_or_default();
    assert_eq!(view, kb.bed.scenario.a.view_of_peer.to_string());

    let (a, b) = (kb.bed.pod(0, 0, 0), kb.bed.pod(1, 1, 1));
    let dst = kb.bed.address_seen_from_peer(&b);
    let source = kb.bed.address_seen_from_peer(&a);
    let outcome = traffic::udp_stream(&a, &b, dst, source, 7500, 10_000, || outage(&mut kb));
    let (stream, took) = match outcome {
        Ok(r) => r,
        Err(e) => panic!("{e:#}\n{}", kb.logs()),
    };
    println!("{stream:?}; the change reached the gateway {took:?} after the API server came back");
    assert_eq!(stream.received, stream.sent, "{stream:?}");
    assert_eq!(
        (stream.duplicates, stream.mistranslated, stream.reordered),
        (0, 0, 0),
        "{stream:?}"
    );
}

/// A's nodes lose their API server for [`OUTAGE`]; meanwhile n1's daemon
/// (on the stream's path) restarts, and an operator adds Node n3. Returns
/// how long after the API server came back the gateway programmed n3.
fn outage(kb: &mut KubeTestbed) -> Result<Duration> {
    let cut = Instant::now();
    kb.partition(0, true)?;
    let during = while_cut(kb, cut);
    // Healed whatever happened, so nothing stays cut off.
    kb.partition(0, false)?;
    let back = Instant::now();
    during?;
    let n1 = kb.bed.ns(&kb.bed.scenario.a, "n1");
    let mut n1_ready = false;
    loop {
        if !n1_ready {
            let log = std::fs::read_to_string(kb.bed.lab.log_path(&n1))?;
            n1_ready = log.contains("fabric ready");
        }
        if n1_ready && has_slice(kb, "10.244.9.0/24")? {
            return Ok(back.elapsed());
        }
        if back.elapsed() > Duration::from_secs(60) {
            bail!("60 s after the outage: n1's daemon ready {n1_ready}, the gateway has n3's slice: no");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn while_cut(kb: &mut KubeTestbed, cut: Instant) -> Result<()> {
    let plan = kb.bed.scenario.a.clone();
    let n1 = kb.bed.ns(&plan, "n1");
    thread::sleep(Duration::from_secs(2));
    kb.bed.lab.stop_daemon(&n1)?;
    kb.spawn_daemon(&plan, "n1")?;
    // The operator still reaches the API server (from outside the nodes).
    kb.clusters[0].add_node("n3", "10.244.9.0/24", "192.0.2.13", false)?;
    thread::sleep(Duration::from_secs(3));
    let log = std::fs::read_to_string(kb.bed.lab.log_path(&n1))?;
    ensure!(
        log.contains("waiting for the API server's objects") && !log.contains("fabric ready"),
        "a daemon that cannot read its API server must change nothing:\n{log}"
    );
    ensure!(
        !has_slice(kb, "10.244.9.0/24")?,
        "the gateway learnt of n3 without its API server"
    );
    thread::sleep(OUTAGE.saturating_sub(cut.elapsed()));
    Ok(())
}

fn has_slice(kb: &KubeTestbed, slice: &str) -> Result<bool> {
    let maps = kb.inspect(&kb.bed.scenario.a, "gw")?;
    Ok(maps["node_slices"]
        .as_array()
        .is_some_and(|s| s.iter().any(|n| n["pod_cidr"] == slice)))
}
