//! Upload sessions the proxy issued. Clients only ever see `/v2/<alias>/blobs/uploads/<id>`;
//! the upstream's real upload URL (with its `_state`) stays here, so the proxy accepts back only
//! the upload URLs it handed out and can never be used as an open relay.
//!
//! The table is capped: a POST beyond the cap is refused before anything is opened upstream, and
//! a live session is never evicted to make room. A session with a request in flight never
//! expires, however long its PATCH streams; one idle past the idle timeout is forgotten and its
//! upstream upload cancelled by [`sweep`].

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::StreamExt;
use http::Method;
use url::Url;

use super::Proxy;
use super::error::ProxyError;
use super::route::Alias;
use crate::oci::error::chain;
use crate::oci::token::repository_scope;
use crate::oci::transport;

/// Default cap on open sessions: a build pushes one image at a time with at most 8-16 blobs in
/// parallel; the rest is room for sessions a retried push abandoned until they expire.
pub const DEFAULT_MAX: usize = 128;

/// Default idle time after which a session is cancelled: clients send an upload's requests back
/// to back, and a request in flight keeps its session alive however long it streams.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(300);

/// Expired uploads cancelled upstream at once.
const CANCEL_CONCURRENCY: usize = 4;

struct Session {
    alias: Alias,
    /// `None` while the POST that opens it is upstream.
    url: Option<Url>,
    touched: Instant,
    in_flight: u32,
}

/// The table of open upload sessions, bounded in size and idle time.
pub struct Uploads {
    sessions: Mutex<HashMap<String, Session>>,
    idle: Duration,
    max: usize,
    counter: AtomicU64,
}

impl Default for Uploads {
    fn default() -> Self {
        Self::new(DEFAULT_IDLE, DEFAULT_MAX)
    }
}

impl Uploads {
    /// A table that expires sessions idle longer than `idle` and holds at most `max`.
    pub fn new(idle: Duration, max: usize) -> Self {
        Self { sessions: Mutex::default(), idle, max, counter: AtomicU64::new(0) }
    }

    fn sessions(&self) -> MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a place for a new session before its POST goes upstream, or refuses beyond the cap.
    /// The place is given back when the slot drops unless [`Uploads::update`] gave it a URL.
    pub fn reserve(&self, alias: Alias) -> Result<Slot<'_>, ProxyError> {
        let id = self.new_id();
        let mut s = self.sessions();
        if s.len() >= self.max {
            return Err(ProxyError::TooManyUploads { max: self.max });
        }
        s.insert(id.clone(), Session { alias, url: None, touched: Instant::now(), in_flight: 1 });
        Ok(Slot(InFlight { uploads: self, id }))
    }

    /// The upstream URL of session `id` if the proxy issued it for `alias`, marked in flight until
    /// the guard drops.
    pub fn begin(&self, alias: Alias, id: &str) -> Option<(Url, InFlight<'_>)> {
        let mut s = self.sessions();
        let session = s.get_mut(id).filter(|v| v.alias == alias)?;
        let url = session.url.clone()?;
        if session.in_flight == 0 && session.touched.elapsed() >= self.idle {
            return None;
        }
        session.in_flight += 1;
        session.touched = Instant::now();
        Some((url, InFlight { uploads: self, id: id.to_string() }))
    }

    /// Records the upstream's next URL for a session (each PATCH returns a new `_state`).
    pub fn update(&self, id: &str, url: Url) {
        if let Some(v) = self.sessions().get_mut(id) {
            v.url = Some(url);
            v.touched = Instant::now();
        }
    }

    /// Forgets a finished or cancelled session.
    pub fn finish(&self, id: &str) {
        self.sessions().remove(id);
    }

    /// Number of open sessions (and places taken by POSTs upstream).
    pub fn len(&self) -> usize {
        self.sessions().len()
    }

    /// Whether no session is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets the sessions idle past the idle timeout and returns their upstream uploads.
    pub fn take_expired(&self) -> Vec<(Alias, Url)> {
        let mut expired = Vec::new();
        self.sessions().retain(|_, v| {
            let keep = v.in_flight > 0 || v.touched.elapsed() < self.idle;
            if !keep && let Some(url) = v.url.take() {
                expired.push((v.alias, url));
            }
            keep
        });
        expired
    }

    fn end(&self, id: &str) {
        let mut s = self.sessions();
        if let Some(v) = s.get_mut(id) {
            v.in_flight = v.in_flight.saturating_sub(1);
            v.touched = Instant::now();
            if v.url.is_none() && v.in_flight == 0 {
                s.remove(id);
            }
        }
    }

    fn new_id(&self) -> String {
        // Two SipHash outputs under fresh random keys: unguessable without a new dependency.
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let a = RandomState::new().hash_one((n, nanos, std::process::id()));
        let b = RandomState::new().hash_one((nanos, n));
        format!("{a:016x}{b:016x}")
    }
}

