//! Shared test support. Every test binary includes it with `mod support;` and uses only part of
//! it, so unused items are expected here.
#![allow(dead_code, unused_imports)]

pub mod cluster;
pub mod control_plane;
pub mod dkron;
pub mod images;

pub use control_plane::ControlPlane;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::time::Duration;

/// Polls `check` until it returns `Some`, panicking after a minute.
pub async fn eventually<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Metadata with just a name.
pub fn named(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        ..ObjectMeta::default()
    }
}
