//! The FleetLock wire protocol as Zincati speaks it: the `fleet-lock-protocol: true` header, the
//! `{"client_params":{"id":"...","group":"..."}}` body (pretty-printed, sent without a
//! `Content-Type`), 200 for success and `{"kind":"...","value":"..."}` with a 4xx/5xx otherwise.

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelValue;
use serde::{Deserialize, Serialize};

/// The header every lock and unlock request must carry, with the value `true`, so that a
/// request redirected here by accident is refused.
pub const PROTOCOL_HEADER: &str = "fleet-lock-protocol";
/// Zincati's body is about 100 bytes; anything near this limit is not a FleetLock client.
pub const MAX_BODY_BYTES: usize = 4 * 1024;
/// Longest id accepted after normalisation (Zincati sends 32 hex digits).
pub const MAX_ID_LEN: usize = 128;
/// Longest group accepted: the group is a ConfigMap key and part of a Lease name.
pub const MAX_GROUP_LEN: usize = 63;

/// What a request asks for, normalised: the id lowercase without dashes, the group lowercase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientParams {
    pub id: String,
    pub group: String,
}

#[derive(Deserialize)]
struct WireBody {
    client_params: WireClientParams,
}

#[derive(Deserialize)]
struct WireClientParams {
    id: String,
    group: String,
}

/// The error body of the protocol.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub kind: String,
    pub value: String,
}

/// The fixed set of error kinds this server answers with. Zincati counts them in its metrics,
/// so the set stays small and each kind keeps its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EncodeLabelValue)]
pub enum ErrorKind {
    MissingFleetLockHeader,
    InvalidBody,
    BodyTooLarge,
    InvalidClientId,
    InvalidGroup,
    InvalidMachineId,
    UnknownMachineId,
    AmbiguousMachineId,
    FailedLockSemaphoreFull,
    DrainInProgress,
    DkronQuorumAtRisk,
    NodeNotReady,
    InvalidConfiguration,
    CorruptLockState,
    KubernetesApiError,
    UnknownEndpoint,
    MethodNotAllowed,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 17] = [
        ErrorKind::MissingFleetLockHeader,
        ErrorKind::InvalidBody,
        ErrorKind::BodyTooLarge,
        ErrorKind::InvalidClientId,
        ErrorKind::InvalidGroup,
        ErrorKind::InvalidMachineId,
        ErrorKind::UnknownMachineId,
        ErrorKind::AmbiguousMachineId,
        ErrorKind::FailedLockSemaphoreFull,
        ErrorKind::DrainInProgress,
        ErrorKind::DkronQuorumAtRisk,
        ErrorKind::NodeNotReady,
        ErrorKind::InvalidConfiguration,
        ErrorKind::CorruptLockState,
        ErrorKind::KubernetesApiError,
        ErrorKind::UnknownEndpoint,
        ErrorKind::MethodNotAllowed,
    ];

    /// The `kind` string on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::MissingFleetLockHeader => "missing_fleet_lock_header",
            ErrorKind::InvalidBody => "invalid_body",
            ErrorKind::BodyTooLarge => "body_too_large",
            ErrorKind::InvalidClientId => "invalid_client_id",
            ErrorKind::InvalidGroup => "invalid_group",
            ErrorKind::InvalidMachineId => "invalid_machine_id",
            ErrorKind::UnknownMachineId => "unknown_machine_id",
            ErrorKind::AmbiguousMachineId => "ambiguous_machine_id",
            // The name the protocol document uses for this case.
            ErrorKind::FailedLockSemaphoreFull => "failed_lock_semaphore_full",
            ErrorKind::DrainInProgress => "drain_in_progress",
            ErrorKind::DkronQuorumAtRisk => "dkron_quorum_at_risk",
            ErrorKind::NodeNotReady => "node_not_ready",
            ErrorKind::InvalidConfiguration => "invalid_configuration",
            ErrorKind::CorruptLockState => "corrupt_lock_state",
            ErrorKind::KubernetesApiError => "kubernetes_api_error",
            ErrorKind::UnknownEndpoint => "unknown_endpoint",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
        }
    }

    /// 400 for a malformed request, 404/409 for "not you" and "not now" (Zincati asks again),
    /// 5xx when this server or the API server behind it is at fault.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::MissingFleetLockHeader
            | ErrorKind::InvalidBody
            | ErrorKind::InvalidClientId
            | ErrorKind::InvalidGroup
            | ErrorKind::InvalidMachineId => StatusCode::BAD_REQUEST,
            ErrorKind::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::UnknownMachineId | ErrorKind::UnknownEndpoint => StatusCode::NOT_FOUND,
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::AmbiguousMachineId
            | ErrorKind::FailedLockSemaphoreFull
            | ErrorKind::DrainInProgress
            | ErrorKind::DkronQuorumAtRisk
            | ErrorKind::NodeNotReady => StatusCode::CONFLICT,
            ErrorKind::InvalidConfiguration | ErrorKind::CorruptLockState => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            ErrorKind::KubernetesApiError => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything that can go wrong in FleetLock. The message is the protocol's `value`: it says
