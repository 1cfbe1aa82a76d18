//! How the cluster's gossip (serf) sees this server, for `wrap`: the wait that keeps Dkron from
//! starting into a name conflict, and the watch that restarts a Dkron whose serf has shut down.
//!
//! Why (seen on real Dkron v4.1.2 when a running plain cluster was opted in): a server that
//! stops without a leave that got out (plain Dkron's SIGTERM handler exits while its leave still
//! runs; a crash) stays alive in its peers' serf at its old address for several seconds. A new
//! pod of the same name that joins in that window meets its own name alive elsewhere: memberlist
//! reports the conflict, serf asks the cluster who owns the name, the majority vouches for the
//! old address, and the new member shuts its own serf down (hashicorp/serf `handleNodeConflict`
//! and `resolveNodeConflict`). Dkron logs "Serf shutdown detected, quitting" and runs on without
//! gossip: never a member again, never Ready, and its process alive.
//!
//! Decisions are pure ([`name_conflict`], [`serf_check`]); the rest asks Dkron over HTTP and
//! probes the local serf port.

use crate::dkron::{self, DkronClient, MemberStatus, SerfMember};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// How long `wrap` waits by default (`DKRON_HA_NAME_WAIT_SECONDS`) for the peers to stop
/// seeing this server's name alive at another address. Memberlist declares an unreachable member failed within about 5–25 s (a missed
/// probe, then the LAN suspicion timeout of 4–24 s); the bound leaves room for a slow probe
/// round. After it Dkron starts anyway, and the [`SerfWatch`] brings it back if it loses.
pub const NAME_CONFLICT_WAIT: Duration = Duration::from_secs(60);
/// Pause between two asks of the peers while the name is taken.
const NAME_POLL: Duration = Duration::from_millis(500);
/// Bound of one ask of one peer.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// A peer's serf that still holds this server's name alive at another address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameConflict {
    /// The peer that answered.
    pub peer: String,
    /// The address it holds the name at.
    pub addr: String,
    /// Serf's status code there (1 alive, 2 leaving).
    pub status: u64,
}

/// The first peer whose serf lists `node` alive (or leaving: memberlist still has it alive) at
/// an address other than `own_ip` (pure). A name listed left or failed, at this address, or not
/// at all is free: memberlist lets a left name take a new address at once, and a failed one
/// after its dead entry is dropped; neither makes the newcomer shut down.
pub fn name_conflict(
    node: &str,
    own_ip: IpAddr,
    answers: &[(String, Option<Vec<SerfMember>>)],
) -> Option<NameConflict> {
    answers.iter().find_map(|(peer, members)| {
        let member = members.as_ref()?.iter().find(|m| m.name == node)?;
        let alive = matches!(
            MemberStatus::from_code(member.status),
            MemberStatus::Alive | MemberStatus::Leaving
        );
        let elsewhere = member.addr.parse::<IpAddr>().ok() != Some(own_ip);
        (alive && elsewhere).then(|| NameConflict {
            peer: peer.clone(),
            addr: member.addr.clone(),
            status: member.status,
        })
    })
}

/// Whose serf to ask about this server's name, and what this server is called and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameCheck {
    /// Host names of the other servers (their HTTP API on [`dkron::HTTP_PORT`]).
    pub peers: Vec<String>,
    /// This server's serf name.
    pub node_name: String,
    /// This pod's IP.
    pub own_ip: IpAddr,
    /// How long to wait at most.
    pub bound: Duration,
}

/// Every peer's `GET /v1/members`, concurrently; `None` for a peer that does not answer one.
async fn ask_members(
    client: &DkronClient,
    peers: &[String],
) -> Vec<(String, Option<Vec<SerfMember>>)> {
    let asks = peers.iter().map(|peer| async move {
        let members = client
            .members(peer, dkron::HTTP_PORT, ASK_TIMEOUT)
            .await
            .ok()
            .flatten();
        (peer.clone(), members)
    });
    futures::future::join_all(asks).await
}

/// Waits, at most the check's bound, until no peer holds this server's name alive at
/// another address, so that Dkron's join does not lose a name conflict. Returns whether the
/// name was free in the end (logged either way when it had to wait).
pub async fn until_name_free(check: &NameCheck) -> bool {
    let Ok(client) = DkronClient::new() else {
        return false;
    };
    let started = Instant::now();
    let mut logged: Option<Instant> = None;
    loop {
        let answers = ask_members(&client, &check.peers).await;
        let waited_ms = started.elapsed().as_millis() as u64;
        let Some(conflict) = name_conflict(&check.node_name, check.own_ip, &answers) else {
            if logged.is_some() {
                tracing::info!(
                    waited_ms,
                    "no peer holds this server's name at another address any more: starting Dkron"
                );
            }
            return true;
        };
        if started.elapsed() >= check.bound {
            tracing::warn!(peer = %conflict.peer, addr = %conflict.addr, status = conflict.status, waited_ms,
                "a peer still holds this server's name alive at another address; starting Dkron anyway (if its join loses the name conflict, the serf watch restarts it)");
            return false;
        }
        if logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            tracing::info!(peer = %conflict.peer, addr = %conflict.addr, status = conflict.status, own_ip = %check.own_ip, waited_ms,
                bound_s = check.bound.as_secs(),
                "a peer holds this server's name alive at another address (an earlier pod that did not leave): waiting until it sees that one gone, or Dkron's join would lose the name conflict and shut its serf down");
            logged = Some(Instant::now());
        }
        tokio::time::sleep(NAME_POLL).await;
    }
}

