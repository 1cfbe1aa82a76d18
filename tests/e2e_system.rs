//! The whole system on the test bed's real nodes: dkron-ha installed from the chart onto the
//! nodes (2 replicas), a Dkron StatefulSet of 3 servers with PVCs opted in, and every node
//! rebooted in turn through FleetLock as Zincati does it, starting with the one that runs the
//! Dkron leader. The Dkron stand-in by default, a real Dkron server binary with `DKRON_BIN`
//! (tests/support/dkron.rs). Needs root (CI runs as root).
//!
//! The FleetLock client sends exactly what Zincati sends (POST, the `fleet-lock-protocol: true`
//! header, a pretty-printed body without Content-Type, the node's app-specific machine id) and
//! retries until 200 as Zincati does; only its pace is the test bed's (1 s instead of Zincati's
//! update-loop tick). It asks the serve pods directly, as the FleetLock Service would.

mod support;

use std::time::{Duration, Instant};

use dkron_ha::fleetlock::app_specific_machine_id;
use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, Pod};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use serde_json::{Value, json};
use support::bench;
use support::dkron::{Dkron, SAMPLE_PERIOD, State, freeze, names, one_election, serial, thaw};

const JOBS: usize = 20;
const GROUP: &str = "default";

/// A FleetLock client as Zincati is one.
struct Zincati {
    http: reqwest::Client,
    serve: Api<Pod>,
}

impl Zincati {
    async fn new(dkron: &Dkron) -> Zincati {
        Zincati {
            http: reqwest::Client::builder()
                .no_proxy()
                // Zincati waits up to 30 minutes for an answer; a pre-reboot waits up to
                // `--fleetlock-drain-wait` (30 s) for the drain before it answers.
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
            serve: Api::namespaced(dkron.cluster.client().await, "dkron-ha"),
        }
    }

