//! FleetLock against a real control plane (etcd + kube-apiserver + kube-controller-manager with
//! the disruption controller), so the real Eviction API enforces PodDisruptionBudgets.
//!
//! Nodes and Pods are created by the tests and bound with `spec.nodeName`; there is no kubelet,
//! so [`kubelet_removes_terminating_pods`] plays its part: an evicted pod stays terminating
//! until it runs. Requests go over a real listener exactly as Zincati sends them: POST, the
//! `fleet-lock-protocol: true` header, a pretty-printed body and no Content-Type.

mod support;

use support::{eventually, named};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dkron_ha::fleetlock::drain::CORDONED_ANNOTATION;
use dkron_ha::fleetlock::lock::{LockState, lease_name, state_from_lease};
use dkron_ha::fleetlock::protocol::ErrorBody;
use dkron_ha::fleetlock::{
    FleetLock, FleetLockConfig, StatusReport, app_specific_machine_id, router,
};
use futures::StreamExt;
use futures::future::join_all;
use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Node, NodeCondition, NodeSpec, NodeStatus, NodeSystemInfo, Pod, PodSpec,
    PodTemplateSpec,
};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, ResourceExt};
use prometheus_client::registry::Registry;
use serde_json::json;
use sha2::{Digest, Sha256};
use support::ControlPlane;

const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.10";
const GROUP: &str = "default";

/// `dkron-ha serve`'s FleetLock on a loopback port.
struct Server {
    base: String,
    http: reqwest::Client,
    task: tokio::task::JoinHandle<()>,
    /// Cancelled as `serve` does when its shutdown begins.
    stopping: tokio_util::sync::CancellationToken,
}

#[derive(Debug)]
struct Answer {
    status: u16,
    error: Option<ErrorBody>,
}

impl Answer {
    fn kind(&self) -> &str {
        self.error.as_ref().map(|e| e.kind.as_str()).unwrap_or("")
    }

    fn value(&self) -> &str {
        self.error.as_ref().map(|e| e.value.as_str()).unwrap_or("")
    }
}

impl Server {
    async fn start(
        client: Client,
        eviction_client: Option<Client>,
        namespace: &str,
        drain_wait: Duration,
    ) -> Server {
        let config = FleetLockConfig {
            namespace: namespace.to_owned(),
            drain_wait,
            ..FleetLockConfig::default()
        };
        Server::with_config(client, eviction_client, config).await
    }

    async fn with_config(
        client: Client,
        eviction_client: Option<Client>,
        config: FleetLockConfig,
    ) -> Server {
        let mut registry = Registry::default();
        let stopping = tokio_util::sync::CancellationToken::new();
        let mut fleetlock =
            FleetLock::new(client, config, &mut registry).with_shutdown(stopping.clone());
        if let Some(eviction_client) = eviction_client {
            fleetlock = fleetlock.with_eviction_client(eviction_client);
        }
        let fleetlock = Arc::new(fleetlock);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let address: SocketAddr = listener.local_addr().expect("local address");
        let app = router(fleetlock);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Server {
            base: format!("http://{address}/fleetlock/"),
            http: reqwest::Client::new(),
            task,
            stopping,
        }
    }

    /// What Zincati does: `Url::join("v1/pre-reboot")` on its base URL, the header, and
    /// `serde_json::to_string_pretty` of `{"client_params":{"id":..,"group":..}}`.
    async fn zincati(&self, endpoint: &str, id: &str, group: &str) -> Answer {
        let body = serde_json::to_string_pretty(&json!({
            "client_params": { "id": id, "group": group }
        }))
        .expect("body");
        self.post(endpoint, Some("true"), body).await
    }

    async fn pre_reboot(&self, id: &str) -> Answer {
        self.zincati("v1/pre-reboot", id, GROUP).await
    }

    async fn steady_state(&self, id: &str) -> Answer {
        self.zincati("v1/steady-state", id, GROUP).await
    }

    /// The URL Zincati asks: `Url::join` of the endpoint on the base URL.
    fn url(&self, endpoint: &str) -> reqwest::Url {
        reqwest::Url::parse(&self.base)
            .and_then(|base| base.join(endpoint))
            .expect("valid URL")
    }

    async fn post(&self, endpoint: &str, header: Option<&str>, body: String) -> Answer {
        let mut request = self.http.post(self.url(endpoint)).body(body);
        if let Some(value) = header {
            request = request.header("fleet-lock-protocol", value);
        }
        let response = request.send().await.expect("FleetLock answers");
        let status = response.status().as_u16();
        let bytes = response.bytes().await.expect("body");
        Answer {
            status,
            error: serde_json::from_slice(&bytes).ok(),
        }
    }

    async fn status(&self) -> StatusReport {
        self.http
            .get(self.url("v1/status"))
            .send()
            .await
            .expect("status answers")
            .json()
            .await
            .expect("status JSON")
    }

    /// A `serve` replica going away: its listener and everything in memory are gone.
    fn stop(self) {
        self.task.abort();
    }
}

/// A test's cluster objects: Nodes named after the test namespace, with machine ids derived
/// from it, so tests running side by side never share a Node or an id.
struct Fixture {
    client: Client,
    ns: String,
}

impl Fixture {
    async fn new(prefix: &str) -> Fixture {
        let cluster = ControlPlane::shared();
        let ns = cluster.namespace(prefix).await;
        Fixture {
            client: cluster.client().await,
            ns,
        }
    }

    fn node_name(&self, index: usize) -> String {
        format!("{}-node-{index}", self.ns)
    }

    fn machine_id(&self, index: usize) -> String {
        let digest = Sha256::digest(format!("{}/{index}", self.ns));
        digest[..16].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The id Zincati on that machine sends.
    fn zincati_id(&self, index: usize) -> String {
        app_specific_machine_id(&self.machine_id(index)).expect("valid machine id")
    }

    async fn create_node(&self, index: usize, ready: bool, unschedulable: bool) -> Node {
        let node = Node {
            metadata: ObjectMeta {
                name: Some(self.node_name(index)),
                labels: Some(BTreeMap::from([(
                    "dkron-ha-test/namespace".to_owned(),
                    self.ns.clone(),
                )])),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                unschedulable: Some(unschedulable),
                ..NodeSpec::default()
            }),
            status: Some(NodeStatus {
                conditions: Some(vec![ready_condition(ready)]),
                node_info: Some(NodeSystemInfo {
                    machine_id: self.machine_id(index),
                    system_uuid: format!("{:032x}", index + 1),
                    boot_id: "boot".into(),
                    architecture: "amd64".into(),
                    container_runtime_version: "cri-o://1.33.2".into(),
                    kernel_version: "6.15.9".into(),
                    kube_proxy_version: String::new(),
                    kubelet_version: "v1.33.3".into(),
                    operating_system: "linux".into(),
                    os_image: "Fedora CoreOS 42".into(),
                    ..NodeSystemInfo::default()
                }),
                ..NodeStatus::default()
            }),
        };
        let nodes: Api<Node> = Api::all(self.client.clone());
        let created = nodes
            .create(&PostParams::default(), &node)
            .await
            .expect("create Node");
        // Status on create is kept for Nodes, but set it again in case a version drops it.
        nodes
            .patch_status(
                &self.node_name(index),
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": node.status })),
            )
            .await
            .expect("Node status");
        created
    }

    async fn set_node_ready(&self, index: usize, ready: bool) {
        Api::<Node>::all(self.client.clone())
            .patch_status(
                &self.node_name(index),
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": { "conditions": [ready_condition(ready)] } })),
            )
            .await
            .expect("patch Node status");
    }

