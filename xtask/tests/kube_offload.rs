//! The big node, end to end against real API servers: `peer --offload out`
//! makes cluster B a virtual node `ligo-b` in A; the real kube-scheduler of
//! A puts a Deployment's pods on it; Ligo copies them into B, where B's
//! real scheduler binds them to B's nodes and a kubelet played by the
//! harness ([`xtask::played_kubelet`]: network namespaces on B's nodes
//! with addresses from their slices) runs them; their status comes back to
//! A with the addresses in A's view of B, and A's pods reach them there
//! through the fabric. Then capacity, refusals, deletion both ways,
//! out-of-band edits, a finished Job, an unschedulable copy, and unpeer.

use std::{
    net::Ipv4Addr,
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use xtask::{
    kube::ControlPlane,
    kube_testbed::KubeTestbed,
    played_kubelet::{PlayedKubelet, PlayedNode},
    require_root,
    testbed::{Cidr, Scenario},
    traffic,
};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
const WAIT: Duration = Duration::from_secs(30);

fn json(cp: &ControlPlane, args: &[&str]) -> Result<Value> {
    let mut full = args.to_vec();
    full.extend(["-o", "json"]);
    Ok(serde_json::from_str(&cp.kubectl(&full)?)?)
}

fn items(cp: &ControlPlane, args: &[&str]) -> Result<Vec<Value>> {
    Ok(json(cp, args)?["items"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

fn s<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// The harness plays B's kubelet on n1 and n2 (4 CPUs, 8 GiB, 20 pods each).
fn play_b(kb: &KubeTestbed) -> Result<PlayedKubelet> {
    play(kb, 1, &["n1", "n2"])
}

fn play(kb: &KubeTestbed, cluster: usize, hosts: &[&str]) -> Result<PlayedKubelet> {
    let plan = kb.plans()[cluster].clone();
    let nodes = hosts
        .iter()
        .enumerate()
        .map(|(i, n)| PlayedNode {
            name: (*n).to_owned(),
            netns: kb.bed.ns(&plan, n),
            slice: plan.node_slices[i],
        })
        .collect();
    PlayedKubelet::start(
        kb.clusters[cluster].kubeconfig.clone(),
        &kb.bed.ns(&plan, ""),
        nodes,
        serde_json::json!({"cpu": "4", "memory": "8Gi", "pods": "20"}),
    )
}

fn deployment(replicas: u32) -> String {
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: demo}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      nodeSelector: {{type: virtual-kubelet}}
      tolerations: [{{key: virtual-node.ligo.io/not-allowed, operator: Exists, effect: NoSchedule}}]
      containers:
      - name: c
        image: busybox:1.36
        resources: {{requests: {{cpu: 500m, memory: 64Mi}}}}
        envFrom: [{{configMapRef: {{name: web-config}}}}]
        volumeMounts: [{{name: s, mountPath: /etc/web}}]
      volumes: [{{name: s, secret: {{secretName: web-secret}}}}]
"
    )
}

/// A's pods of `app`, once `count` of them are Running with an address.
fn running(cp: &ControlPlane, app: &str, count: usize) -> Result<Vec<Value>> {
    cp.wait_for(
        &format!("{count} {app} pods Running with an IP"),
        WAIT,
        || {
            let pods: Vec<Value> = items(
                cp,
                &["get", "pods", "-n", "demo", "-l", &format!("app={app}")],
            )?
            .into_iter()
            .filter(|p| s(p, "/status/phase") == "Running" && !s(p, "/status/podIP").is_empty())
            .filter(|p| p.pointer("/metadata/deletionTimestamp").is_none())
            .collect();
            Ok((pods.len() == count).then_some(pods))
        },
    )
}

fn copy_of(b: &ControlPlane, name: &str) -> Result<Option<Value>> {
    let out = b.kubectl(&[
        "get",
        "pod",
        "-n",
        "demo",
        name,
        "--ignore-not-found",
        "-o",
        "json",
    ])?;
    Ok(if out.trim().is_empty() {
        None
    } else {
        Some(serde_json::from_str(&out)?)
    })
}

fn node_allocatable(a: &ControlPlane, resource: &str) -> String {
    a.jsonpath(
        "node",
        "ligo-b",
        &format!("{{.status.allocatable.{resource}}}"),
    )
    .unwrap_or_default()
}

/// What B offers A, computed here from B's pods: 8 CPUs and 40 pods on
/// n1 and n2, minus what B's own pods there request (A's copies are
/// already counted by A's scheduler). CPU in millicores.
fn expected_offer(b: &ControlPlane) -> Result<(u64, u64)> {
    let (mut cpu, mut pods) = (8000u64, 40u64);
    for pod in items(b, &["get", "pods", "-A"])? {
        let on_node = matches!(s(&pod, "/spec/nodeName"), "n1" | "n2");
        let finished = matches!(s(&pod, "/status/phase"), "Succeeded" | "Failed");
        if !on_node || finished || s(&pod, "/metadata/labels/ligo.io~1origin") == "a" {
            continue;
        }
        pods -= 1;
        for c in pod["spec"]["containers"].as_array().into_iter().flatten() {
            let text = c["resources"]["requests"]["cpu"].as_str().unwrap_or("0");
            cpu -= match text.strip_suffix('m') {
                Some(m) => m.parse::<u64>()?,
                None => text.parse::<u64>()? * 1000,
            };
        }
    }
    Ok((cpu, pods))
}

/// The virtual node's allocatable CPU (millicores) and pods.
fn virtual_offer(a: &ControlPlane) -> (u64, u64) {
    let cpu = node_allocatable(a, "cpu");
    let cpu = match cpu.strip_suffix('m') {
        Some(m) => m.parse().unwrap_or(0),
        None => cpu.parse::<u64>().unwrap_or(0) * 1000,
    };
    (cpu, node_allocatable(a, "pods").parse().unwrap_or(0))
}

fn event_reasons(a: &ControlPlane, pod: &str) -> Result<Vec<String>> {
    Ok(items(
        a,
        &[
            "get",
            "events",
            "-n",
            "demo",
            "--field-selector",
            &format!("involvedObject.name={pod}"),
        ],
    )?
    .iter()
    .map(|e| s(e, "/reason").to_owned())
    .collect())
}

/// A pod of `a` bound to the virtual node, by name prefix.
fn bound_pod(a: &ControlPlane, prefix: &str) -> Result<Option<Value>> {
    Ok(items(
        a,
        &[
            "get",
            "pods",
            "-n",
            "demo",
            "--field-selector",
            "spec.nodeName=ligo-b",
        ],
    )?
    .into_iter()
    .find(|p| s(p, "/metadata/name").starts_with(prefix)))
}

/// The objects offloading writes, for a failure message.
fn dump(kb: &KubeTestbed) -> String {
    let (a, b) = (&kb.clusters[0], &kb.clusters[1]);
    let get =
        |cp: &ControlPlane, args: &[&str]| cp.kubectl(args).unwrap_or_else(|e| format!("{e:#}"));
    format!(
        "--- A node ligo-b ---\n{}\n--- A peer b ---\n{}\n--- B peer a ---\n{}\n--- A pods ---\n{}\n--- B pods ---\n{}",
        get(a, &["get", "node", "ligo-b", "-o", "yaml"]),
        get(a, &["get", "peer", "b", "-o", "yaml"]),
        get(b, &["get", "peer", "a", "-o", "yaml"]),
        get(a, &["get", "pods", "-A", "-o", "wide"]),
        get(b, &["get", "pods", "-A", "-o", "wide"]),
    )
}

fn offload_and_run(kb: &KubeTestbed, kubelet: &PlayedKubelet) -> Result<Vec<Value>> {
    let (a, b) = (&kb.clusters[0], &kb.clusters[1]);
    let (plan_a, plan_b) = (kb.plans()[0].clone(), kb.plans()[1].clone());
    let (out, took) = kb.peer_with(&["--offload", "out", "--wait", "--timeout", "60s"])?;
    println!("peer --offload out --wait took {took:?}:\n{out}");

    // The virtual node: B's two nodes' allocatable, Ready, network up.
    a.wait_for("ligo-b Ready with B's free capacity", WAIT, || {
        let ready = a.jsonpath(
            "node",
            "ligo-b",
            "{.status.conditions[?(@.type==\"Ready\")].status}",
        )?;
        Ok((ready == "True" && virtual_offer(a) == expected_offer(b)?).then_some(()))
    })?;
    a.wait_for("ligo-b's network up", WAIT, || {
        let down = a.jsonpath(
            "node",
            "ligo-b",
            "{.status.conditions[?(@.type==\"NetworkUnavailable\")].status}",
        )?;
        Ok((down == "False").then_some(()))
    })?;
    let taints = a.jsonpath("node", "ligo-b", "{.spec.taints[*].key}")?;
    ensure!(
        taints.contains("virtual-node.ligo.io/not-allowed"),
        "taints: {taints}"
    );
    let holder = a.kubectl(&[
        "get",
        "lease",
        "-n",
        "kube-node-lease",
        "ligo-b",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ])?;
    ensure!(
        holder == "ligo-b",
        "the Lease of ligo-b is held by {holder:?}"
    );

    let out = KubeTestbed::offload_namespace(a, "demo")?;
    println!("{out}");
    let origin = b.jsonpath("namespace", "demo", "{.metadata.labels.ligo\\.io/origin}")?;
    ensure!(
        origin == plan_a.name,
        "B's namespace demo is labelled origin {origin:?}"
    );

    // An unschedulable copy (12 GiB fit the virtual node, no node of B),
    // started now: it is bounced after the timeout, checked at the end.
    a.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: big, namespace: demo, labels: {app: big}}\nspec:\n  tolerations: [{key: virtual-node.ligo.io/not-allowed, operator: Exists, effect: NoSchedule}]\n  containers: [{name: c, image: busybox:1.36, resources: {requests: {memory: 12Gi}}}]\n",
    )?;

    // What the pods refer to, and what they do not.
    a.apply(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web-config, namespace: demo}\ndata: {GREETING: hello}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: web-secret, namespace: demo}\nstringData: {token: s3cret}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: unrelated, namespace: demo}\nstringData: {x: \"z\"}\n",
    )?;
    a.apply(&deployment(2))?;
    let pods = running(a, "web", 2)?;
    let view = Cidr::parse(&a.jsonpath("peer", "b", "{.spec.view}")?);
    for pod in &pods {
        let name = s(pod, "/metadata/name");
        ensure!(
            s(pod, "/spec/nodeName") == "ligo-b",
            "{name} is on {}",
            s(pod, "/spec/nodeName")
        );
        let copy = copy_of(b, name)?.with_context(|| format!("no copy of {name} in B"))?;
        let node = s(&copy, "/spec/nodeName");
        ensure!(
            node == "n1" || node == "n2",
            "B's scheduler put {name} on {node:?}"
        );
        ensure!(
            s(&copy, "/metadata/labels/ligo.io~1origin") == "a",
            "copy labels {}",
            copy["metadata"]["labels"]
        );
        let tolerations = copy["spec"]["tolerations"].to_string();
        ensure!(
            !tolerations.contains("virtual-node.ligo.io"),
            "the copy still tolerates the virtual node: {tolerations}"
        );
        // The address: B's real one, translated into A's view by the
        // testbed's own arithmetic.
        let real: Ipv4Addr = s(&copy, "/status/podIP").parse()?;
        let sandbox = kubelet
            .sandbox(s(&copy, "/metadata/uid"))
            .context("no sandbox")?;
        ensure!(
            real == sandbox.ip,
            "copy IP {real} vs sandbox {}",
            sandbox.ip
        );
        let seen: Ipv4Addr = s(pod, "/status/podIP").parse()?;
        ensure!(
            seen == plan_b.pod_cidr.translate(real, view),
            "{name}: A sees {seen} for B's {real} (view {view:?})"
        );
        ensure!(
            s(pod, "/status/podIPs/0/ip") == seen.to_string(),
            "podIPs {}",
            pod["status"]["podIPs"]
        );
        ensure!(
            pod.pointer("/status/hostIP").is_none(),
            "hostIP leaked: {}",
            pod["status"]["hostIP"]
        );
        // A pod of A reaches it there, through the fabric.
        traffic::ping(&kb.bed.pod(0, 0, 0), seen, 3)
            .with_context(|| format!("ping {name} at {seen}"))?;
    }
    Ok(pods)
}

