//! The admission webhook proven against a real kube-apiserver (tests/support): the API server
//! itself calls an in-test `dkron-ha serve` over HTTPS on loopback, through the
//! MutatingWebhookConfiguration users install (webhook-config/webhook.yaml: matchConditions,
//! failurePolicy Fail, reinvocationPolicy IfNeeded, sideEffects None), with only its
//! clientConfig and namespaceSelector changed.
//!
//! Each test has its own namespace, its own `serve` and its own webhook configuration, scoped to
//! that namespace by a namespaceSelector, so the tests of this binary run in parallel.

mod support;

use support::{eventually, named};

use std::collections::BTreeMap;
use std::time::Duration;

use axum::http;
use dkron_ha::certs::{CertRequest, GeneratedCerts, generate};
use dkron_ha::serve::{InjectorArgs, ServeArgs, Server};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde::Deserialize as _;
use serde_json::{Value, json};
use support::ControlPlane;

/// The StatefulSet the README tells users to try; the golden file is its expected injection.
const EXAMPLE: &str = include_str!("../examples/dkron.yaml");
const GOLDEN: &str = include_str!("fixtures/inject/args-only-entrypoint.out.yaml");
/// The image the golden file was made with.
const INJECT_IMAGE: &str = "registry.example.com/dkron-ha:test";
/// The configuration users install (rendered from the chart), which the tests point at their
/// own `serve` and namespace.
const SHIPPED_WEBHOOK: &str = include_str!("../webhook-config/webhook.yaml");
const WRAPPER: [&str; 4] = [
    "/dkron-ha/bin/dkron-ha",
    "wrap",
    "--",
    "/usr/local/bin/dkron",
];
const INJECTED_ENV: [&str; 8] = [
    "DKRON_HA_STATEFULSET",
    "DKRON_HA_SERVICE",
    "DKRON_HA_INITIAL_CLUSTER_SIZE",
    "DKRON_HA_CLUSTER_DOMAIN",
    "DKRON_HA_LEADER_SERVICE",
    "POD_NAME",
    "POD_NAMESPACE",
    "POD_IP",
];

#[tokio::test]
async fn an_opted_in_statefulset_is_stored_injected() {
    let (client, ns, webhook) = setup("stored").await;
    let statefulsets = Api::<StatefulSet>::namespaced(client, &ns);

    statefulsets
        .create(&PostParams::default(), &example("dkron"))
        .await
        .expect("create the example StatefulSet");
    let stored = statefulsets.get("dkron").await.expect("get StatefulSet");

    let spec = stored.spec.as_ref().expect("spec");
    assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
    let template_annotations = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.as_ref());
    assert_eq!(
        template_annotations
            .and_then(|a| a.get("dkron-ha/injected"))
            .map(String::as_str),
        Some(dkron_ha::VERSION)
    );
    let pod = pod_spec(&stored);
    assert_eq!(pod.service_account_name.as_deref(), Some("dkron-dkron-ha"));
    assert_eq!(
        container_names(&pod.containers),
        ["dkron", "dkron-ha-label-updater"]
    );
    assert_eq!(container_names(init_containers(pod)), ["dkron-ha-install"]);
    assert_eq!(init_containers(pod)[0].image.as_deref(), Some(INJECT_IMAGE));
    assert_eq!(volume_names(pod), ["dkron-ha-bin"]);
    let dkron = dkron_container(pod);
    assert_eq!(
        dkron.command.as_deref(),
        Some(&WRAPPER.map(String::from)[..])
    );
    assert_eq!(
        dkron.args.as_deref(),
        Some(
            &[
                "agent",
                "--server",
                "--bootstrap-expect=3",
                "--data-dir=/dkron.data"
            ]
            .map(String::from)[..]
        ),
        "args stay as they were"
    );
    assert_eq!(env_names(dkron), INJECTED_ENV);
    assert_eq!(env_value(dkron, "DKRON_HA_INITIAL_CLUSTER_SIZE"), Some("3"));

    // Everything the offline golden file says, the API server stored (plus its own defaults).
    let mut golden = golden_statefulset();
    golden["spec"]["template"]["metadata"]["annotations"]["dkron-ha/injected"] =
        json!(dkron_ha::VERSION);
    assert_contains(
        &golden,
        &serde_json::to_value(&stored).expect("serialize"),
        "",
    );

    webhook.remove().await;
}

