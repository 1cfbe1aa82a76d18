//! The raft peer decision: which servers of a Dkron cluster to remove, as a pure function of
//! the raft configuration, serf membership, the StatefulSet and its pods. Dkron never removes
//! dead or failed servers itself; leaving them makes every later failure cost quorum.
//!
//! The rule that bounds everything: a server whose pod exists and whose serf member is alive is
//! never removed, and neither is the leader.

use std::collections::HashMap;

/// One server of the raft configuration (`RaftGetConfiguration`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaftServer {
    /// Raft server id = Dkron node name = pod name.
    pub id: String,
    /// `host:port` of raft (6868).
    pub address: String,
    pub leader: bool,
}

/// Serf member status as Dkron's `/v1/members` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberStatus {
    Alive,
    Leaving,
    Left,
    Failed,
    Unknown,
}

impl MemberStatus {
    /// Serf's numeric status: 1 alive, 2 leaving, 3 left, 4 failed.
    pub fn from_code(code: i64) -> Self {
        match code {
            1 => Self::Alive,
            2 => Self::Leaving,
            3 => Self::Left,
            4 => Self::Failed,
            _ => Self::Unknown,
        }
    }
}

/// A pod of the StatefulSet as the API server has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodState {
    pub name: String,
    pub ip: Option<String>,
}

/// What the StatefulSet says should exist; `None` when it is gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatefulSetState {
    pub name: String,
    pub replicas: i32,
}

/// Why a server goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RemovalReason {
    /// Ordinal at or above `spec.replicas` and its pod is gone (scale-down).
    ScaledDown { ordinal: i32, replicas: i32 },
    /// The StatefulSet is deleted and the pod is gone.
    StatefulSetGone,
    /// Failed in serf and its pod was replaced (new IP) or deleted.
    FailedAndReplaced,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Removal {
    pub id: String,
    pub reason: RemovalReason,
}

/// The ordinal of `pod` in StatefulSet `sts` (`<sts>-<n>`), if it is one of its names.
pub fn ordinal(sts: &str, pod: &str) -> Option<i32> {
    let n = pod.strip_prefix(sts)?.strip_prefix('-')?;
    if n.is_empty() || (n.len() > 1 && n.starts_with('0')) {
        return None;
    }
    n.parse().ok()
}

fn host(address: &str) -> &str {
    address
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .unwrap_or(address)
}

