//! The `ImageBuild` custom resource (`bob.dev/v1alpha1`). The `///` comments become the schema's
//! descriptions; CEL rules say what the schema alone cannot (one source, required repositories,
//! reference syntax, positive durations), so the API server rejects bad specs before bob sees them.
//! (Field types name `crate::reason::Reason` in full: the schema derive brings kube's own `Reason`
//! into scope.)

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::duration::DURATION_RE;

/// A repository without tag or digest: `[host[:port]/]path`, lowercase path components.
pub const REPOSITORY_RE: &str = r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$";
/// An image reference: a repository with an optional tag and an optional sha256 digest.
pub const REFERENCE_RE: &str = r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$";

/// The message of the duration rules (users read it instead of CEL's conversion error).
pub const DURATION_MESSAGE: &str = "must be a positive duration with a unit, such as 90s, 30m or 1h30m";

/// The CEL rule of a duration field: the form first, so `duration()` only sees what it can
/// convert (CEL's `&&` is false when either side is, even if the other is an error).
pub fn duration_rule() -> String {
    format!("self.matches(r'{DURATION_RE}') && duration(self) > duration('0s')")
}

/// What to build: the source of the base image, the repositories, credentials and pod knobs.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[cfg_attr(test, derive(Default))]
#[kube(
    group = "bob.dev",
    version = "v1alpha1",
    kind = "ImageBuild",
    plural = "imagebuilds",
    shortname = "ib",
    category = "bob",
    namespaced,
    status = "ImageBuildStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.reason"}"#,
    printcolumn = r#"{"name":"Image","type":"string","jsonPath":".status.output.ref"}"#,
    printcolumn = r#"{"name":"Digest","type":"string","jsonPath":".status.output.shortDigest"}"#,
    printcolumn = r#"{"name":"Cached","type":"boolean","jsonPath":".status.cacheHit"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("!has(self.source.dockerfile) || has(self.baseImageRepository)")
    .message("baseImageRepository is required for Dockerfile sources").field_path(".baseImageRepository"))]
#[serde(rename_all = "camelCase")]
pub struct ImageBuildSpec {
    /// Where the base image comes from: exactly one of `image` or `dockerfile`.
    pub source: BuildSource,
    /// Repository for base images built from Dockerfiles, tagged with the build key
    /// (`<repository>:<key>`). Required for Dockerfile sources.
    #[x_kube(validation = Rule::new(format!("self.matches(r'{REPOSITORY_RE}')")).message("must be a repository without tag or digest, e.g. registry.example.com/team/base"))]
    #[schemars(length(max = 255))]
    pub base_image_repository: Option<String>,
    /// Repository for workspace images, tagged with a hash of the base image ref.
    #[x_kube(validation = Rule::new(format!("self.matches(r'{REPOSITORY_RE}')")).message("must be a repository without tag or digest, e.g. registry.example.com/team/workspace"))]
    #[schemars(length(max = 255))]
    pub workspace_image_repository: String,
    /// Registry credentials for every repository involved (base, workspace, `FROM` images).
    pub registry_auth: Option<RegistryAuth>,
    /// Build even if the workspace image already exists.
    #[serde(default)]
    pub force_rebuild: bool,
    /// Stop the build; the ImageBuild ends Cancelled.
    #[serde(default)]
    pub cancel: bool,
    /// Time limits: positive durations in Go's syntax, numbers with units `ns`, `us`, `ms`, `s`,
    /// `m`, `h` (`90s`, `30m`, `1.5h`, `1h30m`); a bare number such as `30` is refused: write `30s`.
    pub timeouts: Option<Timeouts>,
    /// Scheduling and resources of the build pod.
    pub pod: Option<PodOptions>,
    /// The layer cache of Dockerfile builds: unchanged steps are reused from a registry
    /// repository instead of run again. On when the controller has a cache repository.
    pub layer_cache: Option<LayerCacheSpec>,
}

/// The source of the base image.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("has(self.image) != has(self.dockerfile)").message("exactly one of image or dockerfile must be set"))]
#[serde(rename_all = "camelCase")]
pub struct BuildSource {
    /// An existing image becomes the base; no Dockerfile is built.
    pub image: Option<ImageSource>,
    /// A Dockerfile (inline or in git) is built into the base image.
    pub dockerfile: Option<DockerfileSource>,
}

/// An existing image.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ImageSource {
    /// The image reference (tag or digest); a tag is resolved to its digest before building.
    #[serde(rename = "ref")]
    #[x_kube(validation = Rule::new(format!("self.matches(r'{REFERENCE_RE}')")).message("must be an image reference, e.g. registry.example.com/team/image:tag"))]
    #[schemars(length(max = 512))]
    pub reference: String,
}

