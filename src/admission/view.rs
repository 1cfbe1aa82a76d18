//! The parts of a StatefulSet the injection engine reads and its patch compares, as typed
//! values, without the rest. `inject` and reviews off the hot path (see `lean`) use it.
//!
//! A review carries the whole object (`managedFields`, `status`, the selector, the
//! volume-claim templates, ...), and parsing all of it into typed values was the largest single
//! cost of answering. The engine reads only the name and annotations, four fields of the spec
//! and the pod template, and the patch only touches fields under those, so the skipped parts
//! are scanned, never built. The API server has decoded and defaulted the object before it
//! calls a webhook, and validates it again after the mutation; fields we skip are its concern.
//!
//! `tests/inject_engine.rs` checks as a property that the patch computed from this view,
//! applied to the whole object, equals the engine's output for the whole typed object, and
//! `tests/inject_golden.rs` pins what `inject` writes.

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

/// A StatefulSet with its pod template read as `T`: a typed `PodTemplateSpec` here, borrowed
/// parts on the hot path (`lean`).
#[derive(Deserialize)]
#[serde(bound(deserialize = "T: Deserialize<'de> + Default"))]
pub(super) struct StatefulSetView<T = PodTemplateSpec> {
    #[serde(default)]
    pub(super) metadata: MetadataView,
    #[serde(default)]
    pub(super) spec: Option<SpecView<T>>,
}

#[derive(Deserialize, Default)]
pub(super) struct MetadataView {
    #[serde(default)]
    pub(super) name: Option<String>,
    #[serde(default, deserialize_with = "our_annotations")]
    pub(super) annotations: Option<BTreeMap<String, String>>,
}

/// A JSON string, borrowed from the input unless it carries escapes. (serde borrows a
/// `Cow<str>` only as a field of its own, never inside an `Option`, a `Vec` or a map key.)
#[derive(Deserialize)]
pub(super) struct Text<'a>(#[serde(borrow)] pub(super) Cow<'a, str>);

impl AsRef<str> for Text<'_> {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Annotations, keeping only dkron-ha's own (`dkron-ha/...`), the only ones the engine reads.
/// Others are skipped unread: they can be large, and kubectl's last-applied-configuration
/// carries the whole object as one escaped string. `null` reads as absent.
pub(super) fn our_annotations<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    struct Ours;

    impl<'de> Visitor<'de> for Ours {
        type Value = Option<BTreeMap<String, String>>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map of annotations")
        }

        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut ours = BTreeMap::new();
            while let Some(Text(key)) = map.next_key()? {
                if key.starts_with(crate::inject::ANNOTATION_PREFIX) {
                    ours.insert(key.into_owned(), map.next_value()?);
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(Some(ours))
        }
    }

    deserializer.deserialize_option(Ours)
}

#[derive(Deserialize)]
#[serde(
    rename_all = "camelCase",
    bound(deserialize = "T: Deserialize<'de> + Default")
)]
pub(super) struct SpecView<T> {
    #[serde(default)]
    pub(super) replicas: Option<i32>,
    #[serde(default)]
    pub(super) service_name: Option<String>,
    #[serde(default)]
    pub(super) pod_management_policy: Option<String>,
    #[serde(default)]
    pub(super) template: T,
}

impl From<StatefulSetView> for StatefulSet {
    fn from(view: StatefulSetView) -> Self {
        StatefulSet {
            metadata: ObjectMeta {
                name: view.metadata.name,
                annotations: view.metadata.annotations,
                ..Default::default()
            },
            spec: view.spec.map(|spec| StatefulSetSpec {
                replicas: spec.replicas,
                service_name: spec.service_name,
                pod_management_policy: spec.pod_management_policy,
                template: spec.template,
                ..Default::default()
            }),
            status: None,
        }
    }
}
