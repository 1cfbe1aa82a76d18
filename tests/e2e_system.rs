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
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams};
use serde_json::{Value, json};
use support::dkron::{Dkron, State, names, serial};

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
                .timeout(Duration::from_secs(10))
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

/// What the sampler saw over the whole run.
#[derive(Debug, Default)]
struct Samples {
    count: u32,
    leaderless: Duration,
    longest_leaderless: Duration,
    /// Fewest pods that were Ready raft voters at once.
    fewest_ready_voters: usize,
}

fn ready_voters(state: &State) -> usize {
    state
        .pods
        .values()
        .filter(|p| p.ready == Some(true) && p.voter == Some(true))
        .count()
}

#[tokio::test]
async fn rebooting_every_node_through_fleetlock_keeps_quorum_and_loses_no_job() {
    let _one = serial().await;
    let (dkron, _) = Dkron::create("system", 3).await;
    let want = names(&dkron, 3);
    let state = dkron.until_whole(&want, Duration::from_secs(180)).await;
    let jobs: Vec<String> = (0..JOBS).map(|i| format!("job-{i}")).collect();
    for job in &jobs {
        dkron.post_job(&state.leader_ip(), job).await;
    }
    let zincati = Zincati::new(&dkron).await;
    let node_api: Api<Node> = Api::all(dkron.cluster.client().await);

    // The leader's node first, then the others.
    let placement = nodes_of(&dkron).await;
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

    let done = std::sync::atomic::AtomicBool::new(false);
    let sample = async {
        let mut samples = Samples {
            fewest_ready_voters: usize::MAX,
            ..Samples::default()
        };
        let mut since: Option<Instant> = None;
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            let state = dkron.state().await;
            samples.count += 1;
            samples.fewest_ready_voters = samples.fewest_ready_voters.min(ready_voters(&state));
            match (&state.leader, since) {
                (None, None) => since = Some(Instant::now()),
                (Some(_), Some(at)) => {
                    samples.leaderless += at.elapsed();
                    samples.longest_leaderless = samples.longest_leaderless.max(at.elapsed());
                    since = None;
                }
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        samples
    };
    let began = Instant::now();
    let reboot_all = async {
        for node in &order {
            let machine_id = node_api
                .get(node)
                .await
                .unwrap()
                .status
                .and_then(|s| s.node_info)
                .map(|i| i.machine_id)
                .unwrap();
            let id = app_specific_machine_id(&machine_id).unwrap();
            // Its Dkron servers before the drain (an evicted one comes back Pending, nodeless).
            let on_node: Vec<String> = nodes_of(&dkron)
                .await
                .into_iter()
                .filter(|(_, n)| n == node)
                .map(|(pod, _)| pod)
                .collect();
            let asked = Instant::now();
            let refusals = zincati
                .until_ok("pre-reboot", &id, Duration::from_secs(300))
                .await;
            // The slot is granted only once every Dkron server not on this node is back as a
            // Ready voter: its own server is gone (evicted), the others are whole.
            let state = dkron.state().await;
            for (pod, view) in &state.pods {
                if !on_node.contains(pod) {
                    assert!(
                        view.ready == Some(true) && view.voter == Some(true),
                        "{node} was let go while {pod} is not a Ready voter: {}",
                        state.summary()
                    );
                }
            }
            eprintln!(
                "{node}: pre-reboot granted and drained after {:.1}s (refusals on the way: {refusals:?})",
                asked.elapsed().as_secs_f64()
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
    let (_, samples) = tokio::join!(
        async {
            let state = reboot_all.await;
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            state
        },
        sample
    );
    eprintln!(
        "rolling reboot of {} nodes through FleetLock: {:.1}s in all; without a leader {:.1}s (longest {:.1}s); at least {} Ready voters at any time ({} samples)",
        order.len(),
        began.elapsed().as_secs_f64(),
        samples.leaderless.as_secs_f64(),
        samples.longest_leaderless.as_secs_f64(),
        samples.fewest_ready_voters,
        samples.count
    );
    assert!(
        samples.fewest_ready_voters >= 2,
        "fewer than a majority of Ready voters at some time: {samples:?}"
    );

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
}
