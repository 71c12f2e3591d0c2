//! `bob run -f imagebuild.yaml`: one ImageBuild on a laptop or in CI, without a cluster. It
//! resolves what the controller would, checks the cache (a hit runs nothing), runs the planned
//! pod's containers as local processes, verifies the digest in the registry and returns the
//! status the controller would write.

pub mod input;
pub mod pod;
pub mod validate;
pub mod world;

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use crate::build::Isolation;
use crate::controller::decide::{Failure, Next, Settings};
use crate::controller::{PlanConfig, Policy, engine, status};
use crate::crd::{ImageBuildStatus, Phase};
use input::Input;
use world::Laptop;

/// The queue time limit when the spec sets none (as the controller's default). A run that has to
/// wait (a Secret, a registry) ends with the waiting status instead; the limit ends a run only
/// through a retry's backoff.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(1800);

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
    /// Repository below which layer caches live, `<repository>/<namespace>/<scope>-<hash>`, when the
    /// ImageBuild names none (unset: a cache only if the ImageBuild names a repository).
    #[arg(long, env = "BOB_LAYER_CACHE_REPOSITORY")]
    pub layer_cache_repository: Option<String>,
    /// How old a cached build step may be and still be reused (buildah's --cache-ttl).
    #[arg(long, env = "BOB_LAYER_CACHE_TTL", default_value = "168h", value_parser = crate::duration::parse)]
    pub layer_cache_ttl: Duration,
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
    /// Building a Dockerfile needs root (buildah).
    #[error("bob run builds Dockerfiles with buildah, which needs root: run it as root (sudo)")]
    NotRoot,
    /// No scratch directory.
    #[error("cannot create a work directory")]
    Work(#[source] std::io::Error),
    /// The decision did not converge (a bug).
    #[error("bob run did not come to a decision")]
    Stuck(#[source] engine::Stuck),
}

/// A run that did not succeed: the status said why, and the exit code says how.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {reason}: {message}")]
pub struct NotSucceeded {
    /// 75 (EX_TEMPFAIL) when the run waits for something (a Secret, a registry: run it again
    /// later), 1 when it failed or was cancelled.
    pub code: u8,
    what: &'static str,
    reason: String,
    message: String,
}

/// `Ok` when the run succeeded, else how it did not.
pub fn outcome(status: &ImageBuildStatus) -> Result<(), NotSucceeded> {
    let (code, what) = match status.phase {
        Some(Phase::Succeeded) => return Ok(()),
        Some(p) if p.is_terminal() => (1, "run failed"),
        _ => (75, "run stopped while waiting (run it again once this is fixed)"),
    };
    let reason = status
        .reason
        .map(|r| r.to_string())
        .unwrap_or_else(|| format!("{:?}", status.phase.unwrap_or_default()));
    Err(NotSucceeded { code, what, reason, message: status.message.clone().unwrap_or_default() })
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
    let docker_config = crate::cloud::ambient::complete(docker_config, &ecr_hosts(&input.image_build)).await;
    let temp = tempfile::Builder::new().prefix("bob-run-").tempdir().map_err(Error::Work)?;
    let work = args.work_dir.clone().unwrap_or_else(|| temp.path().to_path_buf());
    std::fs::create_dir_all(work.join("source")).map_err(Error::Work)?;
    let mut status = ImageBuildStatus::default();
    let job = async {
        let result = execute(&args, &input, Ok(docker_config), &work, &mut status).await;
        (result, status.clone())
    };
    let outcome = crate::process::supervise(STOP_GRACE, job).await;
    let status = match (outcome.value, outcome.signal) {
        (Some((Ok(()), s)), None) => s,
        (Some((Ok(()), s)), Some(_)) if s.phase == Some(Phase::Succeeded) => s,
        (Some((Err(e), _)), None) => return Err(e),
        (value, signal) => {
            // What the run knew when it was stopped (the build's own report, if it made one).
            let known = value.map(|(_, s)| s).unwrap_or_default();
            let tail = known.failure.as_ref().and_then(|f| f.log_tail.clone());
            let message = format!("stopped by {} before the build finished", signal.unwrap_or("a signal"));
            status::cancelled(known, &message, tail, Timestamp::now())
        }
    };
    // Every process that used the work directory has ended (`supervise`): remove it now.
    drop(temp);
    Ok(status)
}

/// Drives the controller's engine on this machine until the ImageBuild is terminal, or waits for
/// something only time or a change elsewhere can bring (then the run ends with that status).
async fn execute(
    args: &RunArgs,
    input: &Input,
    docker_config: Result<String, Failure>,
    work: &Path,
    status: &mut ImageBuildStatus,
) -> Result<(), Error> {
    let mut ib = input.image_build.clone();
    ib.status = Some(status.clone());
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port());
    let plan = PlanConfig {
        proxy_port: port.map_err(Error::Work)?,
        isolation: args.isolation,
        insecure_registries: args.insecure_registries.clone(),
        layer_cache: crate::controller::cache_scope::LayerCacheConfig {
            enabled: true,
            repository: args.layer_cache_repository.clone().filter(|r| !r.trim().is_empty()),
            ttl: args.layer_cache_ttl,
        },
        ..Default::default()
    };
    let settings = Settings {
        plan,
        policy: Policy::default(),
        queue_timeout: QUEUE_TIMEOUT,
        max_concurrent_builds: None,
    };
    let bob = std::env::current_exe().map_err(Error::Work)?;
    let mut laptop = Laptop::new(input, docker_config, &args.insecure_registries, work, bob);
    // Each round is one reconcile; a build needs at most a few (plan and run, then verify), and a
    // retry a few more.
    for _ in 0..4 * settings.policy.max_attempts.max(1) + 4 {
        let t = engine::run(&ib, &settings, &mut laptop, Timestamp::now()).await.map_err(Error::Stuck)?;
        if let Some(s) = t.status {
            *status = s.clone();
            ib.status = Some(s);
        }
        let waiting_for_retry = status.next_attempt_at.is_some() && status.phase == Some(Phase::Pending);
        match (t.next, status.phase) {
            (Next::Change, _) => return Ok(()),
            // The pod ran to its end already: look at it now.
            (Next::After(_), Some(Phase::Building)) => {}
            (Next::After(wait), _) if waiting_for_retry => {
                tracing::info!(seconds = wait.as_secs(), "{}", status.message.as_deref().unwrap_or(""));
                tokio::time::sleep(wait).await;
            }
            // Waiting for a Secret, a registry, ...: a laptop does not wait half an hour.
            (Next::After(_), _) => return Ok(()),
        }
    }
    Err(Error::Stuck(crate::controller::engine::Stuck { need: "more rounds than a build takes".into() }))
}

/// The registries a run touches, with whether it pushes there (the `FROM`s of an inline
/// Dockerfile included; a git Dockerfile's are known only once it is fetched).
fn ecr_hosts(ib: &crate::crd::ImageBuild) -> Vec<(String, bool)> {
    let from = crate::controller::from_images(ib, &Default::default()).ok().flatten().unwrap_or_default();
    crate::cloud::mapping::needs(ib, &from, None).into_iter().map(|n| (n.host, n.push)).collect()
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