/// A Dockerfile to build.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("has(self.inline) != has(self.git)").message("exactly one of inline or git must be set"))]
#[serde(rename_all = "camelCase")]
pub struct DockerfileSource {
    /// The Dockerfile's text (the build context is empty).
    pub inline: Option<String>,
    /// A Dockerfile and build context in a git repository.
    pub git: Option<GitSource>,
    /// Build arguments (`ARG` values).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[x_kube(validation = Rule::new("self.all(k, k.matches('^[A-Za-z_][A-Za-z0-9_]*$'))").message("build argument names are letters, digits and _"))]
    #[schemars(extend("maxProperties" = 64))]
    pub build_args: BTreeMap<String, String>,
    /// Target stage of a multi-stage Dockerfile.
    pub target: Option<String>,
}

/// A git repository at a revision.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GitSource {
    /// Clone URL (`https://`, `ssh://`, `git://`, `file://`, or `user@host:path`).
    #[x_kube(validation = Rule::new("self.matches('^(https?|ssh|git|file)://.+$') || self.matches('^[^@/]+@[^:/]+:.+$')").message("must be a git URL"))]
    #[schemars(length(max = 2048))]
    pub url: String,
    /// Branch, tag or commit SHA; resolved to a commit before the key is computed (default HEAD).
    #[schemars(length(max = 255))]
    pub revision: Option<String>,
    /// Path of the Dockerfile in the repository (default `Dockerfile`).
    #[x_kube(validation = Rule::new("!self.startsWith('/') && !self.contains('..')").message("must be a relative path inside the repository"))]
    #[schemars(length(max = 1024))]
    pub dockerfile_path: Option<String>,
    /// Path of the build context in the repository (default: the Dockerfile's directory).
    #[x_kube(validation = Rule::new("!self.startsWith('/') && !self.contains('..')").message("must be a relative path inside the repository"))]
    #[schemars(length(max = 1024))]
    pub context_path: Option<String>,
    /// A `kubernetes.io/basic-auth` Secret (`username`, `password`) for cloning; only the clone
    /// container sees it.
    pub credentials_secret_ref: Option<SecretRef>,
}

/// A Secret in the ImageBuild's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SecretRef {
    /// The Secret's name.
    pub name: String,
}

/// Registry credentials.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RegistryAuth {
    /// A `kubernetes.io/dockerconfigjson` Secret. The controller reads it for its registry checks;
    /// in the build pod only the proxy container mounts it.
    pub secret_ref: SecretRef,
}

/// Time limits, in the one duration grammar (`crate::duration`: Go's, which CEL's `duration()`
/// reads on the API server).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Timeouts {
    /// Longest wait from creation until a build pod runs (missing Secret, registry down, no
    /// build slot), e.g. `30m` (default: the controller's `--queue-timeout`, 30m).
    #[x_kube(validation = Rule::new(duration_rule()).message(DURATION_MESSAGE))]
    #[schemars(length(max = 32))]
    pub queue: Option<String>,
    /// Longest build from pod start (the pod's `activeDeadlineSeconds`, rounded up to whole
    /// seconds), e.g. `1h30m` (default: the controller's `--build-timeout`, 1h).
    #[x_kube(validation = Rule::new(duration_rule()).message(DURATION_MESSAGE))]
    #[schemars(length(max = 32))]
    pub build: Option<String>,
}

/// One or more lowercase path components: a layer cache scope.
pub const SCOPE_RE: &str =
    r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$";

/// The layer cache (docs/build.md, "Layer cache"). Each scope is its own repository,
/// `<repository>/<namespace>/<scope>-<hash>`: a build reads and writes only its scope's, through the
/// proxy. The cache makes builds faster; it never decides that one is unnecessary, and a cache
/// that cannot be used never fails a build.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct LayerCacheSpec {
    /// Build without the layer cache.
    #[serde(default)]
    pub disabled: bool,
    /// Repository below which the scopes' caches live (default: the controller's
    /// `--layer-cache-repository`).
    #[x_kube(validation = Rule::new(format!("self.matches(r'{REPOSITORY_RE}')")).message("must be a repository without tag or digest, e.g. registry.example.com/bob-cache"))]
    #[schemars(length(max = 200))]
    pub repository: Option<String>,
    /// Who shares cached steps within the namespace (default: the ImageBuild's name). Every
    /// Dockerfile built in a scope can read and write what the others cached, so a platform sets
    /// it to one trust domain (a user, a project); lowercase path components, e.g. `alice`.
    #[x_kube(validation = Rule::new(format!("self.matches(r'{SCOPE_RE}')")).message("must be lowercase path components such as alice or team-a/web"))]
    #[schemars(length(max = 128))]
    pub scope: Option<String>,
}

