//! The raft peer loop: per opted-in StatefulSet, on its pods' and its own events and every
//! `--raft-interval`, it finds the Dkron leader among the pods, reads the leader's raft
//! configuration (gRPC) and serf members (HTTP), writes each pod's `dkron-ha/raft-voter`
//! condition and removes at most one raft server whose pod must not exist any more
//! ([`super::raft`] decides both).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use super::raft::{
    LeaderView, Member, MemberStatus, PodState, ordinal, outside_gossip, raft_server_to_remove,
    voter_conditions,
};
use super::{Context, FIELD_MANAGER, Result};
use crate::dkron::grpc::{GrpcError, RaftClient};
use crate::dkron::{DkronClient, HTTP_PORT, LeaderAnswer};
use crate::inject;
use crate::names::CONDITION_RAFT_VOTER;

/// What the peer loop keeps between rounds.
pub struct Peers {
    dkron: DkronClient,
    /// One gRPC client per StatefulSet (`namespace/name`): each remembers its cluster's package.
    raft: Mutex<HashMap<String, Arc<RaftClient>>>,
    /// Bound of every call to Dkron.
    timeout: Duration,
    /// Time between rounds.
    pub interval: Duration,
    /// Per StatefulSet (`namespace/name`): its running pods that are no live gossip member at
    /// their IP, by pod name, with their IP and since when.
    outside: Mutex<HashMap<String, HashMap<String, Outside>>>,
}

/// A running pod outside the cluster's gossip, as first seen.
struct Outside {
    ip: String,
    since: Instant,
    reported: bool,
}

/// How long a running pod may stay outside the gossip before it is reported: longer than a
/// join takes, and than `wrap`'s recovery of a lost name conflict (its name wait of at most
/// 60 s and a rejoin), so what is reported is what nothing here will fix by itself.
pub const OUTSIDE_GOSSIP_BOUND: Duration = Duration::from_secs(150);

impl Peers {
    pub fn new(interval: Duration, timeout: Duration) -> Self {
        Self {
            // Building a reqwest client fails only without a TLS backend, and ours has none.
            dkron: DkronClient::new().expect("an HTTP client without TLS builds"),
            raft: Mutex::new(HashMap::new()),
            timeout,
            interval,
            outside: Mutex::new(HashMap::new()),
        }
    }

    fn raft_client(&self, key: &str) -> Arc<RaftClient> {
        let mut clients = self.raft.lock().expect("raft clients lock");
        clients
            .entry(key.to_owned())
            .or_insert_with(|| Arc::new(RaftClient::new(self.timeout)))
            .clone()
    }
}

/// Asks every pod's Dkron (concurrently) who leads (`GET /v1/leader`) and how many jobs it has,
/// into `leader_seen` and `jobs`.
async fn ask_pods(peers: &Peers, pods: &mut [PodState]) {
    let asks = pods.iter().map(|pod| async move {
        let ip = pod.ip.as_deref()?;
        let leader = match peers.dkron.leader(ip, HTTP_PORT, peers.timeout).await {
            Ok(LeaderAnswer::Known { rpc_addr, .. }) => Some(rpc_addr),
            Ok(_) => None,
            Err(error) => {
                tracing::debug!(pod = %pod.name, %error, "no answer to GET /v1/leader");
                return None;
            }
        };
        let jobs = job_count(peers, ip).await;
        Some((leader, jobs))
    });
    let answers = futures::future::join_all(asks).await;
    for (pod, answer) in pods.iter_mut().zip(answers) {
        (pod.leader_seen, pod.jobs) = answer.unwrap_or_default();
    }
}

async fn job_count(peers: &Peers, host: &str) -> Option<u64> {
    match peers.dkron.job_count(host, HTTP_PORT, peers.timeout).await {
        Ok(count) => count,
        Err(error) => {
            tracing::debug!(%host, %error, "no job count");
            None
        }
    }
}

