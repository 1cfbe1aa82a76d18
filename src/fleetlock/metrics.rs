//! FleetLock metrics. Every label has a fixed, small set of values: endpoints, error kinds,
//! eviction outcomes and lock changes. Groups, Nodes and pods never become labels.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// `pre_reboot`, `steady_state` or `status`.
    pub endpoint: &'static str,
    /// `ok` or the error kind.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ChangeLabels {
    pub change: &'static str,
}

type HistogramFamily = Family<EndpointLabels, Histogram, fn() -> Histogram>;

#[derive(Clone)]
pub struct FleetLockMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: HistogramFamily,
    pub evictions: Family<OutcomeLabels, Counter>,
    /// `acquired`, `released`, `reclaimed_node_gone`, `reclaimed_expired`.
    pub lock_changes: Family<ChangeLabels, Counter>,
    /// `cordoned`, `uncordoned`.
    pub node_changes: Family<ChangeLabels, Counter>,
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

    pub fn count_lock_change(&self, change: &'static str) {
        self.lock_changes
            .get_or_create(&ChangeLabels { change })
            .inc();
    }

    pub fn count_node_change(&self, change: &'static str) {
        self.node_changes
            .get_or_create(&ChangeLabels { change })
            .inc();
    }
}
