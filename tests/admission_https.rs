//! The admission webhook over real HTTPS: a rustls client trusting an rcgen CA talks to
//! `serve`'s listeners on loopback, as the API server would.

mod support;

use base64::Engine as _;
use dkron_ha::certs::{CertRequest, generate};
use dkron_ha::serve::{InjectorArgs, ServeArgs, Server};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;

const REVIEW: &str = include_str!("fixtures/admission/create-statefulset.json");

struct Running {
    https: String,
    http: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        support::stop_task(self.stop, self.task, "the webhook server").await;
    }
}

/// Writes a certificate pair the way a Kubernetes Secret volume does: files are symlinks
/// through `..data`, which points at a timestamped directory and is swapped atomically.
fn write_secret_volume(dir: &Path, generation: &str, cert: &str, key: &str) {
    let data = dir.join(format!("..{generation}"));
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("tls.crt"), cert).unwrap();
    std::fs::write(data.join("tls.key"), key).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..{generation}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for name in ["tls.crt", "tls.key"] {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link).unwrap();
        }
    }
}

fn loopback_certs() -> dkron_ha::certs::GeneratedCerts {
    generate(&CertRequest {
        service: "dkron-ha".into(),
        namespace: "dkron-ha".into(),
        extra_names: vec!["127.0.0.1".into(), "localhost".into()],
        valid_days: 1,
    })
    .unwrap()
}

/// `serve`'s arguments for loopback ports and the certificate in `dir`.
fn serve_args(dir: &Path) -> ServeArgs {
    ServeArgs {
        https_addr: "127.0.0.1:0".parse().unwrap(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        tls_cert: dir.join("tls.crt"),
        tls_key: dir.join("tls.key"),
        tls_reload_seconds: 1,
        injector: InjectorArgs {
            inject_image: "dkron-ha:test".into(),
            cluster_domain: "cluster.local".into(),
            native_sidecar: false,
        },
    }
}

async fn start(dir: &Path) -> Running {
    let server = Server::bind(&serve_args(dir)).await.expect("bind");
    let https = format!("https://127.0.0.1:{}", server.https_addr().unwrap().port());
    let http = format!("http://127.0.0.1:{}", server.http_addr().unwrap().port());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        server
            .run(async {
                let _ = rx.await;
            })
            .await
            .expect("serve");
    });
    Running {
        https,
        http,
        stop: Some(tx),
        task,
    }
}

/// A client trusting `ca_pem`, negotiating HTTP/2 or HTTP/1.1 by ALPN as the server offers.
fn client(ca_pem: &str) -> reqwest::Client {
    client_builder(ca_pem).build().unwrap()
}

fn client_builder(ca_pem: &str) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(10))
}

/// One client per protocol the webhook serves: kube-apiserver's webhook client speaks HTTP/2
/// (client-go negotiates it unless `DISABLE_HTTP2` is set); HTTP/1.1 for everyone else.
fn clients_of_each_protocol(ca_pem: &str) -> [(reqwest::Version, reqwest::Client); 2] {
    [
        (
            reqwest::Version::HTTP_2,
            client_builder(ca_pem)
                .http2_prior_knowledge()
                .build()
                .unwrap(),
        ),
        (
            reqwest::Version::HTTP_11,
            client_builder(ca_pem).http1_only().build().unwrap(),
        ),
    ]
}

async fn post(client: &reqwest::Client, url: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
    post_with_version(client, url, body).await.1
}

/// The answer's HTTP version, status and body (JSON when it is JSON).
async fn post_with_version(
    client: &reqwest::Client,
    url: &str,
    body: impl Into<reqwest::Body>,
) -> (reqwest::Version, (u16, Value)) {
    let response = client
        .post(format!("{url}/mutate"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request");
    let version = response.version();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        version,
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ),
    )
}

fn secret_dir() -> (tempfile::TempDir, PathBuf, dkron_ha::certs::GeneratedCerts) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let certs = loopback_certs();
    write_secret_volume(&dir, "gen1", &certs.cert_pem, &certs.key_pem);
    (tmp, dir, certs)
}

#[tokio::test]
async fn an_opted_in_statefulset_gets_a_base64_json_patch_that_injects_it() {
    let (_tmp, dir, certs) = secret_dir();
    let server = start(&dir).await;
    for (version, client) in clients_of_each_protocol(&certs.ca_cert_pem) {
        let (answered, (status, body)) = post_with_version(&client, &server.https, REVIEW).await;
        assert_eq!(answered, version);
        assert_patched(status, &body);
    }
    server.stop().await;
}

