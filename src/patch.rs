//! The JSON patch from a StatefulSet before injection to the same StatefulSet after.
//!
//! Built from what the engine can change (pod-management policy, pod-template annotations,
//! the service account, containers, init containers, volumes), comparing typed values first and
//! serializing only the parts that differ. This keeps the webhook's hot path small (a generic
//! diff of two whole serialized objects costs several times the injection itself), and the
//! operations address single fields, so fields this build does not know survive in the raw
//! object. `tests/inject_engine.rs` checks as a property that the patch applied to the input
//! equals the engine's output.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::PodSpec;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use std::collections::BTreeMap;

/// One RFC 6902 operation (only the kinds we emit). Values are kept as serialized JSON:
/// serializing straight to text is several times cheaper than building `Value` trees.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum PatchOp {
    Add { path: String, value: Box<RawValue> },
    Remove { path: String },
    Replace { path: String, value: Box<RawValue> },
}

impl PartialEq for PatchOp {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Add { path: a, value: x }, Self::Add { path: b, value: y })
            | (Self::Replace { path: a, value: x }, Self::Replace { path: b, value: y }) => {
                a == b && x.get() == y.get()
            }
            (Self::Remove { path: a }, Self::Remove { path: b }) => a == b,
            _ => false,
        }
    }
}

/// Escapes one JSON-pointer token (RFC 6901).
fn token(key: &str) -> std::borrow::Cow<'_, str> {
    if key.contains(['~', '/']) {
        key.replace('~', "~0").replace('/', "~1").into()
    } else {
        key.into()
    }
}

/// Generic structural diff of two JSON values at `path`: objects by key, arrays by index.
pub fn diff_values(before: &Value, after: &Value, path: &str, ops: &mut Vec<PatchOp>) {
    if before == after {
        return;
    }
    match (before, after) {
        (Value::Object(b), Value::Object(a)) => {
            for (key, old) in b {
                if !a.contains_key(key) {
                    let _ = old;
                    ops.push(PatchOp::Remove {
                        path: format!("{path}/{}", token(key)),
                    });
                }
            }
            for (key, new) in a {
                let child = format!("{path}/{}", token(key));
                match b.get(key) {
                    Some(old) => diff_values(old, new, &child, ops),
                    None => ops.push(PatchOp::Add {
                        path: child,
                        value: raw(new),
                    }),
                }
            }
        }
        (Value::Array(b), Value::Array(a)) => diff_arrays(b, a, path, ops, diff_values),
        _ => ops.push(PatchOp::Replace {
            path: path.to_string(),
            value: raw(after),
        }),
    }
}

/// Index-wise diff of two lists: changed items in place, then appends, then trailing removals
/// (from the end, so indices stay valid while the patch applies).
fn diff_arrays<T>(
    before: &[T],
    after: &[T],
    path: &str,
    ops: &mut Vec<PatchOp>,
    mut diff_item: impl FnMut(&T, &T, &str, &mut Vec<PatchOp>),
) where
    T: PartialEq + Serialize,
{
    for (i, (old, new)) in before.iter().zip(after).enumerate() {
        if old != new {
            diff_item(old, new, &format!("{path}/{i}"), ops);
        }
    }
    for (i, new) in after.iter().enumerate().skip(before.len()) {
        ops.push(PatchOp::Add {
            path: format!("{path}/{i}"),
            value: raw(new),
        });
    }
    for i in (after.len()..before.len()).rev() {
        ops.push(PatchOp::Remove {
            path: format!("{path}/{i}"),
        });
    }
}

fn raw<T: Serialize + ?Sized>(value: &T) -> Box<RawValue> {
    // k8s-openapi types always serialize (no maps with non-string keys); `null` is unreachable.
    serde_json::value::to_raw_value(value)
        .unwrap_or_else(|_| RawValue::from_string("null".into()).expect("null is JSON"))
}

/// Field-level diff of two serializable objects: each top-level field that differs becomes
/// one operation carrying the new field whole. Fields are compared as serialized text.
fn diff_fields<T: Serialize>(before: &T, after: &T, path: &str, ops: &mut Vec<PatchOp>) {
    let (b, a) = (raw(before), raw(after));
    fn parse(r: &RawValue) -> Option<BTreeMap<&str, &RawValue>> {
        serde_json::from_str(r.get()).ok()
    }
    let (Some(bf), Some(af)) = (parse(&b), parse(&a)) else {
        if b.get() != a.get() {
            ops.push(PatchOp::Replace {
                path: path.to_string(),
                value: a,
            });
        }
        return;
    };
    for key in bf.keys().filter(|k| !af.contains_key(*k)) {
        ops.push(PatchOp::Remove {
            path: format!("{path}/{}", token(key)),
        });
    }
    for (key, new) in &af {
        let child = format!("{path}/{}", token(key));
        match bf.get(key) {
            Some(old) if old.get() == new.get() => {}
            Some(_) => ops.push(PatchOp::Replace {
                path: child,
                value: raw(new),
            }),
            None => ops.push(PatchOp::Add {
                path: child,
                value: raw(new),
            }),
        }
    }
}

