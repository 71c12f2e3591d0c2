//! The layer cache of a build, and why it never fails one ("degrade, never fail"):
//!
//! 1. **Probe** the proxy's `cache` alias before buildah runs: a manifest read (a step key that
//!    cannot exist: `404` means readable) and an upload start (`202` means writable; the upload is
//!    cancelled at once). A cache that does not answer is dropped (`--cache-from` and `--cache-to`
//!    both); one that refuses writes is only read (`--cache-to` dropped).
//! 2. buildah treats a failed cache *read* as a miss, but fails the build when a cache *push*
//!    fails. When a build with `--cache-to` fails that way, it is **run again once without any
//!    cache flag**: local storage keeps every layer the first attempt built or pulled, so the
//!    second attempt reuses them and only runs what is left.

use std::time::Duration;

use http::{Method, StatusCode};

use super::engine::CacheFlags;
use super::output::Finished;
use crate::layer_cache::{Mode, NOTE_BYTES, Report};
use crate::oci::reference;

/// A step key that buildah never writes (sha256 of nothing it hashes): the read probe's tag.
const PROBE_KEY: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Longest wait for one probe answer; the proxy's own upstream timeout is longer, so a cache
/// that does not answer in time is dropped rather than waited for.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// The layer cache the plan gave the build (`BOB_LAYER_CACHE_*`).
#[derive(Clone, Debug)]
pub struct Planned {
    /// The proxy-local repository, `<proxy>/cache`.
    pub reference: String,
    /// Read cached steps (`false` under `forceRebuild`).
    pub read: bool,
    /// buildah's `--cache-ttl`.
    pub ttl: String,
}

/// What the build does with the cache after the probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decided {
    /// The flags for buildah.
    pub flags: CacheFlags,
    /// The mode they give.
    pub mode: Mode,
    /// Why less than planned, if so.
    pub note: Option<String>,
}

impl Planned {
    /// The mode the plan asks for.
    fn mode(&self) -> Mode {
        if self.read { Mode::ReadWrite } else { Mode::WriteOnly }
    }

    /// Probes the cache through the proxy and decides the flags.
    pub async fn decide(&self) -> Decided {
        let probe = probe(&self.reference).await;
        let decided = decide(self, &probe);
        match &decided.note {
            None => tracing::info!(cache = %self.reference, mode = decided.mode.as_str(), "layer cache"),
            Some(note) => {
                tracing::warn!(cache = %self.reference, mode = decided.mode.as_str(), "layer cache: {note}")
            }
        }
        decided
    }
}

/// What the probe found: `Err` says what the cache answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// A manifest read: a miss (`404`) or a hit both mean readable.
    pub read: Result<(), Refusal>,
    /// An upload start.
    pub write: Result<(), Refusal>,
}

/// A probe that did not pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// No answer from the registry (the proxy's 502/504, or none in time): the cache is unreachable.
    pub unreachable: bool,
    /// One line: what was answered.
    pub what: String,
}

/// The flags and mode for a probe's findings (pure).
pub fn decide(planned: &Planned, probe: &Probe) -> Decided {
    let mut mode = planned.mode();
    let mut note = None;
    if let Err(r) = &probe.read
        && (r.unreachable || mode.reads())
    {
        let why = if r.unreachable { "is unreachable" } else { "cannot be read" };
        note = Some(format!("the layer cache {why} ({}): building without it", r.what));
        mode = Mode::Off;
    }
    if mode.writes()
        && let Err(r) = &probe.write
    {
        mode = mode.without_writes();
        let rest = if mode == Mode::Off { "building without it" } else { "reading only" };
        note = Some(format!("the layer cache refused writes ({}): {rest}", r.what));
    }
    let flags = CacheFlags {
        from: mode.reads().then(|| planned.reference.clone()),
        to: mode.writes().then(|| planned.reference.clone()),
        ttl: mode.reads().then(|| planned.ttl.clone()),
        // forceRebuild: nothing is reused, not even a layer in local storage.
        no_cache: !planned.read,
    };
    Decided { flags, mode, note: note.map(|n| crate::build::result::shorten(&n, NOTE_BYTES)) }
}

/// Whether a failed build failed because buildah could not write (or read) its cache: its final
/// `Error:` line says `failed pushing cache to ...`.
pub fn failed_on_cache(f: &Finished) -> Option<String> {
    let error = f.tail.iter().rev().find(|l| l.starts_with("Error: "))?;
    (error.contains("pushing cache") || error.contains("pulling cache"))
        .then(|| crate::build::result::shorten(error.trim_start_matches("Error: "), 160))
}

/// The report of a build that used `decided` and ended as `f`.
pub fn report(decided: &Decided, f: &Finished) -> Report {
    Report { mode: decided.mode, hits: f.cache_hits, note: decided.note.clone() }
}

