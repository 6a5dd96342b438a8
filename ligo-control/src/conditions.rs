//! Conditions as Kubernetes users read them: a summary `Ready` beside one
//! condition per concern, `lastTransitionTime` moved only when the status
//! changes, `observedGeneration` always the generation they were computed
//! for.

use crate::crd::Condition;

/// One condition as a reconcile computes it (no timestamp yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub type_: &'static str,
    pub ok: bool,
    /// CamelCase.
    pub reason: String,
    /// What is wrong and what to do, naming the object and the field.
    pub message: String,
}

impl Verdict {
    pub fn ok(type_: &'static str, reason: &str, message: impl Into<String>) -> Self {
        Self {
            type_,
            ok: true,
            reason: reason.to_owned(),
            message: message.into(),
        }
    }

    pub fn failed(type_: &'static str, reason: &str, message: impl Into<String>) -> Self {
        Self {
            type_,
            ok: false,
            reason: reason.to_owned(),
            message: message.into(),
        }
    }
}

/// `Ready`: true when every verdict is; otherwise it carries the first
/// failure's reason and message, so `kubectl get` shows what to fix.
pub fn summary(verdicts: &[Verdict]) -> Verdict {
    match verdicts.iter().find(|v| !v.ok) {
        Some(first) => Verdict::failed("Ready", &first.reason, first.message.clone()),
        None => Verdict::ok("Ready", "Ready", "all conditions are met"),
    }
}

/// The condition list for `verdicts` (in their order), keeping each
/// previous `lastTransitionTime` where the status did not change.
pub fn merge(
    previous: &[Condition],
    verdicts: &[Verdict],
    generation: Option<i64>,
    now: &str,
) -> Vec<Condition> {
    verdicts
        .iter()
        .map(|v| {
            let status = if v.ok { "True" } else { "False" };
            let last_transition_time = previous
                .iter()
                .find(|c| c.type_ == v.type_ && c.status == status)
                .map_or_else(|| now.to_owned(), |c| c.last_transition_time.clone());
            Condition {
                type_: v.type_.to_owned(),
                status: status.to_owned(),
                reason: v.reason.clone(),
                message: v.message.clone(),
                last_transition_time,
                observed_generation: generation,
            }
        })
        .collect()
}

/// Whether condition `type_` is `True` in `conditions`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

/// Conditions equal but for their timestamps (a status write is skipped
/// when nothing else changed).
pub fn same_apart_from_time(a: &[Condition], b: &[Condition]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.type_ == y.type_
                && x.status == y.status
                && x.reason == y.reason
                && x.message == y.message
                && x.observed_generation == y.observed_generation
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_when_the_status_changes() {
        let first = merge(
            &[],
            &[Verdict::failed("ViewAllocated", "PoolsExhausted", "full")],
            Some(1),
            "2026-01-01T00:00:00Z",
        );
        assert_eq!(first[0].last_transition_time, "2026-01-01T00:00:00Z");
        assert_eq!(first[0].status, "False");

        // Same status, new message and generation: the time stays.
        let again = merge(
            &first,
            &[Verdict::failed(
                "ViewAllocated",
                "PoolsExhausted",
                "still full",
            )],
            Some(2),
            "2026-01-01T00:05:00Z",
        );
        assert_eq!(again[0].last_transition_time, "2026-01-01T00:00:00Z");
        assert_eq!(again[0].message, "still full");
        assert_eq!(again[0].observed_generation, Some(2));

        // The status flips: the time moves.
        let flipped = merge(
            &again,
            &[Verdict::ok("ViewAllocated", "Allocated", "10.1.0.0/16")],
            Some(2),
            "2026-01-01T00:09:00Z",
        );
        assert_eq!(flipped[0].last_transition_time, "2026-01-01T00:09:00Z");
        assert_eq!(flipped[0].status, "True");
    }

    #[test]
    fn ready_carries_the_first_failure() {
        let verdicts = [
            Verdict::ok("Valid", "Valid", ""),
            Verdict::failed("ViewAllocated", "PoolsExhausted", "no block"),
            Verdict::failed("TunnelEstablished", "NoHandshake", "silent"),
        ];
        let ready = summary(&verdicts);
        assert!(!ready.ok);
        assert_eq!(ready.reason, "PoolsExhausted");
        assert_eq!(ready.message, "no block");
        assert!(summary(&verdicts[..1]).ok);
    }
}
