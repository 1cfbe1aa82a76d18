//! AdmissionReview in, AdmissionReview out. Parses the review, dispatches StatefulSets to the
//! injection engine and turns its result into a JSON patch, a denial or a plain "allowed".
//!
//! The response is built by hand rather than with kube-rs's `AdmissionResponse`, which
//! serializes `patch` as an array of numbers (kube-rs/kube#1781); the API server wants a
//! base64 string.

use crate::inject::{self, InjectError, InjectorConfig, Operation};
use crate::patch::{PatchOp, statefulset_patch};
use k8s_openapi::api::apps::v1::StatefulSet;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use std::borrow::Cow;
use view::StatefulSetView;

mod lean;
mod view;

/// A review the server cannot answer: HTTP 400 with this message.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("request body is not an AdmissionReview: {0}")]
    NotAReview(#[source] serde_json::Error),
    #[error("AdmissionReview has apiVersion {0:?}: send admission.k8s.io/v1")]
    UnsupportedVersion(String),
    #[error("AdmissionReview has kind {0:?}, expected \"AdmissionReview\"")]
    WrongKind(String),
    #[error("AdmissionReview has no request")]
    MissingRequest,
    #[error("AdmissionReview request has an empty uid")]
    MissingUid,
}

/// Why an object cannot be mutated; becomes a denial (allowed: false) carrying the message.
#[derive(Debug, thiserror::Error)]
pub enum MutateError {
    #[error(transparent)]
    Inject(#[from] InjectError),
    #[error("object is not a valid apps/v1 StatefulSet: {0}")]
    NotAStatefulSet(#[source] serde_json::Error),
}

// Objects stay raw until we know they are StatefulSets; then they parse straight into typed
// values, never through an intermediate `Value`.
#[derive(Deserialize)]
struct ReviewIn<'a> {
    #[serde(rename = "apiVersion", default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(borrow)]
    request: Option<RequestIn<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestIn<'a> {
    #[serde(default)]
    uid: String,
    #[serde(borrow)]
    kind: GroupVersionKind<'a>,
    operation: String,
    #[serde(default, borrow)]
    object: Option<&'a RawValue>,
    #[serde(default, borrow)]
    old_object: Option<&'a RawValue>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

/// The operations the webhook mutates; everything else is allowed unchanged.
fn mutating_operation(operation: &str) -> Option<Operation> {
    match operation {
        "CREATE" => Some(Operation::Create),
        "UPDATE" => Some(Operation::Update),
        _ => None,
    }
}

#[derive(Deserialize, Debug)]
struct GroupVersionKind<'a> {
    #[serde(default, borrow)]
    group: Cow<'a, str>,
    #[serde(default, borrow)]
    version: Cow<'a, str>,
    #[serde(default, borrow)]
    kind: Cow<'a, str>,
}

impl GroupVersionKind<'_> {
    fn is_statefulset(&self) -> bool {
        self.group == "apps" && self.version == "v1" && self.kind == "StatefulSet"
    }
}

/// The outcome of one review, for metrics and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Allowed with a patch.
    Patched,
    /// Allowed unchanged (not opted in, already injected, not a StatefulSet).
    Unchanged,
    /// Denied: an opted-in object that cannot be injected.
    Denied,
}

impl Verdict {
    pub fn as_label(self) -> &'static str {
        match self {
            Verdict::Patched => "patched",
            Verdict::Unchanged => "unchanged",
            Verdict::Denied => "denied",
        }
    }
}

/// The answer to a well-formed review.
#[derive(Debug)]
pub struct ReviewAnswer {
    /// The AdmissionReview to send back, serialized JSON.
    pub body: Vec<u8>,
    pub verdict: Verdict,
    /// `CREATE`, `UPDATE`, ... as the API server sent it (bounded by the API).
    pub operation: String,
}

/// A computed mutation of one object.
#[derive(Clone, Debug, PartialEq)]
pub struct Mutation {
    /// Empty when nothing changes.
    pub patch: Vec<PatchOp>,
    pub warnings: Vec<String>,
}

