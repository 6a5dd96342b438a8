//! `ligo-control peer`, `unpeer` and `status` between real clusters (each
//! an etcd, kube-apiserver, kube-controller-manager and kube-scheduler in
//! its own namespace): identical and different pod CIDRs, three clusters,
//! least privilege tested by trying, bad input refused with nothing left
//! behind, and peering again after unpeering.

use std::process::Command;

use xtask::{
    control_binary,
    kube::{ControlPlane, ControlPlaneOptions},
    require_root,
};

/// A cluster with Ligo's CRDs and controller, a gateway node and a plain
/// node, pod CIDR `<pod>.0.0/16`, views from 10.128.0.0/12.
fn installed(prefix: &str, index: u8, name: &str, id: u32, pod: &str) -> ControlPlane {
    let options = ControlPlaneOptions {
        controllers: true,
        cluster_cidr: format!("{pod}.0.0/16"),
        ..ControlPlaneOptions::new(index)
    };
    let mut cp = ControlPlane::start(prefix, &options).unwrap_or_else(|e| panic!("{e:#}"));
    let setup = cp.install_crds().and_then(|()| {
        cp.add_node("gw", &format!("{pod}.0.0/24"), &format!("192.168.{index}.1"), true)?;
        cp.add_node("n1", &format!("{pod}.1.0/24"), &format!("192.168.{index}.2"), false)?;
        cp.apply(&format!(
            "apiVersion: ligo.io/v1alpha1\nkind: ClusterFabric\nmetadata: {{name: local}}\nspec: {{clusterName: {name}, clusterId: {id}, podCIDR: {pod}.0.0/16, viewPools: [10.128.0.0/12], apiServerURL: \"{}\"}}\n",
            cp.url
        ))?;
        cp.start_controller()?;
        cp.wait_condition("clusterfabric", "local", "Ready", "True")?;
        Ok(())
    });
    if let Err(e) = setup {
        panic!("{e:#}\n{}", cp.logs());
    }
    cp
}

