//! `dkron-ha wrap -- <command>`: the entrypoint of the Dkron container.
//!
//! Shell: read the pod's identity, wait (bounded) for the DNS names, ask the peers whether a
//! leader exists, then start the command and supervise it. Core: [`plan_launch`] decides the
//! flags or environment variables from the command and the observations, with no I/O.

use super::membership::{
    NameCheck, SERF_POLL, SerfCheck, SerfWatch, probe_serf, serf_check, until_name_free,
};
use super::peers::{AgentSettings, ClusterSettings, SettingsError};
use crate::dkron::grpc::{RPC_PORT, RaftClient};
use crate::dkron::{self, DkronClient, LeaderAnswer};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use std::net::IpAddr;
use std::time::{Duration, Instant};
use tokio::signal::unix::{SignalKind, signal};

/// How long one peer may take to answer `GET /v1/leader`.
const LEADER_QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between two rounds of DNS look-ups.
const DNS_RETRY: Duration = Duration::from_millis(500);
/// Once its own name resolves, how long a pod still waits for peers that do not. A peer whose
/// pod is gone (a lost node) never resolves, and must not hold a restarting server for the
/// whole DNS bound; on a cold start all peers appear within seconds of each other.
const PEER_GRACE: Duration = Duration::from_secs(15);
/// Bound of one DNS look-up.
const DNS_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// `--retry-interval` unless the user set one: Dkron's default of 30 s makes every failed join
/// attempt cost 30 s, and Dkron starts its HTTP API and raft only after its first join
/// succeeds. (The cold-start bootstrap that fast joins alone would break: [`starts_last`].)
pub const JOIN_RETRY_INTERVAL: &str = "1s";

#[derive(Debug, thiserror::Error)]
pub enum WrapError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error(
        "nothing to run: give the Dkron command after `--`, e.g. `dkron-ha wrap -- dkron agent --server`"
    )]
    EmptyCommand,
    #[error("cannot start {program:?}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("cannot wait for the child process: {0}")]
    Wait(#[source] nix::Error),
}

/// Cluster settings the wrapper hands to Dkron.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterFlags {
    /// `Some(N)` on a cold start (no leader anywhere), `None` when a leader exists.
    pub bootstrap_expect: Option<u32>,
    /// The other initial peers, to join (serf port defaults to 8946).
    pub retry_join: Vec<String>,
    /// The Dkron node name (= raft server id): the pod name.
    pub node_name: String,
}

/// What to execute: the (possibly rewritten) command and the environment changes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LaunchPlan {
    pub program: String,
    pub args: Vec<String>,
    pub set_env: Vec<(String, String)>,
    pub remove_env: Vec<String>,
    /// Things the wrapper could not do for this command, for the log.
    pub warnings: Vec<String>,
    /// `host:port` of the local Dkron HTTP API to `POST /v1/leave` to before a SIGTERM or SIGINT
    /// is forwarded; `None` forwards at once.
    pub leave_first: Option<(String, u16)>,
    /// On the server that bootstraps a cold start ([`starts_last`]): the restart of a Dkron
    /// that forms no cluster ([`cold_start_check`]). Needs `leave_first` (the local HTTP API).
    pub cold_start_watch: Option<ColdStartWatch>,
    /// On a worker agent: its restart when the servers have forgotten it ([`agent_check`]).
    pub agent_watch: Option<AgentWatch>,
    /// On a server: before Dkron starts again in place, wait until no peer holds its name
    /// alive at another address ([`until_name_free`]).
    pub name_check: Option<NameCheck>,
    /// On a server: the restart of a Dkron whose serf has shut down ([`serf_check`]).
    pub serf_watch: Option<SerfWatch>,
}

/// A worker agent's check that the servers still know it: Dkron resolves `--retry-join`
/// names only until its first join succeeds (Dkron issue #1253), so a worker that every server
/// has forgotten (all of them restarted at once, at new IPs) never finds them again by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentWatch {
    /// The servers' headless Service name; their HTTP API on [`dkron::HTTP_PORT`].
    pub servers: String,
    /// This worker's serf name.
    pub node_name: String,
    /// How long the servers may answer without this worker alive among their members before
    /// Dkron is restarted, joining them again by name.
    pub bound: Duration,
}

/// The agent watch's verdict (pure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentCheck {
    /// Alive among the servers' members, or no server answers (a restart would find no one).
    Known,
    /// The servers answer without it, not yet for the bound.
    Missing,
    /// The servers have answered without it for the bound: restart Dkron.
    Rejoin,
}

/// `alive`: what the servers' `GET /v1/members` says of this worker (`None`: no server
/// answered); `missing_for`: how long they have answered without it.
pub fn agent_check(alive: Option<bool>, missing_for: Duration, bound: Duration) -> AgentCheck {
    match alive {
        None | Some(true) => AgentCheck::Known,
        Some(false) if missing_for >= bound => AgentCheck::Rejoin,
        Some(false) => AgentCheck::Missing,
    }
}

/// How often the agent watch asks the servers.
const AGENT_POLL: Duration = Duration::from_secs(5);
/// [`AgentWatch::bound`]: longer than a join takes after a restart.
const AGENT_REJOIN_AFTER: Duration = Duration::from_secs(30);

