//! Dkron servers in pods on the test bed's real nodes, shared by `tests/e2e_dkron.rs` and
//! `tests/e2e_system.rs`: the cluster with dkron-ha installed from the chart, local volumes and
//! the Dkron image (the stand-in, or a real Dkron server binary when `DKRON_BIN` names a static
//! one), a Dkron StatefulSet as users write it, and what the tests observe of it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use dkron_ha::dkron::grpc::{RaftClient, RaftConfiguration};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Event, Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::{Mutex, OnceCell, Semaphore};

use super::cluster::{Cluster, LOCAL_STORAGE_CLASS};
use super::images;

pub const NODES: u8 = 3;
/// Dkron's HTTP and raft (gRPC) ports, as the test's StatefulSet runs it.
pub const HTTP_PORT: u16 = 8080;
pub const RAFT_PORT: u16 = 6868;
/// How often [`Dkron::observe`] samples a cluster.
pub const SAMPLE_PERIOD: Duration = Duration::from_millis(200);
/// How long one answer of a sample may take: a pod whose server is gone must not stretch the
/// sample period.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(800);
/// How long dkron-ha's condition and label may lag Dkron: the controller's raft round (5 s, its
/// default `--raft-interval-seconds`), the round's own Dkron calls (up to their 3 s timeout when
/// a server is gone), and 1 s of sampling resolution (one period and one sample's probe
/// timeout).
pub const AGREEMENT: Duration = Duration::from_secs(9);
pub const DKRON_IMAGE: &str = "localhost/dkron-ha-test/dkron:test";
/// The namespace label by which Pod Security admission enforces a standard.
pub const RESTRICTED_LABEL: &str = "pod-security.kubernetes.io/enforce";

/// The shared cluster with dkron-ha installed from the chart, local volumes and the Dkron
/// image; once per test binary.
pub async fn cluster() -> &'static Cluster {
    static READY: OnceCell<&'static Cluster> = OnceCell::const_new();
    READY
        .get_or_init(|| async {
            let cluster = tokio::task::spawn_blocking(|| Cluster::shared(NODES))
                .await
                .expect("cluster start-up");
            let (binary, what) = dkron_binary();
            eprintln!("Dkron in these tests: {what} ({})", binary.display());
            // Kept with the cluster's files: a node added later imports it too.
            let out = cluster.dir.join("dkron-image");
            std::fs::create_dir_all(&out).expect("image dir");
            let archive = images::oci_archive(
                &out,
                DKRON_IMAGE,
                &[(binary.as_path(), "/usr/local/bin/dkron")],
                &["/usr/local/bin/dkron"],
            )
            .unwrap_or_else(|error| panic!("{error}"));
            cluster
                .import_image(&archive)
                .unwrap_or_else(|error| panic!("{error}"));
            DKRON_ARCHIVE.set(archive).expect("set once");
            // Volumes are never given back (Retain), and e2e_dkron's scenarios claim 43 in
            // all, its measurement of the opt-in rollouts 48 more: 40 per node leaves room for
            // an uneven spread.
            cluster
                .local_volumes(VOLUMES_PER_NODE)
                .await
                .unwrap_or_else(|error| panic!("{error}"));
            cluster
                .install_chart(&[])
                .unwrap_or_else(|error| panic!("{error}"));
            cluster
        })
        .await
}

static DKRON_ARCHIVE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
const VOLUMES_PER_NODE: usize = 40;

/// A node in place of a lost one, as [`cluster`] prepares them: the Dkron image, local
/// volumes. Returns its name.
pub async fn add_node(cluster: &'static Cluster) -> String {
    let name = cluster
        .add_node(&[])
        .await
        .unwrap_or_else(|error| panic!("{error}"));
    let archive = DKRON_ARCHIVE.get().expect("cluster() ran").clone();
    tokio::task::spawn_blocking(move || cluster.import_image(&archive))
        .await
        .unwrap()
        .unwrap_or_else(|error| panic!("{error}"));
    cluster
        .local_volumes(VOLUMES_PER_NODE)
        .await
        .unwrap_or_else(|error| panic!("{error}"));
    name
}

/// `DKRON_BIN` if set (it must be static: the image holds nothing else), else the stand-in.
pub fn dkron_binary() -> (PathBuf, &'static str) {
    match std::env::var_os("DKRON_BIN") {
        Some(path) => {
            let path = PathBuf::from(path);
            let dynamic = images::has_interpreter(&path).unwrap_or_else(|error| panic!("{error}"));
            assert!(
                !dynamic,
                "DKRON_BIN={} is dynamically linked; build it with CGO_ENABLED=0",
                path.display()
            );
            (path, "real Dkron (DKRON_BIN)")
        }
        None => (
            super::ControlPlane::tool("dkron-standin"),
            "the Dkron stand-in",
        ),
    }
}

/// One scenario at a time: for what changes the whole cluster (node reboots).
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::const_new(());
    LOCK.lock().await
}

/// Scenarios that share the cluster, each with a StatefulSet and namespace of its own:
/// `DKRON_HA_E2E_SCENARIOS` of them at once (default 2: they mostly wait on Dkron's and the
/// kubelet's timers). Measurements for BENCHMARKS.md run with 1, so no timing disturbs another.
pub async fn scenario() -> tokio::sync::SemaphorePermit<'static> {
    static SLOTS: OnceCell<Semaphore> = OnceCell::const_new();
    let slots = SLOTS
        .get_or_init(|| async {
            let n = std::env::var("DKRON_HA_E2E_SCENARIOS")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|n| *n >= 1)
                .unwrap_or(2);
            Semaphore::new(n)
        })
        .await;
    slots.acquire().await.expect("never closed")
}

