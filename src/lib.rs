//! dkron-ha: makes a Dkron server StatefulSet highly available on Kubernetes.
//!
//! One module per role of ARCHITECTURE.md: `inject` (the pure injection engine), `admission`
//! (AdmissionReview in, patch out), `names` (the contract names every side shares), `manifests`
//! (`dkron-ha inject` on YAML streams), `tls` (rustls with certificate hot-reload), `certs`
//! (rcgen CA + serving certificate), `serve` (the listeners of `dkron-ha serve`), `metrics`,
//! `telemetry`, `runtime` (`wrap`, `label-updater`), `install`, `dkron` (its API client),
//! `controller`, `fleetlock` (the Zincati FleetLock server).
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod admission;
pub mod certs;
pub mod controller;
pub mod dkron;
pub mod fleetlock;
pub mod inject;
pub mod install;
pub mod manifests;
pub mod metrics;
pub mod names;
pub mod runtime;
pub mod serve;
pub mod telemetry;
pub mod tls;

/// The version stamped into injected pod templates (`dkron-ha/injected`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit this binary was built from (`unknown` outside a git checkout).
pub const GIT_COMMIT: &str = env!("DKRON_HA_GIT_COMMIT");
