//! Ignored trials for the fault scenarios, never run in CI: `faults_seed` runs the fault scenario
//! with the seed and rate of `BOB_FAULT_SEED` and `BOB_FAULT_RATE` (`scripts/faults SEEDS...`
//! runs it once per seed), and `benchmark_faults` (docs/benchmarks.md) runs 100 builds without
//! faults and then under `rate=0.2,stream-cut=0.05`, side by side: outcomes, the controller's API
//! calls per build, wall time.
//!
//! `cargo test --features test-hooks --test e2e -- --ignored --exact benchmark_faults --nocapture`

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use super::apiserver::Target;
use super::mix::{self, Phase};
use super::scenario::{Options, Scenario};
use super::scenarios_faults::{CONTROLLER_ONLY, fresh_phase, seed, spec, under_faults};

/// The benchmark's faults (issue 22), all but kubectl's and the harness's requests.
const BENCH_FAULTS: &str = "rate=0.2,stream-cut=0.05";

/// 100 builds, mostly cheap: 40 cache hits (no pod), 20 image sources (a copy), 25 Dockerfiles,
/// 15 failing `RUN`s; created 20 at a time.
const BENCH_MIX: [usize; 4] = [40, 20, 25, 15];
const WAVE: usize = 20;

/// The fault scenario with `BOB_FAULT_SEED` (required) at `BOB_FAULT_RATE` (default 0.1).
pub fn seed_trial(t: Target) -> Pin<Box<dyn Future<Output = Scenario> + Send>> {
    Box::pin(async move {
        let seed: u64 = std::env::var("BOB_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .expect("BOB_FAULT_SEED=<a number> (scripts/faults SEEDS...)");
        let rate: f64 =
            std::env::var("BOB_FAULT_RATE").ok().map_or(0.1, |r| r.parse().expect("BOB_FAULT_RATE=<0..1>"));
        under_faults(t, &format!("faults_seed_{seed}_rate_{rate}"), &spec(rate, seed)).await
    })
}

/// The benchmark.
pub fn benchmark(t: Target) -> Pin<Box<dyn Future<Output = Scenario> + Send>> {
    Box::pin(bench(t))
}

async fn bench(t: Target) -> Scenario {
    let clock = Instant::now();
    let faults = format!("{BENCH_FAULTS},{CONTROLLER_ONLY}");
    let mut s =
        Scenario::start(&t, "benchmark_faults", Options { isolated: true, ..Default::default() }).await;
    let seeded = seed(&s).await;
    let (calm_builds, calm) = fresh_phase(&mut s, "calm", BENCH_MIX, WAVE, None).await;
    let (faulty_builds, faulty) = fresh_phase(&mut s, "faulty", BENCH_MIX, WAVE, Some(&faults)).await;
    let injected = s.api().faults(None).await;
    s.api().faults(Some("")).await;

    // The same build of each phase has the same name but for its tag.
    let outcome = |p: &Phase, tag: &str| -> BTreeMap<String, String> {
        p.statuses
            .iter()
            .map(|(n, st)| {
                let o = format!(
                    "{}/{}",
                    st["phase"].as_str().unwrap_or("-"),
                    st["reason"].as_str().unwrap_or("-")
                );
                (n.strip_prefix(tag).unwrap_or(n).to_string(), o)
            })
            .collect()
    };
    let (a, b) = (outcome(&calm, "calm"), outcome(&faulty, "faulty"));
    let differ: Vec<String> = a
        .iter()
        .filter(|(n, o)| b.get(*n) != Some(*o))
        .map(|(n, o)| format!("{n}: {o} → {:?}", b.get(n)))
        .collect();
    let calm_problems = mix::problems(&s, &calm_builds, &calm, &seeded).await;
    let faulty_problems = mix::problems(&s, &faulty_builds, &faulty, &seeded).await;

    let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
    let kinds: Vec<String> = injected.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let outcomes =
        |p: &Phase| mix::outcomes(p).iter().map(|(o, n)| format!("{n} {o}")).collect::<Vec<_>>().join(", ");
    println!(
        "\nbenchmark_faults: {} builds per phase, {WAVE} at a time, bob {profile} build",
        calm_builds.len()
    );
    println!("| | without faults | `{BENCH_FAULTS}` |\n|---|---|---|");
    println!("| outcomes | {} | {} |", outcomes(&calm), outcomes(&faulty));
    println!("| outcome as without faults | – | {}/{} |", a.len() - differ.len(), a.len());
    println!(
        "| true outcome (mix::problems) | {} problems | {} problems |",
        calm_problems.len(),
        faulty_problems.len()
    );
    println!(
        "| controller API calls per build | {:.1} | **{:.1}** (×{:.2}) |",
        calm.calls_per_build(),
        faulty.calls_per_build(),
        faulty.calls_per_build() / calm.calls_per_build()
    );
    println!("| wall time | {:.1} s | {:.1} s |", calm.took.as_secs_f64(), faulty.took.as_secs_f64());
    println!("| faults injected | – | {} |", kinds.join(", "));
    println!("(whole run {:.0} s)", clock.elapsed().as_secs_f64());
    assert!(differ.is_empty(), "outcomes that differ under faults: {differ:#?}");
    assert!(
        calm_problems.is_empty() && faulty_problems.is_empty(),
        "{calm_problems:#?}\n{faulty_problems:#?}"
    );
    s
}
