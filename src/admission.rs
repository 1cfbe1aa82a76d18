//! AdmissionReview in, AdmissionReview out: reads the review with kube's admission types, hands
//! an opted-in StatefulSet to the injection engine and answers with the engine's output as a
//! JSON patch (`json_patch::diff`), a denial carrying the engine's message, or a plain "allowed".

use crate::inject::{self, InjectError, InjectorConfig, Operation};
use base64::Engine as _;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::admission::{self as kube_admission, AdmissionRequest, AdmissionResponse};
use kube::core::{DynamicObject, TypeMeta};
use serde::{Deserialize, Serialize};
use serde_json::Value;

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
    #[error("object is not a valid apps/v1 Deployment: {0}")]
    NotADeployment(#[source] serde_json::Error),
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

/// The answer to a well-formed review.
#[derive(Debug)]
pub struct ReviewAnswer {
    /// The AdmissionReview to send back, serialized JSON.
    pub body: Vec<u8>,
    pub verdict: Verdict,
    /// `CREATE`, `UPDATE`, ... as the API server sent it.
    pub operation: kube_admission::Operation,
}

/// A computed mutation of one object.
#[derive(Clone, Debug, PartialEq)]
pub struct Mutation {
    /// Empty when nothing changes.
    pub patch: json_patch::Patch,
    pub warnings: Vec<String>,
}

fn raw_annotation<'a>(object: &'a Value, key: &str) -> Option<&'a Value> {
    object.get("metadata")?.get("annotations")?.get(key)
}

/// Whether a raw object opts in, read before anything else of it: an object that does not opt
/// in is never ours to judge, however the rest of it looks.
fn opts_in(object: &Value) -> bool {
    raw_annotation(object, crate::names::ANNOTATION_ENABLED).and_then(Value::as_str) == Some("true")
}

/// Whether a raw object is Dkron workers (`dkron-ha/agent-of`, any value: a bad one is denied).
fn is_workers(object: &Value) -> bool {
    raw_annotation(object, crate::names::ANNOTATION_AGENT_OF).is_some()
}

/// Mutates a raw Deployment or StatefulSet of Dkron workers (`dkron-ha/agent-of`); `None` when
/// it names no servers. Only `spec.template` changes, and both kinds keep it there, so only the
/// metadata and the template are read typed.
pub fn mutate_workers(
    object: &Value,
    kind: WorkloadKind,
    config: &InjectorConfig,
) -> Result<Option<Mutation>, MutateError> {
    if !is_workers(object) {
        return Ok(None);
    }
    let invalid = |error| match kind {
        WorkloadKind::StatefulSet => MutateError::NotAStatefulSet(error),
        WorkloadKind::Deployment => MutateError::NotADeployment(error),
    };
    let part = |pointer| object.pointer(pointer).unwrap_or(&Value::Null);
    let meta = ObjectMeta::deserialize(part("/metadata")).map_err(invalid)?;
    let template = PodTemplateSpec::deserialize(part("/spec/template")).map_err(invalid)?;
    let Some(injected) = inject::inject_workers(&meta, &template, config)? else {
        return Ok(None);
    };
    // Both sides typed, as for servers: fields this build does not know stay as they were.
    let with = |template: &PodTemplateSpec| {
        let mut whole = object.clone();
        whole["spec"]["template"] = serde_json::to_value(template).map_err(invalid)?;
        Ok::<_, MutateError>(whole)
    };
    Ok(Some(Mutation {
        patch: json_patch::diff(&with(&template)?, &with(&injected)?),
        warnings: Vec::new(),
    }))
}

/// The workloads the webhook sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkloadKind {
    StatefulSet,
    Deployment,
}

impl WorkloadKind {
    /// The kind of an `apps/v1` object by its `apiVersion` and `kind`.
    pub fn of(api_version: &str, kind: &str) -> Option<Self> {
        match (api_version, kind) {
            ("apps/v1", "StatefulSet") => Some(WorkloadKind::StatefulSet),
            ("apps/v1", "Deployment") => Some(WorkloadKind::Deployment),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::StatefulSet => "StatefulSet",
            WorkloadKind::Deployment => "Deployment",
        }
    }
}

/// The one injection path of the webhook and `dkron-ha inject`: workers (`dkron-ha/agent-of`)
/// of either kind, or an opted-in StatefulSet of servers; `None` for anything else.
pub fn mutate(
    object: &Value,
    kind: WorkloadKind,
    operation: Operation,
    old: Option<&Value>,
    config: &InjectorConfig,
) -> Result<Option<Mutation>, MutateError> {
    match kind {
        _ if is_workers(object) => mutate_workers(object, kind, config),
        WorkloadKind::StatefulSet => mutate_statefulset(object, operation, old, config),
        WorkloadKind::Deployment => Ok(None),
    }
}

