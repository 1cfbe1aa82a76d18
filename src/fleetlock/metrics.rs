//! FleetLock metrics. Every label has a fixed, small set of values: endpoints, error kinds,
//! eviction outcomes and lock changes. Groups, Nodes and pods never become labels.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::drain::EvictionOutcome;
use super::protocol::ErrorKind;

crate::metrics::label_enum! {
    pub enum Endpoint {
        PreReboot => "pre_reboot",
        SteadyState => "steady_state",
        Status => "status",
        /// Any other path or method under the FleetLock paths.
        Unknown => "unknown",
    }
}

/// `ok` or the error kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RequestOutcome {
    Ok,
    Failed(ErrorKind),
}

impl RequestOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestOutcome::Ok => "ok",
            RequestOutcome::Failed(kind) => kind.as_str(),
        }
    }
}
crate::metrics::label_value_as_str!(RequestOutcome);

crate::metrics::label_enum! {
    /// The Eviction API's answer, without its message.
    pub enum EvictionKind {
        Evicted => "evicted",
        AlreadyGone => "already_gone",
        BlockedByPdb => "blocked_by_pdb",
        Unanswered => "unanswered",
        Failed => "failed",
    }
}

impl EvictionKind {
    pub fn of(outcome: &EvictionOutcome) -> Self {
        match outcome {
            EvictionOutcome::Evicted => EvictionKind::Evicted,
            EvictionOutcome::AlreadyGone => EvictionKind::AlreadyGone,
            EvictionOutcome::BlockedByDisruptionBudget(_) => EvictionKind::BlockedByPdb,
            EvictionOutcome::Unanswered => EvictionKind::Unanswered,
            EvictionOutcome::Failed(_) => EvictionKind::Failed,
        }
    }
}

crate::metrics::label_enum! {
    pub enum LockChange {
        Acquired => "acquired",
        Released => "released",
        ReclaimedNodeGone => "reclaimed_node_gone",
        ReclaimedExpired => "reclaimed_expired",
    }
}

crate::metrics::label_enum! {
    pub enum NodeChange {
        Cordoned => "cordoned",
        Uncordoned => "uncordoned",
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: Endpoint,
    pub outcome: RequestOutcome,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: Endpoint,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: EvictionKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct LockChangeLabels {
    pub change: LockChange,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct NodeChangeLabels {
    pub change: NodeChange,
}

type HistogramFamily = Family<EndpointLabels, Histogram, fn() -> Histogram>;

#[derive(Clone)]
pub struct FleetLockMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: HistogramFamily,
    pub evictions: Family<OutcomeLabels, Counter>,
    pub lock_changes: Family<LockChangeLabels, Counter>,
    pub node_changes: Family<NodeChangeLabels, Counter>,
}

fn duration_histogram() -> Histogram {
    // 5 ms .. ~80 s: a pre-reboot request may wait for a drain.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

impl FleetLockMetrics {
    /// Registers the metrics as `dkron_ha_fleetlock_*` in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = FleetLockMetrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(duration_histogram),
            evictions: Family::default(),
            lock_changes: Family::default(),
            node_changes: Family::default(),
        };
        let registry = registry.sub_registry_with_prefix("dkron_ha_fleetlock");
        registry.register(
            "requests",
            "FleetLock requests by endpoint and outcome (ok or the error kind)",
            metrics.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time to answer a FleetLock request, drain included",
            metrics.request_duration.clone(),
        );
        registry.register(
            "evictions",
            "Pod evictions requested while draining, by the Eviction API's answer",
            metrics.evictions.clone(),
        );
        registry.register(
            "lock_changes",
            "Reboot slots acquired, released, or reclaimed from gone or expired holders",
            metrics.lock_changes.clone(),
        );
        registry.register(
            "node_changes",
            "Nodes cordoned and uncordoned by FleetLock",
            metrics.node_changes.clone(),
        );
        metrics
    }

    pub fn count_lock_change(&self, change: LockChange) {
        self.lock_changes
            .get_or_create(&LockChangeLabels { change })
            .inc();
    }

    pub fn count_node_change(&self, change: NodeChange) {
        self.node_changes
            .get_or_create(&NodeChangeLabels { change })
            .inc();
    }

    pub fn observe_request(
        &self,
        endpoint: Endpoint,
        outcome: RequestOutcome,
        elapsed: std::time::Duration,
    ) {
        self.requests
            .get_or_create(&RequestLabels { endpoint, outcome })
            .inc();
        self.request_duration
            .get_or_create(&EndpointLabels { endpoint })
            .observe(elapsed.as_secs_f64());
    }

    pub fn count_eviction(&self, outcome: &EvictionOutcome) {
        self.evictions
            .get_or_create(&OutcomeLabels {
                outcome: EvictionKind::of(outcome),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_the_snake_case_names_dashboards_know() {
        let mut registry = Registry::default();
        let metrics = FleetLockMetrics::register(&mut registry);
        metrics.count_lock_change(LockChange::ReclaimedNodeGone);
        metrics.count_node_change(NodeChange::Uncordoned);
        metrics.count_eviction(&EvictionOutcome::BlockedByDisruptionBudget("pdb".into()));
        metrics.observe_request(
            Endpoint::SteadyState,
            RequestOutcome::Failed(ErrorKind::NodeNotReady),
            std::time::Duration::from_millis(3),
        );
        let text = crate::metrics::encode(&registry).unwrap();
        for line in [
            r#"dkron_ha_fleetlock_lock_changes_total{change="reclaimed_node_gone"} 1"#,
            r#"dkron_ha_fleetlock_node_changes_total{change="uncordoned"} 1"#,
            r#"dkron_ha_fleetlock_evictions_total{outcome="blocked_by_pdb"} 1"#,
            r#"dkron_ha_fleetlock_requests_total{endpoint="steady_state",outcome="node_not_ready"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}
