//! The controller's metrics (prometheus-client, prefix `bob`) and its admin HTTP surface:
//! `/metrics`, `/healthz`, `/readyz`. Every label set is bounded: outcomes are phases, reasons
//! come from the closed `Reason` set, errors from `Error::label`. docs/operations.md lists them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::step::Count;

/// Labels of a finished build.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// Succeeded, Failed or Cancelled.
    pub outcome: String,
    /// The status reason.
    pub reason: String,
}

/// A registry answer's status class.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// `2xx`, `3xx`, `4xx`, `5xx`, or `error` (no answer).
    pub status: String,
}

impl StatusLabel {
    /// The class of an HTTP status (0: no answer).
    pub fn of(status: u16) -> Self {
        let status = match status {
            0 => "error".to_string(),
            s => format!("{}xx", s / 100),
        };
        Self { status }
    }
}

/// How a build used the layer cache (`crate::layer_cache::Mode`, four values).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabel {
    /// `ReadWrite`, `ReadOnly`, `WriteOnly` or `Off`.
    pub mode: String,
}

/// A single bounded label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// The reason or error label.
    pub reason: String,
}

/// Every metric the controller keeps.
pub struct Metrics {
    registry: Registry,
    /// ImageBuilds that reached a terminal phase, by outcome and reason.
    pub builds: Family<OutcomeLabels, Counter>,
    /// Seconds from an ImageBuild's start to its terminal phase.
    pub build_duration: Histogram,
    /// Build pods created (shared pods once).
    pub pods_created: Counter,
    /// ImageBuilds that joined a pod another ImageBuild of the same key created.
    pub pods_joined: Counter,
    /// New attempts after infrastructure failures, by the failure's reason.
    pub retries: Family<ReasonLabel, Counter>,
    /// Failed reconciles, by error label.
    pub reconcile_errors: Family<ReasonLabel, Counter>,
    /// Registry answers of the controller's own checks, by status class.
    pub registry_requests: Family<StatusLabel, Counter>,
    /// ImageBuilds waiting for a build slot (set when the queue is consulted).
    pub queue_depth: Gauge,
    /// Seconds from an ImageBuild's start to its build pod (queue and resolution time).
    pub queue_wait: Histogram,
    /// 1 while this replica leads (reconciles), 0 while it stands by.
    pub leader: Gauge,
    /// Verified builds with a layer cache, by how they used it.
    pub layer_cache_builds: Family<ModeLabel, Counter>,
    /// Build steps taken from a layer cache instead of run, in verified builds.
    pub layer_cache_hits: Counter,
    /// Kubernetes API requests sent again, by what the try before got (`no_response`, `429`,
    /// `500`, `502`, `503`, `504`).
    pub api_retries: Family<ReasonLabel, Counter>,
    /// Whether the controller is watching (for /readyz).
    pub ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("bob");
        let builds = Family::<OutcomeLabels, Counter>::default();
        registry.register("builds", "ImageBuilds that reached a terminal phase", builds.clone());
        let build_duration = Histogram::new(exponential_buckets(1.0, 2.0, 14));
        registry.register(
            "build_duration_seconds",
            "Start to terminal phase of an ImageBuild",
            build_duration.clone(),
        );
        let pods_created = Counter::default();
        registry.register("pods_created", "Build pods created", pods_created.clone());
        let pods_joined = Counter::default();
        registry.register(
            "pods_joined",
            "ImageBuilds that joined a build pod of the same key",
            pods_joined.clone(),
        );
        let retries = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "build_retries",
            "New build attempts after infrastructure failures",
            retries.clone(),
        );
        let reconcile_errors = Family::<ReasonLabel, Counter>::default();
        registry.register("reconcile_errors", "Failed reconciles by error", reconcile_errors.clone());
        let leader = Gauge::default();
        registry.register("leader", "1 while this replica leads", leader.clone());
        let registry_requests = Family::<StatusLabel, Counter>::default();
        registry.register(
            "registry_requests",
            "Registry answers to the controller, by status class",
            registry_requests.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register("queue_depth", "ImageBuilds waiting for a build slot", queue_depth.clone());
        let queue_wait = Histogram::new(exponential_buckets(0.5, 2.0, 14));
        registry.register(
            "queue_wait_seconds",
            "Start of an ImageBuild to its build pod",
            queue_wait.clone(),
        );
        let layer_cache_builds = Family::<ModeLabel, Counter>::default();
        registry.register(
            "layer_cache_builds",
            "Verified builds with a layer cache, by how they used it",
            layer_cache_builds.clone(),
        );
        let layer_cache_hits = Counter::default();
        registry.register(
            "layer_cache_hits",
            "Build steps taken from a layer cache instead of run",
            layer_cache_hits.clone(),
        );
        let api_retries = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "api_retries",
            "Kubernetes API requests sent again, by what the try before got",
            api_retries.clone(),
        );
        Self {
            registry,
            layer_cache_builds,
            layer_cache_hits,
            builds,
            build_duration,
            pods_created,
            pods_joined,
            retries,
            reconcile_errors,
            leader,
            registry_requests,
            queue_depth,
            queue_wait,
            api_retries,
            ready: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    /// Counts `c`.
    pub fn count(&self, c: Count) {
        match c {
            Count::Finished { phase, reason, seconds } => {
                let labels = OutcomeLabels { outcome: format!("{phase:?}"), reason: reason.to_string() };
                self.builds.get_or_create(&labels).inc();
                if let Some(s) = seconds {
                    self.build_duration.observe(s);
                }
            }
            Count::PodStarted { created, waited } => {
                if created {
                    self.pods_created.inc()
                } else {
                    self.pods_joined.inc()
                };
                self.queue_wait.observe(waited);
            }
            Count::Retry(reason) => {
                self.retries.get_or_create(&ReasonLabel { reason: reason.to_string() }).inc();
            }
            Count::LayerCache { mode, hits } => {
                self.layer_cache_builds.get_or_create(&ModeLabel { mode: mode.as_str().into() }).inc();
                self.layer_cache_hits.inc_by(hits.into());
            }
        }
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The admin HTTP surface; tests call it without a socket.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(metrics)
}

async fn scrape(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], m.encode())
}

async fn readyz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    if m.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}