/// Whether the servers behind `servers` list `node` as alive; `None` when none answers.
async fn known_to_servers(servers: &str, node: &str) -> Option<bool> {
    let client = DkronClient::new().ok()?;
    let members = client
        .members(servers, dkron::HTTP_PORT, LEADER_QUERY_TIMEOUT)
        .await
        .ok()
        .flatten()?;
    Some(members.iter().any(|m| m.name == node && m.status == 1))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColdStartWatch {
    /// How long Dkron may run without a leader and without a raft configuration.
    pub bound: Duration,
    /// `ip:port` of the local Dkron's gRPC: it listens on the pod IP (its bind address), not
    /// on loopback.
    pub rpc_addr: String,
}

/// Is `command` Dkron's server agent itself (`<any name> agent ...`)? Then flags are rewritten;
/// anything else (a shell script) gets environment variables.
pub fn is_dkron_agent(command: &[String]) -> bool {
    let Some(program) = command.first() else {
        return false;
    };
    let basename = program.rsplit('/').next().unwrap_or(program);
    // Any name: a renamed binary or Dkron Pro (`dkron-pro agent`) is Dkron too; a shell or
    // Dkron's own executor plugins are not.
    const NOT_DKRON: [&str; 6] = ["sh", "bash", "dash", "ash", "zsh", "busybox"];
    command.get(1).map(String::as_str) == Some("agent")
        && !basename.starts_with("dkron-executor")
        && !NOT_DKRON.contains(&basename)
}

/// The flag value of `--name=value` or `--name value` at `args[i]`, and how many args it spans.
fn flag_at<'a>(args: &'a [String], i: usize, name: &str) -> Option<(Option<&'a str>, usize)> {
    let arg = args[i].as_str();
    let rest = arg.strip_prefix("--")?.strip_prefix(name)?;
    if let Some(value) = rest.strip_prefix('=') {
        Some((Some(value), 1))
    } else if rest.is_empty() {
        match args.get(i + 1) {
            Some(value) if !value.starts_with('-') => Some((Some(value.as_str()), 2)),
            _ => Some((None, 1)),
        }
    } else {
        None
    }
}

/// The host of a `--retry-join` value (`host` or `host:port`), to compare with peer names.
fn join_host(value: &str) -> &str {
    match value.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => value,
    }
}

/// Rewrites the full Dkron command line (`dkron agent ...`, program included):
/// `--bootstrap-expect` becomes N on a cold start and disappears when a leader exists (Dkron
/// issue #683: a restarting server must not bootstrap); every other peer not already joined gets
/// `--retry-join=<peer>`; `--node-name=<pod>` and `--retry-interval=1s` unless given
/// ([`JOIN_RETRY_INTERVAL`]). Args after `--` are untouched.
pub fn plan_dkron_args(original: &[String], flags: &ClusterFlags) -> Vec<String> {
    plan_dkron_args_with(original, flags, |_| None)
}

fn plan_dkron_args_with(
    original: &[String],
    flags: &ClusterFlags,
    inherited: impl Fn(&str) -> Option<String>,
) -> Vec<String> {
    let mut out = Vec::with_capacity(original.len() + flags.retry_join.len() + 3);
    let mut joined: Vec<String> = Vec::new();
    let mut has_node_name = inherited("DKRON_NODE_NAME").is_some();
    let mut has_retry_interval = inherited("DKRON_RETRY_INTERVAL").is_some();
    let mut i = 0;
    let mut tail: &[String] = &[];
    while i < original.len() {
        if original[i] == "--" {
            tail = &original[i..];
            break;
        }
        if let Some((_, span)) = flag_at(original, i, "bootstrap-expect") {
            i += span;
            continue;
        }
        if let Some((value, span)) = flag_at(original, i, "retry-join") {
            if let Some(value) = value {
                joined.push(join_host(value).to_owned());
            }
            out.extend_from_slice(&original[i..i + span]);
            i += span;
            continue;
        }
        if flag_at(original, i, "node-name").is_some() {
            has_node_name = true;
        }
        if flag_at(original, i, "retry-interval").is_some() {
            has_retry_interval = true;
        }
        out.push(original[i].clone());
        i += 1;
    }
    if let Some(n) = flags.bootstrap_expect {
        out.push(format!("--bootstrap-expect={n}"));
    }
    for peer in &flags.retry_join {
        if !joined.iter().any(|j| j == peer) {
            out.push(format!("--retry-join={peer}"));
        }
    }
    if !has_node_name {
        out.push(format!("--node-name={}", flags.node_name));
    }
    if !has_retry_interval {
        out.push(format!("--retry-interval={JOIN_RETRY_INTERVAL}"));
    }
    out.extend_from_slice(tail);
    out
}

