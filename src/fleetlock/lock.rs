//! The reboot semaphore: one counting semaphore per group, recursive, owned by Nodes, with a
//! queue of the Nodes refused because the group was full.
//!
//! The decision ([`decide_acquire`], [`decide_release`]) is a pure function of the stored
//! holders and queue, the request, the policy and the clock. [`LockStore`] keeps both for
//! group `G` in the Lease `dkron-ha-fleetlock-G` (annotations [`HOLDERS_ANNOTATION`] and
//! [`QUEUE_ANNOTATION`], JSON lists; `spec.holderIdentity` lists the holders for `kubectl get
//! lease`) and writes with the Lease's resourceVersion, retrying on conflicts, so every
//! replica of `serve` shares one semaphore and one queue, and a restart loses nothing.
//!
//! Fairness: a Node refused because every slot is taken joins the queue at its first request;
//! a free slot goes only to a Node whose place in the queue is within the free slots, so
//! Nodes are granted in the order they first asked, whatever their retry timing. A waiter
//! that stops asking for `--fleetlock-queue-timeout` ([`DEFAULT_QUEUE_TIMEOUT`]) leaves the
//! queue, as does a waiter whose Node is gone or which reports steady-state.
//!
//! Decisions read the Leases through a watch ([`Read::Cached`]), so a refusal costs no API
//! call; every write carries the resourceVersion its decision read, and after a conflict the
//! Lease is read from the API, so a stale cache can delay a grant but never make two.
//!
//! Slots per group come from the ConfigMap named by `--fleetlock-config-map` (default
//! `dkron-ha-fleetlock`) in the lock namespace, watched, so edits apply within a moment:
//!
//! ```yaml
//! apiVersion: v1
//! kind: ConfigMap
//! metadata:
//!   name: dkron-ha-fleetlock
//! data:
//!   default: "1"     # group name (Zincati's `[identity] group`, any case): slots
//!   workers: "3"
//!   frozen: "0"      # 0 slots: nobody in this group may reboot
//! ```
//!
//! A group without a key gets `--fleetlock-default-slots`; a missing ConfigMap means every
//! group gets the default.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, ObjectMeta, PostParams};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use serde::{Deserialize, Serialize};

use super::FleetLockError;
use super::cache::Watched;

/// Lease `dkron-ha-fleetlock-<group>` holds the semaphore of `<group>`.
pub const LEASE_PREFIX: &str = "dkron-ha-fleetlock-";
/// Annotation on the Lease with the holders, a JSON list of [`Holder`].
pub const HOLDERS_ANNOTATION: &str = "dkron-ha/fleetlock-holders";
/// Annotation on the Lease with the queue, a JSON list of [`Waiter`], first asked first.
pub const QUEUE_ANNOTATION: &str = "dkron-ha/fleetlock-queue";
/// A waiter silent for this long leaves the queue: three of Zincati's 5-minute update
/// checks, so one missed check (or a `serve` restart) does not cost a Node its place.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// A waiter's `last_asked_at` is written again only once it is older than this fraction of
/// the queue timeout, so a Node asking again soon costs no Lease write.
const LAST_ASKED_REFRESH_DIVISOR: u32 = 10;
/// Label on the Lease naming its group, so every group can be listed.
pub const GROUP_LABEL: &str = "dkron-ha/fleetlock-group";
/// Default name of the ConfigMap with slots per group.
pub const DEFAULT_CONFIG_MAP: &str = "dkron-ha-fleetlock";
/// Writes are retried this often on resourceVersion conflicts before giving up.
const MAX_WRITE_ATTEMPTS: u32 = 32;

/// One Node holding a reboot slot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The Node name: ownership follows the Node, whatever id rule found it.
    pub node: String,
    /// The id the client sent, for people reading the Lease.
    pub id: String,
    pub acquired_at: Timestamp,
    /// Last pre-reboot request from this holder; the TTL counts from here.
    pub renewed_at: Timestamp,
}