/// Asks the leader the pods name (lowest ordinal first) for its raft configuration and serf
/// members. `None` when no pod names a leader, or the named one does not lead by its own
/// configuration (an election in between: next round).
async fn find_leader(peers: &Peers, raft: &RaftClient, pods: &[PodState]) -> Option<LeaderView> {
    let rpc_addr = pods.iter().find_map(|p| p.leader_seen.clone())?;
    let configuration = match raft.configuration(&rpc_addr).await {
        Ok(configuration) => configuration,
        Err(error) => {
            tracing::warn!(leader = %rpc_addr, %error, "cannot read the raft configuration");
            return None;
        }
    };
    if !configuration
        .servers
        .iter()
        .any(|s| s.leader && s.address == rpc_addr)
    {
        tracing::debug!(leader = %rpc_addr, "the named leader does not lead by its configuration");
        return None;
    }
    let host = rpc_addr
        .rsplit_once(':')
        .map_or(rpc_addr.as_str(), |(h, _)| h);
    let members = match peers.dkron.members(host, HTTP_PORT, peers.timeout).await {
        Ok(Some(members)) => members,
        Ok(None) => {
            tracing::warn!(leader = %rpc_addr, "GET /v1/members answered no member list");
            return None;
        }
        Err(error) => {
            tracing::warn!(leader = %rpc_addr, %error, "cannot read the serf members");
            return None;
        }
    };
    let members = members
        .into_iter()
        .map(|m| {
            let member = Member {
                status: MemberStatus::from_code(m.status),
                addr: m.addr,
            };
            (m.name, member)
        })
        .collect();
    // The leader's own pod was asked with the others just now; only a leader that is not one
    // of the StatefulSet's pods is asked here.
    let jobs = match pods.iter().find(|p| p.ip.as_deref() == Some(host)) {
        Some(pod) => pod.jobs,
        None => job_count(peers, host).await,
    };
    Some(LeaderView {
        jobs,
        rpc_addr,
        servers: configuration.servers,
        members,
    })
}

/// Every pod the StatefulSet owns (by its selector, then its uid), terminating ones too.
async fn owned_pods(ctx: &Context, sts: &StatefulSet, namespace: &str) -> Result<Vec<Pod>> {
    let uid = sts.uid().unwrap_or_default();
    let selector = sts
        .spec
        .as_ref()
        .and_then(|s| kube::core::Selector::try_from(s.selector.clone()).ok())
        .unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    Ok(api
        .list(&ListParams::default().labels_from(&selector))
        .await?
        .into_iter()
        .filter(|p| p.owner_references().iter().any(|o| o.uid == uid))
        .collect())
}

/// The StatefulSet's pods that are not terminating, named `<sts>-<ordinal>`, lowest ordinal
/// first.
fn pods_of(sts: &StatefulSet, owned: &[Pod]) -> Vec<PodState> {
    let name = sts.name_any();
    let mut pods: Vec<(i32, PodState)> = owned
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let n = ordinal(&name, &p.name_any())?;
            let status = p.status.as_ref();
            let voter_condition = status
                .and_then(|s| s.conditions.as_ref())
                .and_then(|c| c.iter().find(|c| c.type_ == CONDITION_RAFT_VOTER))
                .map(|c| c.status == "True");
            Some((
                n,
                PodState {
                    name: p.name_any(),
                    ip: status.and_then(|s| s.pod_ip.clone()),
                    voter_condition,
                    leader_seen: None,
                    jobs: None,
                },
            ))
        })
        .collect();
    pods.sort_by_key(|(n, _)| *n);
    pods.into_iter().map(|(_, p)| p).collect()
}

async fn set_condition(api: &Api<Pod>, pod: &str, voter: bool, why: &str) -> Result<()> {
    let (status, reason) = if voter {
        ("True", "RaftVoter")
    } else {
        ("False", "NotRaftVoter")
    };
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let patch = serde_json::json!({
        "status": {"conditions": [{
            "type": CONDITION_RAFT_VOTER,
            "status": status,
            "reason": reason,
            "message": why,
            "lastTransitionTime": now,
        }]}
    });
    api.patch_status(
        pod,
        &PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        },
        // Pod conditions merge by type: this writes ours and nobody else's.
        &Patch::Strategic(patch),
    )
    .await?;
    Ok(())
}

/// Keeps the record of `sts`'s pods outside the gossip up to date with this round's `outside`
/// (pod name and IP) seen at `now`, and returns the pods just past `bound` (once each: name, IP
/// and how long) and how many pods of every StatefulSet are past it now.
fn track_outside(
    all: &mut HashMap<String, HashMap<String, Outside>>,
    sts: &str,
    outside: &[(String, String)],
    now: Instant,
    bound: Duration,
) -> (Vec<(String, String, Duration)>, i64) {
    let known = all.entry(sts.to_owned()).or_default();
    // A pod back in the gossip, or a new pod (another IP), starts over.
    known.retain(|pod, o| outside.iter().any(|(p, ip)| p == pod && *ip == o.ip));
    let mut due = Vec::new();
    for (pod, ip) in outside {
        let entry = known.entry(pod.clone()).or_insert_with(|| Outside {
            ip: ip.clone(),
            since: now,
            reported: false,
        });
        let for_ = now - entry.since;
        if !entry.reported && for_ >= bound {
            entry.reported = true;
            due.push((pod.clone(), ip.clone(), for_));
        }
    }
    let past = all
        .values()
        .flat_map(|pods| pods.values())
        .filter(|o| now - o.since >= bound)
        .count() as i64;
    (due, past)
}

