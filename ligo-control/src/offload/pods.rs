//! Pods bound to a virtual node and their copies in the provider, as pure
//! functions of JSON objects (so fields this client's types do not know
//! pass through untouched): what the copy is, what comes back as the
//! pod's status, and what to do to bring both sides together.

use std::{borrow::Borrow, collections::BTreeMap, net::Ipv4Addr};

use ipnetwork::Ipv4Network;
use serde_json::{json, Map, Value};

use super::{pod_facts::PodFacts, virtual_node::TAINT_KEY};
use crate::crd::ORIGIN_LABEL;

/// The consumer pod a copy is of (its UID): a copy of an older pod of the
/// same name is not this pod's.
pub const ORIGIN_UID_ANNOTATION: &str = "ligo.io/origin-uid";
/// How long the provider may leave a copy unschedulable before the pod is
/// bounced (failed, so its controller can place it elsewhere).
pub const BOUNCE_AFTER_SECONDS: i64 = 60;

/// The state of an offloaded namespace for one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamespaceState {
    /// Granted, and its copies are being watched (listed at least once).
    Ready,
    /// Asked for; the provider has not answered yet.
    Waiting,
    /// Refused by the provider (reason, message).
    Refused(String, String),
}

/// What a reconcile needs to know besides the pods.
pub struct Context<'a> {
    /// Our cluster name (the copies' origin label).
    pub origin: &'a str,
    /// The offloaded namespaces; any other namespace is not offloaded.
    pub namespaces: &'a BTreeMap<String, NamespaceState>,
    /// The provider's real pod CIDR, and our view of it.
    pub remote_cidr: Ipv4Network,
    pub view: Ipv4Network,
    /// Seconds since the epoch.
    pub now: i64,
}

/// Why a pod is not run remotely.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Create the copy of the pod (namespace, name, UID): made from the pod
    /// read whole, only if it is still this pod.
    CreateRemote(String, String, String),
    /// Delete the copy, with the pod's grace period when it has one; the
    /// UID is a precondition, so a newer copy is never deleted.
    DeleteRemote {
        namespace: String,
        name: String,
        uid: String,
        grace_seconds: Option<i64>,
    },
    /// Merge-patch the copy back to what we made (an edit out of band).
    RestoreRemote(String, String, Value),
    /// Merge-patch the pod's status.
    PatchStatus(String, String, Value),
    /// The pod's final delete, as the kubelet does once it is gone
    /// remotely (grace 0, UID precondition).
    FinishDelete(String, String, String),
    /// Record the refusal in the pod's status and as an Event.
    Refuse(String, String, Refusal),
    /// The provider could not schedule the copy in time: the pod fails with
    /// this reason (and an Event), and the copy goes.
    Bounce(String, String, Refusal),
}

fn text<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

/// Why `pod` may not run in the provider, if it may not.
pub fn refusal(pod: &PodFacts, namespaces: &BTreeMap<String, NamespaceState>) -> Option<Refusal> {
    if let Some(unfit) = &pod.unfit {
        return Some(unfit.clone());
    }
    let namespace = &pod.namespace;
    match namespaces.get(namespace) {
        None => Some(Refusal {
            reason: "NamespaceNotOffloaded".to_owned(),
            message: format!("namespace {namespace} is not offloaded to this peer: run `ligo-control offload namespace {namespace}`"),
        }),
        Some(NamespaceState::Refused(reason, message)) => Some(Refusal {
            reason: reason.clone(),
            message: message.clone(),
        }),
        Some(_) => None,
    }
}

