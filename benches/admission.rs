//! Admission benchmark (a bench binary, not a timed test).
//!
//! 1. one review answered in a warm loop (parse, injection, JSON patch, response);
//! 2. requests per second, p50/p99 latency and CPU per request of `/mutate` against a bare
//!    rustls + axum handler that answers a constant response of the same size, on the same
//!    listener code in the same run, over HTTP/2 on one connection with concurrent streams (how
//!    kube-apiserver calls webhooks), for the review fixture and a kubectl-applied one;
//! 3. the shipped binary (`dkron-ha serve`, no Kubernetes API reachable): its size and its RSS
//!    idle and after the same load.
//!
//! Run: `cargo bench --bench admission` (results are printed; BENCHMARKS.md records them).

use axum::Router;
use axum::routing::post;
use dkron_ha::admission;
use dkron_ha::certs::{CertRequest, generate};
use dkron_ha::inject::InjectorConfig;
use dkron_ha::metrics::AdmissionMetrics;
use dkron_ha::serve::{AdmissionState, admission_router, serve_https};
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

/// Concurrent streams of the saturated runs.
const CLIENTS: usize = 8;
const REQUESTS_PER_CLIENT: usize = 2_500;
const WARMUP_PER_CLIENT: usize = 200;

/// One whole review (parse, injection, patch, response) in a warm loop, no contention.
fn review_time() -> Duration {
    let body = review_body();
    let config = InjectorConfig::default();
    let once = || {
        let answer = admission::review(&body, &config).unwrap();
        std::hint::black_box(answer);
    };
    for _ in 0..1_000 {
        once();
    }
    let n = 10_000;
    let started = Instant::now();
    for _ in 0..n {
        once();
    }
    started.elapsed() / n
}

#[derive(Clone, Copy)]
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