/// Decides how to start `command` (pure). `inherited_env` looks up the wrapper's own environment,
/// which the child inherits.
///
/// For a command that is not `dkron agent` the settings travel as Dkron environment variables.
/// Dkron's config loading (cmd/dkron.go, v4.1.x): viper with `SetEnvPrefix("dkron")`, key
/// replacer `-` → `_`, `AutomaticEnv()`, then `viper.Unmarshal(config)`, whose default decode hook
/// `StringToSliceHookFunc(",")` splits a string into `[]string` on commas: so
/// `DKRON_RETRY_JOIN=a,b` (comma-separated, not space-separated), `DKRON_BOOTSTRAP_EXPECT=3`,
/// `DKRON_NODE_NAME=pod`. Precedence is flag > env > config file > default, so a flag written in
/// the script wins over the variable; that case is reported in `warnings`.
pub fn plan_launch(
    command: &[String],
    flags: &ClusterFlags,
    inherited_env: impl Fn(&str) -> Option<String>,
) -> Result<LaunchPlan, WrapError> {
    let program = command.first().ok_or(WrapError::EmptyCommand)?.clone();
    let inherited = |name: &str| inherited_env(name).filter(|v| !v.trim().is_empty());
    let mut plan = LaunchPlan {
        program,
        ..LaunchPlan::default()
    };
    // An inherited DKRON_BOOTSTRAP_EXPECT would make a restarting server bootstrap (issue #683).
    if flags.bootstrap_expect.is_none() && inherited("DKRON_BOOTSTRAP_EXPECT").is_some() {
        plan.remove_env.push("DKRON_BOOTSTRAP_EXPECT".to_owned());
    }
    let node_name_from_env = inherited("DKRON_NODE_NAME").is_some();
    if is_dkron_agent(command) {
        let rewritten = plan_dkron_args_with(command, flags, inherited);
        plan.args = rewritten[1..].to_vec();
        return Ok(plan);
    }
    plan.args = command[1..].to_vec();
    if let Some(n) = flags.bootstrap_expect {
        plan.set_env
            .push(("DKRON_BOOTSTRAP_EXPECT".to_owned(), n.to_string()));
    }
    let mut joins: Vec<String> = inherited("DKRON_RETRY_JOIN")
        .map(|v| {
            v.split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    for peer in &flags.retry_join {
        if !joins.iter().any(|j| join_host(j) == peer) {
            joins.push(peer.clone());
        }
    }
    if !joins.is_empty() {
        plan.set_env
            .push(("DKRON_RETRY_JOIN".to_owned(), joins.join(",")));
    }
    if !node_name_from_env {
        plan.set_env
            .push(("DKRON_NODE_NAME".to_owned(), flags.node_name.clone()));
    }
    // A flag in the script wins over the variable, as the user meant.
    if inherited("DKRON_RETRY_INTERVAL").is_none() {
        plan.set_env.push((
            "DKRON_RETRY_INTERVAL".to_owned(),
            JOIN_RETRY_INTERVAL.to_owned(),
        ));
    }
    if command[1..]
        .iter()
        .any(|a| a.contains("--bootstrap-expect"))
    {
        plan.warnings.push(
            "the command line contains --bootstrap-expect, which Dkron prefers over DKRON_BOOTSTRAP_EXPECT; \
             run `dkron agent` directly under wrap (or drop the flag) so a restarting server never bootstraps"
                .to_owned(),
        );
    }
    Ok(plan)
}

/// One peer's answer to "is there a leader?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerAnswer {
    Leader,
    /// No leader right now, but the peer's raft configuration has servers: the cluster exists
    /// and is electing (seen on real Dkron v4.1.2 when a leader restarts: its pod was back
    /// before the others had elected, and it would have bootstrapped).
    Formed,
    NoLeader,
    NoAnswer,
}

/// `--bootstrap-expect` value from the peers' answers (pure): any leader, or any peer of a
/// formed cluster → none (join it); no leader and no configuration anywhere (or nobody
/// answering: a cold start) → the initial cluster size.
pub fn bootstrap_expect(initial_cluster_size: u32, answers: &[PeerAnswer]) -> Option<u32> {
    if answers
        .iter()
        .any(|a| matches!(a, PeerAnswer::Leader | PeerAnswer::Formed))
    {
        None
    } else {
        Some(initial_cluster_size)
    }
}

async fn resolve(name: &str) -> Vec<IpAddr> {
    match tokio::time::timeout(DNS_LOOKUP_TIMEOUT, tokio::net::lookup_host((name, 0))).await {
        Ok(Ok(addrs)) => addrs.map(|a| a.ip()).collect(),
        _ => Vec::new(),
    }
}

/// Waits until this pod's name resolves to `POD_IP` and every peer resolves, at most
/// `dns_timeout`; then proceeds anyway (logged). Returns whether everything resolved.
/// A hand-written poll, not backon: its end depends on progress (since when the own name
/// resolves), not on one operation failing or succeeding.
pub async fn wait_for_names(settings: &ClusterSettings) -> bool {
    let own = settings.own_fqdn();
    let peers = settings.other_peers();
    let started = Instant::now();
    let mut last_log: Option<Instant> = None;
    let mut own_ok_since: Option<Instant> = None;
    loop {
        let own_ips = resolve(&own).await;
        let own_ok = own_ips.contains(&settings.pod_ip);
        if own_ok {
            own_ok_since.get_or_insert_with(Instant::now);
        }
        let lookups = futures::future::join_all(peers.iter().map(|p| resolve(p))).await;
        let unresolved: Vec<&str> = peers
            .iter()
            .zip(&lookups)
            .filter(|(_, ips)| ips.is_empty())
            .map(|(p, _)| p.as_str())
            .collect();
        let waited = started.elapsed();
        if own_ok && unresolved.is_empty() {
            tracing::info!(own = %own, pod_ip = %settings.pod_ip, peers = peers.len(), waited_ms = waited.as_millis() as u64, "DNS names resolve");
            return true;
        }
        if own_ok_since.is_some_and(|t| t.elapsed() >= PEER_GRACE.min(settings.dns_timeout)) {
            tracing::warn!(own = %own, ?unresolved, grace_s = PEER_GRACE.as_secs(),
                "own name resolves but some peers do not (their pods may be gone); proceeding");
            return false;
        }
        if waited >= settings.dns_timeout {
            tracing::warn!(own = %own, pod_ip = %settings.pod_ip, own_resolves_to = ?own_ips, ?unresolved, waited_s = waited.as_secs(),
                "DNS names still do not resolve; proceeding (does the headless Service have publishNotReadyAddresses: true?)");
            return false;
        }
        if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            tracing::info!(own = %own, pod_ip = %settings.pod_ip, own_resolves_to = ?own_ips, ?unresolved, waited_s = waited.as_secs(),
                timeout_s = settings.dns_timeout.as_secs(), "waiting for DNS names");
            last_log = Some(Instant::now());
        }
        tokio::time::sleep(DNS_RETRY).await;
    }
}