/// Why `pod`'s spec or owner keeps it off any peer, if anything does.
pub fn unfit(pod: &Value) -> Option<Refusal> {
    let refused = |reason: &str, message: String| {
        Some(Refusal {
            reason: reason.to_owned(),
            message,
        })
    };
    for (field, what) in [
        ("hostNetwork", "the node's network"),
        ("hostPID", "the node's process namespace"),
        ("hostIPC", "the node's IPC namespace"),
    ] {
        if pod.pointer(&format!("/spec/{field}")) == Some(&Value::Bool(true)) {
            return refused(
                "HostNamespaceNotOffloaded",
                format!("spec.{field} is true: a pod sharing {what} cannot run on a virtual node (it stands for another cluster); schedule it on a real node"),
            );
        }
    }
    // What would give a pod the provider's node: never asked of a peer.
    let containers = || {
        ["containers", "initContainers"].into_iter().flat_map(|l| {
            pod.pointer(&format!("/spec/{l}"))
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
        })
    };
    if let Some(c) =
        containers().find(|c| c.pointer("/securityContext/privileged") == Some(&Value::Bool(true)))
    {
        return refused(
            "PrivilegedNotOffloaded",
            format!("container {} is privileged: a peer does not run privileged pods for us; schedule it on a real node", text(c, "/name").unwrap_or("?")),
        );
    }
    if let Some(v) = pod
        .pointer("/spec/volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|v| v.get("hostPath").is_some())
    {
        return refused(
            "HostPathNotOffloaded",
            format!("volume {} is a hostPath: a peer's node files are not ours to mount; schedule it on a real node", text(v, "/name").unwrap_or("?")),
        );
    }
    if containers().any(|c| {
        c.get("ports")
            .and_then(Value::as_array)
            .is_some_and(|ports| {
                ports.iter().any(|p| {
                    p.get("hostPort")
                        .and_then(Value::as_i64)
                        .is_some_and(|h| h != 0)
                })
            })
    }) {
        return refused(
            "HostPortNotOffloaded",
            "a container asks for a hostPort: a peer's node ports are not ours; use a Service"
                .to_owned(),
        );
    }
    let owners = pod
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array);
    if let Some(ds) = owners
        .into_iter()
        .flatten()
        .find(|o| text(o, "/kind") == Some("DaemonSet"))
    {
        return refused(
            "DaemonSetPodNotOffloaded",
            format!(
                "owned by DaemonSet {}: a DaemonSet's pod serves the node it is on, and a virtual node is not a machine; exclude nodes labelled type=virtual-kubelet in its affinity",
                text(ds, "/name").unwrap_or("?")
            ),
        );
    }
    None
}

/// The provider's copy of `pod`: its spec with the scheduling fields that
/// name our nodes, our priority class and service account, and the
/// virtual node's toleration removed; everything else passed through.
pub fn copy(pod: &Value, origin: &str) -> Value {
    let meta = pod.get("metadata").cloned().unwrap_or_default();
    let mut labels = meta
        .get("labels")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    labels.insert(ORIGIN_LABEL.into(), json!(origin));
    let mut annotations = meta
        .get("annotations")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    annotations.insert(
        ORIGIN_UID_ANNOTATION.into(),
        meta.get("uid").cloned().unwrap_or(Value::Null),
    );
    let mut spec = pod
        .get("spec")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let account = spec
        .get("serviceAccountName")
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_owned();
    for field in [
        "nodeName",
        "nodeSelector",
        "affinity",
        "priority",
        "priorityClassName",
        "serviceAccount",
        "serviceAccountName",
        "ephemeralContainers",
        "preemptionPolicy",
    ] {
        spec.remove(field);
    }
    if let Some(Value::Array(tolerations)) = spec.get_mut("tolerations") {
        tolerations.retain(|t| text(t, "/key") != Some(TAINT_KEY));
    }
    // Our service account's token is ours: never sent across.
    let mut dropped = Vec::new();
    if let Some(Value::Array(volumes)) = spec.get_mut("volumes") {
        volumes.retain(|v| {
            let token_secret = text(v, "/secret/secretName")
                .is_some_and(|s| s.starts_with(&format!("{account}-token-")));
            let projected_token = v
                .pointer("/projected/sources")
                .and_then(Value::as_array)
                .is_some_and(|s| s.iter().any(|s| s.get("serviceAccountToken").is_some()));
            if token_secret || projected_token {
                dropped.push(text(v, "/name").unwrap_or_default().to_owned());
                false
            } else {
                true
            }
        });
    }
    for list in ["containers", "initContainers"] {
        for container in spec
            .get_mut(list)
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            if let Some(Value::Array(mounts)) = container.get_mut("volumeMounts") {
                mounts.retain(|m| !dropped.iter().any(|d| Some(d.as_str()) == text(m, "/name")));
            }
        }
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "labels": labels,
            "annotations": annotations,
        },
        "spec": spec,
    })
}

/// `ip` as we see it: translated from the provider's CIDR into our view,
/// or nothing when it is not in that CIDR (never a provider address).
pub fn translate(ip: &str, remote: Ipv4Network, view: Ipv4Network) -> Option<String> {
    let ip: Ipv4Addr = ip.parse().ok()?;
    if !remote.contains(ip) || remote.prefix() != view.prefix() {
        return None;
    }
    let offset = u32::from(ip) - u32::from(remote.network());
    Some(Ipv4Addr::from(u32::from(view.network()) + offset).to_string())
}

