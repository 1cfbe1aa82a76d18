//! AdmissionReview in, AdmissionReview out. Parses the review, dispatches StatefulSets to the
//! injection engine and turns its result into a JSON patch, a denial or a plain "allowed".
//!
//! The response is built by hand rather than with kube-rs's `AdmissionResponse`, which
//! serializes `patch` as an array of numbers (kube-rs/kube#1781); the API server wants a
//! base64 string.

use crate::inject::{self, InjectError, InjectorConfig, Operation};
use crate::patch::{PatchOp, statefulset_patch};
use base64::Engine as _;
use k8s_openapi::api::apps::v1::StatefulSet;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};

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
    kind: GroupVersionKind,
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
struct GroupVersionKind {
    #[serde(default)]
    group: String,
    #[serde(default)]
    version: String,
    #[serde(default)]
    kind: String,
}

impl GroupVersionKind {
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
        serde_json::to_string(&self.patch)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(json_patch::Patch(Vec::new()))
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
    let sts: StatefulSet =
        serde_json::from_value(object.clone()).map_err(MutateError::NotAStatefulSet)?;
    // The stored object only informs defaults; one we cannot read is treated as absent.
    let old: Option<StatefulSet> = old.and_then(|o| serde_json::from_value(o.clone()).ok());
    Ok(mutate(&sts, operation, old.as_ref(), config)?)
}

fn mutate_raw(
    object: &RawValue,
    operation: Operation,
    old: Option<&RawValue>,
    config: &InjectorConfig,
) -> Result<Option<Mutation>, MutateError> {
    let sts: StatefulSet =
        serde_json::from_str(object.get()).map_err(MutateError::NotAStatefulSet)?;
    if !inject::is_opted_in(&sts) {
        return Ok(None);
    }
    let old: Option<StatefulSet> = old.and_then(|o| serde_json::from_str(o.get()).ok());
    Ok(mutate(&sts, operation, old.as_ref(), config)?)
}