    async fn node(&self, index: usize) -> Node {
        Api::<Node>::all(self.client.clone())
            .get(&self.node_name(index))
            .await
            .expect("get Node")
    }

    async fn delete_node(&self, index: usize) {
        Api::<Node>::all(self.client.clone())
            .delete(&self.node_name(index), &DeleteParams::default())
            .await
            .expect("delete Node");
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// A pod bound to node `index`, already Running and Ready as a kubelet would report it.
    async fn create_running_pod(
        &self,
        name: &str,
        node: usize,
        labels: &[(&str, &str)],
        owner: Option<OwnerReference>,
        annotations: &[(&str, &str)],
    ) {
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                labels: Some(to_map(labels)),
                annotations: Some(to_map(annotations)),
                owner_references: owner.map(|o| vec![o]),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some(self.node_name(node)),
                containers: vec![Container {
                    name: "app".into(),
                    image: Some(PAUSE_IMAGE.into()),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            ..Pod::default()
        };
        self.pods()
            .create(&PostParams::default(), &pod)
            .await
            .unwrap_or_else(|e| panic!("create Pod {name}: {e}"));
        self.set_pod_phase(name, "Running").await;
    }

    async fn set_pod_phase(&self, name: &str, phase: &str) {
        let ready = if phase == "Running" { "True" } else { "False" };
        self.pods()
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": {
                    "phase": phase,
                    "conditions": [{ "type": "Ready", "status": ready }],
                } })),
            )
            .await
            .unwrap_or_else(|e| panic!("Pod {name} status: {e}"));
    }

    async fn pod_exists(&self, name: &str) -> bool {
        self.pods().get_opt(name).await.expect("get Pod").is_some()
    }

    /// What the kubelet does with an evicted pod: stop it, then remove it for good.
    async fn kubelet_removes_terminating_pods(&self, node: usize) -> usize {
        let on_node =
            ListParams::default().fields(&format!("spec.nodeName={}", self.node_name(node)));
        let pods: Api<Pod> = Api::all(self.client.clone());
        let mut removed = 0;
        for pod in pods.list(&on_node).await.expect("list pods").items {
            if pod.metadata.deletion_timestamp.is_none() {
                continue;
            }
            let api: Api<Pod> =
                Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
            let now = DeleteParams {
                grace_period_seconds: Some(0),
                ..DeleteParams::default()
            };
            match api.delete(&pod.name_any(), &now).await {
                Ok(_) => removed += 1,
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(error) => panic!("force-delete {}: {error}", pod.name_any()),
            }
        }
        removed
    }

    /// A PodDisruptionBudget over `app=<app>` once the disruption controller has counted it.
    async fn create_budget(&self, app: &str, min_available: i32, expect_allowed: i32) {
        let budget = PodDisruptionBudget {
            metadata: named(app),
            spec: Some(PodDisruptionBudgetSpec {
                min_available: Some(IntOrString::Int(min_available)),
                selector: Some(LabelSelector {
                    match_labels: Some(to_map(&[("app", app)])),
                    ..LabelSelector::default()
                }),
                ..PodDisruptionBudgetSpec::default()
            }),
            ..PodDisruptionBudget::default()
        };
        self.budgets()
            .create(&PostParams::default(), &budget)
            .await
            .expect("create PodDisruptionBudget");
        self.budget_allows(app, expect_allowed).await;
    }

    async fn relax_budget(&self, app: &str) {
        self.budgets()
            .patch(
                app,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": { "minAvailable": 0 } })),
            )
            .await
            .expect("relax PodDisruptionBudget");
        self.budget_allows(app, 1).await;
    }

    async fn budget_allows(&self, app: &str, allowed: i32) {
        let budgets = self.budgets();
        eventually(
            &format!("PodDisruptionBudget {app} allows {allowed} disruption(s)"),
            async || {
                let budget = budgets.get(app).await.ok()?;
                let status = budget.status?;
                let observed = status.observed_generation == budget.metadata.generation;
                (observed && status.disruptions_allowed == Some(allowed)).then_some(())
            },
        )
        .await;
    }

    fn budgets(&self) -> Api<PodDisruptionBudget> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn holders(&self, group: &str) -> Vec<String> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), &self.ns);
        match leases.get_opt(&lease_name(group)).await.expect("get Lease") {
            Some(lease) => state_from_lease(&lease)
                .expect("readable Lease")
                .node_names(),
            None => Vec::new(),
        }
    }

    /// FleetLock with the admin client as `serve` would get it: kube's default retries on.
    async fn server(&self, drain_wait: Duration) -> Server {
        Server::start(self.client.clone(), None, &self.ns, drain_wait).await
    }

    /// FleetLock whose evictions go through a client without kube's default retries, so a
    /// PodDisruptionBudget's 429 comes back at once.
    async fn server_with_exact_evictions(&self, drain_wait: Duration) -> Server {
        let kubeconfig =
            Kubeconfig::read_from(&ControlPlane::shared().kubeconfig).expect("admin kubeconfig");
        let mut config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .expect("admin config");
        config.default_retry = false;
        let evictions = Client::try_from(config).expect("eviction client");
        Server::start(self.client.clone(), Some(evictions), &self.ns, drain_wait).await
    }

    async fn set_slots(&self, group: &str, slots: &str) {
        let config_maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.ns);
        let config_map = ConfigMap {
            metadata: named("dkron-ha-fleetlock"),
            data: Some(to_map(&[(group, slots)])),
            ..ConfigMap::default()
        };
        config_maps
            .patch(
                "dkron-ha-fleetlock",
                &PatchParams::apply("e2e-fleetlock").force(),
                &Patch::Apply(&config_map),
            )
            .await
            .expect("apply slots ConfigMap");
    }
}

fn ready_condition(ready: bool) -> NodeCondition {
    NodeCondition {
        type_: "Ready".into(),
        status: if ready { "True" } else { "False" }.into(),
        reason: Some(
            if ready {
                "KubeletReady"
            } else {
                "KubeletNotReady"
            }
            .into(),
        ),
        ..NodeCondition::default()
    }
}

fn cordoned(node: &Node) -> (bool, Option<&str>) {
    let unschedulable = node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false);
    let mark = node
        .annotations()
        .get(CORDONED_ANNOTATION)
        .map(String::as_str);
    (unschedulable, mark)
}

fn to_map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[tokio::test]
async fn lock_and_unlock_are_idempotent() {
    let fx = Fixture::new("fl-idem").await;
    fx.create_node(0, true, false).await;
    fx.create_running_pod("web", 0, &[("app", "web")], None, &[])
        .await;
    let server = fx.server(Duration::ZERO).await;
    let id = fx.zincati_id(0);

    // The first request cordons and evicts; the evicted pod terminates until the kubelet ends it.
    let first = server.pre_reboot(&id).await;
    assert_eq!(
        (first.status, first.kind()),
        (409, "drain_in_progress"),
        "{first:?}"
    );
    assert!(
        first.value().contains("web (terminating)"),
        "{}",
        first.value()
    );
    assert_eq!(fx.kubelet_removes_terminating_pods(0).await, 1);
    for _ in 0..2 {
        let again = server.pre_reboot(&id).await;
        assert_eq!(again.status, 200, "{again:?}");
    }
    assert_eq!(fx.holders(GROUP).await, [fx.node_name(0)]);
    assert_eq!(cordoned(&fx.node(0).await), (true, Some("true")));
    assert!(!fx.pod_exists("web").await);

    for _ in 0..2 {
        let unlock = server.steady_state(&id).await;
        assert_eq!(unlock.status, 200, "{unlock:?}");
    }
    assert!(fx.holders(GROUP).await.is_empty());
    assert_eq!(cordoned(&fx.node(0).await), (false, None));

    // The Node's story is told in Events (cluster-scoped objects get them in `default`).
    let events: Api<Event> = Api::namespaced(fx.client.clone(), "default");
    let node_name = fx.node_name(0);
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await
        .expect("list Events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(&node_name))
        .filter_map(|e| e.reason)
        .collect();
    for reason in [
        "RebootSlotAcquired",
        "Cordoned",
        "Evicted",
        "Drained",
        "Uncordoned",
        "RebootSlotReleased",
    ] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "no {reason} Event in {reasons:?}"
        );
    }
    server.stop();
}

