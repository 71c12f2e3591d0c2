//! Registry credentials minted from the controller's cloud identity for builds that name no
//! Secret (docs/credentials.md): the operator's mapping decides which repositories a namespace
//! may use, each build's grants get one scoped credential (cached until half its lifetime), the
//! build pod's proxy gets it as a Secret of its own, refreshed while the pod runs (only for a pod
//! an ImageBuild's status records by name and UID, while the guards still hold) and deleted
//! with it. Nothing here writes a credential to a log, an Event or a status.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};

use super::decide::Failure;
use crate::cloud::guard;
use crate::cloud::mapping::{Grant, Mappings, RepoAccess};
use crate::cloud::secret::{self, Minted};
use crate::crd::ImageBuild;
use crate::reason::Reason;

/// The labels of ImageBuild `name`'s build pods that are known before it is planned (all but
/// the key's): what the NetworkPolicy guard matches policies against.
fn build_pod_labels(name: &str) -> BTreeMap<String, String> {
    use super::pod::{LABEL_COMPONENT, LABEL_IMAGEBUILD, LABEL_MANAGED_BY, imagebuild_label};
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "bob".to_string()),
        (LABEL_MANAGED_BY.to_string(), "bob".to_string()),
        (LABEL_COMPONENT.to_string(), "build".to_string()),
        (LABEL_IMAGEBUILD.to_string(), imagebuild_label(name)),
    ])
}

/// Mints and caches build credentials with the controller's identity.
pub struct Broker {
    mappings: Mappings,
    #[cfg(feature = "aws")]
    minter: crate::cloud::aws::Minter,
    minted: Mutex<HashMap<String, Minted>>,
}

/// Why the cloud credentials cannot be used at all (the controller does not start).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The mapping is wrong.
    #[error("--cloud-registries")]
    Mappings(#[source] crate::cloud::mapping::Error),
    /// The session length is outside what AWS allows for a role assumed from a role session.
    #[error(
        "--cloud-session-duration must be between 15m and 1h (AWS caps role chaining at an hour), not {0:?}"
    )]
    Session(Duration),
    /// This build of bob has no cloud SDK.
    #[error("--cloud-registries needs a bob built with the `aws` feature")]
    NoSdk,
}

impl Broker {
    /// A broker for the operator's `mappings` (JSON), whose sessions last `session`; `None`
    /// when the mapping is empty (cloud credentials are off).
    #[cfg_attr(not(feature = "aws"), allow(unused_variables))]
    pub async fn new(mappings: &str, session: Duration) -> Result<Option<Self>, StartError> {
        let mappings = Mappings::parse(mappings).map_err(StartError::Mappings)?;
        if mappings.is_empty() {
            return Ok(None);
        }
        if !(Duration::from_secs(900)..=Duration::from_secs(3600)).contains(&session) {
            return Err(StartError::Session(session));
        }
        #[cfg(feature = "aws")]
        {
            let minter = crate::cloud::aws::Minter::new(crate::cloud::aws::environment().await, session);
            Ok(Some(Self { mappings, minter, minted: Mutex::default() }))
        }
        #[cfg(not(feature = "aws"))]
        Err(StartError::NoSdk)
    }

    /// The grants of `needs` for namespace `ns` (with `labels`): `RegistryNotMapped` names
    /// what no entry covers.
    pub fn grants(
        &self,
        ns: &str,
        labels: &BTreeMap<String, String>,
        needs: &[RepoAccess],
    ) -> Result<Vec<Grant>, Failure> {
        self.mappings.grant(ns, labels, needs).map_err(|m| Failure::new(Reason::RegistryNotMapped, m))
    }

    /// Whether an entry selects namespaces by label.
    pub fn uses_selectors(&self) -> bool {
        self.mappings.uses_selectors()
    }

    /// A credential for `grants` in `ns`, from the cache while it is younger than half its
    /// lifetime; `must_exist` are repositories checked to exist first (pushes).
    pub async fn mint(
        &self,
        ns: &str,
        grants: &[Grant],
        must_exist: &[(String, String)],
    ) -> Result<Minted, Failure> {
        let key = format!("{ns}\n{}\n{must_exist:?}", serde_json::to_string(grants).unwrap_or_default());
        let now = Timestamp::now();
        {
            let mut cache = self.minted.lock().unwrap_or_else(|e| e.into_inner());
            cache.retain(|_, m| !m.stale(now));
            if let Some(m) = cache.get(&key) {
                return Ok(m.clone());
            }
        }
        let minted = self.mint_now(ns, grants, must_exist).await?;
        self.minted.lock().unwrap_or_else(|e| e.into_inner()).insert(key, minted.clone());
        Ok(minted)
    }

