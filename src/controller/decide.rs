//! The one decision of a reconcile, pure: from the ImageBuild and what has been observed so far
//! (Secrets, resolved inputs, registry answers, the queue, the pod, the clock) either the next
//! thing to look at, or the transition — the new status and the effects. The controller and
//! `bob run` drive it the same way (`engine.rs`): observe what it asks for, ask again, then act.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::policy::{AfterFailure, queue_limit, wait_backoff};
use super::status::{self, PodState, observe};
pub use super::step::*;
use crate::build::BuildResult;
use crate::crd::{BuildFailure, ImageBuild, ImageBuildStatus, ImageRef, LogRef, Phase};
use crate::reason::Reason;

/// Decides what to look at next, or what to do.
pub fn decide(ib: &ImageBuild, seen: &Observed, cfg: &Settings) -> Step {
    match decide_step(ib, seen, cfg) {
        // The API answered this time: an `ApiReachable=False` of an earlier look goes, even when
        // nothing else changes.
        Step::Act(mut t) if seen.api_error.is_none() && t.status.is_none() => {
            let old = ib.status.as_ref();
            if old.is_some_and(|s| s.conditions.iter().any(|c| c.type_ == status::API_REACHABLE)) {
                let mut s = old.cloned().unwrap_or_default();
                s.conditions.retain(|c| c.type_ != status::API_REACHABLE);
                t.status = Some(s);
            }
            Step::Act(t)
        }
        step => step,
    }
}

fn decide_step(ib: &ImageBuild, seen: &Observed, cfg: &Settings) -> Step {
    let old = ib.status.clone().unwrap_or_default();
    let generation = ib.metadata.generation;
    let current = old.observed_generation == generation;
    if current && old.phase.is_some_and(Phase::is_terminal) {
        // Terminal phases never change for the same generation.
        return Step::Act(Transition { status: None, effects: Vec::new(), next: Next::Change });
    }
    if let Some(f) = &seen.api_error {
        // Unknown is not absent: nothing observed this time is taken for a fact.
        return Step::Act(unreachable(ib, old, f, seen.now, cfg));
    }
    if ib.spec.cancel {
        let tail = match (&old.pod_name, &seen.log_tail) {
            (Some(pod), None) => return Step::Observe(Need::LogTail(pod.clone())),
            (_, tail) => tail.clone().flatten(),
        };
        let mut s = old;
        s.observed_generation = generation;
        return Step::Act(finish(status::cancelled(s, "cancelled (spec.cancel)", tail, seen.now)));
    }
    if current && old.pod_name.is_some() && matches!(old.phase, Some(Phase::Building | Phase::Verifying)) {
        return follow(old, seen, cfg);
    }
    let attempt = if current { old.attempts.unwrap_or(0).max(0) as u32 + 1 } else { 1 };
    if current && let Some(at) = &old.next_attempt_at {
        let left = at.0.duration_since(seen.now);
        if left.is_positive() {
            // A retry waits out its backoff first.
            return Step::Act(Transition {
                status: None,
                effects: Vec::new(),
                next: Next::After(left.unsigned_abs()),
            });
        }
    }
    start(ib, old, attempt, seen, cfg)
}