fn assert_patched(status: u16, body: &Value) {
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(body["kind"], "AdmissionReview");
    let response = &body["response"];
    assert_eq!(response["uid"], "5f3b2c1e-8d7a-4b6c-9e0f-1a2b3c4d5e6f");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let patch = response["patch"]
        .as_str()
        .expect("patch is a string, not an array of numbers");
    assert!(!patch.contains('\n'), "single-line base64");
    let patch: json_patch::Patch = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(patch)
            .unwrap(),
    )
    .unwrap();
    let review: Value = serde_json::from_str(REVIEW).unwrap();
    let mut object = review["request"]["object"].clone();
    json_patch::patch(&mut object, &patch).unwrap();
    let pod = &object["spec"]["template"]["spec"];
    assert_eq!(pod["containers"][0]["command"][0], "/dkron-ha/bin/dkron-ha");
    assert_eq!(pod["containers"][1]["name"], "dkron-ha-label-updater");
    assert_eq!(pod["initContainers"][0]["name"], "dkron-ha-install");
    assert_eq!(pod["serviceAccountName"], "dkron-dkron-ha");
    assert_eq!(object["spec"]["podManagementPolicy"], "Parallel");
    // Fields the API server defaulted are untouched.
    assert_eq!(
        pod["containers"][0]["terminationMessagePath"],
        "/dev/termination-log"
    );
}

