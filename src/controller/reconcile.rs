//! One reconcile as named steps: for a new generation, resolve (Secrets, commit, digests) →
//! plan (pure) → cache check (a hit costs no pod) → create the pod (a pod that another
//! ImageBuild with the same key already runs is joined, not duplicated) → status (server-side
//! apply). While
//! a build runs, the pod is observed (pure, `status.rs`) and a success is verified in the registry.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::lifecycle::{self, finish};
use super::resolve::{self, GitAuth};
use super::status::{self, PodState, observe};
use super::{Context, Error, FIELD_MANAGER, plan};
use crate::crd::{ImageBuild, ImageBuildStatus, ImageRef, Phase};
use crate::oci::Reference;
use crate::oci::client::Client;
use crate::reason::Reason;

/// How long a running build waits between looks when no pod event comes.
const POLL: Duration = Duration::from_secs(60);
/// Retry delay of transient problems (registry down, Secret missing).
const RETRY: Duration = Duration::from_secs(15);

/// Reconciles one ImageBuild.
pub async fn reconcile(ib: Arc<ImageBuild>, ctx: Arc<Context>) -> Result<Action, Error> {
    let status = ib.status.clone().unwrap_or_default();
    let current = status.observed_generation == ib.metadata.generation;
    if current && status.phase.is_some_and(Phase::is_terminal) {
        // Terminal phases never change for the same generation.
        return Ok(Action::await_change());
    }
    if ib.spec.cancel {
        return lifecycle::cancel(&ib, &ctx, status).await;
    }
    if current
        && status.pod_name.is_some()
        && matches!(status.phase, Some(Phase::Building | Phase::Verifying))
    {
        return follow(&ib, &ctx, status).await;
    }
    // A retry of this generation waits out its backoff first.
    let attempt = if current { status.attempts.unwrap_or(0).max(0) as u32 + 1 } else { 1 };
    if current && let Some(at) = &status.next_attempt_at {
        let wait = at.0.duration_since(Timestamp::now());
        if wait.is_positive() {
            return Ok(Action::requeue(wait.unsigned_abs()));
        }
    }
    start(&ib, &ctx, attempt).await
}

