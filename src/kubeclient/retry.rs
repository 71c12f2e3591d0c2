//! The retry layer of bob's Kubernetes client: a request that got no answer (connection closed or
//! reset, refused), or a 429, 500, 502, 503 or 504, is sent again after an exponential, jittered
//! backoff that honours `Retry-After`, within a bound of tries and of time, so one reconcile is
//! never stalled for long. Every method is retried: bob's writes are idempotent by design
//! (deterministic names read back on 409, server-side apply, UID preconditions on deletes) —
//! except a JSON patch, which is retried only after a 429 (never applied).

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use http::{Request, Response, StatusCode};
use kube::client::Body;
use tokio::time::Instant;
use tower::{BoxError, Layer, Service, ServiceExt};

/// How requests are retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The wait before the first retry; it doubles per retry.
    pub base: Duration,
    /// The longest backoff wait.
    pub cap: Duration,
    /// Tries at most, the first included.
    pub max_tries: u32,
    /// No retry is started whose wait would end later than this after the first try started:
    /// it bounds how long a write can still land after its caller checked it may write
    /// (`controller::ha` counts on it).
    pub budget: Duration,
}

impl Default for Policy {
    /// 100 ms doubling to 2 s, 6 tries within 3.5 s: the backoff waits alone add up to at most
    /// 3.1 s, so a fault series that fast answers never exhausts the budget before the tries.
    fn default() -> Self {
        Self {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(2),
            max_tries: 6,
            budget: Duration::from_millis(3500),
        }
    }
}

/// What a try got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// No answer: the connection failed or closed before a response head arrived.
    NoResponse,
    /// An answer, with its `Retry-After` (seconds form) if it had one.
    Status(StatusCode, Option<Duration>),
}

impl Outcome {
    /// A bounded label for logs and metrics: `no_response`, or the status code.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::NoResponse => "no_response",
            Outcome::Status(s, _) => match s.as_u16() {
                429 => "429",
                500 => "500",
                502 => "502",
                503 => "503",
                504 => "504",
                _ => "other",
            },
        }
    }

    fn retryable(&self) -> bool {
        match self {
            Outcome::NoResponse => true,
            Outcome::Status(s, _) => matches!(s.as_u16(), 429 | 500 | 502 | 503 | 504),
        }
    }
}

impl Policy {
    /// The backoff before retry `retry` (1 for the first), `jitter` in [0, 1]: between half and
    /// all of `base * 2^(retry-1)` capped at `cap` ("equal jitter": never near zero, so a burst
    /// of clients does not come back at once, and never above the cap).
    pub fn backoff(&self, retry: u32, jitter: f64) -> Duration {
        let full = self.base.saturating_mul(1u32 << retry.saturating_sub(1).min(20)).min(self.cap);
        full / 2 + full.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
    }

    /// The wait before the next try after `tries` tries, the first started `elapsed` ago, the
    /// last with `outcome`; `None`: give the caller what the last try got.
    pub fn next_wait(
        &self,
        tries: u32,
        elapsed: Duration,
        outcome: &Outcome,
        jitter: f64,
    ) -> Option<Duration> {
        if !outcome.retryable() || tries >= self.max_tries {
            return None;
        }
        let backoff = self.backoff(tries, jitter);
        let wait = match outcome {
            Outcome::Status(_, Some(after)) => backoff.max(*after),
            _ => backoff,
        };
        // A Retry-After beyond the budget is not waited for: the caller gets the 429 and
        // requeues, rather than one reconcile holding a worker for it.
        (elapsed + wait <= self.budget).then_some(wait)
    }
}

/// Called once per retry with what the try before it got (a metric counts them).
pub type Observer = Arc<dyn Fn(&Outcome) + Send + Sync>;

/// The tower layer: wraps kube's service stack (outermost, so every try is authenticated and
/// traced again). The inner stack is buffered to be cloneable per request.
#[derive(Clone)]
pub struct RetryLayer {
    policy: Policy,
    observer: Option<Observer>,
}

impl RetryLayer {
    /// A layer with `policy`, reporting retries to `observer`.
    pub fn new(policy: Policy, observer: Option<Observer>) -> Self {
        Self { policy, observer }
    }
}

