//! Dkron servers in pods on the test bed's real nodes (tests/support/cluster.rs), injected by
//! the chart's webhook, with the chart's controller running: the Dkron stand-in
//! (tests/tools/dkron-standin) by default, a real Dkron server binary when `DKRON_BIN` names a
//! static one. The same assertions either way. Needs root (CI runs as root).
//!
//! Each test has its own namespace and StatefulSet name (the SIGSTOP of the scale-down test
//! finds its processes by `--node-name`); two scenarios run at a time (support's
//! `scenario`); `DKRON_HA_E2E_SCENARIOS=1` runs them one at a time, for the measurements.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use support::bench;
use support::dkron::{
    DKRON_IMAGE, Dkron, freeze, label_updater_pids, label_updater_rss, names, processes, scenario,
    signal, thaw,
};

#[tokio::test]
async fn a_cold_start_elects_one_leader_every_server_a_voter_and_only_the_leader_labelled() {
    let _slot = scenario().await;
    // Under the restricted Pod Security Standard: everything injected complies (as does the
    // chart's own Deployment, installed into a restricted namespace by the test bed).
    let (dkron, created) = Dkron::create_restricted("cold", 3).await;
    let privileged: Pod = serde_json::from_value(json!({
        "metadata": { "name": "privileged" },
        "spec": { "containers": [{ "name": "c", "image": DKRON_IMAGE,
                                   "securityContext": { "privileged": true } }] },
    }))
    .unwrap();
    match dkron.pods.create(&PostParams::default(), &privileged).await {
        Err(kube::Error::Api(status)) if status.code == 403 => {
            assert!(status.message.contains("restricted"), "{}", status.message)
        }
        other => panic!("a privileged pod in the restricted namespace: {other:?}"),
    }
    let want = names(&dkron, 3);
    let state = dkron.until_whole(&want, Duration::from_secs(180)).await;
    eprintln!(
        "cold start of 3: whole (one leader, 3 voters, every pod Ready and labelled) {:.1}s after the StatefulSet was created",
        created.elapsed().as_secs_f64()
    );
    bench::seconds("cold start of 3", "created -> whole", created.elapsed());
    for pod in &want {
        let line = dkron.started_with(pod).await;
        assert!(line.contains("--bootstrap-expect=3"), "{pod}: {line}");
        assert!(!line.contains("--bootstrap-expect=7"), "{pod}: {line}");
    }
    // The leader Service's endpoints are the leader's pod only.
    let leader_ip = state.leader_ip();
    support::eventually("the leader Service selects the leader only", async || {
        (dkron.leader_endpoints().await == [leader_ip.clone()]).then_some(())
    })
    .await;
    // A healthy cluster loses nobody over several rounds of the raft loop (5 s each).
    tokio::time::sleep(Duration::from_secs(16)).await;
    for (pod, rss) in label_updater_rss(&want) {
        eprintln!("label-updater of {pod}: {rss} KiB RSS after its cluster formed");
    }
    for pid in support::dkron::serve_pids() {
        let rss = support::dkron::rss_kib(pid).unwrap_or_default();
        eprintln!("dkron-ha serve (pid {pid}, the chart's pods): {rss} KiB RSS");
    }
    assert_eq!(dkron.removal_events().await, Vec::<String>::new());
    let again = dkron.state().await;
    assert_eq!(again.voters(), want);
    assert_eq!(
        again.leader, state.leader,
        "the leader changed in a quiet cluster"
    );
}

#[tokio::test]
async fn a_follower_then_the_leader_restarted_with_a_new_ip_come_back_as_voters_with_their_jobs() {
    let _slot = scenario().await;
    let (dkron, _) = Dkron::create("restart", 3).await;
    let want = names(&dkron, 3);
    let state = dkron.until_whole(&want, Duration::from_secs(180)).await;
    dkron.post_job(&state.leader_ip(), "before").await;
    for pod in &want {
        dkron
            .until_job_on(&state.ip(pod), "before", Duration::from_secs(30))
            .await;
    }

    // A follower, gracefully (the pod's grace period), then the leader, then a follower by
    // SIGKILL (grace 0).
    let leader = state.leader.clone().unwrap();
    let follower = state.a_follower();
    let mut current = state;
    for (pod, grace, how) in [
        (follower.clone(), None, "graceful restart of a follower"),
        (leader.clone(), None, "graceful restart of the leader"),
        (follower.clone(), Some(0), "SIGKILL of a follower"),
    ] {
        let deleted = Instant::now();
        let others: Vec<(String, String)> = current
            .pods
            .keys()
            .filter(|name| **name != pod)
            .map(|name| (name.clone(), current.ip(name)))
            .collect();
        let measure_leader_change = async {
            if pod == leader {
                let (elected, labelled) = dkron.leader_change(&others).await;
                eprintln!(
                    "leader change: a new leader {elected:.1}s after the delete, labelled and the only {}-leader endpoint {:.2}s after that",
                    dkron.name,
                    labelled - elected
                );
                bench::record("leader restart", "delete -> elected", "s", elected);
                bench::record(
                    "leader restart",
                    "elected -> labelled",
                    "s",
                    labelled - elected,
                );
            }
        };
        let ((old_ip, new_ip), ()) =
            tokio::join!(dkron.replace_pod(&pod, grace), measure_leader_change);
        assert_ne!(old_ip, new_ip, "{how}: {pod} came back with its old IP");
        let whole = dkron.until_whole(&want, Duration::from_secs(180)).await;
        current = dkron.state().await;
        eprintln!(
            "{how}: {pod} back with a new IP ({old_ip} -> {new_ip}), cluster whole {:.1}s after the delete",
            deleted.elapsed().as_secs_f64()
        );
        bench::seconds(how, "delete -> whole", deleted.elapsed());
        let line = dkron.started_with(&pod).await;
        if line.contains("--bootstrap-expect") {
            dkron.fail(format!("{how}: {pod}: {line}")).await;
        }
        // Jobs from before are there as soon as its pod is a voter (the readiness gate means
        // the leader's raft reaches it), and a job created now reaches it.
        dkron
            .until_job_on(&new_ip, "before", Duration::from_secs(5))
            .await;
        let job = format!("after-{}", whole.pods[&pod].uid);
        dkron.post_job(&whole.leader_ip(), &job).await;
        dkron
            .until_job_on(&new_ip, &job, Duration::from_secs(30))
            .await;
        let leader_ip = whole.leader_ip();
        support::eventually("the leader Service follows the leader", async || {
            (dkron.leader_endpoints().await == [leader_ip.clone()]).then_some(())
        })
        .await;
    }
    assert_eq!(
        dkron.removal_events().await,
        Vec::<String>::new(),
        "a restarting server was removed"
    );
}