/// Asks every other peer `GET /v1/leader` concurrently, and a peer without a leader for its
/// raft configuration (gRPC); unreachable peers are `NoAnswer`.
pub async fn ask_peers_for_leader(peers: &[String]) -> Vec<PeerAnswer> {
    let raft = RaftClient::new(LEADER_QUERY_TIMEOUT);
    let raft = &raft;
    let dkron = match DkronClient::new() {
        Ok(dkron) => dkron,
        Err(error) => {
            tracing::warn!(%error, "cannot ask the peers for a leader");
            return vec![PeerAnswer::NoAnswer; peers.len()];
        }
    };
    let dkron = &dkron;
    let asks = peers.iter().map(|peer| async move {
        let answer = dkron
            .leader(peer, dkron::HTTP_PORT, LEADER_QUERY_TIMEOUT)
            .await;
        match answer {
            Ok(LeaderAnswer::Known { name, .. }) => {
                tracing::info!(peer = %peer, leader = ?name, "peer knows a leader");
                PeerAnswer::Leader
            }
            Ok(LeaderAnswer::NoLeader) => {
                match raft.configuration(&format!("{peer}:{RPC_PORT}")).await {
                    Ok(configuration) if !configuration.servers.is_empty() => {
                        tracing::info!(peer = %peer, servers = configuration.servers.len(), "peer has no leader yet but a raft configuration: the cluster exists");
                        PeerAnswer::Formed
                    }
                    Ok(_) => PeerAnswer::NoLeader,
                    Err(error) => {
                        tracing::debug!(peer = %peer, %error, "no raft configuration from a peer without a leader");
                        PeerAnswer::NoLeader
                    }
                }
            }
            Ok(LeaderAnswer::Unexpected { status }) => {
                tracing::warn!(peer = %peer, status, "unexpected answer to GET /v1/leader");
                PeerAnswer::NoAnswer
            }
            Err(error) => {
                tracing::debug!(peer = %peer, %error, "no answer to GET /v1/leader");
                PeerAnswer::NoAnswer
            }
        }
    });
    futures::future::join_all(asks).await
}

/// How long the first server of a cold start waits for the other initial servers' Dkron.
pub const COLD_START_PEER_WAIT: Duration = Duration::from_secs(60);
const PEER_POLL: Duration = Duration::from_millis(250);

/// Whether this server starts its Dkron only once the other initial servers run theirs (pure):
/// the server of ordinal 0 on a cold start.
///
/// Why: Dkron bootstraps raft only on a serf member-join event, and serf coalesces a join with
/// the `rpc_addr` tag update that follows it within 3 s into a member-update, which never
/// bootstraps. Servers started together all join before their tags are set, and then no leader
/// forms until some later join (real Dkron v4.1.2, 3 servers: 31–134 s). Dkron answers HTTP
/// only once it has joined and set its tags, so a server that starts after the others answer
/// sees their joins whole, and bootstraps the cluster.
pub fn starts_last(settings: &ClusterSettings, flags: &ClusterFlags) -> bool {
    flags.bootstrap_expect.is_some()
        && !flags.retry_join.is_empty()
        && settings.pod_name == format!("{}-0", settings.statefulset)
}

/// Waits (bounded by [`COLD_START_PEER_WAIT`]) until every peer's Dkron answers HTTP; `true`
/// when all did.
pub async fn wait_for_peers_running(peers: &[String]) -> bool {
    let started = Instant::now();
    let Ok(dkron) = DkronClient::new() else {
        return false;
    };
    loop {
        let mut waiting = Vec::new();
        for peer in peers {
            if dkron
                .get(peer, dkron::HTTP_PORT, "/v1/leader", LEADER_QUERY_TIMEOUT)
                .await
                .is_err()
            {
                waiting.push(peer.as_str());
            }
        }
        let waited_ms = started.elapsed().as_millis() as u64;
        if waiting.is_empty() {
            tracing::info!(
                waited_ms,
                "the other initial servers run Dkron; starting last, to bootstrap"
            );
            return true;
        }
        if started.elapsed() >= COLD_START_PEER_WAIT {
            tracing::warn!(
                ?waiting,
                waited_ms,
                "other initial servers still do not answer; starting anyway"
            );
            return false;
        }
        tokio::time::sleep(PEER_POLL).await;
    }
}

/// What the bootstrapping server's own Dkron shows during a cold start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalView {
    /// `GET /v1/leader` names a leader (an alive server with its `rpc_addr` set).
    pub leader: bool,
    /// Servers in its raft configuration; `None` when it does not answer over gRPC.
    pub raft_servers: Option<usize>,
}

