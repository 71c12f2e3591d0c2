//! What a decision takes and gives: the facts a reconcile observes (`Observed`, asked for one
//! `Need` at a time) and the `Transition` it ends in (status, effects, when to look again).

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;

use super::plan::{Invalid, Plan, PlanConfig, Resolved};
use super::policy::Policy;
use crate::crd::{ImageBuildStatus, Phase};
use crate::oci::Reference;
use crate::reason::Reason;

/// How long a running build waits between looks when no pod event comes.
pub const POLL: Duration = Duration::from_secs(60);
/// How long a finished build waits before verifying again when the registry did not answer.
pub const VERIFY_RETRY: Duration = Duration::from_secs(15);

/// A reason with the line that explains it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The class.
    pub reason: Reason,
    /// What happened and what to do.
    pub message: String,
}

impl Failure {
    /// A failure for `reason`.
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self { reason, message: message.into() }
    }

    /// A call to the Kubernetes API that failed: what could not be done, and the error.
    pub fn api(what: &str, e: &kube::Error) -> Self {
        Self::new(Reason::ApiUnavailable, format!("cannot {what}: {e}"))
    }
}

/// A registry's answer to "which digest is at this reference": `None` when nothing is.
pub type Lookup = Result<Option<String>, Failure>;

/// Where the build's registry credential comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The Secret the spec names (`spec.registryAuth`), or none (anonymous registries).
    FromSpec,
    /// Minted for this build from the controller's cloud identity (src/cloud): the pod gets a
    /// Secret of its own, written when it is created.
    Minted,
}

/// The API server's answer to creating the build pod.
#[derive(Clone, Debug, PartialEq)]
pub enum Created {
    /// Stored by this create, as admission left it.
    New(Box<Pod>),
    /// A pod of that name exists (read back after a 409): made by another ImageBuild of the same
    /// key, or by this one before an answer was lost.
    Exists(Box<Pod>),
    /// Refused by admission (Pod Security, quota, a webhook) or validation.
    Refused {
        /// The HTTP status.
        code: u16,
        /// The API server's message.
        message: String,
    },
}

/// The build slots, when the installation limits them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slots {
    /// `None` when this build may start now; else its 1-based place in line.
    pub position: Option<usize>,
    /// Build pods running.
    pub running: usize,
    /// The limit.
    pub max: usize,
}

/// What a reconcile has looked at so far; each fact at most once, in the order `decide` asks.
/// Observing only reads: the one write whose answer is a fact (`created`) is `Step::Attempt`.
#[derive(Clone, Debug)]
pub struct Observed {
    /// The clock.
    pub now: Timestamp,
    /// A call to the Kubernetes API failed; nothing else can be trusted this time.
    pub api_error: Option<Failure>,
    /// The registry (and git) credentials: usable and where from, or why not.
    pub credentials: Option<Result<Access, Failure>>,
    /// A credential was minted for this build from the controller's cloud identity (for its
    /// repositories, or for the images its Dockerfile reads, known once resolved).
    pub minted: bool,
    /// Digests, commit and Dockerfile the plan needs.
    pub resolved: Option<Result<Resolved, Failure>>,
    /// The plan (key, references, the finished pod), made once from `resolved` by the engine.
    pub plan: Option<Result<Box<Plan>, Invalid>>,
    /// The workspace image, if it exists (a cache hit).
    pub cache: Option<Lookup>,
    /// Build slots.
    pub slots: Option<Slots>,
    /// The outcome of creating the build pod.
    pub created: Option<Created>,
    /// The build pod of the attempt (followed, or looked for before one is created), if it exists.
    pub pod: Option<Option<Pod>>,
    /// The workspace image after a build that reported success.
    pub verified: Option<Lookup>,
    /// The last lines of the build container (for a cancel).
    pub log_tail: Option<Option<String>>,
}

impl Observed {
    /// Nothing observed yet, at `now`.
    pub fn at(now: Timestamp) -> Self {
        Self {
            now,
            api_error: None,
            credentials: None,
            minted: false,
            resolved: None,
            plan: None,
            cache: None,
            slots: None,
            created: None,
            pod: None,
            verified: None,
            log_tail: None,
        }
    }
}

