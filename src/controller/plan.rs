//! The pure middle of reconciling: from an ImageBuild and what was resolved (the image digest,
//! the git commit, the `FROM` digests), the build inputs, the key, the refs and the desired pod.
//! No I/O: the controller and `bob run` resolve first and apply after.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;

pub use super::cache_scope::{CachePlan, LayerCacheConfig};
use super::placement::Placement;
use crate::build::Isolation;
use crate::build::dockerfile::Dockerfile;
use crate::crd::ImageBuild;
use crate::duration;
use crate::key::{self, BuildInputs, DockerfileSource as KeySource};
use crate::oci::{Reference, reference};
use crate::reason::Reason;

/// An ImageBuild the plan cannot build, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    /// The field path, e.g. `spec.source.dockerfile.inline`.
    pub field: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl Invalid {
    pub(super) fn new(field: &str, message: impl Into<String>) -> Self {
        Self { field: field.to_string(), message: message.into() }
    }

    /// The status reason of an invalid spec.
    pub fn reason(&self) -> Reason {
        Reason::InvalidSpec
    }
}

/// What was looked up before planning.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Digest of an image source's reference.
    pub image_digest: Option<String>,
    /// The commit a git source's revision resolves to.
    pub git_commit: Option<String>,
    /// The Dockerfile of a git source at that commit (read by the resolver, so its `FROM`s can be
    /// pinned and keyed like an inline Dockerfile's).
    pub git_dockerfile: Option<String>,
    /// Digest of each `FROM` image (as written, after `ARG` expansion).
    pub from_digests: BTreeMap<String, String>,
}

/// How the build container may run buildah (see docs/security.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BuildSecurity {
    /// Root inside a user namespace (`hostUsers: false`) with the capabilities buildah needs; they
    /// mean nothing on the node.
    UserNamespace,
    /// The same capabilities without a user namespace, for clusters that lack them.
    Capabilities,
    /// `privileged: true`; works everywhere, isolates least.
    Privileged,
}

/// Settings of the plan that come from the installation, not the ImageBuild.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanConfig {
    /// The bob image (proxy, clone and build containers).
    pub image: String,
    /// The proxy's port on loopback.
    pub proxy_port: u16,
    /// Build time limit when the spec gives none.
    pub build_timeout: Duration,
    /// The build container's privileges.
    pub security: BuildSecurity,
    /// Where build pods may go and which namespaces get the near-root modes (`placement.rs`).
    pub placement: Placement,
    /// Isolation of `RUN` steps.
    pub isolation: Isolation,
    /// Registries the proxy speaks plain HTTP to besides loopback ones (in-cluster registries).
    pub insecure_registries: Vec<String>,
    /// The layer cache: the global switch, the default repository and the step TTL.
    pub layer_cache: LayerCacheConfig,
}

impl Default for PlanConfig {
    fn default() -> Self {
        Self {
            image: concat!("ghcr.io/bob-dev/bob:", env!("CARGO_PKG_VERSION")).to_string(),
            proxy_port: 8080,
            build_timeout: Duration::from_secs(3600),
            security: BuildSecurity::UserNamespace,
            placement: Placement::default(),
            isolation: Isolation::Chroot,
            insecure_registries: Vec::new(),
            layer_cache: LayerCacheConfig::default(),
        }
    }
}

/// Everything decided before a pod exists.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The key's inputs (Dockerfile sources).
    pub inputs: Option<BuildInputs>,
    /// The build key (Dockerfile sources).
    pub key: Option<String>,
    /// The real base image ref: `<baseImageRepository>:<key>`, or `name@digest`.
    pub base_ref: String,
    /// The real workspace image ref; a cache hit is "it exists".
    pub workspace_ref: String,
    /// The same, parsed.
    pub workspace: Reference,
    /// `FROM` images pinned by digest (`name[:tag]@sha256:…`), for the proxy's mirror and the build.
    pub from_refs: Vec<String>,
    /// The layer cache of the build (Dockerfile sources with a cache).
    pub layer_cache: Option<CachePlan>,
    /// The desired build pod.
    pub pod: Pod,
}

/// The spec's time limits (`spec.timeouts`), `None` where it sets none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimeLimits {
    /// `spec.timeouts.queue`.
    pub queue: Option<Duration>,
    /// `spec.timeouts.build`.
    pub build: Option<Duration>,
}

/// Reads `spec.timeouts` with the one duration grammar (`crate::duration`, what the CRD's CEL
/// rules accept). A value that does not parse is an invalid spec, never replaced by a default.
pub fn time_limits(ib: &ImageBuild) -> Result<TimeLimits, Invalid> {
    let Some(t) = &ib.spec.timeouts else { return Ok(TimeLimits::default()) };
    let read = |field: &str, value: &Option<String>| {
        value.as_deref().map(duration::parse).transpose().map_err(|e| Invalid::new(field, e.to_string()))
    };
    Ok(TimeLimits {
        queue: read("spec.timeouts.queue", &t.queue)?,
        build: read("spec.timeouts.build", &t.build)?,
    })
}