/// The cold-start watch's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColdStart {
    /// A leader, or a raft configuration (raft elects on its own from there): stop watching.
    Formed,
    Waiting,
    /// No leader and an empty raft configuration after the bound: restart Dkron.
    Restart,
}

/// Decides the cold-start watch (pure). Dkron bootstraps only on a serf member-join that shows
/// enough servers; when no server ever sees one (every join coalesced with its tag update, seen
/// on real Dkron for 31–134 s, and once in 30 cold starts of v4.0.9 for good), nothing else makes
/// it try again. A restarted server joins again: its peers and itself see member-joins whole,
/// and the cluster bootstraps. Only a view that shows neither leader nor configuration restarts:
/// a Dkron that does not answer is not known to be leaderless.
pub fn cold_start_check(waited: Duration, bound: Duration, view: LocalView) -> ColdStart {
    if view.leader || view.raft_servers.is_some_and(|n| n > 0) {
        ColdStart::Formed
    } else if waited >= bound && view.raft_servers == Some(0) {
        ColdStart::Restart
    } else {
        ColdStart::Waiting
    }
}

/// How often the cold-start watch looks at the local Dkron.
const COLD_START_POLL: Duration = Duration::from_secs(2);

/// The local Dkron's [`LocalView`]: HTTP on `host:port`, gRPC on `rpc_addr`.
async fn local_view(host: &str, port: u16, rpc_addr: &str) -> LocalView {
    let leader = match DkronClient::new() {
        Ok(client) => matches!(
            client.leader(host, port, LEADER_QUERY_TIMEOUT).await,
            Ok(LeaderAnswer::Known { .. })
        ),
        Err(_) => false,
    };
    let raft_servers = RaftClient::new(LEADER_QUERY_TIMEOUT)
        .configuration(rpc_addr)
        .await
        .ok()
        .map(|c| c.servers.len());
    LocalView {
        leader,
        raft_servers,
    }
}

/// Signal streams of the supervisor. Created before anything else so that a SIGTERM during
/// discovery or before the child starts is never lost, and SIGCHLD before the child exists.
pub struct SupervisorSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    child: tokio::signal::unix::Signal,
}

impl SupervisorSignals {
    pub fn install() -> Result<Self, WrapError> {
        let make = |kind| signal(kind).map_err(WrapError::Signals);
        Ok(Self {
            term: make(SignalKind::terminate())?,
            int: make(SignalKind::interrupt())?,
            hup: make(SignalKind::hangup())?,
            child: make(SignalKind::child())?,
        })
    }

    /// The next SIGTERM or SIGINT (what stops the wrapper before the child runs).
    async fn stop_request(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::SIGTERM,
            _ = self.int.recv() => Signal::SIGINT,
        }
    }
}

/// How the child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChildExit {
    /// Its exit status, or 128 + signal number when a signal killed it (shell convention).
    pub code: i32,
    /// Orphaned descendants reaped while it ran (the wrapper is PID 1 or a child subreaper).
    pub orphans_reaped: u32,
}

/// Starts the plan's command, forwards SIGTERM, SIGINT and SIGHUP to it, reaps orphans, and
/// returns when it ends; restarts it when the plan's cold-start watch says so.
///
/// The child is spawned with `std::process` and waited for with `waitpid(-1, WNOHANG)` on each
/// SIGCHLD rather than with `tokio::process`: reaping every child would otherwise race with
/// tokio's own wait for the main child and lose its status.
pub async fn run_child(
    plan: &LaunchPlan,
    signals: &mut SupervisorSignals,
) -> Result<ChildExit, WrapError> {
    // Orphans of Dkron's shell jobs are reparented to us even when we are not PID 1
    // (e.g. shareProcessNamespace), so we reap them in both cases.
    if let Err(error) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!(%error, "cannot become a child subreaper; orphans are reaped only as PID 1");
    }
    let mut orphans_reaped = 0;
    for attempt in 1.. {
        if attempt > 1
            && let Some(check) = &plan.name_check
        {
            tokio::select! {
                _ = until_name_free(check) => {}
                sig = signals.stop_request() => {
                    tracing::info!(signal = %sig, "stopped before Dkron started again");
                    return Ok(ChildExit { code: 128 + sig as i32, orphans_reaped });
                }
            }
        }
        let child_pid = spawn(plan)?;
        match supervise(plan, child_pid, signals, &mut orphans_reaped).await? {
            Supervised::Exited(code) => {
                tracing::info!(code, orphans_reaped, "child exited");
                return Ok(ChildExit {
                    code,
                    orphans_reaped,
                });
            }
            Supervised::Restart(code) => {
                tracing::warn!(
                    code,
                    attempt,
                    "Dkron stopped for a restart; starting it again"
                );
            }
        }
    }
    unreachable!("the restart loop only ends by returning")
}

fn spawn(plan: &LaunchPlan) -> Result<Pid, WrapError> {
    let mut command = std::process::Command::new(&plan.program);
    command.args(&plan.args);
    for name in &plan.remove_env {
        command.env_remove(name);
    }
    command.envs(plan.set_env.iter().map(|(k, v)| (k, v)));
    let child = command.spawn().map_err(|source| WrapError::Spawn {
        program: plan.program.clone(),
        source,
    })?;
    let child_pid = Pid::from_raw(child.id() as i32);
    // `child` is dropped without waiting: std does not reap on drop, `reap` below does.
    drop(child);
    tracing::info!(pid = child_pid.as_raw(), program = %plan.program, "child started");
    Ok(child_pid)
}

