//! The drain decision, without a cluster: which pods leave, which stay, what remains.

use std::collections::BTreeMap;

use dkron_ha::fleetlock::drain::{
    CORDONED_ANNOTATION, CordonDecision, DrainPlan, EvictionOutcome, PodDisposition, PodKey,
    SkipReason, UncordonDecision, classify_pod, cordon_decision, cordon_patch, describe_remaining,
    plan_drain, uncordon_decision, uncordon_patch,
};
use dkron_ha::fleetlock::metrics::EvictionKind;
use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::json;

fn fixture_pods() -> Vec<Pod> {
    #[derive(serde::Deserialize)]
    struct List {
        items: Vec<Pod>,
    }
    let list: List =
        serde_yaml_ng::from_str(include_str!("fixtures/fleetlock/pods-on-worker-1.yaml"))
            .expect("fixture");
    list.items
}

fn fixture_pod(name: &str) -> Pod {
    fixture_pods()
        .into_iter()
        .find(|p| p.metadata.name.as_deref() == Some(name))
        .expect("pod in fixture")
}

fn fixture_node() -> Node {
    serde_yaml_ng::from_str(include_str!("fixtures/fleetlock/node-fcos.yaml")).expect("fixture")
}

fn key(namespace: &str, name: &str) -> PodKey {
    PodKey {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    }
}

#[test]
fn each_kind_of_pod_gets_its_disposition() {
    assert_eq!(
        classify_pod(&fixture_pod("web-7d9c6b5f4-x2kqp")),
        PodDisposition::Evict
    );
    assert_eq!(classify_pod(&fixture_pod("dkron-1")), PodDisposition::Evict);
    assert_eq!(
        classify_pod(&fixture_pod("kube-proxy-8xw2c")),
        PodDisposition::Skip(SkipReason::DaemonSet)
    );
    assert_eq!(
        classify_pod(&fixture_pod("haproxy-worker-1")),
        PodDisposition::Skip(SkipReason::Mirror)
    );
    assert_eq!(
        classify_pod(&fixture_pod("backup-29212345-q7m4d")),
        PodDisposition::Skip(SkipReason::Finished)
    );
    assert_eq!(
        classify_pod(&fixture_pod("cache-0")),
        PodDisposition::Terminating
    );
}

#[test]
fn a_failed_pod_is_finished_too() {
    let mut pod = fixture_pod("web-7d9c6b5f4-x2kqp");
    pod.status.get_or_insert_default().phase = Some("Failed".to_owned());
    assert_eq!(
        classify_pod(&pod),
        PodDisposition::Skip(SkipReason::Finished)
    );
}

#[test]
fn a_daemonset_that_is_not_the_controller_does_not_protect_a_pod() {
    let mut pod = fixture_pod("kube-proxy-8xw2c");
    for owner in pod.metadata.owner_references.iter_mut().flatten() {
        owner.controller = Some(false);
    }
    assert_eq!(classify_pod(&pod), PodDisposition::Evict);
}

#[test]
fn a_bare_pod_is_evicted() {
    let mut pod = fixture_pod("web-7d9c6b5f4-x2kqp");
    pod.metadata.owner_references = None;
    assert_eq!(classify_pod(&pod), PodDisposition::Evict);
}

#[test]
fn the_plan_covers_only_pods_bound_to_the_node() {
    let plan = plan_drain("worker-1", &fixture_pods());
    assert_eq!(
        plan.to_evict,
        vec![key("jobs", "dkron-1"), key("shop", "web-7d9c6b5f4-x2kqp")]
    );
    assert_eq!(plan.terminating, vec![key("shop", "cache-0")]);
    let skipped: Vec<(String, SkipReason)> = plan
        .skipped
        .iter()
        .map(|(k, r)| (k.to_string(), *r))
        .collect();
    assert_eq!(
        skipped,
        vec![
            (
                "jobs/backup-29212345-q7m4d".to_owned(),
                SkipReason::Finished
            ),
            (
                "kube-system/haproxy-worker-1".to_owned(),
                SkipReason::Mirror
            ),
            (
                "kube-system/kube-proxy-8xw2c".to_owned(),
                SkipReason::DaemonSet
            ),
        ]
    );
    assert!(!plan.is_drained());
    assert_eq!(plan.remaining(), 3);
}

#[test]
fn a_node_with_only_pods_that_stay_is_drained() {
    let stay: Vec<Pod> = [
        "kube-proxy-8xw2c",
        "haproxy-worker-1",
        "backup-29212345-q7m4d",
    ]
    .into_iter()
    .map(fixture_pod)
    .collect();
    let plan = plan_drain("worker-1", &stay);
    assert!(plan.is_drained());
    assert_eq!(plan.skipped.len(), 3);
    assert!(plan_drain("worker-9", &fixture_pods()).is_drained());
}