/// A's pod `home` (on A's n1, run by a kubelet the harness plays) behind
/// Service `home`; B's copies of the web pods behind A's Service `web`.
fn reflection(kb: &KubeTestbed, b_kubelet: &PlayedKubelet) -> Result<()> {
    let (a, b) = (&kb.clusters[0], &kb.clusters[1]);
    let _a_kubelet = play(kb, 0, &["n1"])?;
    a.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: home, namespace: demo, labels: {app: home}}\nspec:\n  nodeSelector: {ligo-test/home: \"true\"}\n  containers: [{name: c, image: busybox:1.36}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: home, namespace: demo}\nspec:\n  selector: {app: home}\n  ports: [{port: 80, targetPort: 8080}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\nspec:\n  selector: {app: web}\n  ports: [{port: 80, targetPort: 8080}]\n",
    )?;
    a.kubectl(&["label", "node", "n1", "ligo-test/home=true"])?;
    let home = a.wait_for("home Running", WAIT, || {
        Ok(Some(json(a, &["get", "pod", "-n", "demo", "home"])?)
            .filter(|p| s(p, "/status/phase") == "Running"))
    })?;
    let home_ip: Ipv4Addr = s(&home, "/status/podIP").parse()?;

    // The referenced ConfigMap and Secret are there, the others are not.
    let cm = b.wait_for("web-config reflected", WAIT, || {
        Ok(b.kubectl(&[
            "get",
            "configmap",
            "-n",
            "demo",
            "web-config",
            "--ignore-not-found",
            "-o",
            "json",
        ])
        .ok()
        .filter(|o| !o.trim().is_empty()))
    })?;
    let cm: Value = serde_json::from_str(&cm)?;
    ensure!(
        cm["data"]["GREETING"] == "hello",
        "web-config there: {}",
        cm["data"]
    );
    ensure!(
        s(&cm, "/metadata/labels/ligo.io~1origin") == "a",
        "web-config labels {}",
        cm["metadata"]["labels"]
    );
    let secret = s(
        &json(b, &["get", "secret", "-n", "demo", "web-secret"])?,
        "/data/token",
    )
    .to_owned();
    ensure!(secret == "czNjcmV0", "web-secret's data there: {secret:?}");
    let secrets: Vec<String> = items(
        b,
        &["get", "secrets", "-n", "demo", "-l", "ligo.io/origin=a"],
    )?
    .iter()
    .map(|s| {
        s["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    })
    .collect();
    ensure!(
        secrets == ["web-secret"],
        "secrets reflected: {secrets:?} (only web-secret is referenced)"
    );
    // Changed here, changed there.
    a.kubectl(&[
        "patch",
        "configmap",
        "-n",
        "demo",
        "web-config",
        "-p",
        "{\"data\":{\"GREETING\":\"bonjour\"}}",
    ])?;
    b.wait_for("web-config updated", WAIT, || {
        Ok((s(
            &json(b, &["get", "configmap", "-n", "demo", "web-config"])?,
            "/data/GREETING",
        ) == "bonjour")
            .then_some(()))
    })?;

    // A's endpoints controller lists the offloaded pods at their addresses
    // in A's view.
    let pods = running(a, "web", 2)?;
    let mut seen: Vec<String> = pods
        .iter()
        .map(|p| s(p, "/status/podIP").to_owned())
        .collect();
    seen.sort();
    a.wait_for(
        "A's Endpoints web = the offloaded pods' addresses",
        WAIT,
        || {
            let ips = ready_ips(&json(a, &["get", "endpoints", "-n", "demo", "web"])?);
            Ok((ips == seen).then_some(()))
        },
    )?;

    // A's Services are in B, their endpoints in B's terms: B's own
    // addresses for the web copies, B's view of A for home.
    let plan_a = kb.plans()[0].clone();
    let a_seen_from_b = Cidr::parse(&b.jsonpath("peer", "a", "{.spec.view}")?);
    let home_there = plan_a.pod_cidr.translate(home_ip, a_seen_from_b);
    let mut copies_ips = Vec::new();
    for p in &pods {
        let c = copy_of(b, s(p, "/metadata/name"))?.context("copy")?;
        copies_ips.push(s(&c, "/status/podIP").to_owned());
    }
    copies_ips.sort();
    for (service, expected) in [("web", copies_ips), ("home", vec![home_there.to_string()])] {
        b.wait_for(
            &format!("B's Endpoints {service} in B's terms"),
            WAIT,
            || {
                let svc = b.kubectl(&[
                    "get",
                    "service",
                    "-n",
                    "demo",
                    service,
                    "--ignore-not-found",
                    "-o",
                    "json",
                ])?;
                if svc.trim().is_empty() {
                    return Ok(None);
                }
                let eps = b.kubectl(&[
                    "get",
                    "endpoints",
                    "-n",
                    "demo",
                    service,
                    "--ignore-not-found",
                    "-o",
                    "json",
                ])?;
                if eps.trim().is_empty() {
                    return Ok(None);
                }
                let ips = ready_ips(&serde_json::from_str(&eps)?);
                Ok((ips == expected).then_some(()))
            },
        )?;
    }
    // An offloaded pod reaches A's home pod at the address B's Endpoints
    // give (no kube-proxy runs with a played kubelet: the real-node test
    // goes through the ClusterIP).
    let copy = copy_of(b, s(&pods[0], "/metadata/name"))?.context("copy")?;
    let sandbox = b_kubelet
        .sandbox(s(&copy, "/metadata/uid"))
        .context("sandbox")?;
    let from = xtask::testbed::Pod {
        netns: sandbox.netns.clone(),
        ip: sandbox.ip,
        cluster: 1,
    };
    traffic::ping(&from, home_there, 3)
        .with_context(|| format!("an offloaded pod pings home at {home_there}"))?;
    status_and_metrics(kb)
}

/// `ligo-control status` and the controller's /metrics tell the same story
/// as the objects.
fn status_and_metrics(kb: &KubeTestbed) -> Result<()> {
    let a = &kb.clusters[0];
    let kubeconfig = a.kubeconfig.to_string_lossy().into_owned();
    // Reflected: web-config, web-secret, Services web and home, their Endpoints.
    a.wait_for("the status's counts", WAIT, || {
        let (_, out) =
            KubeTestbed::ligo_control(&["status", "--kubeconfig", &kubeconfig, "-o", "json"])?;
        let report: Value = serde_json::from_str(&out)?;
        let node = &report["peers"][0]["offloading"]["virtualNode"];
        let offloaded = node["podsOffloaded"].as_u64().unwrap_or(0);
        Ok((node["objectsReflected"] == 6 && offloaded >= 2).then_some(()))
    })?;
    let (ok, text) = KubeTestbed::ligo_control(&["status", "--kubeconfig", &kubeconfig])?;
    ensure!(ok, "status failed: {text}");
    println!("{text}");
    for needle in [
        "virtual node ligo-b:",
        "namespace demo: Granted",
        "6 objects reflected",
    ] {
        ensure!(text.contains(needle), "status lacks {needle:?}:\n{text}");
    }
    // The first controller started (A's) serves /metrics on the root
    // namespace's loopback.
    let body = ureq::get("http://127.0.0.1:9478/metrics")
        .call()?
        .into_body()
        .read_to_string()?;
    for needle in [
        "ligo_virtual_node_ready{peer=\"b\"} 1",
        "ligo_offload_reflected_objects{peer=\"b\"} 6",
        "ligo_offload_pods{peer=\"b\",state=\"offloaded\"}",
        "ligo_virtual_node_capacity{peer=\"b\",resource=\"pods\"}",
        "ligo_control_heap_bytes ",
    ] {
        ensure!(body.contains(needle), "/metrics lacks {needle:?}:\n{body}");
    }
    Ok(())
}

fn capacity_and_refusals(kb: &KubeTestbed) -> Result<()> {
    let (a, b) = (&kb.clusters[0], &kb.clusters[1]);
    // B's own pod takes a CPU: the offer, and the virtual node, follow
    // (A's own pods there do not count against it).
    let (before, _) = virtual_offer(a);
    b.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: hog, namespace: default}\nspec:\n  containers: [{name: c, image: busybox:1.36, resources: {requests: {cpu: \"1\"}}}]\n")?;
    let t = Instant::now();
    a.wait_for("ligo-b's cpu to drop by B's new pod", WAIT, || {
        let now = virtual_offer(a);
        Ok((now.0 + 1000 == before && now == expected_offer(b)?).then_some(()))
    })?;
    println!("capacity followed B's pods in {:?}", t.elapsed());

    // A DaemonSet that tolerates everything, and a hostNetwork pod.
    a.apply(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: agent, namespace: demo}\nspec:\n  selector: {matchLabels: {app: agent}}\n  template:\n    metadata: {labels: {app: agent}}\n    spec:\n      tolerations: [{operator: Exists}]\n      containers: [{name: c, image: busybox:1.36}]\n",
    )?;
    a.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: hostnet, namespace: demo}\nspec:\n  hostNetwork: true\n  nodeSelector: {kubernetes.io/hostname: ligo-b}\n  tolerations: [{key: virtual-node.ligo.io/not-allowed, operator: Exists, effect: NoSchedule}]\n  containers: [{name: c, image: busybox:1.36}]\n",
    )?;
    for (prefix, reason) in [
        ("agent-", "DaemonSetPodNotOffloaded"),
        ("hostnet", "HostNamespaceNotOffloaded"),
    ] {
        let pod = a.wait_for(&format!("{prefix} refused"), WAIT, || {
            Ok(bound_pod(a, prefix)?.filter(|p| s(p, "/status/reason") == reason))
        })?;
        let name = s(&pod, "/metadata/name").to_owned();
        ensure!(copy_of(b, &name)?.is_none(), "{name} was copied to B");
        a.wait_for(&format!("an Event {reason} on {name}"), WAIT, || {
            Ok(event_reasons(a, &name)?
                .contains(&reason.to_owned())
                .then_some(()))
        })?;
    }
    Ok(())
}

fn deletion_and_edits(kb: &KubeTestbed) -> Result<()> {
    let (a, b) = (&kb.clusters[0], &kb.clusters[1]);
    let pods = running(a, "web", 2)?;
    // Deleted here: the copy goes, then the pod; its ReplicaSet's
    // replacement runs there too.
    let victim = s(&pods[0], "/metadata/name").to_owned();
    a.kubectl(&["delete", "pod", "-n", "demo", &victim, "--wait=false"])?;
    b.wait_for(&format!("{victim}'s copy gone"), WAIT, || {
        Ok(copy_of(b, &victim)?.is_none().then_some(()))
    })?;
    a.wait_for(&format!("{victim} gone"), WAIT, || {
        Ok(a.kubectl(&[
            "get",
            "pod",
            "-n",
            "demo",
            &victim,
            "--ignore-not-found",
            "-o",
            "name",
        ])?
        .trim()
        .is_empty()
        .then_some(()))
    })?;
    let pods = running(a, "web", 2)?;

    // Deleted there, out of band: made again.
    let name = s(&pods[0], "/metadata/name").to_owned();
    let first = copy_of(b, &name)?.context("copy")?;
    b.kubectl(&["delete", "pod", "-n", "demo", &name, "--wait=false"])?;
    b.wait_for(&format!("{name}'s copy made again"), WAIT, || {
        Ok(copy_of(b, &name)?.filter(|c| {
            s(c, "/metadata/uid") != s(&first, "/metadata/uid")
                && c.pointer("/metadata/deletionTimestamp").is_none()
        }))
    })?;
    // Edited there: restored.
    b.kubectl(&[
        "patch",
        "pod",
        "-n",
        "demo",
        &name,
        "-p",
        "{\"spec\":{\"containers\":[{\"name\":\"c\",\"image\":\"evil:latest\"}]}}",
    ])?;
    b.wait_for(&format!("{name}'s image restored"), WAIT, || {
        Ok(copy_of(b, &name)?.filter(|c| s(c, "/spec/containers/0/image") == "busybox:1.36"))
    })?;
    running(a, "web", 2)?;

    // A Job's pod completes there, stays completed here, and is not run
    // again when its copy goes.
    a.apply(
        "apiVersion: batch/v1\nkind: Job\nmetadata: {name: once, namespace: demo}\nspec:\n  template:\n    metadata: {labels: {app: once, ligo-test/completes: \"true\"}}\n    spec:\n      restartPolicy: Never\n      nodeSelector: {type: virtual-kubelet}\n      tolerations: [{key: virtual-node.ligo.io/not-allowed, operator: Exists, effect: NoSchedule}]\n      containers: [{name: c, image: busybox:1.36}]\n",
    )?;
    let done = a.wait_for("the Job's pod Succeeded", WAIT, || {
        Ok(bound_pod(a, "once-")?.filter(|p| s(p, "/status/phase") == "Succeeded"))
    })?;
    let job_pod = s(&done, "/metadata/name").to_owned();
    b.kubectl(&["delete", "pod", "-n", "demo", &job_pod, "--wait=false"])?;
    b.wait_for("the finished copy gone", WAIT, || {
        Ok(copy_of(b, &job_pod)?.is_none().then_some(()))
    })?;
    std::thread::sleep(Duration::from_secs(5));
    ensure!(
        copy_of(b, &job_pod)?.is_none(),
        "a completed pod was run again"
    );
    let phase = s(
        &json(a, &["get", "pod", "-n", "demo", &job_pod])?,
        "/status/phase",
    )
    .to_owned();
    ensure!(phase == "Succeeded", "the Job's pod is {phase}");
    Ok(())
}

fn bounced(kb: &KubeTestbed) -> Result<()> {
    let (a, b) = (&kb.clusters[0], &kb.clusters[1]);
    let copy = copy_of(b, "big")?;
    if let Some(c) = &copy {
        let reason = c["status"]["conditions"].to_string();
        ensure!(
            reason.contains("Insufficient memory"),
            "big's copy: {reason}"
        );
    }
    let pod = a.wait_for("big bounced", Duration::from_secs(90), || {
        Ok(Some(json(a, &["get", "pod", "-n", "demo", "big"])?)
            .filter(|p| s(p, "/status/reason") == "OffloadUnschedulable"))
    })?;
    ensure!(
        s(&pod, "/status/phase") == "Failed",
        "big is {}",
        s(&pod, "/status/phase")
    );
    ensure!(
        event_reasons(a, "big")?.contains(&"OffloadUnschedulable".to_owned()),
        "no Event for the bounce"
    );
    b.wait_for("big's copy gone", WAIT, || {
        Ok(copy_of(b, "big")?.is_none().then_some(()))
    })?;
    Ok(())
}

/// B's operator caps A's namespace with a ResourceQuota: B's quota
/// admission refuses a new copy, and A's pod says so (reason and Event)
/// instead of staying Pending without one; once the quota goes it runs.
fn provider_refuses_a_copy(kb: &KubeTestbed) -> Result<()> {
    let (a, b) = (&kb.clusters[0], &kb.clusters[1]);
    b.apply("apiVersion: v1\nkind: ResourceQuota\nmetadata: {name: cap, namespace: demo}\nspec: {hard: {pods: \"0\"}}\n")?;
    // Until the quota controller has counted the namespace, admission
    // lets pods through.
    b.wait_for("B's quota counted", WAIT, || {
        let used = b.kubectl(&[
            "get",
            "resourcequota",
            "-n",
            "demo",
            "cap",
            "-o",
            "jsonpath={.status.used.pods}",
        ])?;
        Ok((!used.trim().is_empty()).then_some(()))
    })?;
    a.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: capped, namespace: demo, labels: {app: capped}}\nspec:\n  nodeSelector: {type: virtual-kubelet}\n  tolerations: [{key: virtual-node.ligo.io/not-allowed, operator: Exists, effect: NoSchedule}]\n  containers: [{name: c, image: busybox:1.36}]\n")?;
    let pod = a.wait_for("capped refused with a reason", WAIT, || {
        Ok(Some(json(a, &["get", "pod", "-n", "demo", "capped"])?)
            .filter(|p| s(p, "/status/reason") == "OffloadRejected"))
    })?;
    let message = s(&pod, "/status/message");
    ensure!(
        message.contains("exceeded quota") && s(&pod, "/status/phase") == "Pending",
        "capped: {} {message}",
        s(&pod, "/status/phase")
    );
    ensure!(
        event_reasons(a, "capped")?.contains(&"OffloadRejected".to_owned()),
        "no Event for the refusal"
    );
    ensure!(copy_of(b, "capped")?.is_none(), "a copy past the quota");
    b.kubectl(&["delete", "resourcequota", "-n", "demo", "cap"])?;
    let pod = a.wait_for("capped Running once the quota is gone", WAIT, || {
        Ok(Some(json(a, &["get", "pod", "-n", "demo", "capped"])?)
            .filter(|p| s(p, "/status/phase") == "Running"))
    })?;
    ensure!(
        s(&pod, "/status/reason").is_empty(),
        "the refusal's reason stayed: {}",
        s(&pod, "/status/reason")
    );
    a.kubectl(&["delete", "pod", "-n", "demo", "capped", "--wait=false"])?;
    Ok(())
}

