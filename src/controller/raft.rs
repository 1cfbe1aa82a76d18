//! The raft decisions, as pure functions of the leader's raft configuration, the leader's serf
//! members and the StatefulSet's pods: which server to remove (Dkron never removes a server
//! that is gone for good), and which pods are raft voters (the `dkron-ha/raft-voter` readiness
//! condition).
//!
//! A StatefulSet's replaced pod keeps its name, so its raft id, and Dkron re-addresses it in
//! place when it returns; for 40–60 s after every restart with a new IP serf shows it failed at
//! its old address and raft keeps the old address (measured on Dkron v4.1.2). So a server is
//! removed only when its pod must not exist any more: ordinal >= replicas, once that pod is gone.

use std::collections::HashMap;

pub use crate::dkron::MemberStatus;
use crate::dkron::grpc::RaftServer;

/// A serf member as the leader sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub status: MemberStatus,
    /// The address serf last heard it at.
    pub addr: String,
}

/// A pod of the StatefulSet as the API server has it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodState {
    pub name: String,
    pub ip: Option<String>,
    /// The pod's `dkron-ha/raft-voter` condition: `None` while it has none.
    pub voter_condition: Option<bool>,
    /// The leader's `rpc_addr` as the pod's own Dkron names it (`GET /v1/leader`), if it names one.
    pub leader_seen: Option<String>,
    /// How many jobs the pod's Dkron has, if it says.
    pub jobs: Option<u64>,
}

/// What the leader says: its raft configuration and its serf members by name.
#[derive(Clone, Debug, Default)]
pub struct LeaderView {
    /// The leader's raft and gRPC address.
    pub rpc_addr: String,
    pub servers: Vec<RaftServer>,
    pub members: HashMap<String, Member>,
    /// How many jobs the leader has, if it says.
    pub jobs: Option<u64>,
}

/// One raft server to remove, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Removal {
    pub id: String,
    pub ordinal: i32,
    pub replicas: i32,
    pub status: MemberStatus,
}

impl std::fmt::Display for Removal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "raft server {} has ordinal {} >= replicas {}, its pod is gone and serf says {:?}",
            self.id, self.ordinal, self.replicas, self.status
        )
    }
}

/// The ordinal of `pod` in StatefulSet `sts` (`<sts>-<n>`), if it is one of its names.
pub fn ordinal(sts: &str, pod: &str) -> Option<i32> {
    let n = pod.strip_prefix(sts)?.strip_prefix('-')?;
    if n.is_empty() || (n.len() > 1 && n.starts_with('0')) || !n.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    n.parse().ok()
}

/// A majority of `n` voters.
fn majority(n: i32) -> i32 {
    n / 2 + 1
}

/// The one raft server of StatefulSet `sts` (with `replicas` wanted) to remove now, if any:
/// the highest ordinal >= `replicas` whose pod is gone and whose serf member is not alive, as long
/// as the voters left are still a majority of `replicas`. Never the leader, never a server whose
/// pod exists, never a server id that is not one of this StatefulSet's pod names. One at a time:
/// the caller asks again once the removal is in the configuration.
pub fn raft_server_to_remove(
    sts: &str,
    replicas: i32,
    view: &LeaderView,
    pods: &[PodState],
) -> Option<Removal> {
    let voters = view.servers.iter().filter(|s| s.voter).count() as i32;
    view.servers
        .iter()
        .filter(|s| !s.leader)
        .filter(|s| !pods.iter().any(|p| p.name == s.id))
        .filter_map(|s| {
            let n = ordinal(sts, &s.id)?;
            let status = view
                .members
                .get(&s.id)
                .map_or(MemberStatus::Unknown, |m| m.status);
            // An alive (or leaving) member still runs somewhere: wait until serf sees it go.
            let running = matches!(status, MemberStatus::Alive | MemberStatus::Leaving);
            let left_after = voters - i32::from(s.voter);
            (n >= replicas && !running && left_after >= majority(replicas)).then(|| Removal {
                id: s.id.clone(),
                ordinal: n,
                replicas,
                status,
            })
        })
        .max_by_key(|r| r.ordinal)
}