    #[cfg(feature = "aws")]
    async fn mint_now(
        &self,
        ns: &str,
        grants: &[Grant],
        must_exist: &[(String, String)],
    ) -> Result<Minted, Failure> {
        use crate::cloud::aws::Error;
        self.minter.mint(ns, grants, must_exist).await.map_err(|e| {
            let reason = match &e {
                Error::Denied { .. } => Reason::AccessDenied,
                Error::RepositoryNotFound { .. } => Reason::RepositoryNotFound,
                Error::Failed { .. } => Reason::RegistryUnavailable,
            };
            Failure::new(reason, e.to_string())
        })
    }

    #[cfg(not(feature = "aws"))]
    async fn mint_now(&self, _: &str, _: &[Grant], _: &[(String, String)]) -> Result<Minted, Failure> {
        Err(Failure::new(Reason::Internal, "bob was built without the `aws` feature"))
    }
}

/// The labels of namespace `ns` (for mapping entries that select namespaces by label).
pub async fn namespace_labels(client: &Client, ns: &str) -> Result<BTreeMap<String, String>, kube::Error> {
    let api: Api<Namespace> = Api::all(client.clone());
    Ok(api.get(ns).await?.labels().clone())
}

/// `Ok` when the NetworkPolicies of `ns` keep build pods from the metadata endpoints; else the
/// `NetworkPolicyMissing` failure (cloud-minted credentials are refused while they are open).
pub async fn metadata_guard(
    client: &Client,
    ns: &str,
    image_build: &str,
) -> Result<Result<(), Failure>, kube::Error> {
    let api: Api<NetworkPolicy> = Api::namespaced(client.clone(), ns);
    let policies = api.list(&ListParams::default()).await?.items;
    Ok(guard::metadata_blocked(&policies, &build_pod_labels(image_build)).map_err(|why| {
        let message = format!(
            "registry credentials from the controller's cloud identity are refused in namespace {ns}: \
             {why}; build pods could reach the metadata endpoints (enable the chart's networkPolicy \
             for this namespace, or set spec.registryAuth.secretRef)"
        );
        Failure::new(Reason::NetworkPolicyMissing, message)
    }))
}

/// `Ok` when `pod` may have its minted credential refreshed ([`refreshable`]), read from the
/// API: the ImageBuilds its owner references name, and the NetworkPolicies of its namespace.
async fn may_refresh(client: &Client, pod: &Pod) -> Result<Result<(), String>, kube::Error> {
    let ns = pod.namespace().unwrap_or_default();
    let builds: Api<ImageBuild> = Api::namespaced(client.clone(), &ns);
    let mut owners = Vec::new();
    // Every ImageBuild that shares the pod is an owner of it; any one recording it will do.
    for o in pod.owner_references().iter().filter(|o| o.kind == "ImageBuild") {
        if let Some(b) = builds.get_opt(&o.name).await? {
            owners.push(b);
        }
    }
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns);
    let policies = policies.list(&ListParams::default()).await?.items;
    Ok(refreshable(pod, &owners, &policies))
}

/// Whether an ImageBuild's status records `pod` as its build pod: the same namespace, name and
/// UID (a pod deleted and made again under the name is another pod). Pure.
pub fn recorded(pod: &Pod, builds: &[ImageBuild]) -> bool {
    let Some(uid) = pod.metadata.uid.as_deref().filter(|u| !u.is_empty()) else { return false };
    let (name, ns) = (pod.metadata.name.as_deref(), pod.metadata.namespace.as_deref());
    builds.iter().any(|b| {
        let s = b.status.as_ref();
        b.metadata.namespace.as_deref() == ns
            && s.and_then(|s| s.pod_name.as_deref()) == name
            && s.and_then(|s| s.pod_uid.as_deref()) == Some(uid)
    })
}

/// `Ok` when the minted credential of `pod` may be minted again: an ImageBuild among `builds`
/// records the pod ([`recorded`]), `policies` (its namespace's) keep it from the metadata
/// endpoints, and no container of it has a cloud identity; else why not. Pure.
pub fn refreshable(pod: &Pod, builds: &[ImageBuild], policies: &[NetworkPolicy]) -> Result<(), String> {
    if !recorded(pod, builds) {
        return Err("no ImageBuild records this pod (by name and UID) as its build pod".into());
    }
    guard::metadata_blocked(policies, pod.labels())?;
    let leaks = guard::identity_leaks(pod);
    if !leaks.is_empty() {
        return Err(format!("the pod has a cloud identity: {}", leaks.join("; ")));
    }
    Ok(())
}

/// Whether `s` is the minted credential of `pod` (bob's labels, owned by this very pod).
fn belongs_to(s: &Secret, pod: &Pod) -> bool {
    let labelled = s.labels().get(secret::LABEL_CREDENTIAL).map(String::as_str) == Some("registry");
    labelled
        && s.owner_references().iter().any(|o| o.kind == "Pod" && Some(&o.uid) == pod.metadata.uid.as_ref())
}

