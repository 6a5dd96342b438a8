use super::*;

fn net(text: &str) -> Ipv4Network {
    text.parse().expect("test CIDR")
}

fn local() -> Resolved {
    Resolved {
        cluster_name: "a".into(),
        cluster_id: 1,
        pod_cidr: net("10.244.0.0/16"),
        service_cidr: Some(net("10.96.0.0/12")),
        view_pools: vec![net("10.128.0.0/12")],
        reserved_ranges: vec![],
        gateway_label: "ligo.io/gateway".into(),
        wireguard_port: 51820,
    }
}

fn spec(name: &str, id: u32, pod_cidr: &str) -> PeerSpec {
    PeerSpec {
        cluster_name: name.into(),
        cluster_id: id,
        pod_cidr: pod_cidr.into(),
        ..PeerSpec::default()
    }
}

fn run(spec: &PeerSpec, local: &Resolved, others: &[OtherPeer], remote: &Remote) -> PeerPlan {
    reconcile(&PeerInputs {
        name: &spec.cluster_name.clone(),
        created: "2026-01-01T00:00:10Z",
        spec,
        local: Ok(local),
        node_addresses: &[Ipv4Addr::new(192, 168, 0, 1)],
        others,
        remote,
        link: None,
        nodes: &NodeReports::default(),
    })
}

fn verdict<'a>(plan: &'a PeerPlan, type_: &str) -> &'a Verdict {
    plan.verdicts
        .iter()
        .find(|v| v.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} in {:?}", plan.verdicts))
}

#[test]
fn a_free_real_cidr_is_the_view_and_a_taken_one_comes_from_the_pool() {
    let local = local();
    let different = run(
        &spec("b", 2, "10.245.0.0/16"),
        &local,
        &[],
        &Remote::NotConfigured,
    );
    assert_eq!(different.update.view.as_deref(), Some("10.245.0.0/16"));
    assert!(verdict(&different, "ViewAllocated").ok);

    // Identical to ours: the pool's first /16.
    let same = run(
        &spec("b", 2, "10.244.0.0/16"),
        &local,
        &[],
        &Remote::NotConfigured,
    );
    assert_eq!(same.update.view.as_deref(), Some("10.128.0.0/16"));

    // A third cluster with the same CIDR: the next block, not B's.
    let b = OtherPeer {
        name: "b".into(),
        cluster_id: 2,
        view: Some(net("10.128.0.0/16")),
        created: "2026-01-01T00:00:00Z".into(),
    };
    let c = run(
        &spec("c", 3, "10.244.0.0/16"),
        &local,
        &[b],
        &Remote::NotConfigured,
    );
    assert_eq!(c.update.view.as_deref(), Some("10.129.0.0/16"));
}

#[test]
fn a_view_in_the_spec_is_kept_and_never_rewritten() {
    let local = local();
    let mut with_view = spec("b", 2, "10.244.0.0/16");
    with_view.view = Some("10.140.0.0/16".into());
    let plan = run(&with_view, &local, &[], &Remote::NotConfigured);
    assert_eq!(plan.update.view, None);
    assert!(verdict(&plan, "ViewAllocated").ok);
    assert!(verdict(&plan, "ViewAllocated")
        .message
        .contains("10.140.0.0/16"));

    with_view.view = Some("10.140.0.0/24".into());
    let plan = run(&with_view, &local, &[], &Remote::NotConfigured);
    let v = verdict(&plan, "ViewAllocated");
    assert_eq!((v.ok, v.reason.as_str()), (false, "InvalidView"));
    assert!(v.message.contains("prefix length"), "{}", v.message);

    // A hand-written view over our own pods.
    with_view.view = Some("10.244.0.0/16".into());
    let plan = run(&with_view, &local, &[], &Remote::NotConfigured);
    assert_eq!(verdict(&plan, "ViewAllocated").reason, "ViewConflict");
}

#[test]
fn exhausted_pools_say_so_in_view_allocated_and_ready() {
    let mut local = local();
    local.view_pools = vec![net("10.128.0.0/16")];
    let b = OtherPeer {
        name: "b".into(),
        cluster_id: 2,
        view: Some(net("10.128.0.0/16")),
        created: "2026-01-01T00:00:00Z".into(),
    };
    let plan = run(
        &spec("c", 3, "10.244.0.0/16"),
        &local,
        &[b],
        &Remote::NotConfigured,
    );
    assert_eq!(plan.update.view, None, "nothing half-allocated");
    let v = verdict(&plan, "ViewAllocated");
    assert_eq!((v.ok, v.reason.as_str()), (false, "PoolsExhausted"));
    assert!(v.message.contains("10.128.0.0/16"), "{}", v.message);
    let ready = verdict(&plan, "Ready");
    assert_eq!((ready.ok, ready.reason.as_str()), (false, "PoolsExhausted"));
}

