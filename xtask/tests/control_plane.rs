//! `ligo-control run` against real API servers: the cluster settings it
//! fills in and the gateway key it makes, peer views it allocates (stable
//! across restarts, exhaustion reported), and remote clusters it checks.
//! Expected values are written by hand or computed by tools we did not
//! write (`wg pubkey`, the API server's own UID).

use std::time::Duration;

use xtask::{
    kube::{ControlPlane, ControlPlaneOptions},
    kube_fixtures::CONDITION_WAIT as WAIT,
    netns, require_root,
};

/// A control plane with the CRDs, `ligo-system` and two hand-made Nodes
/// (`gw` labelled gateway), and `extra` applied.
fn cluster(name: &str, index: u8, slices: [&str; 2], extra: &str) -> ControlPlane {
    let cp = ControlPlane::start(name, &ControlPlaneOptions::new(index))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let setup = cp.install_crds().and_then(|()| {
        cp.add_node("gw", slices[0], &index_ip(index, 1), true)?;
        cp.add_node("n1", slices[1], &index_ip(index, 2), false)?;
        if !extra.is_empty() {
            cp.apply(extra)?;
        }
        Ok(())
    });
    if let Err(e) = setup {
        panic!("{e:#}\n{}", cp.logs());
    }
    cp
}

/// A node address of cluster `index` (never routed anywhere: the nodes
/// here are objects only).
fn index_ip(index: u8, host: u8) -> String {
    format!("192.168.{index}.{host}")
}

fn start_controller(cp: &mut ControlPlane) {
    cp.start_controller().unwrap_or_else(|e| panic!("{e:#}"));
}

fn wait_condition(
    cp: &ControlPlane,
    kind: &str,
    name: &str,
    type_: &str,
    status: &str,
) -> (String, String) {
    cp.wait_condition(kind, name, type_, status)
        .unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
fn cluster_settings_are_filled_in_and_the_gateway_key_is_made() {
    if !require_root("cluster_settings_are_filled_in_and_the_gateway_key_is_made") {
        return;
    }
    let mut cp = cluster(
        "lc-set",
        202,
        ["10.244.0.0/24", "10.244.1.0/24"],
        "apiVersion: ligo.io/v1alpha1\nkind: ClusterFabric\nmetadata: {name: local}\nspec: {}\n",
    );
    start_controller(&mut cp);
    wait_condition(&cp, "clusterfabric", "local", "Ready", "True");

    // Name and id from the API server's own kube-system UID.
    let uid = cp
        .jsonpath("namespace", "kube-system", "{.metadata.uid}")
        .expect("uid");
    let expected_name = format!("cluster-{}", &uid[..8]);
    let spec = cp
        .jsonpath(
            "clusterfabric",
            "local",
            "{.spec.clusterName} {.spec.podCIDR} {.spec.clusterId}",
        )
        .expect("spec");
    let fields: Vec<&str> = spec.split(' ').collect();
    assert_eq!(
        fields[..2],
        [expected_name.as_str(), "10.244.0.0/16"],
        "{spec}"
    );
    let id: u32 = fields[2].parse().expect("an id");
    assert!((1..1 << 24).contains(&id), "{id}");
    let endpoints = cp
        .jsonpath("clusterfabric", "local", "{.status.gatewayEndpoints}")
        .expect("endpoints");
    assert!(endpoints.contains("192.168.202.1:51820"), "{endpoints}");
    assert!(
        !endpoints.contains("192.168.202.2"),
        "n1 is no gateway: {endpoints}"
    );

    // The public key in status is the Secret's private key's, as `wg`
    // derives it.
    let private_b64 = cp
        .kubectl(&[
            "-n",
            "ligo-system",
            "get",
            "secret",
            "ligo-gateway-key",
            "-o",
            "jsonpath={.data.private-key}",
        ])
        .expect("the key Secret");
    let private = String::from_utf8(base64_decode(&private_b64)).expect("text");
    let key_file = std::env::temp_dir().join("lc-set.key");
    std::fs::write(&key_file, &private).expect("write");
    let derived = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("wg pubkey < {}", key_file.display()))
        .output()
        .expect("wg pubkey");
    let derived = String::from_utf8_lossy(&derived.stdout).trim().to_owned();
    let published = cp
        .jsonpath("clusterfabric", "local", "{.status.wireguardPublicKey}")
        .expect("public key");
    assert_eq!(published, derived);

    // A malformed CIDR: named in Ready; fixing it restores Ready.
    cp.kubectl(&[
        "patch",
        "clusterfabric",
        "local",
        "--type=merge",
        "-p",
        "{\"spec\":{\"viewPools\":[\"10.128.0.0/12\",\"10.300.0.0/16\"]}}",
    ])
    .expect("patch");
    let (reason, message) = wait_condition(&cp, "clusterfabric", "local", "Ready", "False");
    assert_eq!(reason, "InvalidSettings");
    assert!(message.contains("spec.viewPools[1]"), "{message}");
    assert!(message.contains("10.300.0.0/16"), "{message}");
    cp.kubectl(&[
        "patch",
        "clusterfabric",
        "local",
        "--type=merge",
        "-p",
        "{\"spec\":{\"viewPools\":[\"10.128.0.0/12\"]}}",
    ])
    .expect("patch");
    wait_condition(&cp, "clusterfabric", "local", "Ready", "True");

    // No gateway left: said so, with the command that fixes it.
    cp.kubectl(&["label", "node", "gw", "ligo.io/gateway-"])
        .expect("unlabel");
    let (reason, message) = wait_condition(&cp, "clusterfabric", "local", "GatewayFound", "False");
    assert_eq!(reason, "NoGatewayNode");
    assert!(message.contains("kubectl label node"), "{message}");
    // The key is kept (never regenerated while its Secret exists).
    let again = cp
        .kubectl(&[
            "-n",
            "ligo-system",
            "get",
            "secret",
            "ligo-gateway-key",
            "-o",
            "jsonpath={.data.private-key}",
        ])
        .expect("secret");
    assert_eq!(again, private_b64);
}

