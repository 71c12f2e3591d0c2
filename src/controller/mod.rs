//! `bob controller`: watches ImageBuilds (and the pods they own), and reconciles each one
//! (`reconcile.rs`): observe (`observe.rs`, reads only) → decide (`decide.rs`, pure) → act
//! (`act.rs`, every write). `bob run` drives the same decision on its own world (`local/`).

pub mod access;
pub mod act;
pub mod cache_scope;
pub mod cloud;
mod containers;
pub mod decide;
pub mod engine;
pub mod ha;
pub mod logship;
pub mod metrics;
pub mod observe;
pub mod placement;
pub mod plan;
pub mod pod;
pub mod policy;
pub mod queue;
pub mod reconcile;
pub mod resolve;
pub mod status;
pub mod step;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;

pub use decide::Settings;
use metrics::{Metrics, ReasonLabel, StatusLabel};
pub use plan::{
    BuildSecurity, CachePlan, Invalid, LayerCacheConfig, Plan, PlanConfig, Resolved, from_images, plan,
};
pub use policy::Policy;

use crate::build::Isolation;
use crate::crd::ImageBuild;
use crate::duration;
use crate::kubeclient;
use crate::oci::CredentialStore;
use crate::oci::client::Client;

/// Registry clients kept between reconciles (one per Secret version or minted credential).
const MAX_REGISTRY_CLIENTS: usize = 512;

/// The field manager of everything the controller writes.
pub const FIELD_MANAGER: &str = "bob-controller";

/// The label selector of the build pods bob manages (the pods it watches and counts).
pub const LABEL_MANAGED_BUILD_PODS: &str =
    "app.kubernetes.io/managed-by=bob,app.kubernetes.io/component=build";

/// Why a reconcile ended without a status: every other outcome, failures included, is a status
/// (`decide.rs`). Only the status write itself can fail this way, and it is retried.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing the status failed (the API server is unreachable or refused it).
    #[error("cannot write the status")]
    StatusWrite(#[source] kube::Error),
    /// A write the new status depends on failed (an owner, a credential, an unsafe pod's
    /// delete): the status is not written, and the next reconcile decides the same again.
    #[error("cannot carry out the decision")]
    Act(#[source] kube::Error),
    /// The decision asked for the same thing twice (a bug).
    #[error("the reconcile did not come to a decision: it asked for {0} again")]
    Stuck(String),
    /// This replica may no longer act as the leader (`ha::Leadership`): nothing was written;
    /// the next leader reconciles the ImageBuild again.
    #[error("not written")]
    NotLeading(#[from] ha::NotLeading),
}

impl Error {
    /// A bounded label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Error::StatusWrite(_) => "status_write",
            Error::Act(_) => "act",
            Error::Stuck(_) => "stuck",
            Error::NotLeading(_) => "not_leading",
        }
    }
}