/// Plans and starts attempt `attempt` of the generation: everything from the spec, nothing from
/// an older status but its conditions, attempt count and start time.
async fn start(ib: &ImageBuild, ctx: &Context, attempt: u32) -> Result<Action, Error> {
    let previous = ib.status.clone().unwrap_or_default();
    let fresh = ImageBuildStatus {
        observed_generation: ib.metadata.generation,
        start_time: Some(
            previous.start_time.filter(|_| attempt > 1).unwrap_or_else(|| Time(Timestamp::now())),
        ),
        conditions: previous.conditions,
        attempts: (attempt > 1).then_some(attempt as i32 - 1),
        failure: previous.failure.filter(|_| attempt > 1),
        ..Default::default()
    };
    let (client, git_auth) = match credentials(ib, ctx).await? {
        Ok(found) => found,
        Err(missing) => return waiting(ib, ctx, fresh, Reason::SecretNotFound, &missing).await,
    };
    let scratch = tempfile::Builder::new().prefix("bob-resolve-").tempdir().map_err(Error::Scratch)?;
    let resolved = match resolve::resolve(ib, &client, git_auth.as_ref(), scratch.path()).await {
        Ok(r) => r,
        Err(e) if e.reason == Reason::RegistryUnavailable => {
            return waiting(ib, ctx, fresh, e.reason, &e.message).await;
        }
        Err(e) => return finish(ib, ctx, status::failed_with(fresh, e.reason, e.message)).await,
    };
    let planned = match plan(ib, &resolved, &ctx.plan) {
        Ok(p) => p,
        Err(e) => return finish(ib, ctx, status::failed_with(fresh, e.reason(), e.to_string())).await,
    };
    let mut s = fresh;
    s.cache_key = planned.key.clone();
    s.base_image = Some(ImageRef::new(&planned.base_ref, resolved.image_digest.clone()));
    let workspace: Reference = planned.workspace_ref.parse().map_err(|_| Error::Internal("planned ref"))?;
    if !ib.spec.force_rebuild {
        match client.manifest_digest(&workspace).await {
            Ok(Some(digest)) => {
                s.cache_hit = Some(true);
                s.output = Some(ImageRef::new(&planned.workspace_ref, Some(digest)));
                return finish(
                    ib,
                    ctx,
                    status::succeeded(s, Reason::CacheHit, "the workspace image exists; nothing was built"),
                )
                .await;
            }
            Ok(None) => {}
            Err(e) => {
                let message =
                    format!("cannot check {}: {}", planned.workspace_ref, crate::oci::error::chain(&e));
                return waiting(ib, ctx, s, Reason::RegistryUnavailable, &message).await;
            }
        }
    }
    let secret = ib.spec.registry_auth.as_ref().map(|a| a.secret_ref.name.as_str());
    let pod_name = super::pod::pod_name(secret, &planned.workspace_ref, attempt);
    let mut pod = planned.pod;
    pod.metadata.name = Some(pod_name.clone());
    if let Some(message) = queued(ib, ctx, &pod_name).await? {
        s.cache_hit = Some(false);
        s.output = Some(ImageRef::new(&planned.workspace_ref, None));
        return queue_wait(ib, ctx, s, &message).await;
    }
    let applied = apply_pod(ib, ctx, pod).await?;
    // A pod found again after a restart was counted when it was created or joined.
    if applied != Applied::Found {
        let counter =
            if applied == Applied::Created { &ctx.metrics.pods_created } else { &ctx.metrics.pods_joined };
        counter.inc();
        if let Some(start) = &s.start_time {
            ctx.metrics.queue_wait.observe(Timestamp::now().duration_since(start.0).as_secs_f64().max(0.0));
        }
    }
    s.cache_hit = Some(false);
    s.output = Some(ImageRef::new(&planned.workspace_ref, None));
    s.pod_name = Some(pod_name.clone());
    s.attempts = Some(attempt as i32);
    let message = match applied {
        Applied::Created => format!("build pod {pod_name} started"),
        Applied::Joined => {
            format!("joined build pod {pod_name}, started by another ImageBuild with the same key")
        }
        Applied::Found => format!("build pod {pod_name} found (started before a restart)"),
    };
    patch_status(ib, ctx, &status::in_progress(s, Phase::Building, None, &message)).await?;
    lifecycle::event(ctx, ib, false, "Building", &message).await;
    Ok(Action::requeue(POLL))
}

/// `Some(why)` when no build slot is free for a new pod (joining a running pod needs none).
async fn queued(ib: &ImageBuild, ctx: &Context, pod_name: &str) -> Result<Option<String>, Error> {
    let (Some(max), Some(store)) = (ctx.max_concurrent_builds, &ctx.store) else { return Ok(None) };
    let ns = ib.namespace().unwrap_or_else(|| "default".into());
    if Api::<Pod>::namespaced(ctx.client.clone(), &ns).get_opt(pod_name).await.map_err(Error::Kube)?.is_some()
    {
        return Ok(None);
    }
    let all: Api<Pod> = Api::all(ctx.client.clone());
    let params =
        ListParams::default().labels("app.kubernetes.io/managed-by=bob,app.kubernetes.io/component=build");
    let pods = all.list(&params).await.map_err(Error::Kube)?;
    let running = pods
        .items
        .iter()
        .filter(|p| {
            !matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
        })
        .count();
    let everyone = store.state();
    let waiting = everyone.iter().filter(|o| super::queue::is_waiting(o)).count();
    ctx.metrics.queue_depth.set(waiting as i64);
    Ok(super::queue::position(ib, everyone.iter().map(|a| a.as_ref()), running, max)
        .map(|place| format!("queued at position {place}: {running} of {max} builds running")))
}

/// Queued: waits for a slot until the queue time limit.
async fn queue_wait(
    ib: &ImageBuild,
    ctx: &Context,
    s: ImageBuildStatus,
    message: &str,
) -> Result<Action, Error> {
    if let Some(done) = super::policy::queue_expired(ib, ctx.queue_timeout, &s, message) {
        return finish(ib, ctx, done).await;
    }
    if s.phase != Some(Phase::Queued)
        || ib.status.as_ref().and_then(|o| o.message.as_deref()) != Some(message)
    {
        patch_status(ib, ctx, &status::in_progress(s, Phase::Queued, None, message)).await?;
    }
    Ok(Action::requeue(Duration::from_secs(10)))
}

