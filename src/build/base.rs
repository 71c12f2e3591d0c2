//! Phase 1: the base image. Skipped when the base ref already exists (unless `forceRebuild`
//! forces it); otherwise the Dockerfile is read, every `FROM` is pinned to a digest (given in
//! `BOB_FROM_REFS`, or resolved through the proxy's mirror route and reported), and the engine
//! builds with the layer cache the probe allows and pushes to the `base` alias.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use super::cache::{self, Decided, Planned};
use super::dockerfile::Base;
use super::dockerfile::Dockerfile;
use super::engine::{Buildah, Engine, EngineBuild, registries_conf, write};
use super::history;
use super::output::{self, Finished};
use super::{BuildArgs, BuildResult, Failure, registry_failure};
use crate::bounded;
use crate::oci::client::Client;
use crate::oci::{Reference, reference};
use crate::reason::Reason;

/// Builds the base unless it exists; returns its digest.
pub async fn build(
    args: &BuildArgs,
    client: &Client,
    base: &Reference,
    result: &mut BuildResult,
    resolve: Instant,
) -> Result<String, Failure> {
    let exists = if args.force_build { Ok(None) } else { client.manifest_digest(base).await };
    match exists {
        Ok(Some(digest)) => {
            tracing::info!(%digest, "the base image exists: skipping the Dockerfile build");
            result.timings.resolve_ms = resolve.elapsed().as_millis() as u64;
            return Ok(digest);
        }
        Ok(None) => {}
        Err(e) => {
            return Err(registry_failure(
                Reason::PushFailed,
                "cannot check whether the base image exists",
                &e,
            ));
        }
    }
    let (dockerfile_path, text) = read_dockerfile(args)?;
    let context = args
        .context
        .clone()
        .unwrap_or_else(|| dockerfile_path.parent().unwrap_or(Path::new(".")).to_path_buf());
    if !context.is_dir() {
        return Err(Failure::new(
            Reason::InvalidConfig,
            format!("the build context {} is not a directory", context.display()),
        ));
    }
    let build_args: BTreeMap<String, String> = serde_json::from_str(&args.build_args).map_err(|e| {
        Failure::new(Reason::InvalidConfig, format!("BOB_BUILD_ARGS must be a JSON object of strings: {e}"))
    })?;
    let dockerfile = Dockerfile::parse(&text, &build_args).map_err(|e| {
        Failure::new(Reason::DockerfileInvalid, format!("{}: {e}", dockerfile_path.display()))
    })?;
    let pins = parse_pins(&args.from_refs)?;
    let mut pinned: BTreeMap<String, String> = BTreeMap::new();
    let mut refs: BTreeMap<&str, Reference> = BTreeMap::new();
    let mut hosts: Vec<String> = Vec::new();
    for image in dockerfile.images() {
        let r = reference::parse(image).map_err(|e| {
            Failure::new(Reason::DockerfileInvalid, format!("FROM {image}: {}", crate::oci::error::chain(&e)))
        })?;
        let digest = resolve_from(client, &args.proxy_addr, image, &r, &pins).await?;
        result.from_digests.insert(image.to_string(), digest.clone());
        pinned.insert(image.to_string(), format!("{}/{}@{digest}", r.registry(), r.repository()));
        if !hosts.iter().any(|h| h == r.registry()) {
            hosts.push(r.registry().to_string());
        }
        refs.insert(image, r);
    }
    result.timings.resolve_ms = resolve.elapsed().as_millis() as u64;

    let work = tempfile::Builder::new().prefix("bob-build-").tempdir().map_err(io_failure)?;
    let dir = work.path();
    let pinned_text = dockerfile.pinned(|i| pinned.get(i).cloned().unwrap_or_else(|| i.to_string()));
    // One layer per step needs FROM images whose history names their layers (`history.rs`).
    let froms = dockerfile.froms.iter().filter_map(|f| match &f.base {
        Base::Image(image) => {
            let (r, digest) = (refs.get(image.as_str())?, result.from_digests.get(image.as_str())?);
            Some((image.clone(), mirror_ref(&args.proxy_addr, r, digest)))
        }
        _ => None,
    });
    let no_history = history::first_without(client, froms.collect()).await;
    let mut decided = match (planned_cache(args)?, &no_history) {
        (Some(_), Some(image)) => Some(cache::without_history(image)),
        (Some(planned), None) => Some(planned.decide().await),
        (None, _) => None,
    };
    let mut spec = EngineBuild {
        dockerfile: write(dir, "Dockerfile", &pinned_text).map_err(io_failure)?,
        context,
        build_args,
        target: args.target.clone(),
        registries_conf: write(dir, "registries.conf", &registries_conf(&args.proxy_addr, &hosts))
            .map_err(io_failure)?,
        auth_file: write(dir, "auth.json", "{}").map_err(io_failure)?,
        work: dir.to_path_buf(),
        image: format!("localhost/bob-base-{}", std::process::id()),
        push_to: args.base(),
        digest_file: dir.join("digest"),
        cache: decided.as_ref().map(|d| d.flags.clone()).unwrap_or_default(),
        omit_history: no_history.is_some(),
    };
    let engine = Buildah {
        binary: args.buildah.clone(),
        root: args.storage_root.clone(),
        runroot: args.storage_runroot.clone(),
        storage_driver: args.storage_driver.clone(),
        isolation: args.isolation,
        runtime: args.oci_runtime.clone(),
    };
    let started = Instant::now();
    let built = build_image(&engine, &mut spec, &mut decided, args).await?;
    result.layer_cache = decided.as_ref().map(|d| cache::report(d, &built));
    if !built.success() {
        return Err(failure(&engine, &built, Reason::EngineFailed, args));
    }
    result.timings.build_ms = Some(started.elapsed().as_millis() as u64);
    let started = Instant::now();
    let pushed = run_engine(&engine, engine.push(&spec), args).await?;
    if !pushed.success() {
        return Err(failure(&engine, &pushed, Reason::PushFailed, args));
    }
    result.timings.push_ms = Some(started.elapsed().as_millis() as u64);
    let digest = bounded::read_to_string(&spec.digest_file, bounded::DIGEST_FILE)
        .map_err(|e| Failure::new(Reason::PushFailed, crate::oci::error::chain(&e)))?
        .trim()
        .to_string();
    result.base_built = true;
    // Local storage is a cache only; the pushed image is what counts.
    let _ = engine.remove(&spec).output().await;
    Ok(digest)
}

