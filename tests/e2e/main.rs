//! The end-to-end suite: the real `bob controller` binary, installed from the Helm chart rendered
//! by Helm's own engine, real `kubectl`, a real `docker-registry` and buildah, against an API
//! server — a kube-sim per scenario (beside the checkout at `../shared/tools/kube-sim`, with a
//! fake kubelet that runs the build pods' containers as local processes, Pod Security admission
//! and ResourceQuota), or the cluster that `KUBECONFIG` names when `BOB_E2E_REGISTRY` and
//! `BOB_E2E_IMAGE` say which registry and image it uses (README "End-to-end tests").
//!
//! Without an API server it prints one line saying why and reports the scenarios ignored;
//! `BOB_E2E=required` (set by `.ci/run`) makes that a failure, `BOB_E2E=off` skips on purpose.
//! Each scenario runs alone with `cargo test --test e2e <name>`; the benchmark is an ignored
//! trial: `cargo test --release --test e2e -- --ignored benchmark`; so are the fault benchmark
//! and the fault scenario with other seeds (`scripts/faults`).

#[path = "../common/mod.rs"]
mod common;

mod apiserver;
mod bench;
mod bench_faults;
mod builds;
mod counter;
mod daemon;
mod install;
mod kubectl;
mod kubelet;
mod mix;
mod rbac;
mod scenario;
mod scenarios;
mod scenarios_cloud;
mod scenarios_faults;
mod scenarios_lease;
mod scenarios_logs;
mod scenarios_ops;

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;

use apiserver::Target;
use libtest_mimic::{Arguments, Trial};

/// A scenario: an async function of the target.
pub type Run = fn(Target) -> Pin<Box<dyn Future<Output = scenario::Scenario> + Send>>;

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let target = Target::detect();
    let mut runs: Vec<(&str, Run, bool)> = scenarios::ALL.iter().map(|(n, r)| (*n, *r, false)).collect();
    runs.extend(scenarios_ops::ALL.iter().map(|(n, r)| (*n, *r, false)));
    runs.extend(scenarios_logs::ALL.iter().map(|(n, r)| (*n, *r, false)));
    runs.extend(scenarios_cloud::ALL.iter().map(|(n, r)| (*n, *r, false)));
    runs.extend(scenarios_faults::ALL.iter().map(|(n, r)| (*n, *r, false)));
    runs.extend(scenarios_lease::ALL.iter().map(|(n, r)| (*n, *r, false)));
    runs.push(("benchmark", bench::run, true));
    runs.push(("benchmark_faults", bench_faults::benchmark, true));
    runs.push(("faults_seed", bench_faults::seed_trial, true));
    let trials: Vec<Trial> = match &target {
        Ok(t) => {
            eprintln!("e2e: API server: {}", t.describe());
            // A missing renderer is a missing component: every scenario fails, saying what to run.
            let renderer = install::renderer_ready();
            // The ECR scenario serves its ECR host from this machine's loopback: a cluster's pods
            // cannot reach it, so there it is reported ignored, and said so here. The fault
            // scenarios need kube-sim's fault switch and its kubelet's record of the pods it ran.
            let sim_only = |name: &str| {
                scenarios_cloud::ALL
                    .iter()
                    .chain(scenarios_faults::ALL)
                    .chain(scenarios_lease::ALL)
                    .any(|(n, _)| *n == name)
                    || ["benchmark_faults", "faults_seed"].contains(&name)
            };
            if !t.is_kube_sim() {
                eprintln!(
                    "e2e: the ECR scenarios run on kube-sim only (their registry is this machine's loopback), \
                     and so do the fault scenarios (kube-sim injects the faults)"
                );
            }
            runs.into_iter()
                .map(|(name, run, ignored)| {
                    let ignored = ignored || (sim_only(name) && !t.is_kube_sim());
                    let t = t.clone();
                    let renderer = renderer.clone();
                    Trial::test(name, move || {
                        renderer?;
                        common::init();
                        let rt = tokio::runtime::Builder::new_multi_thread()
                            .worker_threads(2)
                            .enable_all()
                            .build()
                            .unwrap();
                        // A failed scenario must not hang the suite: dropping a runtime while
                        // unwinding waits for its blocking tasks without a bound.
                        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            rt.block_on(async { run(t).await.finish().await })
                        }));
                        rt.shutdown_timeout(std::time::Duration::from_secs(5));
                        if let Err(panic) = outcome {
                            std::panic::resume_unwind(panic);
                        }
                        Ok(())
                    })
                    .with_ignored_flag(ignored)
                })
                .collect()
        }
        Err(why) if std::env::var("BOB_E2E").as_deref() == Ok("required") => {
            eprintln!("e2e: BOB_E2E=required but {why}");
            return ExitCode::FAILURE;
        }
        Err(why) => {
            eprintln!("e2e: skipped: {why}");
            let why = why.clone();
            runs.into_iter()
                .map(|(name, _, _)| {
                    let why = why.clone();
                    Trial::test(name, move || Err(format!("skipped: {why}").into())).with_ignored_flag(true)
                })
                .collect()
        }
    };
    let mut trials = trials;
    trials.push(Trial::test("rbac_request_mapping", || {
        rbac::mapping_self_check();
        Ok(())
    }));
    libtest_mimic::run(&args, trials).exit_code()
}