impl Mutation {
    /// The patch as a `json_patch::Patch`, to apply it locally (`inject`, tests).
    pub fn json_patch(&self) -> json_patch::Patch {
        serde_json::from_slice(&crate::patch::to_json(&self.patch))
            .unwrap_or(json_patch::Patch(Vec::new()))
    }
}

/// What a review changes: the JSON patch as text (`None` when nothing changes) and the warnings.
struct Changes {
    /// The patch and its number of operations.
    patch: Option<(Vec<u8>, usize)>,
    warnings: Vec<String>,
}

impl From<Mutation> for Changes {
    fn from(mutation: Mutation) -> Self {
        let ops = mutation.patch.len();
        Changes {
            patch: (ops > 0).then(|| (crate::patch::to_json(&mutation.patch), ops)),
            warnings: mutation.warnings,
        }
    }
}

/// Mutates a typed StatefulSet the way the webhook does. `None` when it does not opt in.
pub fn mutate(
    sts: &StatefulSet,
    operation: Operation,
    old: Option<&StatefulSet>,
    config: &InjectorConfig,
) -> Result<Option<Mutation>, InjectError> {
    let Some(injection) = inject::inject(sts, operation, old, config)? else {
        return Ok(None);
    };
    Ok(Some(Mutation {
        patch: statefulset_patch(sts, &injection.statefulset),
        warnings: injection.warnings,
    }))
}

/// Mutates a raw StatefulSet (as parsed from YAML by `inject`). `None` when it does not opt in.
pub fn mutate_statefulset(
    object: &Value,
    operation: Operation,
    old: Option<&Value>,
    config: &InjectorConfig,
) -> Result<Option<Mutation>, MutateError> {
    mutate_view(
        StatefulSetView::deserialize(object),
        operation,
        old.and_then(|o| StatefulSetView::deserialize(o).ok()),
        config,
    )
}

fn mutate_raw(
    object: &RawValue,
    operation: Operation,
    old: Option<&RawValue>,
    config: &InjectorConfig,
) -> Result<Option<Mutation>, MutateError> {
    mutate_view(
        serde_json::from_str(object.get()),
        operation,
        old.and_then(|o| serde_json::from_str(o.get()).ok()),
        config,
    )
}

/// Mutates a parsed view; the stored object only informs defaults, so one we could not read
/// comes in as absent.
fn mutate_view(
    object: Result<StatefulSetView, serde_json::Error>,
    operation: Operation,
    old: Option<StatefulSetView>,
    config: &InjectorConfig,
) -> Result<Option<Mutation>, MutateError> {
    let sts: StatefulSet = object.map_err(MutateError::NotAStatefulSet)?.into();
    let old: Option<StatefulSet> = old.map(Into::into);
    Ok(mutate(&sts, operation, old.as_ref(), config)?)
}

/// Answers one AdmissionReview body. `Err` means the body itself is malformed (HTTP 400).
pub fn review(body: &[u8], config: &InjectorConfig) -> Result<ReviewAnswer, ReviewError> {
    // One UTF-8 check of the whole body is cheaper than one per string while parsing.
    if let Ok(text) = std::str::from_utf8(body)
        && let Some(answer) = review_statefulset_fast(text, config)
    {
        return Ok(answer);
    }
    let review: ReviewIn<'_> = serde_json::from_slice(body).map_err(ReviewError::NotAReview)?;
    if review.api_version != "admission.k8s.io/v1" {
        return Err(ReviewError::UnsupportedVersion(review.api_version));
    }
    if review.kind != "AdmissionReview" {
        return Err(ReviewError::WrongKind(review.kind));
    }
    let request = review.request.ok_or(ReviewError::MissingRequest)?;
    if request.uid.is_empty() {
        return Err(ReviewError::MissingUid);
    }

    let ids = ReviewIds {
        api_version: &review.api_version,
        kind: &review.kind,
        uid: &request.uid,
        operation: &request.operation,
        namespace: request.namespace.as_deref().unwrap_or_default(),
        name: request.name.as_deref().unwrap_or_default(),
    };
    let operation = mutating_operation(&request.operation);
    let (Some(operation), true, Some(object)) =
        (operation, request.kind.is_statefulset(), request.object)
    else {
        tracing::debug!(uid = %request.uid, kind = ?request.kind, operation = %request.operation, "not ours, allowed unchanged");
        return Ok(answer_mutation(&ids, Ok(None)));
    };
    let result = mutate_raw(object, operation, request.old_object, config);
    Ok(answer_mutation(&ids, result.map(|m| m.map(Changes::from))))
}

