//! One blob of a copy: skip it when the destination has it, mount it within one registry, or
//! stream it through with its digest verified on the way. An upload that does not complete is
//! cancelled, on every failure path, and never left open at the destination.
//!
//! The bytes go up in one chunked `PATCH` and the upload is completed by a bodiless `PUT`. A
//! source that fails, a digest that does not match, or a stop because another blob failed ends
//! the `PATCH` body early but cleanly, so the registry answers with the session's current state
//! and the session can be cancelled with it. (A dropped request would leave the registry with
//! bytes newer than any state bob holds, and distribution refuses to cancel such a session.)

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use futures::{StreamExt, stream};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use url::Url;

use super::Reference;
use super::client::{Client, Error, Mount};
use super::copy::Progress;
use super::manifest::{self, Descriptor};

/// Why one blob was not copied.
pub(super) enum Failure {
    /// It failed.
    Failed(Error),
    /// Another blob failed first, so this one stopped.
    Stopped,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Failed(e)
    }
}

/// The first real failure among blob results, if any.
pub(super) fn first_failure(results: Vec<Result<(), Failure>>) -> Option<Error> {
    let mut stopped = false;
    for r in results {
        match r {
            Err(Failure::Failed(e)) => return Some(e),
            Err(Failure::Stopped) => stopped = true,
            Ok(()) => {}
        }
    }
    // A stop always follows a failure, which is returned above.
    debug_assert!(!stopped, "a blob stopped without a failure");
    None
}

/// What went wrong while the body streamed; the `PATCH` itself ended cleanly.
enum Interrupted {
    /// The bytes do not hash to the digest (or are too many or too few).
    Mismatch(String),
    /// The source failed mid-blob.
    Source(reqwest::Error),
    /// Another blob failed.
    Stopped,
}

/// One blob to copy from `src` to `dst`.
pub(super) struct Blob<'a> {
    pub client: &'a Client,
    pub src: &'a Reference,
    pub dst: &'a Reference,
    pub descriptor: &'a Descriptor,
    pub progress: &'a Arc<Progress>,
    /// Becomes `true` when another blob of the copy failed.
    pub stop: watch::Receiver<bool>,
}

impl Blob<'_> {
    /// Makes the blob exist at the destination: skip, mount, or stream it through.
    pub async fn copy(mut self) -> Result<(), Failure> {
        if *self.stop.borrow() {
            return Err(Failure::Stopped);
        }
        let (client, d, progress) = (self.client, self.descriptor, self.progress);
        let (host, repo) = (self.dst.registry(), self.dst.repository());
        let done = || progress.blobs_done.fetch_add(1, Ordering::Relaxed);
        // On one registry a mount answers for an existing blob too, so it goes first (one
        // request, not two); elsewhere a HEAD saves a transfer.
        let same_registry = self.src.registry() == host && self.src.repository() != repo;
        let location = if same_registry {
            match client.mount(host, repo, self.src.repository(), &d.digest).await? {
                Mount::Mounted => {
                    progress.blobs_mounted.fetch_add(1, Ordering::Relaxed);
                    done();
                    tracing::debug!(digest = %d.digest, "blob mounted");
                    return Ok(());
                }
                Mount::Upload(url) => match client.blob_exists(host, repo, &d.digest).await {
                    Ok(true) => {
                        client.cancel_upload(host, repo, url).await;
                        self.skipped();
                        return Ok(());
                    }
                    Ok(false) => url,
                    Err(e) => {
                        client.cancel_upload(host, repo, url).await;
                        return Err(e.into());
                    }
                },
            }
        } else if client.blob_exists(host, repo, &d.digest).await? {
            self.skipped();
            return Ok(());
        } else {
            client.start_upload(host, repo).await?
        };
        // From here on the session is open: every way out completes or cancels it.
        match self.stream(location).await {
            Ok(()) => {
                done();
                Ok(())
            }
            Err((failure, session)) => {
                client.cancel_upload(host, repo, session).await;
                Err(failure)
            }
        }
    }

    fn skipped(&self) {
        self.progress.blobs_skipped.fetch_add(1, Ordering::Relaxed);
        self.progress.blobs_done.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(digest = %self.descriptor.digest, "blob exists");
    }

    /// Streams the blob into the session at `location` and completes it; on failure, returns the
    /// session's newest URL for the cancel.
    async fn stream(&mut self, location: Url) -> Result<(), (Failure, Url)> {
        let (client, d) = (self.client, self.descriptor);
        let (host, repo) = (self.dst.registry(), self.dst.repository());
        self.progress.bytes_total.fetch_add(d.size, Ordering::Relaxed);
        let read = client.blob(self.src.registry(), self.src.repository(), &d.digest);
        let resp = tokio::select! {
            r = read => r.map_err(|e| (e.into(), location.clone()))?,
            _ = self.stop.wait_for(|s| *s) => return Err((Failure::Stopped, location)),
        };
        let interrupted = Arc::new(Mutex::new(None));
        let body = verified(resp, d.clone(), interrupted.clone(), self.progress.clone(), self.stop.clone());
        let next = client
            .patch_upload(host, repo, location.clone(), body)
            .await
            .map_err(|e| (e.into(), location))?;
        let interruption = interrupted.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(why) = interruption {
            let failure = match why {
                Interrupted::Mismatch(actual) => Failure::Failed(Error::DigestMismatch {
                    what: format!("blob from {}", self.src.whole()),
                    expected: d.digest.clone(),
                    actual,
                }),
                Interrupted::Source(source) => {
                    Failure::Failed(Error::Body { host: self.src.registry().to_string(), source })
                }
                Interrupted::Stopped => Failure::Stopped,
            };
            return Err((failure, next));
        }
        client.complete_upload(host, repo, next.clone(), &d.digest).await.map_err(|e| (e.into(), next))?;
        tracing::debug!(digest = %d.digest, size = d.size, "blob streamed");
        Ok(())
    }
}