/// A request on a session; the session cannot expire until it drops.
pub struct InFlight<'a> {
    uploads: &'a Uploads,
    id: String,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.uploads.end(&self.id);
    }
}

/// A place in the table for a session whose POST is upstream.
pub struct Slot<'a>(InFlight<'a>);

impl Slot<'_> {
    /// The session id the client will see if the upstream opens the upload.
    pub fn id(&self) -> &str {
        &self.0.id
    }
}

/// Cancels the upstream uploads of expired sessions, checking a few times per idle timeout,
/// until the task is aborted.
pub async fn sweep(proxy: Arc<Proxy>) {
    let every = (proxy.uploads.idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
    loop {
        tokio::time::sleep(every).await;
        let expired = proxy.uploads.take_expired();
        futures::stream::iter(expired)
            .for_each_concurrent(CANCEL_CONCURRENCY, |(alias, url)| proxy.cancel_upload(alias, url))
            .await;
    }
}

impl Proxy {
    /// DELETEs an abandoned upload upstream, so it holds no space or session there.
    async fn cancel_upload(&self, alias: Alias, url: Url) {
        let Ok(t) = self.alias(alias) else { return };
        let scopes = vec![repository_scope(&t.repository, true)];
        // The transport gives credentials only to the registry's own origin.
        let req = transport::Request::new(Method::DELETE, &t.host, url, scopes);
        match self.upstream.send(req).await {
            Ok(resp) => tracing::info!(
                alias = alias.name(),
                status = resp.status().as_u16(),
                "idle upload expired and cancelled upstream"
            ),
            Err(e) => tracing::warn!(
                alias = alias.name(),
                error = %chain(&e),
                "idle upload expired; cancelling it upstream failed"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    /// Opens a session as a POST answered 202 would.
    fn open(u: &Uploads, alias: Alias, location: &str) -> String {
        let slot = u.reserve(alias).unwrap();
        u.update(slot.id(), url(location));
        slot.id().to_string()
    }

    #[test]
    fn only_issued_ids_for_their_alias_are_accepted() {
        let u = Uploads::default();
        let id = open(&u, Alias::Target, "http://r.test/v2/x/blobs/uploads/1?_state=a");
        assert_eq!(id.len(), 32);
        assert!(u.begin(Alias::Target, &id).is_some());
        assert!(u.begin(Alias::Base, &id).is_none(), "a session is bound to its alias");
        assert!(u.begin(Alias::Target, "0000").is_none());
        u.update(&id, url("http://r.test/v2/x/blobs/uploads/1?_state=b"));
        assert_eq!(u.begin(Alias::Target, &id).unwrap().0.query(), Some("_state=b"));
        u.finish(&id);
        assert!(u.begin(Alias::Target, &id).is_none());
        assert_ne!(open(&u, Alias::Target, "http://r.test/"), id);
    }

    #[test]
    fn the_cap_refuses_new_sessions_and_never_evicts_live_ones() {
        let u = Uploads::new(Duration::from_secs(60), 2);
        let a = open(&u, Alias::Target, "http://r.test/a");
        let pending = u.reserve(Alias::Target).unwrap();
        assert!(matches!(u.reserve(Alias::Target), Err(ProxyError::TooManyUploads { max: 2 })));
        assert!(u.begin(Alias::Target, pending.id()).is_none(), "not usable before upstream answered");
        drop(pending);
        assert_eq!(u.len(), 1, "a POST that opened nothing gives its place back");
        let _b = open(&u, Alias::Target, "http://r.test/b");
        assert!(u.reserve(Alias::Target).is_err());
        assert!(u.begin(Alias::Target, &a).is_some(), "the first session is still there");
    }

    #[test]
    fn idle_sessions_expire_but_not_while_a_request_is_in_flight() {
        let u = Uploads::new(Duration::from_millis(50), 8);
        let busy = open(&u, Alias::Target, "http://r.test/busy");
        let idle = open(&u, Alias::Base, "http://r.test/idle");
        let (_, in_flight) = u.begin(Alias::Target, &busy).unwrap();
        std::thread::sleep(Duration::from_millis(60));
        assert!(u.begin(Alias::Base, &idle).is_none(), "expired sessions are refused at once");
        let expired = u.take_expired();
        assert_eq!(expired, vec![(Alias::Base, url("http://r.test/idle"))]);
        assert_eq!(u.len(), 1, "the session with a request in flight stays");
        drop(in_flight);
        assert!(u.take_expired().is_empty(), "the request's end counts as activity");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(u.take_expired().len(), 1);
        assert!(u.is_empty());
    }
}
