use super::*;

fn key(kind: Kind, name: &str) -> Key {
    (kind, "demo".into(), name.into())
}

#[test]
fn every_kind_of_reference_is_found_and_nothing_else() {
    let pod = json!({"metadata": {"namespace": "demo"}, "spec": {
        "containers": [{"name": "c",
            "env": [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "cm-env", "key": "k"}}},
                    {"name": "B", "valueFrom": {"secretKeyRef": {"name": "s-env", "key": "k"}}},
                    {"name": "C", "value": "plain"}],
            "envFrom": [{"configMapRef": {"name": "cm-from"}}, {"secretRef": {"name": "s-from"}}]}],
        "initContainers": [{"name": "i", "envFrom": [{"configMapRef": {"name": "cm-init"}}]}],
        "volumes": [{"name": "v1", "configMap": {"name": "cm-vol"}}, {"name": "v2", "secret": {"secretName": "s-vol"}},
            {"name": "v3", "projected": {"sources": [{"configMap": {"name": "cm-proj"}}, {"secret": {"name": "s-proj"}}]}},
            {"name": "v4", "emptyDir": {}}],
        "imagePullSecrets": [{"name": "registry"}]
    }});
    let found = references(&pod);
    let expected: BTreeSet<Key> = [
        key(Kind::ConfigMap, "cm-env"),
        key(Kind::ConfigMap, "cm-from"),
        key(Kind::ConfigMap, "cm-init"),
        key(Kind::ConfigMap, "cm-vol"),
        key(Kind::ConfigMap, "cm-proj"),
        key(Kind::Secret, "s-env"),
        key(Kind::Secret, "s-from"),
        key(Kind::Secret, "s-vol"),
        key(Kind::Secret, "s-proj"),
        key(Kind::Secret, "registry"),
    ]
    .into_iter()
    .collect();
    assert_eq!(found, expected);
}

#[test]
fn tokens_and_helm_releases_never_cross() {
    assert!(never_reflected(&json!({"type": "kubernetes.io/service-account-token"})).is_some());
    assert!(never_reflected(
        &json!({"metadata": {"annotations": {"kubernetes.io/service-account.name": "default"}}})
    )
    .is_some());
    assert!(never_reflected(&json!({"type": "helm.sh/release.v1"})).is_some());
    assert!(never_reflected(&json!({"metadata": {"labels": {"owner": "helm"}}})).is_some());
    assert!(never_reflected(&json!({"type": "Opaque"})).is_none());
}

#[test]
fn copies_carry_the_content_our_origin_and_a_hash_of_the_content() {
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "cfg", "namespace": "demo", "uid": "u", "resourceVersion": "7", "labels": {"x": "y"}},
        "data": {"k": "v"}});
    let copy = config_copy(&cm, "a");
    assert_eq!(copy["data"], json!({"k": "v"}));
    assert_eq!(
        copy["metadata"]["labels"],
        json!({"x": "y", ORIGIN_LABEL: "a"})
    );
    assert!(
        copy["metadata"].get("uid").is_none() && copy["metadata"].get("resourceVersion").is_none()
    );
    let mut changed = cm.clone();
    changed["data"]["k"] = json!("w");
    let h = |c: &Value| c["metadata"]["annotations"][ORIGIN_HASH_ANNOTATION].clone();
    assert_ne!(
        h(&copy),
        h(&config_copy(&changed, "a")),
        "new content, new hash"
    );
    let mut relabelled = cm.clone();
    relabelled["metadata"]["resourceVersion"] = json!("8");
    assert_eq!(
        h(&copy),
        h(&config_copy(&relabelled, "a")),
        "same content, same hash"
    );
}

fn map() -> AddressMap {
    AddressMap {
        our_cidr: "10.244.0.0/16".parse().expect("cidr"),
        our_cidr_there: "10.246.0.0/16".parse().expect("cidr"),
        view: "10.245.0.0/16".parse().expect("cidr"),
        remote_cidr: "10.244.0.0/16".parse().expect("cidr"),
    }
}

