//! `bob run -f imagebuild.yaml`: one ImageBuild on a laptop or in CI, without a cluster. It
//! resolves what the controller would, checks the cache (a hit runs nothing), runs the planned
//! pod's containers as local processes, verifies the digest in the registry and returns the
//! status the controller would write.

pub mod input;
pub mod pod;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::build::{BuildResult, Isolation};
use crate::controller::resolve::{self, GitAuth};
use crate::controller::{PlanConfig, plan, status};
use crate::crd::{BuildFailure, ImageBuildStatus, ImageRef, Phase};
use crate::oci::client::Client;
use crate::oci::{CredentialStore, reference};
use crate::reason::Reason;
use input::Input;

/// `bob run` options.
#[derive(clap::Args, Clone, Debug)]
pub struct RunArgs {
    /// The ImageBuild YAML (it may also hold the Secrets it names).
    #[arg(short = 'f', long = "file", env = "BOB_RUN_FILE")]
    pub file: PathBuf,
    /// Docker config with registry credentials, when the file holds no registry Secret
    /// [default: $DOCKER_CONFIG/config.json, else ~/.docker/config.json, else anonymous].
    #[arg(long, env = "REGISTRY_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,
    /// Registries (host or host:port) spoken to over plain HTTP besides loopback ones.
    #[arg(long = "insecure-registry", env = "BOB_INSECURE_REGISTRIES", value_delimiter = ',')]
    pub insecure_registries: Vec<String>,
    /// Isolation of RUN steps: `chroot`, or `oci` (runc).
    #[arg(long, env = "BOB_ISOLATION", value_enum, default_value = "chroot")]
    pub isolation: Isolation,
    /// Keep the pod's volumes and logs in this directory instead of a temporary one.
    #[arg(long, env = "BOB_RUN_WORK_DIR")]
    pub work_dir: Option<PathBuf>,
}