/// One Node refused because its group was full, waiting for its turn.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiter {
    pub node: String,
    pub id: String,
    /// Its first refused pre-reboot request: the queue's order.
    pub first_asked_at: Timestamp,
    /// Its latest request (refreshed at most every tenth of the queue timeout); the queue
    /// timeout counts from here.
    pub last_asked_at: Timestamp,
}

/// The holders of one group's semaphore, oldest first, and its queue, first asked first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LockState {
    pub holders: Vec<Holder>,
    pub queue: Vec<Waiter>,
}

impl LockState {
    pub fn holds(&self, node: &str) -> bool {
        self.holders.iter().any(|h| h.node == node)
    }

    pub fn is_queued(&self, node: &str) -> bool {
        self.queue.iter().any(|w| w.node == node)
    }

    /// Every Node named in the state, holders first.
    pub fn nodes(&self) -> impl Iterator<Item = &str> {
        let holders = self.holders.iter().map(|h| h.node.as_str());
        holders.chain(self.queue.iter().map(|w| w.node.as_str()))
    }

    pub fn node_names(&self) -> Vec<String> {
        self.holders.iter().map(|h| h.node.clone()).collect()
    }
}

/// How many slots a group has, how long a silent holder keeps one and a silent waiter its
/// place in the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockPolicy {
    pub slots: u32,
    /// `None`: holders are kept until steady-state or until their Node is deleted.
    pub ttl: Option<Duration>,
    pub queue_timeout: Duration,
}

/// Why a holder lost its slot without asking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReleaseReason {
    NodeGone,
    Expired,
}