/// B's operator deletes the namespace it holds for A: the provider makes
/// it again with the peer's binding, and the copies come back into it.
fn provider_namespace_deleted(kb: &KubeTestbed) -> Result<()> {
    let (a, b) = (&kb.clusters[0], &kb.clusters[1]);
    let before = running(a, "web", 2)?;
    let first = b.jsonpath("namespace", "demo", "{.metadata.uid}")?;
    b.kubectl(&["delete", "namespace", "demo", "--wait=false"])?;
    b.wait_for(
        "B's namespace demo made again",
        Duration::from_secs(90),
        || {
            let ns = b.kubectl(&[
                "get",
                "namespace",
                "demo",
                "--ignore-not-found",
                "-o",
                "json",
            ])?;
            if ns.trim().is_empty() {
                return Ok(None);
            }
            let ns: Value = serde_json::from_str(&ns)?;
            Ok((s(&ns, "/metadata/uid") != first
                && ns.pointer("/metadata/deletionTimestamp").is_none())
            .then_some(()))
        },
    )?;
    b.wait_for("A's identity bound again in it", WAIT, || {
        let subjects = b.kubectl(&[
            "get",
            "rolebindings",
            "-n",
            "demo",
            "-o",
            "jsonpath={.items[*].roleRef.name}",
        ])?;
        Ok(subjects.contains("ligo-offload-guest").then_some(()))
    })?;
    for pod in &before {
        let name = s(pod, "/metadata/name");
        b.wait_for(&format!("{name}'s copy made again"), WAIT, || {
            Ok(copy_of(b, name)?.filter(|c| c.pointer("/metadata/deletionTimestamp").is_none()))
        })?;
    }
    let after = running(a, "web", 2)?;
    ensure!(
        uids(&after) == uids(&before),
        "A's pods were made anew: {:?} -> {:?}",
        uids(&before),
        uids(&after)
    );
    Ok(())
}

