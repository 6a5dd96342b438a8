//! `./x demo`: two simulated Kubernetes clusters, each a real control
//! plane with two real nodes (kubelet + containerd + kube-proxy in the
//! testbed's namespaces); Ligo installed in both with `kubectl apply -k
//! manifests/` and running as real pods; peered with `ligo-control peer
//! --offload out --wait`; pods talk across; then the big node: a
//! Deployment of A scheduled on the virtual node `ligo-b` runs in B and
//! answers through A's Service, and its copy reaches a Service of A; and
//! `unpeer` takes it all away again.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{
    kube::{self, ControlPlane},
    kube_nodes::{ligo_image, stop_leftover},
    kube_testbed::KubeTestbed,
    lab,
    real_cluster::{big_node, client_ip, install, logs, Cluster},
    testbed::{Pod, Scenario, Testbed},
    traffic,
};

const PREFIX: &str = "ligo-demo";
/// The control planes' link-local /30s (this and the next).
const INDEX: u8 = 231;
/// The nodes each cluster runs (real kubelets).
const NODES: [&str; 2] = ["gw", "n1"];

pub fn run(mut scenario: Scenario) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo builds network namespaces, API servers, real nodes and eBPF programs: run it as root");
    }
    // Both API servers and the gateways share one public network.
    scenario.public_bridge = true;
    let (a, b) = (&scenario.a, &scenario.b);
    println!(
        "== Ligo demo: cluster {} (pods {}) and cluster {} (pods {}), each a real kube-apiserver, controller-manager and scheduler with two real nodes (kubelet, containerd, kube-proxy)",
        a.name, a.pod_cidr, b.name, b.pod_cidr
    );
    let bed = Testbed::up(PREFIX, scenario.clone())?;
    let leftovers: Vec<_> = [&scenario.a, &scenario.b]
        .into_iter()
        .flat_map(|plan| {
            NODES.map(|name| {
                (
                    name,
                    bed.ns(plan, name),
                    bed.lab.file(&format!("{}-{name}-node", plan.name)),
                )
            })
        })
        .collect();
    ctrlc::set_handler(move || {
        eprintln!("\ninterrupted: removing the demo testbed");
        for (name, netns, dir) in &leftovers {
            stop_leftover(name, netns, dir.clone());
        }
        remove();
        std::process::exit(130);
    })?;
    println!("== building the image localhost/ligo:0.1.0 offline, starting the nodes, installing Ligo in both: kubectl apply -k manifests/");
    let image = ligo_image(&bed.lab.file("images"))?;
    let mut clusters = Vec::new();
    let mut result = Ok(());
    for (i, plan) in [&scenario.a, &scenario.b].into_iter().enumerate() {
        result = install(&mut clusters, &bed, plan, PREFIX, INDEX + i as u8, &image);
        if result.is_err() {
            break;
        }
    }
    let result = result.and_then(|()| show(&bed, &clusters));
    if result.is_err() {
        eprintln!("{}", logs(&clusters));
    }
    drop(clusters);
    drop(bed);
    println!("== testbed removed");
    result
}

fn remove() {
    for name in ["a", "b"] {
        kube::remove(&format!("{PREFIX}-{name}"));
    }
    lab::remove(PREFIX);
}