/// Runs the engine's build; a failure that only the layer cache or `--layers` caused is run once
/// more without its cause: a cache push that failed (local storage keeps every layer built so
/// far, so the second run reuses them) or a `FROM` image whose history the check missed.
async fn build_image(
    engine: &Buildah,
    spec: &mut EngineBuild,
    decided: &mut Option<Decided>,
    args: &BuildArgs,
) -> Result<Finished, Failure> {
    loop {
        let built = run_engine(engine, engine.build(spec), args).await?;
        if built.success() {
            return Ok(built);
        }
        let again = if spec.cache.to.is_some()
            && let Some(why) = cache::failed_on_cache(&built)
        {
            cache::without_cache(&why)
        } else if !spec.omit_history && built.tail.iter().any(|l| history::is_history_error(l)) {
            spec.omit_history = true;
            cache::without_history("a FROM image")
        } else {
            return Ok(built);
        };
        tracing::warn!("{}", again.note.as_deref().unwrap_or_default());
        spec.cache = again.flags.clone();
        if decided.is_some() {
            *decided = Some(again);
        }
    }
}

/// The repository of a `FROM` image on the proxy's mirror route.
fn mirror_repository(r: &Reference) -> String {
    format!("mirror/{}/{}", r.registry().replace(':', "__"), r.repository())
}

/// A `FROM` image as the proxy's mirror route serves it, pinned by digest.
fn mirror_ref(proxy: &str, r: &Reference, digest: &str) -> Reference {
    Reference::with_digest(proxy.to_string(), mirror_repository(r), digest.to_string())
}

/// The layer cache the plan gave the build, checked like every other reference.
fn planned_cache(args: &BuildArgs) -> Result<Option<Planned>, Failure> {
    let Some(reference) = args.layer_cache.as_deref().map(str::trim).filter(|r| !r.is_empty()) else {
        return Ok(None);
    };
    reference::parse(reference).map_err(|e| {
        Failure::new(Reason::InvalidConfig, format!("BOB_LAYER_CACHE_REF: {}", crate::oci::error::chain(&e)))
    })?;
    Ok(Some(Planned {
        reference: reference.to_string(),
        read: args.layer_cache_read,
        ttl: format!("{}s", args.layer_cache_ttl.as_secs().max(1)),
    }))
}

fn read_dockerfile(args: &BuildArgs) -> Result<(std::path::PathBuf, String), Failure> {
    let path = args.dockerfile.clone().ok_or_else(|| {
        Failure::new(
            Reason::InvalidConfig,
            "BOB_DOCKERFILE_PATH is not set (needed when BOB_BUILD_BASE=true)",
        )
    })?;
    if path.is_dir() {
        return Err(Failure::new(
            Reason::DockerfileNotFound,
            format!("{} is a directory, not a Dockerfile", path.display()),
        ));
    }
    match bounded::read_to_string(&path, bounded::DOCKERFILE) {
        Ok(text) => Ok((path, text)),
        Err(e) if e.is_not_found() => Err(Failure::new(
            Reason::DockerfileNotFound,
            format!("no Dockerfile at {}: check the Dockerfile path of the ImageBuild", path.display()),
        )),
        Err(e @ bounded::Error::Read { .. }) => {
            Err(Failure::new(Reason::DockerfileNotFound, crate::oci::error::chain(&e)))
        }
        Err(e) => Err(Failure::new(Reason::DockerfileInvalid, e.to_string())),
    }
}