#[tokio::test]
async fn an_update_with_a_new_image_keeps_the_policy_and_duplicates_nothing() {
    let (client, ns, webhook) = setup("update").await;
    let statefulsets = Api::<StatefulSet>::namespaced(client, &ns);
    statefulsets
        .create(&PostParams::default(), &example("dkron"))
        .await
        .expect("create StatefulSet");

    // The StatefulSet controller writes its status meanwhile: a conflict means read again.
    let mut attempts = 0;
    let updated = loop {
        let mut changed = statefulsets.get("dkron").await.expect("read StatefulSet");
        pod_spec_mut(&mut changed)
            .containers
            .iter_mut()
            .find(|c| c.name == "dkron")
            .expect("dkron container")
            .image = Some("dkron/dkron:4.1.2".into());
        match statefulsets
            .replace("dkron", &PostParams::default(), &changed)
            .await
        {
            Err(kube::Error::Api(status)) if status.code == 409 && attempts < 5 => attempts += 1,
            answer => break answer.expect("UPDATE with a new image"),
        }
    };
    // The same again as a PATCH, which the webhook also sees as an UPDATE.
    let patch = json!({"metadata": {"labels": {"touched": "again"}}});
    let patched = statefulsets
        .patch("dkron", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("PATCH a label");

    for stored in [&updated, &patched] {
        let spec = stored.spec.as_ref().expect("spec");
        assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
        let pod = pod_spec(stored);
        assert_eq!(
            container_names(&pod.containers),
            ["dkron", "dkron-ha-label-updater"]
        );
        assert_eq!(container_names(init_containers(pod)), ["dkron-ha-install"]);
        assert_eq!(volume_names(pod), ["dkron-ha-bin"]);
        let dkron = dkron_container(pod);
        assert_eq!(dkron.image.as_deref(), Some("dkron/dkron:4.1.2"));
        assert_eq!(
            dkron.command.as_deref(),
            Some(&WRAPPER.map(String::from)[..]),
            "wrapped once"
        );
        assert_eq!(env_names(dkron), INJECTED_ENV);
        let mounts: Vec<_> = dkron
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(mounts, ["data", "dkron-ha-bin"]);
    }
    assert!(
        patched.metadata.generation == updated.metadata.generation,
        "a label change is not a spec change: the webhook changed nothing"
    );

    webhook.remove().await;
}

#[tokio::test]
async fn opting_in_an_existing_ordered_ready_statefulset_keeps_its_policy_and_warns() {
    let (client, ns, webhook) = setup("warn").await;
    let statefulsets = Api::<StatefulSet>::namespaced(client.clone(), &ns);
    let created = statefulsets
        .create(&PostParams::default(), &not_opted_in("dkron"))
        .await
        .expect("create a StatefulSet that does not opt in");
    assert_eq!(
        policy(&created),
        Some("OrderedReady"),
        "the API server's default"
    );

    let opt_in = json!({"metadata": {"annotations": {"dkron-ha/enabled": "true"}}});
    let (stored, warnings) = merge_patch_with_warnings(&client, &ns, "dkron", &opt_in).await;

    // Changing the policy of an existing StatefulSet would be refused as immutable.
    assert_eq!(policy(&stored), Some("OrderedReady"));
    assert_eq!(
        container_names(&pod_spec(&stored).containers),
        ["dkron", "dkron-ha-label-updater"]
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("OrderedReady") && w.contains("--cascade=orphan")),
        "the admission warning reaches the client: {warnings:?}"
    );

    webhook.remove().await;
}