/// Attempt `attempt` of the generation: credentials, resolve, plan, cache, slot, pod.
fn start(ib: &ImageBuild, old: ImageBuildStatus, attempt: u32, seen: &Observed, cfg: &Settings) -> Step {
    let now = seen.now;
    let same_generation = old.observed_generation == ib.metadata.generation;
    let mut s = ImageBuildStatus {
        observed_generation: ib.metadata.generation,
        // The clock of a generation starts once, at its first look.
        start_time: Some(old.start_time.clone().filter(|_| same_generation).unwrap_or(Time(now))),
        conditions: old.conditions.clone(),
        attempts: (attempt > 1).then_some(attempt as i32 - 1),
        failure: old.failure.clone().filter(|_| attempt > 1),
        // Earlier attempts' logs of this generation stay listed.
        log_refs: if same_generation { old.log_refs.clone() } else { Vec::new() },
        ..Default::default()
    };
    if let Err(refused) = cfg.plan.placement.check(ib, cfg.plan.security) {
        // Before any Secret or registry is read: a build the installation forbids costs nothing.
        return Step::Act(finish(status::failed_with(s, Reason::PolicyDenied, refused.to_string(), now)));
    }
    let access = match &seen.credentials {
        None => return Step::Observe(Need::Credentials),
        Some(Err(f)) => return Step::Act(wait(ib, &old, s, f.clone(), now, cfg)),
        Some(Ok(access)) => *access,
    };
    let resolved = match &seen.resolved {
        None => return Step::Observe(Need::Resolve),
        Some(Err(f)) if waits(f.reason) => return Step::Act(wait(ib, &old, s, f.clone(), now, cfg)),
        Some(Err(f)) => return Step::Act(finish(status::failed_with(s, f.reason, &f.message, now))),
        Some(Ok(r)) => r,
    };
    let access = if seen.minted { Access::Minted } else { access };
    let planned = match &seen.plan {
        None => return Step::Plan,
        Some(Ok(p)) => p,
        Some(Err(e)) => return Step::Act(finish(status::failed_with(s, e.reason(), e.to_string(), now))),
    };
    s.cache_key = planned.key.clone();
    s.base_image = Some(ImageRef::new(&planned.base_ref, resolved.image_digest.clone()));
    s.output = Some(ImageRef::new(&planned.workspace_ref, None));
    let secret = ib.spec.registry_auth.as_ref().map(|a| a.secret_ref.name.as_str());
    let pod_name = super::pod::pod_name(secret, &planned.workspace_ref, attempt);
    // This attempt's pod may exist before the status says so: a create whose answer was lost, or a
    // status write after it. It is followed, not built again, and never taken for a cache hit.
    let existing = match &seen.pod {
        None => return Step::Observe(Need::Pod(pod_name)),
        Some(found) => found.as_ref(),
    };
    if let Some(pod) = existing.filter(|p| owned_by(p, ib)) {
        s.cache_hit = Some(false);
        return started(ib, s, attempt, pod, access, seen);
    }
    if !ib.spec.force_rebuild {
        match &seen.cache {
            None => return Step::Observe(Need::Cache(planned.workspace.clone())),
            Some(Ok(Some(digest))) => {
                s.cache_hit = Some(true);
                s.output = Some(ImageRef::new(&planned.workspace_ref, Some(digest.clone())));
                let message = "the workspace image exists; nothing was built";
                return Step::Act(finish(status::succeeded(s, Reason::CacheHit, message, now)));
            }
            Some(Ok(None)) => {}
            Some(Err(f)) => {
                let f =
                    Failure::new(f.reason, format!("cannot check {}: {}", planned.workspace_ref, f.message));
                return Step::Act(wait(ib, &old, s, f, now, cfg));
            }
        }
    }
    s.cache_hit = Some(false);
    if let Some(pod) = existing {
        // Another ImageBuild of the same key runs it: join it (no slot needed).
        return started(ib, s, attempt, pod, access, seen);
    }
    if cfg.max_concurrent_builds.is_some() {
        match &seen.slots {
            None => return Step::Observe(Need::Slots),
            Some(Slots { position: Some(place), running, max }) => {
                let message = format!("queued at position {place}: {running} of {max} builds running");
                return Step::Act(queued(ib, &old, s, &message, now, cfg));
            }
            Some(_) => {}
        }
    }
    match &seen.created {
        None => {
            let mut pod = planned.pod.clone();
            pod.metadata.name = Some(pod_name);
            if access == Access::Minted {
                super::pod::use_minted_credential(&mut pod);
            }
            Step::Attempt(Box::new(pod))
        }
        Some(Created::New(pod) | Created::Exists(pod)) => started(ib, s, attempt, pod, access, seen),
        Some(Created::Refused { code, message }) => {
            let f = refusal(*code, &pod_name, message);
            if waits(f.reason) {
                return Step::Act(wait(ib, &old, s, f, now, cfg));
            }
            Step::Act(finish(status::failed_with(s, f.reason, f.message, now)))
        }
    }
}