/// what was wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum FleetLockError {
    #[error("the header `{PROTOCOL_HEADER}: true` is required on FleetLock requests")]
    MissingProtocolHeader,
    #[error(
        "the body must be JSON like {{\"client_params\":{{\"id\":\"...\",\"group\":\"...\"}}}}: {0}"
    )]
    InvalidBody(String),
    #[error("the body exceeds {MAX_BODY_BYTES} bytes; a FleetLock body is about 100 bytes")]
    BodyTooLarge,
    #[error("client id {id:?} is invalid: {why}")]
    InvalidClientId { id: String, why: String },
    #[error("group {group:?} is invalid: {why}")]
    InvalidGroup { group: String, why: String },
    #[error("machine id {value:?} is invalid: {why}")]
    InvalidMachineId { value: String, why: String },
    #[error(
        "no Node matches id {id}: checked status.nodeInfo.machineID (raw and as Zincati's \
         app-specific id), status.nodeInfo.systemUUID and the annotation {annotation}; set \
         that annotation on the Node to the id"
    )]
    UnknownMachineId { id: String, annotation: String },
    #[error(
        "id {id} matches several Nodes by {matched_by}: {}; each machine needs a unique \
         /etc/machine-id (or set the annotation {annotation} to tell them apart)",
        nodes.join(", ")
    )]
    AmbiguousMachineId {
        id: String,
        matched_by: String,
        nodes: Vec<String>,
        annotation: String,
    },
    #[error("{}", describe_full(group, *slots, holders, *position, *waiting))]
    SemaphoreFull {
        group: String,
        slots: u32,
        holders: Vec<String>,
        /// This Node's place in the group's queue (1 = next).
        position: usize,
        waiting: usize,
    },
    #[error("node {node} is still draining: {remaining}")]
    DrainInProgress { node: String, remaining: String },
    #[error(
        "node {node} waits before its drain would cost a Dkron cluster its majority: {shortfall}"
    )]
    DkronQuorumAtRisk {
        node: String,
        shortfall: Box<super::quorum::Shortfall>,
    },
    #[error("node {node} is not Ready yet; its reboot slot is released once it is")]
    NodeNotReady { node: String },
    #[error("{0}")]
    InvalidConfiguration(String),
    #[error("{0}")]
    CorruptLockState(String),
    #[error("Kubernetes API request failed while {action}: {source}")]
    Kubernetes {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error("gave up {action} after {attempts} write conflicts; retry later")]
    TooManyConflicts { action: String, attempts: u32 },
    #[error(
        "listing {what} has not finished after {}s (is the API server reachable? see the \
         log of dkron-ha serve); retry later",
        waited.as_secs()
    )]
    NotListed {
        what: &'static str,
        waited: std::time::Duration,
    },
    #[error(
        "no FleetLock endpoint at {path}: the endpoints are POST v1/pre-reboot, POST \
         v1/steady-state and GET v1/status under Zincati's base_url \
         \"http://<service>/fleetlock/\""
    )]
    UnknownEndpoint { path: String },
    #[error("{path} takes {allowed}, not {method}")]
    MethodNotAllowed {
        path: String,
        method: String,
        allowed: &'static str,
    },
}

impl FleetLockError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            FleetLockError::MissingProtocolHeader => ErrorKind::MissingFleetLockHeader,
            FleetLockError::InvalidBody(_) => ErrorKind::InvalidBody,
            FleetLockError::BodyTooLarge => ErrorKind::BodyTooLarge,
            FleetLockError::InvalidClientId { .. } => ErrorKind::InvalidClientId,
            FleetLockError::InvalidGroup { .. } => ErrorKind::InvalidGroup,
            FleetLockError::InvalidMachineId { .. } => ErrorKind::InvalidMachineId,
            FleetLockError::UnknownMachineId { .. } => ErrorKind::UnknownMachineId,
            FleetLockError::AmbiguousMachineId { .. } => ErrorKind::AmbiguousMachineId,
            FleetLockError::SemaphoreFull { .. } => ErrorKind::FailedLockSemaphoreFull,
            FleetLockError::DrainInProgress { .. } => ErrorKind::DrainInProgress,
            FleetLockError::DkronQuorumAtRisk { .. } => ErrorKind::DkronQuorumAtRisk,
            FleetLockError::NodeNotReady { .. } => ErrorKind::NodeNotReady,
            FleetLockError::InvalidConfiguration(_) => ErrorKind::InvalidConfiguration,
            FleetLockError::CorruptLockState(_) => ErrorKind::CorruptLockState,
            FleetLockError::Kubernetes { .. }
            | FleetLockError::TooManyConflicts { .. }
            | FleetLockError::NotListed { .. } => ErrorKind::KubernetesApiError,
            FleetLockError::UnknownEndpoint { .. } => ErrorKind::UnknownEndpoint,
            FleetLockError::MethodNotAllowed { .. } => ErrorKind::MethodNotAllowed,
        }
    }

    pub(crate) fn kube(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Self {
        let action = action.into();
        move |source| FleetLockError::Kubernetes { action, source }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            kind: self.kind().as_str().to_owned(),
            value: self.to_string(),
        }
    }
}