enum Supervised {
    /// The child ended on its own or after a forwarded signal: its status.
    Exited(i32),
    /// The child ended because the cold-start watch stopped it.
    Restart(i32),
}

async fn supervise(
    plan: &LaunchPlan,
    child_pid: Pid,
    signals: &mut SupervisorSignals,
    orphans_reaped: &mut u32,
) -> Result<Supervised, WrapError> {
    let started = Instant::now();
    let mut safety_tick = tokio::time::interval(Duration::from_secs(1));
    // Dkron installs its signal handlers only once its start returns, and a SIGHUP before that
    // kills it (Go's default; seen on v4.1.2): a SIGHUP waits until its HTTP API answers.
    let mut dkron_answers = plan.leave_first.is_none();
    let mut held_hup = false;
    let mut hup_poll = tokio::time::interval(HUP_POLL);
    let mut watch = plan.cold_start_watch.clone().zip(plan.leave_first.clone());
    let mut watch_poll = tokio::time::interval(COLD_START_POLL);
    let mut watch_reported = false;
    let mut agent_poll = tokio::time::interval(AGENT_POLL);
    let mut missing_since: Option<Instant> = None;
    let mut serf_poll = tokio::time::interval(SERF_POLL);
    let mut serf_refusals = 0;
    let dkron_client = DkronClient::new().ok();
    let mut restarting = false;
    // Once a stop or restart is under way, no watch acts: Dkron's serf is meant to go.
    let mut stopping = false;
    loop {
        if let Some(code) = reap(child_pid, orphans_reaped)? {
            return Ok(if restarting {
                Supervised::Restart(code)
            } else {
                Supervised::Exited(code)
            });
        }
        let forward = tokio::select! {
            // A stop request ends the wrapper, even one that comes during a restart.
            _ = signals.term.recv() => {
                restarting = false;
                Some(Signal::SIGTERM)
            }
            _ = signals.int.recv() => {
                restarting = false;
                Some(Signal::SIGINT)
            }
            _ = signals.hup.recv() => {
                held_hup = true;
                None
            }
            _ = signals.child.recv() => None,
            // SIGCHLD can coalesce; a slow poll makes sure no exit is missed.
            _ = safety_tick.tick() => None,
            _ = hup_poll.tick(), if held_hup => None,
            _ = serf_poll.tick(), if plan.serf_watch.is_some() && dkron_client.is_some() && !stopping => {
                let watch = plan.serf_watch.as_ref().expect("guarded by the branch");
                let client = dkron_client.as_ref().expect("guarded by the branch");
                match serf_check(probe_serf(client, watch).await, &mut serf_refusals) {
                    SerfCheck::Healthy => None,
                    SerfCheck::Suspect => {
                        tracing::info!(node = %watch.node_name, "the local Dkron's gossip port refuses connections while its HTTP API answers; looking again");
                        None
                    }
                    SerfCheck::Restart => {
                        tracing::warn!(node = %watch.node_name, pod_ip = %watch.own_ip,
                            "the local Dkron's serf has shut down (its gossip port refuses connections while its HTTP API answers; Dkron logs 'Serf shutdown detected' after its join lost a name conflict): restarting Dkron so that it joins the cluster again");
                        restarting = true;
                        Some(Signal::SIGTERM)
                    }
                }
            }
            _ = agent_poll.tick(), if plan.agent_watch.is_some() && !stopping => {
                let AgentWatch { servers, node_name, bound } =
                    plan.agent_watch.as_ref().expect("guarded by the branch");
                let alive = known_to_servers(servers, node_name).await;
                let missing_for = match alive {
                    Some(false) => missing_since.get_or_insert_with(Instant::now).elapsed(),
                    _ => {
                        missing_since = None;
                        Duration::ZERO
                    }
                };
                match agent_check(alive, missing_for, *bound) {
                    AgentCheck::Known => None,
                    AgentCheck::Missing => {
                        tracing::info!(%servers, node = %node_name, missing_s = missing_for.as_secs(), "the servers answer without this worker");
                        None
                    }
                    AgentCheck::Rejoin => {
                        tracing::warn!(%servers, node = %node_name, bound_s = bound.as_secs(),
                            "the servers have not known this worker for the bound: restarting Dkron so that it joins them again by name");
                        restarting = true;
                        Some(Signal::SIGTERM)
                    }
                }
            }
            _ = watch_poll.tick(), if watch.is_some() && !stopping => {
                let (ColdStartWatch { bound, rpc_addr }, (host, port)) =
                    watch.clone().expect("guarded by the branch");
                let view = local_view(&host, port, &rpc_addr).await;
                match cold_start_check(started.elapsed(), bound, view) {
                    ColdStart::Formed => {
                        tracing::info!(waited_ms = started.elapsed().as_millis() as u64, ?view, "the cold start formed a cluster");
                        watch = None;
                        None
                    }
                    ColdStart::Waiting => {
                        if started.elapsed() >= bound && !watch_reported {
                            watch_reported = true;
                            tracing::warn!(bound_s = bound.as_secs(), ?view, rpc_addr = %rpc_addr,
                                "no leader since this cold start began, but the local Dkron's raft configuration is unknown: not restarting it");
                        }
                        None
                    }
                    ColdStart::Restart => {
                        tracing::warn!(bound_s = bound.as_secs(), ?view,
                            "no leader and no raft configuration since this cold start began: restarting Dkron so that its join bootstraps the cluster");
                        watch = None;
                        restarting = true;
                        Some(Signal::SIGTERM)
                    }
                }
            }
        };
        if held_hup {
            if !dkron_answers && let Some((host, port)) = &plan.leave_first {
                dkron_answers = answers_http(host, *port).await;
                if !dkron_answers {
                    tracing::info!(
                        "holding SIGHUP until Dkron answers HTTP (before that it would kill it)"
                    );
                }
            }
            if dkron_answers {
                held_hup = false;
                tracing::info!(
                    pid = child_pid.as_raw(),
                    "forwarding signal to child: SIGHUP"
                );
                if let Err(error) = kill(child_pid, Signal::SIGHUP) {
                    tracing::warn!(signal = %Signal::SIGHUP, %error, "cannot forward signal");
                }
            }
        }
        if let Some(sig) = forward {
            stopping = true;
            if let Some((host, port)) = &plan.leave_first {
                leave(host, *port).await;
            }
            tracing::info!(signal = %sig, pid = child_pid.as_raw(), "forwarding signal to child");
            if let Err(error) = kill(child_pid, sig) {
                tracing::warn!(signal = %sig, %error, "cannot forward signal");
            }
        }
    }
}

