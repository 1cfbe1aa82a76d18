//! The HTTP face of FleetLock: parse, call [`FleetLock`], answer, count.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};

use super::FleetLock;
use super::metrics::{Endpoint, RequestOutcome};
use super::protocol::{
    ClientParams, FleetLockError, MAX_BODY_BYTES, check_protocol_header, parse_client_params,
};

pub const PRE_REBOOT_PATH: &str = "/fleetlock/v1/pre-reboot";
pub const STEADY_STATE_PATH: &str = "/fleetlock/v1/steady-state";
pub const STATUS_PATH: &str = "/fleetlock/v1/status";

/// `POST /fleetlock/v1/pre-reboot`, `POST /fleetlock/v1/steady-state` and
/// `GET /fleetlock/v1/status`, however the client wrote its base URL ([`route`]); merge it
/// into the plain-HTTP server, whose other routes it leaves alone. It answers as the
/// server's fallback, so it sees every path no other route took.
pub fn router(fleetlock: Arc<FleetLock>) -> Router {
    Router::new().fallback(dispatch).with_state(fleetlock)
}

/// Where a request path leads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Endpoint(Endpoint),
    /// Under `/fleetlock/` (or `/v1/`) but no endpoint: the protocol's JSON 404.
    UnknownEndpoint,
    /// Not FleetLock's: a plain 404.
    Elsewhere,
}

/// The endpoint a path names. Empty segments are ignored, so a base URL with or without its
/// trailing slash and a client joining paths with an extra slash reach the same endpoint;
/// `/v1/...` without the `/fleetlock` prefix is what `Url::join` makes of a base URL written
/// without its trailing slash (`http://svc/fleetlock` + `v1/pre-reboot`).
pub fn route(path: &str) -> Route {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let under_base = match segments.as_slice() {
        ["fleetlock", rest @ ..] => rest,
        all @ ["v1", ..] => all,
        _ => return Route::Elsewhere,
    };
    match under_base {
        ["v1", "pre-reboot"] => Route::Endpoint(Endpoint::PreReboot),
        ["v1", "steady-state"] => Route::Endpoint(Endpoint::SteadyState),
        ["v1", "status"] => Route::Endpoint(Endpoint::Status),
        _ => Route::UnknownEndpoint,
    }
}

/// The method an endpoint takes, as the `Allow` header writes it.
fn allowed_method(endpoint: Endpoint) -> (Method, &'static str) {
    match endpoint {
        Endpoint::Status => (Method::GET, "GET"),
        _ => (Method::POST, "POST"),
    }
}

async fn dispatch(
    State(fleetlock): State<Arc<FleetLock>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let path = uri.path();
    let endpoint = match route(path) {
        Route::Elsewhere => return StatusCode::NOT_FOUND.into_response(),
        Route::UnknownEndpoint => {
            let error = FleetLockError::UnknownEndpoint {
                path: path.to_owned(),
            };
            return refuse_unknown(&fleetlock, &method, error);
        }
        Route::Endpoint(endpoint) => endpoint,
    };
    let (expected, allowed) = allowed_method(endpoint);
    let head_of_status = endpoint == Endpoint::Status && method == Method::HEAD;
    if method != expected && !head_of_status {
        let error = FleetLockError::MethodNotAllowed {
            path: path.to_owned(),
            method: method.to_string(),
            allowed,
        };
        return refuse_unknown(&fleetlock, &method, error);
    }
    match endpoint {
        Endpoint::PreReboot => answer(&fleetlock, Operation::PreReboot, &headers, body).await,
        Endpoint::SteadyState => answer(&fleetlock, Operation::SteadyState, &headers, body).await,
        _ => status(&fleetlock).await,
    }
}

/// Answers a path or method FleetLock does not serve, with the protocol's error body.
fn refuse_unknown(fleetlock: &FleetLock, method: &Method, error: FleetLockError) -> Response {
    let outcome = RequestOutcome::Failed(error.kind());
    fleetlock
        .metrics()
        .observe_request(Endpoint::Unknown, outcome, std::time::Duration::ZERO);
    tracing::info!(%method, kind = %error.kind(), %error, "fleetlock request refused");
    error.into_response()
}

/// The two endpoints of the protocol (status is served apart).
#[derive(Clone, Copy)]
enum Operation {
    PreReboot,
    SteadyState,
}

impl Operation {
    fn endpoint(self) -> Endpoint {
        match self {
            Operation::PreReboot => Endpoint::PreReboot,
            Operation::SteadyState => Endpoint::SteadyState,
        }
    }

    fn as_str(self) -> &'static str {
        self.endpoint().as_str()
    }
}

async fn answer(
    fleetlock: &FleetLock,
    endpoint: Operation,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let params = match read_request(headers, body).await {
        Ok(params) => params,
        Err(error) => return finish(fleetlock, endpoint, started, None, Err(error)),
    };
    let result = match endpoint {
        Operation::PreReboot => fleetlock.pre_reboot(&params).await,
        Operation::SteadyState => fleetlock.steady_state(&params).await,
    };
    finish(fleetlock, endpoint, started, Some(&params), result)
}

async fn read_request(headers: &HeaderMap, body: Body) -> Result<ClientParams, FleetLockError> {
    check_protocol_header(headers)?;
    let declared_too_large = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|len| len > MAX_BODY_BYTES);
    if declared_too_large {
        return Err(FleetLockError::BodyTooLarge);
    }
    // The only way to exceed the limit left is a body without Content-Length.
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| FleetLockError::BodyTooLarge)?;
    parse_client_params(&bytes)
}

fn finish(
    fleetlock: &FleetLock,
    endpoint: Operation,
    started: Instant,
    params: Option<&ClientParams>,
    result: Result<(), FleetLockError>,
) -> Response {
    let outcome = match &result {
        Ok(()) => RequestOutcome::Ok,
        Err(error) => RequestOutcome::Failed(error.kind()),
    };
    fleetlock
        .metrics()
        .observe_request(endpoint.endpoint(), outcome, started.elapsed());
    let id = params.map(|p| p.id.as_str()).unwrap_or("");
    let group = params.map(|p| p.group.as_str()).unwrap_or("");
    match result {
        Ok(()) => {
            tracing::info!(endpoint = endpoint.as_str(), %id, %group, "fleetlock request granted");
            StatusCode::OK.into_response()
        }
        Err(error) => {
            let kind = error.kind();
            if kind.status().is_server_error() {
                tracing::warn!(endpoint = endpoint.as_str(), %id, %group, %kind, %error, "fleetlock request failed");
            } else {
                tracing::info!(endpoint = endpoint.as_str(), %id, %group, %kind, %error, "fleetlock request refused");
            }
            error.into_response()
        }
    }
}

async fn status(fleetlock: &FleetLock) -> Response {
    let started = Instant::now();
    let result = fleetlock.status().await;
    let outcome = match &result {
        Ok(_) => RequestOutcome::Ok,
        Err(error) => RequestOutcome::Failed(error.kind()),
    };
    fleetlock
        .metrics()
        .observe_request(Endpoint::Status, outcome, started.elapsed());
    match result {
        Ok(report) => axum::Json(report).into_response(),
        Err(error) => {
            tracing::warn!(%error, "fleetlock status failed");
            error.into_response()
        }
    }
}
