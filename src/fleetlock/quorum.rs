//! A drain never costs a Dkron cluster its majority: FleetLock holds back the eviction of a
//! Dkron server pod while the servers on other Nodes that are Ready raft voters are fewer than a
//! majority of the StatefulSet's replicas, and answers `dkron_quorum_at_risk` naming the
//! cluster and its ready voters. The PodDisruptionBudget (`maxUnavailable: 1`) and the
//! `dkron-ha/raft-voter` readiness gate guard the same thing inside the Eviction API; this check
//! makes the answer say why, and holds even where the gate is left out or the budget changed.
//!
//! A Dkron server pod is one dkron-ha injected (`dkron-ha/injected`) that a StatefulSet
//! controls. A StatefulSet of 1 or 2 replicas has no majority that survives losing any server,
//! so no drain could keep one: those are left to their budget.

use std::fmt;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use super::drain::PodKey;
use crate::names::{ANNOTATION_INJECTED, CONDITION_RAFT_VOTER};

/// The smallest cluster whose majority survives the loss of one server.
pub const SMALLEST_GUARDED_CLUSTER: u32 = 3;

/// The Dkron server StatefulSet that controls `pod`, if dkron-ha injected it.
pub fn server_statefulset(pod: &Pod) -> Option<&str> {
    if !pod.annotations().contains_key(ANNOTATION_INJECTED) {
        return None;
    }
    pod.owner_references()
        .iter()
        .find(|owner| owner.controller == Some(true) && owner.kind == "StatefulSet")
        .map(|owner| owner.name.as_str())
}

fn condition_true(pod: &Pod, kind: &str) -> Option<bool> {
    let conditions = pod.status.as_ref()?.conditions.as_ref()?;
    conditions
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| c.status == "True")
}

/// Ready, not being deleted, and a raft voter where the controller says so (a pod without the
/// `dkron-ha/raft-voter` condition, its gate left out, counts by Ready alone).
pub fn is_ready_voter(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && condition_true(pod, "Ready") == Some(true)
        && condition_true(pod, CONDITION_RAFT_VOTER) != Some(false)
}

/// Why the drain of a Node waits for one Dkron cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shortfall {
    pub namespace: String,
    pub statefulset: String,
    pub replicas: u32,
    /// The cluster's servers that are Ready raft voters now, by pod name.
    pub ready_voters: Vec<String>,
    /// Of those, how many are on other Nodes.
    pub would_remain: usize,
    pub majority: usize,
    /// Its server pods on the draining Node: their evictions are held back.
    pub on_node: Vec<PodKey>,
}

impl Shortfall {
    pub fn holds(&self, pod: &PodKey) -> bool {
        self.on_node.contains(pod)
    }
}

impl fmt::Display for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ready = if self.ready_voters.is_empty() {
            "none".to_owned()
        } else {
            self.ready_voters.join(", ")
        };
        let on_node: Vec<&str> = self.on_node.iter().map(|p| p.name.as_str()).collect();
        write!(
            f,
            "Dkron cluster {}/{} has {} of {} servers Ready as raft voters ({ready}); evicting {} \
             would leave {}, fewer than its majority of {}: waiting until {} more is back as a \
             Ready voter",
            self.namespace,
            self.statefulset,
            self.ready_voters.len(),
            self.replicas,
            on_node.join(", "),
            self.would_remain,
            self.majority,
            self.majority - self.would_remain,
        )
    }
}