/// How often a held SIGHUP checks whether Dkron answers yet.
const HUP_POLL: Duration = Duration::from_millis(250);

/// Whether the local Dkron answers `GET /health` (any status: its HTTP server runs).
async fn answers_http(host: &str, port: u16) -> bool {
    match dkron::DkronClient::new() {
        Ok(client) => client
            .get(host, port, "/health", LEADER_QUERY_TIMEOUT)
            .await
            .is_ok(),
        Err(_) => false,
    }
}

/// Bound of the leave before a stop signal is forwarded: well inside the default 30 s grace
/// period, so Dkron still gets its SIGTERM in time when the leave hangs.
pub const LEAVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks the local Dkron to leave the cluster and waits (bounded) for it to have left. Dkron's
/// own SIGTERM handler returns while its stop still runs, so without this its peers mark it
/// `failed` and refuse its name from a new IP for 40–67 s (measured on v4.0.9 and v4.1.2).
async fn leave(host: &str, port: u16) {
    let started = std::time::Instant::now();
    let result = match dkron::DkronClient::new() {
        Ok(client) => client.leave(host, port, LEAVE_TIMEOUT).await,
        Err(error) => Err(error),
    };
    let elapsed_ms = started.elapsed().as_millis() as u64;
    match result {
        Ok(answer) if answer.status == 200 => {
            tracing::info!(elapsed_ms, "Dkron left the cluster");
        }
        Ok(answer) => {
            tracing::warn!(status = answer.status, elapsed_ms, "Dkron refused to leave");
        }
        Err(error) => tracing::warn!(%error, elapsed_ms, "cannot ask Dkron to leave"),
    }
}

/// Reaps every exited child; `Some(code)` once the main child is among them.
fn reap(main: Pid, orphans_reaped: &mut u32) -> Result<Option<i32>, WrapError> {
    loop {
        match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return Ok(None),
            Ok(WaitStatus::Exited(pid, code)) if pid == main => return Ok(Some(code)),
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == main => {
                return Ok(Some(128 + sig as i32));
            }
            Ok(status) => {
                if let Some(pid) = status.pid() {
                    tracing::debug!(pid = pid.as_raw(), ?status, "reaped orphan");
                    *orphans_reaped += 1;
                }
            }
            Err(nix::errno::Errno::EINTR) => continue,
            // No children left at all: the main child was reaped elsewhere. Should not happen.
            Err(nix::errno::Errno::ECHILD) => {
                return Err(WrapError::Wait(nix::errno::Errno::ECHILD));
            }
            Err(error) => return Err(WrapError::Wait(error)),
        }
    }
}

