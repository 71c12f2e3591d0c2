//! The controller's world: what `decide` asks to see, read from the Kubernetes API and the
//! registry, and the transition it returns carried out — the status written once by server-side
//! apply, then Events, the cleanup of a finished pod and the metrics. A failed API call becomes
//! an observed fact (`ApiUnavailable`), so even then the ImageBuild gets a status.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;

use std::time::Duration;

use super::cache_scope;
use super::decide::{Access, Count, Created, Effect, Failure, Need, Next, Observed, Slots, Transition};
use super::engine::World;
use super::logship::{self, Shipment};
use super::metrics::{Metrics, ModeLabel, OutcomeLabels, ReasonLabel};
use super::plan::Resolved;
use super::pod::{BUILD_POD_SELECTOR, CONTAINER_BUILD};
use super::policy::owner_done;
use super::resolve::{self, GitAuth};
use super::{Context, Error, FIELD_MANAGER};
use crate::cloud::guard;
use crate::cloud::mapping::{self, Grant};
use crate::cloud::secret::Minted;
use crate::crd::ImageBuild;
use crate::logs::store::Redactor;
use crate::oci::client::Client;
use crate::oci::{Reference, Secret as Sensitive};
use crate::reason::Reason;

/// The cluster as one reconcile of one ImageBuild sees it.
pub struct Cluster<'a> {
    ctx: &'a Context,
    ns: String,
    registry: Option<Arc<Client>>,
    git: Option<GitAuth>,
    /// The credential minted for this build (and the grants it covers), when it uses one.
    minted: Option<(Vec<Grant>, Minted)>,
}

impl<'a> Cluster<'a> {
    /// The cluster for a reconcile of an ImageBuild in `ns`.
    pub fn new(ctx: &'a Context, ns: String) -> Self {
        Self { ctx, ns, registry: None, git: None, minted: None }
    }

