//! `bob controller`: watches ImageBuilds (and the pods they own), and reconciles each one as
//! named steps (`reconcile.rs`) around a pure middle (`plan.rs`, `pod.rs`, `status.rs`).
//! `bob run` uses the same planning code without a cluster.

pub mod plan;
pub mod pod;
pub mod reconcile;
pub mod resolve;
pub mod status;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;

pub use plan::{BuildSecurity, Invalid, Plan, PlanConfig, Resolved, from_images, plan};

use crate::build::Isolation;
use crate::cli::parse_duration;
use crate::crd::ImageBuild;
use crate::oci::CredentialStore;
use crate::oci::client::Client;

/// The field manager of everything the controller writes.
pub const FIELD_MANAGER: &str = "bob-controller";

/// Why a reconcile (or the controller) failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API refused or failed a call.
    #[error("kubernetes api call failed")]
    Kube(#[source] kube::Error),
    /// A registry Secret is not a docker config, or the client cannot be built.
    #[error("cannot build a registry client")]
    Registry(#[source] crate::copy::Error),
    /// No scratch directory for resolving a git source.
    #[error("cannot create a scratch directory")]
    Scratch(#[source] std::io::Error),
    /// The CRD is not installed.
    #[error("the ImageBuild CRD is not installed (bob crd | kubectl apply -f -)")]
    NoCrd(#[source] kube::Error),
    /// A state that should not happen.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl Error {
    /// A bounded label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Registry(_) => "registry",
            Error::Scratch(_) => "scratch",
            Error::NoCrd(_) => "no_crd",
            Error::Internal(_) => "internal",
        }
    }
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
    /// Isolation of RUN steps in build pods: `chroot`, or `oci` (runc in the image).
    #[arg(long, env = "BOB_ISOLATION", value_enum, default_value = "chroot")]
    pub isolation: Isolation,
    /// Build time limit when an ImageBuild sets none.
    #[arg(long, env = "BOB_BUILD_TIMEOUT", default_value = "1h", value_parser = parse_duration)]
    pub build_timeout: Duration,
    /// How long an ImageBuild may wait to start (missing Secret, registry down) when it sets none.
    #[arg(long, env = "BOB_QUEUE_TIMEOUT", default_value = "30m", value_parser = parse_duration)]
    pub queue_timeout: Duration,
    /// Registries (host or host:port) spoken to over plain HTTP besides loopback ones.
    #[arg(long = "insecure-registry", env = "BOB_INSECURE_REGISTRIES", value_delimiter = ',')]
    pub insecure_registries: Vec<String>,
    /// Watch only this namespace [default: all].
    #[arg(long, env = "BOB_WATCH_NAMESPACE")]
    pub namespace: Option<String>,
}

/// What every reconcile shares.
pub struct Context {
    /// The Kubernetes client.
    pub client: kube::Client,
    /// Installation settings of the plan.
    pub plan: PlanConfig,
    /// Default queue time limit.
    pub queue_timeout: Duration,
    insecure: Vec<String>,
    registries: Mutex<HashMap<String, Arc<Client>>>,
}

impl Context {
    /// A context for `client`.
    pub fn new(
        client: kube::Client,
        plan: PlanConfig,
        queue_timeout: Duration,
        insecure: Vec<String>,
    ) -> Self {
        Self { client, plan, queue_timeout, insecure, registries: Mutex::default() }
    }

    /// The registry client for a docker config, cached under `key` (Secret and resourceVersion),
    /// so token caches and connections survive between reconciles.
    pub fn registry(&self, key: &str, docker_config: &str) -> Result<Arc<Client>, Error> {
        let mut cache = self.registries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.get(key) {
            return Ok(c.clone());
        }
        let creds = CredentialStore::inline(docker_config)
            .map_err(|e| Error::Registry(crate::copy::Error::Credentials(e)))?;
        let client = Arc::new(
            crate::copy::client(creds, &self.insecure, Duration::from_secs(30)).map_err(Error::Registry)?,
        );
        // A Secret's new resourceVersion replaces its old entry.
        let prefix = key.split('@').next().unwrap_or_default().to_string();
        cache.retain(|k, _| k.split('@').next() != Some(prefix.as_str()) || prefix.is_empty());
        cache.insert(key.to_string(), client.clone());
        Ok(client)
    }
}

/// Requeues after a failed reconcile; the error is logged with its bounded label.
pub fn error_policy(ib: Arc<ImageBuild>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(imagebuild = %kube::ResourceExt::name_any(ib.as_ref()), error = %crate::oci::error::chain(error), label = error.label(), "reconcile failed");
    Action::requeue(Duration::from_secs(15))
}

/// Runs the controller until SIGTERM/SIGINT.
pub async fn run(args: ControllerArgs) -> Result<(), Error> {
    let client = kube::Client::try_default().await.map_err(Error::Kube)?;
    let (builds, pods): (Api<ImageBuild>, Api<Pod>) = match &args.namespace {
        Some(ns) => (Api::namespaced(client.clone(), ns), Api::namespaced(client.clone(), ns)),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    builds.list(&ListParams::default().limit(1)).await.map_err(Error::NoCrd)?;
    let plan = PlanConfig {
        image: args.image.clone(),
        build_timeout: args.build_timeout,
        security: args.security,
        isolation: args.isolation,
        insecure_registries: args.insecure_registries.clone(),
        ..Default::default()
    };
    let ctx = Arc::new(Context::new(client, plan, args.queue_timeout, args.insecure_registries.clone()));
    tracing::info!(image = %args.image, namespace = ?args.namespace, "bob controller started");
    Controller::new(builds, watcher::Config::default())
        .owns(pods, watcher::Config::default().labels("app.kubernetes.io/managed-by=bob"))
        .shutdown_on_signal()
        .run(reconcile::reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %crate::oci::error::chain(&e), "controller event");
            }
        })
        .await;
    Ok(())
}
