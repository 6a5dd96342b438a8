//! What offloaded pods need besides themselves, reflected into the
//! provider: the ConfigMaps and Secrets they refer to (by reference only:
//! never a whole namespace, never a service-account token or a Helm
//! release), and the Services of offloaded namespaces with their
//! endpoints in the provider's terms, so an offloaded pod reaches a home
//! Service by its usual name. Every copy carries our origin label and a
//! hash of what it was made from; a same-named object without the label is
//! never touched.

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::{DefaultHasher, Hash, Hasher},
    net::Ipv4Addr,
};

use ipnetwork::Ipv4Network;
use serde_json::{json, Map, Value};

use crate::crd::ORIGIN_LABEL;

/// The hash of what a copy was made from.
pub const ORIGIN_HASH_ANNOTATION: &str = "ligo.io/origin-hash";
/// The EndpointSlice owner tag a provider's controllers leave alone.
pub const SLICE_MANAGER: &str = "ligo.io/ligo-control";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    ConfigMap,
    Secret,
    Service,
    Endpoints,
    EndpointSlice,
}

/// (kind, namespace, name).
pub type Key = (Kind, String, String);

fn text<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

/// The ConfigMaps and Secrets `pod` refers to (env, envFrom, volumes,
/// projected volumes, imagePullSecrets), in its namespace.
pub fn references(pod: &Value) -> BTreeSet<Key> {
    let ns = text(pod, "/metadata/namespace")
        .unwrap_or_default()
        .to_owned();
    let mut out = BTreeSet::new();
    let mut add = |kind: Kind, name: Option<&str>| {
        if let Some(name) = name.filter(|n| !n.is_empty()) {
            out.insert((kind, ns.clone(), name.to_owned()));
        }
    };
    let spec = &pod["spec"];
    for list in ["containers", "initContainers"] {
        for c in spec[list].as_array().into_iter().flatten() {
            for env in c["env"].as_array().into_iter().flatten() {
                add(
                    Kind::ConfigMap,
                    text(env, "/valueFrom/configMapKeyRef/name"),
                );
                add(Kind::Secret, text(env, "/valueFrom/secretKeyRef/name"));
            }
            for from in c["envFrom"].as_array().into_iter().flatten() {
                add(Kind::ConfigMap, text(from, "/configMapRef/name"));
                add(Kind::Secret, text(from, "/secretRef/name"));
            }
        }
    }
    for v in spec["volumes"].as_array().into_iter().flatten() {
        add(Kind::ConfigMap, text(v, "/configMap/name"));
        add(Kind::Secret, text(v, "/secret/secretName"));
        for source in v
            .pointer("/projected/sources")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            add(Kind::ConfigMap, text(source, "/configMap/name"));
            add(Kind::Secret, text(source, "/secret/name"));
        }
    }
    for s in spec["imagePullSecrets"].as_array().into_iter().flatten() {
        add(Kind::Secret, text(s, "/name"));
    }
    out
}

/// Why a Secret is never sent across, if it is not: tokens are this
/// cluster's credentials, Helm releases its bookkeeping. Judged from the
/// type when known, else from the marks both leave in metadata.
pub fn never_reflected(secret: &Value) -> Option<&'static str> {
    let secret_type = text(secret, "/type").unwrap_or_default();
    let token = secret_type == "kubernetes.io/service-account-token"
        || secret
            .pointer("/metadata/annotations/kubernetes.io~1service-account.name")
            .is_some();
    let helm = secret_type.starts_with("helm.sh/release")
        || text(secret, "/metadata/labels/owner") == Some("helm");
    if token {
        Some("a service-account token is this cluster's credential")
    } else if helm {
        Some("a Helm release record is this cluster's bookkeeping")
    } else {
        None
    }
}

/// A stable hash of what a copy is made from.
pub fn hash_of(value: &Value) -> String {
    let mut h = DefaultHasher::new();
    value.to_string().hash(&mut h);
    format!("{:016x}", h.finish())
}

