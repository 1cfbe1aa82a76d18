//! `dkron-ha/replace-on-node-failure: <duration>`: a Dkron server pod stuck because its Node
//! failed is replaced. A StatefulSet never replaces a pod on a Node that stopped answering (the
//! pod stays Terminating or Unknown), and a pod whose claim is bound to a local volume can only
//! ever start on that volume's Node. Once that Node has been NotReady for the duration (or is
//! gone), the controller deletes the claims on local volumes of that Node and then force-deletes
//! the pod, so the StatefulSet makes both anew elsewhere: the server starts with an empty data
//! dir under the same pod name, so the same raft id, and catches up from the leader. No raft
//! peer is removed.
//!
//! Never while the Node is only cordoned (a drain) or NotReady for less than the duration (a
//! reboot), and only while the cluster has a leader: with a majority lost, the servers that are
//! left may not hold every committed entry, and empty replacements would vote them in anyway.
//! One pod per round.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    Node, ObjectReference, PersistentVolume, PersistentVolumeClaim, Pod,
};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};
use kube::runtime::events::EventType;

use super::{Context, Result};

/// How a Node looks to the replacement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeHealth {
    /// Ready (cordoned or not).
    Ready,
    /// Not Ready since then (the Ready condition's last transition).
    NotReadySince(Timestamp),
    /// No such Node any more.
    Gone,
}

/// One pod of the StatefulSet, as far as the replacement cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodFacts {
    pub name: String,
    /// `spec.nodeName`, once scheduled.
    pub node: Option<String>,
    /// Its claims, each with the Node its local volume lives on (`None`: not bound to a local
    /// volume, free to follow the pod).
    pub claims: Vec<(String, Option<String>)>,
}

/// What to do about one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replacement {
    pub pod: String,
    pub node: String,
    /// Claims on local volumes of the failed Node: deleted first.
    pub claims: Vec<String>,
    pub why: String,
}

/// The failed Node, if `node` has failed for longer than `after` at `now`, and why.
fn failed(node: &str, health: &NodeHealth, after: Duration, now: Timestamp) -> Option<String> {
    match health {
        NodeHealth::Ready => None,
        NodeHealth::Gone => Some(format!("Node {node} no longer exists")),
        NodeHealth::NotReadySince(since) => {
            let down = now.duration_since(*since);
            let down = Duration::try_from(down).unwrap_or_default();
            (down >= after).then(|| {
                format!(
                    "Node {node} has been NotReady since {since} ({}s, longer than {})",
                    down.as_secs(),
                    humantime::format_duration(after)
                )
            })
        }
    }
}

/// The first pod (lowest name) stuck on a Node that failed longer than `after` ago: bound to
/// it, or unscheduled with a claim on one of its local volumes.
pub fn replacement(
    pods: &[PodFacts],
    health: &BTreeMap<String, NodeHealth>,
    after: Duration,
    now: Timestamp,
) -> Option<Replacement> {
    let health_of = |node: &str| health.get(node).cloned().unwrap_or(NodeHealth::Gone);
    let mut pods: Vec<&PodFacts> = pods.iter().collect();
    pods.sort_by(|a, b| a.name.cmp(&b.name));
    pods.into_iter().find_map(|pod| {
        let stuck_on = match &pod.node {
            Some(node) => Some(node.clone()),
            None => pod.claims.iter().find_map(|(_, node)| node.clone()),
        }?;
        let why = failed(&stuck_on, &health_of(&stuck_on), after, now)?;
        let claims = pod
            .claims
            .iter()
            .filter(|(_, node)| node.as_deref() == Some(stuck_on.as_str()))
            .map(|(claim, _)| claim.clone())
            .collect();
        Some(Replacement {
            pod: pod.name.clone(),
            node: stuck_on,
            claims,
            why,
        })
    })
}

/// The Node a local PersistentVolume lives on (its `kubernetes.io/hostname` affinity).
fn local_volume_node(volume: &PersistentVolume) -> Option<String> {
    let spec = volume.spec.as_ref()?;
    spec.local.as_ref()?;
    let terms = &spec
        .node_affinity
        .as_ref()?
        .required
        .as_ref()?
        .node_selector_terms;
    terms
        .iter()
        .flat_map(|term| term.match_expressions.iter().flatten())
        .find(|e| e.key == "kubernetes.io/hostname" && e.operator == "In")
        .and_then(|e| e.values.as_ref()?.first().cloned())
}

