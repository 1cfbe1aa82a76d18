//! Shared test support. Every test binary includes it with `mod support;` and uses only part of
//! it, so unused items are expected here.
#![allow(dead_code, unused_imports)]

pub mod bench;
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

/// Stops a server task a test started: sends `stop`, waits at most 10 s, and fails the test if
/// the task panicked (its panic goes on), was cancelled, or did not end.
pub async fn stop_task(
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    what: &str,
) {
    if let Some(stop) = stop {
        // The task may have ended already and dropped its receiver: the join below says how.
        let _ = stop.send(());
    }
    match tokio::time::timeout(Duration::from_secs(10), task).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Ok(Err(error)) => panic!("{what}: {error}"),
        Err(_) => panic!("{what} did not stop within 10 s of being asked to"),
    }
}

/// Metadata with just a name.
pub fn named(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        ..ObjectMeta::default()
    }
}