/// What applying the build pod did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The pod was created.
    Created,
    /// Another ImageBuild of the same key runs it; this one became an owner too.
    Joined,
    /// This ImageBuild already owned it (the status write was lost, e.g. by a restart).
    Found,
}

/// Creates the pod, or joins it as an owner when another ImageBuild of the same key made it.
///
/// A create, not a server-side apply: two ImageBuilds of one key reconciled at the same moment
/// would both apply under the one field manager, and the second apply would replace the first's
/// owner reference. A create is atomic: exactly one wins, the other gets 409 and joins.
async fn apply_pod(ib: &ImageBuild, ctx: &Context, pod: Pod) -> Result<Applied, Error> {
    let ns = ib.namespace().unwrap_or_else(|| "default".into());
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let name = pod.metadata.name.clone().unwrap_or_default();
    let existing = match api.get_opt(&name).await.map_err(Error::Kube)? {
        Some(p) => p,
        None => {
            let params = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
            match api.create(&params, &pod).await {
                Ok(_) => {
                    tracing::info!(pod = %name, imagebuild = %ib.name_any(), "created build pod");
                    return Ok(Applied::Created);
                }
                Err(kube::Error::Api(e)) if e.code == 409 => api.get(&name).await.map_err(Error::Kube)?,
                Err(e) => return Err(Error::Kube(e)),
            }
        }
    };
    let uid = ib.uid().unwrap_or_default();
    if existing.owner_references().iter().any(|o| o.uid == uid) {
        return Ok(Applied::Found);
    }
    // A non-controller owner: the pod lives while any ImageBuild that needs it lives.
    let owner = ib.owner_ref(&()).ok_or(Error::Internal("owner reference"))?;
    let patch = json!({"metadata": {"ownerReferences": [owner]}});
    let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    api.patch(&name, &params, &Patch::Strategic(&patch)).await.map_err(Error::Kube)?;
    tracing::info!(pod = %name, imagebuild = %ib.name_any(), "joined build pod");
    Ok(Applied::Joined)
}

/// A build is running: read the pod, verify a success in the registry.
async fn follow(ib: &ImageBuild, ctx: &Context, s: ImageBuildStatus) -> Result<Action, Error> {
    let ns = ib.namespace().unwrap_or_else(|| "default".into());
    let pod_name = s.pod_name.clone().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(pod) = pods.get_opt(&pod_name).await.map_err(Error::Kube)? else {
        let message = format!("build pod {pod_name} disappeared before the build finished");
        return finish(ib, ctx, status::failed_with(s, Reason::PodDeleted, message)).await;
    };
    match observe(&pod) {
        PodState::Waiting(report) => {
            let (reason, message) =
                report.map_or((None, format!("build pod {pod_name} is starting")), |(r, m)| (Some(r), m));
            if s.reason != reason || s.message.as_deref() != Some(message.as_str()) {
                patch_status(ib, ctx, &status::in_progress(s, Phase::Building, reason, &message)).await?;
            }
            Ok(Action::requeue(POLL))
        }
        PodState::Running => {
            if s.reason.is_some() {
                let message = format!("build pod {pod_name} is running");
                patch_status(ib, ctx, &status::in_progress(s, Phase::Building, None, &message)).await?;
            }
            Ok(Action::requeue(POLL))
        }
        PodState::Failed(f) => lifecycle::failed(ib, ctx, s, f).await,
        PodState::Finished(result) => verify(ib, ctx, s, &result).await,
    }
}

