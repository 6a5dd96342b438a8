//! `./x demo`: two simulated Kubernetes clusters (a real control plane
//! each, the testbed's namespaces as their nodes), Ligo installed in both
//! with `kubectl apply -k manifests/`, peered with `ligo-control peer
//! --wait`; then pods talk across, `ligo-control status` shows the peering,
//! and `unpeer` takes it all away again.

use std::time::Duration;

use anyhow::{bail, Result};

use crate::{
    kube,
    kube_testbed::KubeTestbed,
    lab,
    testbed::{Pod, Scenario},
    traffic,
};

const PREFIX: &str = "ligo-demo";
/// The control planes' link-local /30s (this and the next).
const INDEX: u8 = 231;

pub fn run(scenario: Scenario) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo builds network namespaces, API servers and eBPF programs: run it as root");
    }
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: removing the demo testbed");
        remove();
        std::process::exit(130);
    })?;
    let (a, b) = (&scenario.a, &scenario.b);
    println!(
        "== Ligo demo: cluster {} (pods {}) and cluster {} (pods {}), each a real kube-apiserver, controller-manager and scheduler",
        a.name, a.pod_cidr, b.name, b.pod_cidr
    );
    println!("== installing Ligo in both: kubectl apply -k manifests/");
    let mut kb = KubeTestbed::up(PREFIX, scenario.clone(), INDEX)?;
    let result = show(&mut kb);
    if result.is_err() {
        eprintln!("{}", kb.logs());
    }
    drop(kb);
    println!("== testbed removed");
    result
}

fn remove() {
    for name in ["a", "b"] {
        kube::remove(&format!("{PREFIX}-{name}"));
    }
    lab::remove(PREFIX);
}

fn show(kb: &mut KubeTestbed) -> Result<()> {
    kb.start_ligo()?;
    println!("== ligo-control, the ligo-fabric daemons and the WireGuard tunnels run from the manifests' pod templates");
    let kubeconfig_a = kb.clusters[0].kubeconfig.to_string_lossy().into_owned();
    println!("\n$ kubectl get clusterfabric,nodes   (cluster a)");
    print!(
        "{}",
        kb.clusters[0].kubectl(&["get", "clusterfabric,nodes", "-o", "wide"])?
    );

    println!("\n$ ligo-control peer --kubeconfig a --remote-kubeconfig b --wait");
    let (out, _) = kb.peer()?;
    print!("{out}");

    println!("\n$ ligo-control status --kubeconfig a");
    let (_, out) = KubeTestbed::ligo_control(&["status", "--kubeconfig", &kubeconfig_a])?;
    print!("{out}");

    let a_pod = kb.bed.pod(0, 0, 0);
    let b_pod = kb.bed.pod(1, 1, 1);
    for (from, to, port) in [(&a_pod, &b_pod, 7001), (&b_pod, &a_pod, 7002)] {
        talk(kb, from, to, port)?;
    }

    println!("\n$ kubectl get nodefabrics   (cluster a: what each daemon programmed)");
    print!(
        "{}",
        kb.clusters[0].kubectl(&[
            "get",
            "nodefabrics",
            "-o",
            "custom-columns=NODE:.metadata.name,SLICES:.status.podCIDRs,PEERS:.status.programmedPeers,PROGRAMMED:.status.conditions[0].status"
        ])?
    );

    println!("\n$ ligo-control unpeer --kubeconfig a --remote-kubeconfig b");
    let (out, took) = kb.unpeer()?;
    print!("{out}");
    let dst = kb.bed.address_seen_from_peer(&b_pod);
    let stopped = kb.clusters[0].wait_for("traffic to stop", Duration::from_secs(10), || {
        Ok(traffic::ping(&a_pod, dst, 1).is_err().then_some(()))
    });
    match stopped {
        Ok(()) => println!(
            "   unpeer took {:.2} s; pod {} no longer reaches {dst}",
            took.as_secs_f64(),
            a_pod.ip
        ),
        Err(e) => bail!("traffic still flows after unpeer: {e:#}"),
    }
    Ok(())
}

fn talk(kb: &KubeTestbed, from: &Pod, to: &Pod, port: u16) -> Result<()> {
    let names = [kb.bed.scenario.a.name, kb.bed.scenario.b.name];
    let dst = kb.bed.address_seen_from_peer(to);
    println!(
        "\n-- pod {} in {} -> pod {} in {}, addressed as {dst}",
        from.ip, names[from.cluster], to.ip, names[to.cluster]
    );
    let ping = traffic::ping(from, dst, 3)?;
    if let Some(summary) = ping.lines().find(|l| l.contains("packets transmitted")) {
        println!("   ICMP: {summary}");
    }
    let tcp = traffic::tcp_transfer(from, to, dst, port, 4 << 20)?;
    println!(
        "   TCP:  {} bytes, SHA-256 matches; the server saw the client as {}",
        tcp.bytes, tcp.server_saw
    );
    let udp = traffic::udp_exchange(from, to, dst, port, 20)?;
    println!(
        "   UDP:  20 datagrams echoed; server saw {}, replies came from {}",
        udp.server_saw, udp.reply_from
    );
    Ok(())
}
