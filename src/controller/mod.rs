//! The controller's planning: pure functions from an ImageBuild (and what was resolved) to the
//! build inputs, key, refs and desired pod. `bob run` uses the same code without a cluster.

pub mod plan;
pub mod pod;

pub use plan::{BuildSecurity, Invalid, Plan, PlanConfig, Resolved, from_images, plan};
