//! The controller's world, looking: what `decide` asks to see, read from the Kubernetes API and
//! the registry. Only reads happen here (the one create whose answer is a fact is `act::create`,
//! the rest of the writes are `act::act`). A failed API call is recorded as such
//! (`Observed::api_error`), never taken for an absent object.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ListParams, LogParams};
use kube::{Resource, ResourceExt};

use super::Context;
use super::access::{self, Keys, Named};
use super::cache_scope;
use super::decide::{Access, Failure, Need, Observed, Slots};
use super::engine::World;
use super::plan::Resolved;
use super::pod::{BUILD_POD_SELECTOR, CONTAINER_BUILD};
use super::resolve::{self, GitAuth};
use crate::cloud::mapping::{self, Grant};
use crate::cloud::secret::Minted;
use crate::crd::ImageBuild;
use crate::oci::Reference;
use crate::oci::client::Client;
use crate::reason::Reason;

/// The cluster as one reconcile of one ImageBuild sees it, and what it read that acting needs.
pub struct Cluster<'a> {
    pub(super) ctx: &'a Context,
    pub(super) ns: String,
    registry: Option<Arc<Client>>,
    git: Option<GitAuth>,
    /// The credential minted for this build (and the grants it covers), when it uses one.
    pub(super) minted: Option<(Vec<Grant>, Minted)>,
    /// The keys of the Secrets the spec names, as read this reconcile (for the log's redaction).
    pub(super) secrets: Option<(Option<Keys>, Option<Keys>)>,
}

impl<'a> Cluster<'a> {
    /// The cluster for a reconcile of an ImageBuild in `ns`.
    pub fn new(ctx: &'a Context, ns: String) -> Self {
        Self { ctx, ns, registry: None, git: None, minted: None, secrets: None }
    }

    pub(super) fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.ctx.client.clone(), &self.ns)
    }

    /// The keys of Secret `name` (`None` when it does not exist).
    async fn secret(&self, name: Option<&String>) -> Result<Option<Keys>, Failure> {
        let Some(name) = name else { return Ok(None) };
        let found = self.api::<Secret>().get_opt(name).await;
        Ok(found.map_err(|e| Failure::api(&format!("read Secret {name}"), &e))?.map(|s| access::keys(&s)))
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
                .map_err(|e| Failure::api(&format!("read Namespace {ns}"), &e))?
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
            .map_err(|e| Failure::api("list the NetworkPolicies", &e))?;
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

    /// The Secrets the spec names (the registry client from the docker config, git credentials),
    /// or a credential minted for the build's repositories. Outer `Err`: the API did not answer.
    async fn credentials(&mut self, ib: &ImageBuild) -> Result<Result<Access, Failure>, Failure> {
        let named = Named::of(ib);
        let registry_keys = self.secret(named.registry.as_ref()).await?;
        let git_keys = self.secret(named.git.as_ref()).await?;
        self.secrets = Some((registry_keys.clone(), git_keys.clone()));
        let ns = self.ns.clone();
        let place = |name: &str| format!("Secret {ns}/{name}");
        let registry = match &named.registry {
            Some(name) => {
                let json = match access::registry(&place(name), registry_keys.as_ref()) {
                    Ok(json) => json,
                    Err(f) => return Ok(Err(f)),
                };
                // Cached by the Secret's content: a changed Secret gets a new client.
                let key = format!("{}/{name}@{}", self.ns, crate::oci::manifest::sha256(json.as_bytes()));
                match self.ctx.registry(&key, json) {
                    Ok(client) => client,
                    Err(f) => return Ok(Err(access::not_a_docker_config(&place(name), f))),
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
        if let Some(name) = &named.git {
            match access::git(&place(name), git_keys.as_ref()) {
                Ok(auth) => self.git = Some(auth),
                Err(f) => return Ok(Err(f)),
            }
        }
        self.registry = Some(registry);
        Ok(Ok(if self.minted.is_some() { Access::Minted } else { Access::FromSpec }))
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

    /// Whether a build slot is free for a new pod.
    async fn slots(&self, ib: &ImageBuild) -> Result<Slots, kube::Error> {
        let max = self.ctx.settings.max_concurrent_builds.unwrap_or(usize::MAX);
        let free = Slots { position: None, running: 0, max };
        let Some(store) = &self.ctx.store else { return Ok(free) };
        let all: Api<Pod> = Api::all(self.ctx.client.clone());
        let pods = all.list(&ListParams::default().labels(BUILD_POD_SELECTOR)).await?;
        let running = pods.items.iter().filter(|p| !super::status::is_over(p)).count();
        let everyone = store.state();
        let waiting = everyone.iter().filter(|o| super::queue::is_waiting(o)).count();
        self.ctx.metrics.queue_depth.set(waiting as i64);
        let position = super::queue::position(ib, everyone.iter().map(|a| a.as_ref()), running, max);
        Ok(Slots { position, running, max })
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

    /// The registry's answer for `r` with the credentials of this reconcile (read first when
    /// `decide` did not ask for them: a build followed after its start).
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
}

impl World for Cluster<'_> {
    async fn observe(&mut self, ib: &ImageBuild, need: Need, seen: &mut Observed) {
        match need {
            Need::Credentials => match self.credentials(ib).await {
                Ok(found) => {
                    seen.minted = self.minted.is_some();
                    seen.credentials = Some(found);
                }
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
                // Minting may first have been needed for the images the Dockerfile reads.
                seen.minted = self.minted.is_some();
            }
            Need::Cache(r) => {
                if let Some(found) = self.lookup(ib, &r, seen).await {
                    seen.cache = Some(found);
                }
            }
            Need::Slots => match self.slots(ib).await {
                Ok(s) => seen.slots = Some(s),
                Err(e) => seen.api_error = Some(Failure::api("count the running build pods", &e)),
            },
            Need::Pod(name) => match self.api::<Pod>().get_opt(&name).await {
                Ok(p) => seen.pod = Some(p),
                Err(e) => seen.api_error = Some(Failure::api(&format!("read build pod {name}"), &e)),
            },
            Need::Verify(r) => {
                if let Some(found) = self.lookup(ib, &r, seen).await {
                    seen.verified = Some(found);
                }
            }
            Need::LogTail(pod) => seen.log_tail = Some(self.log_tail(&pod).await),
        }
    }

    async fn attempt(&mut self, ib: &ImageBuild, pod: Pod, seen: &mut Observed) {
        match super::act::create(self, ib, &pod).await {
            Ok(created) => seen.created = Some(created),
            Err(f) => seen.api_error = Some(f),
        }
    }
}