impl ReleaseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseReason::NodeGone => "node_gone",
            ReleaseReason::Expired => "expired",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reclaimed {
    pub holder: Holder,
    pub reason: ReleaseReason,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AcquireOutcome {
    /// The Node got a free slot.
    Acquired,
    /// The Node already held a slot (recursive lock): it keeps it.
    AlreadyHeld,
    /// No slot for this Node now: the slots are held by `holders`, and any free slot is kept
    /// for a Node ahead of it; it waits at `position` (1 = next) of `waiting` in the queue.
    Full {
        holders: Vec<String>,
        position: usize,
        waiting: usize,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcquireDecision {
    pub state: LockState,
    pub outcome: AcquireOutcome,
    /// Holders dropped because their Node is gone or their TTL ran out.
    pub reclaimed: Vec<Reclaimed>,
    /// Waiters dropped because their Node is gone or they stopped asking.
    pub left_queue: Vec<LeftQueue>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeftQueue {
    pub waiter: Waiter,
    pub reason: ReleaseReason,
}

/// A pre-reboot request for `node`, which the client called `id`.
#[derive(Clone, Copy, Debug)]
pub struct LockRequest<'a> {
    pub node: &'a str,
    pub id: &'a str,
}

/// Drops holders whose Node no longer exists or, with a TTL, whose last request is older than
/// the TTL, and waiters whose Node is gone or who stopped asking; then lets the requester keep
/// its slot, take a free one if no earlier waiter is owed it, or wait in the queue.
pub fn decide_acquire(
    state: &LockState,
    request: LockRequest<'_>,
    policy: LockPolicy,
    now: Timestamp,
    node_exists: &dyn Fn(&str) -> bool,
) -> AcquireDecision {
    let mut kept = Vec::with_capacity(state.holders.len() + 1);
    let mut reclaimed = Vec::new();
    let mut already_held = false;
    for holder in &state.holders {
        if holder.node == request.node {
            // Asking again proves it is alive: renew instead of expiring.
            already_held = true;
            kept.push(Holder {
                id: request.id.to_owned(),
                renewed_at: now,
                ..holder.clone()
            });
        } else if !node_exists(&holder.node) {
            reclaimed.push(reclaim(holder, ReleaseReason::NodeGone));
        } else if is_expired(holder.renewed_at, policy.ttl, now) {
            reclaimed.push(reclaim(holder, ReleaseReason::Expired));
        } else {
            kept.push(holder.clone());
        }
    }
    let mut queue = Vec::with_capacity(state.queue.len() + 1);
    let mut left_queue = Vec::new();
    for waiter in &state.queue {
        let leave = |reason| {
            let waiter = waiter.clone();
            LeftQueue { waiter, reason }
        };
        if waiter.node == request.node {
            if !already_held {
                queue.push(asked_again(waiter, request.id, policy, now));
            }
        } else if !node_exists(&waiter.node) {
            left_queue.push(leave(ReleaseReason::NodeGone));
        } else if is_expired(waiter.last_asked_at, Some(policy.queue_timeout), now) {
            left_queue.push(leave(ReleaseReason::Expired));
        } else {
            queue.push(waiter.clone());
        }
    }
    let outcome = if already_held {
        AcquireOutcome::AlreadyHeld
    } else {
        let position = match queue.iter().position(|w| w.node == request.node) {
            Some(position) => position,
            None => {
                queue.push(Waiter {
                    node: request.node.to_owned(),
                    id: request.id.to_owned(),
                    first_asked_at: now,
                    last_asked_at: now,
                });
                queue.len() - 1
            }
        };
        let free = (policy.slots as usize).saturating_sub(kept.len());
        if position < free {
            queue.remove(position);
            kept.push(Holder {
                node: request.node.to_owned(),
                id: request.id.to_owned(),
                acquired_at: now,
                renewed_at: now,
            });
            AcquireOutcome::Acquired
        } else {
            AcquireOutcome::Full {
                holders: kept.iter().map(|h| h.node.clone()).collect(),
                position: position + 1,
                waiting: queue.len(),
            }
        }
    };
    AcquireDecision {
        state: LockState {
            holders: kept,
            queue,
        },
        outcome,
        reclaimed,
        left_queue,
    }
}

/// A waiter asking again keeps its place; its last request is written only when the stored
/// one is older than a tenth of the queue timeout.
fn asked_again(waiter: &Waiter, id: &str, policy: LockPolicy, now: Timestamp) -> Waiter {
    let refresh_after = policy.queue_timeout / LAST_ASKED_REFRESH_DIVISOR;
    let last_asked_at = if is_expired(waiter.last_asked_at, Some(refresh_after), now) {
        now
    } else {
        waiter.last_asked_at
    };
    Waiter {
        id: id.to_owned(),
        last_asked_at,
        ..waiter.clone()
    }
}

fn reclaim(holder: &Holder, reason: ReleaseReason) -> Reclaimed {
    Reclaimed {
        holder: holder.clone(),
        reason,
    }
}

/// Whether `since` is more than `ttl` before `now`; no TTL or a zero one never expires.
fn is_expired(since: Timestamp, ttl: Option<Duration>, now: Timestamp) -> bool {
    let Some(ttl) = ttl.filter(|ttl| !ttl.is_zero()) else {
        return false;
    };
    let silent_for = now.as_millisecond() - since.as_millisecond();
    silent_for > i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReleaseDecision {
    pub state: LockState,
    /// Whether `node` held a slot (steady-state succeeds either way).
    pub was_held: bool,
}

/// Unlock-if-held: removes `node` from the holders, if it is one, and from the queue: a Node
/// in steady state is not waiting to reboot.
pub fn decide_release(state: &LockState, node: &str) -> ReleaseDecision {
    let holders: Vec<Holder> = state
        .holders
        .iter()
        .filter(|h| h.node != node)
        .cloned()
        .collect();
    let queue = state
        .queue
        .iter()
        .filter(|w| w.node != node)
        .cloned()
        .collect();
    ReleaseDecision {
        was_held: holders.len() != state.holders.len(),
        state: LockState { holders, queue },
    }
}

/// Slots of `group` from the ConfigMap data (keys compare without case), else `default`.
pub fn slots_for_group(
    data: Option<&BTreeMap<String, String>>,
    group: &str,
    default: u32,
    config_map: &str,
) -> Result<u32, FleetLockError> {
    let Some((key, value)) = data
        .into_iter()
        .flatten()
        .find(|(key, _)| key.trim().eq_ignore_ascii_case(group))
    else {
        return Ok(default);
    };
    value.trim().parse::<u32>().map_err(|_| {
        FleetLockError::InvalidConfiguration(format!(
            "ConfigMap {config_map} key {key:?} has {value:?}; it must be a whole number of \
             reboot slots (0 stops reboots in that group)"
        ))
    })
}

/// The name of the Lease holding `group`'s semaphore.
pub fn lease_name(group: &str) -> String {
    format!("{LEASE_PREFIX}{group}")
}

/// Reads the holders and the queue stored on a Lease.
pub fn state_from_lease(lease: &Lease) -> Result<LockState, FleetLockError> {
    Ok(LockState {
        holders: annotation_list(lease, HOLDERS_ANNOTATION)?,
        queue: annotation_list(lease, QUEUE_ANNOTATION)?,
    })
}

fn annotation_list<T: serde::de::DeserializeOwned>(
    lease: &Lease,
    annotation: &str,
) -> Result<Vec<T>, FleetLockError> {
    let Some(json) = lease.annotations().get(annotation) else {
        return Ok(Vec::new());
    };
    serde_json::from_str(json).map_err(|e| {
        FleetLockError::CorruptLockState(format!(
            "Lease {} has an unreadable {annotation} annotation ({e}); fix it or delete the \
             Lease to release every slot of its group and empty its queue",
            lease.name_any()
        ))
    })
}

/// Writes `state` into `lease` (a fresh Lease when `None`), keeping its resourceVersion.
pub fn lease_with_state(
    lease: Option<Lease>,
    namespace: &str,
    group: &str,
    state: &LockState,
) -> Result<Lease, FleetLockError> {
    let mut lease = lease.unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(lease_name(group)),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                (
                    "app.kubernetes.io/managed-by".to_owned(),
                    "dkron-ha".to_owned(),
                ),
                (GROUP_LABEL.to_owned(), group.to_owned()),
            ])),
            ..ObjectMeta::default()
        },
        spec: None,
    });
    let encode = |what: &str, json: serde_json::Result<String>| {
        json.map_err(|e| FleetLockError::CorruptLockState(format!("cannot encode the {what}: {e}")))
    };
    let holders = encode("holders", serde_json::to_string(&state.holders))?;
    let queue = encode("queue", serde_json::to_string(&state.queue))?;
    let annotations = lease.annotations_mut();
    annotations.insert(HOLDERS_ANNOTATION.to_owned(), holders);
    annotations.insert(QUEUE_ANNOTATION.to_owned(), queue);
    let holder_identity = (!state.holders.is_empty()).then(|| state.node_names().join(","));
    lease.spec = Some(LeaseSpec {
        holder_identity,
        ..lease.spec.unwrap_or_default()
    });
    Ok(lease)
}