fn base64_decode(text: &str) -> Vec<u8> {
    let out = std::process::Command::new("base64")
        .arg("-d")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write as _;
            child
                .stdin
                .take()
                .map(|mut s| s.write_all(text.as_bytes()))
                .transpose()?;
            child.wait_with_output()
        })
        .expect("base64 -d");
    out.stdout
}

const SETTINGS_A: &str = "apiVersion: ligo.io/v1alpha1\nkind: ClusterFabric\nmetadata: {name: local}\nspec: {clusterName: a, clusterId: 1, podCIDR: 10.244.0.0/16, serviceCIDR: 10.96.0.0/12, viewPools: [10.128.0.0/15]}\n";

fn peer_yaml(name: &str, id: u32, pod_cidr: &str) -> String {
    format!("apiVersion: ligo.io/v1alpha1\nkind: Peer\nmetadata: {{name: {name}}}\nspec: {{clusterName: {name}, clusterId: {id}, podCIDR: \"{pod_cidr}\"}}\n---\n")
}

fn view(cp: &ControlPlane, peer: &str) -> String {
    cp.jsonpath("peer", peer, "{.spec.view}")
        .unwrap_or_default()
}

#[test]
fn views_are_allocated_once_kept_across_restarts_and_exhaustion_is_reported() {
    if !require_root("views_are_allocated_once_kept_across_restarts_and_exhaustion_is_reported") {
        return;
    }
    let mut cp = cluster(
        "lc-ipam",
        203,
        ["10.244.0.0/24", "10.244.1.0/24"],
        SETTINGS_A,
    );
    // Created together (one timestamp): ordered by name. b and c collide
    // with our 10.244.0.0/16 and take the pool's two /16s; d's CIDR is
    // free and is its own view; e finds the pool full.
    let peers: String = [
        peer_yaml("b", 2, "10.244.0.0/16"),
        peer_yaml("c", 3, "10.244.0.0/16"),
        peer_yaml("d", 4, "10.245.0.0/16"),
        peer_yaml("e", 5, "10.244.0.0/16"),
    ]
    .concat();
    cp.apply(&peers).expect("peers");
    start_controller(&mut cp);
    let (reason, message) = wait_condition(&cp, "peer", "e", "ViewAllocated", "False");
    assert_eq!(reason, "PoolsExhausted");
    assert!(message.contains("10.128.0.0/15"), "{message}");
    let expected = [
        ("b", "10.128.0.0/16"),
        ("c", "10.129.0.0/16"),
        ("d", "10.245.0.0/16"),
        ("e", ""),
    ];
    for (peer, want) in expected {
        assert_eq!(view(&cp, peer), want, "Peer/{peer}");
    }
    let (ready_reason, _) = wait_condition(&cp, "peer", "e", "Ready", "False");
    assert_eq!(ready_reason, "PoolsExhausted");

    // A crash and a restart change no view.
    cp.kill_process("ligo-control").expect("kill");
    start_controller(&mut cp);
    cp.kubectl(&["annotate", "peer", "e", "poke=1"])
        .expect("poke");
    thread_sleep(2);
    for (peer, want) in expected {
        assert_eq!(view(&cp, peer), want, "Peer/{peer} after a restart");
    }

    // c goes: its block is free again, and e gets it.
    cp.kubectl(&["delete", "peer", "c"]).expect("delete");
    cp.wait_for("Peer/e's view", WAIT, || {
        let v = view(&cp, "e");
        Ok((!v.is_empty()).then_some(v))
    })
    .map(|v| assert_eq!(v, "10.129.0.0/16"))
    .unwrap_or_else(|e| panic!("{e:#}"));

    // Peering with ourselves is refused, with the reason.
    cp.apply(&peer_yaml("a", 1, "10.244.0.0/16")).expect("self");
    let (reason, message) = wait_condition(&cp, "peer", "a", "Valid", "False");
    assert_eq!(reason, "PeeredWithItself");
    assert!(message.contains("Peer/a"), "{message}");
    assert_eq!(view(&cp, "a"), "", "nothing allocated for it");
}

