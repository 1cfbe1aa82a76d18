//! Prometheus metrics of `serve`. Label values are enums: operations the API server defines and
//! the fixed verdicts of [`crate::admission::Verdict`].

use crate::admission::Verdict;
use kube::core::admission::Operation;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::time::Duration;

/// Implements `EncodeLabelValue` for label enums by writing their `as_str()`.
macro_rules! label_value_as_str {
    ($($label:ty),+) => {$(
        impl prometheus_client::encoding::EncodeLabelValue for $label {
            fn encode(
                &self,
                encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
            ) -> Result<(), std::fmt::Error> {
                std::fmt::Write::write_str(encoder, self.as_str())
            }
        }
    )+};
}
pub(crate) use label_value_as_str;

/// A metric label with a fixed set of values: the enum, its `as_str()` and its encoding.
macro_rules! label_enum {
    ($(#[$doc:meta])* pub enum $name:ident {
        $($(#[$variant_doc:meta])* $variant:ident => $text:literal),+ $(,)?
    }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
        pub enum $name {
            $($(#[$variant_doc])* $variant),+
        }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        $crate::metrics::label_value_as_str!($name);
    };
}
pub(crate) use label_enum;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    pub operation: ReviewOperation,
    pub result: ReviewResult,
}

label_enum! {
    /// The operation of a review, as the API server names it.
    pub enum ReviewOperation {
        Create => "CREATE",
        Update => "UPDATE",
        Delete => "DELETE",
        Connect => "CONNECT",
        /// A malformed review: its operation was never read.
        Unknown => "unknown",
    }
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

label_enum! {
    /// How a review was answered.
    pub enum ReviewResult {
        Patched => "patched",
        Unchanged => "unchanged",
        Denied => "denied",
        /// HTTP 400: the body was no AdmissionReview.
        Malformed => "malformed",
    }
}

impl From<Verdict> for ReviewResult {
    fn from(verdict: Verdict) -> Self {
        match verdict {
            Verdict::Patched => Self::Patched,
            Verdict::Unchanged => Self::Unchanged,
            Verdict::Denied => Self::Denied,
        }
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
