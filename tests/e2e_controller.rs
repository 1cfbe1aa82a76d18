//! The companion controller against the real control plane: supporting objects, RBAC that
//! really limits the label-updater, scaling, opting out, garbage collection, and Lease election.
//! (The raft peer reconciler needs real Dkron servers, which cannot be built here.)

mod support;

use support::eventually;

use dkron_ha::controller::{self, ControllerArgs, ControllerMetrics};
use dkron_ha::inject::{self, InjectorConfig, Operation};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use std::time::Duration;
use support::ControlPlane;

struct RunningController {
    leading: tokio::sync::watch::Receiver<bool>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningController {
    async fn stop(self) {
        support::stop_task(self.stop, self.task, "the controller").await;
    }
}

fn start_controller(client: Client, ns: &str, lease: &str, identity: &str) -> RunningController {
    start_controller_with_resync(client, ns, lease, identity, 2)
}

fn start_controller_with_resync(
    client: Client,
    ns: &str,
    lease: &str,
    identity: &str,
    resync_seconds: u64,
) -> RunningController {
    let args = ControllerArgs {
        enabled: true,
        lease_name: lease.into(),
        lease_namespace: ns.into(),
        identity: Some(identity.into()),
        // serve's default: a holder renews 7 s before expiry, so a renewal slowed down by a
        // busy API server (CI, 2 cores, tests in parallel) does not let the other replica take
        // the Lease while this one still runs the loops (seen once with 6 s). Hand-overs in
        // these tests go by release, not by expiry, so the length costs no time.
        lease_seconds: 15,
        resync_seconds,
        raft_interval_seconds: 5,
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = ControllerMetrics::register(&mut registry);
    let (leading_tx, leading) = tokio::sync::watch::channel(false);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        controller::run(client, args, metrics, leading_tx, async {
            let _ = stopped.await;
        })
        .await
        .expect("controller");
    });
    RunningController {
        leading,
        stop: Some(stop),
        task,
    }
}

/// An opted-in StatefulSet as the webhook would have stored it.
fn injected_statefulset(name: &str, replicas: i32) -> StatefulSet {
    let sts: StatefulSet = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": name, "annotations": {"dkron-ha/enabled": "true"}},
        "spec": {
            "serviceName": name, "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "dkron", "image": "dkron/dkron:4.1.1", "args": ["agent", "--server"]}]}}
        }
    }))
    .unwrap();
    inject::inject(&sts, Operation::Create, None, &InjectorConfig::default())
        .unwrap()
        .unwrap()
        .statefulset
}

async fn headless_service(client: &Client, ns: &str, name: &str, publish_not_ready: bool) {
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": publish_not_ready,
            "selector": {"app": name}, "ports": [{"name": "http", "port": 8080}]}
    }))
    .unwrap();
    Api::<Service>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &svc)
        .await
        .unwrap();
}

async fn exists<K>(client: &Client, ns: &str, name: &str) -> bool
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
{
    Api::<K>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .unwrap()
        .is_some()
}

async fn patch_names(client: &Client, ns: &str, role: &str) -> Vec<String> {
    let role = Api::<Role>::namespaced(client.clone(), ns)
        .get(role)
        .await
        .unwrap();
    role.rules
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.verbs.contains(&"patch".to_string()))
        .flat_map(|r| r.resource_names.unwrap_or_default())
        .collect()
}

