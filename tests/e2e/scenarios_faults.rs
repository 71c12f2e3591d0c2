//! The controller under API faults (issue 22): kube-sim drops, throttles and fails the
//! controller's requests and cuts its watches and log streams (`--faults`; `agent=` spares kubectl
//! and the scenario's own client), while builds run at once on isolated pod networks. One mix runs
//! without faults, then a fresh one with them: every ImageBuild must end as it truly did, no
//! attempt may run two pods nor two attempts run at once, and the controller's API calls per build
//! may grow by half at most.

use std::time::{Duration, Instant};

use super::apiserver::Target;
use super::mix::{self, Phase};
use super::scenario::{Options, Scenario};
use super::scenarios::BUILD;

crate::scenarios!(faults_seed_1, faults_seed_2, faults_seed_3);

/// Faults for every client but kubectl and the scenario's own (User-Agent `bob-e2e`): the
/// controller's, whatever its User-Agent (none today; `bob-controller/<version>` and
/// `bob-controller-lease/<version>` once it has its retrying client).
pub const CONTROLLER_ONLY: &str = "agent=^(?!kubectl|bob-e2e)";

/// The fault spec of `seed` at `rate`, with the stream cuts.
pub fn spec(rate: f64, seed: u64) -> String {
    format!("rate={rate},stream-cut=0.05,seed={seed},{CONTROLLER_ONLY}")
}

/// Each phase: one cache hit, one image source, two Dockerfiles, one failing `RUN`, all at once.
const MIX: [usize; 4] = [1, 1, 2, 1];

/// How long a phase may take before its unfinished builds count as failures (a hang guard: a
/// phase takes seconds here).
const PHASE: Duration = Duration::from_secs(150);

/// How much the controller's API calls per build may grow under faults (issue 22).
const GROWTH: f64 = 1.5;

async fn faults_seed_1(t: Target) -> Scenario {
    under_faults(t, "faults_seed_1", &spec(0.1, 1)).await
}

async fn faults_seed_2(t: Target) -> Scenario {
    under_faults(t, "faults_seed_2", &spec(0.1, 2)).await
}

async fn faults_seed_3(t: Target) -> Scenario {
    under_faults(t, "faults_seed_3", &spec(0.3, 3)).await
}

/// The scenario: the mix without faults, then with `faults` switched on; prints the figures and
/// asserts the outcomes, the pods and the calls per build.
pub async fn under_faults(t: Target, name: &str, faults: &str) -> Scenario {
    let clock = Instant::now();
    let mut s = Scenario::start(&t, name, Options { isolated: true, ..Default::default() }).await;
    let seeded = seed(&s).await;
    let (calm_builds, calm) = fresh_phase(&mut s, "calm", MIX, usize::MAX, None).await;
    let calm_problems = mix::problems(&s, &calm_builds, &calm, &seeded).await;
    assert!(calm_problems.is_empty(), "{name}: without faults already: {calm_problems:#?}");

    let (faulty_builds, faulty) = fresh_phase(&mut s, "faulty", MIX, usize::MAX, Some(faults)).await;
    // Counted while they are on (turning them off answers the counts once, then forgets them).
    let injected = s.api().faults(None).await;
    s.api().faults(Some("")).await;
    report(name, faults, &calm, &faulty, &injected, clock.elapsed());

    let problems = mix::problems(&s, &faulty_builds, &faulty, &seeded).await;
    assert!(problems.is_empty(), "{name}: under faults ({faults}): {problems:#?}");
    assert!(injected.values().sum::<u64>() > 0, "{name}: kube-sim injected no fault: {injected:?}");
    let (before, after) = (calm.calls_per_build(), faulty.calls_per_build());
    assert!(
        after <= GROWTH * before,
        "{name}: {after:.1} API calls per build under faults, more than {GROWTH}× the {before:.1} without"
    );
    s
}

/// Builds the image that every phase's cache hits find; returns the build's status.
pub async fn seed(s: &Scenario) -> serde_json::Value {
    s.create(&[("seed", mix::hit_spec(s))]).await;
    let seeded = s.finished("seed", BUILD).await;
    assert_eq!(
        (seeded["phase"].as_str(), seeded["reason"].as_str()),
        (Some("Succeeded"), Some("Built")),
        "the seed: {seeded:#}"
    );
    seeded
}

/// One phase from a clean start: the ImageBuilds so far deleted (their images stay in the
/// registry), `faults` switched on (or none), then a new controller — so that its watches, not
/// only its requests, open under the phase's faults, and neither phase pays for the other's
/// builds — and `counts` builds of each kind, created `wave` at once. Its API calls count from
/// its start.
pub async fn fresh_phase(
    s: &mut Scenario,
    tag: &str,
    counts: [usize; 4],
    wave: usize,
    faults: Option<&str>,
) -> (Vec<mix::Build>, Phase) {
    for c in &mut s.controllers {
        c.daemon.stop(Duration::from_secs(10));
    }
    s.kubectl.ok(&["delete", "imagebuilds", "--all", "-n", &s.ns], None).await;
    let before = s.api().faults(Some(faults.unwrap_or(""))).await;
    assert!(faults.is_none() || before.values().all(|n| *n == 0), "faults before {tag}: {before:?}");
    let since = Instant::now();
    // A replica that exits at its start is started again, as its pod's container would be
    // (back-off aside); each such exit is printed, and five in a row fail the scenario.
    for tries in 1.. {
        match s.try_start_controller() {
            Ok(_) => break,
            Err(e) if tries < 5 => println!("{tag}: the controller exited at its start: {}", last_line(&e)),
            Err(e) => panic!("{tag}: the controller exited at its start {tries} times: {e}"),
        }
    }
    let builds = mix::builds(s, tag, counts);
    let timeout = PHASE * builds.len().div_ceil(wave) as u32;
    let phase = mix::run(s, &builds, wave, timeout, since).await;
    (builds, phase)
}

fn last_line(text: &str) -> &str {
    text.trim_end().lines().last().unwrap_or_default()
}

/// Prints what the phases cost and which faults were injected.
fn report(
    name: &str,
    faults: &str,
    calm: &Phase,
    faulty: &Phase,
    injected: &std::collections::BTreeMap<String, u64>,
    took: Duration,
) {
    let line = |p: &Phase| {
        format!(
            "{} builds in {:.1} s, {} controller API calls ({:.1} per build), outcomes {:?}",
            p.statuses.len(),
            p.took.as_secs_f64(),
            p.calls,
            p.calls_per_build(),
            mix::outcomes(p)
        )
    };
    let kinds: Vec<String> = injected.iter().map(|(k, n)| format!("{k} {n}")).collect();
    println!(
        "{name}: {faults}\n  without faults: {}\n  with faults:    {}\n  calls per build ×{:.2} \
         (at most ×{GROWTH}); faults injected: {}; scenario {:.1} s",
        line(calm),
        line(faulty),
        faulty.calls_per_build() / calm.calls_per_build().max(f64::MIN_POSITIVE),
        kinds.join(", "),
        took.as_secs_f64()
    );
}
