use super::*;

// The tests write pods as the API server sends them; the controller keeps
// only their facts, made the same way.
fn facts(objects: &[Value]) -> Vec<PodFacts> {
    objects.iter().map(PodFacts::of).collect()
}

fn plan(pods: &[Value], copies: &[Value], ctx: &Context) -> Vec<Action> {
    super::plan(&facts(pods), &facts(copies), ctx)
}

fn refusal(pod: &Value, namespaces: &BTreeMap<String, NamespaceState>) -> Option<Refusal> {
    super::refusal(&PodFacts::of(pod), namespaces)
}

fn status_from_copy(copy: &Value, remote: Ipv4Network, view: Ipv4Network) -> Value {
    let status = copy["status"].as_object().cloned().unwrap_or_default();
    Value::Object(translated_status(status, remote, view))
}

fn not_ready_patch(pod: &Value, why: &str, now: &str) -> Option<Value> {
    super::not_ready_patch(&PodFacts::of(pod), why, now)
}

const UID: &str = "0f0e-uid";

fn ctx(namespaces: &BTreeMap<String, NamespaceState>) -> Context<'_> {
    Context {
        origin: "a",
        namespaces,
        remote_cidr: "10.244.0.0/16".parse().expect("cidr"),
        view: "10.245.0.0/16".parse().expect("cidr"),
        now: 1_800_000_000,
    }
}

fn ready() -> BTreeMap<String, NamespaceState> {
    BTreeMap::from([("demo".to_owned(), NamespaceState::Ready)])
}

