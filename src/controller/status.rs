//! What a build pod says (pure): still waiting (and why, e.g. unschedulable), running, finished
//! with `bob build`'s result, or failed — with the reason, the failing container and its last
//! lines, read from termination messages and container states before anything deletes the pod.

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use super::pod::{CONTAINER_BUILD, CONTAINER_CLONE, CONTAINER_PROXY};
use crate::build::BuildResult;
use crate::crd::{BuildFailure, ImageBuildStatus, Phase};
use crate::reason::Reason;

/// What the pod says about the build.
#[derive(Clone, Debug, PartialEq)]
pub enum PodState {
    /// Not running yet; `Some` when there is something to report early (unschedulable).
    Waiting(Option<(Reason, String)>),
    /// The build runs.
    Running,
    /// `bob build` finished and reported success (still to be verified in the registry).
    Finished(Box<BuildResult>),
    /// The build failed.
    Failed(BuildFailure),
}

fn failure(
    reason: Reason,
    message: impl Into<String>,
    container: Option<&str>,
    log_tail: Option<String>,
) -> PodState {
    PodState::Failed(BuildFailure {
        reason,
        message: message.into(),
        container: container.map(String::from),
        log_tail: log_tail.filter(|t| !t.trim().is_empty()),
    })
}

/// Waiting reasons that mean the bob image itself cannot be pulled or started.
const PULL_FAILURES: &[&str] = &["ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"];

/// Reads a build pod.
pub fn observe(pod: &Pod) -> PodState {
    let Some(status) = &pod.status else { return PodState::Waiting(None) };
    let phase = status.phase.as_deref().unwrap_or("Pending");
    let pod_reason = status.reason.as_deref().unwrap_or("");
    let pod_message = status.message.clone().unwrap_or_default();
    match pod_reason {
        "Evicted" => {
            return failure(
                Reason::PodEvicted,
                format!("the build pod was evicted: {pod_message}"),
                None,
                None,
            );
        }
        "DeadlineExceeded" => {
            return failure(
                Reason::BuildTimeout,
                "the build ran longer than its time limit (spec.timeouts.build) and was stopped",
                Some(CONTAINER_BUILD),
                None,
            );
        }
        _ => {}
    }
    let inits = status.init_container_statuses.iter().flatten();
    let mains = status.container_statuses.iter().flatten();
    for c in inits.clone().chain(mains.clone()) {
        if let Some(w) = c.state.as_ref().and_then(|s| s.waiting.as_ref()) {
            let reason = w.reason.as_deref().unwrap_or("");
            let message = w.message.clone().unwrap_or_default();
            if PULL_FAILURES.contains(&reason) {
                let what =
                    format!("the bob image of container {} cannot be pulled ({reason}): {message}", c.name);
                return failure(Reason::BuilderImagePullFailed, what, Some(&c.name), None);
            }
            if reason == "CreateContainerConfigError" {
                return failure(
                    Reason::SecretNotFound,
                    format!("container {}: {message}", c.name),
                    Some(&c.name),
                    None,
                );
            }
            if reason == "CrashLoopBackOff" && c.name == CONTAINER_PROXY {
                return failure(
                    Reason::ProxyUnavailable,
                    "the registry proxy keeps crashing",
                    Some(CONTAINER_PROXY),
                    last_message(c),
                );
            }
        }
    }
    for c in inits {
        if c.name == CONTAINER_PROXY {
            continue;
        }
        if let Some(t) = c.state.as_ref().and_then(|s| s.terminated.as_ref())
            && t.exit_code != 0
        {
            let reason =
                if c.name == CONTAINER_CLONE { Reason::SourceFetchFailed } else { Reason::PodFailed };
            let message = format!("container {} failed with exit code {}", c.name, t.exit_code);
            return failure(reason, message, Some(&c.name), t.message.clone());
        }
    }
    if let Some(build) = mains.clone().find(|c| c.name == CONTAINER_BUILD)
        && let Some(t) = build.state.as_ref().and_then(|s| s.terminated.as_ref())
    {
        let result: Option<BuildResult> =
            t.message.as_deref().and_then(|m| serde_json::from_str(m.trim()).ok());
        if t.reason.as_deref() == Some("OOMKilled") {
            let tail = result.and_then(|r| r.log_tail);
            return failure(
                Reason::OutOfMemory,
                "the build container was killed for memory (OOMKilled)",
                Some(CONTAINER_BUILD),
                tail,
            );
        }
        return match result {
            Some(r) if r.reason.is_none() && t.exit_code == 0 => PodState::Finished(Box::new(r)),
            // bob build reports `Cancelled` when a signal stopped it: kubelet stopping the pod
            // (a user's `spec.cancel` ends the ImageBuild before the pod is read), so the pod's
            // fate is the reason, and it is worth a new pod.
            Some(r) if r.reason == Some(Reason::Cancelled) => {
                let reason = if pod.metadata.deletion_timestamp.is_some() {
                    Reason::PodDeleted
                } else {
                    Reason::PodFailed
                };
                let message = r.message.unwrap_or_else(|| "bob build was stopped".into());
                failure(
                    reason,
                    format!("the build container was stopped: {message}"),
                    Some(CONTAINER_BUILD),
                    r.log_tail,
                )
            }
            Some(r) => failure(
                r.reason.unwrap_or(Reason::PodFailed),
                r.message.clone().unwrap_or_else(|| format!("bob build exited with code {}", t.exit_code)),
                Some(CONTAINER_BUILD),
                r.log_tail,
            ),
            None => failure(
                Reason::PodFailed,
                format!("bob build exited with code {} without a result", t.exit_code),
                Some(CONTAINER_BUILD),
                t.message.clone(),
            ),
        };
    }
    if pod.metadata.deletion_timestamp.is_some() {
        return failure(
            Reason::PodDeleted,
            "the build pod was deleted before the build finished",
            None,
            None,
        );
    }
    if phase == "Failed" {
        return failure(
            Reason::PodFailed,
            format!("the build pod failed: {pod_reason} {pod_message}").trim_end().to_string(),
            None,
            None,
        );
    }
    let unschedulable = status.conditions.iter().flatten().find(|c| {
        c.type_ == "PodScheduled" && c.status == "False" && c.reason.as_deref() == Some("Unschedulable")
    });
    if let Some(c) = unschedulable {
        let message = format!("the build pod cannot be scheduled: {}", c.message.clone().unwrap_or_default());
        return PodState::Waiting(Some((Reason::Unschedulable, message)));
    }
    if phase == "Running" { PodState::Running } else { PodState::Waiting(None) }
}