/// The pod's status as the copy's (`status`), with its addresses in our
/// view and the provider's node address left out.
fn translated_status(
    mut status: Map<String, Value>,
    remote: Ipv4Network,
    view: Ipv4Network,
) -> Map<String, Value> {
    for field in ["hostIP", "hostIPs", "nominatedNodeName"] {
        status.remove(field);
    }
    match status
        .get("podIP")
        .and_then(Value::as_str)
        .and_then(|ip| translate(ip, remote, view))
    {
        Some(ip) => {
            status.insert("podIPs".into(), json!([{ "ip": ip }]));
            status.insert("podIP".into(), json!(ip));
        }
        None => {
            status.remove("podIP");
            status.remove("podIPs");
        }
    }
    status
}

/// A merge patch restoring what was edited in the copy out of band (its
/// containers' images and our labels), if anything was.
fn restoration(pod: &PodFacts, copy_now: &PodFacts, origin: &str) -> Option<Value> {
    let mut wanted_labels = pod.labels.clone();
    wanted_labels.insert(ORIGIN_LABEL.into(), origin.into());
    let labels: Map<String, Value> = wanted_labels
        .into_iter()
        .filter(|(k, v)| copy_now.labels.get(k) != Some(v))
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    let mut patch = Map::new();
    if !labels.is_empty() {
        patch.insert("metadata".into(), json!({ "labels": labels }));
    }
    let mut spec = Map::new();
    for (list, want, now) in [
        ("containers", &pod.containers, &copy_now.containers),
        (
            "initContainers",
            &pod.init_containers,
            &copy_now.init_containers,
        ),
    ] {
        if want != now {
            let entries: Vec<Value> = want
                .iter()
                .map(|(n, i)| json!({"name": n, "image": i}))
                .collect();
            spec.insert(list.into(), Value::Array(entries));
        }
    }
    if !spec.is_empty() {
        patch.insert("spec".into(), Value::Object(spec));
    }
    (!patch.is_empty()).then_some(Value::Object(patch))
}

/// The copy's scheduling failure, once it has lasted long enough.
fn unschedulable_for_too_long(copy: &PodFacts, now: i64) -> Option<String> {
    if copy.phase().as_deref() != Some("Pending") {
        return None;
    }
    let conditions = copy.status_field("conditions")?;
    let condition = conditions
        .as_array()?
        .iter()
        .find(|c| text(c, "/type") == Some("PodScheduled"))?;
    if text(condition, "/status") != Some("False")
        || text(condition, "/reason") != Some("Unschedulable")
    {
        return None;
    }
    let since: k8s_openapi::jiff::Timestamp =
        text(condition, "/lastTransitionTime")?.parse().ok()?;
    (now - since.as_second() >= BOUNCE_AFTER_SECONDS).then(|| {
        text(condition, "/message")
            .unwrap_or("no node fits")
            .to_owned()
    })
}

