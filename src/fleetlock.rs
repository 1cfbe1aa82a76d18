//! The FleetLock server Zincati asks before it reboots a Fedora CoreOS node (ARCHITECTURE.md,
//! "FleetLock"). Zincati is configured with
//! `fleet_lock.base_url = "http://<service-ip>/fleetlock/"`.
//!
//! - `POST /fleetlock/v1/pre-reboot`: the Node named by the id takes (or keeps) a slot of its
//!   group's semaphore ([`lock`]), is cordoned and drained ([`drain`]); 200 only once no pod
//!   that must leave is left, `drain_in_progress` until then.
//! - `POST /fleetlock/v1/steady-state`: once the Node is Ready, uncordon it if FleetLock
//!   cordoned it and release its slot; 200 for a Node holding nothing.
//! - `GET /fleetlock/v1/status`: holders and queue per group and the holders' drain progress,
//!   as JSON.
//!
//! Paths are matched without regard to empty segments, and `/v1/...` works without the
//! `/fleetlock` prefix ([`router::route`]); any other path or method under them gets the
//! protocol's JSON error body (`unknown_endpoint` 404, `method_not_allowed` 405).
//!
//! All state lives in the Kubernetes API (Leases, one Node annotation), so any replica can
//! answer and a restart resumes where the last one stopped. Nodes, the Leases and the slots
//! ConfigMap are read from watches ([`cache`]): no request lists the Nodes, and a refusal
//! makes no API call. The decisions are pure functions in the submodules; this file is the
//! shell that reads state, calls them and acts.
//!
//! Objects it uses, and the RBAC the chart grants for them:
//! - Nodes (cluster): `get`, `list`, `watch`, `patch`. Cordon mark: annotation
//!   `dkron-ha/fleetlock-cordoned: "true"`; id override: annotation `dkron-ha/fleetlock-id`.
//! - Pods (all namespaces): `list`; `pods/eviction`: `create`.
//! - StatefulSets (all namespaces, `apps`): `get`, for the Dkron clusters of the pods a drain
//!   would evict ([`quorum`]).
//! - Leases `dkron-ha-fleetlock-<group>` (lock namespace, `coordination.k8s.io`): `get`,
//!   `list`, `watch`, `create`, `update`.
//! - ConfigMap `dkron-ha-fleetlock` (lock namespace): `get`, `list`, `watch` (slots per
//!   group, watched by name, see [`lock`]).
//! - Events (`events.k8s.io`, namespace `default`, where Events about Nodes go): `create`,
//!   `patch`.

pub mod cache;
pub mod drain;
pub mod lock;
pub mod machine_id;
pub mod metrics;
pub mod node;
pub mod protocol;
pub mod quorum;
pub mod router;
pub mod steps;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Resource, ResourceExt};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

pub use machine_id::app_specific_machine_id;
pub use protocol::{ClientParams, ErrorKind, FleetLockError};
pub use router::router;

use cache::NodeCache;
use drain::{CordonDecision, DrainPlan, Drainer, EvictionOutcome, PodKey, UncordonDecision};
use lock::{AcquireOutcome, LockPolicy, LockRequest, LockStore, Read, ReleaseReason};
use metrics::{FleetLockMetrics, LockChange, NodeChange};
use steps::{Observed, PreReboot, SteadyState, Step};

/// `reportingController` of FleetLock's Events.
const EVENT_CONTROLLER: &str = "dkron-ha-fleetlock";

fn default_namespace() -> String {
    std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|ns| !ns.trim().is_empty())
        .unwrap_or_else(|| "default".to_owned())
}

/// Parses a duration such as `90s`, `500ms`, `15m`, `2h`, `1d` or `1h 30m` (humantime); a bare
/// number is seconds, as these flags always took it and humantime refuses it.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    humantime::parse_duration(text)
        .map_err(|error| format!("{text:?} is not a duration like 30s, 15m or 2h: {error}"))
}