/// Where a decision reads the lock state from first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Read {
    /// The watch-fed Lease: a refusal costs no API call; a write still carries the read
    /// resourceVersion, and after a conflict the Lease is read from the API.
    Cached,
    /// The API: for decisions that may change nothing on a stale read (a release).
    Api,
}

/// The semaphores as stored in the Kubernetes API, read through watches.
pub struct LockStore {
    leases: Api<Lease>,
    cached_leases: Watched<Lease>,
    cached_config_map: Watched<ConfigMap>,
    namespace: String,
    config_map: String,
    default_slots: u32,
}

impl LockStore {
    /// Starts watching the lock Leases and the slots ConfigMap (on the current Tokio runtime).
    pub fn new(
        client: kube::Client,
        namespace: &str,
        config_map: &str,
        default_slots: u32,
    ) -> Self {
        let leases: Api<Lease> = Api::namespaced(client.clone(), namespace);
        let config_maps: Api<ConfigMap> = Api::namespaced(client, namespace);
        let by_label = watcher::Config::default().labels(GROUP_LABEL);
        let by_name = watcher::Config::default().fields(&format!("metadata.name={config_map}"));
        LockStore {
            cached_leases: Watched::start(leases.clone(), by_label, "the lock Leases"),
            cached_config_map: Watched::start(config_maps, by_name, "the slots ConfigMap"),
            leases,
            namespace: namespace.to_owned(),
            config_map: config_map.to_owned(),
            default_slots,
        }
    }