/// A Dkron server StatefulSet as users write it (the community chart's `--bootstrap-expect`,
/// which the wrapper must replace), opted in, with a PVC per server; `customize` edits its JSON.
pub fn dkron(
    name: &str,
    replicas: i32,
    customize: impl FnOnce(&mut serde_json::Value),
) -> (Service, StatefulSet) {
    let service = serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": true,
            "selector": { "app": name },
            "ports": [{ "name": "http", "port": 8080 }, { "name": "serf", "port": 8946 },
                      { "name": "rpc", "port": 6868 }],
        },
    }))
    .unwrap();
    let mut statefulset = json!({
        "metadata": { "name": name, "annotations": { "dkron-ha/enabled": "true" } },
        "spec": {
            "replicas": replicas,
            "serviceName": name,
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name } },
                "spec": {
                    "terminationGracePeriodSeconds": 20,
                    "containers": [{
                        "name": "dkron",
                        "image": DKRON_IMAGE,
                        "imagePullPolicy": "Never",
                        "args": ["agent", "--server", "--bootstrap-expect=7", "--data-dir=/data",
                                 "--log-level=info"],
                        "ports": [{ "containerPort": 8080 }],
                        "volumeMounts": [{ "name": "data", "mountPath": "/data" }],
                    }],
                },
            },
            "volumeClaimTemplates": [{
                "metadata": { "name": "data" },
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": LOCAL_STORAGE_CLASS,
                    "resources": { "requests": { "storage": "100Mi" } },
                },
            }],
        },
    });
    customize(&mut statefulset);
    (service, serde_json::from_value(statefulset).unwrap())
}

pub struct Dkron {
    pub cluster: &'static Cluster,
    pub ns: String,
    pub name: String,
    pub pods: Api<Pod>,
    pub http: reqwest::Client,
    pub raft: RaftClient,
}

impl Dkron {
    /// Creates the Service and StatefulSet in a namespace of their own.
    pub async fn create(name: &str, replicas: i32) -> (Dkron, Instant) {
        Self::create_with(name, replicas, |_| {}).await
    }

    /// Plain Dkron as users run it without dkron-ha (not opted in: no `wrap`, no gate, no
    /// label), the community chart's way: `--bootstrap-expect`, `--retry-join` to every
    /// server's stable name, a readiness probe on `/health`; Parallel, as dkron-ha sets it
    /// (OrderedReady would only make its cold start slower).
    pub async fn create_plain(name: &str, replicas: i32) -> (Dkron, Instant) {
        Self::create_plain_with(name, replicas, "Parallel").await
    }

    /// [`Dkron::create_plain`] with the given `podManagementPolicy`.
    pub async fn create_plain_with(name: &str, replicas: i32, policy: &str) -> (Dkron, Instant) {
        Self::create_with(name, replicas, |sts| {
            sts["metadata"]["annotations"] = json!({});
            let container = &mut sts["spec"]["template"]["spec"]["containers"][0];
            let mut args = vec![
                "agent".to_owned(),
                "--server".to_owned(),
                format!("--bootstrap-expect={replicas}"),
                "--data-dir=/data".to_owned(),
                "--log-level=info".to_owned(),
            ];
            // Short names: the pods' DNS search path completes them with the namespace.
            args.extend((0..replicas).map(|i| format!("--retry-join={name}-{i}.{name}")));
            container["args"] = json!(args);
            container["readinessProbe"] = json!({
                "httpGet": { "path": "/health", "port": 8080 }, "periodSeconds": 2 });
            sts["spec"]["podManagementPolicy"] = json!(policy);
        })
        .await
    }

    /// [`Dkron::create`] in a namespace that enforces the `restricted` Pod Security Standard,
    /// with a Dkron container that complies as a user would write it: non-root, no privilege
    /// escalation, no capabilities, the RuntimeDefault seccomp profile, and an fsGroup that
    /// makes the data volume writable.
    pub async fn create_restricted(name: &str, replicas: i32) -> (Dkron, Instant) {
        Self::create_in(name, replicas, &[(RESTRICTED_LABEL, "restricted")], |sts| {
            let pod = &mut sts["spec"]["template"]["spec"];
            pod["securityContext"] = json!({
                "runAsNonRoot": true, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                "seccompProfile": { "type": "RuntimeDefault" },
            });
            pod["containers"][0]["securityContext"] = json!({
                "allowPrivilegeEscalation": false, "capabilities": { "drop": ["ALL"] },
            });
        })
        .await
    }

    /// [`Dkron::create`] with one more annotation on the StatefulSet.
    pub async fn create_annotated(
        name: &str,
        replicas: i32,
        annotation: &str,
        value: &str,
    ) -> (Dkron, Instant) {
        Self::create_with(name, replicas, |sts| {
            sts["metadata"]["annotations"][annotation] = json!(value);
        })
        .await
    }

    /// [`Dkron::create`] with `customize` applied to the StatefulSet's JSON.
    pub async fn create_with(
        name: &str,
        replicas: i32,
        customize: impl FnOnce(&mut serde_json::Value),
    ) -> (Dkron, Instant) {
        Self::create_in(name, replicas, &[], customize).await
    }