/// How the ImageBuild came to its attempt's pod.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Start {
    /// This reconcile created it.
    Created,
    /// Another ImageBuild of the same key created it; this one becomes an owner too.
    Joined,
    /// This ImageBuild owns it already (an answer or a status write was lost, or a restart).
    Found,
}

/// The attempt's pod exists (created now, or found): `Building` on it — unless admission gave it
/// a cloud identity, which ends the build and deletes the pod.
fn started(
    ib: &ImageBuild,
    mut s: ImageBuildStatus,
    attempt: u32,
    pod: &Pod,
    access: Access,
    seen: &Observed,
) -> Step {
    let now = seen.now;
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let how = match (&seen.created, owned_by(pod, ib)) {
        (Some(Created::New(_)), _) => Start::Created,
        (_, true) => Start::Found,
        _ => Start::Joined,
    };
    // The pod as admission left it: a webhook that gave a container a cloud identity (IRSA,
    // Pod Identity, AWS keys) despite the skip annotation makes it unsafe to run.
    let leaks = crate::cloud::guard::identity_leaks(pod);
    if !leaks.is_empty() {
        let message = format!(
            "build pod {pod_name} was given a cloud identity at admission ({}) and was deleted: \
             build pods must have none; use a ServiceAccount without an IAM role \
             (eks.amazonaws.com/role-arn, a Pod Identity association) in spec.pod.serviceAccountName",
            leaks.join("; ")
        );
        let mut t = finish(status::failed_with(s, Reason::PodRejected, message, now));
        t.effects.insert(0, Effect::DeletePod { pod: pod_name, uid });
        return Step::Act(t);
    }
    let message = match how {
        Start::Created => format!("build pod {pod_name} started"),
        Start::Joined => {
            format!("joined build pod {pod_name}, started by another ImageBuild with the same key")
        }
        Start::Found => format!("build pod {pod_name} found (its start was not recorded)"),
    };
    let mut effects = Vec::new();
    if how == Start::Joined {
        effects.push(Effect::Own(pod_name.clone()));
    }
    if access == Access::Minted {
        effects.push(Effect::Credential { pod: pod_name.clone(), uid: uid.clone() });
    }
    s.log_refs.retain(|r| r.attempt != attempt as i32);
    s.log_refs.push(LogRef { attempt: attempt as i32, build_log: pod_name.clone() });
    effects.push(Effect::Event { warning: false, reason: "Building".into(), note: message.clone() });
    effects.push(Effect::ShipLog { pod: pod_name.clone(), attempt });
    s.pod_name = Some(pod_name);
    // The pod by its UID too: the credential refresher feeds only the pod recorded here.
    s.pod_uid = pod.metadata.uid.clone();
    s.attempts = Some(attempt as i32);
    if how != Start::Found {
        let waited = s.start_time.as_ref().map_or(0.0, |t| now.duration_since(t.0).as_secs_f64().max(0.0));
        effects.push(Effect::Count(Count::PodStarted { created: how == Start::Created, waited }));
    }
    let status = status::in_progress(s, Phase::Building, None, &message, now);
    Step::Act(Transition { status: Some(status), effects, next: Next::After(POLL) })
}

/// Whether `ib` is among the owners of `pod`.
fn owned_by(pod: &Pod, ib: &ImageBuild) -> bool {
    let uid = ib.metadata.uid.as_deref().unwrap_or_default();
    pod.metadata.owner_references.iter().flatten().any(|o| o.uid == uid)
}

