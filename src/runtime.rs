//! The in-pod runtime of each Dkron server pod (ARCHITECTURE.md "In-pod runtime"): `wrap` starts Dkron
//! with the right cluster flags and supervises it; `label-updater` mirrors Dkron's leadership
//! into the pod label `dkron-ha/leader`. (`install` lives in `crate::install`.)

pub mod label_updater;
pub mod membership;
pub mod peers;
pub mod wrap;