#[tokio::test]
async fn one_slot_and_fifty_concurrent_requests_give_exactly_one_holder() {
    let fx = Fixture::new("fl-race").await;
    const NODES: usize = 50;
    join_all((0..NODES).map(|i| fx.create_node(i, true, false))).await;
    let server = fx.server(Duration::ZERO).await;
    let ids: Vec<String> = (0..NODES).map(|i| fx.zincati_id(i)).collect();

    let answers = join_all(ids.iter().map(|id| server.pre_reboot(id))).await;

    let granted: Vec<usize> = (0..NODES).filter(|&i| answers[i].status == 200).collect();
    assert_eq!(granted.len(), 1, "granted to {granted:?}");
    for (i, answer) in answers.iter().enumerate() {
        if answer.status != 200 {
            assert_eq!(
                (answer.status, answer.kind()),
                (409, "failed_lock_semaphore_full"),
                "node {i}: {answer:?}"
            );
        }
    }
    assert_eq!(fx.holders(GROUP).await, [fx.node_name(granted[0])]);
    server.stop();
}

#[tokio::test]
async fn a_pdb_blocked_pod_keeps_the_answer_non_200_until_the_pdb_allows_it() {
    let fx = Fixture::new("fl-pdb").await;
    fx.create_node(0, true, false).await;
    fx.create_running_pod("guarded", 0, &[("app", "guarded")], None, &[])
        .await;
    fx.create_budget("guarded", 1, 0).await;
    let server = fx.server_with_exact_evictions(Duration::from_secs(2)).await;
    let id = fx.zincati_id(0);

    for _ in 0..2 {
        let started = Instant::now();
        let blocked = server.pre_reboot(&id).await;
        assert_eq!(
            (blocked.status, blocked.kind()),
            (409, "drain_in_progress"),
            "{blocked:?}"
        );
        assert!(
            blocked
                .value()
                .contains("guarded (eviction blocked by a PodDisruptionBudget)"),
            "{}",
            blocked.value()
        );
        // The drain waits --fleetlock-drain-wait (2s here), not for retries of the 429.
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }
    assert!(fx.pod_exists("guarded").await);
    let status = server.status().await;
    let group = status
        .groups
        .iter()
        .find(|g| g.group == GROUP)
        .expect("group in status");
    assert_eq!(group.holders.len(), 1);
    assert!(!group.holders[0].drained);
    assert!(group.holders[0].cordoned_by_fleetlock);
    assert_eq!(
        group.holders[0].remaining_pods,
        [format!("{}/guarded", fx.ns)]
    );

    fx.relax_budget("guarded").await;
    let evicted = server.pre_reboot(&id).await;
    assert_eq!(
        (evicted.status, evicted.kind()),
        (409, "drain_in_progress"),
        "{evicted:?}"
    );
    assert!(
        evicted.value().contains("guarded (terminating)"),
        "{}",
        evicted.value()
    );
    fx.kubelet_removes_terminating_pods(0).await;
    let drained = server.pre_reboot(&id).await;
    assert_eq!(drained.status, 200, "{drained:?}");
    server.stop();
}

/// Dkron servers as the StatefulSet controller creates them (no scheduler takes them: the
/// test binds each to its Node), with the status a kubelet and dkron-ha's controller would
/// write: Ready, and the `dkron-ha/raft-voter` condition.
async fn dkron_servers(fx: &Fixture, name: &str, nodes: &[usize]) {
    let statefulset = json!({
        "metadata": { "name": name },
        "spec": {
            "replicas": nodes.len(),
            "serviceName": name,
            "podManagementPolicy": "Parallel",
            "updateStrategy": { "type": "OnDelete" },
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name },
                              "annotations": { "dkron-ha/injected": "test" } },
                "spec": {
                    "schedulerName": "dkron-ha-test-nobody",
                    "readinessGates": [{ "conditionType": "dkron-ha/raft-voter" }],
                    "containers": [{ "name": "dkron", "image": PAUSE_IMAGE }],
                },
            },
        },
    });
    Api::<k8s_openapi::api::apps::v1::StatefulSet>::namespaced(fx.client.clone(), &fx.ns)
        .create(
            &PostParams::default(),
            &serde_json::from_value(statefulset).unwrap(),
        )
        .await
        .expect("create StatefulSet");
    for (ordinal, node) in nodes.iter().enumerate() {
        let pod = format!("{name}-{ordinal}");
        eventually(
            &format!("the StatefulSet controller creates {pod}"),
            async || fx.pods().get_opt(&pod).await.ok().flatten().map(|_| ()),
        )
        .await;
        let binding = json!({
            "apiVersion": "v1", "kind": "Binding",
            "metadata": { "name": pod },
            "target": { "apiVersion": "v1", "kind": "Node", "name": fx.node_name(*node) },
        });
        fx.pods()
            .create_subresource::<_, serde_json::Value>(
                "binding",
                &pod,
                &PostParams::default(),
                &binding,
            )
            .await
            .unwrap_or_else(|e| panic!("bind {pod}: {e}"));
        set_server_status(fx, &pod, true).await;
    }
}

/// A kubelet's Ready and the controller's `dkron-ha/raft-voter`, both `voter`.
async fn set_server_status(fx: &Fixture, pod: &str, voter: bool) {
    let status = if voter { "True" } else { "False" };
    fx.pods()
        .patch_status(
            pod,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": {
                "phase": "Running",
                "conditions": [{ "type": "Ready", "status": status },
                               { "type": "dkron-ha/raft-voter", "status": status }],
            } })),
        )
        .await
        .unwrap_or_else(|e| panic!("Pod {pod} status: {e}"));
}

/// No PodDisruptionBudget here: FleetLock's own check is what holds the server.
#[tokio::test]
async fn a_drain_that_would_cost_a_dkron_cluster_its_majority_waits_with_its_own_kind() {
    let fx = Fixture::new("fl-quorum").await;
    for node in 0..3 {
        fx.create_node(node, true, false).await;
    }
    dkron_servers(&fx, "dkron", &[0, 1, 2]).await;
    fx.create_running_pod("web", 0, &[("app", "web")], None, &[])
        .await;
    // dkron-1 is back from its Node's reboot but not yet a raft voter.
    set_server_status(&fx, "dkron-1", false).await;
    let server = fx.server(Duration::from_secs(2)).await;
    let id = fx.zincati_id(0);

    for _ in 0..2 {
        let held = server.pre_reboot(&id).await;
        assert_eq!(
            (held.status, held.kind()),
            (409, "dkron_quorum_at_risk"),
            "{held:?}"
        );
        let want = format!(
            "Dkron cluster {}/dkron has 2 of 3 servers Ready as raft voters (dkron-0, dkron-2); \
             evicting dkron-0 would leave 1, fewer than its majority of 2",
            fx.ns
        );
        assert!(held.value().contains(&want), "{}", held.value());
    }
    // The server stays; the Node's other pods are evicted meanwhile.
    let dkron_0 = fx.pods().get("dkron-0").await.expect("dkron-0");
    assert!(dkron_0.metadata.deletion_timestamp.is_none());
    assert!(
        fx.pods()
            .get("web")
            .await
            .expect("web")
            .metadata
            .deletion_timestamp
            .is_some()
    );

    // Once dkron-1 is a Ready voter again, the drain goes on and finishes.
    set_server_status(&fx, "dkron-1", true).await;
    let evicted = server.pre_reboot(&id).await;
    assert_eq!(
        (evicted.status, evicted.kind()),
        (409, "drain_in_progress"),
        "{evicted:?}"
    );
    assert!(
        evicted.value().contains("dkron-0 (terminating)"),
        "{}",
        evicted.value()
    );
    fx.kubelet_removes_terminating_pods(0).await;
    let drained = server.pre_reboot(&id).await;
    assert_eq!(drained.status, 200, "{drained:?}");
    server.stop();
}