/// An API call failed: phase, reason and attempt stay as they are (a new ImageBuild becomes
/// `Pending`), and the condition `ApiReachable=False` says why until the API answers again.
fn unreachable(
    ib: &ImageBuild,
    old: ImageBuildStatus,
    f: &Failure,
    now: Timestamp,
    cfg: &Settings,
) -> Transition {
    if old.pod_name.is_none() {
        // A build that has not started is on the queue clock all the same: an API call that
        // never succeeds (RBAC forbids it) ends in QueueTimeout, not a wait without end.
        let mut s = old.clone();
        s.observed_generation = ib.metadata.generation;
        if let Err(done) = queue_clock(ib, &s, &f.message, now, cfg) {
            return *done;
        }
    }
    let known = old.conditions.iter().find(|c| c.type_ == status::API_REACHABLE).cloned();
    let since = known.as_ref().map_or(now, |c| c.last_transition_time.0);
    let mut s = old;
    let fresh = s.phase.is_none();
    if fresh {
        s.observed_generation = ib.metadata.generation;
        s.start_time = Some(Time(now));
        s = status::in_progress(s, Phase::Pending, Some(Reason::ApiUnavailable), &f.message, now);
    }
    s.conditions.retain(|c| c.type_ != status::API_REACHABLE);
    s.conditions.push(status::api_unreachable(&f.message, since));
    let effects = match known {
        None => vec![Effect::Event {
            warning: true,
            reason: Reason::ApiUnavailable.to_string(),
            note: f.message.clone(),
        }],
        Some(_) => Vec::new(),
    };
    let next = wait_backoff(now.duration_since(since).unsigned_abs());
    Transition { status: (known.is_none() || fresh).then_some(s), effects, next: Next::After(next) }
}

/// A build runs: read its pod; a reported success is verified in the registry.
fn follow(old: ImageBuildStatus, seen: &Observed, cfg: &Settings) -> Step {
    let now = seen.now;
    let pod_name = old.pod_name.clone().unwrap_or_default();
    let pod = match &seen.pod {
        None => return Step::Observe(Need::Pod(pod_name)),
        Some(None) => {
            let message = format!("build pod {pod_name} disappeared before the build finished");
            return after_failure(old, BuildFailure::new(Reason::PodDeleted, message), now, cfg);
        }
        Some(Some(pod)) => pod,
    };
    // A running build's log is shipped (again, after a controller restart) while it runs.
    let ship = Effect::ShipLog { pod: pod_name.clone(), attempt: old.attempts.unwrap_or(1).max(1) as u32 };
    // A status written by a bob that did not record the pod's UID gets the UID of the pod it
    // names now, so the refresher keeps feeding the builds that run across an upgrade.
    let backfill = old.pod_uid.is_none() && pod.metadata.uid.is_some();
    let progress = |reason: Option<Reason>, message: String, phase: Phase| {
        let mut status = status::in_progress(old.clone(), phase, reason, &message, now);
        if backfill {
            status.pod_uid = pod.metadata.uid.clone();
        }
        let changed = old.reason != reason
            || old.message.as_deref() != Some(message.as_str())
            || old.phase != Some(phase)
            || backfill;
        Step::Act(Transition {
            status: changed.then_some(status),
            effects: vec![ship.clone()],
            next: Next::After(POLL),
        })
    };
    match observe(pod) {
        PodState::Waiting(report) => {
            let (reason, message) =
                report.map_or((None, format!("build pod {pod_name} is starting")), |(r, m)| (Some(r), m));
            progress(reason, message, Phase::Building)
        }
        PodState::Running => progress(None, format!("build pod {pod_name} is running"), Phase::Building),
        PodState::Failed(f) => after_failure(old, f, now, cfg),
        PodState::Finished(result) => verify(old, &result, seen),
    }
}