fn unpeer_leaves_nothing(kb: &KubeTestbed) -> Result<()> {
    let (a, b) = (&kb.clusters[0], &kb.clusters[1]);
    let (out, took) = kb.unpeer()?;
    println!("unpeer took {took:?}:\n{out}");
    a.wait_for("the virtual node gone with its pods", WAIT, || {
        let node = a.kubectl(&["get", "node", "ligo-b", "--ignore-not-found", "-o", "name"])?;
        let pods = items(
            a,
            &[
                "get",
                "pods",
                "-A",
                "--field-selector",
                "spec.nodeName=ligo-b",
            ],
        )?;
        let lease = a.kubectl(&[
            "get",
            "lease",
            "-n",
            "kube-node-lease",
            "ligo-b",
            "--ignore-not-found",
            "-o",
            "name",
        ])?;
        Ok((node.trim().is_empty() && pods.is_empty() && lease.trim().is_empty()).then_some(()))
    })?;
    b.wait_for("B's namespace demo gone", Duration::from_secs(60), || {
        Ok(b.kubectl(&[
            "get",
            "namespace",
            "demo",
            "--ignore-not-found",
            "-o",
            "name",
        ])?
        .trim()
        .is_empty()
        .then_some(()))
    })?;
    for (cp, other) in [(a, "b"), (b, "a")] {
        let left = cp.peering_objects(other);
        if !left.is_empty() {
            bail!("{} keeps {left:?}", cp.name);
        }
    }
    Ok(())
}

