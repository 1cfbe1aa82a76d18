//! A throwaway Kubernetes cluster with real nodes and dkron-ha installed from the chart, to try
//! it with kubectl:
//!
//! ```text
//! cargo run --example dev_cluster [-- --nodes 3 --dkron-bin PATH | --dkron-image ARCHIVE]
//! ```
//!
//! The cluster is the tests' (tests/support/cluster.rs): a control plane, kube-scheduler and
//! CoreDNS on a host bridge, and N nodes, each a network namespace with its own containerd,
//! kubelet and kube-proxy. dkron-ha runs on the nodes from an image built here from the
//! project's own static executable, installed with `helm install` as users do (webhook,
//! companion controller and FleetLock). Nothing can be pulled: Dkron runs only if a static Dkron
//! binary (`--dkron-bin`, env `DKRON_BIN`) or an image archive (`--dkron-image`) is given; it is
//! imported as examples/dkron.yaml's image. Needs root. Runs until Ctrl-C or SIGTERM; then every
//! component, namespace and cgroup goes with this process.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Parser;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, ListParams};
use support::cluster::Cluster;
use support::images;

/// examples/dkron.yaml's image, as containerd names it.
const DKRON_IMAGE: &str = "docker.io/dkron/dkron:4.1.1";
const EXAMPLE: &str = include_str!("dkron.yaml");

/// Starts a local cluster with real nodes and dkron-ha installed from the chart.
#[derive(Parser)]
struct Args {
    /// How many nodes.
    #[arg(long, default_value_t = 3, env = "DKRON_HA_DEV_NODES")]
    nodes: u8,
    /// A static Dkron executable: imported into every node as examples/dkron.yaml's image
    /// (`/usr/local/bin/dkron`, the image's entrypoint).
    #[arg(long, env = "DKRON_BIN", conflicts_with = "dkron_image")]
    dkron_bin: Option<PathBuf>,
    /// An image archive (OCI or `docker save`) to import into every node, e.g. Dkron's own
    /// image saved elsewhere.
    #[arg(long, env = "DKRON_HA_DEV_DKRON_IMAGE")]
    dkron_image: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    assert!(
        EXAMPLE.contains(DKRON_IMAGE.trim_start_matches("docker.io/")),
        "examples/dkron.yaml names another Dkron image than {DKRON_IMAGE}"
    );
    if args.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    eprintln!(
        "starting the control plane and {} nodes (the first run builds the components from Go modules and the static executables)...",
        args.nodes
    );
    let cluster = Cluster::start(args.nodes).map_err(anyhow::Error::msg)?;
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dev-cluster");
    std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    let dkron = match (&args.dkron_bin, &args.dkron_image) {
        (Some(binary), _) => {
            if !images::has_interpreter(binary).map_err(anyhow::Error::msg)? {
                let archive = images::oci_archive(
                    &out,
                    DKRON_IMAGE,
                    &[(binary.as_path(), "/usr/local/bin/dkron")],
                    &["/usr/local/bin/dkron"],
                )
                .map_err(anyhow::Error::msg)?;
                cluster
                    .import_image(&archive)
                    .map_err(anyhow::Error::msg)?;
                format!("{DKRON_IMAGE} from {}", binary.display())
            } else {
                bail!(
                    "{} is dynamically linked; the image holds nothing else, so it needs a static Dkron",
                    binary.display()
                );
            }
        }
        (None, Some(archive)) => {
            cluster.import_image(archive).map_err(anyhow::Error::msg)?;
            format!("imported {}", archive.display())
        }
        (None, None) => "none: examples/dkron.yaml's pods will stay in ErrImagePull/ImagePullBackOff (no registry); give --dkron-bin or --dkron-image".into(),
    };
    eprintln!("installing dkron-ha from the chart (helm install)...");
    cluster.install_chart(&[]).map_err(anyhow::Error::msg)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let result = runtime.block_on(report_and_wait(&cluster, &out, &dkron));
    // Everything in it points at this cluster, which is gone once we return.
    let _ = std::fs::remove_dir_all(&out);
    result
}

async fn report_and_wait(cluster: &Cluster, out: &Path, dkron: &str) -> anyhow::Result<()> {
    let kubeconfig = copy_kubeconfig(&cluster.control_plane.kubeconfig, out)?;
    let client = cluster.client().await;
    let service = Api::<Service>::namespaced(client.clone(), "dkron-ha")
        .get("dkron-ha")
        .await
        .context("the chart's Service dkron-ha")?;
    let service_ip = service
        .spec
        .and_then(|spec| spec.cluster_ip)
        .unwrap_or_default();
    let pods = Api::<Pod>::namespaced(client, "dkron-ha")
        .list(&ListParams::default().labels("app.kubernetes.io/name=dkron-ha"))
        .await
        .context("list the dkron-ha pods")?;
    let pod_ips: Vec<String> = pods
        .items
        .iter()
        .filter_map(|pod| pod.status.as_ref()?.pod_ip.clone())
        .collect();
    let first = pod_ips.first().cloned().unwrap_or_else(|| "POD_IP".into());
    let nodes = cluster.node_names();
    println!(
        r#"
dkron-ha dev cluster is up: {count} nodes ({nodes}), dkron-ha installed from the chart.
  API server   {server}
  kubeconfig   {kubeconfig}
  webhook      https://{first}:8443/mutate (pods {pod_ips}; Service dkron-ha.dkron-ha.svc, called by the API server)
  FleetLock    http://{first}:8081/fleetlock/ from this machine; Zincati on a node uses http://{service_ip}/fleetlock/
  metrics      http://{first}:8081/metrics
  Dkron image  {dkron}
  logs         {cluster_dir}/node-*/{{containerd,kubelet,kube-proxy}}.log, {control_plane_dir}/*.log

Try it (kubectl is in the tools cache):
  export KUBECONFIG={kubeconfig} PATH={tools}:$PATH
  kubectl apply -f examples/dkron.yaml
  kubectl get pods -o wide -w

Inside a node: ip netns exec {netns} ...   Ctrl-C stops everything."#,
        count = nodes.len(),
        nodes = nodes.join(", "),
        server = cluster.control_plane.server,
        kubeconfig = kubeconfig.display(),
        pod_ips = pod_ips.join(", "),
        cluster_dir = cluster.dir.display(),
        control_plane_dir = cluster.control_plane.dir.display(),
        tools = support::ControlPlane::tool("kubectl")
            .parent()
            .unwrap_or(Path::new("."))
            .display(),
        netns = cluster.netns(&nodes[0]).unwrap_or_default(),
    );
    shutdown_signal().await;
    eprintln!("stopped; the cluster stops with this process");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
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
