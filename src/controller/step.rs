//! What a decision takes and gives: the facts a reconcile observes (`Observed`, asked for one
//! `Need` at a time) and the `Transition` it ends in (status, effects, when to look again).

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;

use super::plan::{PlanConfig, Resolved};
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

/// How creating the build pod went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Created {
    /// The pod was created.
    Created,
    /// Another ImageBuild of the same key runs it; this one became an owner too.
    Joined,
    /// This ImageBuild already owned it (a status write was lost, e.g. by a restart).
    Found,
    /// The API server stored it with a cloud identity in a container (an admission webhook
    /// added one): it was deleted again.
    Unsafe {
        /// What gave which container an identity.
        leaks: Vec<String>,
    },
    /// The API server refused it.
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
#[derive(Clone, Debug)]
pub struct Observed {
    /// The clock.
    pub now: Timestamp,
    /// A call to the Kubernetes API failed; nothing else can be trusted this time.
    pub api_error: Option<Failure>,
    /// The registry (and git) credentials: usable and where from, or why not.
    pub credentials: Option<Result<Access, Failure>>,
    /// Digests, commit and Dockerfile the plan needs.
    pub resolved: Option<Result<Resolved, Failure>>,
    /// The workspace image, if it exists (a cache hit).
    pub cache: Option<Lookup>,
    /// Build slots.
    pub slots: Option<Slots>,
    /// The outcome of creating (or joining) the build pod.
    pub created: Option<Created>,
    /// The UID of the pod created, joined or found (with `created`), for the status to record.
    pub pod_uid: Option<String>,
    /// The build pod followed, if it still exists.
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
            resolved: None,
            cache: None,
            slots: None,
            created: None,
            pod_uid: None,
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
    /// Whether a build slot is free for the pod of this name.
    Slots(String),
    /// Create the build pod (or join it): an action whose outcome decides the status.
    Create(Box<Pod>),
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