#[tokio::test]
async fn supporting_objects_appear_follow_scaling_and_limit_the_label_updater() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    let ns = cp.namespace("ctl-objects").await;
    let running = start_controller(client.clone(), &ns, "ctl-a", "replica-a");
    headless_service(&client, &ns, "dkron", true).await;
    let statefulsets = Api::<StatefulSet>::namespaced(client.clone(), &ns);
    statefulsets
        .create(&PostParams::default(), &injected_statefulset("dkron", 3))
        .await
        .unwrap();

    eventually("supporting objects", || async {
        let all = exists::<ServiceAccount>(&client, &ns, "dkron-dkron-ha").await
            && exists::<Role>(&client, &ns, "dkron-dkron-ha").await
            && exists::<RoleBinding>(&client, &ns, "dkron-dkron-ha").await
            && exists::<Service>(&client, &ns, "dkron-leader").await
            && exists::<PodDisruptionBudget>(&client, &ns, "dkron-dkron-ha").await;
        all.then_some(())
    })
    .await;
    assert_eq!(
        patch_names(&client, &ns, "dkron-dkron-ha").await,
        ["dkron-0", "dkron-1", "dkron-2"]
    );
    let leader = Api::<Service>::namespaced(client.clone(), &ns)
        .get("dkron-leader")
        .await
        .unwrap();
    let selector = leader.spec.unwrap().selector.unwrap();
    assert_eq!(selector["app"], "dkron");
    assert_eq!(selector["dkron-ha/leader"], "true");
    let pdb = Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns)
        .get("dkron-dkron-ha")
        .await
        .unwrap();
    assert_eq!(
        pdb.spec.unwrap().max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );

    // The ServiceAccount now exists, so the statefulset controller can create the pods.
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    eventually("pod dkron-0", || async {
        pods.get_opt("dkron-0").await.unwrap()
    })
    .await;
    let other: Pod = serde_json::from_value(json!({
        "metadata": {"name": "unrelated"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &other).await.unwrap();

    // The label-updater's identity: the pods' ServiceAccount, with a real token.
    let sidecar = cp.service_account_client(&ns, "dkron-dkron-ha").await;
    let sidecar_pods = Api::<Pod>::namespaced(sidecar, &ns);
    let label = |v: &str| Patch::Merge(json!({"metadata": {"labels": {"dkron-ha/leader": v}}}));
    sidecar_pods
        .patch("dkron-0", &PatchParams::default(), &label("true"))
        .await
        .expect("the label-updater may label its own StatefulSet's pods");
    let denied = sidecar_pods
        .patch("unrelated", &PatchParams::default(), &label("true"))
        .await
        .expect_err("patching another pod must be forbidden");
    assert!(
        matches!(denied, kube::Error::Api(ref s) if s.code == 403),
        "{denied:?}"
    );
    // It may list every pod: its StatefulSet's three (created in parallel) and the other.
    eventually("the label-updater lists all four pods", || async {
        (sidecar_pods
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len()
            == 4)
            .then_some(())
    })
    .await;

    // Scaling keeps resourceNames in step.
    statefulsets
        .patch(
            "dkron",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 5}})),
        )
        .await
        .unwrap();
    eventually("role follows scale-up", || async {
        (patch_names(&client, &ns, "dkron-dkron-ha").await.len() == 5).then_some(())
    })
    .await;
    running.stop().await;
}

/// Whether any of the objects the controller makes for StatefulSet `sts` exists.
async fn any_supporting_object(client: &Client, ns: &str, sts: &str) -> bool {
    let owned = format!("{sts}-dkron-ha");
    exists::<ServiceAccount>(client, ns, &owned).await
        || exists::<Role>(client, ns, &owned).await
        || exists::<RoleBinding>(client, ns, &owned).await
        || exists::<Service>(client, ns, &format!("{sts}-leader")).await
        || exists::<PodDisruptionBudget>(client, ns, &owned).await
}

