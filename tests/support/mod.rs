//! Shared test support. Every test binary includes it with `mod support;` and uses only part of
//! it, so unused items are expected here.
#![allow(dead_code)]

pub mod control_plane;

pub use control_plane::ControlPlane;