fn pod() -> Value {
    json!({
        "metadata": {"name": "web-1", "namespace": "demo", "uid": UID,
            "labels": {"app": "web"}, "ownerReferences": [{"kind": "ReplicaSet", "name": "web"}]},
        "spec": {
            "nodeName": "ligo-b",
            "nodeSelector": {"disk": "ssd"},
            "affinity": {"nodeAffinity": {}},
            "priorityClassName": "high", "priority": 1000,
            "serviceAccountName": "default", "serviceAccount": "default",
            "tolerations": [
                {"key": TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"},
                {"key": "other", "operator": "Exists"}
            ],
            "volumes": [
                {"name": "default-token-x7k2p", "secret": {"secretName": "default-token-x7k2p"}},
                {"name": "config", "configMap": {"name": "web-config"}}
            ],
            "containers": [{"name": "c", "image": "busybox:1",
                "volumeMounts": [
                    {"name": "default-token-x7k2p", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"},
                    {"name": "config", "mountPath": "/etc/web"}
                ]}],
            "someFieldFromTheFuture": {"kept": true}
        },
        "status": {"phase": "Pending"}
    })
}

fn copy_running(ip: &str) -> Value {
    let mut c = copy(&pod(), "a");
    c["metadata"]["uid"] = json!("remote-uid");
    c["status"] = json!({"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
        "hostIP": "192.168.1.11", "conditions": [{"type": "Ready", "status": "True"}]});
    c
}

#[test]
fn the_copy_drops_what_names_our_cluster_and_keeps_everything_else() {
    let c = copy(&pod(), "a");
    let spec = &c["spec"];
    for gone in [
        "nodeName",
        "nodeSelector",
        "affinity",
        "priorityClassName",
        "priority",
        "serviceAccount",
        "serviceAccountName",
    ] {
        assert!(spec.get(gone).is_none(), "{gone} should be dropped");
    }
    assert_eq!(
        spec["tolerations"],
        json!([{"key": "other", "operator": "Exists"}])
    );
    assert_eq!(
        spec["volumes"],
        json!([{"name": "config", "configMap": {"name": "web-config"}}])
    );
    assert_eq!(
        spec["containers"][0]["volumeMounts"],
        json!([{"name": "config", "mountPath": "/etc/web"}]),
        "the token's mount goes with its volume"
    );
    assert_eq!(spec["someFieldFromTheFuture"], json!({"kept": true}));
    assert_eq!(
        c["metadata"]["labels"],
        json!({"app": "web", ORIGIN_LABEL: "a"})
    );
    assert_eq!(
        c["metadata"]["annotations"][ORIGIN_UID_ANNOTATION],
        json!(UID)
    );
    assert!(c["metadata"].get("ownerReferences").is_none());
    assert!(c.get("status").is_none());
}

#[test]
fn host_namespaces_daemonsets_and_namespaces_not_offloaded_are_refused() {
    let ns = ready();
    let mut host = pod();
    host["spec"]["hostNetwork"] = json!(true);
    assert_eq!(
        refusal(&host, &ns).map(|r| r.reason),
        Some("HostNamespaceNotOffloaded".into())
    );
    let mut ds = pod();
    ds["metadata"]["ownerReferences"] = json!([{"kind": "DaemonSet", "name": "agent"}]);
    let r = refusal(&ds, &ns).expect("refused");
    assert_eq!(r.reason, "DaemonSetPodNotOffloaded");
    assert!(r.message.contains("DaemonSet agent"));
    let mut elsewhere = pod();
    elsewhere["metadata"]["namespace"] = json!("other");
    assert_eq!(
        refusal(&elsewhere, &ns).map(|r| r.reason),
        Some("NamespaceNotOffloaded".into())
    );
    let taken = BTreeMap::from([(
        "demo".to_owned(),
        NamespaceState::Refused("NamespaceTaken".into(), "namespace demo exists in b".into()),
    )]);
    assert_eq!(
        refusal(&pod(), &taken).map(|r| r.reason),
        Some("NamespaceTaken".into())
    );
    assert_eq!(refusal(&pod(), &ns), None);

    // Refused once: the status says so and an Event is made, not again.
    let actions = plan(&[host.clone()], &[], &ctx(&ns));
    assert!(
        matches!(&actions[..], [Action::Refuse(_, _, r)] if r.reason == "HostNamespaceNotOffloaded")
    );
    host["status"]["reason"] = json!("HostNamespaceNotOffloaded");
    assert_eq!(plan(&[host], &[], &ctx(&ns)), vec![]);
}

#[test]
fn addresses_come_back_in_our_view_and_never_as_the_providers() {
    let (remote, view) = (
        "10.244.0.0/16".parse().expect("c"),
        "10.245.0.0/16".parse().expect("c"),
    );
    let status = status_from_copy(&copy_running("10.244.1.20"), remote, view);
    assert_eq!(status["podIP"], json!("10.245.1.20"));
    assert_eq!(status["podIPs"], json!([{"ip": "10.245.1.20"}]));
    assert!(status.get("hostIP").is_none());
    let outside = status_from_copy(&copy_running("192.168.7.7"), remote, view);
    assert!(outside.get("podIP").is_none() && outside.get("podIPs").is_none());
}

#[test]
fn a_pod_is_copied_once_and_its_status_comes_back() {
    let ns = ready();
    assert!(
        matches!(&plan(&[pod()], &[], &ctx(&ns))[..], [Action::CreateRemote(n, p, _)] if n == "demo" && p == "web-1")
    );
    // Asked for but not granted yet: nothing yet.
    let waiting = BTreeMap::from([("demo".to_owned(), NamespaceState::Waiting)]);
    assert_eq!(plan(&[pod()], &[], &ctx(&waiting)), vec![]);

    let actions = plan(&[pod()], &[copy_running("10.244.1.20")], &ctx(&ns));
    let [Action::PatchStatus(_, _, patch)] = &actions[..] else {
        panic!("{actions:?}")
    };
    assert_eq!(patch["phase"], json!("Running"));
    assert_eq!(patch["podIP"], json!("10.245.1.20"));
    // Applied: nothing more to do.
    let mut synced = pod();
    let status = status_from_copy(
        &copy_running("10.244.1.20"),
        ctx(&ns).remote_cidr,
        ctx(&ns).view,
    );
    synced["status"] = status;
    assert_eq!(
        plan(&[synced], &[copy_running("10.244.1.20")], &ctx(&ns)),
        vec![]
    );
}

#[test]
fn deletion_goes_both_ways_with_the_grace_period() {
    let ns = ready();
    let mut gone = pod();
    gone["metadata"]["deletionTimestamp"] = json!("2027-01-15T08:00:00Z");
    gone["metadata"]["deletionGracePeriodSeconds"] = json!(7);
    let actions = plan(&[gone.clone()], &[copy_running("10.244.1.20")], &ctx(&ns));
    assert_eq!(
        actions,
        vec![Action::DeleteRemote {
            namespace: "demo".into(),
            name: "web-1".into(),
            uid: "remote-uid".into(),
            grace_seconds: Some(7)
        }]
    );
    // The copy is gone: the pod's final delete.
    assert_eq!(
        plan(&[gone], &[], &ctx(&ns)),
        vec![Action::FinishDelete(
            "demo".into(),
            "web-1".into(),
            UID.into()
        )]
    );
    // A copy whose pod is gone here is deleted there.
    assert!(matches!(
        &plan(&[], &[copy_running("10.244.1.20")], &ctx(&ns))[..],
        [Action::DeleteRemote {
            grace_seconds: None,
            ..
        }]
    ));
}

#[test]
fn a_copy_deleted_or_edited_out_of_band_is_restored_but_a_finished_pod_stays_finished() {
    let ns = ready();
    // Deleted there: made again.
    assert!(matches!(
        &plan(&[pod()], &[], &ctx(&ns))[..],
        [Action::CreateRemote(..)]
    ));
    let mut done = pod();
    done["status"]["phase"] = json!("Succeeded");
    assert_eq!(
        plan(&[done], &[], &ctx(&ns)),
        vec![],
        "a completed pod is not re-created"
    );

    let mut edited = copy_running("10.244.1.20");
    edited["spec"]["containers"][0]["image"] = json!("evil:latest");
    edited["metadata"]["labels"]["app"] = json!("other");
    let actions = plan(&[pod()], &[edited], &ctx(&ns));
    let restore = actions.iter().find_map(|a| match a {
        Action::RestoreRemote(_, _, p) => Some(p.clone()),
        _ => None,
    });
    assert_eq!(
        restore,
        Some(
            json!({"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "busybox:1"}]}})
        )
    );

    // A copy of an older pod of the same name is removed, and only then
    // is the new pod copied.
    let mut stale = copy_running("10.244.1.20");
    stale["metadata"]["annotations"][ORIGIN_UID_ANNOTATION] = json!("older");
    let actions = plan(&[pod()], &[stale], &ctx(&ns));
    assert!(
        matches!(&actions[..], [Action::DeleteRemote { .. }]),
        "{actions:?}"
    );
}

#[test]
fn a_copy_the_provider_cannot_schedule_is_bounced_after_the_timeout() {
    let ns = ready();
    let mut pending = copy(&pod(), "a");
    pending["metadata"]["uid"] = json!("remote-uid");
    let since = |seconds_ago: i64| {
        k8s_openapi::jiff::Timestamp::from_second(ctx(&ns).now - seconds_ago)
            .expect("time")
            .to_string()
    };
    pending["status"] = json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
        "reason": "Unschedulable", "message": "0/2 nodes are available: 2 Insufficient cpu.",
        "lastTransitionTime": since(10)}]});
    let early = plan(&[pod()], &[pending.clone()], &ctx(&ns));
    assert!(
        early.iter().all(|a| !matches!(a, Action::Bounce(..))),
        "not yet: {early:?}"
    );
    pending["status"]["conditions"][0]["lastTransitionTime"] =
        json!(since(BOUNCE_AFTER_SECONDS + 1));
    let late = plan(&[pod()], &[pending], &ctx(&ns));
    assert!(
        matches!(&late[..], [Action::DeleteRemote { .. }, Action::Bounce(_, _, r)]
        if r.reason == "OffloadUnschedulable" && r.message.contains("Insufficient cpu")),
        "{late:?}"
    );
}