#[tokio::test]
async fn server_side_apply_of_the_same_manifest_twice_leaves_the_object_unchanged() {
    let (client, ns, webhook) = setup("apply").await;
    let statefulsets = Api::<StatefulSet>::namespaced(client, &ns);
    let manifest = example_value("dkron");
    let apply = PatchParams::apply("dkron-ha-e2e").force();

    let first = statefulsets
        .patch("dkron", &apply, &Patch::Apply(&manifest))
        .await
        .expect("first apply (creates)");
    let second = statefulsets
        .patch("dkron", &apply, &Patch::Apply(&manifest))
        .await
        .expect("second apply");

    assert_eq!(policy(&first), Some("Parallel"));
    assert_eq!(
        container_names(&pod_spec(&first).containers),
        ["dkron", "dkron-ha-label-updater"]
    );
    assert_eq!(second.spec, first.spec);
    assert_eq!(second.metadata.generation, first.metadata.generation);
    assert_eq!(
        second.metadata.resource_version, first.metadata.resource_version,
        "the second apply was a no-op: nothing was written"
    );

    webhook.remove().await;
}

#[tokio::test]
async fn the_statefulset_controller_creates_pods_from_the_injected_template() {
    let (client, ns, webhook) = setup("pods").await;
    // The companion controller will create it; until then, without it the pods are refused.
    let account = ServiceAccount {
        metadata: named("dkron-dkron-ha"),
        ..ServiceAccount::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &account)
        .await
        .expect("create the injected ServiceAccount");
    Api::<StatefulSet>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &example("dkron"))
        .await
        .expect("create StatefulSet");

    let pods_api = Api::<Pod>::namespaced(client, &ns);
    // Parallel: all three at once, although none ever becomes Ready (there is no kubelet).
    let pods = eventually(
        "the statefulset controller creates three pods",
        async || {
            let pods = pods_api
                .list(&ListParams::default().labels("app=dkron"))
                .await
                .ok()?;
            (pods.items.len() == 3).then_some(pods.items)
        },
    )
    .await;

    let mut names: Vec<_> = pods
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    names.sort();
    assert_eq!(names, ["dkron-0", "dkron-1", "dkron-2"]);
    for pod in &pods {
        let annotations = pod.metadata.annotations.as_ref();
        assert_eq!(
            annotations
                .and_then(|a| a.get("dkron-ha/injected"))
                .map(String::as_str),
            Some(dkron_ha::VERSION)
        );
        let spec = pod.spec.as_ref().expect("pod spec");
        assert_eq!(spec.service_account_name.as_deref(), Some("dkron-dkron-ha"));
        assert_eq!(
            container_names(&spec.containers),
            ["dkron", "dkron-ha-label-updater"]
        );
        assert_eq!(container_names(init_containers(spec)), ["dkron-ha-install"]);
        let dkron = dkron_container(spec);
        assert_eq!(
            dkron.command.as_deref(),
            Some(&WRAPPER.map(String::from)[..])
        );
        assert_eq!(env_names(dkron), INJECTED_ENV);
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        assert_eq!(phase, Some("Pending"));
    }

    webhook.remove().await;
}

#[tokio::test]
async fn a_server_side_dry_run_create_returns_the_injected_object_and_stores_nothing() {
    let (client, ns, webhook) = setup("dry-run").await;
    let statefulsets = Api::<StatefulSet>::namespaced(client, &ns);
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };

    let answer = statefulsets
        .create(&dry_run, &example("dkron"))
        .await
        .expect("dry-run create");

    assert_eq!(policy(&answer), Some("Parallel"));
    let pod = pod_spec(&answer);
    assert_eq!(
        container_names(&pod.containers),
        ["dkron", "dkron-ha-label-updater"]
    );
    assert_eq!(container_names(init_containers(pod)), ["dkron-ha-install"]);
    assert_eq!(
        dkron_container(pod).command.as_deref(),
        Some(&WRAPPER.map(String::from)[..])
    );
    let stored = statefulsets
        .get_opt("dkron")
        .await
        .expect("get StatefulSet");
    assert!(stored.is_none(), "a dry run stores nothing: {stored:?}");

    webhook.remove().await;
}

