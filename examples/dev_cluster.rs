//! A throwaway Kubernetes control plane with `dkron-ha serve` registered in it as the mutating
//! webhook, to try the injection with kubectl:
//!
//! ```text
//! cargo run --example dev_cluster [-- --inject-image IMAGE --native-sidecar]
//! ```
//!
//! The control plane is the tests' (tests/support/control_plane.rs): etcd, kube-apiserver and
//! kube-controller-manager built from the Go modules pinned in tests/tools, on loopback. The
//! admin kubeconfig goes to `target/dev-cluster/kubeconfig`. Runs until Ctrl-C or SIGTERM; then
//! every component stops with this process. There is no kubelet, so Pods stay Pending.

// The tests' control plane, as is; this example uses only part of its API.
#[allow(dead_code)]
#[path = "../tests/support/control_plane.rs"]
mod control_plane;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use control_plane::ControlPlane;
use dkron_ha::certs::{self, CertRequest};
use dkron_ha::controller;
use dkron_ha::serve::{self, InjectorArgs, ServeArgs, Server};
use dkron_ha::telemetry::{self, LogFormat};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::apps::v1::StatefulSet;
use kube::api::{Api, PostParams};

/// The configuration users install (rendered from the chart); only its clientConfig changes.
const SHIPPED_WEBHOOK: &str = include_str!("../webhook-config/webhook.yaml");
const EXAMPLE: &str = include_str!("dkron.yaml");

/// Starts a local control plane with the dkron-ha webhook registered in it.
#[derive(Parser)]
struct Args {
    #[command(flatten)]
    injector: InjectorArgs,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,dkron_ha=info".into());
    telemetry::init(LogFormat::Text, &filter).map_err(anyhow::Error::msg)?;

    eprintln!(
        "starting etcd, kube-apiserver and kube-controller-manager (the first run builds them from Go modules)..."
    );
    let cluster = ControlPlane::shared();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dev-cluster");
    let result = runtime.block_on(run(cluster, &args.injector, &out));
    // Everything in it points at this control plane, which is gone once we return.
    let _ = std::fs::remove_dir_all(&out);
    result
}

async fn run(cluster: &ControlPlane, injector: &InjectorArgs, out: &Path) -> anyhow::Result<()> {
    let certs_dir = out.join("certs");
    let certs = certs::generate(&CertRequest {
        service: "dkron-ha".into(),
        namespace: "dkron-ha".into(),
        extra_names: vec!["127.0.0.1".into()],
        valid_days: 30,
    })?;
    certs.write_to(&certs_dir)?;
    let mut server = Server::bind(&ServeArgs {
        https_addr: "127.0.0.1:0".parse()?,
        http_addr: "127.0.0.1:0".parse()?,
        tls_cert: certs_dir.join("tls.crt"),
        tls_key: certs_dir.join("tls.key"),
        tls_reload_seconds: 2,
        injector: injector.clone(),
    })
    .await?;
    // The companion controller too, as `serve` runs it: Lease-elected, in namespace default.
    let controller_client = cluster.client().await;
    let metrics = controller::ControllerMetrics::register(server.registry_mut());
    server.add_task(Box::new(move |shutdown| {
        Box::pin(async move {
            let args = controller::ControllerArgs {
                enabled: true,
                lease_name: "dkron-ha-controller".into(),
                lease_namespace: "default".into(),
                identity: Some("dev-cluster".into()),
                lease_seconds: 15,
                resync_seconds: 300,
            };
            let (leading, _) = tokio::sync::watch::channel(false);
            if let Err(error) = controller::run(
                controller_client,
                args,
                metrics,
                leading,
                shutdown.cancelled_owned(),
            )
            .await
            {
                tracing::error!(%error, "controller stopped");
            }
        })
    }));
    let webhook_url = format!("https://127.0.0.1:{}/mutate", server.https_addr()?.port());
    let metrics_url = format!("http://127.0.0.1:{}/metrics", server.http_addr()?.port());
    let mut serving = tokio::spawn(server.run(serve::shutdown_signal()));

    let setup = async {
        let client = cluster.client().await;
        Api::<MutatingWebhookConfiguration>::all(client.clone())
            .create(
                &PostParams::default(),
                &webhook_configuration(&webhook_url, &certs.ca_cert_pem)?,
            )
            .await
            .context("register the MutatingWebhookConfiguration")?;
        wait_until_webhook_is_called(&client).await?;
        copy_kubeconfig(&cluster.kubeconfig, out)
    };
    // A Ctrl-C during set-up stops the server, and with it everything.
    let kubeconfig = tokio::select! {
        stopped = &mut serving => {
            stopped.context("the webhook server task")??;
            return Ok(());
        }
        ready = setup => ready?,
    };

    println!(
        r#"
dkron-ha dev cluster is up.
  API server   {server}
  webhook      {webhook_url} (webhook-config/webhook.yaml: every namespace but kube-system and dkron-ha)
  metrics      {metrics_url}
  logs         {logs}/{{etcd,kube-apiserver,kube-controller-manager}}.log

Try it (with your own kubectl):
  export KUBECONFIG={kubeconfig}
  kubectl apply -f examples/dkron.yaml
  kubectl get sts dkron -o yaml

The companion controller runs too: it creates the ServiceAccount, Role, RoleBinding, the
dkron-leader Service and the PodDisruptionBudget (kubectl get sa,role,rolebinding,svc,pdb).
There is no kubelet: Pods are created from the injected template but stay Pending.

Ctrl-C stops everything."#,
        server = cluster.server,
        logs = cluster.dir.display(),
        kubeconfig = kubeconfig.display(),
    );

    serving.await.context("the webhook server task")??;
    eprintln!("stopped; the control plane stops with this process");
    Ok(())
}