#[tokio::test]
async fn opting_out_removes_only_what_dkron_ha_created_and_deletion_collects_the_rest() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    let ns = cp.namespace("ctl-optout").await;
    let running = start_controller(client.clone(), &ns, "ctl-b", "replica-b");
    headless_service(&client, &ns, "jobs", true).await;
    let statefulsets = Api::<StatefulSet>::namespaced(client.clone(), &ns);
    statefulsets
        .create(&PostParams::default(), &injected_statefulset("jobs", 3))
        .await
        .unwrap();
    eventually("supporting objects", || async {
        exists::<PodDisruptionBudget>(&client, &ns, "jobs-dkron-ha")
            .await
            .then_some(())
    })
    .await;

    // Opt out: the annotation goes, the injected template stays.
    statefulsets
        .patch(
            "jobs",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"dkron-ha/enabled": null}}})),
        )
        .await
        .unwrap();
    eventually("supporting objects removed", || async {
        let any = any_supporting_object(&client, &ns, "jobs").await;
        (!any).then_some(())
    })
    .await;
    assert!(
        exists::<Service>(&client, &ns, "jobs").await,
        "the user's headless Service stays"
    );
    assert!(exists::<StatefulSet>(&client, &ns, "jobs").await);

    // Opt in again, then delete the StatefulSet: the garbage collector removes the objects.
    statefulsets
        .patch(
            "jobs",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"dkron-ha/enabled": "true"}}})),
        )
        .await
        .unwrap();
    eventually("objects back", || async {
        exists::<Role>(&client, &ns, "jobs-dkron-ha")
            .await
            .then_some(())
    })
    .await;

    // Opt out as the webhook does it: the annotation and the injection go together, so the
    // template no longer shows it was ever injected.
    let mut current = statefulsets.get("jobs").await.unwrap();
    current
        .metadata
        .annotations
        .get_or_insert_default()
        .remove("dkron-ha/enabled");
    let plain = inject::uninject(&current).expect("an injected template to take back");
    statefulsets
        .replace("jobs", &PostParams::default(), &plain)
        .await
        .unwrap();
    eventually(
        "supporting objects removed after a plain template",
        || async {
            let any = any_supporting_object(&client, &ns, "jobs").await;
            (!any).then_some(())
        },
    )
    .await;
    statefulsets
        .patch(
            "jobs",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"dkron-ha/enabled": "true"}}})),
        )
        .await
        .unwrap();
    eventually("objects back once more", || async {
        exists::<Role>(&client, &ns, "jobs-dkron-ha")
            .await
            .then_some(())
    })
    .await;
    running.stop().await;
    statefulsets
        .delete("jobs", &DeleteParams::background())
        .await
        .unwrap();
    eventually("garbage collected", || async {
        let any = exists::<Role>(&client, &ns, "jobs-dkron-ha").await
            || exists::<Service>(&client, &ns, "jobs-leader").await
            || exists::<PodDisruptionBudget>(&client, &ns, "jobs-dkron-ha").await;
        (!any).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_headless_service_without_not_ready_addresses_gets_a_warning_event() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    let ns = cp.namespace("ctl-event").await;
    let running = start_controller(client.clone(), &ns, "ctl-c", "replica-c");
    headless_service(&client, &ns, "cron", false).await;
    Api::<StatefulSet>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &injected_statefulset("cron", 3))
        .await
        .unwrap();
    let events = Api::<Event>::namespaced(client.clone(), &ns);
    let event = eventually("warning event", || async {
        events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("HeadlessServiceNotReadyAddresses"))
    })
    .await;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(
        event.regarding.as_ref().and_then(|r| r.name.as_deref()),
        Some("cron")
    );
    assert!(
        event
            .note
            .unwrap_or_default()
            .contains("publishNotReadyAddresses")
    );
    running.stop().await;
}

#[tokio::test]
async fn two_replicas_never_run_the_loops_at_once_and_hand_over_on_shutdown() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("ctl-lease").await;
    let a = start_controller(cp.client().await, &ns, "dkron-ha-controller", "replica-1");
    let b = start_controller(cp.client().await, &ns, "dkron-ha-controller", "replica-2");
    let (la, lb) = (a.leading.clone(), b.leading.clone());
    let mut saw_leader = false;
    for _ in 0..100 {
        let (x, y) = (*la.borrow(), *lb.borrow());
        assert!(!(x && y), "both replicas run the loops");
        saw_leader |= x || y;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(saw_leader, "nobody took the Lease");
    let (leader, follower) = if *la.borrow() { (a, b) } else { (b, a) };
    let follower_leading = follower.leading.clone();
    leader.stop().await;
    let started = tokio::time::Instant::now();
    eventually("hand-over", || async {
        (*follower_leading.borrow()).then_some(())
    })
    .await;
    eprintln!("hand-over took {:?}", started.elapsed());
    follower.stop().await;
}