/// Whether draining `node` would leave the Dkron cluster of `statefulset` (whose pods are among
/// `pods`) without a majority of Ready voters: only when a Ready voter of it is on `node`.
pub fn shortfall(node: &str, statefulset: &StatefulSet, pods: &[Pod]) -> Option<Shortfall> {
    let replicas = u32::try_from(statefulset.spec.as_ref()?.replicas.unwrap_or(1)).ok()?;
    if replicas < SMALLEST_GUARDED_CLUSTER {
        return None;
    }
    let name = statefulset.name_any();
    let uid = statefulset.uid();
    let members: Vec<&Pod> = pods
        .iter()
        .filter(|pod| {
            pod.owner_references().iter().any(|owner| {
                owner.controller == Some(true)
                    && owner.kind == "StatefulSet"
                    && owner.name == name
                    && uid.as_ref().is_none_or(|uid| *uid == owner.uid)
            })
        })
        .collect();
    let on = |pod: &Pod| pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node);
    let mut ready_voters: Vec<String> = members
        .iter()
        .filter(|pod| is_ready_voter(pod))
        .map(|pod| pod.name_any())
        .collect();
    ready_voters.sort();
    let voters_here = members
        .iter()
        .filter(|pod| on(pod) && is_ready_voter(pod))
        .count();
    let would_remain = ready_voters.len() - voters_here;
    let majority = replicas as usize / 2 + 1;
    if voters_here == 0 || would_remain >= majority {
        return None;
    }
    let mut on_node: Vec<PodKey> = members
        .iter()
        .filter(|pod| on(pod) && pod.metadata.deletion_timestamp.is_none())
        .map(|pod| PodKey::of(pod))
        .collect();
    on_node.sort();
    Some(Shortfall {
        namespace: statefulset.namespace().unwrap_or_default(),
        statefulset: name,
        replicas,
        ready_voters,
        would_remain,
        majority,
        on_node,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn statefulset(replicas: i32) -> StatefulSet {
        serde_json::from_value(json!({
            "metadata": { "name": "dkron", "namespace": "jobs", "uid": "sts-uid" },
            "spec": { "replicas": replicas, "serviceName": "dkron",
                      "selector": { "matchLabels": { "app": "dkron" } },
                      "template": {} },
        }))
        .unwrap()
    }

    /// Server `ordinal` on `node`: (Ready, raft-voter condition).
    fn server(ordinal: u32, node: &str, ready: bool, voter: Option<bool>) -> Pod {
        let status = |b: bool| if b { "True" } else { "False" };
        let mut conditions = vec![json!({ "type": "Ready", "status": status(ready) })];
        if let Some(voter) = voter {
            conditions.push(json!({ "type": CONDITION_RAFT_VOTER, "status": status(voter) }));
        }
        serde_json::from_value(json!({
            "metadata": {
                "name": format!("dkron-{ordinal}"), "namespace": "jobs",
                "annotations": { ANNOTATION_INJECTED: "0.1.0" },
                "ownerReferences": [{ "apiVersion": "apps/v1", "kind": "StatefulSet",
                                      "name": "dkron", "uid": "sts-uid", "controller": true }],
            },
            "spec": { "nodeName": node, "containers": [] },
            "status": { "conditions": conditions },
        }))
        .unwrap()
    }

    fn healthy(node_of: &[&str]) -> Vec<Pod> {
        node_of
            .iter()
            .enumerate()
            .map(|(i, node)| server(i as u32, node, true, Some(true)))
            .collect()
    }

    #[test]
    fn a_whole_cluster_lets_one_node_go() {
        let pods = healthy(&["a", "b", "c"]);
        assert_eq!(shortfall("a", &statefulset(3), &pods), None);
    }

    #[test]
    fn a_server_not_back_as_a_voter_holds_the_next_drain_and_the_answer_says_so() {
        let mut pods = healthy(&["a", "b", "c"]);
        // Back from its node's reboot, Ready by its probes but not yet a raft voter.
        pods[1] = server(1, "b", false, Some(false));
        let held = shortfall("a", &statefulset(3), &pods).expect("held");
        assert_eq!(held.ready_voters, ["dkron-0", "dkron-2"]);
        assert_eq!((held.would_remain, held.majority), (1, 2));
        assert_eq!(
            held.on_node,
            [PodKey {
                namespace: "jobs".into(),
                name: "dkron-0".into()
            }]
        );
        let text = held.to_string();
        assert!(
            text.contains("jobs/dkron has 2 of 3 servers Ready as raft voters (dkron-0, dkron-2)")
                && text.contains("evicting dkron-0 would leave 1, fewer than its majority of 2"),
            "{text}"
        );
    }

    #[test]
    fn ready_is_not_enough_while_the_controller_says_it_is_not_a_voter() {
        let mut pods = healthy(&["a", "b", "c"]);
        pods[2] = server(2, "c", true, Some(false));
        assert!(shortfall("a", &statefulset(3), &pods).is_some());
        // Without the gate (no condition at all) Ready is what counts.
        pods[2] = server(2, "c", true, None);
        assert_eq!(shortfall("a", &statefulset(3), &pods), None);
    }

    #[test]
    fn a_node_whose_server_is_not_a_voter_anyway_is_let_go() {
        let mut pods = healthy(&["a", "b", "c"]);
        pods[0] = server(0, "a", false, Some(false));
        pods[1] = server(1, "b", false, Some(false));
        // Draining a takes no voter away: the cluster is no worse for it.
        assert_eq!(shortfall("a", &statefulset(3), &pods), None);
        // Draining c would take the last one.
        let held = shortfall("c", &statefulset(3), &pods).expect("held");
        assert_eq!((held.would_remain, held.majority), (0, 2));
    }

    #[test]
    fn a_terminating_server_elsewhere_counts_as_gone() {
        let mut pods = healthy(&["a", "b", "c"]);
        pods[1].metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        assert!(shortfall("a", &statefulset(3), &pods).is_some());
    }

    #[test]
    fn five_servers_let_a_node_go_with_one_down_but_not_with_two() {
        let mut pods = healthy(&["a", "b", "c", "d", "e"]);
        pods[4] = server(4, "e", false, Some(false));
        assert_eq!(shortfall("a", &statefulset(5), &pods), None);
        pods[3] = server(3, "d", false, Some(false));
        let held = shortfall("a", &statefulset(5), &pods).expect("held");
        assert_eq!((held.would_remain, held.majority), (2, 3));
    }

    #[test]
    fn two_servers_on_the_node_are_both_held() {
        let pods = healthy(&["a", "a", "b"]);
        let held = shortfall("a", &statefulset(3), &pods).expect("held");
        assert_eq!(held.on_node.len(), 2);
        assert_eq!(held.would_remain, 1);
    }

    #[test]
    fn clusters_of_one_or_two_and_other_owners_pods_are_left_to_their_budget() {
        let mut pods = healthy(&["a", "b"]);
        pods[1] = server(1, "b", false, Some(false));
        assert_eq!(shortfall("a", &statefulset(2), &pods), None);
        assert_eq!(shortfall("a", &statefulset(1), &pods[..1]), None);
        // Pods of another StatefulSet of the same name (another uid) are not its servers.
        let mut stranger = statefulset(3);
        stranger.metadata.uid = Some("other".into());
        assert_eq!(shortfall("a", &stranger, &healthy(&["a", "b", "c"])), None);
    }

    #[test]
    fn only_injected_pods_controlled_by_a_statefulset_are_dkron_servers() {
        let pod = server(0, "a", true, Some(true));
        assert_eq!(server_statefulset(&pod), Some("dkron"));
        let mut plain = pod.clone();
        plain.metadata.annotations = None;
        assert_eq!(server_statefulset(&plain), None);
        let mut owned_otherwise = pod;
        owned_otherwise.metadata.owner_references.as_mut().unwrap()[0].kind = "ReplicaSet".into();
        assert_eq!(server_statefulset(&owned_otherwise), None);
    }
}
