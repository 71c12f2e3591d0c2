//! Registry credentials minted from the controller's cloud identity for builds that name no
//! Secret (docs/credentials.md): the operator's mapping decides which repositories a namespace
//! may use, each build's grants get one scoped credential (cached until half its lifetime), the
//! build pod's proxy gets it as a Secret of its own, refreshed while the pod runs and deleted
//! with it. Nothing here writes a credential to a log, an Event or a status.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};

use super::decide::Failure;
use crate::cloud::guard;
use crate::cloud::mapping::{Grant, Mappings, RepoAccess};
use crate::cloud::secret::{self, Minted};
use crate::reason::Reason;

/// The build pods' labels the NetworkPolicy guard checks (the chart's policy selects these).
fn build_pod_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        (super::pod::LABEL_MANAGED_BY.to_string(), "bob".to_string()),
        (super::pod::LABEL_COMPONENT.to_string(), "build".to_string()),
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
pub async fn metadata_guard(client: &Client, ns: &str) -> Result<Result<(), Failure>, kube::Error> {
    let api: Api<NetworkPolicy> = Api::namespaced(client.clone(), ns);
    let policies = api.list(&ListParams::default()).await?.items;
    Ok(guard::metadata_blocked(&policies, &build_pod_labels()).map_err(|why| {
        let message = format!(
            "registry credentials from the controller's cloud identity are refused in namespace {ns}: \
             {why}; build pods could reach the metadata endpoints (enable the chart's networkPolicy \
             for this namespace, or set spec.registryAuth.secretRef)"
        );
        Failure::new(Reason::NetworkPolicyMissing, message)
    }))
}

/// Writes the minted credential Secret of `pod` (owned by it, so it goes with it) unless it
/// exists; the refresher keeps an existing one fresh.
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
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Keeps minted credential Secrets fresh while their pods run, and deletes those whose pod has
/// finished or is gone (after a controller restart too), every `every`. Run by the leader.
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
        if let Err(e) = refresh_once(&client, &broker, namespace.as_deref()).await {
            tracing::warn!(error = %e, "cannot list the minted registry credentials");
        }
    }
}

async fn refresh_once(client: &Client, broker: &Broker, namespace: Option<&str>) -> Result<(), kube::Error> {
    let secrets: Api<Secret> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let now = Timestamp::now();
    for s in secrets.list(&ListParams::default().labels(secret::SELECTOR)).await?.items {
        let (ns, name) = (s.namespace().unwrap_or_default(), s.name_any());
        let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let owner =
            s.owner_references().iter().find(|o| o.kind == "Pod").map(|o| (o.name.clone(), o.uid.clone()));
        let pod = match &owner {
            Some((pod, _)) => pods.get_opt(pod).await?,
            None => None,
        };
        let running = pod.as_ref().is_some_and(|p| {
            owner.as_ref().is_some_and(|(_, uid)| p.uid().as_deref() == Some(uid.as_str()))
                && !matches!(
                    p.status.as_ref().and_then(|st| st.phase.as_deref()),
                    Some("Succeeded" | "Failed")
                )
        });
        if !running {
            // Its pod finished or is gone: the credential has nothing left to do.
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {
                    tracing::info!(namespace = %ns, secret = %name, "deleted a minted registry credential")
                }
                Err(e) => {
                    tracing::debug!(namespace = %ns, secret = %name, error = %e, "cannot delete a credential")
                }
            }
            continue;
        }
        if secret::refresh_at(&s).is_some_and(|at| at > now) {
            continue;
        }
        let Some(grants) = secret::grants(&s) else { continue };
        match broker.mint(&ns, &grants, &[]).await {
            Ok(minted) => {
                let Some((pod, uid)) = owner else { continue };
                let body = secret::secret(&ns, &pod, &uid, &grants, &minted);
                let params = PatchParams::apply(super::FIELD_MANAGER).force();
                match api.patch(&name, &params, &Patch::Apply(&body)).await {
                    Ok(_) => {
                        tracing::info!(namespace = %ns, secret = %name, expires_at = %minted.expires_at, "refreshed a minted registry credential")
                    }
                    Err(e) => {
                        tracing::warn!(namespace = %ns, secret = %name, error = %e, "cannot refresh a credential")
                    }
                }
            }
            Err(f) => {
                tracing::warn!(namespace = %ns, secret = %name, reason = %f.reason, "cannot mint a credential again: {}", f.message)
            }
        }
    }
    Ok(())
}
