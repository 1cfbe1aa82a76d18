//! The Helm chart (`chart/`) and the plain manifests rendered from it (`webhook-config/`),
//! proven with helm itself (built from its pinned Go module by tests/tools/build.sh) and the
//! real test control plane:
//!
//! - every values case in the matrix lints clean and renders what it asks for;
//! - every object it renders is accepted by kube-apiserver (strict server-side apply);
//! - the chart's MutatingWebhookConfiguration, pointed at an in-test `serve` started with the
//!   chart's own arguments, injects an opted-in StatefulSet and is never called for anything
//!   else;
//! - its least-privilege RBAC is enough for the real controller and FleetLock, run as the
//!   chart's ServiceAccount;
//! - the self-signed certificate survives upgrades and rotates with both CAs trusted;
//! - `webhook-config/` is exactly what tests/tools/render-webhook-config.sh writes now;
//! - given another registry (tag or digest) and namespace, neither the chart nor a kustomize
//!   overlay of `webhook-config/` that only sets `images:` and `namespace:` leaves a reference
//!   to the default registry or namespace, for the server's image or the injected one.

mod support;

use support::eventually;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use clap::{Args as _, FromArgMatches as _};
use dkron_ha::certs::{CertRequest, generate};
use dkron_ha::controller::{self, ControllerArgs, ControllerMetrics};
use dkron_ha::fleetlock::{self, FleetLock, FleetLockConfig, app_specific_machine_id};
use dkron_ha::names::{ANNOTATION_ENABLED, INSTALL_CONTAINER, LABEL_UPDATER_CONTAINER};
use dkron_ha::serve::{ServeArgs, Server};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use kube::discovery::{self, Scope};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::ControlPlane;
use tower::ServiceExt as _;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const FIELD_MANAGER: &str = "dkron-ha-chart-test";
const STATEFULSET: &str = include_str!("fixtures/chart/dkron-statefulset.yaml");
const CERT_MANAGER_CRDS: &str = include_str!("fixtures/chart/cert-manager-crds.yaml");

/// The values matrix: chart/ci/*-values.yaml (what chart-testing would run) plus the values
/// webhook-config/ is rendered with.
const CASES: &[(&str, &str)] = &[
    ("defaults", "chart/ci/defaults-values.yaml"),
    ("cert-manager", "chart/ci/cert-manager-values.yaml"),
    ("native-sidecar", "chart/ci/native-sidecar-values.yaml"),
    ("cluster-ip", "chart/ci/cluster-ip-values.yaml"),
    ("webhook-config", "webhook-config/chart-values.yaml"),
];

// ---------------------------------------------------------------------------------------------
// helm

/// The helm binary, built (or found up to date) by tests/tools/build.sh, which prints its
/// cache's bin directory.
fn helm_binary() -> &'static Path {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| {
        let script = Path::new(ROOT).join("tests/tools/build.sh");
        let output = Command::new("bash")
            .arg(&script)
            .output()
            .unwrap_or_else(|error| panic!("run {}: {error}", script.display()));
        assert!(
            output.status.success(),
            "{} failed ({}); it needs Go and the Go module proxy on first run:\n{}",
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let bin = String::from_utf8_lossy(&output.stdout);
        let helm = PathBuf::from(bin.lines().last().unwrap_or_default().trim()).join("helm");
        assert!(
            helm.is_file(),
            "build.sh did not produce {}",
            helm.display()
        );
        helm
    })
}

/// Runs helm with throwaway config and cache dirs and no kubeconfig unless `args` names one.
fn run_helm(args: &[&str]) -> Output {
    let home = tempfile::tempdir().expect("temp dir for helm");
    Command::new(helm_binary())
        .args(args)
        .current_dir(ROOT)
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .env("KUBECONFIG", home.path().join("no-kubeconfig"))
        .output()
        .expect("run helm")
}

