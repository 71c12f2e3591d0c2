//! `bob build`, the build pod's main container: phase 1 builds the base image from a Dockerfile
//! with the engine and pushes it to the proxy's `base` alias (skipped when the base exists),
//! phase 2 copies the base to the `target` alias. It has no credentials: everything goes
//! through `bob proxy` on loopback. The result is one JSON line (see `result.rs`).

pub mod base;
pub mod cache;
pub mod dockerfile;
pub mod engine;
pub mod history;
pub mod output;
pub mod result;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::duration;
use crate::oci::client::{Client, Kind};
use crate::oci::{CredentialStore, Reference, reference};
use crate::reason::Reason;
pub use engine::Isolation;
pub use result::BuildResult;

/// A failed build: the reason, one line, and what the engine said.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct Failure {
    /// The class.
    pub reason: Reason,
    /// One line that says what failed and what to fix.
    pub message: String,
    /// The failing step.
    pub step: Option<String>,
    /// The step's exit code.
    pub exit_code: Option<i32>,
    /// The last lines of the engine's output.
    pub log_tail: Option<String>,
}

impl Failure {
    /// A failure with a reason and a message only.
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self { reason, message: message.into(), step: None, exit_code: None, log_tail: None }
    }
}

/// `bob build` options; the build pod sets them through the environment.
#[derive(clap::Args, Clone, Debug)]
pub struct BuildArgs {
    /// Address of `bob proxy` (everything is pushed and pulled through it).
    #[arg(long, env = "BOB_PROXY_ADDR", default_value = "127.0.0.1:8080")]
    pub proxy_addr: String,
    /// Proxy-local ref of the base image [default: <proxy>/base:latest].
    #[arg(long, env = "BOB_BASE_REF")]
    pub base_ref: Option<String>,
    /// Proxy-local ref of the workspace image [default: <proxy>/target:latest].
    #[arg(long, env = "BOB_TARGET_REF")]
    pub target_ref: Option<String>,
    /// Run phase 1 (build the base from the Dockerfile): `true` for Dockerfile sources.
    #[arg(long, env = "BOB_BUILD_BASE", default_value_t = false, action = clap::ArgAction::Set)]
    pub build_base: bool,
    /// Run phase 1 even when the base image exists (`spec.forceRebuild`: refresh what `RUN`
    /// steps fetch).
    #[arg(long, env = "BOB_FORCE_BUILD", default_value_t = false, action = clap::ArgAction::Set)]
    pub force_build: bool,
    /// The Dockerfile.
    #[arg(long, env = "BOB_DOCKERFILE_PATH")]
    pub dockerfile: Option<PathBuf>,
    /// The build context [default: the Dockerfile's directory].
    #[arg(long, env = "BOB_CONTEXT_DIR")]
    pub context: Option<PathBuf>,
    /// Build arguments as a JSON object of strings.
    #[arg(long, env = "BOB_BUILD_ARGS", default_value = "{}")]
    pub build_args: String,
    /// Target stage of a multi-stage Dockerfile.
    #[arg(long, env = "BOB_BUILD_TARGET")]
    pub target: Option<String>,
    /// `FROM` images pinned by digest (`name:tag@sha256:...`), comma- or space-separated; a
    /// `FROM` not listed is resolved through the proxy and reported.
    #[arg(long, env = "BOB_FROM_REFS", default_value = "")]
    pub from_refs: String,
    /// The layer cache as the proxy's `cache` alias (`<proxy>/cache`); unset: no layer cache.
    #[arg(long, env = "BOB_LAYER_CACHE_REF")]
    pub layer_cache: Option<String>,
    /// Read cached steps from the layer cache (`false` under forceRebuild: only write new ones).
    #[arg(long, env = "BOB_LAYER_CACHE_READ", default_value_t = true, action = clap::ArgAction::Set)]
    pub layer_cache_read: bool,
    /// How old a cached step may be and still be reused (buildah's --cache-ttl).
    #[arg(long, env = "BOB_LAYER_CACHE_TTL", default_value = "168h", value_parser = duration::parse)]
    pub layer_cache_ttl: Duration,
    /// Where the result JSON goes (kubelet reads it as the termination message).
    #[arg(long, env = "BOB_TERMINATION_MESSAGE_PATH", default_value = "/dev/termination-log")]
    pub termination_message_path: PathBuf,
    /// The buildah binary.
    #[arg(long, env = "BOB_BUILDAH", default_value = "buildah")]
    pub buildah: PathBuf,
    /// Image storage root of the engine.
    #[arg(long, env = "BOB_STORAGE_ROOT", default_value = "/var/lib/bob/storage")]
    pub storage_root: PathBuf,
    /// Run root of the engine's storage.
    #[arg(long, env = "BOB_STORAGE_RUNROOT", default_value = "/run/bob/storage")]
    pub storage_runroot: PathBuf,
    /// Storage driver (`vfs` works everywhere, `overlay` is faster where allowed).
    #[arg(long, env = "BOB_STORAGE_DRIVER", default_value = "vfs")]
    pub storage_driver: String,
    /// Isolation of RUN steps: `chroot`, or `oci` with --oci-runtime.
    #[arg(long, env = "BOB_ISOLATION", value_enum, default_value = "chroot")]
    pub isolation: Isolation,
    /// OCI runtime for `--isolation oci` (runc works where crun does not).
    #[arg(long, env = "BOB_OCI_RUNTIME", default_value = "runc")]
    pub oci_runtime: String,
    /// End the build when it prints nothing for this long (e.g. a RUN step waiting for input).
    #[arg(long, env = "BOB_NO_PROGRESS_TIMEOUT", default_value = "10m", value_parser = duration::parse)]
    pub no_progress_timeout: Duration,
    /// How long to wait for the proxy to answer at start.
    #[arg(long, env = "BOB_PROXY_WAIT", default_value = "30s", value_parser = duration::parse)]
    pub proxy_wait: Duration,
    /// Blobs copied at once in phase 2.
    #[arg(long, env = "BOB_COPY_JOBS", default_value_t = 8)]
    pub jobs: u16,
}