    /// Waits (bounded) for the first lists of the Leases and the ConfigMap.
    pub async fn ready(&self) -> Result<(), FleetLockError> {
        self.cached_leases.ready().await?;
        self.cached_config_map.ready().await
    }

    /// Slots of `group`, from the ConfigMap as last watched.
    pub async fn slots(&self, group: &str) -> Result<u32, FleetLockError> {
        let config_map = self.cached_config_map.get(&self.config_map).await?;
        slots_for_group(
            config_map.as_ref().and_then(|cm| cm.data.as_ref()),
            group,
            self.default_slots,
            &self.config_map,
        )
    }

    /// Group names configured in the ConfigMap (for the status page).
    pub async fn configured_groups(&self) -> Result<Vec<String>, FleetLockError> {
        let config_map = self.cached_config_map.get(&self.config_map).await?;
        Ok(config_map
            .as_ref()
            .and_then(|cm| cm.data.as_ref())
            .map(|data| data.keys().map(|k| k.trim().to_ascii_lowercase()).collect())
            .unwrap_or_default())
    }

    /// Reads `group`'s holders and queue, lets `decide` compute the new ones, and writes them
    /// back if they changed, with optimistic concurrency: on a conflict everything is read and
    /// decided again. Returns what `decide` returned for the state that was written.
    pub async fn update<T>(
        &self,
        group: &str,
        read: Read,
        decide: impl Fn(&LockState) -> (LockState, T),
    ) -> Result<T, FleetLockError> {
        let observe = |_: &LockState| std::future::ready(Ok(()));
        self.update_observing(group, read, observe, |state, ()| decide(state))
            .await
    }

    /// [`LockStore::update`], with `observe` looking at the world for the state just read
    /// (e.g. which of its Nodes still exist) before `decide` sees both.
    pub async fn update_observing<P, T, Observing>(
        &self,
        group: &str,
        read: Read,
        observe: impl Fn(&LockState) -> Observing,
        decide: impl Fn(&LockState, P) -> (LockState, T),
    ) -> Result<T, FleetLockError>
    where
        Observing: std::future::Future<Output = Result<P, FleetLockError>>,
    {
        let name = lease_name(group);
        let (name, observe, decide) = (&name, &observe, &decide);
        let action = || format!("writing Lease {name}");
        let mut from_cache = read == Read::Cached;
        retry_conflicts(MAX_WRITE_ATTEMPTS, action, move || {
            let cached = std::mem::replace(&mut from_cache, false);
            async move {
                let lease = if cached {
                    self.cached_leases
                        .get(name)
                        .await?
                        .map(Arc::unwrap_or_clone)
                } else {
                    self.leases
                        .get_opt(name)
                        .await
                        .map_err(FleetLockError::kube(format!("reading Lease {name}")))?
                };
                let current = match &lease {
                    Some(lease) => state_from_lease(lease)?,
                    None => LockState::default(),
                };
                let observed = observe(&current).await?;
                let (next, answer) = decide(&current, observed);
                if next == current {
                    return Ok(answer);
                }
                let exists = lease.is_some();
                let desired = lease_with_state(lease, &self.namespace, group, &next)?;
                let written = if exists {
                    self.leases
                        .replace(name, &PostParams::default(), &desired)
                        .await
                } else {
                    self.leases.create(&PostParams::default(), &desired).await
                };
                match written {
                    // Deleted since the cache saw it: read it again, like a conflict.
                    Err(kube::Error::Api(status)) if status.code == 404 => Err(Attempt::Conflict),
                    Err(source) => Err(Attempt::failed(action(), source)),
                    Ok(_) => Ok(answer),
                }
            }
        })
        .await
    }

