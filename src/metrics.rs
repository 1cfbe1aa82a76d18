//! Prometheus metrics of `serve`. Label values are enums: operations the API server defines and
//! the fixed verdicts of [`crate::admission::Verdict`].

use crate::admission::Verdict;
use kube::core::admission::Operation;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    pub operation: ReviewOperation,
    pub result: ReviewResult,
}

/// The operation of a review, as the API server names it; `unknown` for a malformed review.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ReviewOperation {
    Create,
    Update,
    Delete,
    Connect,
    Unknown,
}

impl From<&Operation> for ReviewOperation {
    fn from(operation: &Operation) -> Self {
        match operation {
            Operation::Create => Self::Create,
            Operation::Update => Self::Update,
            Operation::Delete => Self::Delete,
            Operation::Connect => Self::Connect,
        }
    }
}

impl EncodeLabelValue for ReviewOperation {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        let label = match self {
            Self::Create => "CREATE",
            Self::Update => "UPDATE",
            Self::Delete => "DELETE",
            Self::Connect => "CONNECT",
            Self::Unknown => "unknown",
        };
        EncodeLabelValue::encode(&label, encoder)
    }
}

/// How a review was answered.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ReviewResult {
    Answered(Verdict),
    /// HTTP 400: the body was no AdmissionReview.
    Malformed,
}

impl EncodeLabelValue for ReviewResult {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        let label = match self {
            Self::Answered(verdict) => verdict.as_label(),
            Self::Malformed => "malformed",
        };
        EncodeLabelValue::encode(&label, encoder)
    }
}

/// Admission webhook metrics.
#[derive(Clone)]
pub struct AdmissionMetrics {
    requests: Family<AdmissionLabels, Counter>,
    duration: Histogram,
}

impl AdmissionMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let requests = Family::<AdmissionLabels, Counter>::default();
        // 25 µs .. ~0.8 s: injection takes microseconds, so the low buckets matter.
        let duration = Histogram::new(exponential_buckets(0.000_025, 2.0, 16));
        registry.register(
            "dkron_ha_admission_requests",
            "Admission reviews answered, by operation and result (patched, unchanged, denied, malformed)",
            requests.clone(),
        );
        registry.register(
            "dkron_ha_admission_duration_seconds",
            "Time to answer one admission review, body read to response built",
            duration.clone(),
        );
        Self { requests, duration }
    }

    pub fn observe(&self, operation: ReviewOperation, result: ReviewResult, elapsed: Duration) {
        self.requests
            .get_or_create(&AdmissionLabels { operation, result })
            .inc();
        self.duration.observe(elapsed.as_secs_f64());
    }
}

/// Text exposition of a registry.
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}