#[test]
fn eviction_answers_are_classified_by_status_code() {
    assert_eq!(
        EvictionOutcome::from_status(201, ""),
        EvictionOutcome::Evicted
    );
    assert_eq!(
        EvictionOutcome::from_status(404, "gone"),
        EvictionOutcome::AlreadyGone
    );
    assert_eq!(
        EvictionOutcome::from_status(
            429,
            "Cannot evict pod as it would violate the pod's disruption budget."
        ),
        EvictionOutcome::BlockedByDisruptionBudget(
            "Cannot evict pod as it would violate the pod's disruption budget.".to_owned()
        )
    );
    let failed =
        EvictionOutcome::from_status(500, "This pod has more than one PodDisruptionBudget");
    assert_eq!(EvictionKind::of(&failed).as_str(), "failed");
    assert!(matches!(failed, EvictionOutcome::Failed(m) if m.contains("more than one")));
}

#[test]
fn what_remains_is_named_with_its_reason() {
    let plan = plan_drain("worker-1", &fixture_pods());
    let outcomes = BTreeMap::from([
        (
            key("jobs", "dkron-1"),
            EvictionOutcome::BlockedByDisruptionBudget("no".into()),
        ),
        (
            key("shop", "web-7d9c6b5f4-x2kqp"),
            EvictionOutcome::Failed("HTTP 403: forbidden".into()),
        ),
    ]);
    assert_eq!(
        describe_remaining(&plan, &outcomes),
        "3 pods remain: jobs/dkron-1 (eviction blocked by a PodDisruptionBudget), \
         shop/web-7d9c6b5f4-x2kqp (eviction failed: HTTP 403: forbidden), shop/cache-0 (terminating)"
    );
}

#[test]
fn a_long_list_of_remaining_pods_is_cut_short() {
    let plan = DrainPlan {
        to_evict: (0..25).map(|i| key("ns", &format!("p{i:02}"))).collect(),
        ..DrainPlan::default()
    };
    let text = describe_remaining(&plan, &BTreeMap::new());
    assert!(
        text.starts_with("25 pods remain: ns/p00 (waiting for eviction)"),
        "{text}"
    );
    assert!(text.ends_with("and 15 more"), "{text}");
    let one = DrainPlan {
        terminating: vec![key("ns", "last")],
        ..DrainPlan::default()
    };
    assert_eq!(
        describe_remaining(&one, &BTreeMap::new()),
        "1 pod remains: ns/last (terminating)"
    );
}

#[test]
fn an_eviction_without_answer_is_reported_as_probably_a_budget() {
    let plan = DrainPlan {
        to_evict: vec![key("ns", "slow")],
        ..DrainPlan::default()
    };
    let outcomes = BTreeMap::from([(key("ns", "slow"), EvictionOutcome::Unanswered)]);
    assert_eq!(
        describe_remaining(&plan, &outcomes),
        "1 pod remains: ns/slow (eviction not accepted within 5s, most likely a PodDisruptionBudget)"
    );
    assert_eq!(
        EvictionKind::of(&EvictionOutcome::Unanswered).as_str(),
        "unanswered"
    );
}

fn with_cordon(unschedulable: bool, ours: bool) -> Node {
    let mut node = fixture_node();
    node.spec.get_or_insert_default().unschedulable = Some(unschedulable);
    if ours {
        node.metadata
            .annotations
            .get_or_insert_default()
            .insert(CORDONED_ANNOTATION.to_owned(), "true".to_owned());
    }
    node
}

#[test]
fn cordon_remembers_who_cordoned_the_node() {
    assert_eq!(
        cordon_decision(&with_cordon(false, false)),
        CordonDecision::Cordon
    );
    assert_eq!(
        cordon_decision(&with_cordon(true, true)),
        CordonDecision::AlreadyCordonedByUs
    );
    assert_eq!(
        cordon_decision(&with_cordon(true, false)),
        CordonDecision::CordonedByOthers
    );
    assert_eq!(
        cordon_decision(&with_cordon(false, true)),
        CordonDecision::Recordon
    );
}

#[test]
fn only_a_node_we_cordoned_is_uncordoned() {
    assert_eq!(
        uncordon_decision(&with_cordon(true, true)),
        UncordonDecision::Uncordon
    );
    assert_eq!(
        uncordon_decision(&with_cordon(true, false)),
        UncordonDecision::LeaveAsIs
    );
    assert_eq!(
        uncordon_decision(&with_cordon(false, false)),
        UncordonDecision::LeaveAsIs
    );
}

#[test]
fn node_patches_are_pinned_to_the_observed_resource_version() {
    let node = fixture_node();
    assert_eq!(
        cordon_patch(&node),
        json!({
            "metadata": {"resourceVersion": "48213", "annotations": {CORDONED_ANNOTATION: "true"}},
            "spec": {"unschedulable": true}
        })
    );
    assert_eq!(
        uncordon_patch(&node),
        json!({
            "metadata": {"resourceVersion": "48213", "annotations": {CORDONED_ANNOTATION: null}},
            "spec": {"unschedulable": null}
        })
    );
}