    /// The registry client of a credential minted from the controller's cloud identity for what
    /// the build touches (its repositories and `from_images`), when it names no Secret and
    /// touches a mapped registry; `Ok(Ok(None))` when it needs none.
    async fn cloud_client(
        &mut self,
        ib: &ImageBuild,
        from_images: &[String],
    ) -> Result<Result<Option<Arc<Client>>, Failure>, Failure> {
        let Some(broker) = self.ctx.cloud.clone() else { return Ok(Ok(None)) };
        if ib.spec.registry_auth.is_some() {
            return Ok(Ok(None));
        }
        let cache = cache_scope::plan(ib, &self.ctx.settings.plan.layer_cache).ok().flatten();
        let needs = mapping::needs(ib, from_images, cache.as_ref().map(|c| c.repository.as_str()));
        if !needs.iter().any(|n| crate::cloud::ecr::is_ecr(&n.host)) {
            // Nothing the cloud identity could mint for: no Namespace or NetworkPolicy reads.
            return Ok(Ok(None));
        }
        let ns = self.ns.clone();
        let labels = if broker.uses_selectors() {
            super::cloud::namespace_labels(&self.ctx.client, &ns)
                .await
                .map_err(|e| api_failure(&format!("read Namespace {ns}"), &e))?
        } else {
            Default::default()
        };
        let grants = match broker.grants(&ns, &labels, &needs) {
            Ok(g) if g.is_empty() => return Ok(Ok(None)),
            Ok(g) => g,
            Err(f) => return Ok(Err(f)),
        };
        let guard = super::cloud::metadata_guard(&self.ctx.client, &ns, &ib.name_any())
            .await
            .map_err(|e| api_failure("list the NetworkPolicies", &e))?;
        if let Err(f) = guard {
            return Ok(Err(f));
        }
        // The images the build pushes must exist (ECR creates no repository on push); the layer
        // cache is best effort and not checked.
        let cache_repo = cache.as_ref().map(|c| c.repository.as_str());
        let must_exist: Vec<(String, String)> = needs
            .iter()
            .filter(|n| n.push && Some(format!("{}/{}", n.host, n.repository).as_str()) != cache_repo)
            .map(|n| (n.host.clone(), n.repository.clone()))
            .collect();
        let minted = match broker.mint(&ns, &grants, &must_exist).await {
            Ok(m) => m,
            Err(f) => return Ok(Err(f)),
        };
        let key =
            format!("cloud:{ns}:{}@{}", serde_json::to_string(&grants).unwrap_or_default(), minted.minted_at);
        let client = match self.ctx.registry(&key, minted.docker_config.expose()) {
            Ok(c) => c,
            Err(f) => return Ok(Err(f)),
        };
        self.minted = Some((grants, minted));
        Ok(Ok(Some(client)))
    }

    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.ctx.client.clone(), &self.ns)
    }

    /// The Secrets the spec names (the registry client from the docker config, git credentials),
    /// or a credential minted for the build's repositories.
    async fn credentials(&mut self, ib: &ImageBuild) -> Result<Result<Access, Failure>, Failure> {
        let ns = &self.ns.clone();
        let secrets: Api<Secret> = self.api();
        let value = |secret: &Secret, key: &str| {
            secret.data.as_ref().and_then(|d| d.get(key)).map(|b| String::from_utf8_lossy(&b.0).into_owned())
        };
        let get = |name: String| {
            let secrets = secrets.clone();
            async move {
                secrets.get_opt(&name).await.map_err(|e| api_failure(&format!("read Secret {name}"), &e))
            }
        };
        let registry = match &ib.spec.registry_auth {
            Some(auth) => {
                let name = &auth.secret_ref.name;
                let Some(secret) = get(name.clone()).await? else {
                    let message = format!("Secret {ns}/{name} (spec.registryAuth) does not exist");
                    return Ok(Err(Failure::new(Reason::SecretNotFound, message)));
                };
                let Some(json) = value(&secret, ".dockerconfigjson") else {
                    let message = format!(
                        "Secret {ns}/{name} has no .dockerconfigjson key (type kubernetes.io/dockerconfigjson)"
                    );
                    return Ok(Err(Failure::new(Reason::SecretInvalid, message)));
                };
                let key = format!("{ns}/{name}@{}", secret.resource_version().unwrap_or_default());
                match self.ctx.registry(&key, &json) {
                    Ok(client) => client,
                    Err(f) => {
                        let message = format!(
                            "Secret {ns}/{name} key .dockerconfigjson is not a docker config: {}",
                            f.message
                        );
                        return Ok(Err(Failure::new(f.reason, message)));
                    }
                }
            }
            None => match self.cloud_client(ib, &[]).await? {
                Ok(Some(client)) => client,
                Ok(None) => match self.ctx.registry("", "{}") {
                    Ok(client) => client,
                    Err(f) => return Ok(Err(f)),
                },
                Err(f) => return Ok(Err(f)),
            },
        };
        let git = ib.spec.source.dockerfile.as_ref().and_then(|d| d.git.as_ref());
        if let Some(r) = git.and_then(|g| g.credentials_secret_ref.as_ref()) {
            let Some(secret) = get(r.name.clone()).await? else {
                let message = format!("Secret {ns}/{} (git credentialsSecretRef) does not exist", r.name);
                return Ok(Err(Failure::new(Reason::SecretNotFound, message)));
            };
            let (Some(username), Some(password)) = (value(&secret, "username"), value(&secret, "password"))
            else {
                let message = format!("Secret {ns}/{} needs the keys username and password", r.name);
                return Ok(Err(Failure::new(Reason::SecretInvalid, message)));
            };
            self.git = Some(GitAuth { username, password: Sensitive::new(password) });
        }
        self.registry = Some(registry);
        Ok(Ok(if self.minted.is_some() { Access::Minted } else { Access::FromSpec }))
    }

    async fn lookup(
        &mut self,
        ib: &ImageBuild,
        r: &Reference,
        seen: &mut Observed,
    ) -> Option<super::decide::Lookup> {
        if self.registry.is_none() {
            match self.credentials(ib).await {
                Ok(Ok(_)) => {}
                Ok(Err(f)) => return Some(Err(f)),
                Err(f) => {
                    seen.api_error = Some(f);
                    return None;
                }
            }
        }
        let client = self.registry.clone()?;
        Some(resolve::lookup(&client, r).await)
    }

    /// Resolves the build's inputs; a minted credential is minted again for the images its
    /// Dockerfile reads (pull on exactly those), before they are pinned with it.
    async fn resolve(
        &mut self,
        ib: &ImageBuild,
        client: Arc<Client>,
        scratch: &std::path::Path,
    ) -> Result<Resolved, Failure> {
        let mut resolved = resolve::fetch(ib, self.git.as_ref(), scratch).await?;
        let mut client = client;
        // The images the Dockerfile reads may be the build's only ECR repositories.
        if self.ctx.cloud.is_some() && ib.spec.registry_auth.is_none() {
            let images = resolve::images(ib, &resolved)?;
            match self.cloud_client(ib, &images).await {
                Ok(Ok(Some(c))) => client = c,
                Ok(Ok(None)) => {}
                Ok(Err(f)) | Err(f) => return Err(f),
            }
        }
        resolve::pin(ib, &client, &mut resolved).await?;
        Ok(resolved)
    }

    /// Whether a build slot is free for a new pod (joining a running pod needs none).
    async fn slots(&self, ib: &ImageBuild, pod_name: &str) -> Result<Slots, kube::Error> {
        let max = self.ctx.settings.max_concurrent_builds.unwrap_or(usize::MAX);
        let free = Slots { position: None, running: 0, max };
        let Some(store) = &self.ctx.store else { return Ok(free) };
        if self.api::<Pod>().get_opt(pod_name).await?.is_some() {
            return Ok(free);
        }
        let all: Api<Pod> = Api::all(self.ctx.client.clone());
        let pods = all.list(&ListParams::default().labels(BUILD_POD_SELECTOR)).await?;
        let running = pods
            .items
            .iter()
            .filter(|p| {
                !matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
            })
            .count();
        let everyone = store.state();
        let waiting = everyone.iter().filter(|o| super::queue::is_waiting(o)).count();
        self.ctx.metrics.queue_depth.set(waiting as i64);
        let position = super::queue::position(ib, everyone.iter().map(|a| a.as_ref()), running, max);
        Ok(Slots { position, running, max })
    }

    /// Creates the pod, or joins it as an owner when another ImageBuild of the same key made it.
    ///
    /// A create, not a server-side apply: two ImageBuilds of one key reconciled at the same
    /// moment would both apply under the one field manager, and the second apply would replace
    /// the first's owner reference. A create is atomic: exactly one wins, the other gets 409 and
    /// joins.
    ///
    /// Also returns the UID of the pod created, joined or found, for the status to record.
    async fn create(&self, ib: &ImageBuild, pod: &Pod) -> Result<(Created, Option<String>), kube::Error> {
        self.ctx.leading()?;
        let api: Api<Pod> = self.api();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let (existing, created) = match api.get_opt(&name).await? {
            Some(p) => (p, false),
            None => {
                let params = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
                match api.create(&params, pod).await {
                    Ok(stored) => {
                        tracing::info!(pod = %name, imagebuild = %ib.name_any(), "created build pod");
                        (stored, true)
                    }
                    Err(kube::Error::Api(e)) if e.code == 409 => (api.get(&name).await?, false),
                    Err(kube::Error::Api(e)) => {
                        tracing::info!(pod = %name, code = e.code, message = %e.message, "the API server refused the build pod");
                        return Ok((Created::Refused { code: e.code, message: e.message }, None));
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        // The pod as admission left it: a webhook that gave a container a cloud identity (IRSA,
        // Pod Identity, AWS keys) despite the skip annotation makes it unsafe to run.
        let leaks = guard::identity_leaks(&existing);
        if !leaks.is_empty() {
            tracing::warn!(pod = %name, leaks = ?leaks, "a build pod was given a cloud identity; deleting it");
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
            return Ok((Created::Unsafe { leaks }, None));
        }
        if let Some((grants, minted)) = &self.minted {
            super::cloud::ensure_secret(&self.ctx.client, &self.ns, &existing, grants, minted).await?;
        }
        // The UID of the pod as the API server answered it now: what the status records as this
        // ImageBuild's pod (created, joined or found after a restart).
        let pod_uid = existing.uid();
        if created {
            return Ok((Created::Created, pod_uid));
        }
        let uid = ib.uid().unwrap_or_default();
        if existing.owner_references().iter().any(|o| o.uid == uid) {
            return Ok((Created::Found, pod_uid));
        }
        // A non-controller owner: the pod lives while any ImageBuild that needs it lives.
        let Some(owner) = ib.owner_ref(&()) else { return Ok((Created::Found, pod_uid)) };
        let patch = json!({"metadata": {"ownerReferences": [owner]}});
        let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
        api.patch(&name, &params, &Patch::Strategic(&patch)).await?;
        tracing::info!(pod = %name, imagebuild = %ib.name_any(), "joined build pod");
        Ok((Created::Joined, pod_uid))
    }

    /// The build container's last lines; a container that never started has none (not an error).
    async fn log_tail(&self, pod: &str) -> Option<String> {
        let params =
            LogParams { container: Some(CONTAINER_BUILD.into()), tail_lines: Some(40), ..Default::default() };
        match self.api::<Pod>().logs(pod, &params).await {
            Ok(t) if !t.is_empty() => Some(t),
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(pod, error = %e, "no log of the build container");
                None
            }
        }
    }
}

impl World for Cluster<'_> {
    async fn observe(&mut self, ib: &ImageBuild, need: Need, seen: &mut Observed) {
        match need {
            Need::Credentials => match self.credentials(ib).await {
                Ok(found) => seen.credentials = Some(found),
                Err(f) => seen.api_error = Some(f),
            },
            Need::Resolve => {
                let (Some(client), Ok(scratch)) =
                    (self.registry.clone(), tempfile::Builder::new().prefix("bob-resolve-").tempdir())
                else {
                    seen.resolved =
                        Some(Err(Failure::new(Reason::Internal, "no registry client or scratch directory")));
                    return;
                };
                seen.resolved = Some(self.resolve(ib, client, scratch.path()).await);
                if self.minted.is_some() {
                    // Minting may first have been needed for the images the Dockerfile reads.
                    seen.credentials = Some(Ok(Access::Minted));
                }
            }
            Need::Cache(r) => {
                if let Some(found) = self.lookup(ib, &r, seen).await {
                    seen.cache = Some(found);
                }
            }
            Need::Slots(pod) => match self.slots(ib, &pod).await {
                Ok(s) => seen.slots = Some(s),
                Err(e) => seen.api_error = Some(api_failure("count the running build pods", &e)),
            },
            Need::Create(pod) => match self.create(ib, &pod).await {
                Ok((c, uid)) => {
                    seen.created = Some(c);
                    seen.pod_uid = uid;
                }
                Err(e) => seen.api_error = Some(api_failure("create the build pod", &e)),
            },
            Need::Pod(name) => match self.api::<Pod>().get_opt(&name).await {
                Ok(p) => seen.pod = Some(p),
                Err(e) => seen.api_error = Some(api_failure(&format!("read build pod {name}"), &e)),
            },
            Need::Verify(r) => {
                if let Some(found) = self.lookup(ib, &r, seen).await {
                    seen.verified = Some(found);
                }
            }
            Need::LogTail(pod) => seen.log_tail = Some(self.log_tail(&pod).await),
        }
    }
}

/// A failed API call as a status reason.
fn api_failure(what: &str, e: &kube::Error) -> Failure {
    Failure::new(Reason::ApiUnavailable, format!("cannot {what}: {e}"))
}

/// Carries out a transition: the status first (one server-side apply), then the effects, which
/// are best effort and never fail the reconcile.
pub async fn act(ib: &ImageBuild, ctx: &Context, t: Transition) -> Result<Action, Error> {
    ctx.leading()?;
    if let Some(s) = &t.status {
        patch_status(ib, ctx, s).await?;
        if let (Some(phase), Some(reason)) = (s.phase, s.reason) {
            tracing::info!(imagebuild = %ib.name_any(), ?phase, %reason, "{}", s.message.as_deref().unwrap_or(""));
        }
    }
    for effect in t.effects {
        match effect {
            Effect::Event { warning, reason, note } => event(ctx, ib, warning, &reason, &note).await,
            Effect::Cleanup(pod) => cleanup(ib, ctx, &pod).await,
            Effect::Count(c) => count(&ctx.metrics, c),
            Effect::ShipLog { pod, attempt } => ship_log(ib, ctx, pod, attempt).await,
        }
    }
    Ok(match t.next {
        Next::Change => Action::await_change(),
        Next::After(d) => Action::requeue(d),
    })
}

/// Counts `c` in the metrics.
pub fn count(m: &Metrics, c: Count) {
    match c {
        Count::Finished { phase, reason, seconds } => {
            let labels = OutcomeLabels { outcome: format!("{phase:?}"), reason: reason.to_string() };
            m.builds.get_or_create(&labels).inc();
            if let Some(s) = seconds {
                m.build_duration.observe(s);
            }
        }
        Count::PodStarted { created, waited } => {
            if created {
                m.pods_created.inc()
            } else {
                m.pods_joined.inc()
            };
            m.queue_wait.observe(waited);
        }
        Count::Retry(reason) => {
            m.retries.get_or_create(&ReasonLabel { reason: reason.to_string() }).inc();
        }
        Count::LayerCache { mode, hits } => {
            m.layer_cache_builds.get_or_create(&ModeLabel { mode: mode.as_str().into() }).inc();
            m.layer_cache_hits.inc_by(hits.into());
        }
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
/// while any owner still follows it (a shared build others wait for).
async fn cleanup(ib: &ImageBuild, ctx: &Context, pod: &str) {
    let ns = ib.namespace().unwrap_or_default();
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
    let grace = DeleteParams { grace_period_seconds: Some(10), ..Default::default() };
    match pods.delete(pod, &grace).await {
        Ok(_) => tracing::info!(pod, "deleted the finished build pod"),
        Err(e) => tracing::debug!(pod, error = %e, "cannot delete the build pod"),
    }
}

/// Starts shipping a build pod's log (unless that is being done), with the values of the
/// ImageBuild's Secrets to redact.
async fn ship_log(ib: &ImageBuild, ctx: &Context, pod: String, attempt: u32) {
    let ns = ib.namespace().unwrap_or_else(|| "default".into());
    if ctx.logs.is_shipping(&ns, &pod) {
        return;
    }
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let value = |name: Option<String>, key: &'static str| {
        let secrets = secrets.clone();
        async move {
            let secret = secrets.get_opt(&name?).await.ok().flatten()?;
            secret.data?.get(key).map(|b| String::from_utf8_lossy(&b.0).into_owned())
        }
    };
    // The Secret the spec names, else the credential minted for this pod (if any).
    let registry_secret = match &ib.spec.registry_auth {
        Some(a) => Some(a.secret_ref.name.clone()),
        None => ctx.cloud.as_ref().map(|_| crate::cloud::secret::name(&pod)),
    };
    let registry = value(registry_secret, ".dockerconfigjson").await;
    let git_secret =
        ib.spec.source.dockerfile.as_ref().and_then(|d| d.git.as_ref()?.credentials_secret_ref.clone());
    let git = value(git_secret.map(|r| r.name), "password").await;
    let redactor = Redactor::new(logship::secret_values(registry.as_deref(), git.as_deref()));
    let what = Shipment { namespace: ns, pod, attempt, image_build: ib.name_any() };
    ctx.logs.ensure(ctx.client.clone(), what, redactor);
}