#[test]
fn clashing_names_and_ids_are_refused_with_the_reason() {
    let local = local();
    let itself = run(
        &spec("a", 1, "10.244.0.0/16"),
        &local,
        &[],
        &Remote::NotConfigured,
    );
    assert_eq!(verdict(&itself, "Valid").reason, "PeeredWithItself");
    assert_eq!(itself.update.view, None);

    let same_name = run(
        &spec("a", 9, "10.9.0.0/16"),
        &local,
        &[],
        &Remote::NotConfigured,
    );
    let v = verdict(&same_name, "Valid");
    assert_eq!(v.reason, "DuplicateClusterName");
    assert!(
        v.message.contains("both clusters are named \"a\""),
        "{}",
        v.message
    );

    let same_id = run(
        &spec("z", 1, "10.9.0.0/16"),
        &local,
        &[],
        &Remote::NotConfigured,
    );
    assert_eq!(verdict(&same_id, "Valid").reason, "DuplicateClusterId");

    // Two peers claim id 7: the older one keeps it.
    let older = OtherPeer {
        name: "b".into(),
        cluster_id: 7,
        view: None,
        created: "2026-01-01T00:00:00Z".into(),
    };
    let newer = run(
        &spec("c", 7, "10.9.0.0/16"),
        &local,
        std::slice::from_ref(&older),
        &Remote::NotConfigured,
    );
    let v = verdict(&newer, "Valid");
    assert_eq!(v.reason, "DuplicateClusterId");
    assert!(v.message.contains("Peer/b"), "{}", v.message);
    let younger_other = OtherPeer {
        created: "2026-01-01T00:01:00Z".into(),
        ..older
    };
    let kept = run(
        &spec("c", 7, "10.9.0.0/16"),
        &local,
        &[younger_other],
        &Remote::NotConfigured,
    );
    assert!(verdict(&kept, "Valid").ok);
}

#[test]
fn a_bad_field_is_named() {
    let local = local();
    let mut bad = spec("b", 2, "10.245.0.0/16");
    bad.gateway_endpoints = vec!["203.0.113.2:51820".into(), "203.0.113.3".into()];
    let plan = run(&bad, &local, &[], &Remote::NotConfigured);
    let v = verdict(&plan, "Valid");
    assert!(!v.ok);
    assert!(
        v.message.contains("Peer/b spec.gatewayEndpoints[1]"),
        "{}",
        v.message
    );
    assert_eq!(plan.update.view, None);

    let mut misnamed = spec("b", 2, "10.245.0.0/16");
    misnamed.cluster_name = "c".into();
    let plan = reconcile(&PeerInputs {
        name: "b",
        created: "",
        spec: &misnamed,
        local: Ok(&local),
        node_addresses: &[],
        others: &[],
        remote: &Remote::NotConfigured,
        link: None,
        nodes: &NodeReports::default(),
    });
    assert!(verdict(&plan, "Valid").message.contains("metadata.name"));
}

#[test]
fn the_remote_is_verified_and_its_moved_gateway_and_new_key_are_taken() {
    let local = local();
    let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let mut peer = spec("b", 2, "10.245.0.0/16");
    peer.gateway_endpoints = vec!["203.0.113.2:51820".into()];
    let facts = RemoteFacts {
        cluster_name: Some("b".into()),
        cluster_id: Some(2),
        pod_cidr: Some("10.245.0.0/16".into()),
        gateway_endpoints: vec!["203.0.113.9:51820".into()],
        wireguard_public_key: Some(key.into()),
        view_of_us: Some("10.244.0.0/16".into()),
        ..RemoteFacts::default()
    };
    let plan = run(&peer, &local, &[], &Remote::Read(Box::new(facts.clone())));
    assert!(verdict(&plan, "CredentialsValid").ok);
    assert!(verdict(&plan, "RemoteIdentityVerified").ok);
    assert_eq!(
        plan.update.gateway_endpoints.as_deref(),
        Some(&["203.0.113.9:51820".to_string()][..])
    );
    assert_eq!(plan.update.wireguard_public_key.as_deref(), Some(key));
    assert_eq!(plan.status.remote_view.as_deref(), Some("10.244.0.0/16"));

    // Credentials that lead to another cluster.
    let other = RemoteFacts {
        cluster_name: Some("c".into()),
        ..facts
    };
    let plan = run(&peer, &local, &[], &Remote::Read(Box::new(other)));
    let v = verdict(&plan, "RemoteIdentityVerified");
    assert_eq!((v.ok, v.reason.as_str()), (false, "IdentityMismatch"));
    assert!(
        plan.update.gateway_endpoints.is_none(),
        "nothing taken from an impostor"
    );
}