#[tokio::test]
async fn daemonset_mirror_and_finished_pods_stay() {
    let fx = Fixture::new("fl-stay").await;
    fx.create_node(0, true, false).await;
    let daemon_set = DaemonSet {
        metadata: named("agent"),
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(to_map(&[("app", "agent")])),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(to_map(&[("app", "agent")])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "agent".into(),
                        image: Some(PAUSE_IMAGE.into()),
                        ..Container::default()
                    }],
                    ..PodSpec::default()
                }),
            },
            ..DaemonSetSpec::default()
        }),
        ..DaemonSet::default()
    };
    let daemon_set = Api::<DaemonSet>::namespaced(fx.client.clone(), &fx.ns)
        .create(&PostParams::default(), &daemon_set)
        .await
        .expect("create DaemonSet");
    let owner = OwnerReference {
        api_version: "apps/v1".into(),
        kind: "DaemonSet".into(),
        name: "agent".into(),
        uid: daemon_set.metadata.uid.clone().expect("uid"),
        controller: Some(true),
        block_owner_deletion: Some(true),
    };
    fx.create_running_pod("agent-x7k2p", 0, &[("app", "agent")], Some(owner), &[])
        .await;
    fx.create_running_pod(
        "static-web",
        0,
        &[("app", "static")],
        None,
        &[(
            "kubernetes.io/config.mirror",
            "0f1e2d3c4b5a69788796a5b4c3d2e1f0",
        )],
    )
    .await;
    fx.create_running_pod("job-done", 0, &[("app", "job")], None, &[])
        .await;
    fx.set_pod_phase("job-done", "Succeeded").await;
    fx.create_running_pod("web", 0, &[("app", "web")], None, &[])
        .await;
    let server = fx.server(Duration::ZERO).await;
    let id = fx.zincati_id(0);

    let first = server.pre_reboot(&id).await;
    assert_eq!(first.kind(), "drain_in_progress", "{first:?}");
    // Only `web` has to leave: the DaemonSet, mirror and finished pods are not waited for.
    let only_web = format!("1 pod remains: {}/web (terminating)", fx.ns);
    assert!(first.value().ends_with(&only_web), "{}", first.value());
    fx.kubelet_removes_terminating_pods(0).await;
    let drained = server.pre_reboot(&id).await;
    assert_eq!(drained.status, 200, "{drained:?}");

    for stays in ["agent-x7k2p", "static-web", "job-done"] {
        assert!(fx.pod_exists(stays).await, "{stays} was evicted");
    }
    assert!(!fx.pod_exists("web").await);
    server.stop();
}

#[tokio::test]
async fn a_node_cordoned_beforehand_stays_cordoned_after_steady_state() {
    let fx = Fixture::new("fl-admin").await;
    fx.create_node(0, true, true).await;
    let server = fx.server(Duration::ZERO).await;
    let id = fx.zincati_id(0);

    assert_eq!(server.pre_reboot(&id).await.status, 200);
    assert_eq!(cordoned(&fx.node(0).await), (true, None));
    assert_eq!(server.steady_state(&id).await.status, 200);
    assert_eq!(cordoned(&fx.node(0).await), (true, None));
    assert!(fx.holders(GROUP).await.is_empty());
    server.stop();
}

#[tokio::test]
async fn a_serve_restart_in_the_middle_of_a_drain_resumes_it() {
    let fx = Fixture::new("fl-restart").await;
    fx.create_node(0, true, false).await;
    fx.create_node(1, true, false).await;
    fx.create_running_pod("free", 0, &[("app", "free")], None, &[])
        .await;
    fx.create_running_pod("guarded", 0, &[("app", "guarded")], None, &[])
        .await;
    fx.create_budget("guarded", 1, 0).await;
    let id = fx.zincati_id(0);

    let before = fx.server(Duration::ZERO).await;
    let blocked = before.pre_reboot(&id).await;
    assert_eq!(blocked.kind(), "drain_in_progress", "{blocked:?}");
    assert!(
        blocked.value().contains("free (terminating)"),
        "{}",
        blocked.value()
    );
    before.stop();

    // While no replica runs: the kubelet finishes the evicted pod, the budget is relaxed.
    fx.kubelet_removes_terminating_pods(0).await;
    fx.relax_budget("guarded").await;

    let after = fx.server(Duration::ZERO).await;
    let other = after.pre_reboot(&fx.zincati_id(1)).await;
    assert_eq!(
        other.kind(),
        "failed_lock_semaphore_full",
        "the slot survived the restart: {other:?}"
    );
    let resumed = after.pre_reboot(&id).await;
    assert_eq!(resumed.kind(), "drain_in_progress", "{resumed:?}");
    assert!(
        resumed.value().contains("guarded (terminating)"),
        "{}",
        resumed.value()
    );
    fx.kubelet_removes_terminating_pods(0).await;
    assert_eq!(after.pre_reboot(&id).await.status, 200);
    // The new replica knows the cordon was FleetLock's and undoes it.
    assert_eq!(cordoned(&fx.node(0).await), (true, Some("true")));
    assert_eq!(after.steady_state(&id).await.status, 200);
    assert_eq!(cordoned(&fx.node(0).await), (false, None));
    after.stop();
}

/// A replica that begins to shut down answers the pre-reboot it is serving at its next step,
/// not after its drain wait: its own pod may be among those the drain waits for.
#[tokio::test]
async fn a_replica_shutting_down_answers_its_waiting_pre_reboot_at_once() {
    let fx = Fixture::new("fl-stopping").await;
    fx.create_node(0, true, false).await;
    fx.create_running_pod("guarded", 0, &[("app", "guarded")], None, &[])
        .await;
    fx.create_budget("guarded", 1, 0).await;
    let server = fx
        .server_with_exact_evictions(Duration::from_secs(600))
        .await;
    let id = fx.zincati_id(0);
    let waiting = server.pre_reboot(&id);
    let stop = async {
        // The request is in its drain (the node cordoned) when the shutdown begins.
        eventually("the drain has begun", async || {
            (cordoned(&fx.node(0).await) == (true, Some("true"))).then_some(())
        })
        .await;
        server.stopping.cancel();
    };
    // Bounded only so a hang fails: the drain wait alone is 600 s.
    let (answer, ()) = tokio::time::timeout(Duration::from_secs(120), async {
        tokio::join!(waiting, stop)
    })
    .await
    .expect("the waiting pre-reboot answered once the replica began to stop");
    assert_eq!(
        (answer.status, answer.kind()),
        (409, "drain_in_progress"),
        "{answer:?}"
    );
    assert!(
        answer
            .value()
            .contains("guarded (eviction blocked by a PodDisruptionBudget)"),
        "{}",
        answer.value()
    );
    server.stop();
}