fn meta(local: &Value, origin: &str, extra_labels: &[(&str, &str)], hash: &str) -> Value {
    let mut labels: Map<String, Value> = local
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    labels.insert(ORIGIN_LABEL.into(), json!(origin));
    for (k, v) in extra_labels {
        labels.insert((*k).into(), json!(v));
    }
    json!({
        "name": local["metadata"]["name"],
        "namespace": local["metadata"]["namespace"],
        "labels": labels,
        "annotations": {ORIGIN_HASH_ANNOTATION: hash},
    })
}

/// The provider's copy of a ConfigMap or Secret.
pub fn config_copy(local: &Value, origin: &str) -> Value {
    let mut body = Map::new();
    for field in ["data", "binaryData", "type", "immutable"] {
        if let Some(v) = local.get(field) {
            body.insert(field.into(), v.clone());
        }
    }
    let body = Value::Object(body);
    let hash = hash_of(&body);
    let mut copy = body;
    copy["apiVersion"] = json!("v1");
    copy["kind"] = local["kind"].clone();
    copy["metadata"] = meta(local, origin, &[], &hash);
    copy
}

/// The provider's copy of a Service: its ports and type, without a
/// selector (we write its endpoints) or anything the provider allocates.
pub fn service_copy(local: &Value, origin: &str) -> Value {
    let spec = &local["spec"];
    let ports: Vec<Value> = spec["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let mut p = p.clone();
            if let Some(o) = p.as_object_mut() {
                o.remove("nodePort");
            }
            p
        })
        .collect();
    let headless = text(spec, "/clusterIP") == Some("None");
    let external = text(spec, "/type") == Some("ExternalName");
    let mut body = json!({"ports": ports});
    if headless {
        body["clusterIP"] = json!("None");
    }
    if external {
        body["type"] = json!("ExternalName");
        body["externalName"] = spec["externalName"].clone();
    }
    if let Some(affinity) = spec.get("sessionAffinity") {
        body["sessionAffinity"] = affinity.clone();
    }
    let hash = hash_of(&body);
    json!({"apiVersion": "v1", "kind": "Service", "metadata": meta(local, origin, &[], &hash), "spec": body})
}

/// How an address of ours is reached from the provider: our pods through
/// its view of us, offloaded pods (which are its own) at their real
/// address; anything else (node addresses, hostNetwork pods) not at all.
#[derive(Debug, Clone, Copy)]
pub struct AddressMap {
    pub our_cidr: Ipv4Network,
    /// The provider's view of our pod CIDR.
    pub our_cidr_there: Ipv4Network,
    /// Our view of the provider's pod CIDR, and its real one.
    pub view: Ipv4Network,
    pub remote_cidr: Ipv4Network,
}

fn shift(ip: Ipv4Addr, from: Ipv4Network, to: Ipv4Network) -> Option<Ipv4Addr> {
    (from.contains(ip) && from.prefix() == to.prefix()).then(|| {
        Ipv4Addr::from(u32::from(to.network()) + (u32::from(ip) - u32::from(from.network())))
    })
}

impl AddressMap {
    pub fn there(&self, ip: &str) -> Option<String> {
        let ip: Ipv4Addr = ip.parse().ok()?;
        // A view may equal our CIDR's range only when it does not overlap
        // it, so the order of these checks does not matter.
        shift(ip, self.view, self.remote_cidr)
            .or_else(|| shift(ip, self.our_cidr, self.our_cidr_there))
            .map(|a| a.to_string())
    }
}

fn translated_addresses(list: Option<&Value>, map: &AddressMap) -> Vec<Value> {
    list.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|a| {
            let ip = map.there(text(a, "/ip")?)?;
            let mut out = json!({"ip": ip});
            if let Some(h) = a.get("hostname") {
                out["hostname"] = h.clone();
            }
            Some(out)
        })
        .collect()
}