#[test]
fn an_unreachable_or_refusing_remote_is_reported_as_such() {
    let local = local();
    let peer = spec("b", 2, "10.245.0.0/16");
    let plan = run(
        &peer,
        &local,
        &[],
        &Remote::Unreachable("https://169.254.9.2:6443 did not answer: connection refused".into()),
    );
    let v = verdict(&plan, "CredentialsValid");
    assert_eq!((v.ok, v.reason.as_str()), (false, "RemoteUnreachable"));
    assert!(v.message.contains("https://169.254.9.2:6443"));
    assert!(!verdict(&plan, "Ready").ok);
    let plan = run(
        &peer,
        &local,
        &[],
        &Remote::Refused("401 Unauthorized".into()),
    );
    assert_eq!(
        verdict(&plan, "CredentialsValid").reason,
        "CredentialsRefused"
    );
    // The view does not wait for the remote.
    assert!(verdict(&plan, "ViewAllocated").ok);
}

#[test]
fn ready_needs_a_recent_handshake() {
    let local = local();
    let peer = spec("b", 2, "10.245.0.0/16");
    let no_report = run(&peer, &local, &[], &Remote::NotConfigured);
    assert_eq!(
        verdict(&no_report, "TunnelEstablished").reason,
        "NotReported"
    );
    assert!(!verdict(&no_report, "Ready").ok);
    let link = LinkStatus {
        handshake_age_seconds: Some(3),
        tx_bytes: 1,
        rx_bytes: 1,
        transport: Some("wireguard".into()),
    };
    let all_nodes = NodeReports {
        programmed: vec!["gw".into(), "n1".into()],
        ..NodeReports::default()
    };
    let with = |spec: &PeerSpec, link: &LinkStatus, nodes: &NodeReports| {
        reconcile(&PeerInputs {
            name: "b",
            created: "",
            spec,
            local: Ok(&local),
            node_addresses: &[],
            others: &[],
            remote: &Remote::NotConfigured,
            link: Some(link),
            nodes,
        })
    };
    let up = with(&peer, &link, &all_nodes);
    assert!(verdict(&up, "TunnelEstablished").ok);
    assert!(verdict(&up, "NodesProgrammed").ok);
    assert!(verdict(&up, "Ready").ok, "{:?}", up.verdicts);

    let stale = LinkStatus {
        handshake_age_seconds: Some(181),
        ..link.clone()
    };
    let old = with(&peer, &stale, &all_nodes);
    assert_eq!(
        verdict(&old, "TunnelEstablished").reason,
        "NoRecentHandshake"
    );
    assert!(!verdict(&old, "Ready").ok);
    let never = LinkStatus {
        handshake_age_seconds: None,
        ..link.clone()
    };
    assert!(!verdict(&with(&peer, &never, &all_nodes), "TunnelEstablished").ok);
    // A plain link has no handshake: reported is established.
    let plain = PeerSpec {
        transport: Some("plain".into()),
        ..peer.clone()
    };
    let plain_up = with(&plain, &never, &all_nodes);
    assert_eq!(
        verdict(&plain_up, "TunnelEstablished").reason,
        "PlainTransport"
    );
    assert!(verdict(&plain_up, "Ready").ok);
}

#[test]
fn ready_needs_every_nodes_daemon_to_carry_the_peer() {
    let local = local();
    let peer = spec("b", 2, "10.245.0.0/16");
    let link = LinkStatus {
        handshake_age_seconds: Some(1),
        ..LinkStatus::default()
    };
    let plan = |nodes: &NodeReports| {
        reconcile(&PeerInputs {
            name: "b",
            created: "",
            spec: &peer,
            local: Ok(&local),
            node_addresses: &[],
            others: &[],
            remote: &Remote::NotConfigured,
            link: Some(&link),
            nodes,
        })
    };
    let lagging = plan(&NodeReports {
        programmed: vec!["gw".into()],
        lagging: vec!["n2".into()],
        silent: vec!["n3".into()],
    });
    let v = verdict(&lagging, "NodesProgrammed");
    assert_eq!(v.reason, "NodesLagging");
    assert!(v.message.contains("n2"), "{}", v.message);
    assert_eq!(verdict(&lagging, "Ready").reason, "NodesLagging");
    let silent = plan(&NodeReports {
        programmed: vec!["gw".into()],
        silent: vec!["n3".into()],
        ..NodeReports::default()
    });
    let v = verdict(&silent, "NodesProgrammed");
    assert!(
        v.reason == "NodesNotReporting" && v.message.contains("from n3:"),
        "{v:?}"
    );
    assert_eq!(
        verdict(&plan(&NodeReports::default()), "NodesProgrammed").reason,
        "NoNodes"
    );
}
