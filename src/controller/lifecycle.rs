//! The ends of a build: a failure retried on a new pod or made final, a terminal status with its
//! metric and Event, cancel (the build's last output kept), and the cleanup of a finished pod
//! once no owner needs it. Events and cleanup are best effort: they never fail a reconcile.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams, LogParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};

use super::metrics::{OutcomeLabels, ReasonLabel};
use super::policy::{AfterFailure, owner_done};
use super::reconcile::patch_status;
use super::{Context, Error, status};
use crate::crd::{BuildFailure, ImageBuild, ImageBuildStatus, Phase};

/// Publishes an Event on the ImageBuild (logged, never fatal).
pub async fn event(ctx: &Context, ib: &ImageBuild, warning: bool, reason: &str, note: &str) {
    let ev = Event {
        type_: if warning { EventType::Warning } else { EventType::Normal },
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &ib.object_ref(&())).await {
        tracing::debug!(error = %e, "cannot publish an event");
    }
}

/// Writes a terminal status, counts it, announces it, and cleans up its pod.
pub async fn finish(ib: &ImageBuild, ctx: &Context, s: ImageBuildStatus) -> Result<Action, Error> {
    let phase = s.phase.unwrap_or_default();
    let reason = s.reason.map(|r| r.to_string()).unwrap_or_default();
    let message = s.message.clone().unwrap_or_default();
    tracing::info!(imagebuild = %ib.name_any(), ?phase, %reason, "{message}");
    patch_status(ib, ctx, &s).await?;
    let labels = OutcomeLabels { outcome: format!("{phase:?}"), reason: reason.clone() };
    ctx.metrics.builds.get_or_create(&labels).inc();
    if let Some(start) = &s.start_time {
        let took = Timestamp::now().duration_since(start.0).as_secs_f64().max(0.0);
        ctx.metrics.build_duration.observe(took);
    }
    event(ctx, ib, phase != Phase::Succeeded, &reason, &message).await;
    if let Some(pod) = &s.pod_name {
        cleanup(ib, ctx, pod).await;
    }
    Ok(Action::await_change())
}

/// A build pod failed: a new attempt after a backoff for infrastructure failures, else final.
pub async fn failed(
    ib: &ImageBuild,
    ctx: &Context,
    mut s: ImageBuildStatus,
    f: BuildFailure,
) -> Result<Action, Error> {
    let attempts = s.attempts.unwrap_or(1).max(1) as u32;
    match ctx.policy.after_failure(f.reason, attempts) {
        AfterFailure::Fail => finish(ib, ctx, status::failed(s, f)).await,
        AfterFailure::Retry { attempt, after } => {
            ctx.metrics.retries.get_or_create(&ReasonLabel { reason: f.reason.to_string() }).inc();
            let message = format!(
                "attempt {attempts} failed ({}: {}); attempt {attempt} of {} in {}s",
                f.reason,
                f.message,
                ctx.policy.max_attempts,
                after.as_secs()
            );
            let old_pod = s.pod_name.take();
            let at = Timestamp::now() + SignedDuration::try_from(after).unwrap_or(SignedDuration::ZERO);
            s.next_attempt_at = Some(Time(at));
            let reason = f.reason;
            s.failure = Some(f);
            patch_status(ib, ctx, &status::in_progress(s, Phase::Pending, Some(reason), &message)).await?;
            event(ctx, ib, true, "Retrying", &message).await;
            if let Some(pod) = old_pod {
                cleanup(ib, ctx, &pod).await;
            }
            Ok(Action::requeue(after))
        }
    }
}

/// `spec.cancel`: keep what the build printed, end Cancelled, and stop the pod unless another
/// ImageBuild still needs it.
pub async fn cancel(ib: &ImageBuild, ctx: &Context, mut s: ImageBuildStatus) -> Result<Action, Error> {
    let mut tail = None;
    if let Some(pod) = &s.pod_name {
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ib.namespace().unwrap_or_default());
        let params =
            LogParams { container: Some("build".into()), tail_lines: Some(40), ..Default::default() };
        tail = pods.logs(pod, &params).await.ok().filter(|t| !t.is_empty());
    }
    s.observed_generation = ib.metadata.generation;
    finish(ib, ctx, status::cancelled(s, tail)).await
}

/// Deletes a finished pod once every owner has its evidence or follows another pod; keeps it
/// while any owner still follows it (a shared build others wait for).
pub async fn cleanup(ib: &ImageBuild, ctx: &Context, pod: &str) {
    if ctx.policy.keep_finished_pods {
        return;
    }
    let ns = ib.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let builds: Api<ImageBuild> = Api::namespaced(ctx.client.clone(), &ns);
    let Ok(Some(found)) = pods.get_opt(pod).await else { return };
    let me = ib.uid().unwrap_or_default();
    for owner in found.owner_references().iter().filter(|o| o.kind == "ImageBuild" && o.uid != me) {
        match builds.get_opt(&owner.name).await {
            Ok(Some(other)) if other.uid().as_deref() == Some(owner.uid.as_str()) => {
                if !owner_done(other.status.as_ref(), other.metadata.generation, pod) {
                    tracing::debug!(pod, owner = %owner.name, "build pod still needed by another ImageBuild");
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(pod, error = %e, "cannot check an owner; keeping the pod");
                return;
            }
        }
    }
    let grace = DeleteParams { grace_period_seconds: Some(10), ..Default::default() };
    match pods.delete(pod, &grace).await {
        Ok(_) => tracing::info!(pod, "deleted the finished build pod"),
        Err(e) => tracing::debug!(pod, error = %e, "cannot delete the build pod"),
    }
}
