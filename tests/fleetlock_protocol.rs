//! The FleetLock wire protocol through the real router, with no cluster behind it: every
//! request here is refused before the Kubernetes API would be asked.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use clap::Parser;
use dkron_ha::fleetlock::metrics::Endpoint;
use dkron_ha::fleetlock::protocol::{
    ErrorBody, MAX_BODY_BYTES, normalize_group, normalize_id, parse_client_params,
};
use dkron_ha::fleetlock::router::{Route, route};
use dkron_ha::fleetlock::{ErrorKind, FleetLock, FleetLockConfig, parse_duration, router};
use prometheus_client::registry::Registry;
use tower::ServiceExt;

const ZINCATI_BODY: &[u8] = include_bytes!("fixtures/fleetlock/zincati-request.json");

/// A FleetLock whose API server does not exist: port 9 on loopback refuses connections.
fn offline_router() -> (axum::Router, Arc<std::sync::Mutex<Registry>>) {
    let config = kube::Config::new("http://127.0.0.1:9".parse().expect("valid url"));
    let client = kube::Client::try_from(config).expect("client");
    let mut registry = Registry::default();
    let fleetlock = FleetLock::new(
        client,
        FleetLockConfig {
            namespace: "fleetlock-test".into(),
            ..FleetLockConfig::default()
        },
        &mut registry,
    );
    (
        router(Arc::new(fleetlock)),
        Arc::new(std::sync::Mutex::new(registry)),
    )
}

fn zincati_request(path: &str, body: impl Into<Body>) -> Request<Body> {
    // Zincati sends the header and a pretty-printed body, and no Content-Type.
    Request::builder()
        .method(Method::POST)
        .uri(path)
        .header("fleet-lock-protocol", "true")
        .body(body.into())
        .expect("request")
}

async fn send(router: axum::Router, request: Request<Body>) -> (StatusCode, Option<ErrorBody>) {
    let response = router.oneshot(request).await.expect("infallible");
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("body");
    (status, serde_json::from_slice(&bytes).ok())
}

async fn expect_refusal(request: Request<Body>, status: StatusCode, kind: ErrorKind) -> ErrorBody {
    let (router, _) = offline_router();
    let (got_status, body) = send(router, request).await;
    let body = body.expect("a JSON error body");
    assert_eq!(
        (got_status, body.kind.as_str()),
        (status, kind.as_str()),
        "{}",
        body.value
    );
    assert!(!body.value.is_empty());
    body
}

#[tokio::test]
async fn a_request_without_the_protocol_header_is_refused() {
    let request = Request::builder()
        .method(Method::POST)
        .uri("/fleetlock/v1/pre-reboot")
        .body(Body::from(ZINCATI_BODY))
        .expect("request");
    let body = expect_refusal(
        request,
        StatusCode::BAD_REQUEST,
        ErrorKind::MissingFleetLockHeader,
    )
    .await;
    assert!(body.value.contains("fleet-lock-protocol: true"));
}

#[tokio::test]
async fn a_protocol_header_other_than_true_is_refused() {
    for value in ["false", "yes", ""] {
        let request = Request::builder()
            .method(Method::POST)
            .uri("/fleetlock/v1/steady-state")
            .header("fleet-lock-protocol", value)
            .body(Body::from(ZINCATI_BODY))
            .expect("request");
        expect_refusal(
            request,
            StatusCode::BAD_REQUEST,
            ErrorKind::MissingFleetLockHeader,
        )
        .await;
    }
}

#[tokio::test]
async fn bodies_that_are_not_fleetlock_json_are_refused() {
    for body in [
        "",
        "not json",
        "{}",
        r#"{"client_params":{"id":"abc"}}"#,
        r#"{"client_params":{"group":"default"}}"#,
        r#"{"client_params":{"id":7,"group":"default"}}"#,
        r#"{"client_params":"abc"}"#,
    ] {
        let request = zincati_request("/fleetlock/v1/pre-reboot", body);
        expect_refusal(request, StatusCode::BAD_REQUEST, ErrorKind::InvalidBody).await;
    }
}

#[tokio::test]
async fn bad_ids_and_groups_are_refused_with_their_kind() {
    let bad_id = r#"{"client_params":{"id":"---","group":"default"}}"#;
    expect_refusal(
        zincati_request("/fleetlock/v1/pre-reboot", bad_id),
        StatusCode::BAD_REQUEST,
        ErrorKind::InvalidClientId,
    )
    .await;
    let bad_group = r#"{"client_params":{"id":"abc","group":"work ers"}}"#;
    expect_refusal(
        zincati_request("/fleetlock/v1/steady-state", bad_group),
        StatusCode::BAD_REQUEST,
        ErrorKind::InvalidGroup,
    )
    .await;
}