#[test]
fn the_big_node_runs_pods_in_the_peer_with_identical_cidrs() {
    if !require_root("kube_offload") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut kb = KubeTestbed::up("kof", Scenario::identical_cidrs(), 233)
        .unwrap_or_else(|e| panic!("{e:#}"));
    if let Err(e) = kb.start_ligo() {
        panic!("{e:#}\n{}", kb.logs());
    }
    let kubelet = play_b(&kb).unwrap_or_else(|e| panic!("{e:#}"));
    let steps = || -> Result<()> {
        offload_and_run(&kb, &kubelet).context("offload and run")?;
        reflection(&kb, &kubelet).context("reflection")?;
        capacity_and_refusals(&kb).context("capacity and refusals")?;
        deletion_and_edits(&kb).context("deletion and edits")?;
        bounced(&kb).context("bounce")?;
        provider_refuses_a_copy(&kb).context("a copy refused by the provider")?;
        provider_namespace_deleted(&kb).context("the provider's namespace deleted")?;
        unpeer_leaves_nothing(&kb).context("unpeer")?;
        Ok(())
    };
    if let Err(e) = steps() {
        panic!("{e:#}\n{}\n{}", kb.logs(), dump(&kb));
    }
}

fn pod_ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

fn uids(pods: &[Value]) -> Vec<String> {
    let mut u: Vec<String> = pods
        .iter()
        .map(|p| s(p, "/metadata/uid").to_owned())
        .collect();
    u.sort();
    u
}