/// Runs helm and returns its standard output; panics with its output if it fails.
fn helm(args: &[&str]) -> String {
    let output = run_helm(args);
    assert!(
        output.status.success(),
        "helm {} failed ({}):\n{}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("helm prints UTF-8")
}

/// The objects of one `helm template`.
struct Rendered {
    objects: Vec<Value>,
}

impl Rendered {
    fn parse(yaml: &str) -> Self {
        let objects = serde_yaml_ng::Deserializer::from_str(yaml)
            .map(|document| {
                serde_yaml_ng::from_value::<Value>(
                    serde::Deserialize::deserialize(document).expect("helm renders valid YAML"),
                )
                .expect("YAML maps to JSON")
            })
            .filter(|object| !object.is_null())
            .collect();
        Self { objects }
    }

    fn all(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().filter(|o| o["kind"] == kind).collect()
    }

    fn one(&self, kind: &str) -> &Value {
        let found = self.all(kind);
        assert_eq!(found.len(), 1, "expected one {kind}, found {}", found.len());
        found[0]
    }

    fn kinds(&self) -> Vec<String> {
        let mut kinds: Vec<String> = self
            .objects
            .iter()
            .map(|o| o["kind"].as_str().unwrap_or("?").to_owned())
            .collect();
        kinds.sort();
        kinds
    }
}

/// `helm template RELEASE chart -n NAMESPACE -f VALUES EXTRA...`.
fn render(release: &str, namespace: &str, values: &str, extra: &[&str]) -> Rendered {
    let mut args = vec!["template", release, "chart", "--namespace", namespace];
    args.extend(["--values", values]);
    args.extend(extra);
    Rendered::parse(&helm(&args))
}

fn container(deployment: &Value) -> &Value {
    &deployment["spec"]["template"]["spec"]["containers"][0]
}

fn args_of(deployment: &Value) -> Vec<String> {
    container(deployment)["args"]
        .as_array()
        .expect("the container has args")
        .iter()
        .map(|a| a.as_str().expect("args are strings").to_owned())
        .collect()
}

/// The command line `serve` runs with in the Deployment: the container's args, then each of
/// its literal env values that `serve` reads in place of a flag (clap's `env`), written as
/// that flag. (The chart gives the inject image as `DKRON_HA_INJECT_IMAGE`, which kustomize's
/// `images:` can rewrite, rather than as `--inject-image=`, which it cannot.)
fn serve_command(deployment: &Value) -> Vec<String> {
    let mut args = args_of(deployment);
    let command = ServeArgs::augment_args(clap::Command::new("serve"));
    for var in container(deployment)["env"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let (Some(name), Some(value)) = (var["name"].as_str(), var["value"].as_str()) else {
            continue;
        };
        let long = command
            .get_arguments()
            .find(|a| a.get_env() == Some(std::ffi::OsStr::new(name)))
            .and_then(|a| a.get_long());
        if let Some(long) = long {
            args.push(format!("--{long}={value}"));
        }
    }
    args
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let prefix = format!("--{name}=");
    args.iter().find_map(|a| a.strip_prefix(&prefix))
}

fn b64decode(text: &str) -> String {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .expect("valid base64");
    String::from_utf8(bytes).expect("PEM is text")
}

fn pem_blocks(pem: &str) -> Vec<String> {
    pem.split_inclusive("-----END CERTIFICATE-----")
        .map(|block| block.trim().to_owned())
        .filter(|block| block.contains("-----BEGIN CERTIFICATE-----"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// `serve`'s command line, as the Deployment runs it

/// Whether the real binary accepts `args` (the Deployment's, starting with `serve`): clap
/// validates every flag and value before a trailing `--help` ends the run.
fn binary_accepts(args: &[String]) -> Result<(), String> {
    let output = Command::new(env!("CARGO_BIN_EXE_dkron-ha"))
        .args(args)
        .arg("--help")
        .output()
        .expect("run dkron-ha");
    match output.status.success() {
        true => Ok(()),
        false => Err(String::from_utf8_lossy(&output.stderr).into_owned()),
    }
}

/// Fails unless `dkron-ha` accepts the Deployment's args.
fn assert_serve_accepts(case: &str, args: &[String]) {
    assert_eq!(args.first().map(String::as_str), Some("serve"), "{case}");
    if let Err(error) = binary_accepts(args) {
        panic!("{case}: dkron-ha rejects the Deployment's args {args:?}:\n{error}");
    }
}

/// The [`ServeArgs`] part of the Deployment's args (the rest belongs to other roles).
fn serve_args(deployment_args: &[String]) -> ServeArgs {
    let command = ServeArgs::augment_args(clap::Command::new("serve"));
    let known: Vec<String> = command
        .get_arguments()
        .filter_map(|a| a.get_long())
        .map(|long| format!("--{long}"))
        .collect();
    let own = deployment_args.iter().filter(|a| {
        let name = a.split('=').next().unwrap_or_default();
        *a == "serve" || known.iter().any(|k| k == name)
    });
    let matches = command
        .try_get_matches_from(own)
        .unwrap_or_else(|e| panic!("{deployment_args:?}: {e}"));
    ServeArgs::from_arg_matches(&matches).expect("ServeArgs from the Deployment's args")
}

// ---------------------------------------------------------------------------------------------
// lint and render

#[test]
fn every_values_case_lints_clean() {
    for (case, values) in CASES {
        let output = run_helm(&[
            "lint",
            "chart",
            "--strict",
            "--namespace",
            "dkron-ha",
            "--values",
            values,
        ]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success(),
            "case {case}: helm lint --strict failed:\n{text}"
        );
        assert!(
            !text.contains("[WARNING]") && !text.contains("[ERROR]"),
            "case {case}: {text}"
        );
        assert!(
            text.contains("1 chart(s) linted, 0 chart(s) failed"),
            "case {case}: {text}"
        );
    }
}

#[test]
fn the_values_schema_rejects_unknown_keys_and_invalid_values() {
    let rejected = [
        ("replicas=3", "additional properties 'replicas' not allowed"),
        ("certs.mode=vault", "'/certs/mode'"),
        ("webhook.timeoutSeconds=60", "'/webhook/timeoutSeconds'"),
        ("webhook.failurePolicy=Retry", "'/webhook/failurePolicy'"),
        ("logFormat=yaml", "'/logFormat'"),
        (
            "fleetlock.groups.bad_group=1",
            "additional properties 'bad_group' not allowed",
        ),
        ("service.clusterIP=not-an-ip", "'/service/clusterIP'"),
        ("image.digest=latest", "'/image/digest'"),
        ("injectImage.digest=sha256:0123", "'/injectImage/digest'"),
        ("image.sha=x", "additional properties 'sha' not allowed"),
        (
            "injectImage.pullPolicy=Always",
            "additional properties 'pullPolicy' not allowed",
        ),
    ];
    for (set, mentions) in rejected {
        let output = run_helm(&["template", "x", "chart", "--set", set]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "--set {set} was accepted");
        assert!(
            stderr.contains("values don't meet the specifications of the schema")
                && stderr.contains(mentions),
            "--set {set}: {stderr}"
        );
    }
}

/// What every case has in common: the contract of issue 7.
fn assert_invariants(case: &str, rendered: &Rendered, namespace: &str) {
    let deployment = rendered.one("Deployment");
    let selector = &deployment["spec"]["selector"]["matchLabels"];
    let pod = &deployment["spec"]["template"]["spec"];
    let container = container(deployment);
    assert_eq!(deployment["spec"]["replicas"], 2, "{case}");
    assert_eq!(
        pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"],
        json!({"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": selector}}),
        "{case}"
    );
    assert_eq!(
        pod["securityContext"],
        json!({"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532,
               "seccompProfile": {"type": "RuntimeDefault"}}),
        "{case}"
    );
    assert_eq!(
        container["securityContext"],
        json!({"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
               "runAsNonRoot": true, "capabilities": {"drop": ["ALL"]}}),
        "{case}"
    );
    assert!(container["resources"]["requests"].is_object(), "{case}");
    assert_eq!(
        container["livenessProbe"]["httpGet"],
        json!({"path": "/healthz", "port": "http"})
    );
    assert_eq!(
        container["readinessProbe"]["httpGet"],
        json!({"path": "/readyz", "port": "http"})
    );
    assert_eq!(
        container["ports"],
        json!([{"name": "https", "containerPort": 8443, "protocol": "TCP"},
               {"name": "http", "containerPort": 8081, "protocol": "TCP"}]),
        "{case}"
    );
    let namespace_env = json!({"name": "POD_NAMESPACE",
                               "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}});
    assert!(
        container["env"]
            .as_array()
            .unwrap()
            .contains(&namespace_env),
        "{case}"
    );
    assert_serve_accepts(case, &serve_command(deployment));
    // The inject image is the env var a kustomize overlay's `images:` rewrites along with the
    // container's image: a flag would override it.
    assert_eq!(flag(&args_of(deployment), "inject-image"), None, "{case}");
    assert!(
        flag(&serve_command(deployment), "inject-image").is_some(),
        "{case}"
    );

    let budget = rendered.one("PodDisruptionBudget");
    assert_eq!(
        budget["spec"],
        json!({"minAvailable": 1, "selector": {"matchLabels": selector}}),
        "{case}"
    );

    let service = rendered.one("Service");
    let ports: Vec<Value> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| json!([p["name"], p["port"], p["targetPort"]]))
        .collect();
    assert_eq!(
        ports,
        [json!(["https", 443, "https"]), json!(["http", 80, "http"])],
        "{case}"
    );

    let webhooks = rendered.one("MutatingWebhookConfiguration")["webhooks"]
        .as_array()
        .unwrap();
    assert_eq!(webhooks.len(), 1, "{case}");
    let webhook = &webhooks[0];
    assert_eq!(webhook["admissionReviewVersions"], json!(["v1"]), "{case}");
    assert_eq!(webhook["sideEffects"], "None", "{case}");
    assert_eq!(webhook["reinvocationPolicy"], "IfNeeded", "{case}");
    assert_eq!(
        webhook["rules"],
        json!([{"apiGroups": ["apps"], "apiVersions": ["v1"],
                "resources": ["statefulsets", "deployments"],
                "operations": ["CREATE", "UPDATE"], "scope": "Namespaced"}]),
        "{case}"
    );
    assert_eq!(
        webhook["clientConfig"]["service"],
        json!({"name": service["metadata"]["name"], "namespace": namespace, "path": "/mutate",
               "port": 443}),
        "{case}"
    );
    let excluded = &webhook["namespaceSelector"]["matchExpressions"][0];
    assert_eq!(excluded["key"], "kubernetes.io/metadata.name", "{case}");
    assert_eq!(excluded["operator"], "NotIn", "{case}");
    assert_eq!(excluded["values"][0], namespace, "{case}");
    assert_eq!(excluded["values"][1], "kube-system", "{case}");
    let condition = webhook["matchConditions"][0]["expression"]
        .as_str()
        .unwrap();
    assert!(
        condition.contains("has(object.metadata.annotations)")
            && condition.contains("object.metadata.annotations['dkron-ha/enabled'] == 'true'")
            && condition.contains("'dkron-ha/agent-of' in object.metadata.annotations"),
        "{case}: {condition}"
    );

    // Both bindings grant their role to the pods' ServiceAccount.
    for (binding, role) in [
        ("ClusterRoleBinding", "ClusterRole"),
        ("RoleBinding", "Role"),
    ] {
        let binding = rendered.one(binding);
        assert_eq!(
            binding["roleRef"]["name"],
            rendered.one(role)["metadata"]["name"],
            "{case}"
        );
        assert_eq!(
            binding["subjects"][0]["name"], pod["serviceAccountName"],
            "{case}"
        );
    }
}

#[test]
fn every_values_case_renders_what_its_values_ask_for() {
    let namespace = "dkron-ha";
    for (case, values) in CASES {
        let rendered = render(case, namespace, values, &[]);
        assert_invariants(case, &rendered, namespace);
        let deployment = rendered.one("Deployment");
        let pod = &deployment["spec"]["template"]["spec"];
        let args = serve_command(deployment);
        let webhook = &rendered.one("MutatingWebhookConfiguration")["webhooks"][0];
        let ca_bundle = webhook["clientConfig"]["caBundle"].as_str();
        let secret_name = pod["volumes"][0]["secret"]["secretName"].as_str().unwrap();
        match *case {
            "defaults" => {
                assert_eq!(webhook["failurePolicy"], "Fail");
                assert_eq!(webhook["timeoutSeconds"], 5);
                assert_eq!(flag(&args, "log-format"), Some("json"));
                assert!(!args.contains(&"--native-sidecar".to_owned()));
                assert_eq!(
                    flag(&args, "inject-image"),
                    container(deployment)["image"].as_str()
                );
                let secret = rendered.one("Secret");
                assert_eq!(secret["metadata"]["name"], secret_name);
                assert_eq!(secret["type"], "kubernetes.io/tls");
                // The API server trusts exactly the CA that signed the served certificate.
                assert_eq!(
                    ca_bundle.map(b64decode).map(|b| pem_blocks(&b)),
                    Some(vec![
                        b64decode(secret["data"]["ca.crt"].as_str().unwrap())
                            .trim()
                            .to_owned()
                    ])
                );
                assert!(pod["imagePullSecrets"].is_null());
                assert!(rendered.one("Service")["spec"]["clusterIP"].is_null());
                assert_eq!(rendered.one("ConfigMap")["data"], json!({"default": "1"}));
            }
            "cert-manager" => {
                let webhook_config = rendered.one("MutatingWebhookConfiguration");
                let certificates = rendered.all("Certificate");
                let serving = certificates
                    .iter()
                    .find(|c| c["spec"]["secretName"] == secret_name)
                    .expect("a Certificate for the mounted Secret");
                assert_eq!(
                    webhook_config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
                    format!(
                        "{namespace}/{}",
                        serving["metadata"]["name"].as_str().unwrap()
                    )
                );
                assert_eq!(ca_bundle, None, "cainjector owns the caBundle");
                assert!(
                    rendered.all("Secret").is_empty(),
                    "cert-manager writes the Secret"
                );
                let dns_names = serving["spec"]["dnsNames"].as_array().unwrap();
                assert!(
                    dns_names.contains(&json!(format!("{case}-dkron-ha.{namespace}.svc"))),
                    "{dns_names:?}"
                );
                // A CA Issuer signs it, so a renewal does not change the caBundle.
                let issuer = serving["spec"]["issuerRef"]["name"].as_str().unwrap();
                let ca_issuer = rendered
                    .all("Issuer")
                    .into_iter()
                    .find(|i| i["metadata"]["name"] == issuer)
                    .expect("the serving Certificate's Issuer");
                assert!(ca_issuer["spec"]["ca"]["secretName"].is_string());
            }
            "native-sidecar" => {
                assert!(args.contains(&"--native-sidecar".to_owned()), "{args:?}");
                assert_eq!(flag(&args, "log-format"), Some("text"));
                assert_eq!(
                    flag(&args, "inject-image"),
                    Some("registry.example.com/dkron-ha:0.1.0")
                );
                assert_eq!(
                    pod["imagePullSecrets"],
                    json!([{"name": "private-registry"}])
                );
            }
            "cluster-ip" => {
                assert_eq!(rendered.one("Service")["spec"]["clusterIP"], "10.0.0.10");
                assert_eq!(
                    rendered.one("ConfigMap")["data"],
                    json!({"default": "1", "frozen": "0", "workers": "2"})
                );
                assert_eq!(flag(&args, "fleetlock-lock-ttl"), Some("2h"));
                assert_eq!(flag(&args, "fleetlock-queue-timeout"), Some("30m"));
                assert_eq!(
                    flag(&args, "fleetlock-config-map"),
                    rendered.one("ConfigMap")["metadata"]["name"].as_str()
                );
                assert_eq!(webhook["failurePolicy"], "Ignore");
                assert_eq!(webhook["timeoutSeconds"], 10);
                let excluded = &webhook["namespaceSelector"]["matchExpressions"][0]["values"];
                assert_eq!(excluded, &json!([namespace, "kube-system", "monitoring"]));
            }
            "webhook-config" => {
                assert!(rendered.all("Secret").is_empty(), "the user's Secret");
                assert_eq!(ca_bundle, None, "kustomize fills it from the Secret");
                assert_eq!(secret_name, format!("{case}-dkron-ha-tls"));
            }
            other => panic!("no expectations for case {other}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// the control plane accepts it

/// Server-side applies `object` with strict field validation (unknown or duplicate fields are
/// errors), as `kubectl apply --server-side` would.
async fn apply(client: &kube::Client, object: &Value, dry_run: bool) -> Result<(), String> {
    let dynamic: DynamicObject =
        serde_json::from_value(object.clone()).map_err(|e| e.to_string())?;
    let types = dynamic.types.as_ref().ok_or("no apiVersion/kind")?;
    let gvk = GroupVersionKind::try_from(types).map_err(|e| e.to_string())?;
    let (resource, capabilities) = discovery::pinned_kind(client, &gvk)
        .await
        .map_err(|e| format!("discovery of {gvk:?}: {e}"))?;
    let api: Api<DynamicObject> = match capabilities.scope {
        Scope::Namespaced => {
            let namespace = dynamic
                .metadata
                .namespace
                .as_deref()
                .ok_or("a namespaced object without metadata.namespace")?;
            Api::namespaced_with(client.clone(), namespace, &resource)
        }
        Scope::Cluster => Api::all_with(client.clone(), &resource),
    };
    let mut params = PatchParams::apply(FIELD_MANAGER)
        .force()
        .validation_strict();
    if dry_run {
        params = params.dry_run();
    }
    let name = dynamic.metadata.name.as_deref().ok_or("no metadata.name")?;
    api.patch(name, &params, &Patch::Apply(object))
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn describe(object: &Value) -> String {
    format!(
        "{} {}",
        object["kind"].as_str().unwrap_or("?"),
        object["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// Installs the stand-in cert-manager CRDs once and waits until they are served.
async fn install_cert_manager_crds(client: &kube::Client) {
    let crds = Rendered::parse(CERT_MANAGER_CRDS);
    for crd in &crds.objects {
        apply(client, crd, false)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", describe(crd)));
    }
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in &crds.objects {
        let name = crd["metadata"]["name"].as_str().unwrap();
        eventually(&format!("CRD {name} is established"), async || {
            let crd = api.get(name).await.ok()?;
            let established = crd
                .status?
                .conditions?
                .into_iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            established.then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn every_rendered_object_is_accepted_by_the_control_plane() {
    let cluster = ControlPlane::shared();
    let client = cluster.client().await;
    install_cert_manager_crds(&client).await;
    for (case, values) in CASES {
        let namespace = cluster.namespace(&format!("chart-{case}")).await;
        let rendered = render(case, &namespace, values, &[]);
        for object in &rendered.objects {
            // A live webhook configuration would send other tests' opted-in StatefulSets to a
            // Service with no pods (failurePolicy Fail): validate it without storing it.
            let dry_run = object["kind"] == "MutatingWebhookConfiguration";
            // Discovery can lag the CRDs by a moment.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match apply(&client, object, dry_run).await {
                    Ok(()) => break,
                    Err(error) if error.contains("discovery") && Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    Err(error) => panic!("case {case}: {} was refused: {error}", describe(object)),
                }
            }
        }
        let expected = match *case {
            "cert-manager" => {
                "Certificate Certificate ClusterRole ClusterRoleBinding ConfigMap Deployment Issuer Issuer MutatingWebhookConfiguration PodDisruptionBudget Role RoleBinding Service ServiceAccount"
            }
            "webhook-config" => {
                "ClusterRole ClusterRoleBinding ConfigMap Deployment MutatingWebhookConfiguration PodDisruptionBudget Role RoleBinding Service ServiceAccount"
            }
            _ => {
                "ClusterRole ClusterRoleBinding ConfigMap Deployment MutatingWebhookConfiguration PodDisruptionBudget Role RoleBinding Secret Service ServiceAccount"
            }
        };
        assert_eq!(rendered.kinds().join(" "), expected, "case {case}");
    }
}

// ---------------------------------------------------------------------------------------------
// the chart's webhook configuration, pointed at a real `serve`

struct RunningServe {
    https_port: u16,
    http: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// Starts `serve` in-process with `args` (as the Deployment passes them), listening on
/// loopback with the given certificate instead of the chart's addresses and Secret volume.
async fn start_serve(deployment_args: &[String], cert_dir: &Path) -> RunningServe {
    let overridden = ["https-addr", "http-addr", "tls-cert", "tls-key"];
    let mut args: Vec<String> = deployment_args
        .iter()
        .filter(|a| !overridden.iter().any(|o| a.starts_with(&format!("--{o}="))))
        .cloned()
        .collect();
    args.extend([
        "--https-addr=127.0.0.1:0".to_owned(),
        "--http-addr=127.0.0.1:0".to_owned(),
        format!("--tls-cert={}", cert_dir.join("tls.crt").display()),
        format!("--tls-key={}", cert_dir.join("tls.key").display()),
    ]);
    let serve_args = serve_args(&args);
    let server = Server::bind(&serve_args).await.expect("bind serve");
    let https_port = server.https_addr().unwrap().port();
    let http = format!("http://127.0.0.1:{}", server.http_addr().unwrap().port());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        server
            .run(async {
                let _ = stopped.await;
            })
            .await
            .expect("serve");
    });
    RunningServe {
        https_port,
        http,
        stop,
        task,
    }
}

impl RunningServe {
    /// Admission reviews answered so far, from `/metrics`.
    async fn reviews_answered(&self) -> u64 {
        let text = reqwest::get(format!("{}/metrics", self.http))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix("dkron_ha_admission_duration_seconds_count "))
            .map(|n| n.trim().parse().expect("a count"))
            .unwrap_or(0)
    }

    async fn stop(self) {
        support::stop_task(Some(self.stop), self.task, "serve").await;
    }
}

fn statefulset(name: &str, opted_in: bool) -> StatefulSet {
    let mut sts: StatefulSet = serde_yaml_ng::from_str(STATEFULSET).expect("fixture parses");
    sts.metadata.name = Some(name.to_owned());
    if !opted_in {
        sts.metadata.annotations = None;
    }
    sts
}

fn is_injected(sts: &StatefulSet, inject_image: &str) -> bool {
    let Some(pod) = sts.spec.as_ref().and_then(|s| s.template.spec.as_ref()) else {
        return false;
    };
    let install = pod
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == INSTALL_CONTAINER);
    let label_updater = pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
        .any(|c| c.name == LABEL_UPDATER_CONTAINER);
    install.is_some_and(|c| c.image.as_deref() == Some(inject_image)) && label_updater
}

/// The chart's webhook admits every namespace but its own, so while one test has it registered,
/// another test's opted-in StatefulSet would reach it too: those tests take turns.
static OPTED_IN_STATEFULSETS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_webhook_injects_opted_in_statefulsets_and_is_called_for_nothing_else() {
    let _turn = OPTED_IN_STATEFULSETS.lock().await;
    let cluster = ControlPlane::shared();
    let client = cluster.client().await;
    let release_namespace = cluster.namespace("chart-release").await;
    let rendered = render(
        "hook",
        &release_namespace,
        "chart/ci/defaults-values.yaml",
        &[],
    );
    let deployment_args = serve_command(rendered.one("Deployment"));
    let inject_image = flag(&deployment_args, "inject-image")
        .expect("--inject-image")
        .to_owned();

    // serve, with the chart's arguments, on loopback with a certificate for 127.0.0.1.
    let certs = generate(&CertRequest {
        service: "hook-dkron-ha".into(),
        namespace: release_namespace.clone(),
        extra_names: vec!["127.0.0.1".into()],
        valid_days: 1,
    })
    .unwrap();
    let cert_dir = tempfile::tempdir().unwrap();
    certs.write_to(cert_dir.path()).unwrap();
    let serve = start_serve(&deployment_args, cert_dir.path()).await;

    // The chart's configuration, every field as rendered but clientConfig.
    let mut webhook_config = rendered.one("MutatingWebhookConfiguration").clone();
    let rendered_webhook = webhook_config["webhooks"][0].clone();
    webhook_config["webhooks"][0]["clientConfig"] = json!({
        "url": format!("https://127.0.0.1:{}/mutate", serve.https_port),
        "caBundle": base64::engine::general_purpose::STANDARD.encode(&certs.ca_cert_pem),
    });
    let mut unchanged = webhook_config["webhooks"][0].clone();
    unchanged["clientConfig"] = rendered_webhook["clientConfig"].clone();
    assert_eq!(unchanged, rendered_webhook);
    apply(&client, &webhook_config, false)
        .await
        .unwrap_or_else(|e| panic!("apply the webhook configuration: {e}"));
    let name = webhook_config["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_owned();

    let app_namespace = cluster.namespace("chart-app").await;
    let apps: Api<StatefulSet> = Api::namespaced(client.clone(), &app_namespace);
    // The API server picks up a new webhook configuration within a moment: probe with dry runs.
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    eventually("the API server calls the chart's webhook", async || {
        let probe = apps
            .create(&dry_run, &statefulset("probe", true))
            .await
            .ok()?;
        is_injected(&probe, &inject_image).then_some(())
    })
    .await;
    let answered = serve.reviews_answered().await;

    // Not opted in: matchConditions keep it away from the webhook altogether.
    let plain = apps
        .create(&PostParams::default(), &statefulset("plain", false))
        .await
        .expect("create a StatefulSet that does not opt in");
    assert!(!is_injected(&plain, &inject_image));
    // Opted in, but in the release's own namespace: the namespaceSelector excludes it.
    let own: Api<StatefulSet> = Api::namespaced(client.clone(), &release_namespace);
    let excluded = own
        .create(&PostParams::default(), &statefulset("dkron", true))
        .await
        .expect("create in the release namespace");
    assert!(!is_injected(&excluded, &inject_image));
    assert_eq!(
        serve.reviews_answered().await,
        answered,
        "the webhook was called for an object it must not see"
    );

    // Opted in where the selector admits it: injected, and stored so.
    let created = apps
        .create(&PostParams::default(), &statefulset("dkron", true))
        .await
        .expect("create the opted-in StatefulSet");
    assert!(is_injected(&created, &inject_image), "{created:?}");
    let stored = apps.get("dkron").await.unwrap();
    assert!(is_injected(&stored, &inject_image));
    assert_eq!(
        stored
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_ENABLED))
            .map(String::as_str),
        Some("true")
    );
    assert!(serve.reviews_answered().await > answered);

    // An UPDATE goes through the webhook again and duplicates nothing.
    let label = json!({"metadata": {"labels": {"touched": "yes"}}});
    let updated = apps
        .patch("dkron", &PatchParams::default(), &Patch::Merge(&label))
        .await
        .expect("update the opted-in StatefulSet");
    let pod = updated.spec.unwrap().template.spec.unwrap();
    let installs = pod
        .init_containers
        .iter()
        .flatten()
        .filter(|c| c.name == INSTALL_CONTAINER)
        .count();
    assert_eq!(installs, 1);

    // Opting out (the annotation removed) reaches the webhook too (its stored object opted
    // in), which takes the injection back out of the template.
    let answered = serve.reviews_answered().await;
    let opt_out = json!({"metadata": {"annotations": {ANNOTATION_ENABLED: null}}});
    let plain = apps
        .patch("dkron", &PatchParams::default(), &Patch::Merge(&opt_out))
        .await
        .expect("opt the StatefulSet out");
    assert!(serve.reviews_answered().await > answered);
    let pod = plain.spec.unwrap().template.spec.unwrap();
    let names: Vec<&str> = pod
        .init_containers
        .iter()
        .flatten()
        .chain(&pod.containers)
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, ["dkron"], "{pod:?}");
    assert!(pod.readiness_gates.is_none(), "{pod:?}");

    Api::<MutatingWebhookConfiguration>::all(client)
        .delete(&name, &DeleteParams::default())
        .await
        .expect("delete the webhook configuration");
    serve.stop().await;
}

// ---------------------------------------------------------------------------------------------
// least privilege: the chart's RBAC is enough for the real controller and FleetLock

/// Applies the chart's ServiceAccount, RBAC and FleetLock ConfigMap for `release` in
/// `namespace` and returns a client authenticated as that ServiceAccount, once RBAC lets it
/// read StatefulSets (the authorizer sees new bindings a moment later).
async fn client_with_the_charts_rbac(
    cluster: &ControlPlane,
    release: &str,
    namespace: &str,
) -> (kube::Client, Rendered) {
    let admin = cluster.client().await;
    let rendered = render(release, namespace, "chart/ci/defaults-values.yaml", &[]);
    let kinds = [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ConfigMap",
    ];
    for kind in kinds {
        apply(&admin, rendered.one(kind), false)
            .await
            .unwrap_or_else(|e| panic!("apply the chart's {kind}: {e}"));
    }
    let account = rendered.one("ServiceAccount")["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let client = cluster.service_account_client(namespace, &account).await;
    let statefulsets: Api<StatefulSet> = Api::all(client.clone());
    eventually("the chart's ClusterRoleBinding takes effect", async || {
        statefulsets
            .list(&ListParams::default().limit(1))
            .await
            .ok()
    })
    .await;
    (client, rendered)
}

/// How many objects of kind `K` in `namespace` match `selector`.
async fn count<K>(client: &kube::Client, namespace: &str, selector: &ListParams) -> usize
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    api.list(selector).await.expect("list").items.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_rbac_lets_the_controller_create_and_remove_supporting_objects() {
    let _turn = OPTED_IN_STATEFULSETS.lock().await;
    let cluster = ControlPlane::shared();
    let admin = cluster.client().await;
    let release_namespace = cluster.namespace("chart-rbac-controller").await;
    let (client, _) =
        client_with_the_charts_rbac(cluster, "rbac-controller", &release_namespace).await;

    // The controller as `serve` runs it, with the chart's ServiceAccount.
    let flags = ControllerArgs::augment_args(clap::Command::new("serve"));
    let matches = flags
        .try_get_matches_from([
            "serve",
            &format!("--lease-namespace={release_namespace}"),
            "--identity=rbac-controller-0",
            "--lease-seconds=4",
            "--resync-seconds=2",
        ])
        .expect("controller flags");
    let args = ControllerArgs::from_arg_matches(&matches).unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = ControllerMetrics::register(&mut registry);
    let (leading, _) = tokio::sync::watch::channel(false);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(async move {
        let stopped = async {
            let _ = stopped.await;
        };
        controller::run(client, args, metrics, leading, stopped).await
    });

    // An opted-in StatefulSet as the webhook stores it.
    let app_namespace = cluster.namespace("chart-rbac-app").await;
    let injected = dkron_ha::manifests::inject_manifests(STATEFULSET, &Default::default())
        .expect("inject the fixture")
        .yaml;
    let statefulset: StatefulSet = serde_yaml_ng::from_str(&injected).unwrap();
    let apps: Api<StatefulSet> = Api::namespaced(admin.clone(), &app_namespace);
    apps.create(&PostParams::default(), &statefulset)
        .await
        .expect("create the StatefulSet");

    let ours = ListParams::default().labels("app.kubernetes.io/managed-by=dkron-ha");
    let roles: Api<Role> = Api::namespaced(admin.clone(), &app_namespace);
    let role = eventually(
        "the controller creates the label-updater's Role",
        async || roles.list(&ours).await.ok()?.items.into_iter().next(),
    )
    .await;
    // RBAC lets it grant patch on the StatefulSet's pods only because it holds that itself.
    let patch_rule = role
        .rules
        .unwrap_or_default()
        .into_iter()
        .find(|r| r.verbs == ["patch"]);
    assert!(
        patch_rule
            .and_then(|r| r.resource_names)
            .is_some_and(|names| !names.is_empty())
    );
    let supporting = async || {
        let ns = app_namespace.as_str();
        [
            count::<ServiceAccount>(&admin, ns, &ours).await,
            count::<Role>(&admin, ns, &ours).await,
            count::<RoleBinding>(&admin, ns, &ours).await,
            count::<Service>(&admin, ns, &ours).await,
            count::<PodDisruptionBudget>(&admin, ns, &ours).await,
        ]
    };
    eventually(
        "ServiceAccount, Role, RoleBinding, leader Service and PDB exist",
        async || (supporting().await == [1, 1, 1, 1, 1]).then_some(()),
    )
    .await;
    // Its Events (here: the StatefulSet has no headless Service) are published.
    let events: Api<Event> = Api::namespaced(admin.clone(), &app_namespace);
    eventually(
        "the controller publishes an Event on the StatefulSet",
        async || {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items.into_iter().find(|e| {
                e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("StatefulSet")
            })
        },
    )
    .await;

    // Opting out: the controller deletes what it created.
    let opt_out = json!({"metadata": {"annotations": {ANNOTATION_ENABLED: "false"}}});
    apps.patch("dkron", &PatchParams::default(), &Patch::Merge(&opt_out))
        .await
        .unwrap();
    eventually(
        "the supporting objects are deleted after opting out",
        async || (supporting().await == [0, 0, 0, 0, 0]).then_some(()),
    )
    .await;

    let _ = stop.send(());
    let stopped = tokio::time::timeout(Duration::from_secs(10), controller).await;
    assert!(matches!(stopped, Ok(Ok(Ok(())))), "{stopped:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_rbac_lets_fleetlock_lock_cordon_drain_and_release_a_node() {
    let cluster = ControlPlane::shared();
    let admin = cluster.client().await;
    let namespace = cluster.namespace("chart-rbac-fleetlock").await;
    let (client, rendered) =
        client_with_the_charts_rbac(cluster, "rbac-fleetlock", &namespace).await;
    let args = args_of(rendered.one("Deployment"));

    // A Ready node (named after the test's namespace) with one pod on it.
    let node_name = format!("{namespace}-node");
    let digest = format!("{:x}", Sha256::digest(namespace.as_bytes()));
    let machine_id = &digest[..32];
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": node_name},
        "status": {
            "conditions": [{"type": "Ready", "status": "True"}],
            "nodeInfo": {"machineID": machine_id, "systemUUID": "", "bootID": "", "kernelVersion": "",
                         "osImage": "", "containerRuntimeVersion": "", "kubeletVersion": "",
                         "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"}
        }
    }))
    .unwrap();
    let nodes: Api<Node> = Api::all(admin.clone());
    nodes
        .create(&PostParams::default(), &node)
        .await
        .expect("create the Node");
    nodes
        .patch_status(
            &node_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": node.status})),
        )
        .await
        .expect("the Node's status");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "guest"},
        "spec": {"nodeName": node_name, "containers": [{"name": "pause", "image": "registry.k8s.io/pause:3.10"}]}
    }))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &namespace);
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create the pod");
    // FleetLock starts after the Node exists, so its Node watch lists it.
    let config = FleetLockConfig {
        namespace: namespace.clone(),
        config_map: flag(&args, "fleetlock-config-map").unwrap().to_owned(),
        drain_wait: Duration::from_secs(1),
        ..FleetLockConfig::default()
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let fleetlock = fleetlock::router(Arc::new(FleetLock::new(client, config, &mut registry)));
    let ask = async |endpoint: &str, id: &str| -> u16 {
        let body = json!({"client_params": {"id": id, "group": "default"}}).to_string();
        let request = axum::http::Request::post(format!("/fleetlock/v1/{endpoint}"))
            .header("fleet-lock-protocol", "true")
            .body(axum::body::Body::from(body))
            .unwrap();
        let response = fleetlock.clone().oneshot(request).await.unwrap();
        response.status().as_u16()
    };
    let id = app_specific_machine_id(machine_id).unwrap();

    // pre-reboot: slot taken, node cordoned, pod evicted; it stays terminating without a
    // kubelet, so the answer is not 200 yet.
    assert_ne!(ask("pre-reboot", &id).await, 200);
    let evicted = pods.get("guest").await.unwrap();
    assert!(
        evicted.metadata.deletion_timestamp.is_some(),
        "the pod was not evicted"
    );
    let cordoned = nodes.get(&node_name).await.unwrap();
    assert_eq!(cordoned.spec.and_then(|s| s.unschedulable), Some(true));
    let lease: Api<Lease> = Api::namespaced(admin.clone(), &namespace);
    assert!(lease.get("dkron-ha-fleetlock-default").await.is_ok());
    let events: Api<Event> = Api::namespaced(admin.clone(), "default");
    eventually("FleetLock publishes an Event on the Node", async || {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items.into_iter().find(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(node_name.as_str())
        })
    })
    .await;

    // What the kubelet would do; then the node is drained and may reboot.
    pods.delete(
        "guest",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        },
    )
    .await
    .unwrap();
    eventually("the evicted pod is gone", async || {
        pods.get_opt("guest").await.ok()?.is_none().then_some(())
    })
    .await;
    assert_eq!(ask("pre-reboot", &id).await, 200);
    // steady-state: uncordoned and the slot released.
    assert_eq!(ask("steady-state", &id).await, 200);
    let released = nodes.get(&node_name).await.unwrap();
    assert_ne!(released.spec.and_then(|s| s.unschedulable), Some(true));

    nodes
        .delete(&node_name, &DeleteParams::default())
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// certificates

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_helm_generated_certificate_is_served_and_trusted_through_the_ca_bundle() {
    let rendered = render("dkron-ha", "dkron-ha", "chart/ci/defaults-values.yaml", &[]);
    let secret = rendered.one("Secret");
    let dir = tempfile::tempdir().unwrap();
    for key in ["tls.crt", "tls.key"] {
        std::fs::write(
            dir.path().join(key),
            b64decode(secret["data"][key].as_str().unwrap()),
        )
        .unwrap();
    }
    let serve = start_serve(&serve_command(rendered.one("Deployment")), dir.path()).await;
    let webhook = &rendered.one("MutatingWebhookConfiguration")["webhooks"][0];
    let ca_bundle = b64decode(webhook["clientConfig"]["caBundle"].as_str().unwrap());
    let service_host = "dkron-ha.dkron-ha.svc";
    let mut builder = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .resolve(service_host, ([127, 0, 0, 1], serve.https_port).into())
        .timeout(Duration::from_secs(10));
    for ca in reqwest::Certificate::from_pem_bundle(ca_bundle.as_bytes()).unwrap() {
        builder = builder.add_root_certificate(ca);
    }
    let response = builder
        .build()
        .unwrap()
        .get(format!(
            "https://{service_host}:{}/healthz",
            serve.https_port
        ))
        .send()
        .await
        .expect("TLS to the Service name, verified with the rendered caBundle");
    assert_eq!(response.status(), 200);
    serve.stop().await;
}

/// `helm template --dry-run=server` renders with `lookup` answered by the cluster, as
/// `helm upgrade` does.
fn render_against(cluster: &ControlPlane, namespace: &str, extra: &[&str]) -> Rendered {
    let kubeconfig = cluster.kubeconfig.display().to_string();
    let mut args = vec![
        "--dry-run=server",
        "--kubeconfig",
        kubeconfig.as_str(),
        "--show-only",
        "templates/webhook.yaml",
    ];
    args.extend(extra);
    render(
        "dkron-ha",
        namespace,
        "chart/ci/defaults-values.yaml",
        &args,
    )
}

fn tls_data(rendered: &Rendered) -> BTreeMap<String, String> {
    serde_json::from_value(rendered.one("Secret")["data"].clone()).unwrap()
}

fn trusted_cas(rendered: &Rendered) -> Vec<String> {
    let bundle =
        rendered.one("MutatingWebhookConfiguration")["webhooks"][0]["clientConfig"]["caBundle"]
            .as_str()
            .unwrap()
            .to_owned();
    pem_blocks(&b64decode(&bundle))
}

#[tokio::test]
async fn upgrades_keep_the_self_signed_certificate_and_a_rotation_trusts_old_and_new_ca() {
    let cluster = ControlPlane::shared();
    let client = cluster.client().await;
    let namespace = cluster.namespace("chart-certs").await;
    let store = async |rendered: &Rendered| {
        apply(&client, rendered.one("Secret"), false)
            .await
            .expect("store the Secret as helm would");
    };

    // Install: nothing to look up, so a new CA and certificate.
    let installed = render_against(cluster, &namespace, &[]);
    let first = tls_data(&installed);
    let first_ca = b64decode(&first["ca.crt"]).trim().to_owned();
    assert_eq!(trusted_cas(&installed), std::slice::from_ref(&first_ca));
    assert!(!first.contains_key("ca-previous.crt"));
    store(&installed).await;

    // Upgrade: the stored certificate is kept as it is.
    let upgraded = render_against(cluster, &namespace, &[]);
    assert_eq!(tls_data(&upgraded), first);
    assert_eq!(trusted_cas(&upgraded), std::slice::from_ref(&first_ca));

    // Rotation on request: a new CA and certificate; the old CA stays trusted, because the
    // replicas serve the old certificate until the kubelet refreshes their Secret volume.
    let rotated = render_against(
        cluster,
        &namespace,
        &["--set", "certs.selfSigned.generation=2"],
    );
    let second = tls_data(&rotated);
    let second_ca = b64decode(&second["ca.crt"]).trim().to_owned();
    assert_ne!(second_ca, first_ca);
    assert_ne!(second["tls.crt"], first["tls.crt"]);
    assert_eq!(second["ca-previous.crt"], first["ca.crt"]);
    assert_eq!(trusted_cas(&rotated), [second_ca.clone(), first_ca.clone()]);
    store(&rotated).await;
    let again = render_against(
        cluster,
        &namespace,
        &["--set", "certs.selfSigned.generation=2"],
    );
    assert_eq!(tls_data(&again), second);

    // Close to expiry, any upgrade renews.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let soon = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 86_400)
        .to_string();
    let expiring = json!({"metadata": {"annotations": {"dkron-ha/not-after": soon}}});
    secrets
        .patch(
            "dkron-ha-tls",
            &PatchParams::default(),
            &Patch::Merge(&expiring),
        )
        .await
        .unwrap();
    let renewed = render_against(
        cluster,
        &namespace,
        &["--set", "certs.selfSigned.generation=2"],
    );
    let third = tls_data(&renewed);
    assert_ne!(third["tls.crt"], second["tls.crt"]);
    assert_eq!(third["ca-previous.crt"], second["ca.crt"]);

    // Extra CAs (a rotation between modes or to a CA of your own) are trusted as well.
    let extra = generate(&CertRequest {
        service: "x".into(),
        namespace: "y".into(),
        extra_names: vec![],
        valid_days: 1,
    })
    .unwrap();
    let extra_ca = extra.ca_cert_pem.trim().to_owned();
    let with_extra = render_against(
        cluster,
        &namespace,
        &[
            "--set",
            "certs.selfSigned.generation=2",
            "--set-string",
            &format!("certs.extraCABundle={extra_ca}"),
        ],
    );
    assert_eq!(trusted_cas(&with_extra).last(), Some(&extra_ca));
}

#[test]
fn install_notes_show_the_zincati_configuration() {
    let cluster = ControlPlane::shared();
    let kubeconfig = cluster.kubeconfig.display().to_string();
    for (values, base_url) in [
        (
            "chart/ci/cluster-ip-values.yaml",
            "base_url = \"http://10.0.0.10/fleetlock/\"",
        ),
        (
            "chart/ci/defaults-values.yaml",
            "base_url = \"http://<SERVICE_IP>/fleetlock/\"",
        ),
    ] {
        let output = helm(&[
            "install",
            "dkron-ha",
            "chart",
            "--namespace",
            "notes",
            "--dry-run=server",
            "--kubeconfig",
            &kubeconfig,
            "--values",
            values,
        ]);
        let notes = output
            .split_once("NOTES:")
            .map(|(_, notes)| notes)
            .unwrap_or_else(|| panic!("no NOTES in:\n{output}"));
        for expected in [
            "/etc/zincati/config.d/55-updates-strategy.toml",
            "[updates]\n     strategy = \"fleet_lock\"",
            "[updates.fleet_lock]",
            base_url,
            "kubectl annotate statefulset <dkron> dkron-ha/enabled=true",
        ] {
            assert!(
                notes.contains(expected),
                "{values}: {expected:?} not in NOTES:\n{notes}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// webhook-config/

#[test]
fn webhook_config_is_what_the_render_script_writes_from_the_chart() {
    let fresh = tempfile::tempdir().unwrap();
    let script = Path::new(ROOT).join("tests/tools/render-webhook-config.sh");
    let output = Command::new("bash")
        .arg(&script)
        .arg(fresh.path())
        .env("HELM", helm_binary())
        .output()
        .expect("run the render script");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let committed_dir = Path::new(ROOT).join("webhook-config");
    let yaml_files = |dir: &Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".yaml"))
            .collect();
        names.sort();
        names
    };
    let stale = "webhook-config/ no longer matches chart/: run tests/tools/render-webhook-config.sh and commit the result";
    let generated = yaml_files(fresh.path());
    assert!(
        generated.contains(&"kustomization.yaml".to_owned())
            && generated.contains(&"webhook.yaml".to_owned()),
        "{generated:?}"
    );
    for name in &generated {
        let want = std::fs::read_to_string(fresh.path().join(name)).unwrap();
        let have = std::fs::read_to_string(committed_dir.join(name)).unwrap_or_default();
        assert!(have == want, "{stale} ({name} differs)");
    }
    // Everything else in webhook-config/ is the values file, not a leftover manifest.
    let mut committed = yaml_files(&committed_dir);
    committed.retain(|n| n != "chart-values.yaml");
    assert_eq!(committed, generated, "{stale}");

    // The kustomize wiring names what the chart rendered.
    let read =
        |name: &str| Rendered::parse(&std::fs::read_to_string(committed_dir.join(name)).unwrap());
    let deployment = read("deployment.yaml");
    let mounted = &deployment.one("Deployment")["spec"]["template"]["spec"]["volumes"][0]["secret"]
        ["secretName"];
    let webhook = read("webhook.yaml");
    let kustomization = read("kustomization.yaml");
    let kustomization = &kustomization.objects[0];
    assert_eq!(&kustomization["secretGenerator"][0]["name"], mounted);
    assert_eq!(kustomization["replacements"][0]["source"]["name"], *mounted);
    assert_eq!(
        kustomization["replacements"][0]["targets"][0]["select"]["name"],
        webhook.one("MutatingWebhookConfiguration")["metadata"]["name"]
    );
}

// ---------------------------------------------------------------------------------------------
// another registry and namespace (issue "Ship it", item 5)

const OTHER_REPOSITORY: &str = "registry.example.com/acme/dkron-ha";
const OTHER_NAMESPACE: &str = "acme-system";
const DEFAULT_NAMESPACE: &str = "dkron-ha";
const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const OTHER_DIGEST: &str =
    "sha256:fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

/// Every place `objects` name a namespace, as (where, namespace): each `namespace` field at
/// any depth (metadata, RBAC subjects, the webhook's Service), Namespace objects, the values
/// of the webhook's namespaceSelector on kubernetes.io/metadata.name, cert-manager's
/// inject-ca-from, and the namespace in the names of cert-manager Certificates.
fn named_namespaces(objects: &[Value]) -> Vec<(String, String)> {
    fn walk(value: &Value, path: &str, found: &mut Vec<(String, String)>) {
        match value {
            Value::Object(map) => {
                for (key, value) in map {
                    let here = format!("{path}.{key}");
                    if let ("namespace", Some(namespace)) = (key.as_str(), value.as_str()) {
                        found.push((here.clone(), namespace.to_owned()));
                    }
                    walk(value, &here, found);
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    walk(item, &format!("{path}[{i}]"), found);
                }
            }
            _ => {}
        }
    }
    let mut found = Vec::new();
    for object in objects {
        let kind = object["kind"].as_str().unwrap_or("?");
        let name = object["metadata"]["name"].as_str().unwrap_or("?");
        let id = format!("{kind}/{name}");
        walk(object, &id, &mut found);
        if kind == "Namespace" {
            found.push((format!("{id}.metadata.name"), name.to_owned()));
        }
        let webhooks = object["webhooks"].as_array().into_iter().flatten();
        for (i, webhook) in webhooks.enumerate() {
            let expressions = webhook["namespaceSelector"]["matchExpressions"].as_array();
            for expression in expressions.into_iter().flatten() {
                if expression["key"] != "kubernetes.io/metadata.name" {
                    continue;
                }
                for value in expression["values"].as_array().into_iter().flatten() {
                    let where_ = format!("{id}.webhooks[{i}].namespaceSelector");
                    found.push((where_, value.as_str().unwrap_or_default().to_owned()));
                }
            }
        }
        let annotations = &object["metadata"]["annotations"];
        if let Some(from) = annotations["cert-manager.io/inject-ca-from"].as_str() {
            let namespace = from
                .split_once('/')
                .map_or(from, |(namespace, _)| namespace);
            found.push((format!("{id} inject-ca-from"), namespace.to_owned()));
        }
        if kind == "Certificate" {
            // <service>.<namespace>[.svc[.<domain>]], and the CA's "dkron-ha CA (<namespace>)".
            let dns_names = object["spec"]["dnsNames"].as_array().into_iter().flatten();
            for dns_name in dns_names.filter_map(Value::as_str) {
                if let Some(namespace) = dns_name.split('.').nth(1) {
                    found.push((format!("{id} dnsName {dns_name}"), namespace.to_owned()));
                }
            }
            let common_name = object["spec"]["commonName"].as_str().unwrap_or_default();
            let namespace = match common_name.strip_suffix(')') {
                Some(ca) => ca.rsplit_once('(').map(|(_, namespace)| namespace),
                None => common_name.split('.').nth(1),
            };
            if let Some(namespace) = namespace {
                found.push((format!("{id} commonName"), namespace.to_owned()));
            }
        }
    }
    found
}

/// Fails unless every namespace `objects` name is `namespace` or one the webhook excludes
/// besides it (`also`, after kube-system), and the usual places all name it.
fn assert_only_namespace(what: &str, objects: &[Value], namespace: &str, also: &[&str]) {
    let named = named_namespaces(objects);
    let excluded: Vec<&str> = [namespace, "kube-system"]
        .iter()
        .chain(also)
        .copied()
        .collect();
    let strays: Vec<&(String, String)> = named
        .iter()
        .filter(|(_, named)| !excluded.contains(&named.as_str()))
        .collect();
    assert!(
        strays.is_empty(),
        "{what}: other namespaces named: {strays:?}"
    );
    // Only the webhook's selector names the others, in this order.
    let selector: Vec<&str> = named
        .iter()
        .filter(|(place, _)| place.ends_with(".namespaceSelector"))
        .map(|(_, named)| named.as_str())
        .collect();
    assert_eq!(
        selector, excluded,
        "{what}: the webhook's excluded namespaces"
    );
    for (place, named) in &named {
        if !place.ends_with(".namespaceSelector") {
            assert_eq!(named, namespace, "{what}: {place}");
        }
    }
    // Each place that must follow the namespace was looked at.
    for place in [
        "Deployment/dkron-ha.metadata.namespace",
        "Service/dkron-ha.metadata.namespace",
        "ClusterRoleBinding/dkron-ha.subjects[0].namespace",
        "RoleBinding/dkron-ha.subjects[0].namespace",
        "MutatingWebhookConfiguration/dkron-ha.webhooks[0].clientConfig.service.namespace",
    ] {
        assert!(
            named.iter().any(|(p, _)| p == place),
            "{what}: no {place} in {named:?}"
        );
    }
}

/// The Deployment's image and the image its `serve` injects into Dkron pods.
fn images_of(rendered: &Rendered) -> (String, String) {
    let deployment = rendered.one("Deployment");
    let image = container(deployment)["image"].as_str().unwrap().to_owned();
    let command = serve_command(deployment);
    let inject = flag(&command, "inject-image")
        .unwrap_or_else(|| panic!("no inject image in {command:?}"))
        .to_owned();
    (image, inject)
}

#[test]
fn the_chart_given_another_registry_and_namespace_names_neither_default() {
    let set = format!("image.repository={OTHER_REPOSITORY},image.tag=9.9.9");
    let other = format!("{OTHER_REPOSITORY}:9.9.9");
    for (case, values) in CASES {
        let args = [
            "template",
            "dkron-ha",
            "chart",
            "--namespace",
            OTHER_NAMESPACE,
        ];
        let yaml = helm(&[&args[..], &["--values", values, "--set", &set]].concat());
        assert!(!yaml.contains("ghcr.io"), "case {case}:\n{yaml}");
        let rendered = Rendered::parse(&yaml);
        let inject = match *case {
            "native-sidecar" => "registry.example.com/dkron-ha:0.1.0",
            _ => &other,
        };
        assert_eq!(
            images_of(&rendered),
            (other.clone(), inject.to_owned()),
            "{case}"
        );
        let also: &[&str] = match *case {
            "cluster-ip" => &["monitoring"],
            _ => &[],
        };
        assert_only_namespace(case, &rendered.objects, OTHER_NAMESPACE, also);
    }

    // The same look at the default namespace finds it everywhere it should: the check above
    // is not blind. (cert-manager adds inject-ca-from and its Certificates' names.)
    for (case, values) in [
        ("defaults", "chart/ci/defaults-values.yaml"),
        ("cert-manager", "chart/ci/cert-manager-values.yaml"),
    ] {
        let rendered = render("dkron-ha", DEFAULT_NAMESPACE, values, &[]);
        let named = named_namespaces(&rendered.objects);
        assert_only_namespace(case, &rendered.objects, DEFAULT_NAMESPACE, &[]);
        let places = |needle: &str| {
            named
                .iter()
                .filter(|(place, named)| place.contains(needle) && named == DEFAULT_NAMESPACE)
                .count()
        };
        let mut expected = vec![
            "metadata.namespace",
            "subjects",
            "clientConfig",
            "namespaceSelector",
        ];
        if case == "cert-manager" {
            expected.extend(["inject-ca-from", "dnsName", "commonName"]);
        }
        for needle in expected {
            assert!(
                places(needle) > 0,
                "{case}: {needle} not found in {named:?}"
            );
        }
        assert_eq!(
            images_of(&rendered).0,
            "ghcr.io/dkron-ha/dkron-ha:0.1.0",
            "{case}"
        );
    }
}

#[test]
fn an_image_digest_wins_over_the_tag_and_the_inject_image_follows_the_image() {
    let ghcr = "ghcr.io/dkron-ha/dkron-ha";
    let mirror = "registry.example.com/mirror/dkron-ha";
    let cases: Vec<(String, String, String)> = vec![
        (
            String::new(),
            format!("{ghcr}:0.1.0"),
            format!("{ghcr}:0.1.0"),
        ),
        (
            format!("image.digest={DIGEST}"),
            format!("{ghcr}@{DIGEST}"),
            format!("{ghcr}@{DIGEST}"),
        ),
        (
            format!("image.repository={OTHER_REPOSITORY},image.tag=9.9.9,image.digest={DIGEST}"),
            format!("{OTHER_REPOSITORY}@{DIGEST}"),
            format!("{OTHER_REPOSITORY}@{DIGEST}"),
        ),
        // injectImage's own fields replace image's one by one: a repository alone keeps
        // image's digest...
        (
            format!("image.digest={DIGEST},injectImage.repository={mirror}"),
            format!("{ghcr}@{DIGEST}"),
            format!("{mirror}@{DIGEST}"),
        ),
        // ...and a tag or digest of its own replaces image's tag and digest.
        (
            format!("image.digest={DIGEST},injectImage.tag=1.2.3"),
            format!("{ghcr}@{DIGEST}"),
            format!("{ghcr}:1.2.3"),
        ),
        (
            format!("image.tag=9.9.9,injectImage.tag=1.2.3,injectImage.digest={OTHER_DIGEST}"),
            format!("{ghcr}:9.9.9"),
            format!("{ghcr}@{OTHER_DIGEST}"),
        ),
    ];
    for (set, image, inject) in cases {
        let extra: Vec<&str> = match set.as_str() {
            "" => vec![],
            set => vec!["--set", set],
        };
        let rendered = render(
            "dkron-ha",
            OTHER_NAMESPACE,
            "chart/ci/defaults-values.yaml",
            &extra,
        );
        assert_eq!(images_of(&rendered), (image, inject), "--set {set}");
    }
}

/// The kubectl that tests/tools/build.sh builds next to helm (`kubectl kustomize` is
/// kustomize).
fn kubectl_binary() -> PathBuf {
    let kubectl = helm_binary().with_file_name("kubectl");
    assert!(kubectl.is_file(), "no {}", kubectl.display());
    kubectl
}

/// `kubectl kustomize DIR`.
fn kustomize(dir: &Path) -> String {
    let output = Command::new(kubectl_binary())
        .arg("kustomize")
        .arg(dir)
        .env("KUBECONFIG", dir.join("no-kubeconfig"))
        .output()
        .expect("run kubectl kustomize");
    assert!(
        output.status.success(),
        "kubectl kustomize {} failed ({}):\n{}",
        dir.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("kustomize prints UTF-8")
}

#[test]
fn a_kustomize_overlay_moves_webhook_config_to_another_registry_and_namespace() {
    // webhook-config/ as a user's base (its files, not a certs/ a developer may keep there),
    // with a certificate for the overlay's namespace as its kustomization's comment says.
    let work = tempfile::tempdir().unwrap();
    let base = work.path().join("base");
    std::fs::create_dir(&base).unwrap();
    for entry in std::fs::read_dir(Path::new(ROOT).join("webhook-config")).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), base.join(entry.file_name())).unwrap();
        }
    }
    let certs = generate(&CertRequest {
        service: "dkron-ha".into(),
        namespace: OTHER_NAMESPACE.into(),
        extra_names: vec![],
        valid_days: 1,
    })
    .unwrap();
    certs.write_to(&base.join("certs")).unwrap();
    let ca_bundle = |rendered: &Rendered| -> String {
        let webhook = &rendered.one("MutatingWebhookConfiguration")["webhooks"][0];
        let text = webhook["clientConfig"]["caBundle"]
            .as_str()
            .unwrap_or_default();
        b64decode(&text.split_whitespace().collect::<String>())
    };

    // The base alone: the defaults, for both images.
    let rendered = Rendered::parse(&kustomize(&base));
    let ghcr = "ghcr.io/dkron-ha/dkron-ha:0.1.0";
    assert_eq!(images_of(&rendered), (ghcr.to_owned(), ghcr.to_owned()));
    assert_only_namespace("base", &rendered.objects, DEFAULT_NAMESPACE, &[]);

    // Overlays that say nothing but where the base is, the namespace and the image.
    for (name, image_fields, expected) in [
        ("tag", "newTag: 9.9.9", format!("{OTHER_REPOSITORY}:9.9.9")),
        (
            "digest",
            &*format!("digest: {DIGEST}"),
            format!("{OTHER_REPOSITORY}@{DIGEST}"),
        ),
    ] {
        let overlay = work.path().join(name);
        std::fs::create_dir(&overlay).unwrap();
        std::fs::write(
            overlay.join("kustomization.yaml"),
            format!(
                "apiVersion: kustomize.config.k8s.io/v1beta1\n\
                 kind: Kustomization\n\
                 resources:\n  - ../base\n\
                 namespace: {OTHER_NAMESPACE}\n\
                 images:\n  - name: ghcr.io/dkron-ha/dkron-ha\n    newName: {OTHER_REPOSITORY}\n    {image_fields}\n"
            ),
        )
        .unwrap();
        let yaml = kustomize(&overlay);
        assert!(!yaml.contains("ghcr.io"), "overlay {name}:\n{yaml}");
        let rendered = Rendered::parse(&yaml);
        assert_eq!(
            images_of(&rendered),
            (expected.clone(), expected),
            "overlay {name}"
        );
        assert_only_namespace(name, &rendered.objects, OTHER_NAMESPACE, &[]);
        let namespaces: Vec<&Value> = rendered
            .all("Namespace")
            .iter()
            .map(|n| &n["metadata"]["name"])
            .collect();
        assert_eq!(namespaces, [OTHER_NAMESPACE], "overlay {name}");
        // The TLS Secret keeps its name, in the new namespace, and still fills the caBundle.
        let deployment = rendered.one("Deployment");
        let secret = rendered.one("Secret");
        assert_eq!(
            secret["metadata"]["name"],
            deployment["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"]
        );
        assert_eq!(secret["metadata"]["name"], "dkron-ha-tls", "overlay {name}");
        assert_eq!(ca_bundle(&rendered), certs.ca_cert_pem, "overlay {name}");
    }
}