#[tokio::test]
async fn an_invalid_annotation_is_refused_with_a_message_naming_it() {
    let (client, ns, webhook) = setup("invalid").await;
    let statefulsets = Api::<StatefulSet>::namespaced(client, &ns);
    let mut invalid = example("dkron");
    annotations_mut(&mut invalid).insert("dkron-ha/initial-cluster-size".into(), "x".into());

    match statefulsets.create(&PostParams::default(), &invalid).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 400, "{status:?}");
            assert!(
                status.message.contains("dkron-ha/initial-cluster-size"),
                "{}",
                status.message
            );
            assert!(
                status.message.contains("inject.dkron-ha.io"),
                "names the webhook: {}",
                status.message
            );
        }
        other => panic!("an invalid annotation must be refused, got {other:?}"),
    }
    let stored = statefulsets
        .get_opt("dkron")
        .await
        .expect("get StatefulSet");
    assert!(
        stored.is_none(),
        "nothing half-injected was stored: {stored:?}"
    );

    webhook.remove().await;
}

#[tokio::test]
async fn only_opted_in_statefulsets_depend_on_the_webhook_being_up() {
    let (client, ns, mut webhook) = setup("down").await;
    let statefulsets = Api::<StatefulSet>::namespaced(client, &ns);
    let plain = statefulsets
        .create(&PostParams::default(), &not_opted_in("plain"))
        .await
        .expect("create a StatefulSet that does not opt in");
    assert_untouched(&plain);
    let mut opted_out = example("opted-out");
    annotations_mut(&mut opted_out).insert("dkron-ha/enabled".into(), "false".into());
    let opted_out = statefulsets
        .create(&PostParams::default(), &opted_out)
        .await
        .expect("create a StatefulSet with dkron-ha/enabled: false");
    assert_untouched(&opted_out);

    webhook.stop_server().await;

    let plain = statefulsets
        .create(&PostParams::default(), &not_opted_in("plain-while-down"))
        .await
        .expect("a StatefulSet that does not opt in never reaches the stopped webhook");
    assert_untouched(&plain);
    match statefulsets
        .create(&PostParams::default(), &example("dkron"))
        .await
    {
        // failurePolicy Fail: never stored un-injected.
        Err(kube::Error::Api(status)) => {
            assert!(
                status.message.contains("failed calling webhook"),
                "{status:?}"
            );
            assert!(status.message.contains("inject.dkron-ha.io"), "{status:?}");
        }
        other => panic!(
            "an opted-in StatefulSet must be refused while the webhook is down, got {other:?}"
        ),
    }
    let stored = statefulsets
        .get_opt("dkron")
        .await
        .expect("get StatefulSet");
    assert!(stored.is_none(), "{stored:?}");

    webhook.remove().await;
}