/// Something to look at before deciding.
#[derive(Clone, Debug, PartialEq)]
pub enum Need {
    /// The Secrets the spec names.
    Credentials,
    /// Digests, commit and Dockerfile.
    Resolve,
    /// Whether the workspace image exists.
    Cache(Reference),
    /// Whether a build slot is free for a new pod.
    Slots,
    /// The build pod of this name.
    Pod(String),
    /// The workspace image after a reported success.
    Verify(Reference),
    /// The build container's last lines.
    LogTail(String),
}

/// Counted by the metrics.
#[derive(Clone, Debug, PartialEq)]
pub enum Count {
    /// A terminal phase was reached; the build took this long since it started.
    Finished {
        /// `Succeeded`, `Failed` or `Cancelled`.
        phase: Phase,
        /// Why.
        reason: Reason,
        /// Seconds since `status.startTime`.
        seconds: Option<f64>,
    },
    /// A build pod was created (or joined) after waiting this long.
    PodStarted {
        /// Created rather than joined.
        created: bool,
        /// Seconds since `status.startTime`.
        waited: f64,
    },
    /// A failed attempt is retried.
    Retry(Reason),
    /// A verified build with a layer cache: how it used it and the steps it took from it.
    LayerCache {
        /// How the build used the cache.
        mode: crate::layer_cache::Mode,
        /// Steps taken from a cache instead of run.
        hits: u32,
    },
}

/// What the transition does besides writing the status.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// An Event on the ImageBuild.
    Event {
        /// Warning rather than Normal.
        warning: bool,
        /// The Event's reason.
        reason: String,
        /// Its note.
        note: String,
    },
    /// Delete this finished pod once no other owner needs it (and its log is shipped).
    Cleanup(String),
    /// Add this ImageBuild to the owners of a pod another ImageBuild of the same key created.
    /// Done before the status is written.
    Own(String),
    /// Write the credential minted for this pod into the pod's Secret (owned by the pod). Done
    /// before the status is written: the pod waits for it.
    Credential {
        /// The pod.
        pod: String,
        /// Its UID (the Secret's owner).
        uid: String,
    },
    /// Delete this pod, if it is still the one of this UID (it was given a cloud identity at
    /// admission). Done before the status is written: a failed delete is tried again.
    DeletePod {
        /// The pod.
        pod: String,
        /// Its UID (the delete's precondition).
        uid: String,
    },
    /// Ship the log of this build pod (attempt `attempt`) into its `BuildLog` while it runs, if
    /// that is not already being done.
    ShipLog {
        /// The pod.
        pod: String,
        /// Its attempt.
        attempt: u32,
    },
    /// A metric.
    Count(Count),
}

impl Effect {
    /// Whether the effect is done before the status is written: what the new status claims (an
    /// owner, a credential, an unsafe pod gone) must be true before it is recorded, so that a
    /// failed write leaves the old status and the next reconcile decides the same again.
    pub fn before_status(&self) -> bool {
        matches!(self, Effect::Own(_) | Effect::Credential { .. } | Effect::DeletePod { .. })
    }
}

/// When to look again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Only when something changes (terminal).
    Change,
    /// After this long.
    After(Duration),
}

/// The outcome of a reconcile.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    /// The status to write, `None` when it would not change.
    pub status: Option<ImageBuildStatus>,
    /// Done after the status is written.
    pub effects: Vec<Effect>,
    /// When to look again.
    pub next: Next,
}

/// One step of deciding.
// A step lives for one call of `decide`, on the stack: boxing the transition buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Look at this, then decide again.
    Observe(Need),
    /// Plan the build from what was resolved (pure, done once by the engine), then decide again.
    Plan,
    /// Create this build pod, then decide again with the answer (`Observed::created`): the one
    /// write of a reconcile whose outcome is a fact, at most once per reconcile.
    Attempt(Box<Pod>),
    /// Done: act on it.
    Act(Transition),
}

/// Settings of the installation that decisions use.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The plan's settings.
    pub plan: PlanConfig,
    /// Retries and cleanup.
    pub policy: Policy,
    /// Queue time limit when the spec sets none.
    pub queue_timeout: Duration,
    /// Build pods that may run at once (`None`: no limit).
    pub max_concurrent_builds: Option<usize>,
}