/// The watch of the local Dkron's serf: while Dkron runs, its serf listens on its gossip port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerfWatch {
    /// `host:port` of the local Dkron's HTTP API.
    pub http: (String, u16),
    /// This server's serf name (its own entry in `/v1/members` gives the gossip port).
    pub node_name: String,
    /// Where the gossip port listens (Dkron binds serf to the pod IP by default).
    pub own_ip: IpAddr,
}

/// What one look at the local serf found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SerfProbe {
    /// The gossip port accepts connections.
    Listening,
    /// Dkron answers HTTP, but its gossip port refuses connections: its serf has shut down.
    Refused,
    /// No verdict: Dkron does not answer, or the probe timed out.
    Unknown,
}

/// The serf watch's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SerfCheck {
    Healthy,
    /// Refused once: look again before acting.
    Suspect,
    /// Refused on [`SERF_DOWN_CONFIRMATIONS`] looks in a row: restart Dkron.
    Restart,
}

/// Looks in a row that must find the gossip port refused before Dkron is restarted: one could
/// be a Dkron that is stopping on its own.
pub const SERF_DOWN_CONFIRMATIONS: u32 = 2;

/// Decides the serf watch (pure): `refusals` counts the looks in a row that found the port
/// refused, this one included.
pub fn serf_check(probe: SerfProbe, refusals: &mut u32) -> SerfCheck {
    match probe {
        SerfProbe::Listening => {
            *refusals = 0;
            SerfCheck::Healthy
        }
        SerfProbe::Unknown => SerfCheck::Healthy,
        SerfProbe::Refused => {
            *refusals += 1;
            if *refusals >= SERF_DOWN_CONFIRMATIONS {
                SerfCheck::Restart
            } else {
                SerfCheck::Suspect
            }
        }
    }
}

/// How often the serf watch looks.
pub const SERF_POLL: Duration = Duration::from_secs(2);

/// One look at the local serf: the gossip port from Dkron's own member entry (`GET
/// /v1/members`; a shut-down serf still lists itself there), then a TCP connect to it.
pub async fn probe_serf(client: &DkronClient, watch: &SerfWatch) -> SerfProbe {
    let (host, port) = &watch.http;
    let members = match client.members(host, *port, ASK_TIMEOUT).await {
        Ok(Some(members)) => members,
        _ => return SerfProbe::Unknown,
    };
    let Some(own) = members.iter().find(|m| m.name == watch.node_name) else {
        return SerfProbe::Unknown;
    };
    let Some(gossip_port) = own.port.filter(|p| *p != 0) else {
        return SerfProbe::Unknown;
    };
    let addr = SocketAddr::new(watch.own_ip, gossip_port);
    match tokio::time::timeout(ASK_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => SerfProbe::Listening,
        Ok(Err(error)) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
            SerfProbe::Refused
        }
        _ => SerfProbe::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, addr: &str, status: u64) -> SerfMember {
        SerfMember {
            name: name.into(),
            addr: addr.into(),
            port: Some(8946),
            status,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_name_alive_or_leaving_at_another_address_is_a_conflict_and_nothing_else_is() {
        let own = ip("10.0.1.9");
        let seen = |members: Vec<SerfMember>| vec![("dkron-0".to_owned(), Some(members))];
        let old = |status| {
            seen(vec![
                member("dkron-0", "10.0.1.1", 1),
                member("dkron-2", "10.0.2.7", status),
            ])
        };
        assert_eq!(
            name_conflict("dkron-2", own, &old(1)),
            Some(NameConflict {
                peer: "dkron-0".into(),
                addr: "10.0.2.7".into(),
                status: 1
            })
        );
        assert!(name_conflict("dkron-2", own, &old(2)).is_some());
        // Left or failed elsewhere: memberlist does not make the newcomer shut down.
        assert_eq!(name_conflict("dkron-2", own, &old(3)), None);
        assert_eq!(name_conflict("dkron-2", own, &old(4)), None);
        // Alive here (a container restart keeps the pod IP), unknown, or no answer.
        assert_eq!(
            name_conflict(
                "dkron-2",
                own,
                &seen(vec![member("dkron-2", "10.0.1.9", 1)])
            ),
            None
        );
        assert_eq!(name_conflict("dkron-2", own, &seen(vec![])), None);
        assert_eq!(
            name_conflict("dkron-2", own, &[("dkron-0".into(), None)]),
            None
        );
    }

    #[test]
    fn one_peer_that_still_holds_the_old_address_is_enough() {
        let own = ip("10.0.1.9");
        let answers = vec![
            (
                "dkron-0".to_owned(),
                Some(vec![member("dkron-2", "10.0.2.7", 4)]),
            ),
            ("dkron-1".to_owned(), None),
            (
                "dkron-3".to_owned(),
                Some(vec![member("dkron-2", "10.0.2.7", 1)]),
            ),
        ];
        let conflict = name_conflict("dkron-2", own, &answers).unwrap();
        assert_eq!(conflict.peer, "dkron-3");
    }

    #[test]
    fn the_serf_watch_restarts_only_after_the_port_is_refused_twice_in_a_row() {
        let mut refusals = 0;
        assert_eq!(
            serf_check(SerfProbe::Refused, &mut refusals),
            SerfCheck::Suspect
        );
        assert_eq!(
            serf_check(SerfProbe::Listening, &mut refusals),
            SerfCheck::Healthy
        );
        assert_eq!(
            serf_check(SerfProbe::Refused, &mut refusals),
            SerfCheck::Suspect
        );
        // A look without a verdict neither confirms nor clears.
        assert_eq!(
            serf_check(SerfProbe::Unknown, &mut refusals),
            SerfCheck::Healthy
        );
        assert_eq!(
            serf_check(SerfProbe::Refused, &mut refusals),
            SerfCheck::Restart
        );
    }
}