fn thread_sleep(seconds: u64) {
    std::thread::sleep(Duration::from_secs(seconds));
}

#[test]
fn a_remote_api_server_is_checked_with_the_credentials_given() {
    if !require_root("a_remote_api_server_is_checked_with_the_credentials_given") {
        return;
    }
    let mut a = cluster("lc-ra", 204, ["10.244.0.0/24", "10.244.1.0/24"], SETTINGS_A);
    let mut b = cluster(
        "lc-rb",
        205,
        ["10.245.0.0/24", "10.245.1.0/24"],
        "apiVersion: ligo.io/v1alpha1\nkind: ClusterFabric\nmetadata: {name: local}\nspec: {clusterName: b, clusterId: 2, podCIDR: 10.245.0.0/16}\n",
    );
    start_controller(&mut a);
    start_controller(&mut b);
    wait_condition(&b, "clusterfabric", "local", "Ready", "True");
    let b_key = b
        .jsonpath("clusterfabric", "local", "{.status.wireguardPublicKey}")
        .expect("B's key");

    // Good credentials (B's admin kubeconfig here; `ligo-control peer`
    // makes narrower ones).
    let kubeconfig = std::fs::read_to_string(&b.kubeconfig).expect("kubeconfig");
    let bad = kubeconfig.replace("token: ligo-test-admin", "token: not-a-token");
    for (secret, content) in [("b-credentials", &kubeconfig), ("bad-credentials", &bad)] {
        let file = std::env::temp_dir().join(format!("lc-ra-{secret}"));
        std::fs::write(&file, content).expect("write");
        a.kubectl(&[
            "-n",
            "ligo-system",
            "create",
            "secret",
            "generic",
            secret,
            &format!("--from-file=kubeconfig={}", file.display()),
        ])
        .expect("secret");
    }
    let unreachable = "https://169.254.205.2:1";
    let peers = format!(
        "apiVersion: ligo.io/v1alpha1\nkind: Peer\nmetadata: {{name: b}}\nspec: {{clusterName: b, clusterId: 2, podCIDR: 10.245.0.0/16, apiServer: {{url: \"{url}\", credentialsSecret: b-credentials}}}}\n---\n\
apiVersion: ligo.io/v1alpha1\nkind: Peer\nmetadata: {{name: wrong}}\nspec: {{clusterName: wrong, clusterId: 8, podCIDR: 10.246.0.0/16, apiServer: {{url: \"{url}\", credentialsSecret: bad-credentials}}}}\n---\n\
apiVersion: ligo.io/v1alpha1\nkind: Peer\nmetadata: {{name: gone}}\nspec: {{clusterName: gone, clusterId: 9, podCIDR: 10.247.0.0/16, apiServer: {{url: \"{unreachable}\", credentialsSecret: b-credentials}}}}\n---\n\
apiVersion: ligo.io/v1alpha1\nkind: Peer\nmetadata: {{name: nocreds}}\nspec: {{clusterName: nocreds, clusterId: 10, podCIDR: 10.248.0.0/16, apiServer: {{url: \"{url}\", credentialsSecret: missing}}}}\n",
        url = b.url
    );
    a.apply(&peers).expect("peers");

    wait_condition(&a, "peer", "b", "CredentialsValid", "True");
    wait_condition(&a, "peer", "b", "RemoteIdentityVerified", "True");
    // B's gateway and key reach A's spec without anyone copying them.
    a.wait_for("Peer/b's endpoints and key from B", WAIT, || {
        let got = a.jsonpath(
            "peer",
            "b",
            "{.spec.gatewayEndpoints[0]} {.spec.wireguardPublicKey}",
        )?;
        Ok((got == format!("192.168.205.1:51820 {b_key}")).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}"));

    let (reason, message) = wait_condition(&a, "peer", "wrong", "CredentialsValid", "False");
    assert_eq!(reason, "CredentialsRefused");
    assert!(
        message.contains(&b.url) && message.contains("401"),
        "{message}"
    );
    let (reason, message) = wait_condition(&a, "peer", "gone", "CredentialsValid", "False");
    assert_eq!(reason, "RemoteUnreachable");
    assert!(message.contains(unreachable), "{message}");
    let (reason, message) = wait_condition(&a, "peer", "nocreds", "CredentialsValid", "False");
    assert_eq!(reason, "CredentialsUnusable");
    assert!(message.contains("\"missing\""), "{message}");

    // A moved gateway on B reaches A's Peer without re-peering.
    b.set_node_address("gw", "192.168.205.77")
        .expect("move B's gateway");
    a.wait_for("Peer/b's new endpoint", Duration::from_secs(40), || {
        let got = a.jsonpath("peer", "b", "{.spec.gatewayEndpoints[0]}")?;
        Ok((got == "192.168.205.77:51820").then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}"));

    // Nothing of either cluster is routed in the root namespace.
    let routes = netns::ip(&["-4", "route"]).expect("routes");
    for range in ["10.244.", "10.245.", "10.128.", "192.168.20"] {
        assert!(
            !routes.contains(range),
            "root namespace routes {range}: {routes}"
        );
    }
}