#[tokio::test]
async fn objects_that_do_not_opt_in_are_allowed_without_a_patch() {
    let (_tmp, dir, certs) = secret_dir();
    let server = start(&dir).await;
    let client = client(&certs.ca_cert_pem);
    let mut review: Value = serde_json::from_str(REVIEW).unwrap();
    review["request"]["object"]["metadata"]["annotations"] = json!({});
    let (status, body) = post(&client, &server.https, review.to_string()).await;
    assert_eq!(status, 200);
    assert_eq!(body["response"]["allowed"], true);
    assert!(body["response"].get("patch").is_none());
    assert!(body["response"].get("patchType").is_none());

    // Not a StatefulSet at all, and a DELETE: allowed unchanged.
    let mut other = serde_json::from_str::<Value>(REVIEW).unwrap();
    other["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    let (_, body) = post(&client, &server.https, other.to_string()).await;
    assert_eq!(body["response"]["allowed"], true);
    assert!(body["response"].get("patch").is_none());
    let mut delete = serde_json::from_str::<Value>(REVIEW).unwrap();
    delete["request"]["operation"] = json!("DELETE");
    delete["request"]["object"] = Value::Null;
    let (_, body) = post(&client, &server.https, delete.to_string()).await;
    assert_eq!(body["response"]["allowed"], true);
    server.stop().await;
}

#[tokio::test]
async fn an_invalid_annotation_is_denied_with_a_message() {
    let (_tmp, dir, certs) = secret_dir();
    let server = start(&dir).await;
    let mut review: Value = serde_json::from_str(REVIEW).unwrap();
    review["request"]["object"]["metadata"]["annotations"]["dkron-ha/initial-cluster-size"] =
        json!("lots");
    let (status, body) = post(
        &client(&certs.ca_cert_pem),
        &server.https,
        review.to_string(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["response"]["allowed"], false);
    let message = body["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("dkron-ha/initial-cluster-size"),
        "{message}"
    );
    assert!(body["response"].get("patch").is_none());
    server.stop().await;
}

#[tokio::test]
async fn malformed_reviews_get_400_with_a_message_and_the_server_keeps_answering() {
    let (_tmp, dir, certs) = secret_dir();
    let server = start(&dir).await;
    for (version, client) in clients_of_each_protocol(&certs.ca_cert_pem) {
        malformed_reviews_get_400(&server, &client, version).await;
    }
    server.stop().await;
}

async fn malformed_reviews_get_400(
    server: &Running,
    client: &reqwest::Client,
    version: reqwest::Version,
) {
    let cases: Vec<(String, &str)> = vec![
        ("not json".into(), "not an AdmissionReview"),
        ("{}".into(), "apiVersion"),
        (json!({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"}).to_string(), "admission.k8s.io/v1"),
        (json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).to_string(), "no request"),
        (json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": "", "kind": {"group": "apps", "version": "v1", "kind": "StatefulSet"}, "resource": {"group": "apps", "version": "v1", "resource": "statefulsets"}, "operation": "CREATE", "userInfo": {}}}).to_string(), "uid"),
        (json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": 7}}).to_string(), "not an AdmissionReview"),
        ("\u{0}\u{ff}[[[[".into(), "not an AdmissionReview"),
    ];
    for (body, needle) in cases {
        let (answered, (status, answer)) =
            post_with_version(client, &server.https, body.clone()).await;
        assert_eq!(answered, version);
        assert_eq!(status, 400, "{version:?} {body:?} -> {answer}");
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(needle),
            "{body:?}: {message:?} lacks {needle:?}"
        );
    }
    // An opted-in object that is not a StatefulSet shape: denial, not a crash.
    let mut review: Value = serde_json::from_str(REVIEW).unwrap();
    review["request"]["object"]["spec"] = json!("nonsense");
    let (status, answer) = post(client, &server.https, review.to_string()).await;
    assert_eq!(status, 200);
    assert_eq!(answer["response"]["allowed"], false, "{answer}");

    // Over the body limit: refused before it is buffered whole.
    let huge = vec![b' '; dkron_ha::serve::MAX_REVIEW_BYTES + 1];
    let (status, _) = post(client, &server.https, huge).await;
    assert_eq!(status, 413, "{version:?}");

    let (status, _) = post(client, &server.https, REVIEW).await;
    assert_eq!(status, 200, "{version:?}: still serving after bad input");
}

#[tokio::test]
async fn readiness_waits_for_every_gate_and_health_does_not() {
    let (_tmp, dir, _certs) = secret_dir();
    let mut server = Server::bind(&serve_args(&dir)).await.expect("bind");
    let http = format!("http://127.0.0.1:{}", server.http_addr().unwrap().port());
    let (open, gate) = tokio::sync::oneshot::channel::<()>();
    server.ready_after(Box::pin(async move {
        let _ = gate.await;
    }));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        server
            .run(async {
                let _ = stopped.await;
            })
            .await
            .expect("serve");
    });
    let plain = reqwest::Client::new();
    let status = async |path: &str| {
        plain
            .get(format!("{http}{path}"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(status("/healthz").await, 200);
    assert_eq!(status("/readyz").await, 503, "ready before its gate opened");
    open.send(()).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while status("/readyz").await != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "not ready after its gate opened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.send(()).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn health_readiness_and_metrics_are_served_over_plain_http() {
    let (_tmp, dir, certs) = secret_dir();
    let server = start(&dir).await;
    let tls = client(&certs.ca_cert_pem);
    post(&tls, &server.https, REVIEW).await;
    post(&tls, &server.https, "garbage").await;
    let plain = reqwest::Client::new();
    for path in ["/healthz", "/readyz"] {
        let r = plain
            .get(format!("{}{path}", server.http))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    let metrics = plain
        .get(format!("{}/metrics", server.http))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            r#"dkron_ha_admission_requests_total{operation="CREATE",result="patched"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"dkron_ha_admission_requests_total{operation="unknown",result="malformed"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("dkron_ha_admission_duration_seconds_count 2"),
        "{metrics}"
    );
    let healthz = tls
        .get(format!("{}/healthz", server.https))
        .send()
        .await
        .unwrap();
    assert_eq!(healthz.status(), 200);
    server.stop().await;
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_a_restart() {
    let (_tmp, dir, old) = secret_dir();
    let server = start(&dir).await;
    let (status, _) = post(&client(&old.ca_cert_pem), &server.https, REVIEW).await;
    assert_eq!(status, 200);

    // A broken pair written first is ignored: the old certificate keeps serving.
    write_secret_volume(&dir, "broken", "not a certificate", "not a key");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (status, _) = post(&client(&old.ca_cert_pem), &server.https, REVIEW).await;
    assert_eq!(
        status, 200,
        "a broken rotation must not take the webhook down"
    );

    let new = loopback_certs();
    write_secret_volume(&dir, "gen2", &new.cert_pem, &new.key_pem);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        // Fresh clients: no TLS session reuse, every attempt is a full handshake.
        let with_new = client(&new.ca_cert_pem)
            .post(format!("{}/mutate", server.https))
            .body(REVIEW)
            .send()
            .await;
        if with_new.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "new certificate never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let with_old = client(&old.ca_cert_pem)
        .post(format!("{}/mutate", server.https))
        .body(REVIEW)
        .send()
        .await;
    assert!(with_old.is_err(), "the old certificate is still served");
    server.stop().await;
}

#[tokio::test]
async fn shutdown_closes_kept_alive_connections_and_stops_listening() {
    let (_tmp, dir, certs) = secret_dir();
    let mut server = start(&dir).await;
    // Connections kept alive after an answer, as the API server keeps them between reviews.
    let clients = clients_of_each_protocol(&certs.ca_cert_pem);
    for (version, client) in &clients {
        let (seen, (status, _)) = post_with_version(client, &server.https, REVIEW).await;
        assert_eq!((seen, status), (*version, 200));
    }
    let _ = server.stop.take().map(|s| s.send(()));
    tokio::time::timeout(Duration::from_secs(30), &mut server.task)
        .await
        .expect("serve stops although clients keep connections open")
        .expect("serve ended without a panic");
    for (_, client) in &clients {
        let after = client
            .post(format!("{}/mutate", server.https))
            .body(REVIEW)
            .send()
            .await;
        assert!(
            after.is_err(),
            "a stopped webhook still answered: {after:?}"
        );
    }
}
