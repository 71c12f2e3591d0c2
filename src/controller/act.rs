//! The controller's world, acting: every write of a reconcile. The build pod's create
//! (`Step::Attempt`, whose answer decides the status), then the transition: the effects the
//! new status claims (an owner, a credential, an unsafe pod deleted), the status in one
//! server-side apply, and the rest (Events, the log shipment, a finished pod's cleanup, metrics).
//! Every write can be repeated: creates are read back on 409, patches are idempotent, deletes
//! carry the UID they were decided for. Nothing is decided here.

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;

use std::time::Duration;

use super::access::{self, Named};
use super::decide::{Created, Effect, Failure, Next, Transition};
use super::logship::{self, Shipment};
use super::observe::Cluster;
use super::policy::owner_done;
use super::{Context, Error, FIELD_MANAGER};
use crate::crd::ImageBuild;
use crate::logs::store::Redactor;

/// Creates the build pod; a pod of that name that exists already (another ImageBuild's, or this
/// one's from a create whose answer was lost) is read back. `Err`: no answer to tell which.
pub(super) async fn create(cluster: &Cluster<'_>, ib: &ImageBuild, pod: &Pod) -> Result<Created, Failure> {
    cluster.ctx.leading().map_err(|e| Failure::api("create the build pod", &e.into()))?;
    let api: Api<Pod> = cluster.api();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let params = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    // A create, not a server-side apply: two ImageBuilds of one key reconciled at the same moment
    // would both apply under the one field manager, and the second apply would replace the
    // first's owner reference. A create is atomic: exactly one wins, the other reads it back.
    match api.create(&params, pod).await {
        Ok(stored) => {
            tracing::info!(pod = %name, imagebuild = %ib.name_any(), "created build pod");
            Ok(Created::New(Box::new(stored)))
        }
        Err(kube::Error::Api(e)) if e.code == 409 => match api.get_opt(&name).await {
            Ok(Some(existing)) => Ok(Created::Exists(Box::new(existing))),
            // Deleted in between: unknown for now, the next reconcile looks again.
            Ok(None) => Err(Failure::api(&format!("read back build pod {name}"), &kube::Error::Api(e))),
            Err(e) => Err(Failure::api(&format!("read back build pod {name}"), &e)),
        },
        Err(kube::Error::Api(e)) if e.code < 500 && e.code != 429 => {
            tracing::info!(pod = %name, code = e.code, message = %e.message, "the API server refused the build pod");
            Ok(Created::Refused { code: e.code, message: e.message })
        }
        Err(e) => Err(Failure::api(&format!("create build pod {name}"), &e)),
    }
}

/// Carries out a transition: the effects its status claims, the status (one server-side apply),
/// then the rest, which is best effort and never fails the reconcile.
pub async fn act(ib: &ImageBuild, cluster: &Cluster<'_>, t: Transition) -> Result<Action, Error> {
    cluster.ctx.leading()?;
    let ctx = cluster.ctx;
    let (before, after): (Vec<Effect>, Vec<Effect>) = t.effects.into_iter().partition(Effect::before_status);
    for effect in before {
        claim(ib, cluster, effect).await?;
    }
    if let Some(s) = &t.status {
        patch_status(ib, ctx, s).await?;
        if let (Some(phase), Some(reason)) = (s.phase, s.reason) {
            tracing::info!(imagebuild = %ib.name_any(), ?phase, %reason, "{}", s.message.as_deref().unwrap_or(""));
        }
    }
    for effect in after {
        match effect {
            Effect::Event { warning, reason, note } => event(ctx, ib, warning, &reason, &note).await,
            Effect::Cleanup(pod) => cleanup(ib, ctx, &pod).await,
            Effect::Count(c) => ctx.metrics.count(c),
            Effect::ShipLog { pod, attempt } => ship_log(ib, cluster, pod, attempt).await,
            Effect::Own(_) | Effect::Credential { .. } | Effect::DeletePod { .. } => {}
        }
    }
    Ok(match t.next {
        Next::Change => Action::await_change(),
        Next::After(d) => Action::requeue(d),
    })
}

/// One effect the status claims; a failure stops the transition before its status is written.
async fn claim(ib: &ImageBuild, cluster: &Cluster<'_>, effect: Effect) -> Result<(), Error> {
    let pods: Api<Pod> = cluster.api();
    match effect {
        Effect::Own(pod) => {
            // A non-controller owner: the pod lives while any ImageBuild that needs it lives. A
            // strategic merge on the owners' list (keyed by UID) adds this one and no other.
            let Some(owner) = ib.owner_ref(&()) else { return Ok(()) };
            let patch = json!({"metadata": {"ownerReferences": [owner]}});
            let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
            pods.patch(&pod, &params, &Patch::Strategic(&patch)).await.map_err(Error::Act)?;
            tracing::info!(pod, imagebuild = %ib.name_any(), "joined build pod");
        }
        Effect::Credential { pod, uid } => {
            let Some((grants, minted)) = &cluster.minted else { return Ok(()) };
            let mut target = Pod::default();
            target.metadata.name = Some(pod);
            target.metadata.uid = Some(uid);
            super::cloud::ensure_secret(&cluster.ctx.client, &cluster.ns, &target, grants, minted)
                .await
                .map_err(Error::Act)?;
        }
        Effect::DeletePod { pod, uid } => {
            tracing::warn!(pod, "a build pod was given a cloud identity; deleting it");
            delete_pod(&pods, &pod, &uid, None).await.map_err(Error::Act)?;
        }
        _ => {}
    }
    Ok(())
}