/// Why `bob run` could not even start (everything after start-up ends in a status).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file is unusable.
    #[error(transparent)]
    Input(#[from] input::Error),
    /// The credentials cannot be read.
    #[error("cannot read registry credentials")]
    Credentials(#[source] crate::oci::credentials::Error),
    /// The registry client cannot be built.
    #[error("cannot build the registry client")]
    Client(#[source] crate::oci::transport::Error),
    /// Building a Dockerfile needs root (buildah).
    #[error("bob run builds Dockerfiles with buildah, which needs root: run it as root (sudo)")]
    NotRoot,
    /// No scratch directory.
    #[error("cannot create a work directory")]
    Work(#[source] std::io::Error),
}

/// How long the pod's containers get to end when `bob run` is stopped (SIGTERM, SIGINT) before
/// everything left is killed: longer than `bob build`'s own grace, so the build can end its
/// engine and report.
pub const STOP_GRACE: Duration = Duration::from_secs(20);

/// Runs the ImageBuild of `args.file`; the status says how it ended. SIGTERM or SIGINT ends the
/// pod's containers and everything below them and returns a `Cancelled` status; the work
/// directory is removed (unless `--work-dir` names it) after every process that used it ended.
pub async fn run(args: RunArgs) -> Result<ImageBuildStatus, Error> {
    let input = Input::read(&args.file)?;
    let ib = &input.image_build;
    if ib.spec.source.dockerfile.is_some() && !rustix::process::geteuid().is_root() {
        return Err(Error::NotRoot);
    }
    let docker_config = registry_config(&input, args.auth_file.as_ref())?;
    let creds = CredentialStore::inline(&docker_config).map_err(Error::Credentials)?;
    let timeout = std::time::Duration::from_secs(120);
    let client = crate::oci::client::Client::connect(creds, &args.insecure_registries, timeout, None)
        .map_err(Error::Client)?;
    let temp = tempfile::Builder::new().prefix("bob-run-").tempdir().map_err(Error::Work)?;
    let work = args.work_dir.clone().unwrap_or_else(|| temp.path().to_path_buf());
    std::fs::create_dir_all(work.join("source")).map_err(Error::Work)?;
    let pending = ImageBuildStatus {
        phase: Some(Phase::Pending),
        observed_generation: ib.metadata.generation,
        start_time: Some(Time(Timestamp::now())),
        ..Default::default()
    };
    let job = execute(&args, &input, &client, &docker_config, &work, pending.clone());
    let outcome = crate::process::supervise(STOP_GRACE, job).await;
    let status = match (outcome.value, outcome.signal) {
        (Some(Ok(s)), None) => s,
        (Some(Ok(s)), Some(_)) if s.phase == Some(Phase::Succeeded) => s,
        (Some(Err(e)), None) => return Err(e),
        (value, signal) => {
            // What the run knew when it was stopped (the build's own report, if it made one).
            let known = value.and_then(Result::ok).unwrap_or(pending);
            let tail = known.failure.as_ref().and_then(|f| f.log_tail.clone());
            let message = format!("stopped by {} before the build finished", signal.unwrap_or("a signal"));
            status::cancelled(known, &message, tail, Timestamp::now())
        }
    };
    // Every process that used the work directory has ended (`supervise`): remove it now.
    drop(temp);
    Ok(status)
}

/// Resolves, plans and runs the build in `work`, from the `status` so far.
async fn execute(
    args: &RunArgs,
    input: &Input,
    client: &Client,
    docker_config: &str,
    work: &Path,
    mut status: ImageBuildStatus,
) -> Result<ImageBuildStatus, Error> {
    let ib = &input.image_build;
    let git_auth = git_auth(input);
    let resolved = match resolve::resolve(ib, client, git_auth.as_ref(), &work.join("source")).await {
        Ok(r) => r,
        Err(e) => return Ok(failed(status, e.reason, e.message, None)),
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port());
    let cfg = PlanConfig {
        proxy_port: port.map_err(Error::Work)?,
        isolation: args.isolation,
        ..Default::default()
    };
    let planned = match plan(ib, &resolved, &cfg) {
        Ok(p) => p,
        Err(e) => return Ok(failed(status, e.reason(), e.to_string(), None)),
    };
    status.cache_key = planned.key.clone();
    status.base_image = Some(ImageRef::new(&planned.base_ref, resolved.image_digest.clone()));
    let workspace = reference::parse(&planned.workspace_ref).expect("planned refs are checked refs");
    if !ib.spec.force_rebuild
        && let Ok(Some(digest)) = client.manifest_digest(&workspace).await
    {
        status.cache_hit = Some(true);
        status.output = Some(ImageRef::new(&planned.workspace_ref, Some(digest)));
        return Ok(succeeded(status, Reason::CacheHit, "the workspace image exists; nothing was built"));
    }
    status.cache_hit = Some(false);
    status.phase = Some(Phase::Building);
    status.pod_name = planned.pod.metadata.name.clone();
    status.attempts = Some(1);
    tracing::info!(base = %planned.base_ref, workspace = %planned.workspace_ref, "building");

    let mut secrets = input.secrets.clone();
    if let Some(auth) = &ib.spec.registry_auth {
        secrets
            .entry(auth.secret_ref.name.clone())
            .or_insert_with(|| BTreeMap::from([(".dockerconfigjson".into(), docker_config.to_string())]));
    }
    let bob = std::env::current_exe().map_err(Error::Work)?;
    let outcome = match pod::run(&planned.pod, &secrets, &bob, work).await {
        Ok(o) => o,
        Err(e) => return Ok(failed(status, Reason::InvalidSpec, crate::oci::error::chain(&e), None)),
    };
    if let Some((container, why)) = outcome.failed {
        let reason = if container == "clone" { Reason::SourceFetchFailed } else { Reason::Internal };
        return Ok(failed(status, reason, format!("container {container} {why}"), Some(container)));
    }
    let result: Option<BuildResult> =
        outcome.termination_message.as_deref().and_then(|m| serde_json::from_str(m).ok());
    let Some(result) = result else {
        return Ok(failed(
            status,
            Reason::Internal,
            "the build container wrote no result".into(),
            Some("build".into()),
        ));
    };
    if let Some(reason) = result.reason {
        let mut s = failed(status, reason, result.message.clone().unwrap_or_default(), Some("build".into()));
        if let Some(f) = s.failure.as_mut() {
            f.log_tail = result.log_tail;
        }
        return Ok(s);
    }
    status.phase = Some(Phase::Verifying);
    if let Some(base) = status.base_image.as_mut() {
        *base = ImageRef::new(&planned.base_ref, result.base_digest.clone());
    }
    match client.manifest_digest(&workspace).await {
        Ok(Some(d)) if Some(&d) == result.target_digest.as_ref() => {
            status.output = Some(ImageRef::new(&planned.workspace_ref, Some(d)));
            Ok(succeeded(status, Reason::Built, "built and verified in the registry"))
        }
        other => {
            let found = match other {
                Ok(Some(d)) => format!("digest {d}"),
                Ok(None) => "nothing".into(),
                Err(e) => crate::oci::error::chain(&e),
            };
            let want = result.target_digest.unwrap_or_default();
            let msg = format!(
                "the build reported {want} but the registry has {found} at {}",
                planned.workspace_ref
            );
            Ok(failed(status, Reason::VerifyFailed, msg, None))
        }
    }
}

/// The docker config the run uses: the file's registry Secret, else a local one, else none;
/// each at most `bounded::DOCKER_CONFIG`.
fn registry_config(input: &Input, auth_file: Option<&PathBuf>) -> Result<String, Error> {
    use crate::oci::credentials;
    if let Some(auth) = &input.image_build.spec.registry_auth
        && let Some(json) = input.secret_value(&auth.secret_ref.name, ".dockerconfigjson")
    {
        let name = format!("Secret {}/.dockerconfigjson", auth.secret_ref.name);
        crate::bounded::check(&name, json, crate::bounded::DOCKER_CONFIG)
            .map_err(|e| Error::Credentials(e.into()))?;
        return Ok(json.to_string());
    }
    match auth_file.cloned().or_else(credentials::default_docker_config) {
        Some(p) => credentials::read_text(&p).map_err(Error::Credentials),
        None => Ok("{}".into()),
    }
}

fn git_auth(input: &Input) -> Option<GitAuth> {
    let git = input.image_build.spec.source.dockerfile.as_ref()?.git.as_ref()?;
    let name = &git.credentials_secret_ref.as_ref()?.name;
    Some(GitAuth {
        username: input.secret_value(name, "username")?.to_string(),
        password: crate::oci::Secret::new(input.secret_value(name, "password")?),
    })
}

fn succeeded(s: ImageBuildStatus, reason: Reason, message: &str) -> ImageBuildStatus {
    status::succeeded(s, reason, message, Timestamp::now())
}

fn failed(
    s: ImageBuildStatus,
    reason: Reason,
    message: String,
    container: Option<String>,
) -> ImageBuildStatus {
    status::failed(s, BuildFailure { reason, message, container, log_tail: None }, Timestamp::now())
}