/// Why the controller could not start, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No Kubernetes client (no kubeconfig, no in-cluster service account).
    #[error("cannot reach the Kubernetes API")]
    Client(#[source] crate::kubeclient::Error),
    /// The CRD is not installed.
    #[error("the ImageBuild CRD is not installed (bob crd | kubectl apply -f -)")]
    NoCrd(#[source] kube::Error),
    /// The API server did not answer the first list of ImageBuilds (after the client's retries).
    #[error("cannot list ImageBuilds")]
    Unreachable(#[source] kube::Error),
    /// Leader election failed.
    #[error("leader election failed")]
    Lease(#[source] kube_lease_manager::LeaseManagerError),
    /// The lease manager stopped while this replica waited to lead.
    #[error("leader election stopped")]
    LeaseStopped,
    /// The registry mapping of the cloud identity cannot be used.
    #[error("cloud registry credentials")]
    Cloud(#[source] cloud::StartError),
    /// The admin address cannot be bound.
    #[error("cannot listen on {addr}")]
    Admin {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// `bob controller` options.
#[derive(clap::Args, Clone, Debug)]
pub struct ControllerArgs {
    /// The bob image that build pods run (proxy, clone and build containers).
    #[arg(long, env = "BOB_IMAGE", default_value = concat!("ghcr.io/bob-dev/bob:", env!("CARGO_PKG_VERSION")))]
    pub image: String,
    /// Privileges of the build container: user-namespace, capabilities or privileged.
    #[arg(long, env = "BOB_BUILD_SECURITY", value_enum, default_value = "user-namespace")]
    pub security: BuildSecurity,
    /// Namespaces whose Dockerfile builds may run in the capabilities or privileged mode, comma
    /// separated; `*` is every namespace. Elsewhere such a build fails with PolicyDenied.
    /// Ignored in the user-namespace mode, which any namespace may use.
    #[arg(long, env = "BOB_BUILD_SECURITY_NAMESPACES", value_delimiter = ',', default_value = "*")]
    pub build_security_namespaces: Vec<String>,
    /// Node labels ImageBuilds may select in spec.pod.nodeSelector, comma separated: `key` (any
    /// value), `key=value`, or `*` (any). Default none: build pods go where the scheduler puts them.
    #[arg(long, env = "BOB_ALLOWED_NODE_SELECTORS", value_delimiter = ',')]
    pub allowed_node_selectors: Vec<placement::SelectorRule>,
    /// Tolerations ImageBuilds may set in spec.pod.tolerations, comma separated, in kubectl taint
    /// syntax: `key`, `key=value`, `key:Effect`, `key=value:Effect`, or `*` (any, including an
    /// Exists toleration without a key, which tolerates every taint). Default none.
    #[arg(long, env = "BOB_ALLOWED_TOLERATIONS", value_delimiter = ',')]
    pub allowed_tolerations: Vec<placement::TolerationRule>,
    /// Isolation of RUN steps in build pods: `chroot`, or `oci` (runc in the image).
    #[arg(long, env = "BOB_ISOLATION", value_enum, default_value = "chroot")]
    pub isolation: Isolation,
    /// Build time limit when an ImageBuild sets none.
    #[arg(long, env = "BOB_BUILD_TIMEOUT", default_value = "1h", value_parser = duration::parse)]
    pub build_timeout: Duration,
    /// How long an ImageBuild may wait to start (missing Secret, registry down) when it sets none.
    #[arg(long, env = "BOB_QUEUE_TIMEOUT", default_value = "30m", value_parser = duration::parse)]
    pub queue_timeout: Duration,
    /// Registries (host or host:port) spoken to over plain HTTP besides loopback ones.
    #[arg(long = "insecure-registry", env = "BOB_INSECURE_REGISTRIES", value_delimiter = ',')]
    pub insecure_registries: Vec<String>,
    /// Repository below which layer caches live, `<repository>/<namespace>/<scope>-<hash>`, for
    /// ImageBuilds that name none (unset: only ImageBuilds that name one have a layer cache).
    #[arg(long, env = "BOB_LAYER_CACHE_REPOSITORY")]
    pub layer_cache_repository: Option<String>,
    /// The layer cache's global switch: `false` builds every ImageBuild without it.
    #[arg(long, env = "BOB_LAYER_CACHE_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub layer_cache_enabled: bool,
    /// How old a cached build step may be and still be reused (buildah's --cache-ttl).
    #[arg(long, env = "BOB_LAYER_CACHE_TTL", default_value = "168h", value_parser = duration::parse)]
    pub layer_cache_ttl: Duration,
    /// Watch only this namespace [default: all].
    #[arg(long, env = "BOB_WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Build pods per generation at most: infrastructure failures are retried up to this.
    #[arg(long, env = "BOB_MAX_ATTEMPTS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=10))]
    pub max_attempts: u32,
    /// Wait before the first retry; doubles per attempt (at most 5m).
    #[arg(long, env = "BOB_RETRY_BACKOFF", default_value = "10s", value_parser = duration::parse)]
    pub retry_backoff: Duration,
    /// Keep finished build pods instead of deleting them once their evidence is in status.
    #[arg(long, env = "BOB_KEEP_FINISHED_PODS")]
    pub keep_finished_pods: bool,
    /// How long build logs (BuildLog objects) are kept; an ImageBuild's go with it anyway.
    #[arg(long, env = "BOB_LOG_RETENTION", default_value = "168h", value_parser = duration::parse)]
    pub log_retention: Duration,
    /// Build pods that may run at once, cluster-wide; more ImageBuilds wait Queued (0: no limit).
    #[arg(long, env = "BOB_MAX_CONCURRENT_BUILDS", default_value_t = 20)]
    pub max_concurrent_builds: usize,
    /// ImageBuilds reconciled at once (bounds API, registry and memory load).
    #[arg(long, env = "BOB_WORKERS", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=512))]
    pub workers: u16,
    /// Elect a leader among replicas through a Lease, so only one reconciles.
    #[arg(long, env = "BOB_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Namespace of the leader Lease (in a cluster: the controller's own namespace).
    #[arg(long, env = "BOB_LEASE_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// Which namespaces may use the controller's cloud identity for which registry repositories,
    /// as a JSON list of entries (chart value `cloudIdentity.registries`; docs/credentials.md).
    /// Empty: no credential is ever minted; builds use the Secret they name.
    #[arg(long, env = "BOB_CLOUD_REGISTRIES", default_value = "[]")]
    pub cloud_registries: String,
    /// How long a minted build credential's cloud session lasts (15m to 1h: AWS caps a session
    /// assumed from a role session at an hour). It is refreshed at half its lifetime.
    #[arg(long, env = "BOB_CLOUD_SESSION_DURATION", default_value = "1h", value_parser = duration::parse)]
    pub cloud_session_duration: Duration,
    /// How often the minted credentials of running build pods are checked for refresh, and
    /// those of finished pods deleted.
    #[arg(long, env = "BOB_CLOUD_REFRESH_INTERVAL", default_value = "30s", value_parser = duration::parse)]
    pub cloud_refresh_interval: Duration,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "BOB_ADMIN_ADDR", default_value = "0.0.0.0:9090")]
    pub admin_addr: String,
}

/// What every reconcile shares.
pub struct Context {
    /// The Kubernetes client.
    pub client: kube::Client,
    /// What decisions use: the plan's settings, retries, queue limits.
    pub settings: Settings,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Events on the ImageBuilds.
    pub recorder: Recorder,
    /// The controller's cache of ImageBuilds (the queue's order); `None` outside a Controller.
    pub store: Option<Store<ImageBuild>>,
    /// The build logs being shipped.
    pub logs: logship::Shipper,
    /// Credentials minted from the controller's cloud identity (`None`: off).
    pub cloud: Option<Arc<cloud::Broker>>,
    /// Whether this replica still holds the leader Lease for sure (`None`: no leader election).
    pub leadership: Option<ha::Leadership>,
    registries: Mutex<HashMap<String, Arc<Client>>>,
}

impl Context {
    /// A context for `client`.
    pub fn new(client: kube::Client, plan: PlanConfig, queue_timeout: Duration, policy: Policy) -> Self {
        Self::with_settings(client, Settings { plan, policy, queue_timeout, max_concurrent_builds: None })
    }

    /// A context for `client` with these settings.
    pub fn with_settings(client: kube::Client, settings: Settings) -> Self {
        let reporter =
            Reporter { controller: FIELD_MANAGER.into(), instance: std::env::var("HOSTNAME").ok() };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            metrics: Arc::default(),
            store: None,
            logs: logship::Shipper::default(),
            cloud: None,
            leadership: None,
            registries: Mutex::default(),
        }
    }

    /// Whether this replica may write now: always without leader election, else while the
    /// Lease it renewed cannot have passed to another replica. Checked before every write.
    pub fn may_act(&self) -> bool {
        self.leadership.as_ref().is_none_or(ha::Leadership::may_act)
    }

    /// [`Context::may_act`] as an error, for the writers' `?` (it converts to kube's errors).
    pub fn leading(&self) -> Result<(), ha::NotLeading> {
        if self.may_act() { Ok(()) } else { Err(ha::NotLeading) }
    }

    /// The registry client for a docker config, cached under `key` (Secret and resourceVersion),
    /// so token caches and connections survive between reconciles. A config that is not a docker
    /// config is `SecretInvalid`.
    pub fn registry(&self, key: &str, docker_config: &str) -> Result<Arc<Client>, decide::Failure> {
        let mut cache = self.registries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.get(key) {
            return Ok(c.clone());
        }
        let creds = CredentialStore::inline(docker_config).map_err(|e| {
            decide::Failure::new(crate::reason::Reason::SecretInvalid, crate::oci::error::chain(&e))
        })?;
        let metrics = self.metrics.clone();
        let observer: crate::oci::transport::Observer = Arc::new(move |status| {
            metrics.registry_requests.get_or_create(&StatusLabel::of(status)).inc();
        });
        let timeout = Duration::from_secs(30);
        let insecure = &self.settings.plan.insecure_registries;
        let client = Client::connect(creds, insecure, timeout, Some(observer)).map_err(|e| {
            decide::Failure::new(crate::reason::Reason::Internal, crate::oci::error::chain(&e))
        })?;
        let client = Arc::new(client);
        // A Secret's new resourceVersion (a credential's new mint) replaces its old entry.
        let prefix = key.split('@').next().unwrap_or_default().to_string();
        cache.retain(|k, _| k.split('@').next() != Some(prefix.as_str()) || prefix.is_empty());
        if cache.len() >= MAX_REGISTRY_CLIENTS {
            // Minted credentials make a key per set of grants: start over rather than grow.
            cache.clear();
        }
        cache.insert(key.to_string(), client.clone());
        Ok(client)
    }
}

/// The Controller's settings: `workers` reconciles at once. No debounce: a new ImageBuild is
/// reconciled at once (a cache hit must not wait), and bursts of pod updates still coalesce —
/// the runtime never runs two reconciles of one object at once and keeps at most one pending.
pub fn controller_config(workers: u16) -> kube::runtime::controller::Config {
    kube::runtime::controller::Config::default().concurrency(workers)
}

/// Requeues after a failed reconcile; the error is logged with its bounded label.
pub fn error_policy(ib: Arc<ImageBuild>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_errors.get_or_create(&ReasonLabel { reason: error.label().into() }).inc();
    tracing::warn!(imagebuild = %kube::ResourceExt::name_any(ib.as_ref()), error = %crate::oci::error::chain(error), label = error.label(), "reconcile failed");
    Action::requeue(Duration::from_secs(15))
}

/// Runs the controller until SIGTERM/SIGINT.
pub async fn run(args: ControllerArgs) -> Result<(), StartError> {
    let metrics = Arc::new(Metrics::default());
    let retries: kubeclient::Observer = {
        let metrics = metrics.clone();
        Arc::new(move |o: &kubeclient::Outcome| {
            metrics.api_retries.get_or_create(&ReasonLabel { reason: o.label().into() }).inc();
        })
    };
    let config = kubeclient::config().await.map_err(StartError::Client)?;
    let client = kubeclient::client_for(config.clone(), kubeclient::Agent::Controller, Some(retries.clone()))
        .map_err(StartError::Client)?;
    let (builds, pods): (Api<ImageBuild>, Api<Pod>) = match &args.namespace {
        Some(ns) => (Api::namespaced(client.clone(), ns), Api::namespaced(client.clone(), ns)),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    // Only a 404 says the CRD is missing; anything else is the API server not answering.
    builds.list(&ListParams::default().limit(1)).await.map_err(|e| match e {
        kube::Error::Api(ref s) if s.code == 404 => StartError::NoCrd(e),
        e => StartError::Unreachable(e),
    })?;
    let plan = PlanConfig {
        image: args.image.clone(),
        build_timeout: args.build_timeout,
        security: args.security,
        placement: placement::Placement::new(
            &args.allowed_node_selectors,
            &args.allowed_tolerations,
            &args.build_security_namespaces,
        ),
        isolation: args.isolation,
        insecure_registries: args.insecure_registries.clone(),
        layer_cache: plan::LayerCacheConfig {
            enabled: args.layer_cache_enabled,
            repository: args.layer_cache_repository.clone().filter(|r| !r.trim().is_empty()),
            ttl: args.layer_cache_ttl,
        },
        ..Default::default()
    };
    let policy = Policy {
        max_attempts: args.max_attempts,
        retry_backoff: args.retry_backoff,
        keep_finished_pods: args.keep_finished_pods,
    };
    let controller = Controller::new(builds, watcher::Config::default())
        .owns(pods, watcher::Config::default().labels(pod::BUILD_POD_SELECTOR))
        .with_config(controller_config(args.workers));
    let max_concurrent_builds = (args.max_concurrent_builds > 0).then_some(args.max_concurrent_builds);
    let settings = Settings { plan, policy, queue_timeout: args.queue_timeout, max_concurrent_builds };
    let broker = cloud::Broker::new(&args.cloud_registries, args.cloud_session_duration)
        .await
        .map_err(StartError::Cloud)?
        .map(Arc::new);
    let mut ctx = Context::with_settings(client, settings);
    ctx.metrics = metrics;
    ctx.store = Some(controller.store());
    ctx.cloud = broker;
    ctx.leadership = args.leader_election.then(|| ha::Leadership::new(ha::DURATION - ha::MARGIN));
    let ctx = Arc::new(ctx);
    let listener = tokio::net::TcpListener::bind(&args.admin_addr)
        .await
        .map_err(|source| StartError::Admin { addr: args.admin_addr.clone(), source })?;
    let admin = metrics::router(ctx.metrics.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, admin).await {
            tracing::error!(error = %e, "admin server stopped");
        }
    });
    // Ready while standing by too: a rolling update must not wait for a replica to lead.
    ctx.metrics.ready.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut lease_task = None;
    let lost: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + Sync>> =
        if let Some(leadership) = ctx.leadership.clone() {
            let identity =
                std::env::var("HOSTNAME").unwrap_or_else(|_| format!("bob-{}", std::process::id()));
            let (leading, task) =
                ha::lead(config, &args.lease_namespace, &identity, &leadership, Some(retries)).await?;
            lease_task = Some(task);
            // Lost as the lease manager says it, or not renewed in time, which it does not say.
            Box::pin(async move {
                tokio::select! {
                    _ = ha::lost(leading) => {}
                    _ = ha::unrenewed(leadership) => {}
                }
            })
        } else {
            Box::pin(futures::future::pending())
        };
    ctx.metrics.leader.set(1);
    // The leader alone deletes expired build logs.
    let sweeper =
        tokio::spawn(logship::sweep(ctx.client.clone(), args.namespace.clone(), args.log_retention));
    // The leader alone refreshes minted credentials and deletes those of finished pods.
    let refresher = ctx.cloud.clone().map(|broker| {
        tokio::spawn(cloud::refresh(
            ctx.client.clone(),
            broker,
            args.namespace.clone(),
            args.cloud_refresh_interval,
        ))
    });
    tracing::info!(image = %args.image, namespace = ?args.namespace, admin = %args.admin_addr, "bob controller started");
    controller
        .shutdown_on_signal()
        .graceful_shutdown_on(lost)
        .run(reconcile::reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %crate::oci::error::chain(&e), "controller event");
            }
        })
        .await;
    sweeper.abort();
    if let Some(r) = refresher {
        r.abort();
    }
    // The controller (and with it the leadership channel) is gone: let the lease be released.
    if let Some(task) = lease_task {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    Ok(())
}
