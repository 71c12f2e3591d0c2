//! One engine for the controller and `bob run`: ask `decide` what it needs to see, let the world
//! (the cluster, or the local machine) look, and ask again, until it returns a transition. The
//! worlds differ only in how they look and how they act; every decision is `decide`'s.
//!
//! Observing only reads. The one write before the transition is the build pod's create
//! (`Step::Attempt`), at most once per reconcile, because its answer (created, exists, refused)
//! decides the status; every other write is the transition's (`act.rs`).

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;

use super::decide::{Need, Observed, Settings, Step, Transition, decide};
use super::plan::plan;
use crate::crd::ImageBuild;

/// More steps than `decide` can ask for: each need fills its own fact.
const MAX_STEPS: usize = 16;

/// Where a reconcile looks.
pub trait World {
    /// Looks at what `need` names and records it in `seen` (or records the API failure that
    /// prevented it in `seen.api_error`).
    fn observe(
        &mut self,
        ib: &ImageBuild,
        need: Need,
        seen: &mut Observed,
    ) -> impl Future<Output = ()> + Send;

    /// Creates the build pod and records the answer in `seen.created` (or, when there was no
    /// answer, the failure in `seen.api_error`: the next reconcile looks for the pod first).
    fn attempt(&mut self, ib: &ImageBuild, pod: Pod, seen: &mut Observed) -> impl Future<Output = ()> + Send;
}

/// Why the engine stopped without a transition.
#[derive(Debug, thiserror::Error)]
#[error("the decision asked for {need:?} again after it was observed")]
pub struct Stuck {
    /// What it asked for.
    pub need: String,
}

/// Observes what `decide` asks for until it decides.
pub async fn run<W: World + Send>(
    ib: &ImageBuild,
    cfg: &Settings,
    world: &mut W,
    now: Timestamp,
) -> Result<Transition, Stuck> {
    let mut seen = Observed::at(now);
    let mut last = None;
    let mut attempted = false;
    for _ in 0..MAX_STEPS {
        match decide(ib, &seen, cfg) {
            Step::Act(t) => return Ok(t),
            Step::Plan => {
                let Some(Ok(resolved)) = &seen.resolved else {
                    return Err(Stuck { need: "a plan before the inputs are resolved".into() });
                };
                if seen.plan.is_some() {
                    return Err(Stuck { need: "a second plan".into() });
                }
                seen.plan = Some(plan(ib, resolved, &cfg.plan).map(Box::new));
            }
            Step::Attempt(pod) => {
                if std::mem::replace(&mut attempted, true) {
                    return Err(Stuck { need: "a second pod create in one reconcile".into() });
                }
                world.attempt(ib, *pod, &mut seen).await;
                last = None;
            }
            Step::Observe(need) => {
                let kind = std::mem::discriminant(&need);
                if last == Some(kind) {
                    return Err(Stuck { need: format!("{need:?}").chars().take(80).collect() });
                }
                world.observe(ib, need, &mut seen).await;
                last = Some(kind);
            }
        }
    }
    Err(Stuck { need: "more steps than decide can take".into() })
}