/// kube's inner service, made cloneable.
pub type Buffered<S> = tower::buffer::Buffer<Request<Body>, <S as Service<Request<Body>>>::Future>;

impl<S, B> Layer<S> for RetryLayer
where
    S: Service<Request<Body>, Response = Response<B>, Error = BoxError> + Send + 'static,
    S::Future: Send + 'static,
{
    type Service = Retry<Buffered<S>>;

    fn layer(&self, inner: S) -> Self::Service {
        // Every request passes through kube's own buffer first, so this one never fills up.
        let inner = tower::buffer::Buffer::new(inner, 1024);
        Retry { inner, policy: self.policy, observer: self.observer.clone() }
    }
}

/// The retrying service.
#[derive(Clone)]
pub struct Retry<S> {
    inner: S,
    policy: Policy,
    observer: Option<Observer>,
}

impl<S, B> Service<Request<Body>> for Retry<S>
where
    S: Service<Request<Body>, Response = Response<B>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<B>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<B>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // The instance that was polled ready sends the first try; the clone stays for the next call.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(send(inner, req, self.policy, self.observer.clone()))
    }
}

async fn send<S, B>(
    mut inner: S,
    req: Request<Body>,
    policy: Policy,
    observer: Option<Observer>,
) -> Result<Response<B>, BoxError>
where
    S: Service<Request<Body>, Response = Response<B>, Error = BoxError> + Clone,
{
    let start = Instant::now();
    // A watch or a followed log is a stream: once its head has arrived, the caller owns it (the
    // watcher resumes with its own backoff); only a failed connect is retried.
    let streaming = is_stream(&req);
    // A JSON patch (`add /spec/containers/-`) applied twice is not the same as once: when it may
    // have been applied (no answer, a 5xx) it is not sent again; a 429 was never applied.
    let once = is_json_patch(&req);
    // A body that cannot be cloned (a stream) cannot be sent twice.
    let copy = replica(&req);
    let mut result = inner.call(req).await;
    let mut tries = 1;
    loop {
        let outcome = match &result {
            Ok(_) if streaming => return result,
            Ok(resp) => Outcome::Status(resp.status(), retry_after(resp)),
            Err(e) if no_response(e.as_ref()) => Outcome::NoResponse,
            Err(_) => return result,
        };
        if once && !matches!(outcome, Outcome::Status(s, _) if s == StatusCode::TOO_MANY_REQUESTS) {
            return result;
        }
        // Made before the wait: a reference to a request (its body is not Sync) may not be held
        // across it.
        let Some(next) = copy.as_ref().and_then(replica) else { return result };
        let Some(wait) = policy.next_wait(tries, start.elapsed(), &outcome, jitter()) else { return result };
        tracing::debug!(tries, outcome = outcome.label(), ?wait, "kubernetes api request retried");
        if let Some(observe) = &observer {
            observe(&outcome);
        }
        // Dropped before the wait: an unread answer's connection is not held meanwhile.
        drop(result);
        tokio::time::sleep(wait).await;
        result = match inner.ready().await {
            Ok(svc) => svc.call(next).await,
            Err(e) => return Err(e),
        };
        tries += 1;
    }
}

/// A copy of the request to send again, if its body can be cloned.
fn replica(req: &Request<Body>) -> Option<Request<Body>> {
    let body = req.body().try_clone()?;
    let mut copy = Request::new(body);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    *copy.extensions_mut() = req.extensions().clone();
    Some(copy)
}

/// Whether the request is a JSON patch (RFC 6902), which is not idempotent.
fn is_json_patch(req: &Request<Body>) -> bool {
    let kind = req.headers().get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    kind.is_some_and(|k| k.starts_with("application/json-patch+json"))
}

/// Whether the request asks for a stream (`watch=true`, `follow=true`).
fn is_stream(req: &Request<Body>) -> bool {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .any(|kv| matches!(kv, "watch=true" | "watch=1" | "follow=true" | "follow=1"))
}