    /// Every group with a Lease, and its holders and queue, as last watched.
    pub async fn all_groups(&self) -> Result<Vec<(String, LockState)>, FleetLockError> {
        let leases = self.cached_leases.all().await?;
        groups_of_leases(leases.iter().map(|lease| &**lease))
    }

    /// Groups in which `node` holds a slot, and those in whose queue it waits, read from the
    /// API (steady-state must not miss a slot granted a moment ago by another replica).
    pub async fn groups_of(
        &self,
        node: &str,
    ) -> Result<(BTreeSet<String>, BTreeSet<String>), FleetLockError> {
        let leases = self
            .leases
            .list(&ListParams::default().labels(GROUP_LABEL))
            .await
            .map_err(FleetLockError::kube("listing the lock Leases"))?;
        let mut held_in = BTreeSet::new();
        let mut queued_in = BTreeSet::new();
        for (group, state) in groups_of_leases(&leases.items)? {
            if state.holds(node) {
                held_in.insert(group);
            } else if state.is_queued(node) {
                queued_in.insert(group);
            }
        }
        Ok((held_in, queued_in))
    }
}

fn groups_of_leases<'a>(
    leases: impl IntoIterator<Item = &'a Lease>,
) -> Result<Vec<(String, LockState)>, FleetLockError> {
    let mut groups = Vec::new();
    for lease in leases {
        let Some(group) = lease.labels().get(GROUP_LABEL) else {
            continue;
        };
        groups.push((group.clone(), state_from_lease(lease)?));
    }
    groups.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(groups)
}

/// Why one optimistic-concurrency attempt did not succeed.
#[derive(Debug)]
pub(crate) enum Attempt {
    /// Someone else wrote meanwhile (409): read, decide and write again.
    Conflict,
    Failed(FleetLockError),
}

impl Attempt {
    /// A failed write: a 409 is a [`Attempt::Conflict`], anything else ends the retries.
    pub(crate) fn failed(action: String, source: kube::Error) -> Self {
        match source {
            kube::Error::Api(status) if status.code == 409 => Attempt::Conflict,
            source => Attempt::Failed(FleetLockError::Kubernetes { action, source }),
        }
    }
}

impl From<FleetLockError> for Attempt {
    fn from(error: FleetLockError) -> Self {
        Attempt::Failed(error)
    }
}

/// Runs `attempt` until it succeeds, fails otherwise than by a conflict, or has conflicted
/// `attempts` times; between conflicts a few milliseconds, growing and jittered, so racing
/// writers stop colliding.
pub(crate) async fn retry_conflicts<T, Fut>(
    attempts: u32,
    action: impl Fn() -> String,
    attempt: impl FnMut() -> Fut,
) -> Result<T, FleetLockError>
where
    Fut: std::future::Future<Output = Result<T, Attempt>>,
{
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(5))
        .with_max_delay(Duration::from_millis(100))
        .with_jitter()
        .with_max_times(attempts.saturating_sub(1) as usize);
    attempt
        .retry(backoff)
        .when(|error| matches!(error, Attempt::Conflict))
        .notify(|_, delay| tracing::debug!(action = %action(), ?delay, "write conflict, retrying"))
        .await
        .map_err(|error| match error {
            Attempt::Conflict => FleetLockError::TooManyConflicts {
                action: action(),
                attempts,
            },
            Attempt::Failed(error) => error,
        })
}
