//! Admission benchmark (a bench binary, not a timed test).
//!
//! 1. injections per second of a typical StatefulSet (engine + JSON patch);
//! 2. admission requests per second and p50/p99 latency over TLS keep-alive, against a bare
//!    rustls + axum handler that returns a constant response, measured in the same run on the
//!    same listener code, so the ratio isolates what the admission path adds: over HTTP/2 on
//!    one connection (how kube-apiserver calls webhooks) and over 8 HTTP/1.1 connections. Two more servers
//!    show what reading the review alone costs: a bare handler that checks the body is JSON,
//!    and one that runs our review of a StatefulSet that does not opt in; another shows what
//!    `/mutate`'s limits and metrics cost around the bare handler.
//!
//! Run: `cargo bench --bench admission` (results are printed; BENCHMARKS.md records them).

use axum::Router;
use axum::routing::post;
use dkron_ha::admission;
use dkron_ha::certs::{CertRequest, generate};
use dkron_ha::inject::{InjectorConfig, Operation};
use dkron_ha::metrics::AdmissionMetrics;
use dkron_ha::serve::{AdmissionState, admission_limits, admission_router, serve_https};
use dkron_ha::tls::{ReloadingCert, server_config};
use std::sync::Arc;
use std::time::{Duration, Instant};

// The same allocator as the `dkron-ha` binary, so the numbers are the server's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const REVIEW: &str = include_str!("../tests/fixtures/admission/create-statefulset.json");

/// The review as the API server sends it: compact JSON (Go's encoding/json). The fixture is
/// indented to be read, and indentation alone is a fifth of the parse.
fn review_body() -> axum::body::Bytes {
    let value: serde_json::Value = serde_json::from_str(REVIEW).expect("fixture is JSON");
    serde_json::to_vec(&value).expect("JSON").into()
}
/// The same review as a StatefulSet applied with `kubectl apply` arrives: its metadata carries
/// the last-applied configuration (the manifest as one escaped JSON string) and managed fields
/// listing every field set. Not the goal's fixture; it shows how the ratio moves with a review
/// of a realistic size.
fn kubectl_applied_body() -> axum::body::Bytes {
    let mut review: serde_json::Value = serde_json::from_slice(&review_body()).expect("JSON");
    let object = &mut review["request"]["object"];
    let mut manifest = object.clone();
    for generated in ["creationTimestamp", "managedFields"] {
        manifest["metadata"]
            .as_object_mut()
            .unwrap()
            .remove(generated);
    }
    manifest.as_object_mut().unwrap().remove("status");
    let manifest = serde_json::to_string(&manifest).unwrap() + "\n";
    object["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"] =
        manifest.into();
    let fields =
        fields_v1(&serde_json::json!({"metadata": object["metadata"], "spec": object["spec"]}));
    object["metadata"]["managedFields"][0]["fieldsV1"] = fields;
    serde_json::to_vec(&review).expect("JSON").into()
}

/// A `fieldsV1` set naming every field of `value` (list items keyed by name, as for containers).
fn fields_v1(value: &serde_json::Value) -> serde_json::Value {
    use serde_json::{Map, Value};
    match value {
        Value::Object(members) => Value::Object(
            members
                .iter()
                .map(|(k, v)| (format!("f:{k}"), fields_v1(v)))
                .chain([(".".to_string(), Value::Object(Map::new()))])
                .collect(),
        ),
        Value::Array(items) => Value::Object(
            items
                .iter()
                .map(|item| match item.get("name") {
                    Some(name) => (format!("k:{{\"name\":{name}}}"), fields_v1(item)),
                    None => (format!("v:{item}"), Value::Object(Map::new())),
                })
                .collect(),
        ),
        _ => Value::Object(Map::new()),
    }
}

const CLIENTS: usize = 8;
const REQUESTS_PER_CLIENT: usize = 2_500;
const WARMUP_PER_CLIENT: usize = 200;