/// A build reported success: the workspace image must be in the registry with its digest.
fn verify(mut s: ImageBuildStatus, result: &BuildResult, seen: &Observed) -> Step {
    let now = seen.now;
    let output = s.output.clone().unwrap_or_default();
    let Ok(workspace) = crate::oci::reference::parse(&output.reference) else {
        let message = format!("status.output.ref {:?} is not an image reference", output.reference);
        return Step::Act(finish(status::failed_with(s, Reason::Internal, message, now)));
    };
    let found = match &seen.verified {
        None => return Step::Observe(Need::Verify(workspace)),
        Some(found) => found,
    };
    if let Some(base) = s.base_image.as_mut() {
        *base = ImageRef::new(base.reference.clone(), result.base_digest.clone());
    }
    s.layer_cache = result.layer_cache.clone();
    match found {
        Ok(Some(d)) if Some(d) == result.target_digest.as_ref() => {
            s.output = Some(ImageRef::new(output.reference, Some(d.clone())));
            let message = "built and verified in the registry";
            let mut t = finish(status::succeeded(s, Reason::Built, message, now));
            if let Some(c) = &result.layer_cache {
                t.effects.push(Effect::Count(Count::LayerCache { mode: c.mode, hits: c.hits }));
            }
            Step::Act(t)
        }
        Ok(other) => {
            let found = other.as_ref().map_or("nothing".to_string(), |d| format!("digest {d}"));
            let want = result.target_digest.clone().unwrap_or_default();
            let message = format!(
                "image build did not produce a workspace image: the build reported {want}, the registry has {found} at {}",
                output.reference
            );
            Step::Act(finish(status::failed_with(s, Reason::VerifyFailed, message, now)))
        }
        Err(f) => {
            let message = format!("cannot verify {}: {}", output.reference, f.message);
            let changed = s.message.as_deref() != Some(message.as_str()) || s.phase != Some(Phase::Verifying);
            let status = status::in_progress(s, Phase::Verifying, Some(f.reason), &message, now);
            Step::Act(Transition {
                status: changed.then_some(status),
                effects: Vec::new(),
                next: Next::After(VERIFY_RETRY),
            })
        }
    }
}

/// An attempt failed: a new attempt after a backoff for infrastructure failures, else final.
fn after_failure(mut s: ImageBuildStatus, f: BuildFailure, now: Timestamp, cfg: &Settings) -> Step {
    let attempts = s.attempts.unwrap_or(1).max(1) as u32;
    match cfg.policy.after_failure(f.reason, attempts) {
        AfterFailure::Fail => Step::Act(finish(status::failed(s, f, now))),
        AfterFailure::Retry { attempt, after } => {
            let message = format!(
                "attempt {attempts} failed ({}: {}); attempt {attempt} of {} in {}s",
                f.reason,
                f.message,
                cfg.policy.max_attempts,
                after.as_secs()
            );
            let old_pod = s.pod_name.take();
            s.pod_uid = None;
            let at = now + SignedDuration::try_from(after).unwrap_or(SignedDuration::ZERO);
            s.next_attempt_at = Some(Time(at));
            let reason = f.reason;
            s.failure = Some(f);
            let mut effects = vec![
                Effect::Count(Count::Retry(reason)),
                Effect::Event { warning: true, reason: "Retrying".into(), note: message.clone() },
            ];
            effects.extend(old_pod.map(Effect::Cleanup));
            let status = status::in_progress(s, Phase::Pending, Some(reason), &message, now);
            Step::Act(Transition { status: Some(status), effects, next: Next::After(after) })
        }
    }
}

/// A terminal status, counted and announced, its pod cleaned up.
fn finish(s: ImageBuildStatus) -> Transition {
    let phase = s.phase.unwrap_or_default();
    let reason = s.reason.unwrap_or(Reason::Internal);
    let message = s.message.clone().unwrap_or_default();
    let seconds = match (&s.start_time, &s.completion_time) {
        (Some(a), Some(b)) => Some(b.0.duration_since(a.0).as_secs_f64().max(0.0)),
        _ => None,
    };
    let mut effects = vec![
        Effect::Count(Count::Finished { phase, reason, seconds }),
        Effect::Event { warning: phase != Phase::Succeeded, reason: reason.to_string(), note: message },
    ];
    effects.extend(s.pod_name.clone().map(Effect::Cleanup));
    Transition { status: Some(s), effects, next: Next::Change }
}

/// Whether a failure of this reason waits (for the infrastructure, or for a Secret to be fixed)
/// rather than ending the generation.
fn waits(reason: Reason) -> bool {
    matches!(
        reason,
        Reason::RegistryUnavailable
            | Reason::RegistryDenied
            | Reason::RegistryNotMapped
            | Reason::AccessDenied
            | Reason::RepositoryNotFound
            | Reason::NetworkPolicyMissing
            | Reason::SecretNotFound
            | Reason::SecretInvalid
            | Reason::QuotaExceeded
            | Reason::ApiUnavailable
    )
}