/// Mutates a raw StatefulSet the way the webhook does (the review's object, or a document of
/// `dkron-ha inject`). `None` when it does not opt in. `old` is the stored object on UPDATE; it
/// only informs defaults, so one that does not parse counts as absent.
pub fn mutate_statefulset(
    object: &Value,
    operation: Operation,
    old: Option<&Value>,
    config: &InjectorConfig,
) -> Result<Option<Mutation>, MutateError> {
    if !opts_in(object) {
        return uninject_statefulset(object);
    }
    let sts = StatefulSet::deserialize(object).map_err(MutateError::NotAStatefulSet)?;
    let old = old.and_then(|o| StatefulSet::deserialize(o).ok());
    let Some(injection) = inject::inject(&sts, operation, old.as_ref(), config)? else {
        return Ok(None);
    };
    Ok(Some(Mutation {
        patch: typed_diff(&sts, &injection.statefulset)?,
        warnings: injection.warnings,
    }))
}

/// The opt-out: a StatefulSet whose template is injected but that no longer opts in gets the
/// injection taken out ([`inject::uninject`]); `None` for any other.
fn uninject_statefulset(object: &Value) -> Result<Option<Mutation>, MutateError> {
    let injected = object
        .pointer("/spec/template/metadata/annotations")
        .and_then(|a| a.get(crate::names::ANNOTATION_INJECTED))
        .is_some();
    if !injected {
        return Ok(None);
    }
    let sts = StatefulSet::deserialize(object).map_err(MutateError::NotAStatefulSet)?;
    let Some(plain) = inject::uninject(&sts) else {
        return Ok(None);
    };
    Ok(Some(Mutation {
        patch: typed_diff(&sts, &plain)?,
        warnings: Vec::new(),
    }))
}

/// The JSON patch from `before` to `after`, both typed: the diff touches only what the engine
/// changed, so fields this build does not know stay in the raw object as they were.
fn typed_diff(before: &StatefulSet, after: &StatefulSet) -> Result<json_patch::Patch, MutateError> {
    let value = |sts| serde_json::to_value(sts).map_err(MutateError::NotAStatefulSet);
    Ok(json_patch::diff(&value(before)?, &value(after)?))
}

/// Answers one AdmissionReview body. `Err` means the body itself is malformed (HTTP 400).
pub fn review(body: &[u8], config: &InjectorConfig) -> Result<ReviewAnswer, ReviewError> {
    let review: kube_admission::AdmissionReview<DynamicObject> =
        serde_json::from_slice(body).map_err(ReviewError::NotAReview)?;
    if review.types.api_version != kube_admission::META_API_VERSION_V1 {
        return Err(ReviewError::UnsupportedVersion(review.types.api_version));
    }
    if review.types.kind != kube_admission::META_KIND {
        return Err(ReviewError::WrongKind(review.types.kind));
    }
    let request: AdmissionRequest<DynamicObject> =
        review.try_into().map_err(|_| ReviewError::MissingRequest)?;
    if request.uid.is_empty() {
        return Err(ReviewError::MissingUid);
    }
    let response = AdmissionResponse::from(&request);
    let kind = WorkloadKind::of(
        &format!("{}/{}", request.kind.group, request.kind.version),
        &request.kind.kind,
    );
    let operation = match request.operation {
        kube_admission::Operation::Create => Some(Operation::Create),
        kube_admission::Operation::Update => Some(Operation::Update),
        _ => None,
    };
    let (Some(operation), Some(kind), Some(object)) = (operation, kind, &request.object) else {
        tracing::debug!(uid = %request.uid, kind = %request.kind.kind, operation = ?request.operation, "not ours, allowed unchanged");
        return Ok(answer(&request, response, Verdict::Unchanged));
    };
    let old = request
        .old_object
        .as_ref()
        .and_then(|o| serde_json::to_value(o).ok());
    let result = serde_json::to_value(object)
        .map_err(MutateError::NotAStatefulSet)
        .and_then(|object| mutate(&object, kind, operation, old.as_ref(), config));
    let (namespace, name, uid) = (
        request.namespace.as_deref().unwrap_or_default(),
        &request.name,
        &request.uid,
    );
    Ok(match result {
        Ok(Some(mutation)) => {
            let mut response = response;
            response.warnings = (!mutation.warnings.is_empty()).then_some(mutation.warnings);
            if mutation.patch.0.is_empty() {
                answer(&request, response, Verdict::Unchanged)
            } else {
                // Debug, like the not-ours answers: a successful injection shows on the object
                // (`dkron-ha/injected`) and in the metrics; denials stay at warn.
                tracing::debug!(%namespace, %name, %uid, operation = ?request.operation, ops = mutation.patch.0.len(), "injected");
                match response.with_patch(mutation.patch) {
                    Ok(response) => answer(&request, response, Verdict::Patched),
                    Err(error) => deny(&request, namespace, error.to_string()),
                }
            }
        }
        Ok(None) => answer(&request, response, Verdict::Unchanged),
        Err(error) => deny(&request, namespace, error.to_string()),
    })
}