/// Deletes pod `name` if it is still the one of `uid`; gone already is done.
async fn delete_pod(pods: &Api<Pod>, name: &str, uid: &str, grace: Option<u32>) -> Result<(), kube::Error> {
    delete_exact(pods, name, uid, grace).await
}

/// Deletes object `name` only if it is still the one of `uid` (a precondition, so a retried or
/// late delete never removes an object made since under the same name). Gone already, or
/// replaced (409), is done.
pub async fn delete_exact<K>(
    api: &Api<K>,
    name: &str,
    uid: &str,
    grace: Option<u32>,
) -> Result<(), kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let params = DeleteParams {
        grace_period_seconds: grace,
        preconditions: Some(Preconditions { uid: Some(uid.to_string()), resource_version: None }),
        ..Default::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes the whole status with server-side apply (fields left out are removed).
pub async fn patch_status(
    ib: &ImageBuild,
    ctx: &Context,
    s: &crate::crd::ImageBuildStatus,
) -> Result<(), Error> {
    let ns = ib.namespace().unwrap_or_else(|| "default".into());
    let api: Api<ImageBuild> = Api::namespaced(ctx.client.clone(), &ns);
    let body =
        json!({"apiVersion": ImageBuild::api_version(&()), "kind": ImageBuild::kind(&()), "status": s});
    api.patch_status(&ib.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body))
        .await
        .map_err(Error::StatusWrite)?;
    Ok(())
}

/// Publishes an Event on the ImageBuild (logged, never fatal).
async fn event(ctx: &Context, ib: &ImageBuild, warning: bool, reason: &str, note: &str) {
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

/// Deletes a finished pod once every owner has its evidence or follows another pod; keeps it
/// while any owner still follows it (a shared build others wait for). The owners are read here,
/// at the last moment, because a decision made earlier in the reconcile could be stale by now.
async fn cleanup(ib: &ImageBuild, ctx: &Context, pod: &str) {
    let ns = ib.namespace().unwrap_or_else(|| "default".into());
    // The pod's output is stored before the pod goes (the shipment ends with the containers).
    ctx.logs.shipped(&ns, pod, Duration::from_secs(15)).await;
    if ctx.settings.policy.keep_finished_pods {
        return;
    }
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
    match delete_pod(&pods, pod, &found.uid().unwrap_or_default(), Some(10)).await {
        Ok(()) => tracing::info!(pod, "deleted the finished build pod"),
        Err(e) => tracing::debug!(pod, error = %e, "cannot delete the build pod"),
    }
}

/// Starts shipping a build pod's log (unless that is being done), redacting the values of the
/// ImageBuild's Secrets: those this reconcile read, else (a running build's log after a
/// controller restart) read now.
async fn ship_log(ib: &ImageBuild, cluster: &Cluster<'_>, pod: String, attempt: u32) {
    let ctx = cluster.ctx;
    let ns = cluster.ns.clone();
    if ctx.logs.is_shipping(&ns, &pod) {
        return;
    }
    let (registry, git) = match &cluster.secrets {
        Some(read) => read.clone(),
        None => {
            let named = Named::of(ib);
            let secrets: Api<Secret> = cluster.api();
            let read = |name: Option<String>| {
                let secrets = secrets.clone();
                async move { secrets.get_opt(&name?).await.ok().flatten().map(|s| access::keys(&s)) }
            };
            // The credential minted for this pod, when the spec names no Secret.
            let registry =
                named.registry.or_else(|| ctx.cloud.as_ref().map(|_| crate::cloud::secret::name(&pod)));
            (read(registry).await, read(named.git).await)
        }
    };
    let minted = cluster.minted.as_ref().map(|(_, m)| m.docker_config.expose().to_string());
    let docker_config = minted.or_else(|| registry?.get(access::DOCKER_CONFIG_KEY).cloned());
    let git_password = git.and_then(|g| g.get("password").cloned());
    let redactor = Redactor::new(logship::secret_values(docker_config.as_deref(), git_password.as_deref()));
    let what = Shipment { namespace: ns, pod, attempt, image_build: ib.name_any() };
    ctx.logs.ensure(ctx.client.clone(), what, redactor);
}