#[test]
fn an_unreadable_provider_turns_ready_pods_not_ready_and_nothing_else() {
    let mut running = pod();
    running["status"] = json!({"phase": "Running", "podIP": "10.245.1.20", "conditions": [
        {"type": "PodScheduled", "status": "True"},
        {"type": "Ready", "status": "True"},
        {"type": "ContainersReady", "status": "True"}]});
    let patch =
        not_ready_patch(&running, "b did not answer", "2027-01-01T00:00:00Z").expect("a patch");
    let conditions = patch["conditions"].as_array().expect("list");
    assert_eq!(
        conditions[0],
        json!({"type": "PodScheduled", "status": "True"})
    );
    for c in &conditions[1..] {
        assert_eq!(
            (c["status"].as_str(), c["reason"].as_str()),
            (Some("False"), Some("ProviderUnreachable"))
        );
    }
    assert!(
        patch.get("phase").is_none() && patch.get("podIP").is_none(),
        "only readiness changes"
    );
    // Already NotReady, finished, or never Ready: nothing to write.
    running["status"]["conditions"] = patch["conditions"].clone();
    assert_eq!(not_ready_patch(&running, "x", "t"), None);
    let mut done = pod();
    done["status"] =
        json!({"phase": "Succeeded", "conditions": [{"type": "Ready", "status": "True"}]});
    assert_eq!(not_ready_patch(&done, "x", "t"), None);
}