/// Writes the minted credential Secret of `pod` (owned by it, so it goes with it). One of that
/// name that is not this pod's (left from an earlier pod of the name, or made by someone else)
/// is replaced; this pod's own is kept (the refresher keeps it fresh).
pub async fn ensure_secret(
    client: &Client,
    ns: &str,
    pod: &Pod,
    grants: &[Grant],
    minted: &Minted,
) -> Result<(), kube::Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let (name, uid) = (pod.name_any(), pod.uid().unwrap_or_default());
    let s = secret::secret(ns, &name, &uid, grants, minted);
    let params = PostParams { field_manager: Some(super::FIELD_MANAGER.into()), ..Default::default() };
    match api.create(&params, &s).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let secret_name = secret::name(&name);
            match api.get_opt(&secret_name).await? {
                Some(existing) if belongs_to(&existing, pod) => Ok(()),
                existing => {
                    tracing::warn!(namespace = %ns, secret = %secret_name, "replacing a Secret that is not this build pod's credential");
                    if let Some(existing) = existing {
                        let uid = existing.uid().unwrap_or_default();
                        super::act::delete_exact(&api, &secret_name, &uid, None).await?;
                    }
                    api.create(&params, &s).await.map(|_| ())
                }
            }
        }
        Err(e) => Err(e),
    }
}

/// Keeps the minted credentials of running build pods fresh and deletes those of finished pods
/// (after a controller restart too), every `every`. Run by the leader.
pub async fn refresh(
    client: Client,
    broker: std::sync::Arc<Broker>,
    namespace: Option<String>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let pods: Api<Pod> = match &namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        // The build pods, not the Secrets: the controller may not list Secrets (RBAC), and a
        // Secret that merely carries bob's labels decides nothing.
        let pods = match pods.list(&ListParams::default().labels(super::pod::BUILD_POD_SELECTOR)).await {
            Ok(l) => l.items,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the build pods to refresh their credentials");
                continue;
            }
        };
        for pod in &pods {
            if let Err(e) = refresh_pod(&client, &broker, pod).await {
                tracing::warn!(pod = %pod.name_any(), error = %e, "cannot refresh a minted registry credential");
            }
        }
    }
}

async fn refresh_pod(client: &Client, broker: &Broker, pod: &Pod) -> Result<(), kube::Error> {
    let ns = pod.namespace().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let name = secret::name(&pod.name_any());
    let Some(s) = api.get_opt(&name).await? else { return Ok(()) };
    if !belongs_to(&s, pod) {
        return Ok(());
    }
    if super::status::is_over(pod) {
        // The build is over: its credential has nothing left to do.
        super::act::delete_exact(&api, &name, &s.uid().unwrap_or_default(), None).await?;
        tracing::info!(namespace = %ns, secret = %name, "deleted the minted registry credential of a finished build");
        return Ok(());
    }
    if secret::refresh_at(&s).is_some_and(|at| at > Timestamp::now()) {
        return Ok(());
    }
    // Labels, an owner reference and a Secret are what anyone who may create pods and Secrets
    // in the namespace can forge: only a pod an ImageBuild's status records (written by the
    // controller alone) is fed, and only while the guards that held at its creation still hold.
    // Checked only once the Secret is due, so a pod whose status is still being written (it
    // was minted a moment ago, due at half its life) is never mistaken for a forged one.
    if let Err(why) = may_refresh(client, pod).await? {
        super::act::delete_exact(&api, &name, &s.uid().unwrap_or_default(), None).await?;
        tracing::warn!(namespace = %ns, secret = %name, pod = %pod.name_any(), "deleted a registry credential Secret instead of refreshing it: {why}");
        return Ok(());
    }
    // What the Secret says it was minted for is only a request: the operator's mapping decides
    // again, for this namespace, now (a changed mapping revokes what it no longer allows).
    let wanted: Vec<RepoAccess> =
        secret::grants(&s).unwrap_or_default().into_iter().flat_map(|g| g.repositories).collect();
    let labels = if broker.uses_selectors() { namespace_labels(client, &ns).await? } else { BTreeMap::new() };
    let grants = match broker.grants(&ns, &labels, &wanted) {
        Ok(g) if !g.is_empty() => g,
        Ok(_) | Err(_) => {
            super::act::delete_exact(&api, &name, &s.uid().unwrap_or_default(), None).await?;
            tracing::warn!(namespace = %ns, secret = %name, "deleted a minted registry credential the mapping no longer allows");
            return Ok(());
        }
    };
    match broker.mint(&ns, &grants, &[]).await {
        Ok(minted) => {
            let body = secret::secret(&ns, &pod.name_any(), &pod.uid().unwrap_or_default(), &grants, &minted);
            // A merge patch, not an apply: a Secret deleted meanwhile (with its pod) stays deleted.
            let params =
                PatchParams { field_manager: Some(super::FIELD_MANAGER.into()), ..Default::default() };
            api.patch(&name, &params, &Patch::Merge(&body)).await?;
            tracing::info!(namespace = %ns, secret = %name, expires_at = %minted.expires_at, "refreshed a minted registry credential");
        }
        Err(f) => {
            tracing::warn!(namespace = %ns, secret = %name, reason = %f.reason, "cannot mint a credential again: {}", f.message)
        }
    }
    Ok(())
}