#[test]
fn endpoints_are_given_in_the_providers_terms() {
    let m = map();
    assert_eq!(
        m.there("10.244.1.10").as_deref(),
        Some("10.246.1.10"),
        "our pod: through its view of us"
    );
    assert_eq!(
        m.there("10.245.2.101").as_deref(),
        Some("10.244.2.101"),
        "an offloaded pod: its real address"
    );
    assert_eq!(
        m.there("192.168.0.11"),
        None,
        "a node address is not reachable"
    );
    let eps = json!({"metadata": {"name": "web", "namespace": "demo"}, "subsets": [
        {"addresses": [{"ip": "10.244.1.10"}, {"ip": "192.168.0.11"}], "notReadyAddresses": [{"ip": "10.245.2.101"}],
         "ports": [{"port": 80, "protocol": "TCP"}]},
        {"addresses": [{"ip": "192.168.0.12"}], "ports": [{"port": 81}]}
    ]});
    let copy = endpoints_copy(&eps, "a", &m);
    assert_eq!(
        copy["subsets"],
        json!([{"addresses": [{"ip": "10.246.1.10"}],
        "notReadyAddresses": [{"ip": "10.244.2.101"}], "ports": [{"port": 80, "protocol": "TCP"}]}])
    );
    let slices = endpoint_slice_copies(&eps, "a", &m);
    assert_eq!(
        slices.len(),
        1,
        "the second port set has no address in the view"
    );
    let slice = &slices[0];
    assert_eq!(slice["metadata"]["name"], json!("web-ligo"));
    assert_eq!(
        slice["metadata"]["labels"]["kubernetes.io/service-name"],
        json!("web")
    );
    assert_eq!(
        slice["endpoints"],
        json!([
            {"addresses": ["10.246.1.10"], "conditions": {"ready": true}},
            {"addresses": ["10.244.2.101"], "conditions": {"ready": false}}
        ])
    );
    // Pods whose named port differs: a slice per port set, each with its
    // own ports (one slice would send one set's clients to the wrong port).
    let mut two = eps.clone();
    two["subsets"][1]["addresses"] = json!([{"ip": "10.244.1.11"}]);
    two["subsets"][1]["ports"] = json!([{"name": "http", "port": 8080}]);
    let slices = endpoint_slice_copies(&two, "a", &m);
    let summary: Vec<(Value, Value, Value)> = slices
        .iter()
        .map(|s| {
            (
                s["metadata"]["name"].clone(),
                s["ports"].clone(),
                s["endpoints"][0]["addresses"].clone(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                json!("web-ligo"),
                json!([{"port": 80, "protocol": "TCP"}]),
                json!(["10.246.1.10"])
            ),
            (
                json!("web-ligo-1"),
                json!([{"name": "http", "port": 8080}]),
                json!(["10.246.1.11"])
            ),
        ]
    );
    // No endpoints at all: one empty slice, so the Service has one.
    let none = endpoint_slice_copies(&json!({"metadata": {"name": "web"}}), "a", &m);
    assert_eq!(
        (
            none.len(),
            none[0]["endpoints"].clone(),
            none[0]["ports"].clone()
        ),
        (1, json!([]), json!([]))
    );
}

#[test]
fn a_service_copy_has_no_selector_or_allocated_fields() {
    let svc = json!({"metadata": {"name": "web", "namespace": "demo"}, "spec": {
        "selector": {"app": "web"}, "clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"], "type": "NodePort",
        "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30080}]}});
    let copy = service_copy(&svc, "a");
    assert_eq!(
        copy["spec"],
        json!({"ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]})
    );
    let mut headless = svc.clone();
    headless["spec"]["clusterIP"] = json!("None");
    assert_eq!(
        service_copy(&headless, "a")["spec"]["clusterIP"],
        json!("None")
    );
}

#[test]
fn copies_are_written_when_missing_or_stale_and_others_objects_are_left_alone() {
    let copy = config_copy(
        &json!({"kind": "ConfigMap", "metadata": {"name": "cfg", "namespace": "demo"}, "data": {}}),
        "a",
    );
    let hash = copy["metadata"]["annotations"][ORIGIN_HASH_ANNOTATION]
        .as_str()
        .map(str::to_owned);
    let k = key(Kind::ConfigMap, "cfg");
    let wanted = BTreeMap::from([(k.clone(), copy.clone())]);
    assert_eq!(
        plan(&wanted, &BTreeMap::new(), &BTreeSet::new()),
        vec![ReflectAction::Put(k.clone(), copy.clone())]
    );
    let fresh = BTreeMap::from([(
        k.clone(),
        Held {
            ours: true,
            hash: hash.clone(),
        },
    )]);
    assert_eq!(plan(&wanted, &fresh, &BTreeSet::new()), vec![]);
    let stale = BTreeMap::from([(
        k.clone(),
        Held {
            ours: true,
            hash: Some("old".into()),
        },
    )]);
    assert_eq!(
        plan(&wanted, &stale, &BTreeSet::new()),
        vec![ReflectAction::Put(k.clone(), copy)]
    );
    let theirs = BTreeMap::from([(
        k.clone(),
        Held {
            ours: false,
            hash: None,
        },
    )]);
    assert_eq!(
        plan(&wanted, &theirs, &BTreeSet::new()),
        vec![ReflectAction::Conflict(k.clone())]
    );
    // No longer referenced: ours goes, theirs stays.
    let none = BTreeSet::new();
    assert_eq!(
        plan(&BTreeMap::new(), &fresh, &none),
        vec![ReflectAction::Delete(k.clone())]
    );
    assert_eq!(plan(&BTreeMap::new(), &theirs, &none), vec![]);
    // Its source could not be read this time: left as it is.
    assert_eq!(
        plan(&BTreeMap::new(), &fresh, &BTreeSet::from([k.clone()])),
        vec![]
    );
}