/// The admission benchmark measures HTTP/2 on one connection because that is how the API server
/// calls webhooks (client-go negotiates h2 by ALPN unless `DISABLE_HTTP2` is set). Proven here:
/// our listener and TLS configuration, called by the real API server, get HTTP/2 requests.
#[tokio::test]
async fn the_api_server_calls_the_webhook_over_http2() {
    use dkron_ha::metrics::AdmissionMetrics;
    use dkron_ha::serve::{AdmissionState, admission_router, serve_https};
    use dkron_ha::tls::{ReloadingCert, server_config};
    use std::sync::{Arc, Mutex};

    let cluster = ControlPlane::shared();
    let ns = cluster.namespace("http2").await;
    let client = cluster.client().await;
    let (certs_dir, certs) = webhook_certs(&ns);
    let cert = ReloadingCert::new(
        certs_dir.path().join("tls.crt"),
        certs_dir.path().join("tls.key"),
    )
    .expect("load certificate");

    // The shipped router, with every request's HTTP version written down.
    let versions = Arc::new(Mutex::new(Vec::new()));
    let router = admission_router(AdmissionState {
        injector: Arc::new(dkron_ha::inject::InjectorConfig::default()),
        metrics: AdmissionMetrics::register(&mut prometheus_client::registry::Registry::default()),
    })
    .layer(tower::util::MapRequestLayer::new({
        let versions = versions.clone();
        move |request: http::Request<axum::body::Body>| {
            versions.lock().unwrap().push(request.version());
            request
        }
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_https(
        listener,
        server_config(Arc::new(cert)).expect("TLS configuration"),
        router,
        async {
            let _ = stopped.await;
        },
    ));

    let (configurations, name) = configure_webhook(&client, &ns, port, &certs.ca_cert_pem).await;
    wait_until_called(client, &ns).await;

    let seen = versions.lock().unwrap().clone();
    assert!(!seen.is_empty(), "the webhook was called");
    assert!(
        seen.iter().all(|v| *v == http::Version::HTTP_2),
        "the API server's calls came as {seen:?}"
    );
    configurations
        .delete(&name, &DeleteParams::default())
        .await
        .expect("delete MutatingWebhookConfiguration");
    let _ = stop.send(());
    server.await.expect("serve task").expect("serve");
}

/// A namespace, an admin client and a webhook serving it.
async fn setup(prefix: &str) -> (kube::Client, String, Webhook) {
    let cluster = ControlPlane::shared();
    let ns = cluster.namespace(prefix).await;
    let client = cluster.client().await;
    let webhook = Webhook::register(client.clone(), &ns).await;
    (client, ns, webhook)
}

/// An in-test `dkron-ha serve` on loopback and the MutatingWebhookConfiguration that sends it
/// the StatefulSets of one namespace.
struct Webhook {
    configurations: Api<MutatingWebhookConfiguration>,
    name: String,
    server: Option<RunningServer>,
    _certs: tempfile::TempDir,
}

/// `serve` on a runtime and thread of its own, so that stopping it also ends the connections
/// the API server keeps open to it between calls, as when the webhook's process exits.
struct RunningServer {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl RunningServer {
    /// Binds and starts `serve`; returns its HTTPS port.
    async fn start(args: ServeArgs) -> (u16, Self) {
        let (port_tx, port_rx) = tokio::sync::oneshot::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("serve runtime");
            runtime.block_on(async move {
                let server = Server::bind(&args).await.expect("bind serve");
                let port = server.https_addr().expect("https address").port();
                let _ = port_tx.send(port);
                server
                    .run(async {
                        let _ = stopped.await;
                    })
                    .await
                    .expect("serve");
            });
            // Dropping the runtime drops the open connections' tasks with it.
        });
        let port = port_rx.await.expect("serve started");
        (port, Self { stop, thread })
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let joined = tokio::task::spawn_blocking(move || self.thread.join());
        tokio::time::timeout(Duration::from_secs(10), joined)
            .await
            .expect("serve stops within 10 s")
            .expect("join task")
            .expect("serve thread");
    }
}

impl Webhook {
    /// Starts `serve`, registers it for `ns` and returns once the API server calls it.
    async fn register(client: kube::Client, ns: &str) -> Self {
        let (certs_dir, certs) = webhook_certs(ns);
        let args = ServeArgs {
            https_addr: "127.0.0.1:0".parse().expect("address"),
            http_addr: "127.0.0.1:0".parse().expect("address"),
            tls_cert: certs_dir.path().join("tls.crt"),
            tls_key: certs_dir.path().join("tls.key"),
            tls_reload_seconds: 60,
            injector: InjectorArgs {
                inject_image: INJECT_IMAGE.into(),
                cluster_domain: "cluster.local".into(),
                native_sidecar: false,
            },
        };
        let (port, server) = RunningServer::start(args).await;
        let (configurations, name) = configure_webhook(&client, ns, port, &certs.ca_cert_pem).await;
        wait_until_called(client, ns).await;
        Self {
            configurations,
            name,
            server: Some(server),
            _certs: certs_dir,
        }
    }

    /// Stops `serve`; the configuration stays, as when the webhook's pods are all down.
    async fn stop_server(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
    }

    async fn remove(mut self) {
        self.stop_server().await;
        self.configurations
            .delete(&self.name, &DeleteParams::default())
            .await
            .expect("delete MutatingWebhookConfiguration");
    }
}

/// A serving certificate for 127.0.0.1 and the CA that signed it, written to a temp dir.
fn webhook_certs(ns: &str) -> (tempfile::TempDir, GeneratedCerts) {
    let certs_dir = tempfile::tempdir().expect("temp dir for certificates");
    let certs = generate(&CertRequest {
        service: "dkron-ha".into(),
        namespace: ns.into(),
        extra_names: vec!["127.0.0.1".into()],
        valid_days: 1,
    })
    .expect("generate webhook certificates");
    certs
        .write_to(certs_dir.path())
        .expect("write webhook certificates");
    (certs_dir, certs)
}

/// Creates the shipped webhook configuration, sending the StatefulSets of `ns` to the webhook on
/// loopback `port`; returns where it is and its name.
async fn configure_webhook(
    client: &kube::Client,
    ns: &str,
    port: u16,
    ca_pem: &str,
) -> (Api<MutatingWebhookConfiguration>, String) {
    let name = format!("dkron-ha-e2e-{ns}");
    let scope = LabelSelector {
        match_labels: Some(BTreeMap::from([(
            "kubernetes.io/metadata.name".to_owned(),
            ns.to_owned(),
        )])),
        ..LabelSelector::default()
    };
    let configuration = webhook_configuration(
        &name,
        &format!("https://127.0.0.1:{port}/mutate"),
        ca_pem,
        scope,
    );
    let configurations = Api::<MutatingWebhookConfiguration>::all(client.clone());
    configurations
        .create(&PostParams::default(), &configuration)
        .await
        .expect("create MutatingWebhookConfiguration");
    (configurations, name)
}

/// The API server picks configurations up from an informer: waits until it injects a dry-run
/// StatefulSet in `ns`.
async fn wait_until_called(client: kube::Client, ns: &str) {
    let probes = Api::<StatefulSet>::namespaced(client, ns);
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    eventually("the API server calls the new webhook", async || {
        let answer = probes.create(&dry_run, &example("probe")).await.ok()?;
        (pod_spec(&answer).containers.len() == 2).then_some(())
    })
    .await;
}

/// The shipped configuration, named `name`, calling `url` instead of the in-cluster Service,
/// for the namespaces `scope` selects. Checks that it is the configuration these tests prove.
fn webhook_configuration(
    name: &str,
    url: &str,
    ca_pem: &str,
    scope: LabelSelector,
) -> MutatingWebhookConfiguration {
    let mut configuration: MutatingWebhookConfiguration =
        serde_yaml_ng::from_str(SHIPPED_WEBHOOK).expect("webhook-config/webhook.yaml");
    configuration.metadata = named(name);
    let webhooks = configuration.webhooks.as_mut().expect("webhooks");
    assert_eq!(webhooks.len(), 1, "one webhook");
    let webhook = &mut webhooks[0];
    assert_eq!(webhook.name, "inject.dkron-ha.io");
    assert_eq!(webhook.failure_policy.as_deref(), Some("Fail"));
    assert_eq!(webhook.reinvocation_policy.as_deref(), Some("IfNeeded"));
    assert_eq!(webhook.side_effects, "None");
    assert_eq!(webhook.admission_review_versions, ["v1"]);
    let conditions = webhook.match_conditions.as_deref().unwrap_or_default();
    assert!(
        conditions
            .iter()
            .any(|c| c.expression.contains("dkron-ha/enabled")),
        "only opted-in StatefulSets reach the webhook: {conditions:?}"
    );
    webhook.client_config = WebhookClientConfig {
        url: Some(url.into()),
        ca_bundle: Some(ByteString(ca_pem.as_bytes().to_vec())),
        service: None,
    };
    webhook.namespace_selector = Some(scope);
    configuration
}

/// A JSON merge patch sent by hand, because kube's typed API drops the `Warning` headers that
/// carry admission warnings. Returns the stored object and the warning texts.
async fn merge_patch_with_warnings(
    client: &kube::Client,
    ns: &str,
    name: &str,
    patch: &Value,
) -> (StatefulSet, Vec<String>) {
    let request =
        http::Request::patch(format!("/apis/apps/v1/namespaces/{ns}/statefulsets/{name}"))
            .header(http::header::CONTENT_TYPE, "application/merge-patch+json")
            .body(kube::client::Body::from(patch.to_string().into_bytes()))
            .expect("build request");
    let response = client.send(request).await.expect("PATCH StatefulSet");
    let status = response.status();
    let warnings = response
        .headers()
        .get_all("warning")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .map(str::to_owned)
        .collect();
    let body = response
        .into_body()
        .collect_bytes()
        .await
        .expect("response body");
    assert!(
        status.is_success(),
        "{status}: {}",
        String::from_utf8_lossy(&body)
    );
    let stored = serde_json::from_slice(&body).expect("a StatefulSet");
    (stored, warnings)
}

/// The example's StatefulSet (opted in), named `name`.
fn example(name: &str) -> StatefulSet {
    serde_json::from_value(example_value(name)).expect("the example is a StatefulSet")
}

fn example_value(name: &str) -> Value {
    let mut value = yaml_statefulset(EXAMPLE);
    value["metadata"]["name"] = json!(name);
    value
}

fn not_opted_in(name: &str) -> StatefulSet {
    let mut sts = example(name);
    sts.metadata.annotations = None;
    sts
}

fn golden_statefulset() -> Value {
    yaml_statefulset(GOLDEN)
}

/// The StatefulSet document of a multi-document YAML file.
fn yaml_statefulset(yaml: &str) -> Value {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|document| Value::deserialize(document).expect("valid YAML"))
        .find(|document| document["kind"] == "StatefulSet")
        .expect("a StatefulSet document")
}