fn parse_pins(list: &str) -> Result<Vec<Reference>, Failure> {
    list.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|s| {
            let r = reference::parse(s).map_err(|e| {
                Failure::new(
                    Reason::InvalidConfig,
                    format!("BOB_FROM_REFS: {}", crate::oci::error::chain(&e)),
                )
            })?;
            if r.digest().is_none() {
                return Err(Failure::new(
                    Reason::InvalidConfig,
                    format!("BOB_FROM_REFS entry {s:?} has no digest"),
                ));
            }
            Ok(r)
        })
        .collect()
}

/// The digest a `FROM` image is pinned to: its own digest, the pin given for it, or the one
/// the proxy's mirror route resolves its tag to.
async fn resolve_from(
    client: &Client,
    proxy: &str,
    image: &str,
    r: &Reference,
    pins: &[Reference],
) -> Result<String, Failure> {
    if let Some(d) = r.digest() {
        return Ok(d.to_string());
    }
    let tag = r.tag().unwrap_or("latest");
    let pin = pins.iter().find(|p| {
        p.registry() == r.registry() && p.repository() == r.repository() && p.tag().unwrap_or("latest") == tag
    });
    if let Some(d) = pin.and_then(|p| p.digest()) {
        return Ok(d.to_string());
    }
    let via_proxy = Reference::with_tag(proxy.to_string(), mirror_repository(r), tag.to_string());
    match client.manifest_digest(&via_proxy).await {
        Ok(Some(d)) => {
            tracing::info!(image, digest = %d, "resolved FROM through the proxy");
            Ok(d)
        }
        Ok(None) => {
            Err(Failure::new(Reason::BaseImagePullFailed, format!("FROM {image}: the image does not exist")))
        }
        Err(e) => Err(registry_failure(
            Reason::BaseImagePullFailed,
            &format!("FROM {image} cannot be resolved through the proxy (is it in BOB_PROXY_MIRROR_REFS?)"),
            &e,
        )),
    }
}

async fn run_engine(
    engine: &Buildah,
    cmd: tokio::process::Command,
    args: &BuildArgs,
) -> Result<Finished, Failure> {
    output::run(cmd, args.no_progress_timeout).await.map_err(|e| {
        Failure::new(
            Reason::EngineFailed,
            format!(
                "cannot run {} ({}): {e}; install it with `apt-get install buildah`",
                engine.name(),
                args.buildah.display()
            ),
        )
    })
}

/// The failure of an engine command: the watchdog, the engine's own diagnosis, a SIGKILL, or
/// the phase's default reason.
fn failure(engine: &dyn Engine, f: &Finished, default: Reason, args: &BuildArgs) -> Failure {
    let tail = Some(f.tail_text());
    if let Some(silent) = f.silent_for {
        let last = f.last_step.as_deref().unwrap_or("before the first step");
        return Failure {
            log_tail: tail,
            ..Failure::new(
                Reason::NoProgress,
                format!(
                    "the build printed nothing for {silent:?} and was stopped (at {last}); a step may be waiting for input or hung (BOB_NO_PROGRESS_TIMEOUT)"
                ),
            )
        };
    }
    if let Some(d) = engine.diagnose(&f.tail, default) {
        // "STEP 3/5: RUN make" names the position of the failing step.
        let position =
            f.last_step.as_deref().and_then(|s| s.strip_prefix("STEP ")).and_then(|s| s.split(':').next());
        let message = match (&d.step, position) {
            (Some(_), Some(p)) => format!("step {p}: {}", d.message.trim_start_matches("step ")),
            _ => d.message,
        };
        return Failure { reason: d.reason, message, step: d.step, exit_code: d.exit_code, log_tail: tail };
    }
    let (reason, message) = if f.killed() {
        (Reason::OutOfMemory, format!("{} was killed (SIGKILL), most likely out of memory", engine.name()))
    } else {
        (default, format!("{} ({}) failed with {}", engine.name(), args.buildah.display(), f.status))
    };
    Failure { log_tail: tail, ..Failure::new(reason, message) }
}

fn io_failure(e: std::io::Error) -> Failure {
    let reason = if e.raw_os_error() == Some(28) { Reason::DiskFull } else { Reason::Internal };
    Failure::new(reason, format!("cannot prepare the build: {e}"))
}