/// FleetLock settings of `dkron-ha serve`.
///
/// Slots per group are live-configurable in the ConfigMap `--fleetlock-config-map` (default
/// `dkron-ha-fleetlock`) in `--fleetlock-namespace`, with data `<group>: "<slots>"` (for
/// example `default: "1"`, `workers: "3"`; `"0"` stops reboots in a group). It is watched,
/// so an edit applies within a moment; groups without a key get `--fleetlock-default-slots`.
/// See [`lock`].
#[derive(Clone, Debug, clap::Args)]
pub struct FleetLockConfig {
    /// Namespace of the lock Leases (dkron-ha-fleetlock-GROUP) and the slots ConfigMap
    /// [default: $POD_NAMESPACE, else "default"]
    #[arg(
        long = "fleetlock-namespace",
        env = "DKRON_HA_FLEETLOCK_NAMESPACE",
        default_value_t = default_namespace(),
        hide_default_value = true
    )]
    pub namespace: String,

    /// ConfigMap whose data maps a group to its reboot slots, e.g. `workers: "2"`
    #[arg(
        long = "fleetlock-config-map",
        env = "DKRON_HA_FLEETLOCK_CONFIG_MAP",
        default_value = lock::DEFAULT_CONFIG_MAP
    )]
    pub config_map: String,

    /// Reboot slots of a group the ConfigMap does not list
    #[arg(
        long = "fleetlock-default-slots",
        env = "DKRON_HA_FLEETLOCK_DEFAULT_SLOTS",
        default_value_t = 1
    )]
    pub default_slots: u32,

    /// Release a slot whose holder has sent no pre-reboot for this long (e.g. 2h); unset or
    /// 0 keeps it until steady-state or until its Node is deleted
    #[arg(
        long = "fleetlock-lock-ttl",
        env = "DKRON_HA_FLEETLOCK_LOCK_TTL",
        value_parser = parse_duration
    )]
    pub lock_ttl: Option<Duration>,

    /// A Node waiting in a full group's queue that has sent no pre-reboot for this long
    /// leaves the queue (0: only steady-state or deleting its Node does)
    #[arg(
        long = "fleetlock-queue-timeout",
        env = "DKRON_HA_FLEETLOCK_QUEUE_TIMEOUT",
        default_value = "15m",
        value_parser = parse_duration
    )]
    pub queue_timeout: Duration,

    /// How long one pre-reboot request waits for the drain before answering
    /// drain_in_progress (Zincati asks again later)
    #[arg(
        long = "fleetlock-drain-wait",
        env = "DKRON_HA_FLEETLOCK_DRAIN_WAIT",
        default_value = "30s",
        value_parser = parse_duration
    )]
    pub drain_wait: Duration,

    /// Evictions requested at the same time while draining a Node
    #[arg(
        long = "fleetlock-eviction-concurrency",
        env = "DKRON_HA_FLEETLOCK_EVICTION_CONCURRENCY",
        default_value_t = 16,
        value_parser = clap::value_parser!(u32).range(1..=1024)
    )]
    pub eviction_concurrency: u32,
}

impl Default for FleetLockConfig {
    fn default() -> Self {
        FleetLockConfig {
            namespace: default_namespace(),
            config_map: lock::DEFAULT_CONFIG_MAP.to_owned(),
            default_slots: 1,
            lock_ttl: None,
            queue_timeout: lock::DEFAULT_QUEUE_TIMEOUT,
            drain_wait: Duration::from_secs(30),
            eviction_concurrency: 16,
        }
    }
}

