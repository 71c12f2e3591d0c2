//! bob: a Kubernetes-native builder of workspace images.
//!
//! The library holds every subsystem; `main.rs` only parses the command line and dispatches.
#![forbid(unsafe_code)]

pub mod bounded;
pub mod build;
pub mod cli;
pub mod cloud;
pub mod controller;
pub mod copy;
pub mod crd;
pub mod duration;
pub mod key;
pub mod kubeclient;
pub mod layer_cache;
pub mod local;
pub mod logs;
pub mod oci;
pub mod process;
pub mod proxy;
pub mod reason;
pub mod telemetry;