/// Diffs two optional typed fields at `path`, serializing only when they differ.
fn diff_field<T: PartialEq + Serialize>(
    before: &Option<T>,
    after: &Option<T>,
    path: &str,
    ops: &mut Vec<PatchOp>,
) {
    match (before, after) {
        (Some(b), Some(a)) if b != a => diff_fields(b, a, path, ops),
        (None, Some(a)) => ops.push(PatchOp::Add {
            path: path.to_string(),
            value: raw(a),
        }),
        (Some(_), None) => ops.push(PatchOp::Remove {
            path: path.to_string(),
        }),
        _ => {}
    }
}

/// Diffs an optional list item by item, so unchanged items are never serialized.
fn diff_list<T: PartialEq + Serialize>(
    before: &Option<Vec<T>>,
    after: &Option<Vec<T>>,
    path: &str,
    ops: &mut Vec<PatchOp>,
) {
    match (before, after) {
        (Some(b), Some(a)) => diff_arrays(b, a, path, ops, diff_fields),
        _ => diff_field(before, after, path, ops),
    }
}

fn diff_pod_spec(before: &PodSpec, after: &PodSpec, path: &str, ops: &mut Vec<PatchOp>) {
    diff_field(
        &before.service_account_name,
        &after.service_account_name,
        &format!("{path}/serviceAccountName"),
        ops,
    );
    diff_list(
        &before.volumes,
        &after.volumes,
        &format!("{path}/volumes"),
        ops,
    );
    diff_list(
        &before.init_containers,
        &after.init_containers,
        &format!("{path}/initContainers"),
        ops,
    );
    diff_arrays(
        &before.containers,
        &after.containers,
        &format!("{path}/containers"),
        ops,
        diff_fields,
    );
}

/// The patch turning `before` into `after`, for the fields the injection engine changes.
pub fn statefulset_patch(before: &StatefulSet, after: &StatefulSet) -> Vec<PatchOp> {
    let mut ops = Vec::new();
    let (Some(b), Some(a)) = (before.spec.as_ref(), after.spec.as_ref()) else {
        diff_field(&before.spec, &after.spec, "/spec", &mut ops);
        return ops;
    };
    diff_field(
        &b.pod_management_policy,
        &a.pod_management_policy,
        "/spec/podManagementPolicy",
        &mut ops,
    );
    diff_field(
        &b.template.metadata,
        &a.template.metadata,
        "/spec/template/metadata",
        &mut ops,
    );
    match (&b.template.spec, &a.template.spec) {
        (Some(bp), Some(ap)) => diff_pod_spec(bp, ap, "/spec/template/spec", &mut ops),
        (bp, ap) => diff_field(bp, ap, "/spec/template/spec", &mut ops),
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn apply(mut doc: Value, ops: &[PatchOp]) -> Value {
        let patch: json_patch::Patch =
            serde_json::from_str(&serde_json::to_string(ops).unwrap()).unwrap();
        json_patch::patch(&mut doc, &patch).unwrap();
        doc
    }

    #[test]
    fn generic_diff_round_trips_objects_arrays_and_escaped_keys() {
        let before = json!({"a": 1, "b": [1, 2, 3], "c/d": {"x~y": true}, "gone": 0});
        let after = json!({"a": 2, "b": [1, 5], "c/d": {"x~y": false, "new": []}, "e": "s"});
        let mut ops = Vec::new();
        diff_values(&before, &after, "", &mut ops);
        assert_eq!(apply(before, &ops), after);
        assert!(ops.contains(&PatchOp::Replace {
            path: "/c~1d/x~0y".into(),
            value: raw(&json!(false))
        }));
    }

    #[test]
    fn equal_values_give_no_operations() {
        let mut ops = Vec::new();
        diff_values(&json!({"a": [1]}), &json!({"a": [1]}), "", &mut ops);
        assert!(ops.is_empty());
    }
}