impl BuildArgs {
    fn base(&self) -> String {
        self.base_ref.clone().unwrap_or_else(|| format!("{}/base:latest", self.proxy_addr))
    }

    fn target(&self) -> String {
        self.target_ref.clone().unwrap_or_else(|| format!("{}/target:latest", self.proxy_addr))
    }
}

/// How long the engine gets to end its `RUN` steps when `bob build` is stopped (SIGTERM, SIGINT)
/// before everything left is killed: well inside Kubernetes' default 30 s termination grace.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Runs the build, writes the result (termination file and last stdout line) and returns it.
/// SIGTERM or SIGINT ends the engine and its steps and reports `Cancelled`; the processes below
/// `bob build` have ended when it returns, on every path.
pub async fn run(args: BuildArgs) -> BuildResult {
    let started = Instant::now();
    let mut result = BuildResult { version: 1, ..Default::default() };
    let outcome = crate::process::supervise(STOP_GRACE, execute(&args, &mut result)).await;
    let failure = match (outcome.value, outcome.signal) {
        (Some(Ok(())), _) => None,
        (Some(Err(f)), None) => Some(f),
        // Stopped: whatever failed afterwards failed because of it; keep what it printed.
        (value, signal) => Some(Failure {
            log_tail: value.and_then(|v| v.err()).and_then(|f| f.log_tail),
            ..Failure::new(
                Reason::Cancelled,
                format!("stopped by {} before the build finished", signal.unwrap_or("a signal")),
            )
        }),
    };
    if let Some(f) = failure {
        tracing::error!(reason = %f.reason, "{}", f.message);
        result.reason = Some(f.reason);
        result.message = Some(f.message);
        result.step = f.step;
        result.exit_code = f.exit_code;
        result.log_tail = f.log_tail;
    }
    result.timings.total_ms = started.elapsed().as_millis() as u64;
    let json = result.to_json();
    if let Err(e) = std::fs::write(&args.termination_message_path, &json) {
        tracing::warn!(path = %args.termination_message_path.display(), error = %e, "cannot write the result file");
    }
    println!("{json}");
    result
}

