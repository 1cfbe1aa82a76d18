//! Draining a Node before its reboot: cordon it, evict its pods through the policy/v1
//! Eviction API (so PodDisruptionBudgets are honoured), and tell what remains.
//!
//! The decisions ([`classify_pod`], [`plan_drain`], [`cordon_decision`],
//! [`uncordon_decision`], [`describe_remaining`]) are pure; [`Drainer`] performs them.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use futures::stream::{self, StreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{EvictParams, ListParams, Patch, PatchParams};
use kube::core::Selector;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::FleetLockError;
use super::lock;
use super::quorum::{self, Shortfall};

/// `"true"` on a Node means FleetLock cordoned it, so steady-state uncordons it. A Node that
/// was cordoned before FleetLock came never gets this annotation and stays cordoned.
pub const CORDONED_ANNOTATION: &str = "dkron-ha/fleetlock-cordoned";
/// Static pods appear in the API as mirror pods with this annotation; they cannot be evicted.
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";
/// Node patches are retried this often on resourceVersion conflicts.
const MAX_NODE_PATCH_ATTEMPTS: u32 = 8;
/// At most this many remaining pods are named in an answer; the rest are counted.
const MAX_PODS_NAMED: usize = 10;
/// How long one eviction may take. kube's default client retries 429 answers for minutes
/// (honouring the API server's Retry-After), and 429 is how the Eviction API says "not now";
/// past this the eviction counts as not accepted yet, and the next pass asks again.
pub const EVICTION_TIMEOUT: Duration = Duration::from_secs(5);

/// A pod by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

impl PodKey {
    pub fn of(pod: &Pod) -> PodKey {
        PodKey {
            namespace: pod.namespace().unwrap_or_default(),
            name: pod.name_any(),
        }
    }
}

impl fmt::Display for PodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why a pod is left on the Node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// Its DaemonSet would put it right back; it stops with the Node.
    DaemonSet,
    /// A static pod's mirror: the kubelet owns it.
    Mirror,
    /// Succeeded or Failed: it uses nothing.
    Finished,
}

/// What the drain does with one pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodDisposition {
    Evict,
    /// Already being deleted: wait for it to be gone.
    Terminating,
    Skip(SkipReason),
}

pub fn classify_pod(pod: &Pod) -> PodDisposition {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return PodDisposition::Skip(SkipReason::Finished);
    }
    if pod.annotations().contains_key(MIRROR_ANNOTATION) {
        return PodDisposition::Skip(SkipReason::Mirror);
    }
    let owned_by_daemon_set = pod
        .owner_references()
        .iter()
        .any(|owner| owner.controller == Some(true) && owner.kind == "DaemonSet");
    if owned_by_daemon_set {
        return PodDisposition::Skip(SkipReason::DaemonSet);
    }
    if pod.metadata.deletion_timestamp.is_some() {
        return PodDisposition::Terminating;
    }
    PodDisposition::Evict
}

/// The pods of one Node sorted by what the drain does with them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DrainPlan {
    pub to_evict: Vec<PodKey>,
    pub terminating: Vec<PodKey>,
    pub skipped: Vec<(PodKey, SkipReason)>,
}

impl DrainPlan {
    /// Drained: nothing left to evict and nothing still terminating.
    pub fn is_drained(&self) -> bool {
        self.to_evict.is_empty() && self.terminating.is_empty()
    }

    pub fn remaining(&self) -> usize {
        self.to_evict.len() + self.terminating.len()
    }
}

/// Plans the drain of `node` from the pods bound to it (`spec.nodeName`); other pods in
/// `pods` are ignored.
pub fn plan_drain(node: &str, pods: &[Pod]) -> DrainPlan {
    let mut plan = DrainPlan::default();
    for pod in pods {
        let bound_here = pod.spec.as_ref().and_then(|spec| spec.node_name.as_deref()) == Some(node);
        if !bound_here {
            continue;
        }
        let key = PodKey::of(pod);
        match classify_pod(pod) {
            PodDisposition::Evict => plan.to_evict.push(key),
            PodDisposition::Terminating => plan.terminating.push(key),
            PodDisposition::Skip(reason) => plan.skipped.push((key, reason)),
        }
    }
    plan.to_evict.sort();
    plan.terminating.sort();
    plan.skipped.sort_by(|a, b| a.0.cmp(&b.0));
    plan
}

/// The answer of the Eviction API for one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EvictionOutcome {
    /// Accepted: the pod is now terminating.
    Evicted,
    /// 404: the pod was already gone.
    AlreadyGone,
    /// 429: a PodDisruptionBudget does not allow it now; ask again later.
    BlockedByDisruptionBudget(String),
    /// No answer within [`EVICTION_TIMEOUT`]: with a retrying client, a PodDisruptionBudget
    /// refusal looks like this.
    Unanswered,
    /// Anything else (e.g. a pod covered by two PodDisruptionBudgets, RBAC).
    Failed(String),
}