#[tokio::test]
async fn an_owned_object_deleted_by_hand_is_created_again() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    let ns = cp.namespace("ctl-recreate").await;
    // A resync far beyond the test's patience: only a watch event can bring the objects back.
    let running = start_controller_with_resync(client.clone(), &ns, "ctl-r", "replica-r", 3600);
    headless_service(&client, &ns, "dkron", true).await;
    Api::<StatefulSet>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &injected_statefulset("dkron", 1))
        .await
        .unwrap();
    eventually("supporting objects", || async {
        (exists::<Role>(&client, &ns, "dkron-dkron-ha").await
            && exists::<Service>(&client, &ns, "dkron-leader").await
            && exists::<PodDisruptionBudget>(&client, &ns, "dkron-dkron-ha").await)
            .then_some(())
    })
    .await;
    let uid = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| meta.uid.clone();
    let roles = Api::<Role>::namespaced(client.clone(), &ns);
    let services = Api::<Service>::namespaced(client.clone(), &ns);
    let pdbs = Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns);
    let old_role = uid(&roles.get("dkron-dkron-ha").await.unwrap().metadata);
    let old_service = uid(&services.get("dkron-leader").await.unwrap().metadata);
    let old_pdb = uid(&pdbs.get("dkron-dkron-ha").await.unwrap().metadata);
    roles
        .delete("dkron-dkron-ha", &DeleteParams::default())
        .await
        .unwrap();
    services
        .delete("dkron-leader", &DeleteParams::default())
        .await
        .unwrap();
    pdbs.delete("dkron-dkron-ha", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the deleted objects are back, as new objects", || async {
        let role = roles.get_opt("dkron-dkron-ha").await.unwrap()?;
        let service = services.get_opt("dkron-leader").await.unwrap()?;
        let pdb = pdbs.get_opt("dkron-dkron-ha").await.unwrap()?;
        (uid(&role.metadata) != old_role
            && uid(&service.metadata) != old_service
            && uid(&pdb.metadata) != old_pdb)
            .then_some(())
    })
    .await;
    running.stop().await;
}

/// Memory of one `serve` process (KiB, from /proc/PID/status).
struct ServeMemory {
    rss: u64,
    peak: u64,
}