fn deny(request: &AdmissionRequest<DynamicObject>, namespace: &str, error: String) -> ReviewAnswer {
    tracing::warn!(%namespace, name = %request.name, uid = %request.uid, %error, "denied");
    let mut response = AdmissionResponse::from(request).deny(format!("dkron-ha: {error}"));
    response.result.code = 400;
    response.result.reason = "BadRequest".into();
    answer(request, response, Verdict::Denied)
}

/// The answering AdmissionReview. kube's `AdmissionResponse` serializes `patch` as an array of
/// numbers (kube-rs/kube#1781; the unit test `kube_writes_a_patch_as_numbers` shows it), and
/// the API server wants a base64 string: this is kube's response with only that field rewritten.
#[derive(Serialize)]
struct AnswerOut {
    #[serde(flatten)]
    types: TypeMeta,
    response: ResponseOut,
}

#[derive(Serialize)]
struct ResponseOut {
    #[serde(flatten)]
    response: AdmissionResponse,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<String>,
}

fn answer(
    request: &AdmissionRequest<DynamicObject>,
    mut response: AdmissionResponse,
    verdict: Verdict,
) -> ReviewAnswer {
    let patch = response
        .patch
        .take()
        .map(|p| base64::engine::general_purpose::STANDARD.encode(p));
    let out = AnswerOut {
        types: request.types.clone(),
        response: ResponseOut { response, patch },
    };
    ReviewAnswer {
        // Strings, bools, numbers and maps with string keys: serializing cannot fail.
        body: serde_json::to_vec(&out).unwrap_or_default(),
        verdict,
        operation: request.operation.clone(),
    }
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
    use serde_json::json;

    fn statefulset_review(annotations: Value, containers: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "u-2",
                "kind": {"group": "apps", "version": "v1", "kind": "StatefulSet"},
                "resource": {"group": "apps", "version": "v1", "resource": "statefulsets"},
                "operation": "CREATE",
                "userInfo": {"username": "admin"},
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
        // Containers that are no containers: not ours to judge without the annotation.
        let body = statefulset_review(json!({"team": "x"}), json!([5, "x"]));
        let answer = review(&body, &InjectorConfig::default()).unwrap();
        assert_eq!(answer.verdict, Verdict::Unchanged);
        let parsed: Value = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(
            parsed["response"],
            json!({"uid": "u-2", "allowed": true, "status": {}})
        );

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
        assert_eq!(parsed["response"]["status"]["code"], 400);
    }

    #[test]
    fn kube_writes_a_patch_as_numbers() {
        // Why `AnswerOut` exists: when kube writes base64 itself, drop it.
        let request: AdmissionRequest<DynamicObject> =
            serde_json::from_slice::<kube_admission::AdmissionReview<DynamicObject>>(
                &statefulset_review(json!({}), json!([])),
            )
            .unwrap()
            .try_into()
            .unwrap();
        let patch = json_patch::diff(&json!({}), &json!({"a": 1}));
        let response = AdmissionResponse::from(&request).with_patch(patch).unwrap();
        let kube = serde_json::to_value(response.clone().into_review()).unwrap();
        assert!(kube["response"]["patch"].is_array(), "{kube}");

        let ours: Value =
            serde_json::from_slice(&answer(&request, response, Verdict::Patched).body).unwrap();
        let encoded = ours["response"]["patch"].as_str().expect("a string");
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&decoded).unwrap(),
            json!([{"op": "add", "path": "/a", "value": 1}])
        );
        assert_eq!(ours["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(ours["kind"], "AdmissionReview");
        assert_eq!(ours["response"]["patchType"], "JSONPatch");
    }
}
