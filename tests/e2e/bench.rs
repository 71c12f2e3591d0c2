//! The benchmark (docs/benchmarks.md): placeholder until written.
use super::apiserver::Target;
use super::scenario::{Options, Scenario};

/// Runs the benchmark.
pub fn run(t: Target) -> std::pin::Pin<Box<dyn std::future::Future<Output = Scenario> + Send>> {
    Box::pin(async move { Scenario::start(&t, "benchmark", Options::default()).await })
}