/// The source body as an upload body that hashes what passes. It ends early but cleanly when
/// the source fails, when more bytes come than the descriptor names, or when the copy stops; at
/// its end it checks digest and size. What went wrong is left in `interrupted` for the caller,
/// which then cancels instead of completing, so a bad blob is never committed.
fn verified(
    resp: reqwest::Response,
    d: Descriptor,
    interrupted: Arc<Mutex<Option<Interrupted>>>,
    progress: Arc<Progress>,
    stop: watch::Receiver<bool>,
) -> reqwest::Body {
    let state = (resp.bytes_stream(), Sha256::new(), 0u64, stop, false);
    let s = stream::unfold(state, move |(mut inner, mut hasher, mut n, mut stop, finished)| {
        let d = d.clone();
        let interrupted = interrupted.clone();
        let progress = progress.clone();
        async move {
            if finished {
                return None;
            }
            let end = |why| {
                *interrupted.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
                None
            };
            let next = tokio::select! {
                next = inner.next() => next,
                _ = stop.wait_for(|s| *s) => return end(Interrupted::Stopped),
            };
            match next {
                Some(Ok(chunk)) => {
                    hasher.update(&chunk);
                    n += chunk.len() as u64;
                    if d.size > 0 && n > d.size {
                        return end(Interrupted::Mismatch(format!("more than {} bytes", d.size)));
                    }
                    progress.bytes_sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    Some((Ok::<_, std::io::Error>(chunk), (inner, hasher, n, stop, false)))
                }
                Some(Err(e)) => end(Interrupted::Source(e.without_url())),
                None => match check(&hasher, n, &d) {
                    Some(bad) => end(Interrupted::Mismatch(bad)),
                    None => None,
                },
            }
        }
    });
    reqwest::Body::wrap_stream(s)
}

/// What is wrong with `n` bytes hashing to `hasher` for descriptor `d`, if anything.
fn check(hasher: &Sha256, n: u64, d: &Descriptor) -> Option<String> {
    let actual = manifest::hex_digest(hasher.clone().finalize().as_slice());
    if actual != d.digest {
        Some(actual)
    } else if d.size > 0 && n != d.size {
        Some(format!("{n} bytes, not {}", d.size))
    } else {
        None
    }
}