impl EvictionOutcome {
    /// Classifies the Eviction API's answer from its HTTP status code and message.
    pub fn from_status(code: u16, message: &str) -> EvictionOutcome {
        match code {
            200..=299 => EvictionOutcome::Evicted,
            404 => EvictionOutcome::AlreadyGone,
            429 => EvictionOutcome::BlockedByDisruptionBudget(message.to_owned()),
            _ => EvictionOutcome::Failed(format!("HTTP {code}: {message}")),
        }
    }

    fn from_result(result: Result<kube::core::Status, kube::Error>) -> EvictionOutcome {
        match result {
            Ok(_) => EvictionOutcome::Evicted,
            Err(kube::Error::Api(status)) => {
                EvictionOutcome::from_status(status.code, &status.message)
            }
            Err(error) => EvictionOutcome::Failed(error.to_string()),
        }
    }
}

/// Says which pods keep the Node from being drained, and why, for the `drain_in_progress`
/// answer. `outcomes` are the latest eviction answers, which explain pods still to evict.
pub fn describe_remaining(
    plan: &DrainPlan,
    outcomes: &BTreeMap<PodKey, EvictionOutcome>,
) -> String {
    let mut reasons: Vec<String> = Vec::with_capacity(plan.remaining());
    for pod in &plan.to_evict {
        let why = match outcomes.get(pod) {
            Some(EvictionOutcome::BlockedByDisruptionBudget(_)) => {
                "eviction blocked by a PodDisruptionBudget".to_owned()
            }
            Some(EvictionOutcome::Unanswered) => format!(
                "eviction not accepted within {}s, most likely a PodDisruptionBudget",
                EVICTION_TIMEOUT.as_secs()
            ),
            Some(EvictionOutcome::Failed(message)) => format!("eviction failed: {message}"),
            _ => "waiting for eviction".to_owned(),
        };
        reasons.push(format!("{pod} ({why})"));
    }
    for pod in &plan.terminating {
        reasons.push(format!("{pod} (terminating)"));
    }
    let total = reasons.len();
    let mut text = format!(
        "{total} pod{} remain{}: ",
        if total == 1 { "" } else { "s" },
        if total == 1 { "s" } else { "" },
    );
    text.push_str(&reasons[..total.min(MAX_PODS_NAMED)].join(", "));
    if total > MAX_PODS_NAMED {
        text.push_str(&format!(" and {} more", total - MAX_PODS_NAMED));
    }
    text
}

/// What cordoning a Node comes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CordonDecision {
    /// Schedulable: cordon it and mark it as ours.
    Cordon,
    /// Marked as ours but schedulable again (someone uncordoned it mid-drain): cordon again.
    Recordon,
    /// We cordoned it already.
    AlreadyCordonedByUs,
    /// Cordoned by someone else: leave it, and never uncordon it.
    CordonedByOthers,
}

pub fn cordon_decision(node: &Node) -> CordonDecision {
    match (is_unschedulable(node), cordoned_by_us(node)) {
        (true, true) => CordonDecision::AlreadyCordonedByUs,
        (true, false) => CordonDecision::CordonedByOthers,
        (false, true) => CordonDecision::Recordon,
        (false, false) => CordonDecision::Cordon,
    }
}

/// What steady-state does with a Node's cordon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UncordonDecision {
    /// We cordoned it: uncordon it and drop our mark.
    Uncordon,
    /// Not cordoned by us: leave it as it is.
    LeaveAsIs,
}

pub fn uncordon_decision(node: &Node) -> UncordonDecision {
    if cordoned_by_us(node) {
        UncordonDecision::Uncordon
    } else {
        UncordonDecision::LeaveAsIs
    }
}

pub fn is_unschedulable(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|spec| spec.unschedulable)
        .unwrap_or(false)
}

pub fn cordoned_by_us(node: &Node) -> bool {
    node.annotations()
        .get(CORDONED_ANNOTATION)
        .is_some_and(|v| v == "true")
}

/// The merge patch that cordons `node` and marks it, valid only at the Node's current
/// resourceVersion (so a concurrent cordon by an admin is never taken for ours).
pub fn cordon_patch(node: &Node) -> serde_json::Value {
    json!({
        "metadata": {
            "resourceVersion": node.resource_version(),
            "annotations": { CORDONED_ANNOTATION: "true" },
        },
        "spec": { "unschedulable": true },
    })
}

/// The merge patch that uncordons `node` and drops the mark, at its current resourceVersion.
pub fn uncordon_patch(node: &Node) -> serde_json::Value {
    json!({
        "metadata": {
            "resourceVersion": node.resource_version(),
            "annotations": { CORDONED_ANNOTATION: null },
        },
        "spec": { "unschedulable": null },
    })
}

/// Performs cordons, evictions and uncordons against the Kubernetes API.
#[derive(Clone)]
pub struct Drainer {
    client: kube::Client,
    /// Evictions may use their own client: one without kube's default retries sees a
    /// PodDisruptionBudget's 429 at once instead of after [`EVICTION_TIMEOUT`].
    eviction_client: kube::Client,
    nodes: Api<Node>,
    eviction_concurrency: usize,
}