#[test]
fn a_running_pod_whose_namespace_is_no_longer_offloaded_fails_and_its_copy_goes() {
    let mut running = pod();
    running["status"] = json!({"phase": "Running", "podIP": "10.245.1.20"});
    let none = BTreeMap::new();
    let actions = plan(
        &[running.clone()],
        &[copy_running("10.244.1.20")],
        &ctx(&none),
    );
    assert!(
        matches!(&actions[..], [Action::DeleteRemote { .. }, Action::Bounce(_, _, r)] if r.reason == "NamespaceNotOffloaded"),
        "{actions:?}"
    );
    // Failed once: nothing more.
    running["status"] = json!({"phase": "Failed", "reason": "NamespaceNotOffloaded"});
    assert_eq!(plan(&[running], &[], &ctx(&none)), vec![]);
}

#[test]
fn what_would_give_a_pod_the_providers_node_is_refused() {
    let ns = ready();
    let mut privileged = pod();
    privileged["spec"]["containers"][0]["securityContext"] = json!({"privileged": true});
    assert_eq!(
        refusal(&privileged, &ns).map(|r| r.reason),
        Some("PrivilegedNotOffloaded".into())
    );
    let mut host_path = pod();
    host_path["spec"]["volumes"] = json!([{"name": "root", "hostPath": {"path": "/"}}]);
    assert_eq!(
        refusal(&host_path, &ns).map(|r| r.reason),
        Some("HostPathNotOffloaded".into())
    );
    let mut host_port = pod();
    host_port["spec"]["containers"][0]["ports"] = json!([{"containerPort": 80, "hostPort": 8080}]);
    assert_eq!(
        refusal(&host_port, &ns).map(|r| r.reason),
        Some("HostPortNotOffloaded".into())
    );
    let mut plain_port = pod();
    plain_port["spec"]["containers"][0]["ports"] = json!([{"containerPort": 80}]);
    assert_eq!(refusal(&plain_port, &ns), None);
}

#[test]
fn a_deleted_pod_waits_while_its_copies_are_not_known() {
    let waiting = BTreeMap::from([("demo".to_owned(), NamespaceState::Waiting)]);
    let mut gone = pod();
    gone["metadata"]["deletionTimestamp"] = json!("2027-01-15T08:00:00Z");
    assert_eq!(
        plan(&[gone], &[], &ctx(&waiting)),
        vec![],
        "not finished before the copies are listed"
    );
}