/// Fails unless every field of `expected` is in `actual` with the same value; arrays must have
/// the same length. `actual` may have more fields (the API server's defaults).
fn assert_contains(expected: &Value, actual: &Value, path: &str) {
    match (expected, actual) {
        (Value::Object(expected), Value::Object(actual)) => {
            for (key, value) in expected {
                let path = format!("{path}.{key}");
                let Some(found) = actual.get(key) else {
                    panic!("{path} is missing; expected {value}");
                };
                assert_contains(value, found, &path);
            }
        }
        (Value::Array(expected), Value::Array(actual)) => {
            assert_eq!(expected.len(), actual.len(), "{path}: {actual:?}");
            for (index, (expected, actual)) in expected.iter().zip(actual).enumerate() {
                assert_contains(expected, actual, &format!("{path}[{index}]"));
            }
        }
        _ => assert_eq!(expected, actual, "{path}"),
    }
}

fn assert_untouched(sts: &StatefulSet) {
    assert_eq!(policy(sts), Some("OrderedReady"));
    let pod = pod_spec(sts);
    assert_eq!(container_names(&pod.containers), ["dkron"]);
    assert!(init_containers(pod).is_empty(), "{:?}", pod.init_containers);
    assert!(volume_names(pod).is_empty(), "{:?}", pod.volumes);
    assert_eq!(pod.service_account_name, None);
    let dkron = dkron_container(pod);
    assert_eq!(dkron.command, None);
    assert_eq!(dkron.env, None);
    let template_annotations = sts
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref()?.annotations.as_ref());
    assert!(template_annotations.is_none_or(|a| !a.contains_key("dkron-ha/injected")));
}