/// The ready addresses of an Endpoints object, sorted.
fn ready_ips(endpoints: &Value) -> Vec<String> {
    let mut ips: Vec<String> = endpoints["subsets"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["addresses"].as_array().cloned().unwrap_or_default())
        .map(|a| a["ip"].as_str().unwrap_or_default().to_owned())
        .collect();
    ips.sort();
    ips
}

/// The UIDs of B's copies of `pods`, sorted.
fn copy_uids(b: &ControlPlane, pods: &[Value]) -> Result<Vec<String>> {
    let mut u = Vec::new();
    for p in pods {
        let copy = copy_of(b, s(p, "/metadata/name"))?.context("no copy")?;
        u.push(s(&copy, "/metadata/uid").to_owned());
    }
    u.sort();
    Ok(u)
}

fn ready_endpoints(a: &ControlPlane, service: &str) -> Result<usize> {
    Ok(
        json(a, &["get", "endpoints", "-n", "demo", service])?["subsets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| s["addresses"].as_array().map_or(0, Vec::len))
            .sum(),
    )
}

/// B's API server stops for 60 s: the copies keep running and traffic
/// keeps flowing; the virtual node turns NotReady within seconds, A's node
/// lifecycle controller marks its pods NotReady (the Service's endpoints
/// drain); once B is back, all is Ready again and no pod was made anew on
/// either side.
fn provider_outage(kb: &mut KubeTestbed, kubelet: &PlayedKubelet) -> Result<()> {
    let a = &kb.clusters[0];
    a.apply("apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\nspec:\n  selector: {app: web}\n  ports: [{port: 80, targetPort: 8080}]\n")?;
    let before = running(a, "web", 2)?;
    a.wait_for("both web pods in the Endpoints", WAIT, || {
        Ok((ready_endpoints(a, "web")? == 2).then_some(()))
    })?;
    let copies_before = copy_uids(&kb.clusters[1], &before)?;
    let target: Ipv4Addr = s(&before[0], "/status/podIP").parse()?;

    kb.clusters[1].stop_apiserver()?;
    let down = Instant::now();
    let a = &kb.clusters[0];
    a.wait_for("ligo-b NotReady", WAIT, || {
        let reason = a.jsonpath(
            "node",
            "ligo-b",
            "{.status.conditions[?(@.type==\"Ready\")].reason}",
        )?;
        Ok((reason == "ProviderUnreachable").then_some(()))
    })?;
    println!(
        "ligo-b NotReady {:?} after B's API server stopped",
        down.elapsed()
    );
    a.wait_for(
        "the web pods NotReady and out of the Endpoints",
        Duration::from_secs(70),
        || {
            let pods = items(a, &["get", "pods", "-n", "demo", "-l", "app=web"])?;
            Ok(
                (pods.iter().all(|p| !pod_ready(p)) && ready_endpoints(a, "web")? == 0)
                    .then_some(()),
            )
        },
    )?;
    println!(
        "endpoints drained {:?} after B's API server stopped",
        down.elapsed()
    );
    // The copies run on: their namespaces are there and traffic flows.
    ensure!(
        kubelet.sandboxes.lock().map(|b| b.len()).unwrap_or(0) >= 2,
        "sandboxes gone during the outage"
    );
    traffic::ping(&kb.bed.pod(0, 0, 0), target, 3)
        .context("traffic to an offloaded pod during the outage")?;
    let rest = Duration::from_secs(60).saturating_sub(down.elapsed());
    std::thread::sleep(rest);
    kb.clusters[1].start_apiserver()?;
    let up = Instant::now();
    let a = &kb.clusters[0];
    a.wait_for("ligo-b Ready again", Duration::from_secs(60), || {
        let ready = a.jsonpath(
            "node",
            "ligo-b",
            "{.status.conditions[?(@.type==\"Ready\")].status}",
        )?;
        Ok((ready == "True").then_some(()))
    })?;
    a.wait_for(
        "the web pods Ready and back in the Endpoints",
        Duration::from_secs(60),
        || {
            let pods = items(a, &["get", "pods", "-n", "demo", "-l", "app=web"])?;
            Ok(
                (pods.len() == 2 && pods.iter().all(pod_ready) && ready_endpoints(a, "web")? == 2)
                    .then_some(pods),
            )
        },
    )
    .and_then(|pods| {
        ensure!(
            uids(&pods) == uids(&before),
            "A's pods were made anew: {:?} vs {:?}",
            uids(&pods),
            uids(&before)
        );
        Ok(())
    })?;
    println!(
        "all Ready again {:?} after B's API server returned",
        up.elapsed()
    );
    let copies_after = copy_uids(&kb.clusters[1], &before)?;
    ensure!(copies_after == copies_before, "B's copies were made anew");
    Ok(())
}

#[test]
fn the_big_node_with_different_cidrs() {
    if !require_root("kube_offload") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // A's node lifecycle controller runs: it acts on the virtual node.
    let mut kb = KubeTestbed::up_with("kod", Scenario::different_cidrs(), 235, |i, o| {
        o.node_lifecycle = i == 0;
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    if let Err(e) = kb.start_ligo() {
        panic!("{e:#}\n{}", kb.logs());
    }
    let kubelet = play_b(&kb).unwrap_or_else(|e| panic!("{e:#}"));
    let outcome = offload_and_run(&kb, &kubelet)
        .context("offload and run")
        .and_then(|_| provider_outage(&mut kb, &kubelet).context("provider outage"))
        .and_then(|_| unpeer_leaves_nothing(&kb).context("unpeer"));
    if let Err(e) = outcome {
        panic!("{e:#}\n{}\n{}", kb.logs(), dump(&kb));
    }
}