/// Whether `pod` is a raft voter in the leader's view: a voter of the configuration under its
/// name, alive in serf at the pod's own IP (so not a previous incarnation at an old address),
/// its own Dkron names the leader, and it has as many jobs as the leader (when the leader says
/// how many). The last two mean the leader's raft reaches it again and it has caught up: a
/// restarted server is a voter and alive long before that (raft's replication to it backs off
/// while it was away; measured on Dkron v4.1.2 and the stand-in: jobs from before a restart
/// reached it up to 29 s after it was alive, and after it named the leader again), and a
/// server that has not caught up cannot help a commit.
fn is_voter(view: &LeaderView, pod: &PodState) -> bool {
    let voter = view.servers.iter().any(|s| s.id == pod.name && s.voter);
    let alive_here = is_member_here(view, pod);
    let follows = pod.leader_seen.as_deref() == Some(view.rpc_addr.as_str());
    let caught_up = view.jobs.is_none() || pod.jobs == view.jobs;
    // Catching up gates becoming a voter only: a job created between two counts, or one slow
    // answer, must not make a voter flap.
    let was_voter = pod.voter_condition == Some(true);
    voter && alive_here && (was_voter || (follows && caught_up))
}

/// Whether the leader's serf has `pod` alive at the pod's own IP (not a previous incarnation at
/// an old address).
fn is_member_here(view: &LeaderView, pod: &PodState) -> bool {
    view.members.get(&pod.name).is_some_and(|m| {
        m.status == MemberStatus::Alive && Some(m.addr.as_str()) == pod.ip.as_deref()
    })
}

/// The pods that run (they have an IP) but are no live member of the cluster's gossip at that
/// IP in the leader's view: their Dkron has not joined yet, or it joined and lost (a name
/// conflict with an earlier pod that did not leave shuts a new member's serf down for good).
/// The caller reports those that stay so for longer than a join takes.
pub fn outside_gossip<'a>(view: &LeaderView, pods: &'a [PodState]) -> Vec<&'a PodState> {
    pods.iter()
        .filter(|p| p.ip.is_some() && !is_member_here(view, p))
        .collect()
}

