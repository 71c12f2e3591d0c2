//! Upload sessions the proxy issued. Clients only ever see `/v2/<alias>/blobs/uploads/<id>`;
//! the upstream's real upload URL (with its `_state`) stays here, so the proxy accepts back only
//! the upload URLs it handed out and can never be used as an open relay.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use url::Url;

use super::route::Alias;

struct Session {
    alias: Alias,
    url: Url,
    touched: Instant,
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
        // An upload idle for an hour is abandoned; registries expire theirs sooner.
        Self::new(Duration::from_secs(3600), 4096)
    }
}

impl Uploads {
    /// A table that forgets sessions idle longer than `idle` and holds at most `max`.
    pub fn new(idle: Duration, max: usize) -> Self {
        Self { sessions: Mutex::default(), idle, max, counter: AtomicU64::new(0) }
    }

    /// Registers the upstream upload URL and returns the proxy's session id for it.
    pub fn issue(&self, alias: Alias, url: Url) -> String {
        let id = self.new_id();
        let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        s.retain(|_, v| now.duration_since(v.touched) < self.idle);
        if s.len() >= self.max
            && let Some(oldest) = s.iter().min_by_key(|(_, v)| v.touched).map(|(k, _)| k.clone())
        {
            s.remove(&oldest);
        }
        s.insert(id.clone(), Session { alias, url, touched: now });
        id
    }

    /// The upstream URL of session `id`, if the proxy issued it for `alias`.
    pub fn get(&self, alias: Alias, id: &str) -> Option<Url> {
        let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let session = s.get_mut(id).filter(|v| v.alias == alias && v.touched.elapsed() < self.idle)?;
        session.touched = Instant::now();
        Some(session.url.clone())
    }

    /// Records the upstream's next URL for a session (each PATCH returns a new `_state`).
    pub fn update(&self, id: &str, url: Url) {
        if let Some(v) = self.sessions.lock().unwrap_or_else(|e| e.into_inner()).get_mut(id) {
            v.url = url;
            v.touched = Instant::now();
        }
    }

    /// Forgets a finished or cancelled session.
    pub fn finish(&self, id: &str) {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }

    /// Number of open sessions.
    pub fn len(&self) -> usize {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no session is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn only_issued_ids_for_their_alias_are_accepted() {
        let u = Uploads::default();
        let id = u.issue(Alias::Target, url("http://r.test/v2/x/blobs/uploads/1?_state=a"));
        assert_eq!(id.len(), 32);
        assert!(u.get(Alias::Target, &id).is_some());
        assert!(u.get(Alias::Base, &id).is_none(), "a session is bound to its alias");
        assert!(u.get(Alias::Target, "0000").is_none());
        u.update(&id, url("http://r.test/v2/x/blobs/uploads/1?_state=b"));
        assert_eq!(u.get(Alias::Target, &id).unwrap().query(), Some("_state=b"));
        u.finish(&id);
        assert!(u.get(Alias::Target, &id).is_none());
        let other = u.issue(Alias::Target, url("http://r.test/"));
        assert_ne!(other, id);
    }

    #[test]
    fn table_is_bounded_and_sessions_expire() {
        let u = Uploads::new(Duration::from_millis(30), 2);
        let a = u.issue(Alias::Target, url("http://r.test/a"));
        let _b = u.issue(Alias::Target, url("http://r.test/b"));
        let _c = u.issue(Alias::Target, url("http://r.test/c"));
        assert_eq!(u.len(), 2);
        assert!(u.get(Alias::Target, &a).is_none(), "the oldest session was evicted");
        std::thread::sleep(Duration::from_millis(40));
        let _d = u.issue(Alias::Target, url("http://r.test/d"));
        assert_eq!(u.len(), 1, "idle sessions are dropped");
    }
}