/// Decides which raft servers of StatefulSet `sts_name` to remove.
pub fn raft_servers_to_remove(
    sts_name: &str,
    statefulset: Option<&StatefulSetState>,
    servers: &[RaftServer],
    members: &HashMap<String, MemberStatus>,
    pods: &[PodState],
) -> Vec<Removal> {
    let pods: HashMap<&str, &PodState> = pods.iter().map(|p| (p.name.as_str(), p)).collect();
    let mut removals = Vec::new();
    for server in servers {
        let Some(n) = ordinal(sts_name, &server.id) else {
            continue; // not one of ours
        };
        if server.leader {
            continue;
        }
        let pod = pods.get(server.id.as_str());
        let status = members
            .get(&server.id)
            .copied()
            .unwrap_or(MemberStatus::Unknown);
        let alive = status == MemberStatus::Alive;
        if alive && pod.is_some() {
            continue;
        }
        let reason = match (statefulset, pod) {
            (None, None) => Some(RemovalReason::StatefulSetGone),
            (Some(s), None) if n >= s.replicas => Some(RemovalReason::ScaledDown {
                ordinal: n,
                replicas: s.replicas,
            }),
            (Some(_), None) if status == MemberStatus::Failed => {
                Some(RemovalReason::FailedAndReplaced)
            }
            (Some(_), Some(p))
                if status == MemberStatus::Failed
                    && p.ip
                        .as_deref()
                        .is_some_and(|ip| ip != host(&server.address)) =>
            {
                Some(RemovalReason::FailedAndReplaced)
            }
            _ => None,
        };
        if let Some(reason) = reason {
            removals.push(Removal {
                id: server.id.clone(),
                reason,
            });
        }
    }
    // Never empty the configuration.
    if removals.len() >= servers.len() {
        removals.clear();
    }
    removals
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(id: &str, ip: &str, leader: bool) -> RaftServer {
        RaftServer {
            id: id.into(),
            address: format!("{ip}:6868"),
            leader,
        }
    }

    fn pod(name: &str, ip: &str) -> PodState {
        PodState {
            name: name.into(),
            ip: Some(ip.into()),
        }
    }

    fn members(list: &[(&str, MemberStatus)]) -> HashMap<String, MemberStatus> {
        list.iter().map(|(n, s)| (n.to_string(), *s)).collect()
    }

    fn sts(replicas: i32) -> StatefulSetState {
        StatefulSetState {
            name: "dkron".into(),
            replicas,
        }
    }

    #[test]
    fn ordinals_parse_only_our_names() {
        assert_eq!(ordinal("dkron", "dkron-2"), Some(2));
        assert_eq!(ordinal("dkron", "dkron-12"), Some(12));
        assert_eq!(ordinal("dkron", "dkron-02"), None);
        assert_eq!(ordinal("dkron", "dkron-ha-0"), None);
        assert_eq!(ordinal("dkron", "other-0"), None);
    }

    #[test]
    fn a_healthy_cluster_loses_nobody() {
        let servers = [
            server("dkron-0", "10.0.0.1", true),
            server("dkron-1", "10.0.0.2", false),
            server("dkron-2", "10.0.0.3", false),
        ];
        let m = members(&[
            ("dkron-0", MemberStatus::Alive),
            ("dkron-1", MemberStatus::Alive),
            ("dkron-2", MemberStatus::Alive),
        ]);
        let pods = [
            pod("dkron-0", "10.0.0.1"),
            pod("dkron-1", "10.0.0.2"),
            pod("dkron-2", "10.0.0.3"),
        ];
        assert!(raft_servers_to_remove("dkron", Some(&sts(3)), &servers, &m, &pods).is_empty());
    }

    #[test]
    fn scale_down_removes_the_ordinals_above_replicas_once_their_pods_are_gone() {
        let servers: Vec<_> = (0..5)
            .map(|i| server(&format!("dkron-{i}"), &format!("10.0.0.{i}"), i == 0))
            .collect();
        let m = members(&[
            ("dkron-0", MemberStatus::Alive),
            ("dkron-1", MemberStatus::Alive),
            ("dkron-2", MemberStatus::Alive),
            ("dkron-3", MemberStatus::Left),
            ("dkron-4", MemberStatus::Failed),
        ]);
        let pods: Vec<_> = (0..3)
            .map(|i| pod(&format!("dkron-{i}"), &format!("10.0.0.{i}")))
            .collect();
        let ids: Vec<_> = raft_servers_to_remove("dkron", Some(&sts(3)), &servers, &m, &pods)
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, ["dkron-3", "dkron-4"]);
        // While dkron-4's pod still terminates (and is alive), it stays.
        let mut with_pod = pods.clone();
        with_pod.push(pod("dkron-4", "10.0.0.4"));
        let m2 = members(&[
            ("dkron-4", MemberStatus::Alive),
            ("dkron-3", MemberStatus::Left),
        ]);
        let ids: Vec<_> = raft_servers_to_remove("dkron", Some(&sts(3)), &servers, &m2, &with_pod)
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, ["dkron-3"]);
    }

    #[test]
    fn a_failed_member_whose_pod_came_back_with_a_new_ip_is_removed() {
        let servers = [
            server("dkron-0", "10.0.0.1", true),
            server("dkron-1", "10.0.0.2", false),
        ];
        let m = members(&[
            ("dkron-0", MemberStatus::Alive),
            ("dkron-1", MemberStatus::Failed),
        ]);
        let pods = [pod("dkron-0", "10.0.0.1"), pod("dkron-1", "10.0.9.9")];
        let removals = raft_servers_to_remove("dkron", Some(&sts(2)), &servers, &m, &pods);
        assert_eq!(removals[0].reason, RemovalReason::FailedAndReplaced);
        // Same IP: it is restarting in place, leave it.
        let pods = [pod("dkron-0", "10.0.0.1"), pod("dkron-1", "10.0.0.2")];
        assert!(raft_servers_to_remove("dkron", Some(&sts(2)), &servers, &m, &pods).is_empty());
    }

    #[test]
    fn the_leader_and_foreign_servers_are_never_removed() {
        let servers = [
            server("dkron-0", "10.0.0.1", true),
            server("someone-else", "10.0.0.7", false),
            server("dkron-1", "10.0.0.2", false),
        ];
        let m = members(&[("someone-else", MemberStatus::Failed)]);
        let removals = raft_servers_to_remove("dkron", None, &servers, &m, &[]);
        assert_eq!(removals.len(), 1);
        assert_eq!(removals[0].id, "dkron-1");
        assert_eq!(removals[0].reason, RemovalReason::StatefulSetGone);
    }

    #[test]
    fn the_configuration_is_never_emptied() {
        let servers = [server("dkron-3", "10.0.0.1", false)];
        assert!(
            raft_servers_to_remove("dkron", Some(&sts(1)), &servers, &HashMap::new(), &[])
                .is_empty()
        );
    }
}