/// Drives `url` from a 1-thread client runtime over one HTTP/2 connection with `streams`
/// concurrent streams, as client-go's transport does (it negotiates h2 by ALPN).
fn drive(url: &str, body: &axum::body::Bytes, ca_pem: &str, streams: usize) -> LoadResult {
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cpu_before = process_cpu();
    client_rt.block_on(async move {
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
            .http2_prior_knowledge()
            .build()
            .unwrap();
        // Open the one connection before the callers race to.
        let r = client.post(url).body(body.clone()).send().await.unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        let started = Instant::now();
        let tasks: Vec<_> = (0..streams)
            .map(|_| {
                let (client, url, body) = (client.clone(), url.to_string(), body.clone());
                tokio::spawn(async move {
                    let mut latencies = Vec::with_capacity(REQUESTS_PER_CLIENT);
                    for i in 0..WARMUP_PER_CLIENT + REQUESTS_PER_CLIENT {
                        let t = Instant::now();
                        let r = client.post(&url).body(body.clone()).send().await.unwrap();
                        assert_eq!(r.status(), 200);
                        std::hint::black_box(r.bytes().await.unwrap());
                        if i >= WARMUP_PER_CLIENT {
                            latencies.push(t.elapsed());
                        }
                    }
                    latencies
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        let elapsed = started.elapsed();
        all.sort();
        let total = streams * (WARMUP_PER_CLIENT + REQUESTS_PER_CLIENT);
        LoadResult {
            rps: total as f64 / elapsed.as_secs_f64(),
            cpu_per_request: (process_cpu() - cpu_before) / total as u32,
            p50: percentile(&all, 0.50),
            p99: percentile(&all, 0.99),
        }
    })
}

/// Starts `router` over TLS on a 2-thread server runtime in this process and drives it.
fn load(
    router: Router,
    body: &axum::body::Bytes,
    ca_pem: &str,
    cert: Arc<ReloadingCert>,
    streams: usize,
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
    let result = drive(&url, body, ca_pem, streams);
    let _ = stop.send(());
    drop(server_rt);
    result
}

/// A handler that reads the body and answers `constant`: what any webhook costs at least.
fn bare(constant: Vec<u8>) -> Router {
    Router::new().route(
        "/mutate",
        post(move |_req: axum::body::Bytes| {
            let body = constant.clone();
            async move { ([("content-type", "application/json")], body) }
        }),
    )
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

    println!("review in a warm loop: {:.1?}", review_time());

    let config = InjectorConfig::default();
    let ours = admission_router(AdmissionState {
        injector: Arc::new(config.clone()),
        metrics: AdmissionMetrics::register(&mut prometheus_client::registry::Registry::default()),
    });
    println!(
        "HTTP/2, one TLS connection, 1 stream (reviews one at a time, as they arrive) and {CLIENTS} concurrent streams (saturated), {REQUESTS_PER_CLIENT} requests per stream, alternated, best of 3:"
    );
    for (fixture, body, streams) in [
        ("review fixture, 1 stream", review_body(), 1),
        ("review fixture, 8 streams", review_body(), CLIENTS),
        (
            "kubectl-applied, 8 streams",
            kubectl_applied_body(),
            CLIENTS,
        ),
    ] {
        let constant = admission::review(&body, &config).unwrap().body;
        let servers = [
            ("bare rustls+axum", bare(constant)),
            ("/mutate", ours.clone()),
        ];
        let mut best: [Option<LoadResult>; 2] = [None, None];
        for _ in 0..3 {
            for (i, (_, router)) in servers.iter().enumerate() {
                let r = load(router.clone(), &body, &certs.ca_cert_pem, cert(), streams);
                best[i] = Some(best[i].map_or(r, |b| LoadResult {
                    rps: b.rps.max(r.rps),
                    cpu_per_request: b.cpu_per_request.min(r.cpu_per_request),
                    p50: b.p50.min(r.p50),
                    p99: b.p99.min(r.p99),
                }));
            }
        }
        let [Some(base), Some(mutate)] = best else {
            unreachable!("both measured")
        };
        println!("  {fixture} ({} bytes):", body.len());
        for ((name, _), r) in servers.iter().zip([base, mutate]) {
            println!(
                "    {name:<18} {:>8.0} req/s  p50 {:>8.1?}  p99 {:>8.1?}  cpu/request {:>7.1?}",
                r.rps, r.p50, r.p99, r.cpu_per_request
            );
        }
        println!(
            "    p99 added {:.3} ms (goal < 1 ms), p50 added {:.3} ms, cpu/request added {:.1?}, throughput ratio {:.2}",
            (mutate.p99.as_secs_f64() - base.p99.as_secs_f64()) * 1e3,
            (mutate.p50.as_secs_f64() - base.p50.as_secs_f64()) * 1e3,
            mutate.cpu_per_request.saturating_sub(base.cpu_per_request),
            mutate.rps / base.rps,
        );
    }

    shipped_binary(dir.path(), &certs.ca_cert_pem);
}

/// The shipped binary as a process of its own: size, and RSS idle and after the same load.
fn shipped_binary(certs: &std::path::Path, ca_pem: &str) {
    let bin = env!("CARGO_BIN_EXE_dkron-ha");
    let size = std::fs::metadata(bin).unwrap().len();
    let port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (https, http) = (port(), port());
    let mut child = std::process::Command::new(bin)
        .args(["serve", "--log-format", "json"])
        .env("DKRON_HA_HTTPS_ADDR", format!("127.0.0.1:{https}"))
        .env("DKRON_HA_HTTP_ADDR", format!("127.0.0.1:{http}"))
        .env("DKRON_HA_TLS_CERT", certs.join("tls.crt"))
        .env("DKRON_HA_TLS_KEY", certs.join("tls.key"))
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        .env("KUBERNETES_SERVICE_PORT", "1")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let healthz = format!("http://127.0.0.1:{http}/healthz");
    let up = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        std::net::TcpStream::connect(("127.0.0.1", https)).is_ok()
    });
    assert!(up, "serve did not listen ({healthz})");
    std::thread::sleep(Duration::from_secs(1));
    let idle = rss_kib(child.id());
    let r = drive(
        &format!("https://127.0.0.1:{https}/mutate"),
        &review_body(),
        ca_pem,
        CLIENTS,
    );
    let loaded = rss_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "dkron-ha serve (release binary, {:.1} MiB): RSS idle {:.1} MiB, after {} reviews {:.1} MiB (peak {:.1} MiB); {:.0} req/s, p99 {:.1?}",
        size as f64 / 1048576.0,
        idle.0 as f64 / 1024.0,
        CLIENTS * (WARMUP_PER_CLIENT + REQUESTS_PER_CLIENT),
        loaded.0 as f64 / 1024.0,
        loaded.1 as f64 / 1024.0,
        r.rps,
        r.p99,
    );
}

/// VmRSS and VmHWM (peak) of a process, in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
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