    async fn create_in(
        name: &str,
        replicas: i32,
        namespace_labels: &[(&str, &str)],
        customize: impl FnOnce(&mut serde_json::Value),
    ) -> (Dkron, Instant) {
        let cluster = cluster().await;
        let ns = cluster.control_plane.namespace(name).await;
        let client = cluster.client().await;
        if !namespace_labels.is_empty() {
            let labels: BTreeMap<&str, &str> = namespace_labels.iter().copied().collect();
            Api::<Namespace>::all(client.clone())
                .patch(
                    &ns,
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "metadata": { "labels": labels } })),
                )
                .await
                .unwrap();
        }
        let (service, statefulset) = dkron(name, replicas, customize);
        Api::<Service>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &service)
            .await
            .unwrap();
        let created = Instant::now();
        Api::<StatefulSet>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &statefulset)
            .await
            .unwrap();
        let dkron = Dkron {
            cluster,
            ns: ns.clone(),
            name: name.into(),
            pods: Api::namespaced(client, &ns),
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(3))
                .build()
                .unwrap(),
            raft: RaftClient::new(Duration::from_secs(3)),
        };
        (dkron, created)
    }

    pub fn pod_name(&self, ordinal: usize) -> String {
        format!("{}-{ordinal}", self.name)
    }

    pub async fn pods_by_name(&self) -> BTreeMap<String, Pod> {
        self.pods
            .list(&ListParams::default().labels(&format!("app={}", self.name)))
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .map(|p| (p.metadata.name.clone().unwrap(), p))
            .collect()
    }

    pub async fn http_get(&self, ip: &str, path: &str) -> Option<(u16, String)> {
        let response = self
            .http
            .get(format!("http://{ip}:8080{path}"))
            .send()
            .await
            .ok()?;
        let status = response.status().as_u16();
        Some((status, response.text().await.ok()?))
    }

    /// One observation: what Dkron answers at every pod's IP (`/v1/isleader`, `/v1/leader`,
    /// `/v1/jobs`), the leader's raft configuration (gRPC) and serf members (`/v1/members`), and
    /// beside it, kept apart, what dkron-ha wrote on the pods (Ready, the raft-voter condition,
    /// the leader label). Every pod is asked at once, each answer within [`PROBE_TIMEOUT`].
    pub async fn state(&self) -> State {
        let pods = self.pods_listed().await;
        let views = futures::future::join_all(pods.iter().map(|pod| self.pod_view(pod))).await;
        let mut state = State::default();
        for (pod, view) in pods.iter().zip(views) {
            let name = pod.metadata.name.clone().unwrap_or_default();
            if view.leads && state.leader.is_none() {
                state.leader = Some(name.clone());
            }
            state.pods.insert(name, view);
        }
        if let Some(leader) = &state.leader {
            let ip = state.ip(leader);
            let raft = format!("{ip}:{RAFT_PORT}");
            let (configuration, members) = tokio::join!(
                self.raft.configuration(&raft),
                self.probe(&ip, "/v1/members")
            );
            state.configuration = configuration.ok();
            state.members = members
                .and_then(|(code, body)| (code == 200).then_some(body))
                .and_then(|body| serde_json::from_str::<Vec<serde_json::Value>>(&body).ok())
                .unwrap_or_default()
                .iter()
                .filter_map(|m| {
                    let member = (
                        m["Addr"].as_str()?.to_owned(),
                        m["Status"].as_u64().unwrap_or_default(),
                    );
                    Some((m["Name"].as_str()?.to_owned(), member))
                })
                .collect();
        }
        state
    }

    /// The pods of the StatefulSet, those being deleted too (their server may still run, and
    /// lead, until it has left).
    async fn pods_listed(&self) -> Vec<Pod> {
        self.pods
            .list(&ListParams::default().labels(&format!("app={}", self.name)))
            .await
            .unwrap()
            .items
    }

    async fn pod_view(&self, pod: &Pod) -> PodView {
        let status = pod.status.as_ref();
        let condition = |type_: &str| {
            status
                .and_then(|s| s.conditions.as_ref())
                .and_then(|c| c.iter().find(|c| c.type_ == type_))
                .map(|c| c.status == "True")
        };
        let ip = status.and_then(|s| s.pod_ip.clone());
        let mut view = PodView {
            ip: ip.clone(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            terminating: pod.metadata.deletion_timestamp.is_some(),
            label: pod
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("dkron-ha/leader").cloned()),
            ready: condition("Ready"),
            voter: condition("dkron-ha/raft-voter"),
            ..PodView::default()
        };
        if let Some(ip) = &ip {
            let (leads, leader, jobs) = tokio::join!(
                self.probe(ip, "/v1/isleader"),
                self.probe(ip, "/v1/leader"),
                self.probe(ip, "/v1/jobs")
            );
            let json = |answer: Option<(u16, String)>| {
                answer
                    .filter(|(code, _)| *code == 200)
                    .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
            };
            view.leads = leads.is_some_and(|(code, _)| code == 200);
            view.names_leader = json(leader).and_then(|l| Some(l["Name"].as_str()?.to_owned()));
            view.jobs = json(jobs).and_then(|j| Some(j.as_array()?.len()));
        }
        view
    }

    /// `GET path` on the server at `ip`, within [`PROBE_TIMEOUT`].
    async fn probe(&self, ip: &str, path: &str) -> Option<(u16, String)> {
        let response = self
            .http
            .get(format!("http://{ip}:{HTTP_PORT}{path}"))
            .timeout(PROBE_TIMEOUT)
            .send()
            .await
            .ok()?;
        let status = response.status().as_u16();
        Some((status, response.text().await.ok()?))
    }

    /// Samples the cluster every [`SAMPLE_PERIOD`] while `work` runs; `work`'s output and the
    /// samples.
    pub async fn observe<T>(&self, work: impl Future<Output = T>) -> (T, Timeline) {
        let done = std::sync::atomic::AtomicBool::new(false);
        let sampling = async {
            let mut timeline = Timeline::default();
            let mut ticks = tokio::time::interval(SAMPLE_PERIOD);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                ticks.tick().await;
                let at = Instant::now();
                let state = self.state().await;
                timeline.samples.push((at, state));
            }
            timeline
        };
        tokio::join!(
            async {
                let out = work.await;
                done.store(true, std::sync::atomic::Ordering::Relaxed);
                out
            },
            sampling
        )
    }

    /// How long an election takes here, measured on its own: the leader's Dkron (and its
    /// wrapper) is frozen, so it stops sending heartbeats without leaving, and the time until
    /// another server says it leads is one election (a follower's randomized heartbeat timeout,
    /// then a vote). Thawed after, and waited for until whole (`whole`) again. Measured twice,
    /// the longer kept: one draw of raft's randomized timeout can be close to its minimum.
    pub async fn election(&self, whole: impl AsyncFn() -> State) -> Duration {
        let mut longest = Duration::ZERO;
        for _ in 0..2 {
            let state = whole().await;
            let leader = state.leader.clone().unwrap();
            let others: Vec<String> = state
                .pods
                .iter()
                .filter(|(name, _)| **name != leader)
                .filter_map(|(_, p)| p.ip.clone())
                .collect();
            freeze(&leader);
            let frozen = Instant::now();
            let elected = loop {
                let answers = futures::future::join_all(
                    others.iter().map(|ip| self.probe(ip, "/v1/isleader")),
                )
                .await;
                if answers.iter().flatten().any(|(code, _)| *code == 200) {
                    break frozen.elapsed();
                }
                if frozen.elapsed() > Duration::from_secs(60) {
                    thaw(&leader);
                    self.fail(format!("no new leader 60s after {leader} was frozen"))
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            thaw(&leader);
            eprintln!("an election: {:.2}s", elected.as_secs_f64());
            longest = longest.max(elected);
        }
        whole().await;
        longest
    }

    /// Waits until the cluster is whole ([`State::is_whole`]: Dkron's answers first, then
    /// dkron-ha's agreement). Fails after `bound` with the last state seen. Every `bound` the
    /// tests pass is a sanity bound that no healthy run comes near (a hang, not a slowdown);
    /// how long it took is a figure for `make bench-dkron` / `make bench-system`.
    pub async fn until_whole(&self, want: &[String], bound: Duration) -> State {
        let started = Instant::now();
        let deadline = started + bound;
        let mut reported = started;
        loop {
            let state = self.state().await;
            if state.is_whole(want) {
                return state;
            }
            if reported.elapsed() >= Duration::from_secs(5) {
                reported = Instant::now();
                eprintln!(
                    "{}: not whole yet after {:.0}s: {}",
                    self.ns,
                    started.elapsed().as_secs_f64(),
                    state.summary()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "{}: not whole after {bound:?} (want {want:?}):\n{state:#?}\n{}",
                    self.ns,
                    self.logs().await
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// [`Dkron::until_whole`] for plain Dkron (no gate, no label): exactly the pods `want`, one
    /// leader, and its configuration has them as voters at their pods' current IPs.
    pub async fn until_plain(&self, want: &[String], bound: Duration) -> State {
        let deadline = Instant::now() + bound;
        loop {
            let state = self.state().await;
            if state.is_plain_whole(want) {
                return state;
            }
            if Instant::now() > deadline {
                self.fail(format!(
                    "plain Dkron not whole after {bound:?}: {}",
                    state.summary()
                ))
                .await;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Seconds until the server at `ip` names a leader (`GET /v1/leader`).
    pub async fn until_knows_leader(&self, ip: &str, bound: Duration) -> f64 {
        let started = Instant::now();
        loop {
            if let Some((200, body)) = self.http_get(ip, "/v1/leader").await
                && body.contains("rpc_addr")
            {
                return started.elapsed().as_secs_f64();
            }
            if started.elapsed() > bound {
                self.fail(format!("{ip} knows no leader after {bound:?}"))
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The `dkron-ha/leader` label of `pod` now.
    pub async fn leader_label(&self, pod: &str) -> Option<String> {
        let pod = self.pods.get(pod).await.unwrap();
        pod.metadata.labels?.get("dkron-ha/leader").cloned()
    }

    /// A rolling restart (a pod-template change), observed every 200 ms until every pod is
    /// replaced and `whole` holds, or `bound` has passed.
    pub async fn rolling_restart(&self, bound: Duration, whole: impl Fn(&State) -> bool) -> Rolled {
        let patch = json!({ "spec": { "template": { "metadata": {
            "annotations": { "example.com/restarted": "1" } } } } });
        self.rollout(patch, bound, whole).await
    }

    /// A rollout started by merging `patch` into the StatefulSet, observed every 200 ms until
    /// every pod is replaced and `whole` holds, or `bound` has passed.
    pub async fn rollout(
        &self,
        patch: serde_json::Value,
        bound: Duration,
        whole: impl Fn(&State) -> bool,
    ) -> Rolled {
        let before: BTreeMap<String, String> = self
            .state()
            .await
            .pods
            .into_iter()
            .map(|(name, p)| (name, p.uid))
            .collect();
        Api::<StatefulSet>::namespaced(self.cluster.client().await, &self.ns)
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .unwrap();
        let rolled = Instant::now();
        let mut timeline = Timeline::default();
        let mut ticks = tokio::time::interval(SAMPLE_PERIOD);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let at = Instant::now();
            let state = self.state().await;
            let replaced = state
                .pods
                .iter()
                .all(|(name, p)| before.get(name) != Some(&p.uid));
            let done = replaced && whole(&state);
            timeline.samples.push((at, state.clone()));
            if done || rolled.elapsed() > bound {
                return Rolled {
                    elapsed: rolled.elapsed(),
                    timeline,
                    replaced,
                    done,
                    state,
                };
            }
        }
    }

    /// The `dkron` container's log of every pod (and of its previous container, if it
    /// restarted), and the namespace's events, for failure messages.
    pub async fn logs(&self) -> String {
        let mut out = self.events().await;
        for name in self.pods_by_name().await.keys() {
            for previous in [true, false] {
                let params = kube::api::LogParams {
                    container: Some("dkron".into()),
                    tail_lines: Some(if previous { 80 } else { 40 }),
                    previous,
                    ..Default::default()
                };
                match self.pods.logs(name, &params).await {
                    Ok(log) => out.push_str(&format!(
                        "\n--- {name}{}\n{log}",
                        if previous {
                            " (previous container)"
                        } else {
                            ""
                        }
                    )),
                    Err(_) if previous => {}
                    Err(error) => out.push_str(&format!("\n--- {name}: no log: {error}")),
                }
            }
        }
        out
    }

    /// The log of `container` of `pod` (of its previous instance with `previous`). A read that
    /// fails fails the test: a check that a line is absent must not pass on an empty read.
    pub async fn log(&self, pod: &str, container: &str, previous: bool) -> String {
        match self.try_log(pod, container, previous).await {
            Ok(log) => log,
            Err(error) => {
                self.fail(format!("read the log of {pod}/{container}: {error}"))
                    .await
            }
        }
    }

    /// The log, or the API's error: for waits that read again until a line appears.
    pub async fn try_log(
        &self,
        pod: &str,
        container: &str,
        previous: bool,
    ) -> Result<String, kube::Error> {
        let params = kube::api::LogParams {
            container: Some(container.into()),
            previous,
            ..Default::default()
        };
        self.pods.logs(pod, &params).await
    }

    /// Waits until the log of the previous instance of `container` of `pod` has every one of
    /// `needles`. Asks again for a while: the kubelet answers a read of a container that
    /// containerd is slow to report on (two scenarios at a time on 2 cores) with an error
    /// text instead of the log.
    pub async fn until_previous_logged(&self, pod: &str, container: &str, needles: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = self.try_log(pod, container, true).await.unwrap_or_default();
            if needles.iter().all(|n| log.contains(n)) {
                return;
            }
            if Instant::now() > deadline {
                self.fail(format!(
                    "{pod}/{container}: no {needles:?} in the previous log after 60s:\n{log}"
                ))
                .await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Waits until the `dkron` container's log of `pod` has a line with every one of `needles`;
    /// returns that line.
    pub async fn until_logged(&self, pod: &str, needles: &[&str], bound: Duration) -> String {
        let deadline = Instant::now() + bound;
        loop {
            let log = self.try_log(pod, "dkron", false).await.unwrap_or_default();
            if let Some(line) = log.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return line.to_owned();
            }
            if Instant::now() > deadline {
                self.fail(format!("{pod}: no line with {needles:?} after {bound:?}"))
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub async fn scale(&self, replicas: i32) {
        let client = self.cluster.client().await;
        Api::<StatefulSet>::namespaced(client, &self.ns)
            .patch(
                &self.name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": { "replicas": replicas } })),
            )
            .await
            .unwrap();
    }

    /// The status of `container` of `pod`: (restart count, exit code of its last termination).
    pub async fn container_status(&self, pod: &str, container: &str) -> (i32, Option<i32>) {
        let pod = self.pods.get(pod).await.unwrap();
        let status = pod
            .status
            .and_then(|s| s.container_statuses)
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.name == container)
            .expect("container status");
        let exit = status
            .last_state
            .and_then(|s| s.terminated)
            .map(|t| t.exit_code);
        (status.restart_count, exit)
    }

    /// Waits until `container` of `pod` has restarted `count` times; its last exit code.
    pub async fn until_restarted(&self, pod: &str, container: &str, count: i32) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let (restarts, Some(code)) = self.container_status(pod, container).await
                && restarts >= count
            {
                assert_eq!(restarts, count, "{pod}/{container} restarted too often");
                return code;
            }
            if Instant::now() > deadline {
                self.fail(format!("{pod}/{container} not restarted {count} times"))
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The wrapper's `starting` line of a pod: the arguments it gave Dkron.
    pub async fn started_with(&self, pod: &str) -> String {
        let log = self.log(pod, "dkron", false).await;
        log.lines()
            .find(|line| line.contains("starting") && line.contains("args="))
            .unwrap_or_else(|| panic!("{pod}: no `starting` line in\n{log}"))
            .to_owned()
    }

    /// Fails with `message`, the pods' logs and the namespace's events.
    pub async fn fail(&self, message: String) -> ! {
        panic!("{}: {message}\n{}", self.ns, self.logs().await)
    }

    pub async fn post_job(&self, leader_ip: &str, job: &str) {
        let response = self
            .http
            .post(format!("http://{leader_ip}:8080/v1/jobs"))
            .json(&json!({
                "name": job, "schedule": "@every 1h", "executor": "shell",
                "executor_config": { "command": "true" },
            }))
            .send()
            .await
            .unwrap();
        let status = response.status();
        assert!(
            status.is_success(),
            "POST /v1/jobs {job}: {status} {}",
            response.text().await.unwrap_or_default()
        );
    }

    /// Waits until `job` is on the server at `ip` (`GET /v1/jobs/<job>` answers 200).
    pub async fn until_job_on(&self, ip: &str, job: &str, bound: Duration) {
        let started = Instant::now();
        loop {
            let answer = self.http_get(ip, &format!("/v1/jobs/{job}")).await;
            if answer.as_ref().map(|(code, _)| *code) == Some(200) {
                break;
            }
            if started.elapsed() > bound {
                let all = self.http_get(ip, "/v1/jobs").await;
                panic!(
                    "job {job} not on {ip} after {bound:?}: last answer {answer:?}; GET /v1/jobs: {all:?}\n{}",
                    self.logs().await
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        eprintln!(
            "job {job} on {ip} after {:.1}s",
            started.elapsed().as_secs_f64()
        );
    }

    /// The IPs the `<sts>-leader` Service's EndpointSlices hold.
    pub async fn leader_endpoints(&self) -> Vec<String> {
        let slices: Api<EndpointSlice> = Api::namespaced(self.cluster.client().await, &self.ns);
        let mut ips: Vec<String> = slices
            .list(
                &ListParams::default()
                    .labels(&format!("kubernetes.io/service-name={}-leader", self.name)),
            )
            .await
            .unwrap()
            .items
            .into_iter()
            .flat_map(|s| s.endpoints.unwrap_or_default())
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
            .flat_map(|e| e.addresses)
            .collect();
        ips.sort();
        ips
    }

    /// The namespace's events, one line each, for failure messages.
    pub async fn events(&self) -> String {
        let events: Api<Event> = Api::namespaced(self.cluster.client().await, &self.ns);
        let mut items = events.list(&ListParams::default()).await.unwrap().items;
        items.sort_by_key(|e| e.metadata.creation_timestamp.clone().map(|t| t.0));
        items
            .iter()
            .map(|e| {
                format!(
                    "event {:?} {} {}: {}",
                    e.metadata.creation_timestamp.as_ref().map(|t| t.0),
                    e.involved_object.name.as_deref().unwrap_or_default(),
                    e.reason.as_deref().unwrap_or_default(),
                    e.message.as_deref().unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub async fn removal_events(&self) -> Vec<String> {
        self.events_for("RaftPeerRemoved").await
    }

    /// The messages of the namespace's Events with `reason`.
    pub async fn events_for(&self, reason: &str) -> Vec<String> {
        let events: Api<Event> = Api::namespaced(self.cluster.client().await, &self.ns);
        events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .map(|e| e.message.unwrap_or_default())
            .collect()
    }

    /// Deletes the namespace (and so the StatefulSet and its pods), so later scenarios' drains
    /// never wait for this cluster.
    pub async fn delete(self) {
        Api::<Namespace>::all(self.cluster.client().await)
            .delete(&self.ns, &DeleteParams::default())
            .await
            .unwrap();
    }

    /// After the leader's pod was deleted: seconds until one of `others` (name, IP) says it
    /// leads, and until it carries the leader label and is the leader Service's only endpoint.
    pub async fn leader_change(&self, others: &[(String, String)]) -> (f64, f64) {
        let started = Instant::now();
        let deadline = started + Duration::from_secs(60);
        let (name, ip) = loop {
            let mut found = None;
            for (name, ip) in others {
                if self.http_get(ip, "/v1/isleader").await.map(|(c, _)| c) == Some(200) {
                    found = Some((name.clone(), ip.clone()));
                }
            }
            if let Some(found) = found {
                break found;
            }
            assert!(Instant::now() < deadline, "no new leader after 60s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let elected = started.elapsed().as_secs_f64();
        loop {
            let label = self.leader_label(&name).await;
            if label.as_deref() == Some("true") && self.leader_endpoints().await == [ip.clone()] {
                return (elected, started.elapsed().as_secs_f64());
            }
            assert!(
                Instant::now() < deadline,
                "{name} leads but is not labelled after 60s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Deletes a pod (`grace` seconds, the pod's own when `None`) and waits until its
    /// successor (same name, new uid) has an IP; returns the old and the new IP.
    pub async fn replace_pod(&self, pod: &str, grace: Option<u32>) -> (String, String) {
        let old = self.pods.get(pod).await.unwrap();
        let old_uid = old.metadata.uid.clone().unwrap();
        let old_ip = old.status.unwrap().pod_ip.unwrap();
        self.pods
            .delete(
                pod,
                &DeleteParams {
                    grace_period_seconds: grace,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(new) = self.pods.get_opt(pod).await.unwrap()
                && new.metadata.uid.as_deref() != Some(&old_uid)
                && let Some(ip) = new.status.and_then(|s| s.pod_ip)
            {
                return (old_ip, ip);
            }
            assert!(Instant::now() < deadline, "{pod} not back after 120s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// What [`Dkron::rolling_restart`] saw.
#[derive(Debug)]
pub struct Rolled {
    pub elapsed: Duration,
    /// Every sample, from the change on.
    pub timeline: Timeline,
    /// Every pod was replaced.
    pub replaced: bool,
    /// Every pod was replaced and the cluster whole, within the bound.
    pub done: bool,
    /// The last state seen.
    pub state: State,
}

/// Time without a leader, from states observed one after another: a stretch runs from the
/// first sample without a leader to the first with one.
#[derive(Debug, Default)]
pub struct LeaderGaps {
    pub total: Duration,
    pub longest: Duration,
}

/// The states [`Dkron::observe`] sampled, in order, each with the instant its sample began.
#[derive(Debug, Default)]
pub struct Timeline {
    pub samples: Vec<(Instant, State)>,
}

impl Timeline {
    pub fn leaderless(&self) -> LeaderGaps {
        let mut gaps = LeaderGaps::default();
        let mut since = None;
        for (at, state) in &self.samples {
            match (&state.leader, since) {
                (None, None) => since = Some(*at),
                (Some(_), Some(from)) => {
                    let gap = at.duration_since(from);
                    gaps.total += gap;
                    gaps.longest = gaps.longest.max(gap);
                    since = None;
                }
                _ => {}
            }
        }
        if let (Some(from), Some((last, _))) = (since, self.samples.last()) {
            let gap = last.duration_since(from);
            gaps.total += gap;
            gaps.longest = gaps.longest.max(gap);
        }
        gaps
    }

    /// Of the samples with a leader, the one with the fewest live voters (Dkron's view,
    /// [`State::live_voters`]). Without a leader nobody is a live voter: those samples are the
    /// leaderless stretches, bounded by [`Timeline::leaderless`].
    pub fn fewest_live_voters(&self) -> Option<&State> {
        self.samples
            .iter()
            .map(|(_, s)| s)
            .filter(|s| s.leader.is_some())
            .min_by_key(|s| s.live_voters().len())
    }

    /// The longest time dkron-ha's word on a pod differed from Dkron's, over every pod it
    /// wrote on: the raft-voter condition against [`State::live_voters`], the leader label
    /// against who leads. `(what, how long)`; a stretch runs from the first sample that differs
    /// to the first that agrees again (or the last sample). Samples without a leader are
    /// skipped: during an election nobody is a live voter, and the condition keeps its value
    /// by design (a normal election must not drop every pod's readiness).
    pub fn longest_disagreement(&self) -> Option<(String, Duration)> {
        let mut since: BTreeMap<String, Instant> = BTreeMap::new();
        let mut longest: Option<(String, Duration)> = None;
        let mut end = |what: &String, from: Instant, to: Instant| {
            let gap = to.duration_since(from);
            if longest.as_ref().is_none_or(|(_, l)| gap > *l) {
                longest = Some((what.clone(), gap));
            }
        };
        for (at, state) in self.samples.iter().filter(|(_, s)| s.leader.is_some()) {
            let live = state.live_voters();
            let mut differing = BTreeSet::new();
            for (name, pod) in state.pods.iter().filter(|(_, p)| !p.terminating) {
                if let Some(voter) = pod.voter
                    && voter != live.contains(name)
                {
                    differing.insert(format!("{name}: raft-voter={voter}, live={}", !voter));
                }
                let labelled = pod.label.as_deref() == Some("true");
                if pod.label.is_some() && labelled != pod.leads {
                    differing.insert(format!(
                        "{name}: leader label={labelled}, leads={}",
                        !labelled
                    ));
                }
            }
            for what in &differing {
                since.entry(what.clone()).or_insert(*at);
            }
            let agreed: Vec<String> = since
                .keys()
                .filter(|what| !differing.contains(*what))
                .cloned()
                .collect();
            for what in agreed {
                let from = since.remove(&what).unwrap();
                end(&what, from, *at);
            }
        }
        if let Some((last, _)) = self.samples.last() {
            for (what, from) in &since {
                end(what, *from, *last);
            }
        }
        longest
    }

    /// The no-outage guarantee: no sample with fewer live voters than a majority of `servers`,
    /// no stretch without a leader longer than one election (`election`, measured in the same
    /// run), and dkron-ha's condition and label never apart from Dkron's view for longer than it
    /// takes to notice ([`AGREEMENT`]). Fails with the sample at fault.
    pub fn assert_no_outage(&self, what: &str, servers: usize, election: Duration) {
        let majority = servers / 2 + 1;
        let fewest = self
            .fewest_live_voters()
            .expect("at least one sample with a leader");
        assert!(
            fewest.live_voters().len() >= majority,
            "{what}: fewer than {majority} live voters in a sample: {}",
            fewest.summary()
        );
        let bound = one_election(election);
        let longest = self.leaderless().longest;
        assert!(
            longest <= bound,
            "{what}: without a leader for {longest:?}, longer than one election ({bound:?}, from a measured election of {election:?})"
        );
        if let Some((apart, how_long)) = self.longest_disagreement() {
            assert!(
                how_long <= AGREEMENT,
                "{what}: dkron-ha disagreed with Dkron for {how_long:?} ({apart})"
            );
        }
    }

    /// One line: samples, fewest live voters, time without a leader, the longest disagreement.
    pub fn summary(&self) -> String {
        let gaps = self.leaderless();
        format!(
            "{} samples; fewest live voters {}; without a leader {:.1}s (longest {:.1}s); longest disagreement {:?}",
            self.samples.len(),
            self.fewest_live_voters()
                .map_or(0, |s| s.live_voters().len()),
            gaps.total.as_secs_f64(),
            gaps.longest.as_secs_f64(),
            self.longest_disagreement()
                .map(|(what, d)| format!("{:.1}s ({what})", d.as_secs_f64()))
        )
    }
}

/// The longest a leaderless stretch may be, given an election measured on its own: raft draws
/// a follower's heartbeat timeout from [T, 2T], so a measured election `e` (at least T) bounds
/// any one-round election by 2e; plus the resolution of a stretch seen in samples (one period,
/// and one sample's own time, at most a probe's timeout).
pub fn one_election(election: Duration) -> Duration {
    2 * election + SAMPLE_PERIOD + PROBE_TIMEOUT
}

#[derive(Clone, Debug, Default)]
pub struct PodView {
    pub ip: Option<String>,
    pub uid: String,
    /// The pod is being deleted; its server may still run until it has left.
    pub terminating: bool,
    // What its Dkron answers at the pod's IP.
    /// `/v1/isleader` answers 200.
    pub leads: bool,
    /// The name of the leader it reports (`/v1/leader`).
    pub names_leader: Option<String>,
    /// How many jobs it lists (`/v1/jobs`).
    pub jobs: Option<usize>,
    // What dkron-ha wrote on the pod.
    pub label: Option<String>,
    pub ready: Option<bool>,
    pub voter: Option<bool>,
}

#[derive(Clone, Debug, Default)]
pub struct State {
    /// The first pod whose server says it leads.
    pub leader: Option<String>,
    /// The leader's raft configuration.
    pub configuration: Option<RaftConfiguration>,
    /// The leader's serf members: name to (address, status; 1 is alive).
    pub members: BTreeMap<String, (String, u64)>,
    pub pods: BTreeMap<String, PodView>,
}

impl State {
    /// The voters' ids in the leader's raft configuration.
    pub fn voters(&self) -> Vec<String> {
        let mut voters: Vec<String> = self
            .configuration
            .iter()
            .flat_map(|c| &c.servers)
            .filter(|s| s.voter)
            .map(|s| s.id.clone())
            .collect();
        voters.sort();
        voters
    }

    /// The servers that count for the majority now, by Dkron's answers alone: a voter in the
    /// leader's configuration, alive in the leader's serf at its pod's current IP, naming the
    /// leader, and listing as many jobs as the leader.
    ///
    /// The serf address is the one that counts: Dkron's raft transport dials a server at the
    /// address its serf member has (`ServerAddressProvider`, Dkron's `ServerLookup`), not at
    /// the one in the configuration, which the leader rewrites only at its reconcile (60 s).
    /// [`State::is_plain_whole`] asks for that one too.
    pub fn live_voters(&self) -> BTreeSet<String> {
        let Some(leader) = &self.leader else {
            return BTreeSet::new();
        };
        let leader_jobs = self.pods[leader].jobs;
        self.configuration
            .iter()
            .flat_map(|c| &c.servers)
            .filter(|s| s.voter)
            .filter(|s| {
                let Some(pod) = self.pods.get(&s.id) else {
                    return false;
                };
                let Some(ip) = &pod.ip else { return false };
                self.members.get(&s.id) == Some(&(ip.clone(), 1))
                    && pod.names_leader.as_ref() == Some(leader)
                    && pod.jobs.is_some()
                    && pod.jobs == leader_jobs
            })
            .map(|s| s.id.clone())
            .collect()
    }

    /// Whole by Dkron's answers: exactly the pods `want`, none being deleted, one leader, and
    /// exactly them as voters, each live ([`State::live_voters`]).
    pub fn is_live(&self, want: &[String]) -> bool {
        let leaders = self.pods.values().filter(|p| p.leads).count();
        self.pods.keys().eq(want.iter())
            && self.pods.values().all(|p| !p.terminating)
            && leaders == 1
            && self.voters() == want
            && self.live_voters().iter().eq(want.iter())
    }

    /// [`State::is_live`], and the configuration has every voter at its pod's current IP: the
    /// end state of plain Dkron, which writes a new address at its reconcile.
    pub fn is_plain_whole(&self, want: &[String]) -> bool {
        let addressed = self.configuration.iter().flat_map(|c| &c.servers).all(|s| {
            self.pods
                .get(&s.id)
                .and_then(|p| p.ip.as_ref())
                .is_some_and(|ip| s.address == format!("{ip}:{RAFT_PORT}"))
        });
        self.is_live(want) && addressed
    }

    /// [`State::is_live`], and dkron-ha agrees: every pod Ready with its raft-voter condition
    /// True, the leader label only on the leader.
    pub fn is_whole(&self, want: &[String]) -> bool {
        self.is_live(want)
            && self.pods.iter().all(|(name, p)| {
                let leader = self.leader.as_ref() == Some(name);
                p.ready == Some(true)
                    && p.voter == Some(true)
                    && p.label.as_deref() == Some(if leader { "true" } else { "false" })
            })
    }

    /// One line: the leader, the voters, the live voters, and per pod its IP, Dkron's answers
    /// and dkron-ha's facts.
    pub fn summary(&self) -> String {
        let pods: Vec<String> = self
            .pods
            .iter()
            .map(|(name, p)| {
                format!(
                    "{name}{} {} names-leader={:?} jobs={:?} member={:?} | ready={:?} voter={:?} leader-label={:?}",
                    if p.terminating { " (terminating)" } else { "" },
                    p.ip.as_deref().unwrap_or("-"),
                    p.names_leader,
                    p.jobs,
                    self.members.get(name),
                    p.ready,
                    p.voter,
                    p.label
                )
            })
            .collect();
        let configuration: Vec<String> = self
            .configuration
            .iter()
            .flat_map(|c| &c.servers)
            .map(|s| {
                format!(
                    "{}@{}{}",
                    s.id,
                    s.address,
                    if s.voter { "" } else { " (nonvoter)" }
                )
            })
            .collect();
        format!(
            "leader {:?}, configuration {configuration:?}, live voters {:?}; {}",
            self.leader,
            self.live_voters(),
            pods.join("; ")
        )
    }

    pub fn ip(&self, pod: &str) -> String {
        self.pods[pod].ip.clone().unwrap()
    }

    pub fn leader_ip(&self) -> String {
        self.ip(self.leader.as_ref().unwrap())
    }

    pub fn a_follower(&self) -> String {
        self.pods
            .iter()
            .find(|(_, p)| !p.leads && !p.terminating)
            .map(|(name, _)| name.clone())
            .unwrap()
    }
}

pub fn names(dkron: &Dkron, n: usize) -> Vec<String> {
    (0..n).map(|i| dkron.pod_name(i)).collect()
}

/// The label-updater sidecar process of each of `pods`, found by its POD_NAME: (pod, pid).
pub fn label_updater_pids(pods: &[String]) -> Vec<(String, u32)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let dir = entry.path();
        let Some(pid) = dir.file_name().and_then(|n| n.to_str()?.parse().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(dir.join("cmdline")) else {
            continue;
        };
        if !String::from_utf8_lossy(&cmdline).contains("label-updater") {
            continue;
        }
        let environ = std::fs::read(dir.join("environ")).unwrap_or_default();
        let environ = String::from_utf8_lossy(&environ);
        if let Some(pod) = pods
            .iter()
            .find(|pod| environ.split('\0').any(|v| v == format!("POD_NAME={pod}")))
        {
            found.push((pod.clone(), pid));
        }
    }
    found.sort();
    found
}

/// The RSS (kB) of each `pods`' label-updater sidecar process.
pub fn label_updater_rss(pods: &[String]) -> Vec<(String, u64)> {
    label_updater_pids(pods)
        .into_iter()
        .filter_map(|(pod, pid)| Some((pod, rss_kib(pid)?)))
        .collect()
}

/// `VmRSS` of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The `dkron-ha serve` processes of the chart's pods (the image's entrypoint with `serve`).
pub fn serve_pids() -> Vec<u32> {
    let want = format!("{}\0serve\0", xtask::BINARY_IN_IMAGE);
    let mut found: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline)
                .starts_with(&want)
                .then_some(pid)
        })
        .collect();
    found.sort();
    found
}

/// The Dkron server process of `pod` and its wrapper (found by the `--node-name` the wrapper
/// gives Dkron): (wrapper pid, Dkron pid).
pub fn processes(pod: &str) -> (String, String) {
    let pattern = format!("--node-name={pod}( |$)");
    let output = std::process::Command::new("pgrep")
        .args(["-f", "--", &pattern])
        .output()
        .unwrap();
    let pids: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(pids.len(), 1, "Dkron processes of {pod}: {pids:?}");
    let ppid = std::fs::read_to_string(format!("/proc/{}/stat", pids[0]))
        .unwrap()
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned();
    (ppid, pids[0].clone())
}

pub fn signal(signal: &str, pid: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), pid])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// SIGSTOPs (or with `thaw`, SIGCONTs) the Dkron server process of `pod` and its wrapper, so
/// it answers nothing and leaves nothing: to serf it fails, and its container only ends by the
/// kubelet's SIGKILL.
pub fn freeze(pod: &str) {
    let (wrapper, dkron) = processes(pod);
    signal("STOP", &dkron);
    signal("STOP", &wrapper);
}

pub fn thaw(pod: &str) {
    let (wrapper, dkron) = processes(pod);
    signal("CONT", &wrapper);
    signal("CONT", &dkron);
}
