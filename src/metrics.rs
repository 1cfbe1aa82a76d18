//! Prometheus metrics of `serve`. Labels are bounded: operations the API server defines and
//! the fixed verdicts of [`crate::admission::Verdict`].

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

label_enum! {
    /// The review's operation, as the API server names it.
    pub enum Operation {
        Create => "CREATE",
        Update => "UPDATE",
        Delete => "DELETE",
        Connect => "CONNECT",
        /// A review without an operation (malformed).
        Unknown => "unknown",
        Other => "other",
    }
}

impl Operation {
    pub fn of(operation: &str) -> Self {
        match operation {
            "CREATE" => Operation::Create,
            "UPDATE" => Operation::Update,
            "DELETE" => Operation::Delete,
            "CONNECT" => Operation::Connect,
            "" => Operation::Unknown,
            _ => Operation::Other,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    pub operation: Operation,
    /// One of the fixed verdicts of [`crate::admission::Verdict`], or `malformed`.
    pub result: &'static str,
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

    pub fn observe(&self, operation: &str, result: &'static str, elapsed: Duration) {
        let operation = Operation::of(operation);
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