/// What identifies a review and its object in the answer and the logs.
struct ReviewIds<'a> {
    api_version: &'a str,
    kind: &'a str,
    uid: &'a str,
    operation: &'a str,
    namespace: &'a str,
    name: &'a str,
}

/// A review of a StatefulSet parsed in one pass, borrowing from the body; the objects are read
/// only as far as the hot path needs them (`lean`).
#[derive(Deserialize)]
struct TypedReview<'a> {
    #[serde(rename = "apiVersion", borrow)]
    api_version: Cow<'a, str>,
    #[serde(borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    request: TypedRequest<'a>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypedRequest<'a> {
    #[serde(borrow)]
    uid: Cow<'a, str>,
    #[serde(borrow)]
    kind: GroupVersionKind<'a>,
    #[serde(borrow)]
    operation: Cow<'a, str>,
    #[serde(borrow)]
    object: lean::LeanStatefulSet<'a>,
    #[serde(default, borrow)]
    old_object: Option<lean::LeanStatefulSet<'a>>,
    #[serde(default, borrow)]
    namespace: Option<view::Text<'a>>,
    #[serde(default, borrow)]
    name: Option<view::Text<'a>>,
}

/// The common case in one parse: a well-formed v1 review of a StatefulSet CREATE or UPDATE.
/// `None` sends everything else (and every malformed body) down the careful path.
fn review_statefulset_fast(body: &str, config: &InjectorConfig) -> Option<ReviewAnswer> {
    let review: TypedReview<'_> = serde_json::from_str(body).ok()?;
    let request = review.request;
    let operation = mutating_operation(&request.operation)?;
    let well_formed = review.api_version == "admission.k8s.io/v1"
        && review.kind == "AdmissionReview"
        && !request.uid.is_empty()
        && request.kind.is_statefulset();
    if !well_formed {
        return None;
    }
    // Objects that do not opt in are left alone (`Ok(None)`).
    let result = lean::mutate(
        &request.object,
        operation,
        request.old_object.as_ref(),
        config,
    );
    Some(answer_mutation(
        &ReviewIds {
            api_version: &review.api_version,
            kind: &review.kind,
            uid: &request.uid,
            operation: &request.operation,
            namespace: request.namespace.as_ref().map_or("", AsRef::as_ref),
            name: request.name.as_ref().map_or("", AsRef::as_ref),
        },
        result,
    ))
}

/// Turns the engine's result into the answering review: a patch, an unchanged allow, or a
/// denial carrying the engine's message.
fn answer_mutation(
    ids: &ReviewIds<'_>,
    result: Result<Option<Changes>, MutateError>,
) -> ReviewAnswer {
    let (namespace, name, uid) = (ids.namespace, ids.name, ids.uid);
    let mut response = ResponseOut {
        uid,
        allowed: true,
        status: None,
        warnings: &[],
        patch_type: None,
    };
    let (verdict, body) = match &result {
        Ok(Some(Changes {
            patch: Some((patch, ops)),
            warnings,
        })) => {
            // Debug, like the not-ours answers: a successful injection shows on the object
            // (`dkron-ha/injected`) and in the metrics, and a JSON line per injection would
            // cost more CPU than the review. `--log-level info,dkron_ha::admission=debug`
            // turns it on. Denials stay at warn.
            tracing::debug!(%namespace, %name, %uid, operation = %ids.operation, ops, warnings = warnings.len(), "injected");
            response.warnings = warnings;
            response.patch_type = Some("JSONPatch");
            (Verdict::Patched, review_json(ids, &response, Some(patch)))
        }
        Ok(changes) => {
            if let Some(changes) = changes {
                response.warnings = &changes.warnings;
            }
            (Verdict::Unchanged, review_json(ids, &response, None))
        }
        Err(error) => {
            tracing::warn!(%namespace, %name, %uid, %error, "denied");
            response.allowed = false;
            response.status = Some(StatusOut {
                code: 400,
                reason: "BadRequest",
                message: format!("dkron-ha: {error}"),
            });
            (Verdict::Denied, review_json(ids, &response, None))
        }
    };
    ReviewAnswer {
        body,
        verdict,
        operation: ids.operation.to_string(),
    }
}