/// Starts `serve` with its controller on Lease `lease`, waits until it has reconciled a
/// StatefulSet and its watches have had 10 s to list, reads its memory and stops it.
async fn measure_serve(cp: &ControlPlane, ns: &str, lease: &str) -> ServeMemory {
    let dir = tempfile::tempdir().unwrap();
    dkron_ha::certs::generate(&dkron_ha::certs::CertRequest {
        service: "dkron-ha".into(),
        namespace: ns.into(),
        extra_names: vec!["127.0.0.1".into()],
        valid_days: 1,
    })
    .unwrap()
    .write_to(dir.path())
    .unwrap();
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (https, http) = (free_port(), free_port());
    let mut serve = tokio::process::Command::new(env!("CARGO_BIN_EXE_dkron-ha"))
        .args(["serve", "--log-level", "warn"])
        .env("DKRON_HA_HTTPS_ADDR", format!("127.0.0.1:{https}"))
        .env("DKRON_HA_HTTP_ADDR", format!("127.0.0.1:{http}"))
        .env("DKRON_HA_TLS_CERT", dir.path().join("tls.crt"))
        .env("DKRON_HA_TLS_KEY", dir.path().join("tls.key"))
        .env("DKRON_HA_LEASE_NAME", lease)
        .env("KUBECONFIG", &cp.kubeconfig)
        .env("POD_NAMESPACE", ns)
        .env("POD_NAME", lease)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = serve.id().expect("serve runs");
    let metrics = reqwest::Client::new();
    eventually("serve reconciled the StatefulSet", || async {
        let text = metrics
            .get(format!("http://127.0.0.1:{http}/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let reconciles: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("dkron_ha_controller_reconciles_total "))?
            .trim()
            .parse()
            .ok()?;
        (reconciles > 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
    };
    let memory = ServeMemory {
        rss: field("VmRSS:"),
        peak: field("VmHWM:"),
    };
    assert!(
        serve.try_wait().unwrap().is_none(),
        "serve exited during the measurement"
    );
    let _ = serve.kill().await;
    memory
}

/// `serve`'s resident memory with 500 unrelated Roles, Services and PDBs in the cluster
/// (BENCHMARKS.md, "Controller memory"): one `serve` started before they exist, one after.
/// Prints the numbers; asserts only that serve ran and reconciled.
/// `cargo test --test e2e_controller -- --ignored --nocapture serve_memory`
#[tokio::test]
#[ignore = "a measurement: run it by hand"]
async fn serve_memory_with_500_unrelated_roles_services_and_pdbs() {
    const UNRELATED: usize = 500;
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    let ns = cp.namespace("ctl-memory").await;
    let unrelated_ns = cp.namespace("ctl-unrelated").await;
    headless_service(&client, &ns, "dkron", true).await;
    Api::<StatefulSet>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &injected_statefulset("dkron", 3))
        .await
        .unwrap();
    let without = measure_serve(cp, &ns, "memory-without").await;

    // Real-shaped objects as `kubectl apply` leaves them (with last-applied-configuration);
    // headless Services, as the test control plane's service IP range is small.
    let roles = Api::<Role>::namespaced(client.clone(), &unrelated_ns);
    let services = Api::<Service>::namespaced(client.clone(), &unrelated_ns);
    let pdbs = Api::<PodDisruptionBudget>::namespaced(client.clone(), &unrelated_ns);
    let with_last_applied = |mut value: serde_json::Value| {
        let text = value.to_string();
        value["metadata"]["annotations"] =
            json!({"kubectl.kubernetes.io/last-applied-configuration": text});
        value
    };
    let created = futures::stream::iter(0..UNRELATED)
        .map(|i| {
            let (roles, services, pdbs) = (roles.clone(), services.clone(), pdbs.clone());
            async move {
                let name = format!("app-{i}");
                let labels = json!({"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "shop", "team": "payments"});
                let role: Role = serde_json::from_value(with_last_applied(json!({
                    "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                    "metadata": {"name": name, "labels": labels},
                    "rules": [
                        {"apiGroups": [""], "resources": ["configmaps", "secrets"], "verbs": ["get", "list", "watch"]},
                        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "patch"]},
                    ]
                })))
                .unwrap();
                let service: Service = serde_json::from_value(with_last_applied(json!({
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": name, "labels": labels},
                    "spec": {"clusterIP": "None", "selector": {"app.kubernetes.io/name": name},
                        "ports": [{"name": "http", "port": 80, "targetPort": 8080}, {"name": "metrics", "port": 9090}]}
                })))
                .unwrap();
                let pdb: PodDisruptionBudget = serde_json::from_value(with_last_applied(json!({
                    "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                    "metadata": {"name": name, "labels": labels},
                    "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app.kubernetes.io/name": name}}}
                })))
                .unwrap();
                let pp = PostParams::default();
                roles.create(&pp, &role).await.unwrap();
                services.create(&pp, &service).await.unwrap();
                pdbs.create(&pp, &pdb).await.unwrap();
            }
        })
        .buffer_unordered(16)
        .count()
        .await;
    assert_eq!(created, UNRELATED);
    let with = measure_serve(cp, &ns, "memory-with").await;
    println!(
        "serve VmRSS/VmHWM (KiB): without unrelated objects {}/{}; with {UNRELATED} unrelated Roles, Services and PDBs each {}/{}",
        without.rss, without.peak, with.rss, with.peak
    );
}