/// `dkron-ha wrap -- <command>`: returns the exit code for the process.
pub async fn run(command: Vec<String>) -> Result<i32, WrapError> {
    if command.is_empty() {
        return Err(WrapError::EmptyCommand);
    }
    if let Some(agent) = AgentSettings::from_lookup(|name| std::env::var(name).ok())? {
        return run_agent(command, agent).await;
    }
    let settings = ClusterSettings::from_env()?;
    let mut signals = SupervisorSignals::install()?;
    let name_check = NameCheck {
        peers: settings.leader_sources(),
        node_name: settings.pod_name.clone(),
        own_ip: settings.pod_ip,
        bound: settings.name_wait,
    };
    let discovery = async {
        wait_for_names(&settings).await;
        let answers = ask_peers_for_leader(&name_check.peers).await;
        until_name_free(&name_check).await;
        (settings.other_peers(), answers)
    };
    let (others, answers) = tokio::select! {
        found = discovery => found,
        sig = signals.stop_request() => {
            tracing::info!(signal = %sig, "stopped before the child started");
            return Ok(128 + sig as i32);
        }
    };
    let flags = ClusterFlags {
        bootstrap_expect: bootstrap_expect(settings.initial_cluster_size, &answers),
        retry_join: others,
        node_name: settings.pod_name.clone(),
    };
    tracing::info!(bootstrap_expect = ?flags.bootstrap_expect, ?answers, "leader search done");
    if starts_last(&settings, &flags) {
        tokio::select! {
            _ = wait_for_peers_running(&flags.retry_join) => {}
            sig = signals.stop_request() => {
                tracing::info!(signal = %sig, "stopped before the child started");
                return Ok(128 + sig as i32);
            }
        }
    }
    let mut plan = plan_launch(&command, &flags, |name| std::env::var(name).ok())?;
    plan.leave_first = Some(("127.0.0.1".to_owned(), dkron::HTTP_PORT));
    plan.cold_start_watch = starts_last(&settings, &flags).then(|| ColdStartWatch {
        bound: settings.cold_start_timeout,
        rpc_addr: std::net::SocketAddr::new(settings.pod_ip, RPC_PORT).to_string(),
    });
    plan.serf_watch = Some(SerfWatch {
        http: ("127.0.0.1".to_owned(), dkron::HTTP_PORT),
        node_name: settings.pod_name.clone(),
        own_ip: settings.pod_ip,
    });
    plan.name_check = Some(name_check);
    for warning in &plan.warnings {
        tracing::warn!(%warning, "cannot apply every cluster setting");
    }
    let set_env: Vec<&str> = plan.set_env.iter().map(|(k, _)| k.as_str()).collect();
    tracing::info!(program = %plan.program, args = ?plan.args, ?set_env, remove_env = ?plan.remove_env, "starting");
    Ok(run_child(&plan, &mut signals).await?.code)
}

/// A worker agent: join the servers by their headless Service's name (every server it
/// resolves to), `--node-name` the pod, fast join retries, and the [`AgentWatch`]. No leader
/// search or bootstrap (workers never vote) and no leave before SIGTERM (a worker serves no HTTP
/// API, and its next pod has a new name anyway).
async fn run_agent(command: Vec<String>, agent: AgentSettings) -> Result<i32, WrapError> {
    let mut signals = SupervisorSignals::install()?;
    let flags = ClusterFlags {
        bootstrap_expect: None,
        retry_join: vec![agent.servers_fqdn()],
        node_name: agent.pod_name.clone(),
    };
    let mut plan = plan_launch(&command, &flags, |name| std::env::var(name).ok())?;
    plan.agent_watch = Some(AgentWatch {
        servers: agent.servers_fqdn(),
        node_name: agent.pod_name.clone(),
        bound: AGENT_REJOIN_AFTER,
    });
    for warning in &plan.warnings {
        tracing::warn!(%warning, "cannot apply every cluster setting");
    }
    tracing::info!(servers = %agent.servers, program = %plan.program, args = ?plan.args, "starting a worker agent");
    Ok(run_child(&plan, &mut signals).await?.code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_rejoins_only_after_the_answering_servers_lacked_it_for_the_bound() {
        let bound = Duration::from_secs(30);
        assert_eq!(
            agent_check(Some(true), Duration::ZERO, bound),
            AgentCheck::Known
        );
        // No server answers: a restart would find nobody either.
        assert_eq!(
            agent_check(None, Duration::from_secs(600), bound),
            AgentCheck::Known
        );
        assert_eq!(
            agent_check(Some(false), Duration::from_secs(29), bound),
            AgentCheck::Missing
        );
        assert_eq!(
            agent_check(Some(false), Duration::from_secs(30), bound),
            AgentCheck::Rejoin
        );
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn flag_forms() {
        let args = s(&[
            "--bootstrap-expect",
            "3",
            "--bootstrap-expect=2",
            "--bootstrap-expectx",
        ]);
        assert_eq!(flag_at(&args, 0, "bootstrap-expect"), Some((Some("3"), 2)));
        assert_eq!(flag_at(&args, 2, "bootstrap-expect"), Some((Some("2"), 1)));
        assert_eq!(flag_at(&args, 3, "bootstrap-expect"), None);
    }

    #[test]
    fn a_cold_start_restarts_only_when_the_local_dkron_shows_no_leader_and_no_configuration() {
        let bound = Duration::from_secs(30);
        let view = |leader, raft_servers| LocalView {
            leader,
            raft_servers,
        };
        let late = Duration::from_secs(31);
        assert_eq!(
            cold_start_check(late, bound, view(false, Some(0))),
            ColdStart::Restart
        );
        // Before the bound it waits, whatever it sees short of a cluster.
        assert_eq!(
            cold_start_check(Duration::from_secs(29), bound, view(false, Some(0))),
            ColdStart::Waiting
        );
        // A leader, or a configuration (raft is electing): formed, at any time.
        assert_eq!(
            cold_start_check(late, bound, view(true, Some(0))),
            ColdStart::Formed
        );
        assert_eq!(
            cold_start_check(late, bound, view(false, Some(3))),
            ColdStart::Formed
        );
        assert_eq!(
            cold_start_check(Duration::ZERO, bound, view(true, None)),
            ColdStart::Formed
        );
        // A Dkron that does not answer over gRPC is not known to be leaderless.
        assert_eq!(
            cold_start_check(late, bound, view(false, None)),
            ColdStart::Waiting
        );
    }

    #[test]
    fn join_host_strips_port() {
        assert_eq!(join_host("a.b:8946"), "a.b");
        assert_eq!(join_host("a.b"), "a.b");
        assert_eq!(
            join_host("provider=aws tag_key=x"),
            "provider=aws tag_key=x"
        );
    }
}