/// The decision after a cache push failed mid-build: no cache flags at all, local layers reused.
pub fn without_cache(why: &str) -> Decided {
    let note = format!(
        "a layer cache push failed during the build ({why}): built again without the layer cache, \
         reusing the layers this build already had"
    );
    Decided {
        flags: CacheFlags::default(),
        mode: Mode::Off,
        note: Some(crate::build::result::shorten(&note, NOTE_BYTES)),
    }
}

/// The decision for a build on a `FROM` image without a build history: buildah matches cached
/// steps by their history, so the cache is left out (and not even probed).
pub fn without_history(image: &str) -> Decided {
    let note = format!(
        "{image} has no build history naming its layers: buildah 1.28 cannot match cached steps on it, \
         so it was built without the layer cache (and with --omit-history)"
    );
    Decided {
        flags: CacheFlags::default(),
        mode: Mode::Off,
        note: Some(crate::build::result::shorten(&note, NOTE_BYTES)),
    }
}

/// Reads and writes the cache once each through the proxy.
pub async fn probe(cache: &str) -> Probe {
    let failed = |what: String| Probe {
        read: Err(Refusal { unreachable: true, what: what.clone() }),
        write: Err(Refusal { unreachable: true, what }),
    };
    let r = match reference::parse(cache) {
        Ok(r) => r,
        Err(e) => return failed(crate::oci::error::chain(&e)),
    };
    let base = format!("http://{}/v2/{}", r.registry(), r.repository());
    let http = match reqwest::Client::builder().timeout(PROBE_TIMEOUT).build() {
        Ok(h) => h,
        Err(e) => return failed(e.to_string()),
    };
    let read = http
        .get(format!("{base}/manifests/{PROBE_KEY}"))
        .header(http::header::ACCEPT, crate::oci::manifest::ACCEPT)
        .send()
        .await;
    let read = match read {
        Ok(resp) if resp.status().is_success() || resp.status() == StatusCode::NOT_FOUND => Ok(()),
        other => Err(refusal(other).await),
    };
    let write = match http.request(Method::POST, format!("{base}/blobs/uploads/")).send().await {
        Ok(resp) if resp.status() == StatusCode::ACCEPTED => {
            // Cancel the upload at once; a registry that cannot (ECR) expires it.
            let location = resp.headers().get(http::header::LOCATION).and_then(|l| l.to_str().ok());
            if let Some(url) = location.and_then(|l| resp.url().join(l).ok()) {
                let _ = http.delete(url).send().await;
            }
            Ok(())
        }
        other => Err(refusal(other).await),
    };
    Probe { read, write }
}

/// What an answer that did not pass says: the status and the registry error's message.
async fn refusal(answer: Result<reqwest::Response, reqwest::Error>) -> Refusal {
    match answer {
        Err(e) => Refusal { unreachable: true, what: crate::oci::error::chain(&e) },
        Ok(resp) => {
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["errors"][0]["message"].as_str().map(String::from))
                .unwrap_or_default();
            let unreachable = matches!(status, StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT);
            let what = format!("{status}: {message}").trim_end_matches([':', ' ']).to_string();
            Refusal { unreachable, what }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(read: bool) -> Planned {
        Planned { reference: "127.0.0.1:8080/cache".into(), read, ttl: "604800s".into() }
    }

    fn refused(unreachable: bool) -> Result<(), Refusal> {
        Err(Refusal { unreachable, what: "x".into() })
    }

    #[test]
    fn a_cache_that_cannot_be_used_is_dropped_never_fatal() {
        let ok = Probe { read: Ok(()), write: Ok(()) };
        let d = decide(&planned(true), &ok);
        assert_eq!((d.mode, d.note.is_none()), (Mode::ReadWrite, true));
        assert!(d.flags.from.is_some() && d.flags.to.is_some() && !d.flags.no_cache);

        let read_only = Probe { read: Ok(()), write: refused(false) };
        let d = decide(&planned(true), &read_only);
        assert_eq!(d.mode, Mode::ReadOnly);
        assert!(d.flags.from.is_some() && d.flags.to.is_none(), "{d:?}");
        assert!(d.note.unwrap().contains("refused writes"));

        let unreachable = Probe { read: refused(true), write: refused(true) };
        let d = decide(&planned(true), &unreachable);
        assert_eq!((d.mode, &d.flags), (Mode::Off, &CacheFlags::default()));
        assert!(d.note.unwrap().contains("unreachable"));

        // forceRebuild: write only, nothing reused; a cache refusing writes leaves nothing.
        let d = decide(&planned(false), &ok);
        assert_eq!(d.mode, Mode::WriteOnly);
        assert!(d.flags.from.is_none() && d.flags.to.is_some() && d.flags.no_cache && d.flags.ttl.is_none());
        let d = decide(&planned(false), &read_only);
        assert_eq!(d.mode, Mode::Off);
        assert!(d.flags.to.is_none() && d.flags.no_cache);
        // Write only ignores a read refusal that is not unreachability.
        let d = decide(&planned(false), &Probe { read: refused(false), write: Ok(()) });
        assert_eq!(d.mode, Mode::WriteOnly);
    }
}