#[test]
fn a_reason_left_by_a_refusal_is_cleared_once_the_pod_runs() {
    let ns = ready();
    let mut once_refused = pod();
    once_refused["status"] =
        json!({"phase": "Pending", "reason": "NamespaceNotOffloaded", "message": "x"});
    let actions = plan(&[once_refused], &[copy_running("10.244.1.20")], &ctx(&ns));
    let [Action::PatchStatus(_, _, patch)] = &actions[..] else {
        panic!("{actions:?}")
    };
    assert_eq!(
        (patch["reason"].clone(), patch["message"].clone()),
        (Value::Null, Value::Null)
    );
    assert_eq!(patch["phase"], json!("Running"));
}

#[test]
fn a_status_is_compared_by_value_whatever_order_its_fields_were_written_in() {
    let ns = ready();
    let copy = copy_running("10.244.1.20");
    // What the copy's status comes to here, written with every map's keys
    // in reverse order (as another server or a patch may write them).
    let synced = |reverse: bool| {
        let mut p = pod();
        let status = status_from_copy(&copy, ctx(&ns).remote_cidr, ctx(&ns).view);
        let text = if reverse {
            reversed_keys(&status)
        } else {
            status.to_string()
        };
        p["status"] = serde_json::from_str(&text).expect("json");
        (p, text)
    };
    let (reordered, text) = synced(true);
    assert!(text.starts_with(r#"{"podIPs""#), "written reversed: {text}");
    assert_eq!(
        plan(&[reordered], std::slice::from_ref(&copy), &ctx(&ns)),
        vec![]
    );
    assert_eq!(plan(&[synced(false).0], &[copy], &ctx(&ns)), vec![]);
}

/// `v` as JSON text with every object's keys in reverse order.
fn reversed_keys(v: &Value) -> String {
    match v {
        Value::Object(map) => {
            let fields: Vec<String> = map
                .iter()
                .rev()
                .map(|(k, v)| format!("{}:{}", Value::from(k.as_str()), reversed_keys(v)))
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(reversed_keys).collect();
            format!("[{}]", items.join(","))
        }
        other => other.to_string(),
    }
}

#[test]
fn an_edited_image_is_restored_from_what_is_kept_of_the_copy() {
    let ns = ready();
    let mut edited = copy_running("10.244.1.20");
    edited["spec"]["containers"][0]["image"] = json!("evil:latest");
    let restore = plan(&[pod()], &[edited], &ctx(&ns))
        .into_iter()
        .find_map(|a| match a {
            Action::RestoreRemote(_, _, p) => Some(p),
            _ => None,
        });
    assert_eq!(
        restore,
        Some(json!({"spec": {"containers": [{"name": "c", "image": "busybox:1"}]}}))
    );
}

#[test]
fn a_status_field_the_server_drops_is_not_written_again_until_something_changes() {
    let ns = ready();
    let mut copy = copy_running("10.244.1.20");
    copy["status"]["fieldFromANewerServer"] = json!({"x": 1});
    // The pod as our server keeps it after the patch: all but that field.
    let mut pod = pod();
    let mut kept = status_from_copy(&copy, ctx(&ns).remote_cidr, ctx(&ns).view);
    kept.as_object_mut()
        .expect("map")
        .remove("fieldFromANewerServer");
    pod["status"] = kept;
    let patch = match &plan(&[pod.clone()], std::slice::from_ref(&copy), &ctx(&ns))[..] {
        [Action::PatchStatus(_, _, patch)] => patch.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(patch, json!({"fieldFromANewerServer": {"x": 1}}));
    let written = Written {
        patch: patch_digest(&patch),
        status_after: PodFacts::of(&pod).status_digest(),
    };
    assert!(already_written(&PodFacts::of(&pod), &patch, Some(&written)));
    assert!(
        !already_written(&PodFacts::of(&pod), &patch, None),
        "never written"
    );
    // Someone else changed the pod's status: written again.
    let mut changed = pod.clone();
    changed["status"]["phase"] = json!("Pending");
    assert!(!already_written(
        &PodFacts::of(&changed),
        &patch,
        Some(&written)
    ));
    // The copy's status changed: another patch.
    assert!(!already_written(
        &PodFacts::of(&pod),
        &json!({"fieldFromANewerServer": {"x": 2}}),
        Some(&written)
    ));
}