fn health(node: Option<Node>) -> NodeHealth {
    let Some(node) = node else {
        return NodeHealth::Gone;
    };
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
    match ready {
        Some(c) if c.status == "True" => NodeHealth::Ready,
        Some(c) => NodeHealth::NotReadySince(
            c.last_transition_time
                .as_ref()
                .map(|t| t.0)
                .unwrap_or_else(Timestamp::now),
        ),
        // A Node that never reported is not known to have failed.
        None => NodeHealth::Ready,
    }
}

/// One round for a StatefulSet that opted in with `after`: `pods`, every pod it owns;
/// `has_leader`: the raft loop found one this round.
pub(super) async fn reconcile(
    ctx: &Context,
    sts: &StatefulSet,
    namespace: &str,
    pods: &[Pod],
    after: Duration,
    has_leader: bool,
) -> Result<()> {
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let claims_api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), namespace);
    let volumes: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let mut facts = Vec::new();
    for pod in pods {
        let mut claims = Vec::new();
        let volumes_of_pod = pod.spec.as_ref().and_then(|s| s.volumes.as_ref());
        for claim in volumes_of_pod
            .into_iter()
            .flatten()
            .filter_map(|v| v.persistent_volume_claim.as_ref())
        {
            let bound = claims_api
                .get_opt(&claim.claim_name)
                .await?
                .and_then(|c| c.spec?.volume_name);
            let node = match bound {
                Some(volume) => volumes
                    .get_opt(&volume)
                    .await?
                    .as_ref()
                    .and_then(local_volume_node),
                None => None,
            };
            claims.push((claim.claim_name.clone(), node));
        }
        facts.push(PodFacts {
            name: pod.name_any(),
            node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            claims,
        });
    }
    let names: BTreeSet<String> = facts
        .iter()
        .flat_map(|p| {
            p.node
                .iter()
                .chain(p.claims.iter().filter_map(|c| c.1.as_ref()))
        })
        .cloned()
        .collect();
    let mut healths = BTreeMap::new();
    for name in names {
        healths.insert(name.clone(), health(nodes.get_opt(&name).await?));
    }
    let Some(replacement) = replacement(&facts, &healths, after, Timestamp::now()) else {
        return Ok(());
    };
    let statefulset = sts.name_any();
    let pod_ref = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        namespace: Some(namespace.to_owned()),
        name: Some(replacement.pod.clone()),
        ..Default::default()
    };
    if !has_leader {
        let note = format!(
            "not replacing {}: {}, but the Dkron cluster has no leader, so the servers left may lack committed entries; bring the Node back, or recover the cluster by hand",
            replacement.pod, replacement.why
        );
        tracing::warn!(%namespace, %statefulset, pod = %replacement.pod, why = %replacement.why, "pod on a failed node not replaced: no leader");
        super::publish_about(
            ctx,
            sts,
            EventType::Warning,
            "NodeFailureNotReplaced",
            note,
            Some(pod_ref),
        )
        .await;
        return Ok(());
    }
    // Claims first: deleted while the pod exists, they wait for it (pvc-protection), and the
    // StatefulSet makes the new pod only once they are gone, with new claims.
    for claim in &replacement.claims {
        match claims_api.delete(claim, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => return Err(error.into()),
        }
    }
    match pods_api
        .delete(&replacement.pod, &DeleteParams::default().grace_period(0))
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(error) => return Err(error.into()),
    }
    let claims = if replacement.claims.is_empty() {
        String::new()
    } else {
        format!(
            "; deleted its claims on local volumes of that Node ({}), so it starts elsewhere with an empty data dir and catches up from the leader under the same raft id",
            replacement.claims.join(", ")
        )
    };
    let note = format!(
        "force-deleted {}: {}{claims}",
        replacement.pod, replacement.why
    );
    tracing::info!(%namespace, %statefulset, pod = %replacement.pod, node = %replacement.node, claims = ?replacement.claims, why = %replacement.why, "pod on a failed node replaced");
    super::publish_about(
        ctx,
        sts,
        EventType::Normal,
        "ReplacedOnNodeFailure",
        note,
        Some(pod_ref),
    )
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Duration = Duration::from_secs(300);

    fn now() -> Timestamp {
        "2026-12-01T12:00:00Z".parse().unwrap()
    }

    fn ago(seconds: i64) -> NodeHealth {
        NodeHealth::NotReadySince(now() - k8s_openapi::jiff::SignedDuration::from_secs(seconds))
    }

    fn pod(name: &str, node: Option<&str>, claims: &[(&str, Option<&str>)]) -> PodFacts {
        PodFacts {
            name: name.into(),
            node: node.map(Into::into),
            claims: claims
                .iter()
                .map(|(c, n)| ((*c).into(), n.map(Into::into)))
                .collect(),
        }
    }

    fn nodes(entries: &[(&str, NodeHealth)]) -> BTreeMap<String, NodeHealth> {
        entries
            .iter()
            .map(|(n, h)| ((*n).to_owned(), h.clone()))
            .collect()
    }

    #[test]
    fn a_node_not_ready_longer_than_the_duration_gets_its_pod_replaced_with_its_local_claims() {
        let pods = [
            pod("dkron-0", Some("a"), &[("data-dkron-0", Some("a"))]),
            pod(
                "dkron-1",
                Some("b"),
                &[("data-dkron-1", Some("b")), ("cache", None)],
            ),
        ];
        let health = nodes(&[("a", NodeHealth::Ready), ("b", ago(301))]);
        let replaced = replacement(&pods, &health, AFTER, now()).expect("replaced");
        assert_eq!(replaced.pod, "dkron-1");
        assert_eq!(replaced.node, "b");
        assert_eq!(replaced.claims, ["data-dkron-1"]);
        assert!(
            replaced.why.contains(
                "Node b has been NotReady since 2026-12-01T11:54:59Z (301s, longer than 5m)"
            ),
            "{}",
            replaced.why
        );
    }

    #[test]
    fn a_reboot_or_a_cordon_is_never_a_failure() {
        let pods = [pod("dkron-0", Some("a"), &[("data-dkron-0", Some("a"))])];
        for health in [ago(299), ago(0), NodeHealth::Ready] {
            assert_eq!(
                replacement(&pods, &nodes(&[("a", health.clone())]), AFTER, now()),
                None,
                "{health:?}"
            );
        }
    }

    #[test]
    fn a_deleted_node_fails_at_once_and_a_pending_pod_pinned_to_it_is_replaced() {
        // The old pod is gone with its Node (pod GC); the StatefulSet's new one waits for a
        // claim whose local volume lives on that Node.
        let pods = [pod("dkron-2", None, &[("data-dkron-2", Some("c"))])];
        let replaced = replacement(&pods, &nodes(&[]), AFTER, now()).expect("replaced");
        assert_eq!(replaced.node, "c");
        assert_eq!(replaced.claims, ["data-dkron-2"]);
        assert!(replaced.why.contains("Node c no longer exists"));
    }

    #[test]
    fn a_pod_on_network_storage_is_force_deleted_and_keeps_its_claim() {
        let pods = [pod("dkron-0", Some("a"), &[("data-dkron-0", None)])];
        let replaced =
            replacement(&pods, &nodes(&[("a", ago(600))]), AFTER, now()).expect("replaced");
        assert_eq!(replaced.claims, Vec::<String>::new());
        // Unscheduled and not pinned: the scheduler's business, not ours.
        let pending = [pod("dkron-0", None, &[("data-dkron-0", None)])];
        assert_eq!(replacement(&pending, &nodes(&[]), AFTER, now()), None);
    }

    #[test]
    fn one_pod_per_round_lowest_name_first() {
        let pods = [
            pod("dkron-2", Some("c"), &[]),
            pod("dkron-1", Some("c"), &[]),
        ];
        let replaced = replacement(&pods, &nodes(&[("c", ago(900))]), AFTER, now()).unwrap();
        assert_eq!(replaced.pod, "dkron-1");
    }

    #[test]
    fn only_local_volumes_pin_a_claim_to_a_node() {
        let volume: PersistentVolume = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "pv" },
            "spec": {
                "local": { "path": "/mnt/disks/1" },
                "nodeAffinity": { "required": { "nodeSelectorTerms": [{ "matchExpressions": [
                    { "key": "kubernetes.io/hostname", "operator": "In", "values": ["node-7"] }
                ] }] } },
            },
        }))
        .unwrap();
        assert_eq!(local_volume_node(&volume).as_deref(), Some("node-7"));
        let mut zonal = volume.clone();
        zonal.spec.as_mut().unwrap().local = None;
        assert_eq!(local_volume_node(&zonal), None);
    }
}