/// Everything to do so that each pod bound to the virtual node runs once
/// in the provider with its status back home, and nothing runs there that
/// no pod here stands for.
pub fn plan<P: Borrow<PodFacts>, C: Borrow<PodFacts>>(
    pods: &[P],
    copies: &[C],
    ctx: &Context,
) -> Vec<Action> {
    let copies_by_key: BTreeMap<(&str, &str), &PodFacts> = copies
        .iter()
        .map(Borrow::borrow)
        .map(|c| ((c.namespace.as_str(), c.name.as_str()), c))
        .collect();
    let mut actions = Vec::new();
    let mut wanted = std::collections::BTreeSet::new();
    for pod in pods.iter().map(Borrow::borrow) {
        let (namespace, name) = pod.key();
        let uid = pod.uid.as_str();
        let copy = copies_by_key
            .get(&(namespace.as_str(), name.as_str()))
            .copied();
        let delete_copy = |c: &PodFacts, grace: Option<i64>| Action::DeleteRemote {
            namespace: namespace.clone(),
            name: name.clone(),
            uid: c.uid.clone(),
            grace_seconds: grace,
        };
        let ours = copy.filter(|c| c.origin_uid.as_deref() == Some(uid));
        if ours.is_some() {
            wanted.insert((namespace.clone(), name.clone()));
        }
        if let Some(grace) = pod.deletion {
            match ours {
                Some(c) if !c.deleting() => actions.push(delete_copy(c, grace)),
                Some(_) => {}
                // Its copies are not known yet: a copy may still run.
                None if ctx.namespaces.get(&namespace) == Some(&NamespaceState::Waiting) => {}
                None => actions.push(Action::FinishDelete(namespace, name, uid.to_owned())),
            }
            continue;
        }
        if let Some(refusal) = refusal(pod, ctx.namespaces) {
            if let Some(c) = ours {
                actions.push(delete_copy(c, None));
            }
            if pod.status_text("reason").as_deref() != Some(refusal.reason.as_str()) {
                // A pod that ran there (its namespace was un-offloaded)
                // fails, so its controller places it anew; one that never
                // ran waits, refused.
                if pod.phase().as_deref() == Some("Running") {
                    actions.push(Action::Bounce(namespace, name, refusal));
                } else if !pod.terminal() {
                    actions.push(Action::Refuse(namespace, name, refusal));
                }
            }
            continue;
        }
        if ctx.namespaces.get(&namespace) != Some(&NamespaceState::Ready) {
            continue; // asked for, not granted yet: wait
        }
        match ours {
            // A terminal phase is final: never run again.
            _ if pod.terminal() => {}
            // A copy of an older pod of this name: created once it is gone.
            None if copy.is_some() => {}
            None => actions.push(Action::CreateRemote(namespace, name, uid.to_owned())),
            Some(c) if c.deleting() => {} // being deleted there: re-created once gone
            Some(c) => {
                if let Some(message) = unschedulable_for_too_long(c, ctx.now) {
                    actions.push(delete_copy(c, None));
                    actions.push(Action::Bounce(
                        namespace,
                        name,
                        Refusal {
                            reason: "OffloadUnschedulable".into(),
                            message: format!(
                                "the provider could not schedule this pod for {BOUNCE_AFTER_SECONDS} s: {message}"
                            ),
                        },
                    ));
                    continue;
                }
                if let Some(patch) = restoration(pod, c, ctx.origin) {
                    actions.push(Action::RestoreRemote(
                        namespace.clone(),
                        name.clone(),
                        patch,
                    ));
                }
                let status = translated_status(c.status_map(), ctx.remote_cidr, ctx.view);
                let mut diff: Map<String, Value> = status
                    .iter()
                    .filter(|(k, v)| !pod.status_holds(k, v))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                // A reason left by an earlier refusal goes with it.
                for field in ["reason", "message"] {
                    if pod.status.contains_key(field) && !status.contains_key(field) {
                        diff.insert(field.into(), Value::Null);
                    }
                }
                if !diff.is_empty() {
                    actions.push(Action::PatchStatus(namespace, name, Value::Object(diff)));
                }
            }
        }
    }
    // Copies no pod here stands for (its pod is gone, or it is a copy of
    // an older pod of the same name).
    for c in copies.iter().map(Borrow::borrow) {
        if !wanted.contains(&c.key()) && !c.deleting() {
            actions.push(Action::DeleteRemote {
                namespace: c.namespace.clone(),
                name: c.name.clone(),
                uid: c.uid.clone(),
                grace_seconds: None,
            });
        }
    }
    actions
}

/// A status patch written to a pod, and the pod's status as the server
/// answered it (what it kept of the patch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub patch: u64,
    pub status_after: u64,
}

pub fn patch_digest(patch: &Value) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    patch.to_string().hash(&mut h);
    h.finish()
}

/// Whether `patch` was written already and the pod's status is still what
/// the server made of it: a server that drops a field (older than the
/// provider's, or a webhook's rule) would otherwise be sent the same patch
/// on every pass. A change on either side sends it again.
pub fn already_written(pod: &PodFacts, patch: &Value, written: Option<&Written>) -> bool {
    written.is_some_and(|w| w.patch == patch_digest(patch) && w.status_after == pod.status_digest())
}

/// How long a provider may stay unreadable before its pods are reported
/// NotReady here: the node lifecycle controller's default grace period
/// (`--node-monitor-grace-period`), after which it would act on a silent
/// kubelet's pods the same way.
pub const PROVIDER_GRACE_SECONDS: u64 = 40;

/// The status patch that reports `pod` NotReady because the provider
/// cannot be read, if it is Ready now (its containers may well still run:
/// nothing else changes, and the next read of the provider restores it).
pub fn not_ready_patch(pod: &PodFacts, why: &str, now: &str) -> Option<Value> {
    if pod.terminal() || pod.deleting() {
        return None;
    }
    let conditions = pod.status_field("conditions")?;
    let conditions = conditions.as_array()?;
    let ready = |c: &Value| matches!(text(c, "/type"), Some("Ready" | "ContainersReady"));
    if !conditions
        .iter()
        .any(|c| ready(c) && text(c, "/status") == Some("True"))
    {
        return None;
    }
    let updated: Vec<Value> = conditions
        .iter()
        .map(|c| {
            if ready(c) {
                json!({"type": c["type"], "status": "False", "reason": "ProviderUnreachable",
                    "message": why, "lastTransitionTime": now, "lastProbeTime": null})
            } else {
                c.clone()
            }
        })
        .collect();
    Some(json!({ "conditions": updated }))
}

#[cfg(test)]
#[path = "pods_tests.rs"]
mod tests;