/// The answering AdmissionReview, borrowed from the review and the engine's result.
#[derive(Serialize)]
struct ReviewOut<'a> {
    #[serde(rename = "apiVersion")]
    api_version: &'a str,
    kind: &'a str,
    response: &'a ResponseOut<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResponseOut<'a> {
    uid: &'a str,
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<StatusOut>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    warnings: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
}

#[derive(Serialize)]
struct StatusOut {
    code: u16,
    reason: &'static str,
    message: String,
}

/// Serializes the answering AdmissionReview. The patch goes in as standard base64 written
/// straight into the output after the other members: its alphabet never needs JSON escaping,
/// and the escape scan over this, the largest field, was a tenth of the whole review's cost.
fn review_json(ids: &ReviewIds<'_>, response: &ResponseOut<'_>, patch: Option<&[u8]>) -> Vec<u8> {
    let review = ReviewOut {
        api_version: ids.api_version,
        kind: ids.kind,
        response,
    };
    let base64_len = patch.map_or(0, |p| p.len().div_ceil(3) * 4);
    let mut out = Vec::with_capacity(256 + base64_len);
    // Borrowed strings, bools and numbers into a Vec: serializing cannot fail.
    let _ = serde_json::to_writer(&mut out, &review);
    let Some(patch) = patch else {
        return out;
    };
    // `response` is the last member of the review and `patch` goes last in it: the text ends
    // in `}}` and the patch is spliced before that.
    debug_assert!(out.ends_with(b"}}"));
    out.truncate(out.len() - 2);
    out.extend_from_slice(br#","patch":""#);
    base64_simd::STANDARD.encode_append(patch, &mut out);
    out.extend_from_slice(br#""}}"#);
    out
}

/// Body of an HTTP 400 for a malformed review: a Kubernetes-style Status.
#[derive(Serialize)]
pub struct BadReview {
    pub kind: &'static str,
    #[serde(rename = "apiVersion")]
    pub api_version: &'static str,
    pub status: &'static str,
    pub message: String,
    pub reason: &'static str,
    pub code: u16,
}

impl From<&ReviewError> for BadReview {
    fn from(error: &ReviewError) -> Self {
        BadReview {
            kind: "Status",
            api_version: "v1",
            status: "Failure",
            message: error.to_string(),
            reason: "BadRequest",
            code: 400,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use serde_json::json;

    fn statefulset_review(annotations: Value, containers: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "u-2",
                "kind": {"group": "apps", "version": "v1", "kind": "StatefulSet"},
                "operation": "CREATE",
                "object": {
                    "metadata": {"name": "other", "annotations": annotations},
                    "spec": {"serviceName": "other", "template": {"spec": {"containers": containers}}}
                }
            }
        }))
        .unwrap()
    }

    #[test]
    fn a_statefulset_that_does_not_opt_in_is_never_denied() {
        // Containers the hot path cannot read: not ours to judge without the annotation.
        let body = statefulset_review(json!({"team": "x"}), json!([5, "x"]));
        let answer = review(&body, &InjectorConfig::default()).unwrap();
        assert_eq!(answer.verdict, Verdict::Unchanged);
        let parsed: Value = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(parsed["response"], json!({"uid": "u-2", "allowed": true}));

        // Opted in, the same object is denied with a message saying what is wrong.
        let body = statefulset_review(json!({"dkron-ha/enabled": "true"}), json!([5, "x"]));
        let answer = review(&body, &InjectorConfig::default()).unwrap();
        assert_eq!(answer.verdict, Verdict::Denied);
        let parsed: Value = serde_json::from_slice(&answer.body).unwrap();
        let message = parsed["response"]["status"]["message"].as_str().unwrap();
        assert!(
            message.contains("not a valid apps/v1 StatefulSet"),
            "{message}"
        );
    }

    #[test]
    fn other_annotations_are_skipped_unread_and_left_as_they_are() {
        // kubectl's client-side apply records the whole object, escaped, in an annotation; the
        // pod template carries annotations of its own (and may say `null`).
        let mut object = json!({
            "metadata": {"name": "dkron", "annotations": {"dkron-ha/enabled": "true", "team": "jobs"}},
            "spec": {
                "replicas": 3,
                "serviceName": "dkron",
                "template": {
                    "metadata": {"annotations": {"prometheus.io/scrape": "true", "n": 5}},
                    "spec": {"containers": [{"name": "dkron", "image": "dkron/dkron:4.1.1"}]}
                }
            }
        });
        let applied = serde_json::to_string(&object).unwrap();
        object["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"] =
            json!(applied);
        for template_annotations in [None, Some(Value::Null)] {
            let mut object = object.clone();
            if let Some(value) = template_annotations.clone() {
                object["spec"]["template"]["metadata"]["annotations"] = value;
            }
            let body = serde_json::to_vec(&json!({
                "apiVersion": "admission.k8s.io/v1",
                "kind": "AdmissionReview",
                "request": {
                    "uid": "u-3",
                    "kind": {"group": "apps", "version": "v1", "kind": "StatefulSet"},
                    "operation": "CREATE",
                    "object": object,
                }
            }))
            .unwrap();
            let answer = review(&body, &InjectorConfig::default()).unwrap();
            assert_eq!(answer.verdict, Verdict::Patched);
            let response: Value = serde_json::from_slice(&answer.body).unwrap();
            let patch = base64::engine::general_purpose::STANDARD
                .decode(response["response"]["patch"].as_str().unwrap())
                .unwrap();
            let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
            let mut patched = object.clone();
            json_patch::patch(&mut patched, &patch).unwrap();
            assert_eq!(patched["metadata"], object["metadata"]);
            let mut expected = match template_annotations {
                None => json!({"prometheus.io/scrape": "true", "n": 5}),
                Some(_) => json!({}),
            };
            expected["dkron-ha/injected"] = json!(crate::VERSION);
            assert_eq!(
                patched["spec"]["template"]["metadata"]["annotations"],
                expected
            );
        }
    }

    #[test]
    fn the_spliced_patch_is_valid_json_with_a_plain_base64_string() {
        let ids = ReviewIds {
            api_version: "admission.k8s.io/v1",
            kind: "AdmissionReview",
            uid: "u\"1",
            operation: "CREATE",
            namespace: "ns",
            name: "n",
        };
        let warnings = vec!["w".to_string()];
        let response = ResponseOut {
            uid: ids.uid,
            allowed: true,
            status: None,
            warnings: &warnings,
            patch_type: Some("JSONPatch"),
        };
        let patch = br#"[{"op":"add","path":"/a","value":"\u00e9\n"}]"#;
        let body = review_json(&ids, &response, Some(patch));
        let parsed: Value = serde_json::from_slice(&body).expect("valid JSON");
        let response = &parsed["response"];
        assert_eq!(response["uid"], "u\"1");
        assert_eq!(response["warnings"], json!(["w"]));
        assert_eq!(response["patchType"], "JSONPatch");
        let encoded = response["patch"].as_str().expect("patch is a string");
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        assert_eq!(decoded, patch);
        assert_eq!(parsed.as_object().unwrap().len(), 3);
    }
}
