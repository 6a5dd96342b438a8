//! The CRDs against a real kube-apiserver (v1.20, built from Debian's
//! source by `xtask/kube/build-kube.sh`): they install, become
//! Established, and the server itself enforces what their schemas say.

use std::path::PathBuf;

use xtask::{
    kube::{ControlPlane, ControlPlaneOptions},
    netns, require_root, workspace_root,
};

fn crds_dir() -> PathBuf {
    workspace_root().join("manifests/crds")
}

#[test]
fn crds_install_on_a_real_apiserver_which_enforces_their_schemas() {
    if !require_root("crds_install_on_a_real_apiserver_which_enforces_their_schemas") {
        return;
    }
    let cp = ControlPlane::start("lk-crd", &ControlPlaneOptions::new(201))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let crds = crds_dir();
    cp.kubectl(&["apply", "-k", &crds.to_string_lossy()])
        .unwrap_or_else(|e| panic!("{e:#}\n{}", cp.logs()));
    for crd in [
        "clusterfabrics.ligo.io",
        "peers.ligo.io",
        "nodefabrics.ligo.io",
    ] {
        cp.kubectl(&[
            "wait",
            "--for",
            "condition=Established",
            &format!("crd/{crd}"),
            "--timeout",
            "30s",
        ])
        .unwrap_or_else(|e| panic!("{crd}: {e:#}"));
    }

    // The id's range is the schema's: the server refuses 2^24 and 0.
    for bad_id in ["16777216", "0"] {
        let manifest = format!(
            "apiVersion: ligo.io/v1alpha1\nkind: ClusterFabric\nmetadata: {{name: local}}\nspec: {{clusterId: {bad_id}}}\n"
        );
        let file = std::env::temp_dir().join(format!("lk-crd-{bad_id}.yaml"));
        std::fs::write(&file, manifest).expect("write");
        let refused = cp
            .kubectl(&["apply", "-f", &file.to_string_lossy()])
            .expect_err("an id out of range must be refused by the server");
        assert!(
            format!("{refused:#}").contains("spec.clusterId"),
            "{refused:#}"
        );
    }

    // A valid object round-trips, field names as the YAML docs show them.
    let file = std::env::temp_dir().join("lk-crd-ok.yaml");
    std::fs::write(
        &file,
        "apiVersion: ligo.io/v1alpha1\nkind: ClusterFabric\nmetadata: {name: local}\nspec: {clusterName: a, clusterId: 16777215, podCIDR: 10.244.0.0/16, serviceCIDR: 10.96.0.0/12, viewPools: [10.128.0.0/12]}\n",
    )
    .expect("write");
    cp.kubectl(&["apply", "-f", &file.to_string_lossy()])
        .unwrap_or_else(|e| panic!("{e:#}"));
    let got = cp
        .kubectl(&[
            "get",
            "clusterfabric",
            "local",
            "-o",
            "jsonpath={.spec.podCIDR} {.spec.clusterId} {.spec.viewPools[0]}",
        ])
        .expect("get");
    assert_eq!(got, "10.244.0.0/16 16777215 10.128.0.0/12");

    // Network safety: the root namespace reaches the control plane over
    // link-local addresses only.
    let routes = netns::ip(&["-4", "route", "show", "dev", "lk-crd-k"]).expect("routes");
    for line in routes.lines() {
        assert!(
            line.starts_with("169.254."),
            "a non link-local route: {line}"
        );
    }
}