#[tokio::test]
async fn bad_headers_and_bodies_get_400_with_a_kind() {
    let fx = Fixture::new("fl-bad").await;
    let server = fx.server(Duration::ZERO).await;
    let body = r#"{"client_params":{"id":"abc","group":"default"}}"#.to_owned();

    let no_header = server.post("v1/pre-reboot", None, body.clone()).await;
    assert_eq!(
        (no_header.status, no_header.kind()),
        (400, "missing_fleet_lock_header")
    );
    let false_header = server.post("v1/steady-state", Some("false"), body).await;
    assert_eq!(
        (false_header.status, false_header.kind()),
        (400, "missing_fleet_lock_header")
    );
    let not_json = server.post("v1/pre-reboot", Some("true"), "{".into()).await;
    assert_eq!((not_json.status, not_json.kind()), (400, "invalid_body"));
    let no_group = server
        .post(
            "v1/pre-reboot",
            Some("true"),
            r#"{"client_params":{"id":"abc"}}"#.into(),
        )
        .await;
    assert_eq!((no_group.status, no_group.kind()), (400, "invalid_body"));
    let bad_group = server.zincati("v1/pre-reboot", "abc", "no/slash").await;
    assert_eq!((bad_group.status, bad_group.kind()), (400, "invalid_group"));
    let huge = server
        .post("v1/pre-reboot", Some("true"), " ".repeat(64 * 1024))
        .await;
    assert_eq!((huge.status, huge.kind()), (413, "body_too_large"));
    server.stop();
}

#[tokio::test]
async fn an_unknown_machine_id_gets_its_kind() {
    let fx = Fixture::new("fl-unknown").await;
    let server = fx.server(Duration::ZERO).await;
    let stranger = app_specific_machine_id("00112233445566778899aabbccddeeff").expect("valid");
    for answer in [
        server.pre_reboot(&stranger).await,
        server.steady_state(&stranger).await,
    ] {
        assert_eq!(
            (answer.status, answer.kind()),
            (404, "unknown_machine_id"),
            "{answer:?}"
        );
    }
    server.stop();
}

#[tokio::test]
async fn steady_state_waits_until_the_node_is_ready() {
    let fx = Fixture::new("fl-ready").await;
    fx.create_node(0, true, false).await;
    let server = fx.server(Duration::ZERO).await;
    let id = fx.zincati_id(0);
    assert_eq!(server.pre_reboot(&id).await.status, 200);

    fx.set_node_ready(0, false).await;
    let early = server.steady_state(&id).await;
    assert_eq!(
        (early.status, early.kind()),
        (409, "node_not_ready"),
        "{early:?}"
    );
    assert_eq!(fx.holders(GROUP).await, [fx.node_name(0)]);

    fx.set_node_ready(0, true).await;
    assert_eq!(server.steady_state(&id).await.status, 200);
    assert!(fx.holders(GROUP).await.is_empty());
    server.stop();
}

#[tokio::test]
async fn a_slot_held_by_a_deleted_node_is_reclaimed() {
    let fx = Fixture::new("fl-gone").await;
    fx.create_node(0, true, false).await;
    fx.create_node(1, true, false).await;
    let server = fx.server(Duration::ZERO).await;
    assert_eq!(server.pre_reboot(&fx.zincati_id(0)).await.status, 200);
    assert_eq!(
        server.pre_reboot(&fx.zincati_id(1)).await.kind(),
        "failed_lock_semaphore_full"
    );

    fx.delete_node(0).await;
    // Once the Node watch has seen the deletion (until then the slot stays held).
    eventually("the deleted holder's slot is reclaimed", async || {
        (server.pre_reboot(&fx.zincati_id(1)).await.status == 200).then_some(())
    })
    .await;
    assert_eq!(fx.holders(GROUP).await, [fx.node_name(1)]);
    server.stop();
}

#[tokio::test]
async fn slots_per_group_follow_the_config_map_live() {
    let fx = Fixture::new("fl-slots").await;
    for i in 0..3 {
        fx.create_node(i, true, false).await;
    }
    fx.set_slots("workers", "2").await;
    let server = fx.server(Duration::ZERO).await;
    let ids: Vec<String> = (0..3).map(|i| fx.zincati_id(i)).collect();
    let lock = |i: usize| server.zincati("v1/pre-reboot", &ids[i], "Workers");

    assert_eq!(lock(0).await.status, 200);
    assert_eq!(lock(1).await.status, 200);
    let third = lock(2).await;
    assert_eq!(third.kind(), "failed_lock_semaphore_full", "{third:?}");
    assert!(
        third
            .value()
            .contains("all 2 reboot slot(s) of group workers"),
        "{}",
        third.value()
    );

    // The ConfigMap is watched: an edit applies once its watch event is in.
    fx.set_slots("workers", "3").await;
    eventually("the third slot is granted", async || {
        (lock(2).await.status == 200).then_some(())
    })
    .await;
    fx.set_slots("workers", "lots").await;
    eventually("the bad value is refused", async || {
        (lock(2).await.kind() == "invalid_configuration").then_some(())
    })
    .await;
    server.stop();
}