#[tokio::test]
async fn a_scale_down_removes_exactly_the_servers_that_are_gone_with_or_without_a_leave() {
    let _slot = scenario().await;
    // Kubernetes' default made explicit: the claims of servers scaled away stay.
    let (dkron, _) = Dkron::create_annotated("scale", 5, "dkron-ha/pvc-retention", "Retain").await;
    let five = names(&dkron, 5);
    dkron.until_whole(&five, Duration::from_secs(180)).await;
    let kept = claims(&dkron).await;
    // Gracefully: ordinal 4 gets the kubelet's SIGTERM, leaves serf and ends.
    dkron.scale(4).await;
    let scaled = Instant::now();
    let four = names(&dkron, 4);
    dkron.until_whole(&four, Duration::from_secs(180)).await;
    eprintln!(
        "scale 5 -> 4 with a leave: 4 voters {:.1}s after the scale-down",
        scaled.elapsed().as_secs_f64()
    );
    bench::seconds(
        "scale 5 -> 4 with a leave",
        "scale -> voters",
        scaled.elapsed(),
    );
    // Without a leave: ordinal 3 hangs (no leave, no answer), so its raft-voter condition
    // goes False while its pod still exists; then the StatefulSet scales to 3: the kubelet's
    // SIGTERM reaches nobody, its SIGKILL ends it after the grace period.
    let frozen = dkron.pod_name(3);
    freeze(&frozen);
    support::eventually(
        "a stopped server's raft-voter condition goes False",
        async || {
            let state = dkron.state().await;
            (state.pods[&frozen].voter == Some(false)).then_some(())
        },
    )
    .await;
    assert_eq!(
        dkron
            .removal_events()
            .await
            .iter()
            .filter(|e| e.contains(&frozen))
            .count(),
        0,
        "a server whose pod exists was removed"
    );
    dkron.scale(3).await;
    let scaled = Instant::now();
    let three = names(&dkron, 3);
    let state = dkron.until_whole(&three, Duration::from_secs(180)).await;
    eprintln!(
        "scale 4 -> 3 without a leave: 3 voters {:.1}s after the scale-down",
        scaled.elapsed().as_secs_f64()
    );
    bench::seconds(
        "scale 4 -> 3 without a leave",
        "scale -> voters",
        scaled.elapsed(),
    );
    assert_eq!(state.voters(), three);
    // The hung server is removed once by dkron-ha (2 serve replicas, one loop); the one that
    // left at most once (Dkron's own reconcile may remove a left server first); nobody else.
    let events = dkron.removal_events().await;
    let about = |pod: &str| events.iter().filter(|e| e.contains(pod)).count();
    assert_eq!(about("scale-3"), 1, "{events:?}");
    assert!(about("scale-4") <= 1, "{events:?}");
    assert_eq!(
        about("scale-3") + about("scale-4"),
        events.len(),
        "{events:?}"
    );

    // Back to 5: the two come back with their old claims (Retain), their stale raft logs
    // and all, and are voters again at their new addresses; nothing else is removed.
    dkron.scale(5).await;
    let scaled = Instant::now();
    dkron.until_whole(&five, Duration::from_secs(300)).await;
    dkron.until_plain(&five, Duration::from_secs(120)).await;
    eprintln!(
        "scale 3 -> 5 with retained claims: 5 voters at current IPs {:.1}s after the scale-up",
        scaled.elapsed().as_secs_f64()
    );
    bench::seconds(
        "scale 3 -> 5 with retained claims",
        "scale -> voters",
        scaled.elapsed(),
    );
    assert_eq!(claims(&dkron).await, kept, "Retain kept every claim");
    assert_eq!(dkron.removal_events().await, events);
}

/// The data claims of a Dkron StatefulSet: name -> uid.
async fn claims(dkron: &Dkron) -> std::collections::BTreeMap<String, String> {
    Api::<PersistentVolumeClaim>::namespaced(dkron.cluster.client().await, &dkron.ns)
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|claim| claim.metadata.deletion_timestamp.is_none())
        .map(|claim| (claim.metadata.name.unwrap(), claim.metadata.uid.unwrap()))
        .collect()
}

/// `dkron-ha/pvc-retention: Delete`: the servers scaled away lose their claims with their
/// pods, so a scale back up brings them back empty, never as strangers with a stale raft log;
/// the cluster ends with 5 voters at their pods' current IPs.
#[tokio::test]
async fn with_pvc_retention_delete_a_scale_5_3_5_brings_the_servers_back_empty() {
    let _slot = scenario().await;
    let (dkron, _) = Dkron::create_annotated("pvcdel", 5, "dkron-ha/pvc-retention", "Delete").await;
    let five = names(&dkron, 5);
    let state = dkron.until_whole(&five, Duration::from_secs(180)).await;
    dkron.post_job(&state.leader_ip(), "kept").await;
    let before = claims(&dkron).await;
    assert_eq!(before.len(), 5, "{before:?}");
    dkron.scale(3).await;
    dkron
        .until_whole(&names(&dkron, 3), Duration::from_secs(180))
        .await;
    let gone = [dkron.pod_name(3), dkron.pod_name(4)].map(|pod| format!("data-{pod}"));
    support::eventually(
        "the claims of the servers scaled away are deleted",
        async || {
            let now = claims(&dkron).await;
            gone.iter()
                .all(|claim| !now.contains_key(claim))
                .then_some(())
        },
    )
    .await;
    dkron.scale(5).await;
    let scaled = Instant::now();
    dkron.until_whole(&five, Duration::from_secs(300)).await;
    let state = dkron.until_plain(&five, Duration::from_secs(120)).await;
    eprintln!(
        "scale 3 -> 5 with deleted claims: 5 voters at current IPs {:.1}s after the scale-up",
        scaled.elapsed().as_secs_f64()
    );
    bench::seconds(
        "scale 3 -> 5 with deleted claims",
        "scale -> voters",
        scaled.elapsed(),
    );
    let after = claims(&dkron).await;
    for claim in &gone {
        assert_ne!(
            after.get(claim),
            before.get(claim),
            "{claim} is the old claim"
        );
        assert!(after.contains_key(claim), "{claim} missing: {after:?}");
    }
    // Empty, they caught up from the leader.
    for pod in [dkron.pod_name(3), dkron.pod_name(4)] {
        dkron
            .until_job_on(&state.ip(&pod), "kept", Duration::from_secs(30))
            .await;
    }
    let events = dkron.removal_events().await;
    assert!(
        events
            .iter()
            .all(|e| e.contains(&dkron.pod_name(3)) || e.contains(&dkron.pod_name(4))),
        "{events:?}"
    );
}

