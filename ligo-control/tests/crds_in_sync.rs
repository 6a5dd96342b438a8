//! manifests/crds/ must be what the Rust types generate: a changed type
//! without regenerated YAML (or a hand edit) fails here.

use std::path::Path;

#[test]
fn committed_crds_equal_the_generated_ones() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds");
    let generated = ligo_control::crd_manifests().expect("generate");
    assert_eq!(generated.len(), 3);
    for (name, yaml) in &generated {
        let committed = std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| {
            panic!("{name}: {e}; run `cargo run -p ligo-control -- crds --write manifests/crds`")
        });
        assert_eq!(
            &committed, yaml,
            "{name} differs from the types; run `cargo run -p ligo-control -- crds --write manifests/crds`"
        );
    }
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("manifests/crds")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name != "kustomization.yaml")
        .collect();
    files.sort();
    let mut names: Vec<String> = generated.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    assert_eq!(files, names, "a CRD file no type generates");
    // `kubectl apply -k manifests/` installs exactly these.
    let kustomization: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(dir.join("kustomization.yaml")).expect("kustomization.yaml"),
    )
    .expect("yaml");
    let mut listed: Vec<String> = kustomization["resources"]
        .as_sequence()
        .expect("resources")
        .iter()
        .filter_map(|r| r.as_str().map(str::to_owned))
        .collect();
    listed.sort();
    assert_eq!(
        listed, names,
        "manifests/crds/kustomization.yaml lists every CRD"
    );
}

#[test]
fn crds_are_cluster_scoped_v1alpha1_with_status_and_structural_schemas() {
    for (name, yaml) in ligo_control::crd_manifests().expect("generate") {
        let crd: serde_yaml::Value = serde_yaml::from_str(&yaml).expect("yaml");
        assert_eq!(crd["apiVersion"], "apiextensions.k8s.io/v1", "{name}");
        assert_eq!(crd["spec"]["group"], "ligo.io", "{name}");
        assert_eq!(crd["spec"]["scope"], "Cluster", "{name}");
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["name"], "v1alpha1", "{name}");
        assert!(
            version["subresources"]["status"].is_mapping(),
            "{name}: status subresource"
        );
        let schema = &version["schema"]["openAPIV3Schema"];
        assert_eq!(schema["type"], "object", "{name}");
        let conditions = &schema["properties"]["status"]["properties"]["conditions"];
        assert_eq!(conditions["x-kubernetes-list-type"], "map", "{name}");
        assert!(
            !yaml.contains("x-kubernetes-validations"),
            "{name}: CEL does not install on 1.20"
        );
    }
}