fn show(bed: &Testbed, clusters: &[Cluster]) -> Result<()> {
    let (a, b) = (&clusters[0].cp, &clusters[1].cp);
    let (plan_a, plan_b) = (&bed.scenario.a, &bed.scenario.b);
    println!("\n$ kubectl get nodes,pods -n ligo-system -o wide   (cluster a)");
    print!(
        "{}",
        a.kubectl(&["get", "nodes,pods", "-n", "ligo-system", "-o", "wide"])?
    );

    let kubeconfig = |cp: &ControlPlane| cp.kubeconfig.to_string_lossy().into_owned();
    println!("\n$ ligo-control peer --kubeconfig a --remote-kubeconfig b --offload out --wait");
    let (ok, out) = KubeTestbed::ligo_control(&[
        "peer",
        "--kubeconfig",
        &kubeconfig(a),
        "--remote-kubeconfig",
        &kubeconfig(b),
        "--offload",
        "out",
        "--wait",
        "--timeout",
        "90s",
    ])?;
    print!("{out}");
    if !ok {
        bail!("peer failed");
    }

    // The client pods' network namespaces, to talk from and to.
    let mut clients = Vec::new();
    for (i, (cluster, plan)) in clusters.iter().zip([plan_a, plan_b]).enumerate() {
        let container = cluster.cp.jsonpath(
            "pod",
            "client",
            "{.status.containerStatuses[0].containerID}",
        )?;
        let pid = cluster.nodes[1].container_pid(&container)?;
        let netns = format!("{PREFIX}-{}-client", plan.name);
        crate::netns::ip(&["netns", "attach", &netns, &pid.to_string()])?;
        clients.push(Pod {
            netns,
            ip: client_ip(&cluster.cp)?,
            cluster: i,
        });
    }
    let view_of = |cp: &ControlPlane, peer: &str| -> Result<_> {
        Ok(crate::testbed::Cidr::parse(&cp.jsonpath(
            "peer",
            peer,
            "{.spec.view}",
        )?))
    };
    let (view_b, view_a) = (view_of(a, "b")?, view_of(b, "a")?);
    let seen = [
        plan_b.pod_cidr.translate(clients[1].ip, view_b),
        plan_a.pod_cidr.translate(clients[0].ip, view_a),
    ];
    talk(&clients[0], &clients[1], seen[0], seen[1], ["a", "b"], 7001)?;
    talk(&clients[1], &clients[0], seen[1], seen[0], ["b", "a"], 7002)?;

    println!("\n$ ligo-control offload namespace demo --kubeconfig a --wait");
    print!("{}", KubeTestbed::offload_namespace(a, "demo")?);
    println!("\n-- the big node: Deployment far (tolerating the virtual node) and near (on n1) in A's namespace demo, each with a Service");
    let big = big_node(a, b, plan_a.pod_cidr, plan_b.pod_cidr).context("the big node")?;
    println!("\n$ kubectl get nodes   (cluster a)");
    print!("{}", a.kubectl(&["get", "nodes", "-o", "wide"])?);
    println!("\n$ kubectl get pods,services -n demo -o wide   (cluster a)");
    print!(
        "{}",
        a.kubectl(&["get", "pods,services", "-n", "demo", "-o", "wide"])?
    );
    println!("\n$ kubectl get pods,services,endpoints -n demo -o wide   (cluster b: far's copy, near reflected)");
    print!(
        "{}",
        b.kubectl(&["get", "pods,services,endpoints", "-n", "demo", "-o", "wide"])?
    );
    println!(
        "\n   far runs in B at {}; A sees it at {} (B's address in A's view of B)",
        big.copy_ip, big.far_ip
    );
    println!("   A's client -> far at {}: {}", big.far_ip, big.far_ping);
    println!(
        "   A's client -> Service far ({}:80, A's kube-proxy) -> the pod in B: {}",
        big.far_service, big.far_answer
    );
    println!(
        "   far's copy in B -> Service near ({}:80, reflected into B, B's kube-proxy) -> the pod in A: {}",
        big.near_service, big.near_answer
    );

    println!("\n$ ligo-control status --kubeconfig a");
    let (_, out) = KubeTestbed::ligo_control(&["status", "--kubeconfig", &kubeconfig(a)])?;
    print!("{out}");

    println!("\n$ ligo-control unpeer --kubeconfig a --remote-kubeconfig b");
    let started = std::time::Instant::now();
    let (ok, out) = KubeTestbed::ligo_control(&[
        "unpeer",
        "--kubeconfig",
        &kubeconfig(a),
        "--remote-kubeconfig",
        &kubeconfig(b),
    ])?;
    print!("{out}");
    if !ok {
        bail!("unpeer failed");
    }
    let took = started.elapsed();
    let stopped = a.wait_for("traffic to stop", Duration::from_secs(10), || {
        Ok(traffic::ping(&clients[0], seen[0], 1)
            .is_err()
            .then_some(()))
    });
    match stopped {
        Ok(()) => println!(
            "   unpeer took {:.2} s; pod {} no longer reaches {}; nodes of a: {}",
            took.as_secs_f64(),
            clients[0].ip,
            seen[0],
            a.kubectl(&["get", "nodes", "-o", "jsonpath={.items[*].metadata.name}"])?
        ),
        Err(e) => bail!("traffic still flows after unpeer: {e:#}"),
    }
    Ok(())
}

/// ICMP, TCP and UDP from `from` to `to`, which `from` addresses as
/// `dst` and which sees `from` as `src_seen`.
fn talk(
    from: &Pod,
    to: &Pod,
    dst: std::net::Ipv4Addr,
    src_seen: std::net::Ipv4Addr,
    names: [&str; 2],
    port: u16,
) -> Result<()> {
    println!(
        "\n-- pod {} in {} -> pod {} in {}, addressed as {dst}",
        from.ip, names[0], to.ip, names[1]
    );
    let ping = traffic::ping(from, dst, 3)?;
    if let Some(summary) = ping.lines().find(|l| l.contains("packets transmitted")) {
        println!("   ICMP: {summary}");
    }
    let tcp = traffic::tcp_transfer(from, to, dst, port, 4 << 20)?;
    println!(
        "   TCP:  {} bytes, SHA-256 matches; the server saw the client as {} (expected {src_seen})",
        tcp.bytes, tcp.server_saw
    );
    let udp = traffic::udp_exchange(from, to, dst, port, 20)?;
    println!(
        "   UDP:  20 datagrams echoed; server saw {}, replies came from {}",
        udp.server_saw, udp.reply_from
    );
    Ok(())
}