/// The provider's copy of a Service's core/v1 Endpoints.
pub fn endpoints_copy(local: &Value, origin: &str, map: &AddressMap) -> Value {
    let subsets: Vec<Value> = local["subsets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| {
            let ready = translated_addresses(s.get("addresses"), map);
            let not_ready = translated_addresses(s.get("notReadyAddresses"), map);
            if ready.is_empty() && not_ready.is_empty() {
                return None;
            }
            let mut out = json!({"ports": s["ports"]});
            if !ready.is_empty() {
                out["addresses"] = json!(ready);
            }
            if !not_ready.is_empty() {
                out["notReadyAddresses"] = json!(not_ready);
            }
            Some(out)
        })
        .collect();
    let body = json!({"subsets": subsets});
    let hash = hash_of(&body);
    let mut copy = body;
    copy["apiVersion"] = json!("v1");
    copy["kind"] = json!("Endpoints");
    copy["metadata"] = meta(local, origin, &[], &hash);
    copy
}

/// The same endpoints as discovery.k8s.io/v1 EndpointSlices, for
/// providers that serve them: one per port set (a slice has one list of
/// ports; an Endpoints subset is one port set), named after the Service
/// (`<service>-ligo`, then `-ligo-1`, …) and owned by us. A Service with
/// no endpoints gets one empty slice.
pub fn endpoint_slice_copies(local: &Value, origin: &str, map: &AddressMap) -> Vec<Value> {
    let service = text(local, "/metadata/name").unwrap_or_default();
    let mut slices: Vec<(Vec<Value>, Value)> = Vec::new();
    for s in local["subsets"].as_array().into_iter().flatten() {
        let mut endpoints = Vec::new();
        for (list, ready) in [("addresses", true), ("notReadyAddresses", false)] {
            for a in translated_addresses(s.get(list), map) {
                endpoints.push(json!({"addresses": [a["ip"]], "conditions": {"ready": ready}}));
            }
        }
        if !endpoints.is_empty() {
            let ports = s.get("ports").cloned().unwrap_or_else(|| json!([]));
            slices.push((endpoints, ports));
        }
    }
    if slices.is_empty() {
        slices.push((Vec::new(), json!([])));
    }
    slices
        .into_iter()
        .enumerate()
        .map(|(i, (endpoints, ports))| {
            let body = json!({"addressType": "IPv4", "endpoints": endpoints, "ports": ports});
            let hash = hash_of(&body);
            let mut copy = body;
            copy["apiVersion"] = json!("discovery.k8s.io/v1");
            copy["kind"] = json!("EndpointSlice");
            copy["metadata"] = meta(
                local,
                origin,
                &[
                    ("kubernetes.io/service-name", service),
                    ("endpointslice.kubernetes.io/managed-by", SLICE_MANAGER),
                ],
                &hash,
            );
            copy["metadata"]["name"] = json!(match i {
                0 => format!("{service}-ligo"),
                i => format!("{service}-ligo-{i}"),
            });
            copy
        })
        .collect()
}

/// What a provider holds under a key, as its metadata says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// It carries our origin label (else it is not ours to touch).
    pub ours: bool,
    pub hash: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ReflectAction {
    /// Create or replace the copy (the object to write).
    Put(Key, Value),
    Delete(Key),
    /// An object of that name there is not ours: left alone, reported.
    Conflict(Key),
}

/// Brings the provider's copies to `wanted` (key → the copy to hold);
/// `keep` are copies whose source could not be read this time: neither
/// written nor deleted (a failed read is not a deletion).
pub fn plan(
    wanted: &BTreeMap<Key, Value>,
    held: &BTreeMap<Key, Held>,
    keep: &BTreeSet<Key>,
) -> Vec<ReflectAction> {
    let mut actions = Vec::new();
    for (key, copy) in wanted {
        let hash = text(
            copy,
            &format!(
                "/metadata/annotations/{}",
                ORIGIN_HASH_ANNOTATION.replace('/', "~1")
            ),
        );
        match held.get(key) {
            None => actions.push(ReflectAction::Put(key.clone(), copy.clone())),
            Some(h) if !h.ours => actions.push(ReflectAction::Conflict(key.clone())),
            Some(h) if h.hash.as_deref() != hash => {
                actions.push(ReflectAction::Put(key.clone(), copy.clone()))
            }
            Some(_) => {}
        }
    }
    for (key, h) in held {
        if h.ours && !wanted.contains_key(key) && !keep.contains(key) {
            actions.push(ReflectAction::Delete(key.clone()));
        }
    }
    actions
}

#[cfg(test)]
#[path = "reflect_tests.rs"]
mod tests;