/// A server whose pod comes back without its data (its PVC deleted) is the same raft server:
/// it is kept and catches up. A raft server that is not one of the StatefulSet's pods (a Dkron
/// the user runs beside it) is never removed, even once it is gone for good.
#[tokio::test]
async fn a_server_back_without_its_data_is_kept_and_a_foreign_server_is_never_touched() {
    let _slot = scenario().await;
    let (dkron, _) = Dkron::create("keep", 3).await;
    let want = names(&dkron, 3);
    let state = dkron.until_whole(&want, Duration::from_secs(180)).await;
    dkron.post_job(&state.leader_ip(), "before").await;

    // Without its data: the claim goes with the pod, the StatefulSet makes a new, empty one.
    let follower = state.a_follower();
    let client = dkron.cluster.client().await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &dkron.ns);
    let claim = format!("data-{follower}");
    let old_claim = claims.get(&claim).await.unwrap().metadata.uid;
    claims
        .delete(&claim, &DeleteParams::default())
        .await
        .unwrap();
    let deleted = Instant::now();
    dkron.replace_pod(&follower, None).await;
    let state = dkron.until_whole(&want, Duration::from_secs(180)).await;
    let new_claim = claims.get(&claim).await.unwrap().metadata.uid;
    assert_ne!(old_claim, new_claim, "{follower} kept its claim");
    dkron
        .until_job_on(&state.ip(&follower), "before", Duration::from_secs(5))
        .await;
    eprintln!(
        "restart without its data: {follower} whole with its jobs {:.1}s after the delete",
        deleted.elapsed().as_secs_f64()
    );
    bench::seconds(
        "restart without its data",
        "delete -> whole",
        deleted.elapsed(),
    );

    // A foreign server joins the cluster, becomes a voter, and dies without a leave.
    let pods: Api<Pod> = Api::namespaced(client, &dkron.ns);
    let intruder: Pod = serde_json::from_value(json!({
        "metadata": { "name": "intruder" },
        "spec": { "containers": [{
            "name": "dkron", "image": DKRON_IMAGE, "imagePullPolicy": "Never",
            "args": ["agent", "--server", "--data-dir=/tmp/dkron", "--node-name=intruder",
                     "--retry-join=keep-0.keep", "--retry-interval=1s"],
        }] },
    }))
    .unwrap();
    pods.create(&PostParams::default(), &intruder)
        .await
        .unwrap();
    let joined = Instant::now();
    let deadline = joined + Duration::from_secs(150);
    loop {
        let state = dkron.state().await;
        let voters = state.voters();
        if voters.contains(&"intruder".to_owned()) {
            break;
        }
        if Instant::now() > deadline {
            dkron
                .fail(format!("intruder no voter after 150s: {voters:?}"))
                .await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "a foreign server became a voter {:.1}s after its pod was created",
        joined.elapsed().as_secs_f64()
    );
    pods.delete(
        "intruder",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // Several rounds of the raft loop (5 s each) after it is gone for good.
    support::eventually("the intruder's pod is gone", async || {
        pods.get_opt("intruder")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    let state = dkron.state().await;
    assert!(
        state.voters().contains(&"intruder".to_owned()),
        "the foreign server was removed: {}",
        state.summary()
    );
    assert_eq!(dkron.removal_events().await, Vec::<String>::new());
}

/// A staggered cold start (the pods appear one by one, as with slow image pulls or a busy
/// scheduler): every server keeps `--bootstrap-expect`, none takes a still-joining server for a
/// leader, and a pod whose peers' names do not resolve yet waits a bounded, logged time.
#[tokio::test]
async fn a_staggered_cold_start_bootstraps_every_server_and_waits_boundedly_for_unresolved_peers() {
    let _slot = scenario().await;
    let (dkron, created) = Dkron::create_with("stagger", 1, |sts| {
        sts["metadata"]["annotations"]["dkron-ha/initial-cluster-size"] = json!("3");
    })
    .await;
    let first = dkron.pod_name(0);
    let line = dkron
        .until_logged(
            &first,
            &["some peers do not", "proceeding"],
            Duration::from_secs(90),
        )
        .await;
    eprintln!(
        "{first} alone stopped waiting for its peers' names {:.1}s after the StatefulSet was created: {line}",
        created.elapsed().as_secs_f64()
    );
    dkron.scale(2).await;
    dkron
        .until_logged(
            &dkron.pod_name(1),
            &["waiting for DNS names"],
            Duration::from_secs(90),
        )
        .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    dkron.scale(3).await;
    let want = names(&dkron, 3);
    dkron.until_whole(&want, Duration::from_secs(240)).await;
    eprintln!(
        "staggered cold start of 3: whole {:.1}s after the StatefulSet was created",
        created.elapsed().as_secs_f64()
    );
    bench::seconds(
        "staggered cold start of 3",
        "created -> whole",
        created.elapsed(),
    );
    for pod in &want {
        let line = dkron.started_with(pod).await;
        if !line.contains("--bootstrap-expect=3") || line.contains("--bootstrap-expect=7") {
            dkron.fail(format!("{pod}: {line}")).await;
        }
    }
}

/// A cold start in which no server ever bootstraps (provoked by the stand-in's fault injection;
/// real Dkron cannot be made to miss its bootstrap on demand) is found by the wrapper of the
/// server that bootstraps (ordinal 0), which restarts its Dkron: the cluster forms without a
/// person, and no container restarts.
#[tokio::test]
async fn a_cold_start_that_forms_no_leader_is_recovered_by_restarting_the_first_servers_dkron() {
    if std::env::var_os("DKRON_BIN").is_some() {
        eprintln!(
            "skipped with DKRON_BIN: the stand-in's fault injection provokes the leaderless cold start"
        );
        return;
    }
    let _slot = scenario().await;
    let (dkron, created) = Dkron::create_with("noleader", 3, |sts| {
        sts["spec"]["template"]["spec"]["containers"][0]["env"] =
            json!([{ "name": "DKRON_STANDIN_FAULT_NO_FIRST_BOOTSTRAP", "value": "1" }]);
    })
    .await;
    let want = names(&dkron, 3);
    dkron.until_whole(&want, Duration::from_secs(240)).await;
    eprintln!(
        "leaderless cold start: whole {:.1}s after the StatefulSet was created",
        created.elapsed().as_secs_f64()
    );
    let first = dkron.pod_name(0);
    let log = dkron.log(&first, "dkron", false).await;
    for needle in [
        "no leader and no raft configuration since this cold start began",
        "starting it again",
        "fault injection: not bootstrapping",
    ] {
        if !log.contains(needle) {
            dkron.fail(format!("{first}: no {needle:?}")).await;
        }
    }
    for pod in &want {
        assert_eq!(dkron.container_status(pod, "dkron").await.0, 0, "{pod}");
        if *pod != first
            && dkron
                .log(pod, "dkron", false)
                .await
                .contains("cold start began")
        {
            dkron
                .fail(format!("{pod} restarted its Dkron: only {first} may"))
                .await;
        }
    }
}

/// A Dkron whose serf shut down (what a join that loses serf's name conflict to its own earlier
/// pod does: Dkron logs "Serf shutdown detected, quitting" and runs on outside the cluster for
/// good; provoked on one restart by the stand-in's fault injection, as real Dkron cannot be made
/// to lose the conflict on demand) is found by `wrap`, whose look at the gossip port is refused
/// while the HTTP API answers, and restarted in place: the server is a voter with its jobs
/// again, and the container never restarts.
#[tokio::test]
async fn a_dkron_whose_serf_shut_down_is_restarted_in_place_and_rejoins() {
    if std::env::var_os("DKRON_BIN").is_some() {
        eprintln!("skipped with DKRON_BIN: the stand-in's fault injection shuts the serf down");
        return;
    }
    let _slot = scenario().await;
    let (dkron, _) = Dkron::create_with("serfdown", 3, |sts| {
        sts["spec"]["template"]["spec"]["containers"][0]["env"] =
            json!([{ "name": "DKRON_STANDIN_FAULT_SERF_SHUTDOWN", "value": "1" }]);
    })
    .await;
    let want = names(&dkron, 3);
    let state = dkron.until_whole(&want, Duration::from_secs(180)).await;
    dkron.post_job(&state.leader_ip(), "before").await;
    // A follower restarts with its data: the fault fires on that run only.
    let pod = state.a_follower();
    let deleted = Instant::now();
    dkron.replace_pod(&pod, None).await;
    let whole = dkron.until_whole(&want, Duration::from_secs(240)).await;
    eprintln!(
        "a Dkron whose serf shut down: whole {:.1}s after its pod was deleted",
        deleted.elapsed().as_secs_f64()
    );
    for needle in [
        "fault injection (DKRON_STANDIN_FAULT_SERF_SHUTDOWN=1)",
        "Serf shutdown detected",
        "the local Dkron's serf has shut down",
        "starting it again",
    ] {
        let line = dkron
            .until_logged(&pod, &[needle], Duration::from_secs(10))
            .await;
        // The timestamps show how soon the watch saw the shutdown (BENCHMARKS).
        eprintln!("{pod}: {line}");
    }
    assert_eq!(dkron.container_status(&pod, "dkron").await.0, 0, "{pod}");
    dkron
        .until_job_on(&whole.ip(&pod), "before", Duration::from_secs(10))
        .await;
    assert_eq!(dkron.removal_events().await, Vec::<String>::new());
}

/// SIGTERM to the container's PID 1 reaches Dkron after a leave, and Dkron's exit status is the
/// container's; the label-updater's SIGTERM sets the label `false`; a stopped server's
/// raft-voter condition goes False and comes back True only once it answers again.
#[tokio::test]
async fn signals_reach_dkron_exit_statuses_come_back_and_the_label_updater_demotes_on_sigterm() {
    let _slot = scenario().await;
    let (dkron, _) = Dkron::create("signals", 3).await;
    let want = names(&dkron, 3);
    let state = dkron.until_whole(&want, Duration::from_secs(180)).await;
    let follower = state.a_follower();

    // SIGTERM to the wrapper, as the kubelet sends it: a leave, then SIGTERM to Dkron.
    let (wrapper, _) = processes(&follower);
    signal("TERM", &wrapper);
    let code = dkron.until_restarted(&follower, "dkron", 1).await;
    let exited = format!("child exited code={code} ");
    dkron
        .until_previous_logged(
            &follower,
            "dkron",
            &[
                "Dkron left the cluster",
                "forwarding signal to child signal=SIGTERM",
                &exited,
            ],
        )
        .await;
    eprintln!("SIGTERM to the wrapper: Dkron left, ended with {code}, the container's exit code");
    dkron.until_whole(&want, Duration::from_secs(180)).await;

    // SIGKILL to Dkron itself: the wrapper ends with 128 + 9.
    let (_, dkron_pid) = processes(&follower);
    signal("KILL", &dkron_pid);
    assert_eq!(dkron.until_restarted(&follower, "dkron", 2).await, 137);
    dkron
        .until_previous_logged(&follower, "dkron", &["child exited code=137 "])
        .await;
    dkron.until_whole(&want, Duration::from_secs(180)).await;

    // A stopped server: its condition goes False, and True again once it is back.
    freeze(&follower);
    support::eventually(
        "a stopped server's raft-voter condition goes False",
        async || (dkron.state().await.pods[&follower].voter == Some(false)).then_some(()),
    )
    .await;
    thaw(&follower);
    dkron.until_whole(&want, Duration::from_secs(180)).await;

    // SIGTERM to the leader's label-updater: `false` before it exits, `true` again after
    // the kubelet restarts it.
    let state = dkron.state().await;
    let leader = state.leader.clone().unwrap();
    let updater = label_updater_pids(std::slice::from_ref(&leader));
    assert_eq!(updater.len(), 1, "{updater:?}");
    let watch_labels = async {
        let mut labels = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline && labels.len() < 3 {
            let label = dkron.leader_label(&leader).await;
            if labels.last() != Some(&label) {
                labels.push(label);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        labels
    };
    let terminate = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        signal("TERM", &updater[0].1.to_string());
        dkron
            .until_restarted(&leader, "dkron-ha-label-updater", 1)
            .await
    };
    let (labels, code) = tokio::join!(watch_labels, terminate);
    assert_eq!(code, 0, "the label-updater's exit code after SIGTERM");
    let t = Some("true".to_owned());
    let f = Some("false".to_owned());
    assert_eq!(
        labels,
        [t.clone(), f, t],
        "the leader's label over the SIGTERM"
    );
    dkron
        .until_previous_logged(
            &leader,
            "dkron-ha-label-updater",
            &["stopping: setting the leader label to false"],
        )
        .await;
    assert_eq!(
        dkron.removal_events().await,
        Vec::<String>::new(),
        "a live server was removed"
    );
}

#[tokio::test]
async fn a_rolling_restart_waits_for_each_server_and_loses_the_leader_for_one_election_at_most() {
    let _slot = scenario().await;
    let (dkron, _) = Dkron::create("roll", 3).await;
    let want = names(&dkron, 3);
    let election = dkron
        .election(async || dkron.until_whole(&want, Duration::from_secs(180)).await)
        .await;
    // A template change: the StatefulSet replaces the pods one at a time, each only once the
    // one before is Ready, which the raft-voter gate holds back until it is back in raft.
    let rolled = dkron
        .rolling_restart(Duration::from_secs(400), |state| state.is_whole(&want))
        .await;
    if !rolled.done {
        dkron
            .fail(format!(
                "rolling restart not done after 400s: {}",
                rolled.state.summary()
            ))
            .await;
    }
    eprintln!(
        "rolling restart of 3: done {:.1}s after the template change; an election on its own {:.1}s; {}",
        rolled.elapsed.as_secs_f64(),
        election.as_secs_f64(),
        rolled.timeline.summary()
    );
    bench::seconds("rolling restart of 3", "change -> whole", rolled.elapsed);
    bench::seconds("rolling restart of 3", "an election on its own", election);
    let gaps = rolled.timeline.leaderless();
    bench::seconds(
        "rolling restart of 3",
        "longest without a leader",
        gaps.longest,
    );
    bench::seconds(
        "rolling restart of 3",
        "without a leader in all",
        gaps.total,
    );
    // The guarantee: a majority of live voters in every sample, the leader lost for one
    // election at most (the leader pod goes once), dkron-ha's condition and label in step.
    rolled
        .timeline
        .assert_no_outage("rolling restart", want.len(), election);
    assert_eq!(
        dkron.removal_events().await,
        Vec::<String>::new(),
        "a restarting server was removed"
    );
}

/// Plain Dkron as users run it without dkron-ha (not opted in: no `wrap`, no gate, no label),
/// the community chart's way: `--bootstrap-expect=3`, `--retry-join` to every server's stable
/// name, a readiness probe on `/health`, on the same nodes and volumes. The baseline of
/// BENCHMARKS.md, measured in the same run as the scenarios above
/// (`cargo test --test e2e_dkron -- --include-ignored --nocapture`); it prints, asserts only
/// that the cluster forms.
#[tokio::test]
#[ignore = "a measurement: run it by hand with --include-ignored"]
async fn plain_dkron_without_dkron_ha_baseline() {
    let _slot = scenario().await;
    let name = "plain";
    let (dkron, created) = Dkron::create_plain(name, 3).await;
    let want = names(&dkron, 3);
    let state = dkron.until_plain(&want, Duration::from_secs(300)).await;
    eprintln!(
        "plain Dkron: cold start of 3: a leader and 3 voters at the pods' IPs {:.1}s after the StatefulSet was created",
        created.elapsed().as_secs_f64()
    );
    bench::seconds(
        "plain: cold start of 3",
        "created -> whole",
        created.elapsed(),
    );
    dkron.post_job(&state.leader_ip(), "before").await;

    // A graceful restart of a follower with a new IP: until it knows the leader, has a job
    // created after its restart, and is a voter at its new IP.
    let follower = state.a_follower();
    let deleted = Instant::now();
    let (old_ip, new_ip) = dkron.replace_pod(&follower, None).await;
    assert_ne!(old_ip, new_ip);
    let knows = dkron
        .until_knows_leader(&new_ip, Duration::from_secs(300))
        .await;
    let state = dkron.until_plain(&want, Duration::from_secs(300)).await;
    let job = format!("after-{}", state.pods[&follower].uid);
    dkron.post_job(&state.leader_ip(), &job).await;
    dkron
        .until_job_on(&new_ip, &job, Duration::from_secs(120))
        .await;
    eprintln!(
        "plain Dkron: graceful follower restart with a new IP: knows the leader {knows:.1}s, a voter at its new IP and has a new job {:.1}s after the delete",
        deleted.elapsed().as_secs_f64()
    );
    bench::record(
        "plain: graceful restart of a follower",
        "delete -> knows the leader",
        "s",
        knows,
    );
    bench::seconds(
        "plain: graceful restart of a follower",
        "delete -> whole with a new job",
        deleted.elapsed(),
    );

    // A rolling restart (template change): total time and the longest time without a leader.
    let rolled = dkron
        .rolling_restart(Duration::from_secs(600), |state| {
            state.is_plain_whole(&want)
        })
        .await;
    if !rolled.done {
        eprintln!(
            "plain Dkron: rolling restart not whole after 600s: every pod replaced {}; raft configuration {:?}; {}",
            rolled.replaced,
            rolled.state.configuration,
            rolled.state.summary()
        );
    }
    eprintln!(
        "plain Dkron: rolling restart of 3: {} {:.1}s after the template change; without a leader {:.1}s in all, longest {:.1}s",
        if rolled.done { "whole" } else { "given up" },
        rolled.elapsed.as_secs_f64(),
        rolled.timeline.leaderless().total.as_secs_f64(),
        rolled.timeline.leaderless().longest.as_secs_f64()
    );
    if rolled.done {
        bench::seconds(
            "plain: rolling restart of 3",
            "change -> whole",
            rolled.elapsed,
        );
    }
    bench::seconds(
        "plain: rolling restart of 3",
        "longest without a leader",
        rolled.timeline.leaderless().longest,
    );
}

/// Runs `job` now (`POST /v1/jobs/<job>` on the leader), again every 10 s and after a failed
/// run, until the leader lists an execution newer than `seen` that succeeded on a worker;
/// returns its node and the count of executions.
async fn run_on_a_worker(dkron: &Dkron, job: &str, mut seen: usize) -> (String, usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut asked = None;
    let mut failed = Vec::new();
    loop {
        let state = dkron.state().await;
        if let Some(ip) = state.leader.as_ref().and_then(|l| state.pods[l].ip.clone()) {
            if asked.is_none_or(|at: Instant| at.elapsed() > Duration::from_secs(10)) {
                let response = dkron
                    .http
                    .post(format!("http://{ip}:8080/v1/jobs/{job}"))
                    .send()
                    .await;
                if response.is_ok_and(|r| r.status().is_success()) {
                    asked = Some(Instant::now());
                }
            }
            if let Some((200, body)) = dkron
                .http_get(&ip, &format!("/v1/jobs/{job}/executions"))
                .await
                && let Ok(executions) = serde_json::from_str::<Vec<serde_json::Value>>(&body)
                && executions.len() > seen
            {
                let newest = executions
                    .iter()
                    .max_by_key(|e| e["started_at"].as_str().unwrap_or_default().to_owned())
                    .unwrap();
                let node = newest["node_name"].as_str().unwrap_or_default().to_owned();
                if newest["success"] == true
                    && node.starts_with(&format!("{}-workers-", dkron.name))
                {
                    return (node, executions.len());
                }
                // Dkron dispatches to a member's rpc_addr tag, which a worker sets only after
                // its join: a run that came too early failed; ask again.
                failed.push(newest.to_string());
                seen = executions.len();
                asked = None;
            }
        }
        if Instant::now() > deadline {
            let workers = dkron
                .pods
                .list(
                    &kube::api::ListParams::default()
                        .labels(&format!("app={}-workers", dkron.name)),
                )
                .await
                .unwrap()
                .items;
            let mut logs = String::new();
            for pod in workers {
                let name = pod.metadata.name.unwrap_or_default();
                let log = (dkron.try_log(&name, "dkron", false).await)
                    .unwrap_or_else(|error| format!("(no log: {error})"));
                logs.push_str(&format!("\n--- {name}\n{log}"));
            }
            dkron
                .fail(format!(
                    "{job}: no successful run on a worker after 120s (asked: {asked:?}; failed runs: {failed:?}){logs}"
                ))
                .await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Dkron workers as a Deployment opted in with `dkron-ha/agent-of`: injected in agent mode (no
/// label-updater, gate or RBAC of their own), they join the 3 servers by the headless Service's
/// name and run a job; after every server pod was deleted at once (new IPs; no server
/// remembers the workers, which Dkron never looks up by name again, issue #1253) `wrap` restarts
/// each worker's Dkron in place once the servers have answered without it for 30 s, and the job
/// runs on a worker again.
#[tokio::test]
async fn workers_run_jobs_and_find_the_servers_again_after_all_of_them_restarted() {
    let _slot = scenario().await;
    let (dkron, _) = Dkron::create("agents", 3).await;
    let want = names(&dkron, 3);
    dkron.until_whole(&want, Duration::from_secs(180)).await;
    let workers: k8s_openapi::api::apps::v1::Deployment = serde_json::from_value(json!({
        "metadata": { "name": "agents-workers", "annotations": { "dkron-ha/agent-of": "agents" } },
        "spec": {
            "replicas": 2,
            "selector": { "matchLabels": { "app": "agents-workers" } },
            "template": {
                "metadata": { "labels": { "app": "agents-workers" } },
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{
                        "name": "dkron", "image": DKRON_IMAGE, "imagePullPolicy": "Never",
                        "args": ["agent", "--tag", "pool=workers", "--log-level=info"],
                    }],
                },
            },
        },
    }))
    .unwrap();
    let client = dkron.cluster.client().await;
    let deployments =
        Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(client.clone(), &dkron.ns);
    // A name that cannot be a StatefulSet's is denied, saying what to write.
    let mut bad = workers.clone();
    bad.metadata.name = Some("bad-workers".into());
    bad.metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert("dkron-ha/agent-of".into(), "Agents_Servers".into());
    match deployments.create(&PostParams::default(), &bad).await {
        Err(kube::Error::Api(status)) => assert!(
            status.message.contains("dkron-ha/agent-of")
                && status
                    .message
                    .contains("set it to the name of the Dkron server StatefulSet"),
            "{}",
            status.message
        ),
        other => panic!("a bad dkron-ha/agent-of was admitted: {other:?}"),
    }
    deployments
        .create(&PostParams::default(), &workers)
        .await
        .unwrap();
    let job = json!({
        "name": "on-a-worker", "schedule": "@manually", "executor": "shell",
        "executor_config": { "command": "/usr/local/bin/dkron version" },
        "tags": { "pool": "workers:1" },
    });
    let state = dkron.state().await;
    let response = dkron
        .http
        .post(format!("http://{}:8080/v1/jobs", state.leader_ip()))
        .json(&job)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{response:?}");
    let (first, seen) = run_on_a_worker(&dkron, "on-a-worker", 0).await;
    eprintln!("workers joined: on-a-worker ran on {first}");
    let pods = Api::<Pod>::namespaced(client.clone(), &dkron.ns)
        .list(&kube::api::ListParams::default().labels("app=agents-workers"))
        .await
        .unwrap()
        .items;
    let pod = &pods[0];
    let containers = &pod.spec.as_ref().unwrap().containers;
    assert_eq!(containers.len(), 1, "a worker gets no label-updater");
    assert!(pod.spec.as_ref().unwrap().readiness_gates.is_none());
    let roles = Api::<k8s_openapi::api::rbac::v1::Role>::namespaced(client.clone(), &dkron.ns)
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|r| r.metadata.name)
        .collect::<Vec<_>>();
    assert_eq!(roles, ["agents-dkron-ha"], "workers need no RBAC");

    // Every server at once.
    let before = dkron.until_whole(&want, Duration::from_secs(60)).await;
    let old_ips: BTreeSet<String> = want.iter().map(|p| before.ip(p)).collect();
    let restarted = Instant::now();
    for server in &want {
        dkron
            .pods
            .delete(server, &DeleteParams::default())
            .await
            .unwrap();
    }
    let whole = dkron.until_whole(&want, Duration::from_secs(300)).await;
    let (again, _) = run_on_a_worker(&dkron, "on-a-worker", seen).await;
    eprintln!(
        "every server restarted at once: on-a-worker ran on {again} {:.1}s later",
        restarted.elapsed().as_secs_f64()
    );
    // Each worker is back in the servers' gossip (the leader's `/v1/members` has it alive at
    // its pod's IP), and its container never restarted. No server remembers a worker (Dkron
    // keeps no serf snapshot), and a worker's serf retries only the servers' old addresses: so
    // unless a server came back at an old IP, only `wrap`'s restart of Dkron in place brings a
    // worker back, and its log says so.
    let reused: Vec<String> = want
        .iter()
        .map(|p| whole.ip(p))
        .filter(|ip| old_ips.contains(ip))
        .collect();
    let pods = Api::<Pod>::namespaced(client, &dkron.ns)
        .list(&kube::api::ListParams::default().labels("app=agents-workers"))
        .await
        .unwrap()
        .items;
    for pod in pods {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap();
        let restarts = pod.status.unwrap().container_statuses.unwrap()[0].restart_count;
        assert_eq!(restarts, 0, "{name}");
        support::eventually(
            &format!("{name} is alive in the servers' gossip"),
            async || {
                (dkron.state().await.members.get(&name) == Some(&(ip.clone(), 1))).then_some(())
            },
        )
        .await;
        let rejoined = dkron
            .log(&name, "dkron", false)
            .await
            .matches("joins them again by name")
            .count();
        eprintln!(
            "{name}: Dkron restarted in place by wrap {rejoined} time(s) to find the servers (servers back at an old IP: {reused:?})"
        );
        if reused.is_empty() {
            assert!(
                rejoined >= 1,
                "{name} is back without wrap's restart in place, and no server came back at an old IP: what brought it back?"
            );
        }
    }
}

/// Opting in a running plain Dkron cluster, shaped as the community chart deploys it
/// (`--bootstrap-expect=3`, `--retry-join` to every server's stable name, a readiness probe on
/// `/health`), the first thing every user does: `kubectl annotate statefulset <name>
/// dkron-ha/enabled=true`. The webhook injects the template and the StatefulSet replaces the
/// plain pods one at a time, highest ordinal first. A plain Dkron stops without a leave that
/// gets out, so its replacement may join while the others still hold its name alive at the old
/// address; on today's main before `wrap` waited for that, the new member lost serf's name
/// conflict, shut its gossip down and never became a voter again (real Dkron v4.1.2 and the
/// stand-in, which runs Dkron's serf). Judged from Dkron: one leader whose raft configuration
/// has exactly the three pods as voters at their current IPs, every server naming that leader
/// and holding every job.
///
/// With `opt_out`, the annotation is then removed again: the webhook takes the injection back
/// out and the pods roll back to plain Dkron, judged the same way.
/// Returns the opt-in's rollout as observed.
async fn opt_in_a_running_plain_cluster(
    name: &str,
    replicas: i32,
    policy: &str,
    opt_out: bool,
) -> support::dkron::Rolled {
    let (dkron, _) = Dkron::create_plain_with(name, replicas, policy).await;
    let want = names(&dkron, replicas as usize);
    let state = dkron.until_plain(&want, Duration::from_secs(300)).await;
    let jobs = ["before-1", "before-2"];
    for job in jobs {
        dkron.post_job(&state.leader_ip(), job).await;
    }
    for pod in &want {
        for job in jobs {
            dkron
                .until_job_on(&state.ip(pod), job, Duration::from_secs(60))
                .await;
        }
    }
    let patch = json!({ "metadata": { "annotations": { "dkron-ha/enabled": "true" } } });
    let rolled = dkron
        .rollout(patch, Duration::from_secs(480), |state| {
            state.is_plain_whole(&want) && state.pods.values().all(|p| p.ready == Some(true))
        })
        .await;
    if !rolled.done {
        dkron
            .fail(format!(
                "{policy}: the opt-in rollout is not whole after 480s (every pod replaced: {}): raft configuration {:?}; {}",
                rolled.replaced,
                rolled.state.configuration,
                rolled.state.summary()
            ))
            .await;
    }
    eprintln!(
        "{policy}: opt-in of a running plain cluster of {replicas} (leader before: {:?}): whole {:.1}s after the annotation; without a leader {:.1}s in all, longest {:.1}s",
        state.leader,
        rolled.elapsed.as_secs_f64(),
        rolled.timeline.leaderless().total.as_secs_f64(),
        rolled.timeline.leaderless().longest.as_secs_f64()
    );
    let scenario = format!("opt-in of a running plain cluster of {replicas}, {policy}");
    bench::seconds(&scenario, "annotation -> whole", rolled.elapsed);
    bench::seconds(
        &scenario,
        "longest without a leader",
        rolled.timeline.leaderless().longest,
    );
    let whole = &rolled.state;
    let leader_rpc = format!("{}:6868", whole.leader_ip());
    for pod in &want {
        let ip = whole.ip(pod);
        let (_, body) = dkron.http_get(&ip, "/v1/leader").await.unwrap_or_default();
        if !body.contains(&leader_rpc) {
            dkron
                .fail(format!(
                    "{pod} does not name the leader {leader_rpc}: {body}"
                ))
                .await;
        }
        for job in jobs {
            dkron.until_job_on(&ip, job, Duration::from_secs(10)).await;
        }
        // How long `wrap` waited for the peers to see the old pod's address gone (BENCHMARKS).
        let log = dkron.log(pod, "dkron", false).await;
        let waited = log
            .lines()
            .find(|l| l.contains("no peer holds this server's name at another address"))
            .and_then(|l| l.split("waited_ms=").nth(1))
            .unwrap_or("0 (no wait)");
        eprintln!("{pod}: the name wait took {waited} ms");
        // No Dkron crashed on its way in (a join that loses the name conflict before Dkron
        // sets its tags fails its start: "Error setting tags", exit 1).
        assert_eq!(dkron.container_status(pod, "dkron").await.0, 0, "{pod}");
        // Every pod runs under wrap now.
        assert!(
            dkron.started_with(pod).await.contains("--retry-join"),
            "{pod}"
        );
    }
    // dkron-ha's own view (conditions, label) agrees with Dkron's.
    dkron.until_whole(&want, Duration::from_secs(30)).await;
    assert_eq!(
        dkron.removal_events().await,
        Vec::<String>::new(),
        "a server was removed during the opt-in"
    );
    if !opt_out {
        return rolled;
    }
    let patch = json!({ "metadata": { "annotations": { "dkron-ha/enabled": null } } });
    let out = dkron
        .rollout(patch, Duration::from_secs(480), |state| {
            state.is_plain_whole(&want) && state.pods.values().all(|p| p.ready == Some(true))
        })
        .await;
    if !out.done {
        dkron
            .fail(format!(
                "the opt-out rollout is not whole after 480s (every pod replaced: {}): raft configuration {:?}; {}",
                out.replaced,
                out.state.configuration,
                out.state.summary()
            ))
            .await;
    }
    eprintln!(
        "{policy}: opt-out of 3: whole {:.1}s after the annotation was removed; without a leader {:.1}s in all, longest {:.1}s",
        out.elapsed.as_secs_f64(),
        out.timeline.leaderless().total.as_secs_f64(),
        out.timeline.leaderless().longest.as_secs_f64()
    );
    let scenario = format!("opt-out of 3, {policy}");
    bench::seconds(&scenario, "annotation removed -> whole", out.elapsed);
    bench::seconds(
        &scenario,
        "longest without a leader",
        out.timeline.leaderless().longest,
    );
    for (pod, spec) in dkron
        .pods_by_name()
        .await
        .into_iter()
        .map(|(name, p)| (name, p.spec.unwrap()))
    {
        let init: Vec<String> = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| c.name.clone())
            .collect();
        let containers: Vec<String> = spec.containers.iter().map(|c| c.name.clone()).collect();
        assert_eq!(
            (init, containers),
            (vec![], vec!["dkron".to_owned()]),
            "{pod}"
        );
        assert!(spec.readiness_gates.is_none(), "{pod}");
        // The account dkron-ha defaulted goes with the rest (the controller deletes it).
        assert_eq!(
            spec.service_account_name.as_deref(),
            Some("default"),
            "{pod}"
        );
        for job in jobs {
            dkron
                .until_job_on(&out.state.ip(&pod), job, Duration::from_secs(30))
                .await;
        }
    }
    rolled
}

#[tokio::test]
async fn opting_in_a_running_plain_ordered_ready_cluster_makes_every_server_a_live_voter() {
    let _slot = scenario().await;
    opt_in_a_running_plain_cluster("optin-ordered", 3, "OrderedReady", false).await;
}

#[tokio::test]
async fn opting_in_and_out_of_a_running_plain_parallel_cluster_keeps_every_server_a_live_voter() {
    let _slot = scenario().await;
    opt_in_a_running_plain_cluster("optin-parallel", 3, "Parallel", true).await;
}

/// The opt-in rollout of a running plain cluster measured for BENCHMARKS.md: 3 and 5 servers,
/// OrderedReady and Parallel (`DKRON_HA_OPT_IN_SIZES`, default `3,5`), `DKRON_HA_OPT_IN_RUNS`
/// runs each (default 1: `make bench-dkron` repeats the whole suite), one after the other
/// (run it alone: `cargo test --test e2e_dkron opt_in_rollouts_measured -- --include-ignored
/// --nocapture`, with `DKRON_BIN` for real Dkron). Every run asserts what the opt-in tests assert
/// (so no job is lost: every job is on every server at the end); this prints the times.
#[tokio::test]
#[ignore = "a measurement: run it by hand with --include-ignored"]
async fn opt_in_rollouts_measured() {
    let _slot = scenario().await;
    let runs: usize = std::env::var("DKRON_HA_OPT_IN_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    // `DKRON_HA_OPT_IN_SIZES=5` measures only the clusters of 5.
    let sizes: Vec<i32> = std::env::var("DKRON_HA_OPT_IN_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![3, 5]);
    let mut table = Vec::new();
    for replicas in sizes {
        for (policy, short) in [("OrderedReady", "o"), ("Parallel", "p")] {
            for run in 1..=runs {
                let name = format!("m{replicas}{short}{run}");
                let rolled = opt_in_a_running_plain_cluster(&name, replicas, policy, false).await;
                table.push(format!(
                    "{replicas} {policy} run {run}: whole {:.1}s, without a leader {:.1}s in all, longest {:.1}s",
                    rolled.elapsed.as_secs_f64(),
                    rolled.timeline.leaderless().total.as_secs_f64(),
                    rolled.timeline.leaderless().longest.as_secs_f64()
                ));
            }
        }
    }
    eprintln!(
        "opt-in rollouts ({}):\n{}",
        support::dkron::dkron_binary().1,
        table.join("\n")
    );
}