fn parse_ref(what: &str, value: &str) -> Result<Reference, Failure> {
    reference::parse(value)
        .map_err(|e| Failure::new(Reason::InvalidConfig, format!("{what}: {}", crate::oci::error::chain(&e))))
}

async fn execute(args: &BuildArgs, result: &mut BuildResult) -> Result<(), Failure> {
    let resolve = Instant::now();
    // The proxy's address becomes the registry host of every ref below (and of the mirror's).
    reference::check_host(&args.proxy_addr)
        .map_err(|why| Failure::new(Reason::InvalidConfig, format!("BOB_PROXY_ADDR: {why}")))?;
    let base = parse_ref("BOB_BASE_REF", &args.base())?;
    let target = parse_ref("BOB_TARGET_REF", &args.target())?;
    wait_for_proxy(&args.proxy_addr, args.proxy_wait).await?;
    // Anonymous and loopback: the proxy holds the credentials, plain HTTP by the loopback rule.
    let client = Client::connect(CredentialStore::anonymous(), &[], Duration::from_secs(300), None)
        .map_err(|e| Failure::new(Reason::Internal, crate::oci::error::chain(&e)))?;
    let base_digest = if args.build_base {
        base::build(args, &client, &base, result, resolve).await?
    } else {
        result.timings.resolve_ms = resolve.elapsed().as_millis() as u64;
        match client.manifest_digest(&base).await {
            Ok(Some(d)) => d,
            Ok(None) => {
                return Err(Failure::new(
                    Reason::BaseImagePullFailed,
                    format!("base image {} does not exist", base.whole()),
                ));
            }
            Err(e) => {
                return Err(registry_failure(Reason::BaseImagePullFailed, "cannot read the base image", &e));
            }
        }
    };
    result.base_digest = Some(base_digest.clone());

    let copy = Instant::now();
    let src = Reference::with_digest(base.registry().into(), base.repository().into(), base_digest);
    let report = crate::oci::copy::copy_with_progress(&client, &src, &target, args.jobs.max(1).into())
        .await
        .map_err(|e| Failure::new(Reason::CopyFailed, crate::oci::error::chain(&e)))?;
    result.timings.copy_ms = Some(copy.elapsed().as_millis() as u64);
    tracing::info!(digest = %report.digest, mounted = report.mounted, mib = report.bytes >> 20, "copied the base image to the workspace image");
    result.target_digest = Some(report.digest);
    Ok(())
}

/// A failure from a registry error: an unreachable proxy is `ProxyUnavailable`.
fn registry_failure(reason: Reason, what: &str, e: &crate::oci::client::Error) -> Failure {
    let reason = if e.kind() == Kind::Unreachable { Reason::ProxyUnavailable } else { reason };
    Failure::new(reason, format!("{what}: {}", crate::oci::error::chain(e)))
}

/// Waits until the proxy answers `GET /v2/` (the sidecar may still be starting).
async fn wait_for_proxy(addr: &str, patience: Duration) -> Result<(), Failure> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build();
    let http = http.map_err(|e| Failure::new(Reason::Internal, e.to_string()))?;
    let url = format!("http://{addr}/v2/");
    let deadline = Instant::now() + patience;
    loop {
        let last = match http.get(&url).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => format!("it answered {}", r.status()),
            Err(e) => crate::oci::error::chain(&e),
        };
        if Instant::now() >= deadline {
            return Err(Failure::new(
                Reason::ProxyUnavailable,
                format!(
                    "the registry proxy at {addr} did not answer within {patience:?} ({last}); is the bob proxy sidecar running?"
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