/// Runs `ligo-control args`: (succeeded, stdout, stderr).
fn ligo_control(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(control_binary())
        .args(args)
        .output()
        .expect("ligo-control runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn peer(a: &ControlPlane, b: &ControlPlane) -> String {
    let (ok, out, err) = ligo_control(&[
        "peer",
        "--kubeconfig",
        &a.kubeconfig.to_string_lossy(),
        "--remote-kubeconfig",
        &b.kubeconfig.to_string_lossy(),
    ]);
    assert!(
        ok,
        "peer {} {}: {out}{err}\n{}{}",
        a.name,
        b.name,
        a.logs(),
        b.logs()
    );
    out
}

fn jsonpath(cp: &ControlPlane, kind: &str, name: &str, path: &str) -> String {
    cp.jsonpath(kind, name, path).unwrap_or_default()
}

fn verified(cp: &ControlPlane, peer: &str) {
    for condition in [
        "ViewAllocated",
        "CredentialsValid",
        "RemoteIdentityVerified",
    ] {
        cp.wait_condition("peer", peer, condition, "True")
            .unwrap_or_else(|e| panic!("{e:#}"));
    }
}

#[test]
fn clusters_peer_unpeer_and_peer_again_with_identical_and_different_cidrs() {
    if !require_root("clusters_peer_unpeer_and_peer_again_with_identical_and_different_cidrs") {
        return;
    }
    let a = installed("lp-a", 211, "a", 1, "10.244");
    let b = installed("lp-b", 212, "b", 2, "10.244");
    let c = installed("lp-c", 213, "c", 3, "10.245");

    // A and B have identical pod CIDRs: each sees the other through the
    // first block of its pool.
    let out = peer(&a, &b);
    assert!(out.contains("✓ names and ids differ"), "{out}");
    verified(&a, "b");
    verified(&b, "a");
    assert_eq!(jsonpath(&a, "peer", "b", "{.spec.view}"), "10.128.0.0/16");
    assert_eq!(jsonpath(&b, "peer", "a", "{.spec.view}"), "10.128.0.0/16");
    // Each learns the other's view of it from the other's API server.
    a.wait_for(
        "A learns B's view of A",
        xtask::kube_fixtures::CONDITION_WAIT,
        || Ok((jsonpath(&a, "peer", "b", "{.status.remoteView}") == "10.128.0.0/16").then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    // The gateway and key in A's Peer are B's own.
    assert_eq!(
        jsonpath(
            &a,
            "peer",
            "b",
            "{.spec.gatewayEndpoints[0]} {.spec.wireguardPublicKey}"
        ),
        format!(
            "192.168.212.1:51820 {}",
            jsonpath(&b, "clusterfabric", "local", "{.status.wireguardPublicKey}")
        )
    );

    // C's CIDR differs from A's: A sees it as it is, and A's two views
    // differ.
    peer(&a, &c);
    verified(&a, "c");
    verified(&c, "a");
    assert_eq!(jsonpath(&a, "peer", "c", "{.spec.view}"), "10.245.0.0/16");
    assert_eq!(jsonpath(&c, "peer", "a", "{.spec.view}"), "10.244.0.0/16");

    // status -o json reports both peers.
    let (ok, out, err) = ligo_control(&[
        "status",
        "--kubeconfig",
        &a.kubeconfig.to_string_lossy(),
        "-o",
        "json",
    ]);
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(report["clusterName"], "a");
    let views: Vec<(String, String)> = report["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or("").to_owned(),
                p["view"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        views,
        [
            ("b".to_owned(), "10.128.0.0/16".to_owned()),
            ("c".to_owned(), "10.245.0.0/16".to_owned())
        ]
    );

    least_privilege(&a, &b);

    // A cluster peered with itself: refused before anything is made.
    let (ok, _, err) = ligo_control(&[
        "peer",
        "--kubeconfig",
        &b.kubeconfig.to_string_lossy(),
        "--remote-kubeconfig",
        &b.kubeconfig.to_string_lossy(),
    ]);
    assert!(!ok);
    assert!(err.contains("both clusters are named \"b\""), "{err}");
    assert_eq!(b.peering_objects("b"), Vec::<String>::new());

    // Unpeer A and B: nothing of it is left on either side; A–C stays.
    let (ok, out, err) = ligo_control(&[
        "unpeer",
        "--kubeconfig",
        &a.kubeconfig.to_string_lossy(),
        "--remote-kubeconfig",
        &b.kubeconfig.to_string_lossy(),
    ]);
    assert!(ok, "{out}{err}");
    assert_eq!(a.peering_objects("b"), Vec::<String>::new());
    assert_eq!(b.peering_objects("a"), Vec::<String>::new());
    assert_eq!(a.peering_objects("c").len(), 6, "A–C untouched");

    // And again: the freed view is given again.
    peer(&a, &b);
    verified(&a, "b");
    assert_eq!(jsonpath(&a, "peer", "b", "{.spec.view}"), "10.128.0.0/16");

    // An unreachable peer: unpeer refuses without --force and removes
    // nothing; with --force it removes our side only.
    let dead = std::fs::read_to_string(&c.kubeconfig)
        .expect("kubeconfig")
        .replace(&c.url, "https://169.254.213.2:1");
    let dead_path = std::env::temp_dir().join("lp-dead-kubeconfig");
    std::fs::write(&dead_path, dead).expect("write");
    let (ok, _, err) = ligo_control(&[
        "unpeer",
        "--kubeconfig",
        &a.kubeconfig.to_string_lossy(),
        "--remote-kubeconfig",
        &dead_path.to_string_lossy(),
    ]);
    assert!(!ok);
    assert!(
        err.contains("169.254.213.2:1") && err.contains("nothing was removed"),
        "{err}"
    );
    assert_eq!(a.peering_objects("c").len(), 6);
    let (ok, out, err) = ligo_control(&[
        "unpeer",
        "--kubeconfig",
        &a.kubeconfig.to_string_lossy(),
        "--remote-kubeconfig",
        &dead_path.to_string_lossy(),
        "--peer",
        "c",
        "--force",
    ]);
    assert!(ok, "{out}{err}");
    assert_eq!(a.peering_objects("c"), Vec::<String>::new());
    assert_eq!(
        c.peering_objects("a").len(),
        6,
        "C was not reachable: its side stays"
    );
}

/// The credentials A holds for B may read B's settings and A's own Peer in
/// B, and nothing else: each other request is tried, and refused.
fn least_privilege(a: &ControlPlane, b: &ControlPlane) {
    let kubeconfig = a
        .kubectl(&[
            "-n",
            "ligo-system",
            "get",
            "secret",
            "ligo-credentials-b",
            "-o",
            "jsonpath={.data.kubeconfig}",
        ])
        .expect("A's credentials for B");
    let decoded = Command::new("base64")
        .arg("-d")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write as _;
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(kubeconfig.as_bytes())?;
            }
            child.wait_with_output()
        })
        .expect("base64");
    let path = std::env::temp_dir().join("lp-a-for-b.kubeconfig");
    std::fs::write(&path, &decoded.stdout).expect("write");
    let as_a = |args: &[&str]| {
        let mut full = vec![
            "--kubeconfig",
            path.to_str().unwrap_or_default(),
            "--request-timeout",
            "10s",
        ];
        full.extend_from_slice(args);
        Command::new("kubectl")
            .args(&full)
            .output()
            .expect("kubectl")
    };
    for allowed in [
        &["get", "clusterfabric", "local"][..],
        &["get", "peer", "a"][..],
    ] {
        let out = as_a(allowed);
        assert!(
            out.status.success(),
            "{allowed:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let refused: [&[&str]; 7] = [
        &["get", "peers"],
        &["get", "peer", "c"],
        &["get", "secrets", "-n", "ligo-system"],
        &["get", "nodes"],
        &["delete", "peer", "a"],
        &[
            "patch",
            "clusterfabric",
            "local",
            "--type=merge",
            "-p",
            "{\"spec\":{\"clusterId\":9}}",
        ],
        &["get", "pods", "-A"],
    ];
    for request in refused {
        let out = as_a(request);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("Forbidden"),
            "{request:?} was not refused: {err}"
        );
    }
    // B's objects are as they were.
    assert_eq!(
        jsonpath(b, "clusterfabric", "local", "{.spec.clusterId}"),
        "2"
    );
}
