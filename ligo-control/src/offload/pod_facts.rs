//! What the controller keeps of a pod bound to a virtual node, or of its
//! copy in the provider: only what [`super::pods::plan`] and the reflection
//! read, made once as each object arrives. Thousands of mirrored pods are
//! the largest thing the controller holds; a pod kept whole costs ~20 KiB
//! in memory (a 2.6 KB object as parsed JSON), its facts ~2 KiB. A copy is
//! made from the pod read whole when it is needed.

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::{DefaultHasher, Hash, Hasher},
};

use serde_json::{Map, Value};

use super::{
    pods::{unfit, Refusal, ORIGIN_UID_ANNOTATION},
    reflect::{self, Key},
};

/// Containers' (name, image), in order.
pub type Images = Vec<(String, String)>;

#[derive(Debug, Clone, PartialEq, Default)]
pub struct PodFacts {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// On a copy: the UID of the pod it was made from.
    pub origin_uid: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Set once its deletion began, with the grace period asked, if any.
    pub deletion: Option<Option<i64>>,
    /// Why its spec or owner keeps it off any peer (namespace aside).
    pub unfit: Option<Refusal>,
    /// `spec.containers` and `spec.initContainers`.
    pub containers: Images,
    pub init_containers: Images,
    /// The ConfigMaps and Secrets it refers to.
    pub references: BTreeSet<Key>,
    /// Each field of `status` as compact JSON: serde_json's maps are sorted,
    /// so equal values have equal texts whatever order a server wrote.
    pub status: BTreeMap<String, Box<str>>,
}

fn text(v: &Value, pointer: &str) -> Option<String> {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .map(str::to_owned)
}

fn images(pod: &Value, list: &str) -> Images {
    pod.pointer(&format!("/spec/{list}"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|c| {
            (
                text(c, "/name").unwrap_or_default(),
                text(c, "/image").unwrap_or_default(),
            )
        })
        .collect()
}

impl PodFacts {
    pub fn of(pod: &Value) -> PodFacts {
        let deleting = pod
            .pointer("/metadata/deletionTimestamp")
            .is_some_and(|t| !t.is_null());
        PodFacts {
            namespace: text(pod, "/metadata/namespace").unwrap_or_default(),
            name: text(pod, "/metadata/name").unwrap_or_default(),
            uid: text(pod, "/metadata/uid").unwrap_or_default(),
            origin_uid: text(
                pod,
                &format!(
                    "/metadata/annotations/{}",
                    ORIGIN_UID_ANNOTATION.replace('/', "~1")
                ),
            ),
            labels: pod
                .pointer("/metadata/labels")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect(),
            deletion: deleting.then(|| {
                pod.pointer("/metadata/deletionGracePeriodSeconds")
                    .and_then(Value::as_i64)
            }),
            unfit: unfit(pod),
            containers: images(pod, "containers"),
            init_containers: images(pod, "initContainers"),
            references: reflect::references(pod),
            status: pod
                .get("status")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), v.to_string().into_boxed_str()))
                .collect(),
        }
    }

    pub fn key(&self) -> (String, String) {
        (self.namespace.clone(), self.name.clone())
    }

    pub fn deleting(&self) -> bool {
        self.deletion.is_some()
    }

    /// A field of its status, parsed.
    pub fn status_field(&self, field: &str) -> Option<Value> {
        serde_json::from_str(self.status.get(field)?).ok()
    }

    /// A text field of its status (`phase`, `reason`).
    pub fn status_text(&self, field: &str) -> Option<String> {
        match self.status_field(field)? {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn phase(&self) -> Option<String> {
        self.status_text("phase")
    }

    pub fn terminal(&self) -> bool {
        matches!(self.phase().as_deref(), Some("Succeeded" | "Failed"))
    }

    /// Its whole status, parsed.
    pub fn status_map(&self) -> Map<String, Value> {
        self.status
            .keys()
            .filter_map(|k| Some((k.clone(), self.status_field(k)?)))
            .collect()
    }

    /// A digest of its whole status (equal statuses, equal digests).
    pub fn status_digest(&self) -> u64 {
        let mut h = DefaultHasher::new();
        self.status.hash(&mut h);
        h.finish()
    }

    /// Whether its status holds `value` at `field` as is.
    pub fn status_holds(&self, field: &str, value: &Value) -> bool {
        self.status.get(field).map(|t| &**t) == Some(value.to_string().as_str())
    }
}