/// Largest inline Dockerfile: it travels in a pod annotation (256 KiB for all of them).
pub const MAX_INLINE_DOCKERFILE: usize = 128 * 1024;

/// The `FROM` images that need a digest: those of an inline Dockerfile, or of a git source's
/// Dockerfile once the resolver has read it (`None` until then).
pub fn from_images(ib: &ImageBuild, resolved: &Resolved) -> Result<Option<Vec<String>>, Invalid> {
    let Some(d) = &ib.spec.source.dockerfile else { return Ok(Some(Vec::new())) };
    let (field, text) = match (&d.inline, &resolved.git_dockerfile) {
        (Some(text), _) => ("spec.source.dockerfile.inline", text),
        (None, Some(text)) => ("spec.source.dockerfile.git.dockerfilePath", text),
        (None, None) => return Ok(None),
    };
    let parsed = Dockerfile::parse(text, &d.build_args)
        .map_err(|e| Invalid::new(field, format!("invalid Dockerfile: {e}")))?;
    let mut out = Vec::new();
    for image in parsed.images() {
        let r = reference::parse(image)
            .map_err(|e| Invalid::new(field, format!("FROM {image}: {}", crate::oci::error::chain(&e))))?;
        if r.digest().is_none() {
            out.push(image.to_string());
        }
    }
    Ok(Some(out))
}