/// Not startable yet: `Pending` with the reason, looked at again with a growing backoff, until
/// the queue time limit ends it.
fn wait(
    ib: &ImageBuild,
    old: &ImageBuildStatus,
    s: ImageBuildStatus,
    f: Failure,
    now: Timestamp,
    cfg: &Settings,
) -> Transition {
    let (waited, limit) = match queue_clock(ib, &s, &f.message, now, cfg) {
        Ok(clock) => clock,
        Err(done) => return *done,
    };
    let changed = old.phase != Some(Phase::Pending)
        || old.reason != Some(f.reason)
        || old.message.as_deref() != Some(f.message.as_str())
        || old.observed_generation != s.observed_generation;
    let status = status::in_progress(s, Phase::Pending, Some(f.reason), &f.message, now);
    let effects = if changed {
        vec![Effect::Event { warning: true, reason: f.reason.to_string(), note: f.message }]
    } else {
        Vec::new()
    };
    let next = wait_backoff(waited).min(limit.saturating_sub(waited) + Duration::from_secs(1));
    Transition { status: changed.then_some(status), effects, next: Next::After(next) }
}

/// Waiting for a build slot, until the queue time limit.
fn queued(
    ib: &ImageBuild,
    old: &ImageBuildStatus,
    s: ImageBuildStatus,
    message: &str,
    now: Timestamp,
    cfg: &Settings,
) -> Transition {
    if let Err(done) = queue_clock(ib, &s, message, now, cfg) {
        return *done;
    }
    let changed = old.phase != Some(Phase::Queued) || old.message.as_deref() != Some(message);
    let status = status::in_progress(s, Phase::Queued, None, message, now);
    Transition {
        status: changed.then_some(status),
        effects: Vec::new(),
        next: Next::After(Duration::from_secs(10)),
    }
}

/// The queue clock: how long the ImageBuild has waited and may wait, or its end — `QueueTimeout`
/// naming what it `waited_for`, or `InvalidSpec` for a limit that does not parse.
fn queue_clock(
    ib: &ImageBuild,
    s: &ImageBuildStatus,
    waited_for: &str,
    now: Timestamp,
    cfg: &Settings,
) -> Result<(Duration, Duration), Box<Transition>> {
    let limit = queue_limit(ib, cfg.queue_timeout).map_err(|invalid| {
        Box::new(finish(status::failed_with(s.clone(), invalid.reason(), invalid.to_string(), now)))
    })?;
    let waited = waited(ib, now);
    if waited > limit {
        let message = format!("still waiting after {} (spec.timeouts.queue): {waited_for}", human(limit));
        return Err(Box::new(finish(status::failed_with(s.clone(), Reason::QueueTimeout, message, now))));
    }
    Ok((waited, limit))
}

/// How long the ImageBuild has existed (the queue clock).
fn waited(ib: &ImageBuild, now: Timestamp) -> Duration {
    let created = ib.metadata.creation_timestamp.as_ref().map(|t| t.0).unwrap_or(now);
    now.duration_since(created).unsigned_abs()
}

fn human(d: Duration) -> String {
    format!("{}s", d.as_secs())
}

/// What a refused pod create means: the admission that refused it decides whether waiting helps.
pub fn refusal(code: u16, pod: &str, message: &str) -> Failure {
    let text = message.to_ascii_lowercase();
    if text.contains("exceeded quota") || text.contains("forbidden: failed quota") {
        return Failure::new(Reason::QuotaExceeded, format!("build pod {pod} waits for quota: {message}"));
    }
    let permanent = code == 422
        || code == 400
        || text.contains("violates podsecurity")
        || text.contains("denied the request");
    if permanent {
        return Failure::new(
            Reason::PodRejected,
            format!("the API server refused build pod {pod}: {message}"),
        );
    }
    Failure::new(Reason::ApiUnavailable, format!("cannot create build pod {pod} ({code}): {message}"))
}