/// `Retry-After` in seconds (the HTTP-date form is not used by the API server).
fn retry_after<B>(resp: &Response<B>) -> Option<Duration> {
    let v = resp.headers().get(http::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Whether an error of kube's stack means the request got no answer: a transport error of the
/// HTTP client (connect, send, a connection closed or reset before the response head). Other
/// errors (credentials, TLS configuration) would fail again the same way.
fn no_response(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<hyper_util::client::legacy::Error>() || err.is::<hyper::Error>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// A number in [0, 1] for the jitter: std's per-instance random hash keys suffice, no RNG crate.
fn jitter() -> f64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const S500: Outcome = Outcome::Status(StatusCode::INTERNAL_SERVER_ERROR, None);

    #[test]
    fn backoff_doubles_within_half_and_whole_and_stops_at_the_cap() {
        let p = Policy::default();
        let ms = |d: Duration| d.as_millis();
        assert_eq!((ms(p.backoff(1, 0.0)), ms(p.backoff(1, 1.0))), (50, 100));
        assert_eq!((ms(p.backoff(3, 0.0)), ms(p.backoff(3, 1.0))), (200, 400));
        assert_eq!((ms(p.backoff(9, 0.0)), ms(p.backoff(9, 1.0))), (1000, 2000));
        assert_eq!(ms(p.backoff(40, 1.0)), 2000);
    }

    #[test]
    fn six_fast_failing_tries_fit_the_budget_and_a_seventh_is_not_made() {
        let p = Policy::default();
        let mut elapsed = Duration::ZERO;
        for tries in 1..p.max_tries {
            elapsed += p.next_wait(tries, elapsed, &Outcome::NoResponse, 1.0).expect("a retry");
        }
        assert!(elapsed <= Duration::from_millis(3100));
        assert_eq!(p.next_wait(p.max_tries, elapsed, &Outcome::NoResponse, 1.0), None);
    }

    #[test]
    fn which_answers_are_retried() {
        let p = Policy::default();
        for code in [429, 500, 502, 503, 504] {
            let o = Outcome::Status(StatusCode::from_u16(code).unwrap(), None);
            assert!(p.next_wait(1, Duration::ZERO, &o, 0.5).is_some(), "{code}");
        }
        for code in [200, 201, 404, 409, 422, 501] {
            let o = Outcome::Status(StatusCode::from_u16(code).unwrap(), None);
            assert_eq!(p.next_wait(1, Duration::ZERO, &o, 0.5), None, "{code}");
        }
        assert!(p.next_wait(1, Duration::ZERO, &S500, 0.5).is_some());
    }

    #[test]
    fn retry_after_is_honoured_within_the_budget_only() {
        let p = Policy::default();
        let after = |s| Outcome::Status(StatusCode::TOO_MANY_REQUESTS, Some(Duration::from_secs(s)));
        assert_eq!(p.next_wait(1, Duration::ZERO, &after(1), 0.0), Some(Duration::from_secs(1)));
        assert_eq!(p.next_wait(1, Duration::from_secs(3), &after(1), 0.0), None);
        assert_eq!(p.next_wait(1, Duration::ZERO, &after(30), 0.0), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_json_patch_that_may_have_been_applied_is_not_sent_again() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        for (kind, again) in [("application/json-patch+json", false), ("application/apply-patch+yaml", true)]
        {
            let sent = Arc::new(AtomicUsize::new(0));
            let counter = sent.clone();
            let svc = tower::service_fn(move |_: Request<Body>| {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, SeqCst);
                    Ok::<_, BoxError>(Response::builder().status(500).body(Body::empty()).unwrap())
                }
            });
            let req = Request::patch("/apis/bob.dev/v1alpha1/namespaces/n/buildlogs/l")
                .header(http::header::CONTENT_TYPE, kind)
                .body(Body::from(b"[]".to_vec()))
                .unwrap();
            let _ = send(svc, req, Policy::default(), None).await;
            assert_eq!(sent.load(SeqCst) > 1, again, "{kind}: sent {} times", sent.load(SeqCst));
        }
    }

    #[test]
    fn streams_are_told_apart_by_their_query() {
        let req = |q: &str| Request::get(format!("/api/v1/pods?{q}")).body(Body::empty()).unwrap();
        assert!(is_stream(&req("labelSelector=a&watch=true&resourceVersion=1")));
        assert!(is_stream(&req("follow=true&container=build")));
        assert!(!is_stream(&req("watch=false&limit=1")));
    }

    #[test]
    fn jitter_stays_in_range() {
        assert!((0..1000).map(|_| jitter()).all(|j| (0.0..=1.0).contains(&j)));
    }
}