/// Build pod knobs.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodOptions {
    /// Resources of the build container.
    pub resources: Option<ResourceRequirements>,
    /// Node selector of the build pod.
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Tolerations of the build pod.
    pub tolerations: Option<Vec<Toleration>>,
    /// Service account of the build pod (default: the namespace's `default`, with no token mounted).
    pub service_account_name: Option<String>,
    /// Priority class of the build pod.
    pub priority_class_name: Option<String>,
}

/// Where a build is.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Phase {
    /// Accepted, not yet planned.
    #[default]
    Pending,
    /// Waiting for a build slot.
    Queued,
    /// The build pod runs.
    Building,
    /// The build finished; its digest is being checked in the registry.
    Verifying,
    /// The workspace image exists with the reported digest.
    Succeeded,
    /// The build failed; see `reason` and `failure`.
    Failed,
    /// `spec.cancel` stopped it.
    Cancelled,
}

impl Phase {
    /// Whether the phase is final for a generation.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed | Phase::Cancelled)
    }
}

/// An image by reference and digest.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ImageRef {
    /// The reference (repository and tag).
    #[serde(rename = "ref")]
    pub reference: String,
    /// The manifest digest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The digest's first 12 hex digits, for `kubectl get`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub short_digest: Option<String>,
}

impl ImageRef {
    /// A reference with its digest (and short digest).
    pub fn new(reference: impl Into<String>, digest: Option<String>) -> Self {
        let short_digest = digest
            .as_deref()
            .and_then(|d| d.strip_prefix("sha256:"))
            .map(|h| h[..h.len().min(12)].to_string());
        Self { reference: reference.into(), digest, short_digest }
    }
}

/// Why a build failed, with what the build said.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BuildFailure {
    /// The reason.
    #[serde(deserialize_with = "reason_or_internal")]
    pub reason: crate::reason::Reason,
    /// One line: what failed and what to fix.
    pub message: String,
    /// The container that failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// The last lines of the build's output.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_tail: Option<String>,
}

impl BuildFailure {
    /// A failure with only a reason and a message.
    pub fn new(reason: crate::reason::Reason, message: impl Into<String>) -> Self {
        Self { reason, message: message.into(), container: None, log_tail: None }
    }
}

/// Reads a phase or reason written by this or a newer bob: a value this version does not know
/// reads as `None` instead of failing the whole object — and with it the controller's watch of
/// every ImageBuild — during an upgrade or a rollback.
fn known<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let v = Option::<serde_json::Value>::deserialize(d)?;
    Ok(v.and_then(|v| serde_json::from_value(v).ok()))
}

/// A failure's reason from a newer bob that this version does not know reads as `Internal`.
fn reason_or_internal<'de, D: serde::Deserializer<'de>>(d: D) -> Result<crate::reason::Reason, D::Error> {
    Ok(known(d)?.unwrap_or(crate::reason::Reason::Internal))
}

/// What bob knows about the build.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ImageBuildStatus {
    /// Where the build is.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "known")]
    pub phase: Option<Phase>,
    /// Why it is in this phase (CamelCase, one closed set).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "known")]
    pub reason: Option<crate::reason::Reason>,
    /// A human-readable line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Standard conditions (`Ready`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The generation this status describes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The build key (Dockerfile sources).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_key: Option<String>,
    /// Whether the workspace image existed, so nothing was built.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_hit: Option<bool>,
    /// The base image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_image: Option<ImageRef>,
    /// The workspace image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<ImageRef>,
    /// The build pod.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// The UID of the build pod, as the controller created or found it: only this very pod (not
    /// another made later under its name) is fed a credential minted from the controller's cloud
    /// identity. Only the controller may write the status (RBAC on `imagebuilds/status`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// Build pods started for this generation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<i32>,
    /// When the next attempt may start, after an infrastructure failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<Time>,
    /// When the build started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When it reached a terminal phase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Details of a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<BuildFailure>,
    /// Where each attempt's build log is kept (`bob logs NAME --attempt N` reads it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log_refs: Vec<LogRef>,
    /// How the build used the layer cache, and how many steps it took from it.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "known")]
    pub layer_cache: Option<crate::layer_cache::Report>,
}

/// Where an attempt's log is: a `BuildLog` of the ImageBuild's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct LogRef {
    /// The attempt of this generation.
    pub attempt: i32,
    /// The `BuildLog` (named after the build pod).
    pub build_log: String,
}

/// The CRDs as YAML, as `bob crd` prints them and `crds/imagebuild.yaml` holds them: the
/// ImageBuild, then the BuildLog its builds' logs are kept in.
pub fn crd_yaml() -> String {
    let ib = serde_saphyr::to_string(&ImageBuild::crd()).expect("the CRD serialises");
    let log = serde_saphyr::to_string(&crate::logs::store::BuildLog::crd()).expect("the CRD serialises");
    format!("{ib}---\n{log}")
}
