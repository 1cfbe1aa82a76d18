//! The HTTP face of FleetLock: parse, call [`FleetLock`], answer, count.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use super::FleetLock;
use super::metrics::{Endpoint, RequestOutcome};
use super::protocol::{
    ClientParams, FleetLockError, MAX_BODY_BYTES, check_protocol_header, parse_client_params,
};

pub const PRE_REBOOT_PATH: &str = "/fleetlock/v1/pre-reboot";
pub const STEADY_STATE_PATH: &str = "/fleetlock/v1/steady-state";
pub const STATUS_PATH: &str = "/fleetlock/v1/status";

/// `POST /fleetlock/v1/pre-reboot`, `POST /fleetlock/v1/steady-state` and
/// `GET /fleetlock/v1/status`, with full paths: merge it into the plain-HTTP server.
pub fn router(fleetlock: Arc<FleetLock>) -> Router {
    Router::new()
        .route(PRE_REBOOT_PATH, post(pre_reboot))
        .route(STEADY_STATE_PATH, post(steady_state))
        .route(STATUS_PATH, get(status))
        .with_state(fleetlock)
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

async fn pre_reboot(
    State(fleetlock): State<Arc<FleetLock>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    answer(&fleetlock, Operation::PreReboot, &headers, body).await
}

async fn steady_state(
    State(fleetlock): State<Arc<FleetLock>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    answer(&fleetlock, Operation::SteadyState, &headers, body).await
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

async fn status(State(fleetlock): State<Arc<FleetLock>>) -> Response {
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