/// The shipped configuration, calling `url` instead of the in-cluster Service. Its
/// namespaceSelector stays: every namespace but kube-system and dkron-ha.
fn webhook_configuration(url: &str, ca_pem: &str) -> anyhow::Result<MutatingWebhookConfiguration> {
    let mut configuration: MutatingWebhookConfiguration =
        serde_yaml_ng::from_str(SHIPPED_WEBHOOK).context("parse webhook-config/webhook.yaml")?;
    for webhook in configuration.webhooks.iter_mut().flatten() {
        webhook.client_config = WebhookClientConfig {
            url: Some(url.into()),
            ca_bundle: Some(ByteString(ca_pem.as_bytes().to_vec())),
            service: None,
        };
    }
    Ok(configuration)
}

/// The API server picks the configuration up from an informer: dry-run create the example's
/// StatefulSet until it comes back injected.
async fn wait_until_webhook_is_called(client: &kube::Client) -> anyhow::Result<()> {
    let mut probe: StatefulSet = serde_yaml_ng::Deserializer::from_str(EXAMPLE)
        .filter_map(|document| serde::Deserialize::deserialize(document).ok())
        .find(|document: &serde_json::Value| document["kind"] == "StatefulSet")
        .map(serde_json::from_value)
        .context("examples/dkron.yaml has no StatefulSet")??;
    // Named so that the webhook's log line for it explains itself.
    probe.metadata.name = Some("dkron-ha-self-check".into());
    let statefulsets = Api::<StatefulSet>::namespaced(client.clone(), "default");
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = statefulsets.create(&dry_run, &probe).await;
        let injected = answer.as_ref().ok().and_then(|sts| {
            let annotations = sts
                .spec
                .as_ref()?
                .template
                .metadata
                .as_ref()?
                .annotations
                .as_ref()?;
            Some(annotations.contains_key("dkron-ha/injected"))
        });
        if injected == Some(true) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the API server did not call the webhook within 60 s (last answer: {answer:?})");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Copies the admin kubeconfig (it holds a client key: owner-only) to `out/kubeconfig`.
fn copy_kubeconfig(admin: &Path, out: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = out.join("kubeconfig");
    std::fs::copy(admin, &path).with_context(|| format!("write {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(path)
}