impl Drainer {
    pub fn new(client: kube::Client, eviction_concurrency: usize) -> Self {
        Drainer {
            nodes: Api::all(client.clone()),
            eviction_client: client.clone(),
            client,
            eviction_concurrency: eviction_concurrency.max(1),
        }
    }

    /// Sends evictions through `client` instead.
    pub fn with_eviction_client(mut self, client: kube::Client) -> Self {
        self.eviction_client = client;
        self
    }

    /// Cordons `node` unless it already is; returns what it found.
    pub async fn cordon(&self, node: &str) -> Result<CordonDecision, FleetLockError> {
        self.patch_node(node, "cordoning", |current| {
            let decision = cordon_decision(current);
            let patch = matches!(decision, CordonDecision::Cordon | CordonDecision::Recordon)
                .then(|| cordon_patch(current));
            (patch, decision)
        })
        .await
    }

    /// Uncordons `node` if FleetLock cordoned it; returns what it found.
    pub async fn uncordon(&self, node: &str) -> Result<UncordonDecision, FleetLockError> {
        self.patch_node(node, "uncordoning", |current| {
            let decision = uncordon_decision(current);
            let patch = (decision == UncordonDecision::Uncordon).then(|| uncordon_patch(current));
            (patch, decision)
        })
        .await
    }

    async fn patch_node<T>(
        &self,
        name: &str,
        action: &str,
        decide: impl Fn(&Node) -> (Option<serde_json::Value>, T),
    ) -> Result<T, FleetLockError> {
        let decide = &decide;
        let action = || format!("{action} Node {name}");
        let action = &action;
        lock::retry_conflicts(MAX_NODE_PATCH_ATTEMPTS, action, move || async move {
            let node = self
                .nodes
                .get(name)
                .await
                .map_err(FleetLockError::kube(action()))?;
            let (patch, answer) = decide(&node);
            if let Some(patch) = patch {
                self.nodes
                    .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(|source| lock::Attempt::failed(action(), source))?;
            }
            Ok(answer)
        })
        .await
    }

    /// The pods bound to `node`.
    pub async fn pods_on(&self, node: &str) -> Result<Vec<Pod>, FleetLockError> {
        let pods: Api<Pod> = Api::all(self.client.clone());
        let selector = format!("spec.nodeName={node}");
        Ok(pods
            .list(&ListParams::default().fields(&selector))
            .await
            .map_err(FleetLockError::kube(format!(
                "listing the pods of Node {node}"
            )))?
            .items)
    }

    /// The Dkron clusters whose servers among `pods` (those to evict from `node`) must stay
    /// for now: one GET of the StatefulSet and one list of its pods per cluster, only while
    /// such a server is still on the Node.
    pub async fn quorum_shortfalls(
        &self,
        node: &str,
        to_evict: &[Pod],
    ) -> Result<Vec<Shortfall>, FleetLockError> {
        let clusters: std::collections::BTreeSet<(String, String)> = to_evict
            .iter()
            .filter_map(|pod| {
                let statefulset = quorum::server_statefulset(pod)?;
                Some((pod.namespace().unwrap_or_default(), statefulset.to_owned()))
            })
            .collect();
        let mut shortfalls = Vec::new();
        for (namespace, name) in clusters {
            let action = || format!("reading Dkron StatefulSet {namespace}/{name}");
            let statefulsets: Api<StatefulSet> = Api::namespaced(self.client.clone(), &namespace);
            let Some(statefulset) = statefulsets
                .get_opt(&name)
                .await
                .map_err(FleetLockError::kube(action()))?
            else {
                continue;
            };
            let selector = statefulset
                .spec
                .as_ref()
                .and_then(|spec| Selector::try_from(spec.selector.clone()).ok())
                .unwrap_or_default();
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
            let members = pods
                .list(&ListParams::default().labels_from(&selector))
                .await
                .map_err(FleetLockError::kube(action()))?
                .items;
            shortfalls.extend(quorum::shortfall(node, &statefulset, &members));
        }
        Ok(shortfalls)
    }

    /// Asks the Eviction API to evict every pod in `pods`, several at a time.
    pub async fn evict(&self, pods: &[PodKey]) -> BTreeMap<PodKey, EvictionOutcome> {
        stream::iter(pods.iter().cloned())
            .map(|pod| async move {
                let api: Api<Pod> = Api::namespaced(self.eviction_client.clone(), &pod.namespace);
                let params = EvictParams::default();
                let eviction = api.evict(&pod.name, &params);
                let outcome = match tokio::time::timeout(EVICTION_TIMEOUT, eviction).await {
                    Ok(result) => EvictionOutcome::from_result(result),
                    Err(_) => EvictionOutcome::Unanswered,
                };
                (pod, outcome)
            })
            .buffer_unordered(self.eviction_concurrency)
            .collect()
            .await
    }
}