/// Not a pass/fail bound: prints how long refusals and a 100-pod drain take here.
#[tokio::test]
async fn measures_refusal_latency_and_a_100_pod_drain() {
    let fx = Fixture::new("fl-bench").await;
    fx.create_node(0, true, false).await;
    fx.create_node(1, true, false).await;
    let server = fx.server(Duration::from_secs(120)).await;
    for i in 0..100 {
        fx.create_running_pod(&format!("pod-{i:03}"), 0, &[("app", "bulk")], None, &[])
            .await;
    }

    // A kubelet stand-in that ends evicted pods as they come.
    let kubelet = {
        let fx = Fixture {
            client: fx.client.clone(),
            ns: fx.ns.clone(),
        };
        tokio::spawn(async move {
            loop {
                fx.kubelet_removes_terminating_pods(0).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let started = Instant::now();
    let drained = server.pre_reboot(&fx.zincati_id(0)).await;
    let drain_time = started.elapsed();
    kubelet.abort();
    assert_eq!(drained.status, 200, "{drained:?}");
    assert_eq!(
        fx.pods()
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len(),
        0
    );

    let mut refusals = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let refused = server.pre_reboot(&fx.zincati_id(1)).await;
        refusals.push(started.elapsed());
        assert_eq!(refused.kind(), "failed_lock_semaphore_full");
    }
    refusals.sort();
    eprintln!(
        "fleetlock: drained 100 pods (no PDBs) in {:.2}s; refusal while held elsewhere: median {:.1} ms, max {:.1} ms",
        drain_time.as_secs_f64(),
        refusals[refusals.len() / 2].as_secs_f64() * 1000.0,
        refusals[refusals.len() - 1].as_secs_f64() * 1000.0,
    );
    server.stop();
}

#[tokio::test]
async fn with_kubes_retrying_client_a_pdb_refusal_still_answers_in_time() {
    let fx = Fixture::new("fl-retry").await;
    fx.create_node(0, true, false).await;
    fx.create_running_pod("guarded", 0, &[("app", "guarded")], None, &[])
        .await;
    fx.create_budget("guarded", 1, 0).await;
    let server = fx.server(Duration::ZERO).await;

    let started = Instant::now();
    let blocked = server.pre_reboot(&fx.zincati_id(0)).await;
    let took = started.elapsed();
    assert_eq!(blocked.kind(), "drain_in_progress", "{blocked:?}");
    assert!(
        blocked
            .value()
            .contains("guarded (eviction not accepted within 5s"),
        "{}",
        blocked.value()
    );
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert!(fx.pod_exists("guarded").await);
    server.stop();
}

/// The permissions the Helm chart grants (see the `fleetlock` module docs) are enough for a
/// whole reboot: lock, cordon, evict, Events, uncordon, release.
#[tokio::test]
async fn the_documented_rbac_is_enough_for_a_whole_reboot() {
    use k8s_openapi::api::rbac::v1::{
        ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
    };
    let fx = Fixture::new("fl-rbac").await;
    let cluster = ControlPlane::shared();
    let rule = |groups: &[&str], resources: &[&str], verbs: &[&str]| PolicyRule {
        api_groups: Some(groups.iter().map(|g| (*g).to_owned()).collect()),
        resources: Some(resources.iter().map(|r| (*r).to_owned()).collect()),
        verbs: verbs.iter().map(|v| (*v).to_owned()).collect(),
        ..PolicyRule::default()
    };
    let subject = Subject {
        kind: "ServiceAccount".into(),
        name: "fleetlock".into(),
        namespace: Some(fx.ns.clone()),
        ..Subject::default()
    };
    let role_ref = |kind: &str, name: &str| RoleRef {
        api_group: Some("rbac.authorization.k8s.io".into()),
        kind: kind.into(),
        name: name.into(),
    };
    let cluster_wide = format!("{}-fleetlock", fx.ns);
    Api::<ClusterRole>::all(fx.client.clone())
        .create(
            &PostParams::default(),
            &ClusterRole {
                metadata: named(&cluster_wide),
                rules: Some(vec![
                    rule(&[""], &["nodes"], &["get", "list", "watch", "patch"]),
                    rule(&[""], &["pods"], &["list"]),
                    rule(&[""], &["pods/eviction"], &["create"]),
                    rule(&["apps"], &["statefulsets"], &["get"]),
                ]),
                ..ClusterRole::default()
            },
        )
        .await
        .expect("ClusterRole");
    Api::<ClusterRoleBinding>::all(fx.client.clone())
        .create(
            &PostParams::default(),
            &ClusterRoleBinding {
                metadata: named(&cluster_wide),
                role_ref: role_ref("ClusterRole", &cluster_wide),
                subjects: Some(vec![subject.clone()]),
            },
        )
        .await
        .expect("ClusterRoleBinding");
    for (namespace, rules) in [
        (
            fx.ns.clone(),
            vec![
                rule(
                    &["coordination.k8s.io"],
                    &["leases"],
                    &["get", "list", "watch", "create", "update"],
                ),
                rule(&[""], &["configmaps"], &["get", "list", "watch"]),
            ],
        ),
        (
            "default".to_owned(),
            vec![rule(&["events.k8s.io"], &["events"], &["create", "patch"])],
        ),
    ] {
        Api::<Role>::namespaced(fx.client.clone(), &namespace)
            .create(
                &PostParams::default(),
                &Role {
                    metadata: named(&cluster_wide),
                    rules: Some(rules),
                },
            )
            .await
            .expect("Role");
        Api::<RoleBinding>::namespaced(fx.client.clone(), &namespace)
            .create(
                &PostParams::default(),
                &RoleBinding {
                    metadata: named(&cluster_wide),
                    role_ref: role_ref("Role", &cluster_wide),
                    subjects: Some(vec![subject.clone()]),
                },
            )
            .await
            .expect("RoleBinding");
    }
    let account = cluster.service_account_client(&fx.ns, "fleetlock").await;
    let account_nodes: Api<Node> = Api::all(account.clone());
    eventually("the ServiceAccount's bindings are in force", async || {
        account_nodes
            .list(&ListParams::default().limit(1))
            .await
            .ok()
    })
    .await;

    fx.create_node(0, true, false).await;
    fx.create_running_pod("web", 0, &[("app", "web")], None, &[])
        .await;
    let server = Server::start(account, None, &fx.ns, Duration::ZERO).await;
    let id = fx.zincati_id(0);
    let first = server.pre_reboot(&id).await;
    assert_eq!(first.kind(), "drain_in_progress", "{first:?}");
    fx.kubelet_removes_terminating_pods(0).await;
    assert_eq!(server.pre_reboot(&id).await.status, 200);
    assert_eq!(server.steady_state(&id).await.status, 200);
    assert_eq!(cordoned(&fx.node(0).await), (false, None));
    let status = server.status().await;
    assert!(
        status.groups.iter().all(|g| g.holders.is_empty()),
        "{status:?}"
    );

    // Nothing was refused on the way, Events included.
    let events: Api<Event> = Api::namespaced(fx.client.clone(), "default");
    let node_name = fx.node_name(0);
    let drained = events
        .list(&ListParams::default())
        .await
        .expect("list Events")
        .items
        .into_iter()
        .any(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(node_name.as_str())
                && e.reason.as_deref() == Some("Drained")
        });
    assert!(
        drained,
        "no Drained Event published with the chart's permissions"
    );
    server.stop();
}

impl Fixture {
    /// Nodes `0..count` (Ready, with machine ids), created a few at a time.
    async fn create_nodes(&self, range: std::ops::Range<usize>) {
        let created = futures::stream::iter(range.clone())
            .map(|i| self.create_node(i, true, false))
            .buffer_unordered(16)
            .count()
            .await;
        assert_eq!(created, range.len());
    }

    fn leases(&self) -> Api<Lease> {
        Api::namespaced(self.client.clone(), &self.ns)
    }
}

/// Every version of group `GROUP`'s Lease, in the order the API wrote them (a watch from
/// the start), until [`LeaseHistory::finish`].
struct LeaseHistory {
    versions: Arc<std::sync::Mutex<Vec<(String, LockState)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseHistory {
    async fn record(leases: Api<Lease>) -> LeaseHistory {
        let versions = Arc::new(std::sync::Mutex::new(Vec::new()));
        let params = WatchParams::default()
            .fields(&format!("metadata.name={}", lease_name(GROUP)))
            .timeout(290);
        let mut stream = leases
            .watch(&params, "0")
            .await
            .expect("watch the Lease")
            .boxed();
        let seen = versions.clone();
        let task = tokio::spawn(async move {
            while let Some(event) = stream.next().await {
                if let Ok(WatchEvent::Added(lease) | WatchEvent::Modified(lease)) = event {
                    let state = state_from_lease(&lease).expect("readable Lease");
                    let version = lease.resource_version().unwrap_or_default();
                    seen.lock().expect("lock").push((version, state));
                }
            }
        });
        LeaseHistory { versions, task }
    }

    /// Waits until the watch has delivered the Lease as it is now, then stops it.
    async fn finish(self, leases: &Api<Lease>) -> Vec<LockState> {
        let now = leases
            .get(&lease_name(GROUP))
            .await
            .expect("get Lease")
            .resource_version()
            .unwrap_or_default();
        let versions = self.versions.clone();
        eventually("the watch has seen the Lease's last version", async || {
            let versions = versions.lock().expect("lock");
            versions.iter().any(|(v, _)| *v == now).then_some(())
        })
        .await;
        self.task.abort();
        let versions = self.versions.lock().expect("lock");
        versions.iter().map(|(_, state)| state.clone()).collect()
    }
}

/// Asks for a reboot like Zincati until granted (retrying after a pause that differs per node
/// and per attempt), reboots, and reports steady-state until it succeeds. Fails after 5
/// minutes of refusals: 50 nodes two at a time take seconds.
async fn zincati_reboots_once(servers: &[Server], id: &str, seed: usize) -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    let mut refused = 0;
    for attempt in 0.. {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id}: still refused after {refused} attempts in 5 minutes"
        );
        let server = &servers[(seed + attempt) % servers.len()];
        let answer = server.pre_reboot(id).await;
        if answer.status == 200 {
            break;
        }
        assert_eq!(answer.kind(), "failed_lock_semaphore_full", "{answer:?}");
        refused += 1;
        let pause = 10 + (seed * 37 + attempt * 53) % 90;
        tokio::time::sleep(Duration::from_millis(pause as u64)).await;
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    let unlock = servers[seed % servers.len()].steady_state(id).await;
    assert_eq!(unlock.status, 200, "{unlock:?}");
    refused
}

#[tokio::test]
async fn fifty_of_a_thousand_nodes_reboot_two_at_a_time_in_the_order_they_first_asked() {
    const NODES: usize = 1000;
    const ASKING: usize = 50;
    const SLOTS: usize = 2;
    let fx = Fixture::new("fl-fleet").await;
    fx.create_nodes(0..NODES).await;
    fx.set_slots(GROUP, &SLOTS.to_string()).await;
    let history = LeaseHistory::record(fx.leases()).await;
    // Two replicas of serve, each with its own Node cache, share the Lease.
    let servers = [
        fx.server(Duration::ZERO).await,
        fx.server(Duration::ZERO).await,
    ];
    let ids: Vec<String> = (0..ASKING).map(|i| fx.zincati_id(i * 7)).collect();

    let refusals = join_all(
        ids.iter()
            .enumerate()
            .map(|(i, id)| zincati_reboots_once(&servers, id, i)),
    )
    .await;

    let versions = history.finish(&fx.leases()).await;
    let mut granted: BTreeMap<String, usize> = BTreeMap::new();
    let mut queued_grants = 0;
    let mut previous = LockState::default();
    for state in &versions {
        assert!(state.holders.len() <= SLOTS, "{state:?}");
        for holder in &state.holders {
            if previous.holds(&holder.node) {
                continue;
            }
            *granted.entry(holder.node.clone()).or_default() += 1;
            // Granted only if no node that asked before it is still waiting beyond the
            // free slots: its place in the queue was within them.
            if let Some(place) = previous.queue.iter().position(|w| w.node == holder.node) {
                let kept = state.holders.iter().filter(|h| previous.holds(&h.node));
                let free = SLOTS - kept.count();
                assert!(
                    place < free,
                    "{} was granted from place {} of the queue with {free} slot(s) free: {previous:?}",
                    holder.node,
                    place + 1
                );
                queued_grants += 1;
            }
        }
        previous = state.clone();
    }
    assert_eq!(granted.len(), ASKING, "every node rebooted: {granted:?}");
    assert!(granted.values().all(|&n| n == 1), "once each: {granted:?}");
    assert!(
        versions.iter().any(|s| s.holders.len() == SLOTS),
        "both slots were used"
    );
    assert!(
        queued_grants >= ASKING - SLOTS,
        "{queued_grants} grants came from the queue"
    );
    let last = versions.last().expect("the Lease was written");
    assert!(last.holders.is_empty() && last.queue.is_empty(), "{last:?}");
    eprintln!(
        "fleetlock: {ASKING} of {NODES} nodes rebooted {SLOTS} at a time through {} Lease versions; {} refusals",
        versions.len(),
        refusals.iter().sum::<usize>()
    );
    for server in servers {
        server.stop();
    }
}

#[tokio::test]
async fn the_queue_shows_in_the_status_survives_a_restart_and_is_shared_by_replicas() {
    let fx = Fixture::new("fl-queue").await;
    fx.create_nodes(0..3).await;
    let id = |i: usize| fx.zincati_id(i);
    let first = fx.server(Duration::ZERO).await;
    assert_eq!(first.pre_reboot(&id(0)).await.status, 200);
    for (i, expected) in [(1, "number 1 of 1 in line"), (2, "number 2 of 2 in line")] {
        let refused = first.pre_reboot(&id(i)).await;
        assert_eq!(refused.kind(), "failed_lock_semaphore_full", "{refused:?}");
        assert!(refused.value().contains(expected), "{}", refused.value());
    }
    let status = first.status().await;
    let group = status
        .groups
        .iter()
        .find(|g| g.group == GROUP)
        .expect("group");
    let queue: Vec<(usize, &str)> = group
        .queue
        .iter()
        .map(|w| (w.position, w.node.as_str()))
        .collect();
    assert_eq!(
        queue,
        [(1, fx.node_name(1).as_str()), (2, fx.node_name(2).as_str())]
    );
    assert!(group.queue[0].first_asked_at <= group.queue[1].first_asked_at);
    assert!(
        group
            .queue
            .iter()
            .all(|w| w.first_asked_at <= w.last_asked_at)
    );
    assert_eq!(group.queue[1].id, id(2));
    first.stop();

    // A restarted replica and a second one; their clients write the base URL in other ways.
    let mut restarted = fx.server(Duration::ZERO).await;
    restarted.base = restarted.base.trim_end_matches('/').to_owned();
    let mut other = fx.server(Duration::ZERO).await;
    other.base.push('/');
    assert_eq!(restarted.steady_state(&id(0)).await.status, 200);
    // The slot is free, but node 1 asked before node 2.
    let second = other.pre_reboot(&id(2)).await;
    assert_eq!(second.kind(), "failed_lock_semaphore_full", "{second:?}");
    assert!(
        second
            .value()
            .contains("kept for the node(s) that asked first"),
        "{}",
        second.value()
    );
    assert_eq!(restarted.pre_reboot(&id(1)).await.status, 200);
    let status = other.status().await;
    let group = status
        .groups
        .iter()
        .find(|g| g.group == GROUP)
        .expect("group");
    assert_eq!(group.holders[0].node, fx.node_name(1));
    assert_eq!(group.queue.len(), 1);
    assert_eq!(group.queue[0].node, fx.node_name(2));
    // Steady-state also takes a waiting node out of the queue.
    assert_eq!(other.steady_state(&id(2)).await.status, 200);
    assert!(
        fx.leases()
            .get(&lease_name(GROUP))
            .await
            .map(|l| state_from_lease(&l).unwrap().queue.is_empty())
            .unwrap()
    );
    restarted.stop();
    other.stop();
}

#[tokio::test]
async fn unknown_paths_and_methods_over_http_get_the_protocols_json_error() {
    let fx = Fixture::new("fl-paths").await;
    let server = fx.server(Duration::ZERO).await;
    for (method, endpoint, status, kind) in [
        (reqwest::Method::POST, "v1/reboot", 404, "unknown_endpoint"),
        (reqwest::Method::GET, "v2/status", 404, "unknown_endpoint"),
        (
            reqwest::Method::GET,
            "v1/pre-reboot",
            405,
            "method_not_allowed",
        ),
        (
            reqwest::Method::DELETE,
            "v1/status",
            405,
            "method_not_allowed",
        ),
    ] {
        let response = server
            .http
            .request(method.clone(), server.url(endpoint))
            .header("fleet-lock-protocol", "true")
            .send()
            .await
            .expect("answers");
        assert_eq!(response.status().as_u16(), status, "{method} {endpoint}");
        let body: ErrorBody = response.json().await.expect("a JSON error body");
        assert_eq!(body.kind, kind, "{method} {endpoint}");
        assert!(!body.value.is_empty());
    }
    server.stop();
}

/// Refusal latencies of one node while another holds the only slot (ms, sorted).
struct Refusals {
    /// The path before issue 15: its API reads (every Node listed and matched, the slots
    /// ConfigMap, the Lease), then this server's refusal.
    before: Vec<f64>,
    /// Nodes, Leases and the ConfigMap from the watch-fed caches.
    after: Vec<f64>,
    /// A node's first refusal, which writes its place in the queue into the Lease.
    first: Vec<f64>,
}

fn millis(started: Instant) -> f64 {
    started.elapsed().as_secs_f64() * 1000.0
}

fn percentile(sorted: &[f64], p: usize) -> f64 {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

async fn measure_refusals(
    fx: &Fixture,
    server: &Server,
    first_askers: std::ops::Range<usize>,
) -> Refusals {
    const SAMPLES: usize = 200;
    let nodes: Api<Node> = Api::all(fx.client.clone());
    let config_maps: Api<ConfigMap> = Api::namespaced(fx.client.clone(), &fx.ns);
    let id = fx.zincati_id(1);
    let refused = |answer: Answer| assert_eq!(answer.kind(), "failed_lock_semaphore_full");
    refused(server.pre_reboot(&id).await);
    let mut first = Vec::new();
    for i in first_askers {
        let started = Instant::now();
        refused(server.pre_reboot(&fx.zincati_id(i)).await);
        first.push(millis(started));
    }
    let (mut before, mut after) = (Vec::new(), Vec::new());
    for _ in 0..SAMPLES {
        let started = Instant::now();
        let listed = nodes
            .list(&ListParams::default())
            .await
            .expect("list Nodes");
        dkron_ha::fleetlock::node::find_node_for_id(&listed.items, &id).expect("found");
        config_maps
            .get_opt("dkron-ha-fleetlock")
            .await
            .expect("slots");
        let lease = fx.leases().get(&lease_name(GROUP)).await.expect("Lease");
        state_from_lease(&lease).expect("readable");
        refused(server.pre_reboot(&id).await);
        before.push(millis(started));
        let started = Instant::now();
        refused(server.pre_reboot(&id).await);
        after.push(millis(started));
    }
    for samples in [&mut before, &mut after, &mut first] {
        samples.sort_by(f64::total_cmp);
    }
    Refusals {
        before,
        after,
        first,
    }
}

/// `dkron-ha serve` (this build, FleetLock only) against the test control plane: once it has
/// answered a request (its Node cache listed) and run 10 s more, VmRSS and VmHWM in KiB.
async fn serve_memory(fx: &Fixture) -> (u64, u64) {
    let dir = tempfile::tempdir().expect("temp dir");
    dkron_ha::certs::generate(&dkron_ha::certs::CertRequest {
        service: "dkron-ha".into(),
        namespace: fx.ns.clone(),
        extra_names: vec!["127.0.0.1".into()],
        valid_days: 1,
    })
    .expect("certs")
    .write_to(dir.path())
    .expect("write certs");
    let [https, http] = support::control_plane::free_ports().expect("ports");
    let mut serve = tokio::process::Command::new(env!("CARGO_BIN_EXE_dkron-ha"))
        .args(["serve", "--log-level", "warn"])
        .env("DKRON_HA_HTTPS_ADDR", format!("127.0.0.1:{https}"))
        .env("DKRON_HA_HTTP_ADDR", format!("127.0.0.1:{http}"))
        .env("DKRON_HA_TLS_CERT", dir.path().join("tls.crt"))
        .env("DKRON_HA_TLS_KEY", dir.path().join("tls.key"))
        .env("DKRON_HA_CONTROLLER", "false")
        .env("DKRON_HA_FLEETLOCK_NAMESPACE", &fx.ns)
        .env("KUBECONFIG", &ControlPlane::shared().kubeconfig)
        .env("POD_NAMESPACE", &fx.ns)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .kill_on_drop(true)
        .spawn()
        .expect("start serve");
    let pid = serve.id().expect("serve runs");
    let http_client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{http}/fleetlock/v1/pre-reboot");
    let body = json!({"client_params": {"id": fx.zincati_id(1), "group": GROUP}}).to_string();
    eventually("serve answers FleetLock from its Node cache", async || {
        let request = http_client.post(&url).header("fleet-lock-protocol", "true");
        let response = request.body(body.clone()).send().await.ok()?;
        let error: ErrorBody = response.json().await.ok()?;
        (error.kind == "failed_lock_semaphore_full").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
    };
    let memory = (field("VmRSS:"), field("VmHWM:"));
    assert!(
        serve.try_wait().expect("serve status").is_none(),
        "serve exited during the measurement"
    );
    let _ = serve.kill().await;
    memory
}

/// BENCHMARKS.md "FleetLock at fleet scale (issue 15)": refusal latency while the slot is held
/// elsewhere, the old list-per-request path beside the cached one, at 10 and at 1,000 Nodes,
/// and `serve`'s memory at both. Prints the numbers; run it alone (other tests add Nodes):
/// `cargo test --test e2e_fleetlock fleet_scale -- --ignored --nocapture`
#[tokio::test]
#[ignore = "a measurement: run it alone, by hand"]
async fn fleet_scale_refusal_latency_and_serve_memory() {
    let fx = Fixture::new("fl-scale").await;
    fx.create_nodes(0..10).await;
    let server = fx.server(Duration::ZERO).await;
    assert_eq!(server.pre_reboot(&fx.zincati_id(0)).await.status, 200);
    let mut rows = Vec::new();
    let mut created = 10;
    for (count, first_askers) in [(10, 2..10), (1000, 10..18)] {
        fx.create_nodes(created..count).await;
        created = count;
        let in_cluster = Api::<Node>::all(fx.client.clone())
            .list_metadata(&ListParams::default())
            .await
            .expect("list")
            .items
            .len();
        // The cache has them all once it finds the last one created.
        eventually("the Node cache has every Node", async || {
            let answer = server.pre_reboot(&fx.zincati_id(count - 1)).await;
            (answer.kind() == "failed_lock_semaphore_full").then_some(())
        })
        .await;
        let refusals = measure_refusals(&fx, &server, first_askers).await;
        let memory = serve_memory(&fx).await;
        rows.push((in_cluster, refusals, memory));
    }
    for (nodes, r, (rss, peak)) in &rows {
        eprintln!(
            "fleetlock at {nodes} Nodes: refusal before (list, match, GETs) p50 {:.2} ms p99 {:.2} ms; \
             after (cache) p50 {:.2} ms p99 {:.2} ms; first refusal (joins the queue) median {:.2} ms max {:.2} ms; \
             serve VmRSS/VmHWM {rss}/{peak} KiB",
            percentile(&r.before, 50),
            percentile(&r.before, 99),
            percentile(&r.after, 50),
            percentile(&r.after, 99),
            percentile(&r.first, 50),
            percentile(&r.first, 100),
        );
    }
    server.stop();
}

#[tokio::test]
async fn deleting_the_lease_releases_every_slot_and_empties_the_queue_at_once() {
    let fx = Fixture::new("fl-reset").await;
    fx.create_nodes(0..3).await;
    let server = fx.server(Duration::ZERO).await;
    assert_eq!(server.pre_reboot(&fx.zincati_id(0)).await.status, 200);
    let waiting = server.pre_reboot(&fx.zincati_id(1)).await;
    assert_eq!(waiting.kind(), "failed_lock_semaphore_full", "{waiting:?}");
    fx.leases()
        .delete(&lease_name(GROUP), &DeleteParams::default())
        .await
        .expect("delete the Lease");
    // The queue went with the Lease: node 2, which never asked before, gets the free slot.
    let granted = server.pre_reboot(&fx.zincati_id(2)).await;
    assert_eq!(granted.status, 200, "{granted:?}");
    assert_eq!(fx.holders(GROUP).await, [fx.node_name(2)]);
    server.stop();
}