/// Calls of `work` per second on this thread, after a warm-up: a warm loop, no contention.
fn per_second(mut work: impl FnMut()) -> f64 {
    for _ in 0..1_000 {
        work();
    }
    let n = 20_000;
    let started = Instant::now();
    for _ in 0..n {
        work();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

fn injections_per_second() -> f64 {
    let review: serde_json::Value = serde_json::from_slice(&review_body()).unwrap();
    let object = review["request"]["object"].clone();
    let config = InjectorConfig::default();
    per_second(|| {
        let m = admission::mutate_statefulset(&object, Operation::Create, None, &config).unwrap();
        std::hint::black_box(m);
    })
}

/// Whole reviews (the webhook's hot path, response included) per second.
fn reviews_per_second() -> f64 {
    let body = review_body();
    let config = InjectorConfig::default();
    per_second(|| {
        let answer = admission::review(&body, &config).unwrap();
        std::hint::black_box(answer);
    })
}

struct LoadResult {
    rps: f64,
    /// CPU time of the whole process (server and client, user and system) per request. Steal
    /// time of a shared VM slows the wall clock but is not charged here, so this is the steadier
    /// figure.
    cpu_per_request: Duration,
    p50: Duration,
    p99: Duration,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

/// How the load generator talks to the server.
#[derive(Clone, Copy, PartialEq)]
enum Protocol {
    /// HTTP/1.1: `CLIENTS` keep-alive connections, one request at a time on each.
    Http1,
    /// HTTP/2 as kube-apiserver's webhook client uses it (client-go's transport negotiates h2
    /// by ALPN unless `DISABLE_HTTP2` is set): one connection, `CLIENTS` concurrent streams.
    Http2,
}

/// Starts `router` over TLS on a 2-thread server runtime and drives it from a separate
/// 1-thread client runtime with `CLIENTS` concurrent callers.
fn load(
    router: Router,
    body: axum::body::Bytes,
    ca_pem: &str,
    cert: Arc<ReloadingCert>,
    protocol: Protocol,
) -> LoadResult {
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = server_rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!(
        "https://127.0.0.1:{}/mutate",
        listener.local_addr().unwrap().port()
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    server_rt.spawn(serve_https(
        listener,
        server_config(cert).unwrap(),
        router,
        async {
            let _ = stopped.await;
        },
    ));

    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ca = ca_pem.to_string();
    let cpu_before = process_cpu();
    let result = client_rt.block_on(async move {
        let mut tasks = Vec::new();
        let new_client = || {
            let builder = reqwest::Client::builder()
                .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
                .pool_max_idle_per_host(1);
            match protocol {
                Protocol::Http1 => builder.http1_only(),
                Protocol::Http2 => builder.http2_prior_knowledge(),
            }
            .build()
            .unwrap()
        };
        let shared = new_client();
        if protocol == Protocol::Http2 {
            // Open the one connection before the callers race to.
            let r = shared.post(&url).body(body.clone()).send().await.unwrap();
            assert_eq!(r.version(), reqwest::Version::HTTP_2);
        }
        let started = Instant::now();
        for _ in 0..CLIENTS {
            let client = match protocol {
                Protocol::Http1 => new_client(),
                Protocol::Http2 => shared.clone(),
            };
            let url = url.clone();
            let body = body.clone();
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(REQUESTS_PER_CLIENT);
                for i in 0..WARMUP_PER_CLIENT + REQUESTS_PER_CLIENT {
                    let t = Instant::now();
                    let r = client.post(&url).body(body.clone()).send().await.unwrap();
                    assert_eq!(r.status(), 200);
                    let body = r.bytes().await.unwrap();
                    std::hint::black_box(body);
                    if i >= WARMUP_PER_CLIENT {
                        latencies.push(t.elapsed());
                    }
                }
                latencies
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        let elapsed = started.elapsed();
        all.sort();
        let total = CLIENTS * (WARMUP_PER_CLIENT + REQUESTS_PER_CLIENT);
        LoadResult {
            rps: total as f64 / elapsed.as_secs_f64(),
            cpu_per_request: (process_cpu() - cpu_before) / total as u32,
            p50: percentile(&all, 0.50),
            p99: percentile(&all, 0.99),
        }
    });
    let _ = stop.send(());
    drop(server_rt);
    result
}

fn main() {
    // The logger `serve` installs in a cluster (`--log-format json`, the default level), so the
    // admission path is measured as it runs there. It writes to stderr.
    dkron_ha::telemetry::init(dkron_ha::telemetry::LogFormat::Json, "info").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let certs = generate(&CertRequest {
        service: "dkron-ha".into(),
        namespace: "bench".into(),
        extra_names: vec!["127.0.0.1".into()],
        valid_days: 1,
    })
    .unwrap();
    certs.write_to(dir.path()).unwrap();
    let cert = || {
        Arc::new(
            ReloadingCert::new(dir.path().join("tls.crt"), dir.path().join("tls.key")).unwrap(),
        )
    };

    // For profilers: `DKRON_HA_BENCH_ONLY=/mutate perf record ...` loads only the servers whose
    // name contains the text, once each, and skips the warm loops.
    let only = std::env::var("DKRON_HA_BENCH_ONLY").ok();
    // One review's time in the warm loop (a typical figure when the loop is skipped).
    let mut review_time = Duration::from_micros(6);
    if only.is_none() {
        let rps = reviews_per_second();
        review_time = Duration::from_secs_f64(1.0 / rps);
        println!(
            "review (hot path, warm loop): {rps:.0} reviews/s ({:.1} µs each)",
            1e6 / rps
        );
        let ips = injections_per_second();
        println!(
            "injection engine: {ips:.0} injections/s ({:.1} µs each)",
            1e6 / ips
        );
    }

    // A constant answer of the same shape and size as a real patched response. The handler
    // reads the request body like any real handler, so the difference is the admission work.
    let constant = {
        let answer = admission::review(&review_body(), &InjectorConfig::default()).unwrap();
        answer.body
    };
    let bare_answering = |constant: Vec<u8>| {
        Router::new().route(
            "/mutate",
            post(move |_req: axum::body::Bytes| {
                let body = constant.clone();
                async move { ([("content-type", "application/json")], body) }
            }),
        )
    };
    let bare = bare_answering(constant.clone());
    // Calibration: the bare handler plus a busy loop as long as one review takes in the warm
    // loop. Tiny code and no memory, so it shows what that much work costs when nothing else
    // evicts it from the caches; the gap to /mutate is what serving does to our code's speed.
    let busy = Router::new().route(
        "/mutate",
        post({
            let constant = constant.clone();
            move |_req: axum::body::Bytes| {
                let body = constant.clone();
                async move {
                    let started = Instant::now();
                    while started.elapsed() < review_time {
                        std::hint::spin_loop();
                    }
                    ([("content-type", "application/json")], body)
                }
            }
        }),
    );
    let applied = kubectl_applied_body();
    let bare_applied = bare_answering(
        admission::review(&applied, &InjectorConfig::default())
            .unwrap()
            .body,
    );
    // The least any conforming webhook does: check that the body is JSON (a malformed review
    // must get a 400), then answer the constant. Not a goal baseline; it shows how much of the
    // gap the JSON parse alone takes.
    let parse_only = {
        let constant = constant.clone();
        Router::new().route(
            "/mutate",
            post(move |req: axum::body::Bytes| {
                let body = constant.clone();
                async move {
                    let valid = serde_json::from_slice::<serde::de::IgnoredAny>(&req).is_ok();
                    assert!(valid, "the review is JSON");
                    ([("content-type", "application/json")], body)
                }
            }),
        )
    };
    // Our own parse and nothing else: `/mutate`'s review of the same StatefulSet without the
    // opt-in annotation, which stops once the review is read. The client sends that body; the
    // handler answers the patched constant. Not a goal baseline either.
    let not_opted_in = {
        let mut review: serde_json::Value = serde_json::from_slice(&review_body()).unwrap();
        review["request"]["object"]["metadata"]["annotations"]["dkron-ha/enabled"] =
            serde_json::json!("false");
        axum::body::Bytes::from(serde_json::to_vec(&review).unwrap())
    };
    let our_parse = {
        let constant = constant.clone();
        let config = Arc::new(InjectorConfig::default());
        Router::new().route(
            "/mutate",
            post(move |req: axum::body::Bytes| {
                let (body, config) = (constant.clone(), config.clone());
                async move {
                    let answer = admission::review(&req, &config).expect("a review");
                    assert_eq!(answer.verdict, admission::Verdict::Unchanged);
                    ([("content-type", "application/json")], body)
                }
            }),
        )
    };
    // What `/mutate` does around the review: its limits (body size, timeout) and the metrics
    // it records, around the bare handler. Not a goal baseline: it shows what that costs.
    let limited = {
        let constant = constant.clone();
        let metrics =
            AdmissionMetrics::register(&mut prometheus_client::registry::Registry::default());
        admission_limits(Router::new().route(
            "/mutate",
            post(move |_req: axum::body::Bytes| {
                let (body, metrics) = (constant.clone(), metrics.clone());
                async move {
                    let started = Instant::now();
                    metrics.observe("CREATE", "patched", started.elapsed());
                    ([("content-type", "application/json")], body)
                }
            }),
        ))
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let ours = admission_router(AdmissionState {
        injector: Arc::new(InjectorConfig::default()),
        metrics: AdmissionMetrics::register(&mut registry),
    });

    const OURS: usize = 3;
    const APPLIED_BARE: usize = 6;
    let servers = [
        ("bare rustls+axum constant", bare, review_body()),
        ("bare + JSON check of body", parse_only, review_body()),
        ("bare + our review parse", our_parse, not_opted_in),
        ("dkron-ha /mutate", ours.clone(), review_body()),
        ("bare + busy loop of 1 review", busy, review_body()),
        ("bare + our limits, metrics", limited, review_body()),
        (
            "bare, kubectl-applied review",
            bare_applied,
            applied.clone(),
        ),
        ("/mutate, kubectl-applied", ours, applied.clone()),
    ];
    assert_eq!(servers[APPLIED_BARE].0, "bare, kubectl-applied review");
    assert_eq!(servers[OURS].0, "dkron-ha /mutate");
    if let Some(only) = only {
        // `DKRON_HA_BENCH_H2=1`: over HTTP/2 instead.
        let protocol = match std::env::var("DKRON_HA_BENCH_H2").as_deref() {
            Ok("1") => Protocol::Http2,
            _ => Protocol::Http1,
        };
        for (name, router, body) in servers.iter().filter(|(n, _, _)| n.contains(&only)) {
            let r = load(
                router.clone(),
                body.clone(),
                &certs.ca_cert_pem,
                cert(),
                protocol,
            );
            println!(
                "  {name:<30} {:>8.0} req/s  p50 {:>9.1?}  p99 {:>9.1?}  cpu/request {:>8.1?}",
                r.rps, r.p50, r.p99, r.cpu_per_request
            );
        }
        return;
    }
    // The servers in `which`, alternated twice so drift on a shared machine hits all alike; the
    // best of two runs of each, by index into `servers`.
    let measure = |which: &[usize], protocol: Protocol| -> Vec<Option<Best>> {
        let mut runs: Vec<Vec<LoadResult>> = servers.iter().map(|_| Vec::new()).collect();
        for _ in 0..2 {
            for &i in which {
                let (_, router, body) = &servers[i];
                runs[i].push(load(
                    router.clone(),
                    body.clone(),
                    &certs.ca_cert_pem,
                    cert(),
                    protocol,
                ));
            }
        }
        runs.iter()
            .map(|runs| (!runs.is_empty()).then(|| Best::of(runs)))
            .collect()
    };
    let all: Vec<usize> = (0..servers.len()).collect();
    let http1 = measure(&all, Protocol::Http1);
    // Server-side time per review, from the handler's own histogram (both runs of ours).
    let text = dkron_ha::metrics::encode(&registry).unwrap();
    let metric = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(f64::NAN)
    };
    let handler_mean = metric("dkron_ha_admission_duration_seconds_sum")
        / metric("dkron_ha_admission_duration_seconds_count");
    // The goal's pair and the kubectl-applied pair again, over HTTP/2.
    let http2 = measure(&[0, OURS, APPLIED_BARE, APPLIED_BARE + 1], Protocol::Http2);

    // Each measured server against the bare handler answering the same review.
    let rows = |results: &[Option<Best>]| {
        for (i, b) in results.iter().enumerate() {
            let (Some(b), Some(base)) =
                (b, results[if i < APPLIED_BARE { 0 } else { APPLIED_BARE }])
            else {
                continue;
            };
            println!(
                "  {:<30} {:>8.0} req/s  p50 {:>9.1?}  p99 {:>9.1?}  cpu/request {:>8.1?}  ratio {:.2} (cpu {:.2})",
                servers[i].0,
                b.rps,
                b.p50,
                b.p99,
                b.cpu,
                b.rps / base.rps,
                base.cpu.as_secs_f64() / b.cpu.as_secs_f64(),
            );
        }
    };
    let verdict = |results: &[Option<Best>]| {
        let (ours, bare) = results[OURS]
            .zip(results[0])
            .expect("the goal's pair is measured over each protocol");
        println!(
            "  throughput ratio {:.2} (goal >= 0.80); p99 added {:.3} ms (goal < 1 ms); p50 added {:.3} ms",
            ours.rps / bare.rps,
            (ours.p99.as_secs_f64() - bare.p99.as_secs_f64()) * 1e3,
            (ours.p50.as_secs_f64() - bare.p50.as_secs_f64()) * 1e3,
        );
        println!(
            "  cpu ratio {:.2} (bare cpu/request over ours: the throughput ratio of a CPU-bound, unshared machine)",
            bare.cpu.as_secs_f64() / ours.cpu.as_secs_f64(),
        );
    };

    println!(
        "HTTP/1.1: {CLIENTS} keep-alive TLS connections x {REQUESTS_PER_CLIENT} requests (best of 2 runs each):"
    );
    rows(&http1);
    println!("  (busy loop: {review_time:.1?}, one review's time in the warm loop)");
    println!(
        "  (the last two: the review of a StatefulSet applied with kubectl, {} bytes instead of {}; ratios against the bare handler answering it)",
        applied.len(),
        review_body().len()
    );
    println!(
        "  /mutate handler (review only, under load, both reviews): mean {:.1} µs",
        handler_mean * 1e6
    );
    verdict(&http1);

    println!(
        "HTTP/2 (as kube-apiserver calls webhooks): one TLS connection, {CLIENTS} concurrent streams x {REQUESTS_PER_CLIENT} requests (best of 2 runs each):"
    );
    rows(&http2);
    verdict(&http2);
}

/// The best of a server's runs: the highest rate, the lowest latencies and CPU time.
#[derive(Clone, Copy)]
struct Best {
    rps: f64,
    p50: Duration,
    p99: Duration,
    cpu: Duration,
}

impl Best {
    fn of(runs: &[LoadResult]) -> Best {
        Best {
            rps: runs.iter().map(|r| r.rps).fold(0.0, f64::max),
            p50: runs.iter().map(|r| r.p50).min().unwrap(),
            p99: runs.iter().map(|r| r.p99).min().unwrap(),
            cpu: runs.iter().map(|r| r.cpu_per_request).min().unwrap(),
        }
    }
}

/// User and system CPU time of this process so far.
fn process_cpu() -> Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    let usage = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage of this process");
    let time = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    time(usage.user_time()) + time(usage.system_time())
}