/// One round for one opted-in StatefulSet.
pub async fn reconcile(sts: Arc<StatefulSet>, ctx: Arc<Context>) -> Result<Action> {
    let Some(namespace) = sts.namespace() else {
        return Ok(Action::await_change());
    };
    if sts.metadata.deletion_timestamp.is_some() || !inject::is_opted_in(&sts) {
        let key = format!("{namespace}/{}", sts.name_any());
        ctx.peers.outside.lock().expect("outside lock").remove(&key);
        return Ok(Action::await_change());
    }
    let name = sts.name_any();
    let peers = &ctx.peers;
    let replicas = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let owned = owned_pods(&ctx, &sts, &namespace).await?;
    let mut pods = pods_of(&sts, &owned);
    ask_pods(peers, &mut pods).await;
    let raft = peers.raft_client(&format!("{namespace}/{name}"));
    let leader = find_leader(peers, &raft, &pods).await;

    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    for (pod, voter) in voter_conditions(leader.as_ref(), &pods) {
        let why = match (&leader, voter) {
            (Some(_), true) => "a raft voter in the leader's configuration, alive in serf",
            (Some(_), false) => {
                "not a voter in the leader's configuration, not alive in serf at this pod's IP, or not caught up with the leader yet"
            }
            (None, _) => "no leader yet and no server ready: a cold start",
        };
        tracing::info!(%namespace, statefulset = %name, %pod, voter, why, "raft-voter condition");
        set_condition(&api, &pod, voter, why).await?;
    }

    match inject::replace_on_node_failure(&sts) {
        Ok(Some(after)) => {
            // Its failure must not hold up the raft loop's own work below.
            let replaced = super::node_failure::reconcile(
                &ctx,
                &sts,
                &namespace,
                &owned,
                after,
                leader.is_some(),
            );
            if let Err(error) = replaced.await {
                tracing::warn!(%namespace, statefulset = %name, %error, "cannot replace pods on failed nodes");
            }
        }
        Ok(None) => {}
        // The webhook denies such a value; one stored before dkron-ha came stays unused.
        Err(error) => {
            tracing::warn!(%namespace, statefulset = %name, %error, "pods on failed nodes are not replaced")
        }
    }

    let Some(leader) = leader else {
        return Ok(Action::requeue(peers.interval));
    };
    report_outside_gossip(&ctx, &sts, &namespace, &leader, &pods).await;
    if let Some(removal) = raft_server_to_remove(&name, replicas, &leader, &pods) {
        match raft.remove_peer(&leader.rpc_addr, &removal.id).await {
            Ok(()) => {
                ctx.metrics.raft_removals.inc();
                tracing::info!(%namespace, statefulset = %name, server = %removal.id, why = %removal, "raft server removed");
                let pod = ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    namespace: Some(namespace.clone()),
                    name: Some(removal.id.clone()),
                    ..Default::default()
                };
                super::publish_about(
                    &ctx,
                    &sts,
                    EventType::Normal,
                    "RaftPeerRemoved",
                    format!("removed {removal}"),
                    Some(pod),
                )
                .await;
                // The next one (if any) once this removal is in the configuration.
                return Ok(Action::requeue(Duration::from_secs(1)));
            }
            // The leader changed since it was asked: the next round asks again.
            Err(error @ GrpcError::NotLeader { .. }) => {
                tracing::info!(%namespace, statefulset = %name, server = %removal.id, %error, "not removed: the leader changed");
            }
            Err(error) => {
                tracing::warn!(%namespace, statefulset = %name, server = %removal.id, %error, "cannot remove the raft server");
            }
        }
    }
    tracing::debug!(%namespace, statefulset = %name, servers = leader.servers.len(), package = ?raft.package(), "raft peers checked");
    Ok(Action::requeue(peers.interval))
}