/// The `dkron-ha/raft-voter` conditions to write: `(pod, value)` for each pod whose condition
/// differs from what it should be.
///
/// With a leader's view, a pod is True exactly while [`is_voter`]. Without one (no leader found:
/// an election, or a cluster not formed yet) nothing changes, with one exception: while no pod of
/// the StatefulSet is True at all (a cold start, or every server restarted), pods with an IP and
/// no condition yet become True. Otherwise an `OrderedReady` StatefulSet would never create the
/// pods a first leader needs (`--bootstrap-expect`), and a raft-unaware start order deadlocks.
pub fn voter_conditions(view: Option<&LeaderView>, pods: &[PodState]) -> Vec<(String, bool)> {
    match view {
        Some(view) => pods
            .iter()
            .filter_map(|p| {
                let want = is_voter(view, p);
                (p.voter_condition != Some(want)).then(|| (p.name.clone(), want))
            })
            .collect(),
        None if pods.iter().all(|p| p.voter_condition != Some(true)) => pods
            .iter()
            .filter(|p| p.voter_condition.is_none() && p.ip.is_some())
            .map(|p| (p.name.clone(), true))
            .collect(),
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(id: &str, ip: &str, leader: bool) -> RaftServer {
        RaftServer {
            id: id.into(),
            node: id.into(),
            address: format!("{ip}:6868"),
            leader,
            voter: true,
            raft_protocol: "3".into(),
        }
    }

    fn pod(name: &str, ip: &str) -> PodState {
        PodState {
            name: name.into(),
            ip: Some(ip.into()),
            voter_condition: None,
            leader_seen: Some("10.0.0.0:6868".into()),
            jobs: Some(2),
        }
    }

    fn member(status: MemberStatus, ip: &str) -> Member {
        Member {
            status,
            addr: ip.into(),
        }
    }

    /// `n` voters dkron-0..n (dkron-0 leads) with the given serf statuses, all at 10.0.0.i.
    fn view(statuses: &[MemberStatus]) -> LeaderView {
        LeaderView {
            rpc_addr: "10.0.0.0:6868".into(),
            servers: (0..statuses.len())
                .map(|i| server(&format!("dkron-{i}"), &format!("10.0.0.{i}"), i == 0))
                .collect(),
            members: statuses
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("dkron-{i}"), member(*s, &format!("10.0.0.{i}"))))
                .collect(),
            jobs: Some(2),
        }
    }

    fn pods(n: usize) -> Vec<PodState> {
        (0..n)
            .map(|i| pod(&format!("dkron-{i}"), &format!("10.0.0.{i}")))
            .collect()
    }

    use MemberStatus::*;

    #[test]
    fn ordinals_parse_only_our_names() {
        assert_eq!(ordinal("dkron", "dkron-2"), Some(2));
        assert_eq!(ordinal("dkron", "dkron-12"), Some(12));
        assert_eq!(ordinal("dkron", "dkron-02"), None);
        assert_eq!(ordinal("dkron", "dkron-+2"), None);
        assert_eq!(ordinal("dkron", "dkron-ha-0"), None);
        assert_eq!(ordinal("dkron", "other-0"), None);
    }

    #[test]
    fn a_healthy_cluster_loses_nobody() {
        let v = view(&[Alive, Alive, Alive]);
        assert_eq!(raft_server_to_remove("dkron", 3, &v, &pods(3)), None);
    }

    #[test]
    fn scale_down_removes_the_highest_ordinal_above_replicas_once_its_pod_is_gone() {
        let v = view(&[Alive, Alive, Alive, Left, Failed]);
        let removal = raft_server_to_remove("dkron", 3, &v, &pods(3)).expect("a removal");
        assert_eq!((removal.id.as_str(), removal.ordinal), ("dkron-4", 4));
        assert_eq!(removal.status, Failed);
        // Then the next one, once dkron-4 is out of the configuration.
        let mut after = v.clone();
        after.servers.retain(|s| s.id != "dkron-4");
        let removal = raft_server_to_remove("dkron", 3, &after, &pods(3)).expect("a removal");
        assert_eq!(removal.id, "dkron-3");
    }

    #[test]
    fn a_scaled_down_server_whose_pod_still_exists_or_still_runs_stays() {
        let v = view(&[Alive, Alive, Alive, Failed]);
        assert_eq!(raft_server_to_remove("dkron", 3, &v, &pods(4)), None);
        let v = view(&[Alive, Alive, Alive, Alive]);
        assert_eq!(raft_server_to_remove("dkron", 3, &v, &pods(3)), None);
        let v = view(&[Alive, Alive, Alive, Leaving]);
        assert_eq!(raft_server_to_remove("dkron", 3, &v, &pods(3)), None);
        // Unknown to serf (reaped) and its pod gone: it goes.
        let mut v = view(&[Alive, Alive, Alive, Failed]);
        v.members.remove("dkron-3");
        let removal = raft_server_to_remove("dkron", 3, &v, &pods(3)).expect("a removal");
        assert_eq!(removal.status, Unknown);
    }

    #[test]
    fn a_server_restarting_with_a_new_ip_is_never_removed() {
        // Every restart with a new IP: serf says failed at the old address, raft keeps the old
        // address, the pod exists with its new IP (or is briefly gone between two pods).
        let v = view(&[Alive, Failed, Alive]);
        let mut p = pods(3);
        p[1].ip = Some("10.0.9.9".into());
        assert_eq!(raft_server_to_remove("dkron", 3, &v, &p), None);
        p.remove(1);
        assert_eq!(raft_server_to_remove("dkron", 3, &v, &p), None);
    }

    #[test]
    fn the_leader_and_foreign_servers_are_never_removed() {
        let mut v = view(&[Failed, Alive, Alive, Failed]);
        v.servers.push(server("someone-else", "10.0.0.7", false));
        v.members
            .insert("someone-else".into(), member(Failed, "10.0.0.7"));
        v.servers.push(server("dkron-ha-5", "10.0.0.8", false));
        // Scaled to 1, dkron-0 (the leader, failed in serf) has no pod: still never removed.
        let p = vec![pod("dkron-1", "10.0.0.1")];
        let removal = raft_server_to_remove("dkron", 1, &v, &p);
        assert_eq!(removal.map(|r| r.id), Some("dkron-3".into()));
        let p = pods(4);
        assert_eq!(raft_server_to_remove("dkron", 1, &v, &p), None);
    }

    #[test]
    fn removals_never_leave_fewer_voters_than_a_majority_of_replicas() {
        // replicas 3, only 2 voters left plus a dead ordinal 3: removing it would leave 1 < 2.
        let mut v = view(&[Alive, Failed, Alive, Failed]);
        v.servers.retain(|s| s.id != "dkron-1");
        assert_eq!(v.servers.iter().filter(|s| s.voter).count(), 3);
        v.servers.retain(|s| s.id != "dkron-2");
        assert_eq!(raft_server_to_remove("dkron", 3, &v, &pods(2)), None);
        // A non-voter does not count, and may go.
        let mut v = view(&[Alive, Alive, Alive, Failed]);
        v.servers[3].voter = false;
        v.servers.truncate(4);
        let p = pods(3);
        assert_eq!(
            raft_server_to_remove("dkron", 3, &v, &p).map(|r| r.id),
            Some("dkron-3".into())
        );
        // Scale 3 -> 1 goes all the way down to the one server.
        let v = view(&[Alive, Failed]);
        assert_eq!(
            raft_server_to_remove("dkron", 1, &v, &pods(1)).map(|r| r.id),
            Some("dkron-1".into())
        );
    }

    #[test]
    fn a_pod_is_a_voter_only_while_alive_at_its_own_ip_and_voting() {
        let v = view(&[Alive, Alive, Failed]);
        let mut p = pods(3);
        assert_eq!(
            voter_conditions(Some(&v), &p),
            [
                ("dkron-0".to_owned(), true),
                ("dkron-1".to_owned(), true),
                ("dkron-2".to_owned(), false)
            ]
        );
        // Written once, then nothing changes.
        for (pod, value) in [(0, true), (1, true), (2, false)] {
            p[pod].voter_condition = Some(value);
        }
        assert!(voter_conditions(Some(&v), &p).is_empty());
        // dkron-1 came back with a new IP: serf still has it alive at the old one until it
        // rejoins, which is not this pod yet.
        p[1].ip = Some("10.0.9.9".into());
        assert_eq!(
            voter_conditions(Some(&v), &p),
            [("dkron-1".to_owned(), false)]
        );
        // Alive and voting, but its Dkron names no leader yet (raft has not reached it again).
        let mut back = p.clone();
        back[1].ip = Some("10.0.0.1".into());
        back[1].voter_condition = Some(false);
        back[1].leader_seen = None;
        assert!(voter_conditions(Some(&v), &back).is_empty());
        back[1].leader_seen = Some("10.0.0.0:6868".into());
        // Naming the leader, but a job short of it: not caught up.
        back[1].jobs = Some(1);
        assert!(voter_conditions(Some(&v), &back).is_empty());
        back[1].jobs = None;
        assert!(voter_conditions(Some(&v), &back).is_empty());
        // A leader that does not say how many jobs it has: not a criterion.
        let mut quiet = v.clone();
        quiet.jobs = None;
        assert_eq!(
            voter_conditions(Some(&quiet), &back),
            [("dkron-1".to_owned(), true)]
        );
        back[1].jobs = Some(2);
        // Once a voter, a count that differs for a moment does not demote it.
        let mut voting = back.clone();
        voting[1].voter_condition = Some(true);
        voting[1].jobs = Some(1);
        voting[1].leader_seen = None;
        assert!(voter_conditions(Some(&v), &voting).is_empty());
        assert_eq!(
            voter_conditions(Some(&v), &back),
            [("dkron-1".to_owned(), true)]
        );
        // A non-voter is not a voter.
        let mut v = view(&[Alive, Alive, Alive]);
        v.servers[2].voter = false;
        p[1].ip = Some("10.0.0.1".into());
        p[2].voter_condition = Some(true);
        assert_eq!(
            voter_conditions(Some(&v), &p),
            [("dkron-2".to_owned(), false)]
        );
    }

    #[test]
    fn a_running_pod_not_alive_in_gossip_at_its_own_ip_is_outside() {
        let names = |outside: Vec<&PodState>| -> Vec<String> {
            outside.iter().map(|p| p.name.clone()).collect()
        };
        let v = view(&[Alive, Alive, Failed]);
        let mut p = pods(3);
        assert_eq!(names(outside_gossip(&v, &p)), ["dkron-2"]);
        // Serf still has dkron-1 alive at the address of the pod before this one.
        p[1].ip = Some("10.0.9.9".into());
        assert_eq!(names(outside_gossip(&v, &p)), ["dkron-1", "dkron-2"]);
        // A pod without an IP does not run yet; a pod serf does not know at all is outside.
        p[2].ip = None;
        p.push(pod("dkron-3", "10.0.0.3"));
        assert_eq!(names(outside_gossip(&v, &p)), ["dkron-1", "dkron-3"]);
        assert!(outside_gossip(&view(&[Alive, Alive, Alive]), &pods(3)).is_empty());
    }

    #[test]
    fn without_a_leader_only_a_cold_start_lets_pods_become_ready() {
        // Cold start: nobody True yet, pods with an IP and no condition become True.
        let mut p = pods(2);
        p.push(PodState {
            name: "dkron-2".into(),
            ..Default::default()
        });
        assert_eq!(
            voter_conditions(None, &p),
            [("dkron-0".to_owned(), true), ("dkron-1".to_owned(), true)]
        );
        // An election in a formed cluster: a new pod waits for the leader's view.
        p[0].voter_condition = Some(true);
        p[2].ip = Some("10.0.0.2".into());
        assert!(voter_conditions(None, &p).is_empty());
        // Nobody True any more (every server stopped): the allowance again.
        p[0].voter_condition = Some(false);
        p[1].voter_condition = Some(false);
        assert_eq!(voter_conditions(None, &p), [("dkron-2".to_owned(), true)]);
    }
}