/// `GET /fleetlock/v1/status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub groups: Vec<GroupStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStatus {
    pub group: String,
    pub slots: u32,
    pub holders: Vec<HolderStatus>,
    /// Nodes refused because the group was full, in the order they are granted.
    pub queue: Vec<WaiterStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaiterStatus {
    /// 1 = the next Node granted a slot.
    pub position: usize,
    pub node: String,
    pub id: String,
    pub first_asked_at: Timestamp,
    /// Refreshed at most every tenth of `--fleetlock-queue-timeout`.
    pub last_asked_at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolderStatus {
    pub node: String,
    pub id: String,
    pub acquired_at: Timestamp,
    pub renewed_at: Timestamp,
    /// False when the Node is gone: the slot is reclaimed at the next pre-reboot.
    pub node_exists: bool,
    pub cordoned_by_fleetlock: bool,
    pub drained: bool,
    /// Pods still to evict or still terminating.
    pub remaining_pods: Vec<String>,
}

/// The FleetLock server: decisions from the submodules, state in the Kubernetes API.
pub struct FleetLock {
    config: FleetLockConfig,
    nodes: NodeCache,
    locks: LockStore,
    drainer: Drainer,
    recorder: Recorder,
    metrics: FleetLockMetrics,
    /// Cancelled when this replica shuts down: waiting pre-reboots answer at their next step.
    stopping: tokio_util::sync::CancellationToken,
}

impl FleetLock {
    /// Starts the watches (Nodes, Leases, ConfigMap) on the current Tokio runtime; requests
    /// wait for their first lists.
    pub fn new(
        client: kube::Client,
        config: FleetLockConfig,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Self {
        let reporter = Reporter {
            controller: EVENT_CONTROLLER.to_owned(),
            instance: std::env::var("POD_NAME").ok(),
        };
        FleetLock {
            locks: LockStore::new(
                client.clone(),
                &config.namespace,
                &config.config_map,
                config.default_slots,
            ),
            drainer: Drainer::new(client.clone(), config.eviction_concurrency as usize),
            recorder: Recorder::new(client.clone(), reporter),
            metrics: FleetLockMetrics::register(registry),
            nodes: NodeCache::start(client),
            config,
            stopping: tokio_util::sync::CancellationToken::new(),
        }
    }

    /// Ends every waiting pre-reboot at its next step with the answer it has (Zincati asks
    /// again, reaching another replica) once `stopping` is cancelled: for a replica that shuts
    /// down, whose HTTP server waits for its requests before it exits. Else the eviction of its
    /// own pod, by a drain it serves, would wait out that drain's `--fleetlock-drain-wait`.
    pub fn with_shutdown(mut self, stopping: tokio_util::sync::CancellationToken) -> Self {
        self.stopping = stopping;
        self
    }

    /// Sends evictions through `client`, best built with `kube::Config { default_retry: false,
    /// .. }`: kube's default client retries the Eviction API's 429 ("a PodDisruptionBudget
    /// forbids it now") for minutes, so through it a refusal only shows as an eviction still
    /// unanswered after [`drain::EVICTION_TIMEOUT`].
    pub fn with_eviction_client(mut self, client: kube::Client) -> Self {
        self.drainer = self.drainer.with_eviction_client(client);
        self
    }

    /// Waits until every watch has its first list, retrying (logged) while the API server
    /// does not answer: what `serve`'s readiness waits for.
    pub async fn until_ready(&self) {
        loop {
            match async {
                self.nodes.ready().await?;
                self.locks.ready().await
            }
            .await
            {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(%error, "FleetLock's caches are not filled yet; not ready");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    pub fn config(&self) -> &FleetLockConfig {
        &self.config
    }

    pub(crate) fn metrics(&self) -> &FleetLockMetrics {
        &self.metrics
    }

    /// RecursiveLock, then drain: `Ok` means the Node holds a slot and is drained. The order
    /// of the steps is [`PreReboot::next`]'s; this performs them and reports each.
    pub async fn pre_reboot(&self, params: &ClientParams) -> Result<(), FleetLockError> {
        let (node, matched_by) = self.nodes.node_for_id(&params.id).await?;
        let node = &*node;
        let name = node.name_any();
        let slots = self.locks.slots(&params.group).await?;
        let mut steps = PreReboot::new(&name, &params.group, slots);
        let deadline = Instant::now() + self.config.drain_wait;
        let time_left = || match self.stopping.is_cancelled() {
            true => Duration::ZERO,
            false => deadline.saturating_duration_since(Instant::now()),
        };
        let mut observed = Observed::Arrived;
        loop {
            let step = steps.next(observed);
            observed = match step {
                Step::TakeSlot => self.take_slot(params, &name, slots).await?,
                Step::Cordon => Observed::Cordon(self.drainer.cordon(&name).await?),
                Step::ListPods => {
                    let pods = self.drainer.pods_on(&name).await?;
                    let plan = drain::plan_drain(&name, &pods);
                    let to_evict: Vec<_> = pods
                        .into_iter()
                        .filter(|pod| plan.to_evict.contains(&PodKey::of(pod)))
                        .collect();
                    let held = self.drainer.quorum_shortfalls(&name, &to_evict).await?;
                    Observed::Pods {
                        plan,
                        held,
                        time_left: time_left(),
                    }
                }
                Step::Evict(pods) => Observed::Evicted {
                    outcomes: self.drainer.evict(&pods).await,
                    time_left: time_left(),
                },
                Step::Wait(pause) => {
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = self.stopping.cancelled() => {}
                    }
                    Observed::Waited
                }
                Step::Answer(answer) => return answer,
            };
            self.report(node, &params.group, matched_by.as_str(), &observed)
                .await;
        }
    }

    /// Takes or keeps a slot of the request's group, or waits in its queue; reclaims the slots
    /// of gone or expired holders and drops gone or silent waiters. Whether a Node named in
    /// the lock state exists is read for that very state, by name where the cache lacks it.
    async fn take_slot(
        &self,
        params: &ClientParams,
        node: &str,
        slots: u32,
    ) -> Result<Observed, FleetLockError> {
        let policy = LockPolicy {
            slots,
            ttl: self.config.lock_ttl,
            queue_timeout: self.config.queue_timeout,
        };
        let request = LockRequest {
            node,
            id: &params.id,
        };
        let observe = |state: &lock::LockState| {
            let names: Vec<String> = state.nodes().map(str::to_owned).collect();
            async move { self.nodes.existing(names.iter().map(String::as_str)).await }
        };
        let decision = self
            .locks
            .update_observing(&params.group, Read::Cached, observe, |state, existing| {
                let decision =
                    lock::decide_acquire(state, request, policy, Timestamp::now(), &|name| {
                        existing.contains(name)
                    });
                (decision.state.clone(), decision)
            })
            .await?;
        Ok(Observed::Slot {
            outcome: decision.outcome,
            reclaimed: decision.reclaimed,
            left_queue: decision.left_queue,
        })
    }

    /// The Events, metrics and logs of one observation of a pre-reboot request.
    async fn report(&self, node: &Node, group: &str, matched_by: &str, observed: &Observed) {
        let name = node.name_any();
        match observed {
            Observed::Arrived | Observed::Waited => {}
            Observed::Slot {
                outcome,
                reclaimed,
                left_queue,
            } => {
                for reclaimed in reclaimed {
                    self.note_reclaimed(group, reclaimed).await;
                }
                for left in left_queue {
                    tracing::info!(node = %left.waiter.node, %group, reason = left.reason.as_str(), first_asked_at = %left.waiter.first_asked_at, "node left the reboot queue");
                }
                if let AcquireOutcome::Full {
                    position, waiting, ..
                } = outcome
                {
                    tracing::debug!(node = %name, %group, position, waiting, "node waits in the reboot queue");
                }
                if *outcome == AcquireOutcome::Acquired {
                    self.metrics.count_lock_change(LockChange::Acquired);
                    tracing::info!(node = %name, %group, matched_by, "reboot slot acquired");
                    let note = format!("Reboot slot of group {group} acquired");
                    self.publish(node, EventType::Normal, "RebootSlotAcquired", "Lock", note)
                        .await;
                }
            }
            Observed::Cordon(CordonDecision::Cordon | CordonDecision::Recordon) => {
                self.metrics.count_node_change(NodeChange::Cordoned);
                tracing::info!(node = %name, "node cordoned for reboot");
                let note = "Cordoned before a reboot approved by FleetLock".to_owned();
                self.publish(node, EventType::Normal, "Cordoned", "Drain", note)
                    .await;
            }
            Observed::Cordon(CordonDecision::CordonedByOthers) => {
                tracing::debug!(node = %name, "node was cordoned already; it stays cordoned after the reboot");
            }
            Observed::Cordon(CordonDecision::AlreadyCordonedByUs) => {}
            Observed::Pods { plan, .. } if plan.is_drained() => {
                tracing::info!(node = %name, skipped = plan.skipped.len(), "node drained, reboot approved");
                let note = "Drained; reboot approved".to_owned();
                self.publish(node, EventType::Normal, "Drained", "Drain", note)
                    .await;
            }
            Observed::Pods { held, .. } => {
                for shortfall in held {
                    tracing::debug!(node = %name, namespace = %shortfall.namespace, statefulset = %shortfall.statefulset, ready_voters = shortfall.ready_voters.len(), majority = shortfall.majority, "Dkron server evictions held back for the cluster's majority");
                }
            }
            Observed::Evicted { outcomes, .. } => self.report_evictions(node, outcomes).await,
        }
    }

    async fn report_evictions(&self, node: &Node, outcomes: &BTreeMap<PodKey, EvictionOutcome>) {
        let mut blocked = Vec::new();
        let mut failed = Vec::new();
        let mut evicted = 0usize;
        for (pod, outcome) in outcomes {
            self.metrics.count_eviction(outcome);
            match outcome {
                EvictionOutcome::Evicted => evicted += 1,
                EvictionOutcome::AlreadyGone => {}
                EvictionOutcome::BlockedByDisruptionBudget(_) | EvictionOutcome::Unanswered => {
                    blocked.push(pod.to_string())
                }
                EvictionOutcome::Failed(message) => {
                    tracing::warn!(node = %node.name_any(), %pod, error = %message, "eviction failed");
                    failed.push(pod.to_string());
                }
            }
        }
        if evicted > 0 {
            tracing::info!(node = %node.name_any(), evicted, "pods evicted");
            let note = format!("Evicted {evicted} pod(s) before a reboot");
            self.publish(node, EventType::Normal, "Evicted", "Drain", note)
                .await;
        }
        if !blocked.is_empty() {
            tracing::info!(node = %node.name_any(), blocked = ?blocked, "evictions blocked by PodDisruptionBudgets");
            let note = format!(
                "Eviction blocked (PodDisruptionBudget): {}",
                blocked.join(", ")
            );
            self.publish(node, EventType::Warning, "EvictionBlocked", "Drain", note)
                .await;
        }
        if !failed.is_empty() {
            let note = format!("Eviction failed: {}", failed.join(", "));
            self.publish(node, EventType::Warning, "EvictionFailed", "Drain", note)
                .await;
        }
    }

    /// UnlockIfHeld: the Node leaves every queue at once; once it is Ready, uncordon it if we
    /// cordoned it and release its slots in every group ([`steps::plan_steady_state`]).
    pub async fn steady_state(&self, params: &ClientParams) -> Result<(), FleetLockError> {
        let (cached, _) = self.nodes.node_for_id(&params.id).await?;
        let name = cached.name_any();
        // Readiness and the cordon mark as they are now, not as the watch last saw them.
        let node = self.nodes.read(&name).await?;
        let node = &*node.ok_or_else(|| FleetLockError::UnknownMachineId {
            id: params.id.clone(),
            annotation: node::ID_ANNOTATION.to_owned(),
        })?;
        let (held_in, queued_in) = self.locks.groups_of(&name).await?;
        for group in &queued_in {
            self.locks
                .update(group, Read::Api, |state| {
                    (lock::decide_release(state, &name).state, ())
                })
                .await?;
            tracing::info!(node = %name, %group, reason = "steady_state", "node left the reboot queue");
        }
        let ours = drain::uncordon_decision(node) == UncordonDecision::Uncordon;
        let groups = match steps::plan_steady_state(held_in, ours, node::node_is_ready(node)) {
            SteadyState::NothingHeld => return Ok(()),
            SteadyState::NotReady => return Err(FleetLockError::NodeNotReady { node: name }),
            SteadyState::Unlock { groups } => groups,
        };
        if self.drainer.uncordon(&name).await? == UncordonDecision::Uncordon {
            self.metrics.count_node_change(NodeChange::Uncordoned);
            tracing::info!(node = %name, "node uncordoned after its reboot");
            let note = "Uncordoned after the reboot".to_owned();
            self.publish(node, EventType::Normal, "Uncordoned", "Unlock", note)
                .await;
        }
        for group in &groups {
            let released = self
                .locks
                .update(group, Read::Api, |state| {
                    let decision = lock::decide_release(state, &name);
                    (decision.state, decision.was_held)
                })
                .await?;
            if released {
                self.metrics.count_lock_change(LockChange::Released);
                tracing::info!(node = %name, %group, "reboot slot released");
                let note = format!("Reboot slot of group {group} released");
                self.publish(
                    node,
                    EventType::Normal,
                    "RebootSlotReleased",
                    "Unlock",
                    note,
                )
                .await;
            }
        }
        Ok(())
    }

    /// Holders and queue per group (every group with a Lease or a ConfigMap key) and the
    /// holders' drains.
    pub async fn status(&self) -> Result<StatusReport, FleetLockError> {
        let mut states: BTreeMap<String, lock::LockState> =
            self.locks.all_groups().await?.into_iter().collect();
        for group in self.locks.configured_groups().await? {
            states.entry(group).or_default();
        }
        let mut groups = Vec::with_capacity(states.len());
        for (group, state) in states {
            let mut holders = Vec::with_capacity(state.holders.len());
            for holder in state.holders {
                let node = self.nodes.get(&holder.node).await?;
                let node = node.as_deref();
                let plan = match node {
                    Some(_) => {
                        let pods = self.drainer.pods_on(&holder.node).await?;
                        drain::plan_drain(&holder.node, &pods)
                    }
                    None => DrainPlan::default(),
                };
                holders.push(HolderStatus {
                    node_exists: node.is_some(),
                    cordoned_by_fleetlock: node.is_some_and(drain::cordoned_by_us),
                    drained: plan.is_drained(),
                    remaining_pods: plan
                        .to_evict
                        .iter()
                        .chain(&plan.terminating)
                        .map(PodKey::to_string)
                        .collect(),
                    node: holder.node,
                    id: holder.id,
                    acquired_at: holder.acquired_at,
                    renewed_at: holder.renewed_at,
                });
            }
            let queue = state
                .queue
                .into_iter()
                .enumerate()
                .map(|(index, waiter)| WaiterStatus {
                    position: index + 1,
                    node: waiter.node,
                    id: waiter.id,
                    first_asked_at: waiter.first_asked_at,
                    last_asked_at: waiter.last_asked_at,
                })
                .collect();
            groups.push(GroupStatus {
                slots: self.locks.slots(&group).await?,
                group,
                holders,
                queue,
            });
        }
        Ok(StatusReport { groups })
    }

    async fn note_reclaimed(&self, group: &str, reclaimed: &lock::Reclaimed) {
        let change = match reclaimed.reason {
            ReleaseReason::NodeGone => LockChange::ReclaimedNodeGone,
            ReleaseReason::Expired => LockChange::ReclaimedExpired,
        };
        self.metrics.count_lock_change(change);
        tracing::warn!(node = %reclaimed.holder.node, %group, reason = reclaimed.reason.as_str(), "reboot slot reclaimed");
        if reclaimed.reason == ReleaseReason::NodeGone {
            return;
        }
        if let Ok(Some(node)) = self.nodes.get(&reclaimed.holder.node).await {
            let note = format!(
                "Reboot slot of group {group} reclaimed: no pre-reboot request within the TTL"
            );
            self.publish(&node, EventType::Warning, "RebootSlotExpired", "Lock", note)
                .await;
        }
    }

    /// Events are a courtesy to the people watching: failing to publish one is only logged.
    async fn publish(
        &self,
        node: &Node,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: action.to_owned(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &node.object_ref(&())).await {
            tracing::warn!(node = %node.name_any(), reason, %error, "could not publish an Event");
        }
    }
}