/// The key's inputs for a Dockerfile source, without the layer cache (`plan` adds its scope).
pub fn inputs(ib: &ImageBuild, resolved: &Resolved) -> Result<Option<BuildInputs>, Invalid> {
    let Some(d) = &ib.spec.source.dockerfile else { return Ok(None) };
    if let Some(bad) = d.build_args.keys().find(|k| !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
    {
        return Err(Invalid::new(
            "spec.source.dockerfile.buildArgs",
            format!("{bad:?} is not a valid argument name"),
        ));
    }
    let (source, dockerfile_path, context_path) = match (&d.inline, &d.git) {
        (Some(text), None) => {
            if text.len() > MAX_INLINE_DOCKERFILE {
                return Err(Invalid::new(
                    "spec.source.dockerfile.inline",
                    format!("longer than {MAX_INLINE_DOCKERFILE} bytes; put it in git"),
                ));
            }
            (KeySource::Inline { dockerfile: text.clone() }, "Dockerfile".to_string(), ".".to_string())
        }
        (None, Some(git)) => {
            let commit = resolved.git_commit.clone().ok_or_else(|| {
                Invalid::new(
                    "spec.source.dockerfile.git.revision",
                    "the revision was not resolved to a commit",
                )
            })?;
            let dockerfile = git.dockerfile_path.clone().unwrap_or_else(|| "Dockerfile".into());
            let context = git.context_path.clone().unwrap_or_else(|| parent_dir(&dockerfile));
            (KeySource::Git { commit }, dockerfile, context)
        }
        _ => return Err(Invalid::new("spec.source.dockerfile", "exactly one of inline or git must be set")),
    };
    let images = from_images(ib, resolved)?.ok_or_else(|| {
        Invalid::new("spec.source.dockerfile.git.dockerfilePath", "the Dockerfile was not read at the commit")
    })?;
    let mut from_digests = BTreeMap::new();
    for image in images {
        let digest = resolved.from_digests.get(&image).ok_or_else(|| {
            Invalid::new("spec.source.dockerfile", format!("FROM {image} was not resolved to a digest"))
        })?;
        from_digests.insert(image, digest.clone());
    }
    let inputs = BuildInputs {
        source,
        dockerfile_path,
        context_path,
        build_args: d.build_args.clone(),
        target: d.target.clone(),
        from_digests,
        context_digest: None,
        layer_cache: None,
    };
    inputs.canonical().map_err(|e| Invalid::new("spec.source.dockerfile", e.to_string()))?;
    Ok(Some(inputs))
}

fn parent_dir(path: &str) -> String {
    match path.rsplit_once('/') {
        Some((dir, _)) if !dir.is_empty() => dir.to_string(),
        _ => ".".to_string(),
    }
}

/// Plans the build: inputs, key, refs and the pod.
pub fn plan(ib: &ImageBuild, resolved: &Resolved, cfg: &PlanConfig) -> Result<Plan, Invalid> {
    let spec = &ib.spec;
    let limits = time_limits(ib)?;
    let workspace_repo = repository("spec.workspaceImageRepository", &spec.workspace_image_repository)?;
    // The layer-cache scope is a key input whenever the build has one, also under
    // `forceRebuild` (which writes the scope without reading it): the scope's tag then only ever
    // holds images made from that scope's steps or none (docs/security.md, "Layer cache").
    let layer_cache = super::cache_scope::plan(ib, &cfg.layer_cache)?;
    let inputs = inputs(ib, resolved)?.map(|mut i| {
        i.layer_cache = layer_cache.as_ref().map(|c| c.repository.clone());
        i
    });
    let mut named: Vec<(&str, &str)> =
        vec![("spec.workspaceImageRepository", &spec.workspace_image_repository)];
    named.extend(spec.base_image_repository.as_deref().map(|r| ("spec.baseImageRepository", r)));
    named.extend(spec.source.image.as_ref().map(|i| ("spec.source.image.ref", i.reference.as_str())));
    let froms = inputs.iter().flat_map(|i| i.from_digests.keys());
    named.extend(froms.map(|image| ("spec.source.dockerfile", image.as_str())));
    super::cache_scope::check_outside(ib, &cfg.layer_cache, &named)?;
    let (key, base_ref) = match (&spec.source.image, &inputs) {
        (Some(image), None) => {
            let r = parse_ref("spec.source.image.ref", &image.reference)?;
            let digest =
                resolved.image_digest.clone().or_else(|| r.digest().map(String::from)).ok_or_else(|| {
                    Invalid::new("spec.source.image.ref", "the image was not resolved to a digest")
                })?;
            (None, format!("{}/{}@{digest}", r.registry(), r.repository()))
        }
        (None, Some(inputs)) => {
            let repo = spec
                .base_image_repository
                .as_deref()
                .ok_or_else(|| Invalid::new("spec.baseImageRepository", "required for Dockerfile sources"))?;
            let repo = repository("spec.baseImageRepository", repo)?;
            let key = inputs.key().map_err(|e| Invalid::new("spec.source.dockerfile", e.to_string()))?;
            (Some(key.clone()), key::base_ref(&repo, &key))
        }
        _ => return Err(Invalid::new("spec.source", "exactly one of image or dockerfile must be set")),
    };
    let workspace_ref = key::workspace_ref(&workspace_repo, &base_ref);
    let workspace = parse_ref("spec.workspaceImageRepository", &workspace_ref)?;
    let from_refs = pinned_from_refs(inputs.as_ref());
    let pod = super::pod::build_pod(
        ib,
        &super::pod::PodInputs {
            key: key.as_deref(),
            inputs: inputs.as_ref(),
            base_ref: &base_ref,
            workspace_ref: &workspace_ref,
            from_refs: &from_refs,
            layer_cache: layer_cache.as_ref(),
            build_timeout: limits.build.unwrap_or(cfg.build_timeout),
            cfg,
        },
    )?;
    Ok(Plan { inputs, key, base_ref, workspace_ref, workspace, from_refs, layer_cache, pod })
}

/// Checks the references the spec names (the source image, both repositories) before anything
/// is resolved, so an invalid one costs no network request. (`FROM` images are checked by
/// `from_images`, before they are resolved.)
pub fn check_references(ib: &ImageBuild) -> Result<(), Invalid> {
    let spec = &ib.spec;
    repository("spec.workspaceImageRepository", &spec.workspace_image_repository)?;
    if let Some(repo) = &spec.base_image_repository {
        repository("spec.baseImageRepository", repo)?;
    }
    if let Some(image) = &spec.source.image {
        parse_ref("spec.source.image.ref", &image.reference)?;
    }
    Ok(())
}

/// A repository as written, checked and without tag or digest.
pub(super) fn repository(field: &str, value: &str) -> Result<String, Invalid> {
    let last = value.rsplit('/').next().unwrap_or(value);
    let tagged = if value.contains('/') { last.contains(':') } else { value.contains(':') };
    if tagged || value.contains('@') {
        return Err(Invalid::new(field, format!("{value:?} must be a repository without tag or digest")));
    }
    parse_ref(field, value)?;
    Ok(value.to_string())
}

fn parse_ref(field: &str, value: &str) -> Result<Reference, Invalid> {
    reference::parse(value).map_err(|e| Invalid::new(field, crate::oci::error::chain(&e)))
}

/// `FROM` pins as `registry/repository:tag@digest`, the form both the proxy's mirror and
/// `bob build` match a `FROM` line with.
fn pinned_from_refs(inputs: Option<&BuildInputs>) -> Vec<String> {
    let Some(inputs) = inputs else { return Vec::new() };
    inputs
        .from_digests
        .iter()
        .filter_map(|(image, digest)| {
            let r = reference::parse(image).ok()?;
            let tag = r.tag().unwrap_or("latest");
            Some(format!("{}/{}:{tag}@{digest}", r.registry(), r.repository()))
        })
        .collect()
}