/// Reports (a Warning Event on the pod and one on the StatefulSet, and the
/// `dkron_ha_servers_outside_gossip` gauge) each running pod that has stayed outside the
/// cluster's gossip for [`OUTSIDE_GOSSIP_BOUND`]: a Dkron that runs, is never Ready and that
/// nothing else would point at.
async fn report_outside_gossip(
    ctx: &Context,
    sts: &StatefulSet,
    namespace: &str,
    leader: &LeaderView,
    pods: &[PodState],
) {
    let name = sts.name_any();
    let outside: Vec<(String, String)> = outside_gossip(leader, pods)
        .into_iter()
        .filter_map(|p| Some((p.name.clone(), p.ip.clone()?)))
        .collect();
    let (due, past) = track_outside(
        &mut ctx.peers.outside.lock().expect("outside lock"),
        &format!("{namespace}/{name}"),
        &outside,
        Instant::now(),
        OUTSIDE_GOSSIP_BOUND,
    );
    ctx.metrics.servers_outside_gossip.set(past);
    for (pod, ip, for_) in due {
        let seen = leader
            .members
            .get(&pod)
            .map_or("no member of that name".to_owned(), |m| {
                format!("{:?} at {}", m.status, m.addr)
            });
        let note = format!(
            "pod {pod} has run at {ip} for {}s without being a live member of the Dkron cluster's gossip there (the leader's serf has {seen}); its Dkron may have lost a name conflict and stopped gossiping: see its log for 'Serf shutdown detected' and restart the pod",
            for_.as_secs()
        );
        tracing::warn!(%namespace, statefulset = %name, %pod, %ip, seen = %seen, "a running server pod is outside the cluster's gossip");
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(namespace.to_owned()),
            name: Some(pod.clone()),
            ..Default::default()
        };
        let event = kube::runtime::events::Event {
            type_: EventType::Warning,
            reason: REASON_OUTSIDE_GOSSIP.into(),
            note: Some(note.clone()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(error) = ctx.recorder.publish(&event, &reference).await {
            tracing::warn!(%error, %pod, "cannot publish event");
        }
        super::publish_about(
            ctx,
            sts,
            EventType::Warning,
            REASON_OUTSIDE_GOSSIP,
            note,
            Some(reference),
        )
        .await;
    }
}

/// The reason of the Events [`report_outside_gossip`] writes.
pub const REASON_OUTSIDE_GOSSIP: &str = "ServerOutsideGossip";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_outside_the_gossip_is_reported_once_past_the_bound_and_forgotten_when_back() {
        let bound = Duration::from_secs(150);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut all = HashMap::new();
        let out = |pods: &[(&str, &str)]| -> Vec<(String, String)> {
            pods.iter()
                .map(|(p, ip)| (p.to_string(), ip.to_string()))
                .collect()
        };
        let a = out(&[("dkron-2", "10.0.2.9")]);
        assert_eq!(
            track_outside(&mut all, "ns/dkron", &a, at(0), bound),
            (vec![], 0)
        );
        assert_eq!(
            track_outside(&mut all, "ns/dkron", &a, at(149), bound),
            (vec![], 0)
        );
        assert_eq!(
            track_outside(&mut all, "ns/dkron", &a, at(151), bound),
            (
                vec![(
                    "dkron-2".to_owned(),
                    "10.0.2.9".to_owned(),
                    Duration::from_secs(151)
                )],
                1
            )
        );
        // Reported once; still counted while it stays outside, with another StatefulSet's too.
        assert_eq!(
            track_outside(&mut all, "ns/dkron", &a, at(200), bound),
            (vec![], 1)
        );
        let b = out(&[("other-0", "10.0.3.3")]);
        assert_eq!(track_outside(&mut all, "ns/other", &b, at(201), bound).1, 1);
        assert_eq!(
            track_outside(&mut all, "ns/other", &b, at(352), bound)
                .0
                .len(),
            1
        );
        assert_eq!(track_outside(&mut all, "ns/dkron", &a, at(353), bound).1, 2);
        // A new pod of the same name (another IP) starts over; one back in the gossip is gone.
        let c = out(&[("dkron-2", "10.0.2.10")]);
        assert_eq!(
            track_outside(&mut all, "ns/dkron", &c, at(354), bound),
            (vec![], 1)
        );
        assert_eq!(
            track_outside(&mut all, "ns/other", &[], at(355), bound),
            (vec![], 0)
        );
    }
}