/// The message of a container's last termination (a crashing sidecar's last log lines).
fn last_message(c: &ContainerStatus) -> Option<String> {
    c.last_state.as_ref()?.terminated.as_ref()?.message.clone()
}

/// Whether the pod is over: `Succeeded` or `Failed`, its containers will not run again.
pub fn is_over(pod: &Pod) -> bool {
    matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
}

/// The condition that says the Kubernetes API did not answer a reconcile's calls (`False`, reason
/// `ApiUnavailable`); it goes at the next reconcile that sees everything it asked for.
pub const API_REACHABLE: &str = "ApiReachable";

/// `ApiReachable=False` with the error, unreachable since `since`.
pub fn api_unreachable(message: &str, since: Timestamp) -> Condition {
    Condition {
        type_: API_REACHABLE.into(),
        status: "False".into(),
        reason: crate::reason::Reason::ApiUnavailable.as_str().into(),
        message: message.into(),
        last_transition_time: Time(since),
        observed_generation: None,
    }
}

/// The `Ready` condition, keeping the previous transition time when its status does not change.
pub fn ready(
    previous: &[Condition],
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let since = previous
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: "Ready".into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: since,
        observed_generation: generation,
    }
}

/// `s` as Succeeded with `reason`.
pub fn succeeded(mut s: ImageBuildStatus, reason: Reason, message: &str, now: Timestamp) -> ImageBuildStatus {
    s.phase = Some(Phase::Succeeded);
    s.reason = Some(reason);
    s.message = Some(message.into());
    s.conditions = vec![ready(&s.conditions, true, reason.as_str(), message, s.observed_generation, now)];
    s.failure = None;
    s.next_attempt_at = None;
    s.completion_time = Some(Time(now));
    s
}

/// `s` as Failed with `failure`.
pub fn failed(mut s: ImageBuildStatus, failure: BuildFailure, now: Timestamp) -> ImageBuildStatus {
    s.phase = Some(Phase::Failed);
    s.reason = Some(failure.reason);
    s.message = Some(failure.message.clone());
    s.conditions = vec![ready(
        &s.conditions,
        false,
        failure.reason.as_str(),
        &failure.message,
        s.observed_generation,
        now,
    )];
    s.failure = Some(failure);
    s.next_attempt_at = None;
    s.completion_time = Some(Time(now));
    s
}

/// `s` as Failed for `reason` with only a message.
pub fn failed_with(
    s: ImageBuildStatus,
    reason: Reason,
    message: impl Into<String>,
    now: Timestamp,
) -> ImageBuildStatus {
    failed(s, BuildFailure::new(reason, message), now)
}

/// `s` as not ready yet in `phase` (Pending, Building, Verifying), with an optional reason.
pub fn in_progress(
    mut s: ImageBuildStatus,
    phase: Phase,
    reason: Option<Reason>,
    message: &str,
    now: Timestamp,
) -> ImageBuildStatus {
    s.phase = Some(phase);
    s.reason = reason;
    s.message = Some(message.into());
    let why = reason.map(Reason::as_str).unwrap_or(match phase {
        Phase::Building => "Building",
        Phase::Verifying => "Verifying",
        Phase::Queued => "Queued",
        _ => "Pending",
    });
    s.conditions = vec![ready(&s.conditions, false, why, message, s.observed_generation, now)];
    s
}

/// `s` as Cancelled with `message` (who stopped it), with what the build had printed.
pub fn cancelled(
    mut s: ImageBuildStatus,
    message: &str,
    log_tail: Option<String>,
    now: Timestamp,
) -> ImageBuildStatus {
    s.phase = Some(Phase::Cancelled);
    s.reason = Some(Reason::Cancelled);
    s.message = Some(message.into());
    s.conditions =
        vec![ready(&s.conditions, false, Reason::Cancelled.as_str(), message, s.observed_generation, now)];
    let container = s.pod_name.as_ref().map(|_| CONTAINER_BUILD.to_string());
    s.failure =
        Some(BuildFailure { reason: Reason::Cancelled, message: message.into(), container, log_tail });
    s.next_attempt_at = None;
    s.completion_time = Some(Time(now));
    s
}