/// A build reported success: the workspace image must be in the registry with its digest.
async fn verify(
    ib: &ImageBuild,
    ctx: &Context,
    mut s: ImageBuildStatus,
    result: &crate::build::BuildResult,
) -> Result<Action, Error> {
    let output = s.output.clone().unwrap_or_default();
    if let Some(base) = s.base_image.as_mut() {
        *base = ImageRef::new(base.reference.clone(), result.base_digest.clone());
    }
    let (client, _) = match credentials(ib, ctx).await? {
        Ok(found) => found,
        Err(missing) => return waiting(ib, ctx, s, Reason::SecretNotFound, &missing).await,
    };
    let workspace: Reference = output.reference.parse().map_err(|_| Error::Internal("output ref"))?;
    match client.manifest_digest(&workspace).await {
        Ok(Some(d)) if Some(&d) == result.target_digest.as_ref() => {
            s.output = Some(ImageRef::new(output.reference, Some(d)));
            finish(ib, ctx, status::succeeded(s, Reason::Built, "built and verified in the registry")).await
        }
        Ok(found) => {
            let found = found.map_or("nothing".to_string(), |d| format!("digest {d}"));
            let want = result.target_digest.clone().unwrap_or_default();
            let message = format!(
                "image build did not produce a workspace image: the build reported {want}, the registry has {found} at {}",
                output.reference
            );
            finish(ib, ctx, status::failed_with(s, Reason::VerifyFailed, message)).await
        }
        Err(e) => {
            let message = format!("cannot verify {}: {}", output.reference, crate::oci::error::chain(&e));
            patch_status(
                ib,
                ctx,
                &status::in_progress(s, Phase::Verifying, Some(Reason::RegistryUnavailable), &message),
            )
            .await?;
            Ok(Action::requeue(RETRY))
        }
    }
}

/// Not startable yet (a Secret is missing, a registry is down): Pending until the queue time
/// limit, then Failed.
async fn waiting(
    ib: &ImageBuild,
    ctx: &Context,
    s: ImageBuildStatus,
    reason: Reason,
    message: &str,
) -> Result<Action, Error> {
    if let Some(done) = super::policy::queue_expired(ib, ctx.queue_timeout, &s, message) {
        return finish(ib, ctx, done).await;
    }
    patch_status(ib, ctx, &status::in_progress(s, Phase::Pending, Some(reason), message)).await?;
    Ok(Action::requeue(RETRY))
}

/// Writes the whole status with server-side apply (fields left out are removed).
pub async fn patch_status(ib: &ImageBuild, ctx: &Context, s: &ImageBuildStatus) -> Result<(), Error> {
    let ns = ib.namespace().unwrap_or_else(|| "default".into());
    let api: Api<ImageBuild> = Api::namespaced(ctx.client.clone(), &ns);
    let body =
        json!({"apiVersion": ImageBuild::api_version(&()), "kind": ImageBuild::kind(&()), "status": s});
    api.patch_status(&ib.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body))
        .await
        .map_err(Error::Kube)?;
    Ok(())
}

/// The registry client for the ImageBuild's Secret and its git credentials, or which Secret is
/// missing.
async fn credentials(
    ib: &ImageBuild,
    ctx: &Context,
) -> Result<Result<(Arc<Client>, Option<GitAuth>), String>, Error> {
    let ns = ib.namespace().unwrap_or_else(|| "default".into());
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let value = |secret: &Secret, key: &str| {
        secret.data.as_ref().and_then(|d| d.get(key)).map(|b| String::from_utf8_lossy(&b.0).into_owned())
    };
    let client = match &ib.spec.registry_auth {
        Some(auth) => {
            let name = &auth.secret_ref.name;
            let Some(secret) = secrets.get_opt(name).await.map_err(Error::Kube)? else {
                return Ok(Err(format!("Secret {ns}/{name} (spec.registryAuth) does not exist")));
            };
            let Some(json) = value(&secret, ".dockerconfigjson") else {
                return Ok(Err(format!("Secret {ns}/{name} has no .dockerconfigjson key")));
            };
            ctx.registry(&format!("{ns}/{name}@{}", secret.resource_version().unwrap_or_default()), &json)?
        }
        None => ctx.registry("", "{}")?,
    };
    let git = ib.spec.source.dockerfile.as_ref().and_then(|d| d.git.as_ref());
    let git_auth = match git.and_then(|g| g.credentials_secret_ref.as_ref()) {
        Some(r) => {
            let Some(secret) = secrets.get_opt(&r.name).await.map_err(Error::Kube)? else {
                return Ok(Err(format!("Secret {ns}/{} (git credentialsSecretRef) does not exist", r.name)));
            };
            let (Some(username), Some(password)) = (value(&secret, "username"), value(&secret, "password"))
            else {
                return Ok(Err(format!("Secret {ns}/{} needs username and password keys", r.name)));
            };
            Some(GitAuth { username, password: crate::oci::Secret::new(password) })
        }
        None => None,
    };
    Ok(Ok((client, git_auth)))
}