    /// The IPs of the Ready serve pods: what the FleetLock Service selects.
    async fn serve_ips(&self) -> Vec<String> {
        let pods = self
            .serve
            .list(&ListParams::default().labels("app.kubernetes.io/name=dkron-ha"))
            .await
            .unwrap();
        pods.items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| {
                let status = p.status?;
                let ready = status
                    .conditions
                    .iter()
                    .flatten()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                ready.then_some(status.pod_ip).flatten()
            })
            .collect()
    }

    /// [`Zincati::post`] that gives up after `bound`.
    async fn post_within(
        &self,
        endpoint: &str,
        id: &str,
        bound: Duration,
    ) -> Option<(u16, String)> {
        tokio::time::timeout(bound, self.post(endpoint, id))
            .await
            .ok()
            .flatten()
    }

    /// One request to the first serve pod that answers: (status, body).
    async fn post(&self, endpoint: &str, id: &str) -> Option<(u16, String)> {
        let body = serde_json::to_string_pretty(&json!({
            "client_params": { "id": id, "group": GROUP },
        }))
        .unwrap();
        for ip in self.serve_ips().await {
            let request = self
                .http
                .post(format!("http://{ip}:8081/fleetlock/v1/{endpoint}"))
                .header("fleet-lock-protocol", "true")
                .body(body.clone());
            if let Ok(response) = request.send().await {
                let status = response.status().as_u16();
                return Some((status, response.text().await.unwrap_or_default()));
            }
        }
        None
    }

    /// Posts `endpoint` until it answers 200, as Zincati keeps trying; the refusals' kinds.
    async fn until_ok(&self, endpoint: &str, id: &str, bound: Duration) -> Vec<String> {
        let deadline = Instant::now() + bound;
        let mut refusals = Vec::new();
        loop {
            match self.post(endpoint, id).await {
                Some((200, _)) => return refusals,
                Some((_, body)) => {
                    let kind = serde_json::from_str::<Value>(&body)
                        .ok()
                        .and_then(|v| v["kind"].as_str().map(str::to_owned))
                        .unwrap_or(body);
                    if refusals.last() != Some(&kind) {
                        refusals.push(kind);
                    }
                }
                None => {
                    let kind = "no serve pod answered".to_owned();
                    if refusals.last() != Some(&kind) {
                        refusals.push(kind);
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "{endpoint} for {id}: no 200 within {bound:?}; refusals {refusals:?}"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Deletes every serve pod and waits until they are gone and a new one is Ready: `serve`
    /// restarted, as a rollout or an eviction restarts it.
    async fn restart_serve(&self) {
        let selector = ListParams::default().labels("app.kubernetes.io/name=dkron-ha");
        let names = async || -> Vec<String> {
            let pods = self.serve.list(&selector).await.unwrap().items;
            pods.into_iter().filter_map(|p| p.metadata.name).collect()
        };
        let old = names().await;
        for pod in &old {
            self.serve.delete(pod, &Default::default()).await.unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let now = names().await;
            if now.iter().all(|pod| !old.contains(pod)) && !self.serve_ips().await.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "serve pods not back after 180s: {old:?} -> {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// FleetLock's status report.
    async fn status(&self) -> Value {
        for ip in self.serve_ips().await {
            if let Ok(response) = self
                .http
                .get(format!("http://{ip}:8081/fleetlock/v1/status"))
                .send()
                .await
                && let Ok(value) = response.json::<Value>().await
            {
                return value;
            }
        }
        panic!("no serve pod answers GET /fleetlock/v1/status");
    }
}

/// The id Zincati on `node` sends: its app-specific machine id.
async fn zincati_id(nodes: &Api<Node>, node: &str) -> String {
    let machine_id = nodes
        .get(node)
        .await
        .unwrap()
        .status
        .and_then(|s| s.node_info)
        .map(|i| i.machine_id)
        .unwrap();
    app_specific_machine_id(&machine_id).unwrap()
}

/// The node each Dkron pod runs on.
async fn nodes_of(dkron: &Dkron) -> Vec<(String, String)> {
    dkron
        .pods
        .list(&ListParams::default().labels(&format!("app={}", dkron.name)))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|p| Some((p.metadata.name?, p.spec?.node_name?)))
        .collect()
}

/// The node `pod` runs on, once scheduled.
async fn node_of(dkron: &Dkron, pod: &str) -> Option<String> {
    nodes_of(dkron)
        .await
        .into_iter()
        .find_map(|(name, node)| (name == pod).then_some(node))
}

/// A Dkron cluster of 3 with [`JOBS`] jobs; the nodes in reboot order: the leader's first.
async fn with_jobs(dkron: &Dkron, state: &State) -> (Vec<String>, Vec<String>) {
    let jobs: Vec<String> = (0..JOBS).map(|i| format!("job-{i}")).collect();
    for job in &jobs {
        dkron.post_job(&state.leader_ip(), job).await;
    }
    // On every server before anything is measured: raft applies in order, so the last job
    // there means all of them (a follower a job behind is no live voter for a moment).
    for pod in state.pods.keys() {
        dkron
            .until_job_on(
                &state.ip(pod),
                jobs.last().unwrap(),
                Duration::from_secs(30),
            )
            .await;
    }
    let placement = nodes_of(dkron).await;
    let leader_node = placement
        .iter()
        .find(|(pod, _)| Some(pod) == state.leader.as_ref())
        .map(|(_, node)| node.clone())
        .unwrap();
    let mut order = vec![leader_node.clone()];
    order.extend(
        dkron
            .cluster
            .node_names()
            .into_iter()
            .filter(|n| *n != leader_node),
    );
    (jobs, order)
}

const ROLLING: &str = "rolling reboot of 3 nodes through FleetLock";

#[tokio::test]
async fn rebooting_every_node_through_fleetlock_keeps_quorum_and_loses_no_job() {
    let _one = serial().await;
    let (dkron, _) = Dkron::create("system", 3).await;
    let want = names(&dkron, 3);
    dkron.until_whole(&want, Duration::from_secs(180)).await;
    // One election on its own, the bound of the leaderless stretches below.
    let election = dkron
        .election(async || dkron.until_whole(&want, Duration::from_secs(120)).await)
        .await;
    bench::seconds(ROLLING, "an election on its own", election);
    let state = dkron.state().await;
    let (jobs, order) = with_jobs(&dkron, &state).await;
    let zincati = Zincati::new(&dkron).await;
    let node_api: Api<Node> = Api::all(dkron.cluster.client().await);
    let began = Instant::now();
    let reboot_all = async {
        for node in &order {
            let id = zincati_id(&node_api, node).await;
            // Its Dkron servers before the drain (an evicted one comes back Pending, nodeless).
            let on_node: Vec<String> = nodes_of(&dkron)
                .await
                .into_iter()
                .filter(|(_, n)| n == node)
                .map(|(pod, _)| pod)
                .collect();
            let asked = Instant::now();
            if Some(node) == order.get(1) {
                // `serve` restarted in the middle of this node's drain: the first answer (with
                // the drain begun: slot taken, node cordoned) is never read, every serve pod is
                // deleted, and the new ones take the drain up from the state in the API.
                let begun = zincati.post_within("pre-reboot", &id, Duration::from_secs(3));
                assert!(begun.await.is_none_or(|(status, _)| status != 200));
                let cordoned = node_api.get(node).await.unwrap();
                assert_eq!(
                    cordoned
                        .annotations()
                        .get("dkron-ha/fleetlock-cordoned")
                        .map(String::as_str),
                    Some("true"),
                    "the drain of {node} has not begun"
                );
                let restarted = Instant::now();
                zincati.restart_serve().await;
                eprintln!(
                    "{node}: serve restarted mid-drain, new pods Ready after {:.1}s",
                    restarted.elapsed().as_secs_f64()
                );
                let status = zincati.status().await;
                let holders: Vec<&str> = status["groups"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .flat_map(|g| g["holders"].as_array().unwrap())
                    .filter_map(|h| h["node"].as_str())
                    .collect();
                assert_eq!(holders, [node.as_str()], "{status}");
            }
            let refusals = zincati
                .until_ok("pre-reboot", &id, Duration::from_secs(300))
                .await;
            // The slot is granted only once every Dkron server not on this node is back as a
            // Ready voter by dkron-ha's word (what FleetLock judged), and Dkron agrees: the
            // others are live voters, at the latest once a new leader is elected (one election,
            // when the drain evicted the leader).
            let state = dkron.state().await;
            let others = |state: &State| -> Vec<String> {
                state
                    .pods
                    .keys()
                    .filter(|pod| !on_node.contains(pod))
                    .cloned()
                    .collect()
            };
            for pod in others(&state) {
                let view = &state.pods[&pod];
                assert!(
                    view.ready == Some(true) && view.voter == Some(true),
                    "{node} was let go while {pod} is not a Ready voter: {}",
                    state.summary()
                );
            }
            let deadline = Instant::now() + one_election(election);
            loop {
                let state = dkron.state().await;
                let live = state.live_voters();
                if others(&state).iter().all(|pod| live.contains(pod)) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{node} was let go, and one election later the others are not all live voters: {}",
                    state.summary()
                );
                tokio::time::sleep(SAMPLE_PERIOD).await;
            }
            eprintln!(
                "{node}: pre-reboot granted and drained after {:.1}s (refusals on the way: {refusals:?})",
                asked.elapsed().as_secs_f64()
            );
            bench::seconds(
                ROLLING,
                "a node's pre-reboot -> granted and drained",
                asked.elapsed(),
            );
            let rebooted = Instant::now();
            dkron
                .cluster
                .reboot_node(node)
                .await
                .unwrap_or_else(|error| panic!("{error}"));
            zincati
                .until_ok("steady-state", &id, Duration::from_secs(120))
                .await;
            eprintln!(
                "{node}: rebooted, Ready and released {:.1}s after the reboot began",
                rebooted.elapsed().as_secs_f64()
            );
        }
        // The last node's server comes back too.
        dkron.until_whole(&want, Duration::from_secs(300)).await
    };
    let (_, timeline) = dkron.observe(reboot_all).await;
    eprintln!(
        "rolling reboot of {} nodes through FleetLock: {:.1}s in all; {}",
        order.len(),
        began.elapsed().as_secs_f64(),
        timeline.summary()
    );
    bench::seconds(ROLLING, "first pre-reboot -> whole", began.elapsed());
    bench::seconds(
        ROLLING,
        "longest without a leader",
        timeline.leaderless().longest,
    );
    bench::seconds(
        ROLLING,
        "without a leader in all",
        timeline.leaderless().total,
    );
    timeline.assert_no_outage("rolling reboot through FleetLock", want.len(), election);

    // Every job on every server; 3 voters at the pods' current IPs (Dkron's leader writes a
    // returning server's new address at its 60 s reconcile); the label and the leader Service
    // on the leader; no peer removed; every node uncordoned; no slot held.
    let state = dkron.until_plain(&want, Duration::from_secs(120)).await;
    for pod in &want {
        for job in &jobs {
            dkron
                .until_job_on(&state.ip(pod), job, Duration::from_secs(30))
                .await;
        }
    }
    let leader_ip = state.leader_ip();
    support::eventually("the leader Service selects the leader only", async || {
        (dkron.leader_endpoints().await == [leader_ip.clone()]).then_some(())
    })
    .await;
    assert_eq!(dkron.removal_events().await, Vec::<String>::new());
    for node in node_api.list(&ListParams::default()).await.unwrap() {
        let name = node.metadata.name.clone().unwrap();
        assert_ne!(
            node.spec.and_then(|s| s.unschedulable),
            Some(true),
            "{name} is still cordoned"
        );
    }
    let status = zincati.status().await;
    for group in status["groups"].as_array().unwrap() {
        assert_eq!(
            group["holders"],
            json!([]),
            "a slot is still held: {status}"
        );
    }
    dkron.delete().await;
}

/// A node that never comes back from its reboot. It asks FleetLock while a follower elsewhere
/// is not a voter (frozen), so the drain holds its own Dkron server for the cluster's majority
/// (`dkron_quorum_at_risk`) and the node keeps its slot, cordoned; then it goes down for good,
/// its server still bound to it. Cordoned is never failed: nothing is replaced while the node
/// is up. Once it has been NotReady for `dkron-ha/replace-on-node-failure` (10s here) the
/// controller deletes the server's claim on that node's local volume and force-deletes the pod;
/// the StatefulSet makes both anew on another node, and the server rejoins under its raft id
/// with every job, no peer removed. The Node deleted, its slot goes to the next node that asks.
/// A fresh node takes the lost one's place for the scenarios after it.
#[tokio::test]
async fn a_node_that_never_comes_back_frees_its_slot_and_its_server_starts_elsewhere() {
    let _one = serial().await;
    let (dkron, _) =
        Dkron::create_annotated("lost", 3, "dkron-ha/replace-on-node-failure", "10s").await;
    let want = names(&dkron, 3);
    let state = dkron.until_whole(&want, Duration::from_secs(180)).await;
    let (jobs, order) = with_jobs(&dkron, &state).await;
    let placement = nodes_of(&dkron).await;
    let on = |node: &str| {
        placement
            .iter()
            .find(|(_, n)| n == node)
            .map(|(pod, _)| pod.clone())
            .unwrap_or_else(|| panic!("no Dkron server on {node}: {placement:?}"))
    };
    // order[0] runs the leader: the lost node and the frozen one run followers.
    let (lost, other) = (order[1].clone(), order[2].clone());
    let (server, frozen) = (on(&lost), on(&other));
    let claim = format!("data-{server}");
    let claims: Api<PersistentVolumeClaim> =
        Api::namespaced(dkron.cluster.client().await, &dkron.ns);
    let old_claim = claims.get(&claim).await.unwrap().metadata.uid;
    let zincati = Zincati::new(&dkron).await;
    let node_api: Api<Node> = Api::all(dkron.cluster.client().await);

    freeze(&frozen);
    support::eventually("the frozen server stops being a voter", async || {
        (dkron.state().await.pods[&frozen].voter == Some(false)).then_some(())
    })
    .await;
    let (status, body) = zincati
        .post("pre-reboot", &zincati_id(&node_api, &lost).await)
        .await
        .expect("a serve pod answers");
    assert_eq!(status, 409, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["kind"], "dkron_quorum_at_risk", "{body}");
    let value = answer["value"].as_str().unwrap();
    assert!(
        value.contains(&format!(
            "Dkron cluster {}/lost has 2 of 3 servers Ready as raft voters",
            dkron.ns
        )) && value.contains(&format!("evicting {server} would leave 1")),
        "{value}"
    );
    thaw(&frozen);
    assert_eq!(
        node_of(&dkron, &server).await,
        Some(lost.clone()),
        "the held server stays on its node"
    );

    // Down for good, holding the slot, cordoned, its server still bound to it.
    let down = Instant::now();
    dkron
        .cluster
        .stop_node(&lost)
        .unwrap_or_else(|error| panic!("{error}"));
    // NotReady after the node monitor's grace period (about 50s), replaced 10s after that.
    let replaced = loop {
        let events = dkron.events_for("ReplacedOnNodeFailure").await;
        if !events.is_empty() {
            break events;
        }
        if down.elapsed() > Duration::from_secs(240) {
            dkron
                .fail(format!("{server} on {lost} not replaced after 240s"))
                .await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let replaced_after = down.elapsed();
    assert_eq!(replaced.len(), 1, "{replaced:?}");
    assert!(
        replaced[0].contains(&format!(
            "force-deleted {server}: Node {lost} has been NotReady"
        )) && replaced[0].contains(&claim),
        "{replaced:?}"
    );
    dkron.until_whole(&want, Duration::from_secs(300)).await;
    let state = dkron.until_plain(&want, Duration::from_secs(120)).await;
    eprintln!(
        "{lost} went down for good: {server} replaced {:.1}s later, the cluster whole {:.1}s after the node went down",
        replaced_after.as_secs_f64(),
        down.elapsed().as_secs_f64()
    );
    bench::seconds(
        "a node lost for good",
        "down -> server replaced",
        replaced_after,
    );
    bench::seconds("a node lost for good", "down -> whole", down.elapsed());
    let new_node = node_of(&dkron, &server).await;
    assert!(
        new_node.is_some() && new_node.as_deref() != Some(lost.as_str()),
        "{new_node:?}"
    );
    assert_ne!(claims.get(&claim).await.unwrap().metadata.uid, old_claim);
    for pod in &want {
        for job in &jobs {
            dkron
                .until_job_on(&state.ip(pod), job, Duration::from_secs(30))
                .await;
        }
    }
    assert_eq!(dkron.removal_events().await, Vec::<String>::new());

    // The admin deletes the Node: its slot goes to the next node that asks, one that runs a
    // single server (the other runs two now: no drain of it can keep a majority).
    dkron
        .cluster
        .delete_node(&lost)
        .await
        .unwrap_or_else(|error| panic!("{error}"));
    let placement = nodes_of(&dkron).await;
    let single = [order[0].clone(), other]
        .into_iter()
        .find(|node| placement.iter().filter(|(_, n)| n == node).count() == 1)
        .unwrap_or_else(|| panic!("no node runs a single server: {placement:?}"));
    let next = zincati_id(&node_api, &single).await;
    let refusals = zincati
        .until_ok("pre-reboot", &next, Duration::from_secs(300))
        .await;
    assert!(
        !refusals
            .iter()
            .any(|kind| kind == "failed_lock_semaphore_full"),
        "{refusals:?}"
    );
    zincati
        .until_ok("steady-state", &next, Duration::from_secs(120))
        .await;
    let status = zincati.status().await;
    for group in status["groups"].as_array().unwrap() {
        assert_eq!(group["holders"], json!([]), "{status}");
    }
    dkron.until_whole(&want, Duration::from_secs(300)).await;
    let cluster = dkron.cluster;
    dkron.delete().await;
    let fresh = support::dkron::add_node(cluster).await;
    eprintln!("{fresh} takes the place of {lost}");
}

/// `kubectl` of the tools cache against the test cluster; panics with its output on failure.
fn kubectl(dkron: &Dkron, args: &[&str]) {
    let output = std::process::Command::new(support::ControlPlane::tool("kubectl"))
        .arg("--kubeconfig")
        .arg(&dkron.cluster.control_plane.kubeconfig)
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "kubectl {args:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The same rolling reboot without dkron-ha: plain Dkron as the community chart runs it, each
/// node drained with `kubectl drain` before its reboot and uncordoned after it. The baseline of
/// BENCHMARKS.md, measured in the same run as the test above
/// (`cargo test --test e2e_system -- --include-ignored --nocapture`); it prints what it saw.
#[tokio::test]
#[ignore = "a measurement: run it by hand with --include-ignored"]
async fn plain_dkron_rebooted_with_kubectl_drain_baseline() {
    let _one = serial().await;
    let (dkron, _) = Dkron::create_plain("plainsys", 3).await;
    let want = names(&dkron, 3);
    let state = dkron.until_plain(&want, Duration::from_secs(300)).await;
    let (jobs, order) = with_jobs(&dkron, &state).await;
    let began = Instant::now();
    let reboot_all = async {
        for node in &order {
            let drained = Instant::now();
            let dkron_ref = &dkron;
            let node_ref = node.as_str();
            std::thread::scope(|scope| {
                scope
                    .spawn(|| {
                        kubectl(
                            dkron_ref,
                            &[
                                "drain",
                                node_ref,
                                "--ignore-daemonsets",
                                "--delete-emptydir-data",
                                "--timeout=300s",
                            ],
                        )
                    })
                    .join()
                    .unwrap()
            });
            eprintln!(
                "plain: {node} drained by kubectl in {:.1}s",
                drained.elapsed().as_secs_f64()
            );
            dkron
                .cluster
                .reboot_node(node)
                .await
                .unwrap_or_else(|error| panic!("{error}"));
            kubectl(&dkron, &["uncordon", node]);
        }
        let rebooted = began.elapsed();
        // Then as long as it takes (at most 5 minutes) until it is whole again, if ever.
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let state = dkron.state().await;
            if state.is_plain_whole(&want) || Instant::now() > deadline {
                break (rebooted, state);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let ((rebooted, state), timeline) = dkron.observe(reboot_all).await;
    // A job counts as lost on a server that still lacks it 30 s after the cluster got whole
    // (a server just back may still be catching up).
    let settled = Instant::now() + Duration::from_secs(30);
    let lost = loop {
        let mut lost = Vec::new();
        for (pod, view) in &state.pods {
            let Some(ip) = &view.ip else {
                lost.push(format!("{pod}: no IP"));
                continue;
            };
            for job in &jobs {
                let answer = dkron.http_get(ip, &format!("/v1/jobs/{job}")).await;
                if answer.map(|(code, _)| code) != Some(200) {
                    lost.push(format!("{pod}: {job}"));
                }
            }
        }
        if lost.is_empty() || Instant::now() > settled {
            break lost;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    eprintln!(
        "plain Dkron, rolling reboot of {} nodes with kubectl drain: reboots done {:.1}s, whole again {:.1}s after the first drain ({}); {}; jobs missing 30 s after: {} {lost:?}; voters at the end {:?}",
        order.len(),
        rebooted.as_secs_f64(),
        began.elapsed().as_secs_f64(),
        if state.is_plain_whole(&want) {
            "whole"
        } else {
            "NOT whole"
        },
        timeline.summary(),
        lost.len(),
        state.voters()
    );
    const PLAIN: &str = "plain: rolling reboot of 3 nodes with kubectl drain";
    bench::seconds(PLAIN, "first drain -> reboots done", rebooted);
    if state.is_plain_whole(&want) {
        bench::seconds(PLAIN, "first drain -> whole", began.elapsed());
    }
    bench::seconds(
        PLAIN,
        "longest without a leader",
        timeline.leaderless().longest,
    );
    let fewest = timeline
        .fewest_live_voters()
        .map_or(0, |s| s.live_voters().len());
    bench::record(PLAIN, "fewest live voters", "servers", fewest as f64);
    bench::record(PLAIN, "jobs missing 30 s after", "jobs", lost.len() as f64);
    dkron.delete().await;
}