fn policy(sts: &StatefulSet) -> Option<&str> {
    sts.spec.as_ref()?.pod_management_policy.as_deref()
}

fn pod_spec(sts: &StatefulSet) -> &PodSpec {
    sts.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("a pod template spec")
}

fn pod_spec_mut(sts: &mut StatefulSet) -> &mut PodSpec {
    sts.spec
        .as_mut()
        .and_then(|s| s.template.spec.as_mut())
        .expect("a pod template spec")
}

fn annotations_mut(sts: &mut StatefulSet) -> &mut BTreeMap<String, String> {
    sts.metadata.annotations.get_or_insert_with(BTreeMap::new)
}

fn init_containers(pod: &PodSpec) -> &[Container] {
    pod.init_containers.as_deref().unwrap_or_default()
}

fn dkron_container(pod: &PodSpec) -> &Container {
    pod.containers
        .iter()
        .find(|c| c.name == "dkron")
        .expect("the dkron container")
}

fn container_names(containers: &[Container]) -> Vec<&str> {
    containers.iter().map(|c| c.name.as_str()).collect()
}

fn volume_names(pod: &PodSpec) -> Vec<&str> {
    pod.volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect()
}

fn env_names(container: &Container) -> Vec<&str> {
    container
        .env
        .iter()
        .flatten()
        .map(|e| e.name.as_str())
        .collect()
}

fn env_value<'a>(container: &'a Container, name: &str) -> Option<&'a str> {
    container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)?
        .value
        .as_deref()
}