/// Answers one AdmissionReview body. `Err` means the body itself is malformed (HTTP 400).
pub fn review(body: &[u8], config: &InjectorConfig) -> Result<ReviewAnswer, ReviewError> {
    if let Some(answer) = review_statefulset_fast(body, config) {
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
    Ok(answer_mutation(&ids, result))
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

/// A review of a StatefulSet parsed in one pass, objects straight into typed values.
#[derive(Deserialize)]
struct TypedReview {
    #[serde(rename = "apiVersion")]
    api_version: String,
    kind: String,
    request: TypedRequest,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypedRequest {
    uid: String,
    kind: GroupVersionKind,
    operation: String,
    object: StatefulSet,
    #[serde(default)]
    old_object: Option<StatefulSet>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

/// The common case in one parse: a well-formed v1 review of a StatefulSet CREATE or UPDATE.
/// `None` sends everything else (and every malformed body) down the careful path.
fn review_statefulset_fast(body: &[u8], config: &InjectorConfig) -> Option<ReviewAnswer> {
    let review: TypedReview = serde_json::from_slice(body).ok()?;
    let request = &review.request;
    let operation = mutating_operation(&request.operation)?;
    let well_formed = review.api_version == "admission.k8s.io/v1"
        && review.kind == "AdmissionReview"
        && !request.uid.is_empty()
        && request.kind.is_statefulset();
    if !well_formed {
        return None;
    }
    // `mutate` leaves objects that do not opt in alone (`Ok(None)`).
    let result = mutate(
        &request.object,
        operation,
        request.old_object.as_ref(),
        config,
    )
    .map_err(MutateError::from);
    Some(answer_mutation(
        &ReviewIds {
            api_version: &review.api_version,
            kind: &review.kind,
            uid: &request.uid,
            operation: &request.operation,
            namespace: request.namespace.as_deref().unwrap_or_default(),
            name: request.name.as_deref().unwrap_or_default(),
        },
        result,
    ))
}

/// Turns the engine's result into the answering review: a patch, an unchanged allow, or a
/// denial carrying the engine's message.
fn answer_mutation(
    ids: &ReviewIds<'_>,
    result: Result<Option<Mutation>, MutateError>,
) -> ReviewAnswer {
    let (namespace, name, uid) = (ids.namespace, ids.name, ids.uid);
    let answer = |verdict, response: Value, patch: Option<&[u8]>| ReviewAnswer {
        body: review_json(ids.api_version, ids.kind, response, patch),
        verdict,
        operation: ids.operation.to_string(),
    };
    match result {
        Ok(Some(mutation)) if !mutation.patch.is_empty() => {
            let patch = serde_json::to_vec(&mutation.patch).unwrap_or_default();
            tracing::info!(%namespace, %name, %uid, operation = %ids.operation, ops = mutation.patch.len(), warnings = mutation.warnings.len(), "injected");
            let mut response = json!({
                "uid": uid,
                "allowed": true,
                "patchType": "JSONPatch",
            });
            if !mutation.warnings.is_empty() {
                response["warnings"] = json!(mutation.warnings);
            }
            answer(Verdict::Patched, response, Some(&patch))
        }
        Ok(mutation) => {
            let warnings = mutation.map(|m| m.warnings).unwrap_or_default();
            let mut response = json!({"uid": uid, "allowed": true});
            if !warnings.is_empty() {
                response["warnings"] = json!(warnings);
            }
            answer(Verdict::Unchanged, response, None)
        }
        Err(error) => {
            tracing::warn!(%namespace, %name, %uid, %error, "denied");
            let response = json!({
                "uid": uid,
                "allowed": false,
                "status": {
                    "code": 400,
                    "reason": "BadRequest",
                    "message": format!("dkron-ha: {error}"),
                },
            });
            answer(Verdict::Denied, response, None)
        }
    }
}

/// Serializes the answering AdmissionReview. The patch goes in as standard base64 written
/// straight into the output: its alphabet never needs JSON escaping, and the escape scan over
/// this, the largest field, was a tenth of the whole review's cost.
fn review_json(api_version: &str, kind: &str, response: Value, patch: Option<&[u8]>) -> Vec<u8> {
    let mut review = json!({"apiVersion": api_version, "kind": kind, "response": response});
    // Serializing a `Value` of strings, bools and arrays cannot fail.
    let mut out = serde_json::to_string(&review).unwrap_or_default();
    let Some(patch) = patch else {
        return out.into_bytes();
    };
    // `response` is the last member (insertion order is kept), so the text ends in `}}`.
    if out.ends_with("}}") {
        out.truncate(out.len() - 2);
        out.push_str(r#","patch":""#);
        base64::engine::general_purpose::STANDARD.encode_string(patch, &mut out);
        out.push_str(r#""}}"#);
        return out.into_bytes();
    }
    review["response"]["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(patch));
    serde_json::to_vec(&review).unwrap_or_default()
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

    #[test]
    fn the_spliced_patch_is_valid_json_with_a_plain_base64_string() {
        let body = review_json(
            "admission.k8s.io/v1",
            "AdmissionReview",
            json!({"uid": "u\"1", "allowed": true, "patchType": "JSONPatch", "warnings": ["w"]}),
            Some(br#"[{"op":"add","path":"/a","value":"\u00e9\n"}]"#),
        );
        let parsed: Value = serde_json::from_slice(&body).expect("valid JSON");
        let response = &parsed["response"];
        assert_eq!(response["uid"], "u\"1");
        assert_eq!(response["warnings"], json!(["w"]));
        let patch = response["patch"].as_str().expect("patch is a string");
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(patch)
            .unwrap();
        assert_eq!(decoded, br#"[{"op":"add","path":"/a","value":"\u00e9\n"}]"#);
        assert_eq!(parsed.as_object().unwrap().len(), 3);
    }
}
