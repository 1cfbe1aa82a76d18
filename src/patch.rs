//! The JSON patch from a StatefulSet before injection to the same StatefulSet after.
//!
//! Built from what the engine can change (pod-management policy, pod-template annotations,
//! the service account, containers, init containers, volumes), comparing typed values first and
//! serializing only the parts that differ (a generic diff of two whole serialized objects costs
//! several times the injection itself). The operations address single fields, so fields this
//! build does not know survive in the raw object. `inject` and reviews off the webhook's hot
//! path use it; the hot path (`admission::lean`) writes its patch as text from the plan.
//! `tests/inject_engine.rs` checks as a property that both patches, applied to the input, equal
//! the engine's output.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
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

/// The patch as JSON text. Written directly: only the paths need escaping, the values are JSON
/// already, and the derived serializer spent most of its time scanning the fixed keys.
pub fn to_json(ops: &[PatchOp]) -> Vec<u8> {
    let size: usize = ops
        .iter()
        .map(|op| match op {
            PatchOp::Add { path, value } | PatchOp::Replace { path, value } => {
                path.len() + value.get().len() + 40
            }
            PatchOp::Remove { path } => path.len() + 30,
        })
        .sum();
    let mut out = Vec::with_capacity(size + 2);
    out.push(b'[');
    for (i, op) in ops.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let (name, path, value) = match op {
            PatchOp::Add { path, value } => ("add", path, Some(value)),
            PatchOp::Replace { path, value } => ("replace", path, Some(value)),
            PatchOp::Remove { path } => ("remove", path, None),
        };
        out.extend_from_slice(br#"{"op":""#);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(br#"","path":"#);
        // Writing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut out, path);
        if let Some(value) = value {
            out.extend_from_slice(br#","value":"#);
            out.extend_from_slice(value.get().as_bytes());
        }
        out.push(b'}');
    }
    out.push(b']');
    out
}

/// Escapes one JSON-pointer token (RFC 6901).
pub(crate) fn token(key: &str) -> std::borrow::Cow<'_, str> {
    if key.contains(['~', '/']) {
        key.replace('~', "~0").replace('/', "~1").into()
    } else {
        key.into()
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

pub(crate) fn raw<T: Serialize + ?Sized>(value: &T) -> Box<RawValue> {
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

/// A struct field as the patch sees it: absent (`None`, omitted when serialized) or present.
trait Member {
    type Value: PartialEq + Serialize;
    fn present(&self) -> Option<&Self::Value>;
}

impl<T: PartialEq + Serialize> Member for Option<T> {
    type Value = T;
    fn present(&self) -> Option<&T> {
        self.as_ref()
    }
}

impl Member for String {
    type Value = String;
    fn present(&self) -> Option<&String> {
        Some(self)
    }
}

/// Diffs one member of a struct at `path/key`; the value is serialized only when it differs.
fn diff_member<M: Member>(before: &M, after: &M, path: &str, key: &str, ops: &mut Vec<PatchOp>) {
    match (before.present(), after.present()) {
        (Some(b), Some(a)) if b == a => {}
        (None, None) => {}
        (Some(_), Some(a)) => ops.push(PatchOp::Replace {
            path: format!("{path}/{key}"),
            value: raw(a),
        }),
        (None, Some(a)) => ops.push(PatchOp::Add {
            path: format!("{path}/{key}"),
            value: raw(a),
        }),
        (Some(_), None) => ops.push(PatchOp::Remove {
            path: format!("{path}/{key}"),
        }),
    }
}

/// Field-by-field diff of two values of a k8s-openapi struct, comparing typed values so that
/// unchanged fields are never serialized. The pattern names every field without `..`: a field
/// added to the type by a k8s-openapi upgrade fails to compile here instead of slipping past
/// the patch.
macro_rules! diff_struct {
    ($ty:ident, $before:expr, $after:expr, $path:expr, $ops:expr, { $($field:ident: $key:literal),* $(,)? }) => {{
        let (before, after): (&$ty, &$ty) = ($before, $after);
        let $ty { $($field: _),* } = before;
        $( diff_member(&before.$field, &after.$field, $path, $key, $ops); )*
    }};
}

fn diff_container(before: &Container, after: &Container, path: &str, ops: &mut Vec<PatchOp>) {
    diff_struct!(Container, before, after, path, ops, {
        args: "args",
        command: "command",
        env: "env",
        env_from: "envFrom",
        image: "image",
        image_pull_policy: "imagePullPolicy",
        lifecycle: "lifecycle",
        liveness_probe: "livenessProbe",
        name: "name",
        ports: "ports",
        readiness_probe: "readinessProbe",
        resize_policy: "resizePolicy",
        resources: "resources",
        restart_policy: "restartPolicy",
        restart_policy_rules: "restartPolicyRules",
        security_context: "securityContext",
        startup_probe: "startupProbe",
        stdin: "stdin",
        stdin_once: "stdinOnce",
        termination_message_path: "terminationMessagePath",
        termination_message_policy: "terminationMessagePolicy",
        tty: "tty",
        volume_devices: "volumeDevices",
        volume_mounts: "volumeMounts",
        working_dir: "workingDir",
    });
}

fn diff_object_meta(before: &ObjectMeta, after: &ObjectMeta, path: &str, ops: &mut Vec<PatchOp>) {
    diff_struct!(ObjectMeta, before, after, path, ops, {
        annotations: "annotations",
        creation_timestamp: "creationTimestamp",
        deletion_grace_period_seconds: "deletionGracePeriodSeconds",
        deletion_timestamp: "deletionTimestamp",
        finalizers: "finalizers",
        generate_name: "generateName",
        generation: "generation",
        labels: "labels",
        managed_fields: "managedFields",
        name: "name",
        namespace: "namespace",
        owner_references: "ownerReferences",
        resource_version: "resourceVersion",
        self_link: "selfLink",
        uid: "uid",
    });
}

/// Diffs two lists of containers item by item.
fn diff_containers(before: &[Container], after: &[Container], path: &str, ops: &mut Vec<PatchOp>) {
    diff_arrays(before, after, path, ops, diff_container);
}

fn diff_pod_spec(before: &PodSpec, after: &PodSpec, path: &str, ops: &mut Vec<PatchOp>) {
    diff_member(
        &before.service_account_name,
        &after.service_account_name,
        path,
        "serviceAccountName",
        ops,
    );
    if before.volumes != after.volumes {
        diff_list(
            &before.volumes,
            &after.volumes,
            &format!("{path}/volumes"),
            ops,
        );
    }
    if before.init_containers != after.init_containers {
        let path = format!("{path}/initContainers");
        match (&before.init_containers, &after.init_containers) {
            (Some(b), Some(a)) => diff_containers(b, a, &path, ops),
            (b, a) => diff_field(b, a, &path, ops),
        }
    }
    if before.containers != after.containers {
        diff_containers(
            &before.containers,
            &after.containers,
            &format!("{path}/containers"),
            ops,
        );
    }
}

/// The patch turning `before` into `after`, for the fields the injection engine changes.
pub fn statefulset_patch(before: &StatefulSet, after: &StatefulSet) -> Vec<PatchOp> {
    let mut ops = Vec::new();
    let (Some(b), Some(a)) = (before.spec.as_ref(), after.spec.as_ref()) else {
        diff_field(&before.spec, &after.spec, "/spec", &mut ops);
        return ops;
    };
    diff_member(
        &b.pod_management_policy,
        &a.pod_management_policy,
        "/spec",
        "podManagementPolicy",
        &mut ops,
    );
    match (&b.template.metadata, &a.template.metadata) {
        (Some(bm), Some(am)) => diff_object_meta(bm, am, "/spec/template/metadata", &mut ops),
        (bm, am) => diff_field(bm, am, "/spec/template/metadata", &mut ops),
    }
    match (&b.template.spec, &a.template.spec) {
        (Some(bp), Some(ap)) => diff_pod_spec(bp, ap, "/spec/template/spec", &mut ops),
        (bp, ap) => diff_field(bp, ap, "/spec/template/spec", &mut ops),
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn pointer_tokens_escape_tilde_before_slash() {
        assert_eq!(token("dkron-ha/injected"), "dkron-ha~1injected");
        assert_eq!(token("a~/b"), "a~0~1b");
        assert_eq!(token("plain"), "plain");
        let mut doc = json!({"a~/b": 1});
        let patch: json_patch::Patch = serde_json::from_value(
            json!([{"op": "replace", "path": format!("/{}", token("a~/b")), "value": 2}]),
        )
        .unwrap();
        json_patch::patch(&mut doc, &patch).unwrap();
        assert_eq!(doc, json!({"a~/b": 2}));
    }

    #[test]
    fn the_written_patch_is_the_serialized_patch() {
        let ops = vec![
            PatchOp::Add {
                path: "/a\"b/~0".into(),
                value: raw(&json!({"k": ["v", 1]})),
            },
            PatchOp::Replace {
                path: "/x".into(),
                value: raw(&json!("é\n")),
            },
            PatchOp::Remove { path: "/y".into() },
        ];
        let written: Value = serde_json::from_slice(&to_json(&ops)).unwrap();
        let derived: Value = serde_json::from_str(&serde_json::to_string(&ops).unwrap()).unwrap();
        assert_eq!(written, derived);
        assert_eq!(written[0]["path"], "/a\"b/~0");
        assert_eq!(to_json(&[]), b"[]");
    }
}