#[tokio::test]
async fn an_oversized_body_is_refused_whether_or_not_its_length_is_declared() {
    let big = vec![b' '; MAX_BODY_BYTES + 1];
    expect_refusal(
        zincati_request("/fleetlock/v1/pre-reboot", big.clone()),
        StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::BodyTooLarge,
    )
    .await;
    let chunks = futures::stream::iter(
        big.chunks(512)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    expect_refusal(
        zincati_request("/fleetlock/v1/pre-reboot", Body::from_stream(chunks)),
        StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::BodyTooLarge,
    )
    .await;
}

#[tokio::test]
async fn a_valid_request_with_the_api_server_down_is_a_503_with_its_kind() {
    let request = zincati_request("/fleetlock/v1/pre-reboot", ZINCATI_BODY);
    let body = tokio::time::timeout(
        Duration::from_secs(30),
        expect_refusal(
            request,
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::KubernetesApiError,
        ),
    )
    .await
    .expect("answers quickly");
    assert!(body.value.contains("listing Nodes"), "{}", body.value);
}

#[tokio::test]
async fn refusals_are_counted_by_kind() {
    let (router, registry) = offline_router();
    let request = Request::builder()
        .method(Method::POST)
        .uri("/fleetlock/v1/pre-reboot")
        .body(Body::from(ZINCATI_BODY))
        .expect("request");
    let _ = send(router, request).await;
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry.lock().expect("lock"))
        .expect("encode");
    assert!(
        text.contains(r#"dkron_ha_fleetlock_requests_total{endpoint="pre_reboot",outcome="missing_fleet_lock_header"} 1"#),
        "{text}"
    );
    assert!(
        text.contains("dkron_ha_fleetlock_request_duration_seconds_bucket"),
        "{text}"
    );
}

#[tokio::test]
async fn only_post_locks_and_unlocks_and_other_methods_get_a_json_405() {
    for (method, path, allow) in [
        (Method::GET, "/fleetlock/v1/pre-reboot", "POST"),
        (Method::PUT, "/fleetlock/v1/steady-state", "POST"),
        (Method::DELETE, "/v1/pre-reboot", "POST"),
        (Method::POST, "/fleetlock/v1/status", "GET"),
    ] {
        let (router, _) = offline_router();
        let request = Request::builder()
            .method(method.clone())
            .uri(path)
            .header("fleet-lock-protocol", "true")
            .body(Body::from(ZINCATI_BODY))
            .expect("request");
        let response = router.oneshot(request).await.expect("infallible");
        assert_eq!(
            response.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        assert_eq!(response.headers()["allow"], allow, "{method} {path}");
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        let body: ErrorBody = serde_json::from_slice(&bytes).expect("a JSON error body");
        assert_eq!(body.kind, "method_not_allowed");
        assert!(
            body.value.contains(allow) && body.value.contains(method.as_str()),
            "{}",
            body.value
        );
    }
}

#[tokio::test]
async fn unknown_paths_under_fleetlock_get_a_json_404_and_others_a_plain_one() {
    for path in [
        "/fleetlock/",
        "/fleetlock/v2/pre-reboot",
        "/fleetlock/v1/lock",
        "/v1/x",
    ] {
        let body = expect_refusal(
            zincati_request(path, ZINCATI_BODY),
            StatusCode::NOT_FOUND,
            ErrorKind::UnknownEndpoint,
        )
        .await;
        assert!(body.value.contains("v1/pre-reboot"), "{}", body.value);
    }
    let (router, _) = offline_router();
    let response = router
        .oneshot(zincati_request("/elsewhere", ZINCATI_BODY))
        .await
        .expect("infallible");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn every_way_of_writing_the_base_url_reaches_the_endpoint() {
    // Each is refused for its missing header by the endpoint itself, not as an unknown path.
    for path in [
        "/fleetlock/v1/pre-reboot",
        "/v1/pre-reboot",
        "/fleetlock//v1/pre-reboot",
        "//fleetlock/v1//pre-reboot/",
    ] {
        let request = Request::builder()
            .method(Method::POST)
            .uri(path)
            .body(Body::from(ZINCATI_BODY))
            .expect("request");
        expect_refusal(
            request,
            StatusCode::BAD_REQUEST,
            ErrorKind::MissingFleetLockHeader,
        )
        .await;
    }
}

#[test]
fn paths_are_matched_without_empty_segments_and_with_or_without_the_prefix() {
    let pre_reboot = Route::Endpoint(Endpoint::PreReboot);
    for path in [
        "/fleetlock/v1/pre-reboot",
        "/fleetlock/v1/pre-reboot/",
        "/fleetlock//v1/pre-reboot",
        "//fleetlock///v1/pre-reboot//",
        // `Url::join("v1/pre-reboot")` on `http://svc/fleetlock` (no trailing slash).
        "/v1/pre-reboot",
    ] {
        assert_eq!(route(path), pre_reboot, "{path}");
    }
    assert_eq!(
        route("/fleetlock/v1/steady-state"),
        Route::Endpoint(Endpoint::SteadyState)
    );
    assert_eq!(route("/v1/status/"), Route::Endpoint(Endpoint::Status));
    for path in [
        "/fleetlock",
        "/fleetlock/v1",
        "/fleetlock/v1/pre-reboot/x",
        "/v1/",
    ] {
        assert_eq!(route(path), Route::UnknownEndpoint, "{path}");
    }
    for path in ["/", "/metrics", "/healthz", "/fleetlockv1/pre-reboot"] {
        assert_eq!(route(path), Route::Elsewhere, "{path}");
    }
}

#[test]
fn zincatis_pretty_printed_body_parses() {
    let params = parse_client_params(ZINCATI_BODY).expect("valid");
    assert_eq!(params.id, "074c268827d74fb59ed758e8940cd667");
    assert_eq!(params.group, "default");
}

#[test]
fn unknown_fields_are_tolerated() {
    let body = br#"{"client_params":{"id":"a","group":"g","extra":1},"version":2}"#;
    assert!(parse_client_params(body).is_ok());
}

#[test]
fn ids_are_normalised_without_case_and_dashes() {
    assert_eq!(
        normalize_id(" C988D250-9FDF-4CDC-BED3-9037C56406FB ").expect("valid"),
        "c988d2509fdf4cdcbed39037c56406fb"
    );
    assert!(normalize_id("").is_err());
    assert!(normalize_id("a b").is_err());
    assert!(normalize_id(&"a".repeat(129)).is_err());
}

#[test]
fn groups_follow_the_protocol_and_make_valid_object_names() {
    assert_eq!(normalize_group("Workers").expect("valid"), "workers");
    assert_eq!(normalize_group("tier.1-a").expect("valid"), "tier.1-a");
    for bad in [
        "",
        "a_b",
        "a b",
        "-a",
        "a.",
        "a..b",
        "a.-b",
        &"g".repeat(64),
    ] {
        assert!(normalize_group(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn error_kinds_are_distinct_and_map_to_4xx_or_5xx() {
    let names: BTreeSet<&str> = ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
    assert_eq!(names.len(), ErrorKind::ALL.len());
    for kind in ErrorKind::ALL {
        let status = kind.status();
        assert!(
            status.is_client_error() || status.is_server_error(),
            "{kind}"
        );
    }
    assert_eq!(
        ErrorKind::FailedLockSemaphoreFull.as_str(),
        "failed_lock_semaphore_full"
    );
    assert_eq!(ErrorKind::DrainInProgress.as_str(), "drain_in_progress");
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    fleetlock: FleetLockConfig,
}

#[test]
fn config_flags_have_defaults_and_parse_durations() {
    let cli = Cli::try_parse_from(["serve"]).expect("defaults");
    assert_eq!(cli.fleetlock.config_map, "dkron-ha-fleetlock");
    assert_eq!(cli.fleetlock.default_slots, 1);
    assert_eq!(cli.fleetlock.lock_ttl, None);
    assert_eq!(cli.fleetlock.drain_wait, Duration::from_secs(30));
    assert_eq!(cli.fleetlock.queue_timeout, Duration::from_secs(15 * 60));
    let cli = Cli::try_parse_from([
        "serve",
        "--fleetlock-namespace=ops",
        "--fleetlock-default-slots=2",
        "--fleetlock-lock-ttl=2h",
        "--fleetlock-drain-wait=500ms",
        "--fleetlock-eviction-concurrency=4",
        "--fleetlock-queue-timeout=30m",
    ])
    .expect("valid flags");
    assert_eq!(cli.fleetlock.queue_timeout, Duration::from_secs(30 * 60));
    assert_eq!(cli.fleetlock.namespace, "ops");
    assert_eq!(cli.fleetlock.default_slots, 2);
    assert_eq!(cli.fleetlock.lock_ttl, Some(Duration::from_secs(7200)));
    assert_eq!(cli.fleetlock.drain_wait, Duration::from_millis(500));
    assert_eq!(cli.fleetlock.eviction_concurrency, 4);
    assert!(Cli::try_parse_from(["serve", "--fleetlock-eviction-concurrency=0"]).is_err());
    assert!(Cli::try_parse_from(["serve", "--fleetlock-lock-ttl=soon"]).is_err());
}

#[test]
fn durations_take_common_units() {
    assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
    assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
    assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86400)));
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
    assert!(parse_duration("m").is_err());
    let error = parse_duration("5 parsecs").unwrap_err();
    assert!(
        error.contains("\"5 parsecs\"") && error.contains("30s, 15m or 2h"),
        "names the value and an example: {error}"
    );
}

#[tokio::test]
async fn merged_into_serves_plain_http_port_it_leaves_health_and_metrics_alone() {
    let (fleetlock, _) = offline_router();
    let state = dkron_ha::serve::HttpState {
        registry: Arc::new(Registry::default()),
        ready: Arc::new(std::sync::atomic::AtomicBool::new(true)),
    };
    let app = dkron_ha::serve::http_router(state).merge(fleetlock);
    let get = |path: &str| {
        Request::builder()
            .method(Method::GET)
            .uri(path)
            .body(Body::empty())
            .expect("request")
    };
    let (status, _) = send(app.clone(), get("/healthz")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = send(app.clone(), get("/metrics")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = send(app.clone(), get("/fleetlock/v1/nope")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body.expect("JSON").kind, "unknown_endpoint");
    let (status, body) = send(app, get("/nope")).await;
    assert_eq!((status, body), (StatusCode::NOT_FOUND, None));
}