impl IntoResponse for FleetLockError {
    fn into_response(self) -> Response {
        let mut response = (self.kind().status(), axum::Json(self.body())).into_response();
        if let FleetLockError::MethodNotAllowed { allowed, .. } = &self {
            let allow = axum::http::HeaderValue::from_static(allowed);
            response
                .headers_mut()
                .insert(axum::http::header::ALLOW, allow);
        }
        response
    }
}

/// Why a Node may not reboot now, and where it waits.
fn describe_full(
    group: &str,
    slots: u32,
    holders: &[String],
    position: usize,
    waiting: usize,
) -> String {
    let in_line = format!("this node is number {position} of {waiting} in line; retry later");
    if slots == 0 {
        return format!(
            "group {group} has no reboot slots: raise its value in the FleetLock ConfigMap; \
             {in_line}"
        );
    }
    let held = if holders.is_empty() {
        String::new()
    } else {
        format!(" (held by {})", holders.join(", "))
    };
    let free = (slots as usize).saturating_sub(holders.len());
    if free == 0 {
        format!("all {slots} reboot slot(s) of group {group} are taken{held}; {in_line}")
    } else {
        format!(
            "{free} of {slots} reboot slot(s) of group {group} are free but kept for the \
             node(s) that asked first{held}; {in_line}"
        )
    }
}

/// Refuses a request without `fleet-lock-protocol: true` (the value is compared without case).
pub fn check_protocol_header(headers: &HeaderMap) -> Result<(), FleetLockError> {
    let value = headers
        .get(PROTOCOL_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    match value {
        Some(v) if v.eq_ignore_ascii_case("true") => Ok(()),
        _ => Err(FleetLockError::MissingProtocolHeader),
    }
}

/// Parses the request body. The `Content-Type` is not checked: Zincati sends none.
pub fn parse_client_params(body: &[u8]) -> Result<ClientParams, FleetLockError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(FleetLockError::BodyTooLarge);
    }
    let wire: WireBody =
        serde_json::from_slice(body).map_err(|e| FleetLockError::InvalidBody(e.to_string()))?;
    Ok(ClientParams {
        id: normalize_id(&wire.client_params.id)?,
        group: normalize_group(&wire.client_params.group)?,
    })
}

/// Ids compare without case and without dashes, so a UUID written either way matches.
pub fn normalize_id(raw: &str) -> Result<String, FleetLockError> {
    let invalid = |why: &str| FleetLockError::InvalidClientId {
        id: raw.to_owned(),
        why: why.to_owned(),
    };
    let id: String = raw
        .trim()
        .chars()
        .filter(|c| *c != '-')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if id.is_empty() {
        return Err(invalid("it is empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(invalid("it is longer than 128 characters"));
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_')
    {
        return Err(invalid(
            "only letters, digits, '.', '_' and '-' are allowed",
        ));
    }
    Ok(id)
}

/// Groups follow the protocol's `^[a-zA-Z0-9.-]+$`, compare without case, and must also make
/// a valid object name (`dkron-ha-fleetlock-<group>`): alphanumeric at both ends, no `..`.
pub fn normalize_group(raw: &str) -> Result<String, FleetLockError> {
    let invalid = |why: &str| FleetLockError::InvalidGroup {
        group: raw.to_owned(),
        why: why.to_owned(),
    };
    let group = raw.trim().to_ascii_lowercase();
    if group.is_empty() {
        return Err(invalid(
            "it is empty; Zincati's default group is \"default\"",
        ));
    }
    if group.len() > MAX_GROUP_LEN {
        return Err(invalid("it is longer than 63 characters"));
    }
    if !group
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
    {
        return Err(invalid("only letters, digits, '.' and '-' are allowed"));
    }
    let dns_labels_ok = group
        .split('.')
        .all(|label| !label.is_empty() && !label.starts_with('-') && !label.ends_with('-'));
    if !dns_labels_ok {
        return Err(invalid(
            "each dot-separated part must start and end with a letter or digit",
        ));
    }
    Ok(group)
}
