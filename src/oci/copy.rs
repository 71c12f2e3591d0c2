//! Registry-to-registry image copy: the manifest bytes are pushed as they are (so the digest is
//! kept), indexes are copied with every platform, blobs that exist are skipped, blobs on the same
//! registry are mounted, and the rest are streamed through with their digest verified on the way.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::{StreamExt, TryStreamExt, stream};
use sha2::{Digest, Sha256};

use super::Reference;
use super::client::{Client, Error, Manifest, Mount};
use super::manifest::{self, Descriptor, Parsed};

/// Tunables of a copy.
#[derive(Clone, Debug)]
pub struct CopyOptions {
    /// Blobs copied at once.
    pub jobs: usize,
}

impl Default for CopyOptions {
    fn default() -> Self {
        Self { jobs: 8 }
    }
}

/// Counters of a running copy, readable while it runs (progress display).
#[derive(Debug, Default)]
pub struct Progress {
    /// Blobs the copy has to look at.
    pub blobs_total: AtomicU64,
    /// Blobs finished (skipped, mounted or streamed).
    pub blobs_done: AtomicU64,
    /// Blobs that already existed at the destination.
    pub blobs_skipped: AtomicU64,
    /// Blobs mounted from another repository of the destination registry.
    pub blobs_mounted: AtomicU64,
    /// Bytes of the blobs that have to be streamed.
    pub bytes_total: AtomicU64,
    /// Bytes streamed so far.
    pub bytes_sent: AtomicU64,
}

/// What a finished copy did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyReport {
    /// Digest of the copied (root) manifest, the same at source and destination.
    pub digest: String,
    /// Its media type.
    pub media_type: String,
    /// Manifests pushed (1 for an image; the index plus its children otherwise).
    pub manifests: usize,
    /// Distinct blobs looked at.
    pub blobs: u64,
    /// Blobs that already existed.
    pub skipped: u64,
    /// Blobs mounted.
    pub mounted: u64,
    /// Bytes streamed.
    pub bytes: u64,
    /// The destination already had this manifest under the requested reference.
    pub up_to_date: bool,
}

/// Everything a copy must push: manifests children-first, and the distinct blobs.
#[derive(Default)]
struct Plan {
    manifests: Vec<Manifest>,
    blobs: BTreeMap<String, Descriptor>,
}

/// Copies `src` to `dst`. The destination keeps the source's digest; a `dst` by digest must name
/// that digest.
pub async fn copy(
    client: &Client,
    src: &Reference,
    dst: &Reference,
    opts: &CopyOptions,
    progress: &Arc<Progress>,
) -> Result<CopyReport, Error> {
    // The source manifest and the destination's current digest are independent: ask together.
    let (root, existing) = futures::join!(client.manifest(src), client.manifest_digest(dst));
    let root = root?;
    let dst_reference = match (dst.tag(), dst.digest()) {
        (_, Some(d)) if d != root.digest => {
            return Err(Error::DigestMismatch { what: dst.whole(), expected: d.into(), actual: root.digest });
        }
        (Some(t), _) => t.to_string(),
        (None, Some(d)) => d.to_string(),
        (None, None) => "latest".to_string(),
    };
    let report = |manifests, up_to_date| CopyReport {
        digest: root.digest.clone(),
        media_type: root.media_type.clone(),
        manifests,
        blobs: progress.blobs_total.load(Ordering::Relaxed),
        skipped: progress.blobs_skipped.load(Ordering::Relaxed),
        mounted: progress.blobs_mounted.load(Ordering::Relaxed),
        bytes: progress.bytes_sent.load(Ordering::Relaxed),
        up_to_date,
    };
    if existing?.as_deref() == Some(root.digest.as_str()) {
        return Ok(report(0, true));
    }
    let mut plan = Plan::default();
    walk(client, src, root.clone(), &mut plan).await?;
    progress.blobs_total.store(plan.blobs.len() as u64, Ordering::Relaxed);
    stream::iter(plan.blobs.values())
        .map(|d| copy_blob(client, src, dst, d, progress))
        .buffer_unordered(opts.jobs.max(1))
        .try_collect::<()>()
        .await?;
    let (host, repo) = (dst.registry(), dst.repository());
    let count = plan.manifests.len();
    for m in &plan.manifests {
        let reference = if m.digest == root.digest { dst_reference.as_str() } else { m.digest.as_str() };
        client.put_manifest(host, repo, reference, m).await?;
    }
    Ok(report(count, false))
}

/// Collects the manifests under `m` (children first) and their blobs.
async fn walk(client: &Client, src: &Reference, m: Manifest, plan: &mut Plan) -> Result<(), Error> {
    let parsed = manifest::parse(&m.media_type, &m.bytes)
        .map_err(|source| Error::Manifest { what: format!("{} ({})", src.whole(), m.digest), source })?;
    match &parsed {
        Parsed::Index { manifests } => {
            for child in manifests {
                if plan.manifests.iter().any(|p| p.digest == child.digest) {
                    continue;
                }
                let child_ref = Reference::with_digest(
                    src.registry().to_string(),
                    src.repository().to_string(),
                    child.digest.clone(),
                );
                let cm = client.manifest(&child_ref).await?;
                Box::pin(walk(client, src, cm, plan)).await?;
            }
        }
        Parsed::Image { .. } => {
            for b in parsed.blobs() {
                plan.blobs.entry(b.digest.clone()).or_insert_with(|| b.clone());
            }
        }
    }
    plan.manifests.push(m);
    Ok(())
}

/// Makes one blob exist at the destination: skip, mount, or stream it through.
async fn copy_blob(
    client: &Client,
    src: &Reference,
    dst: &Reference,
    d: &Descriptor,
    progress: &Arc<Progress>,
) -> Result<(), Error> {
    let (host, repo) = (dst.registry(), dst.repository());
    let done = || progress.blobs_done.fetch_add(1, Ordering::Relaxed);
    let skipped = || {
        progress.blobs_skipped.fetch_add(1, Ordering::Relaxed);
        done();
        tracing::debug!(digest = %d.digest, "blob exists");
    };
    // On one registry a mount answers for an existing blob too, so it goes first (one request,
    // not two); elsewhere a HEAD saves a transfer.
    let same_registry = src.registry() == host && src.repository() != repo;
    let location = if same_registry {
        match client.mount(host, repo, src.repository(), &d.digest).await? {
            Mount::Mounted => {
                progress.blobs_mounted.fetch_add(1, Ordering::Relaxed);
                done();
                tracing::debug!(digest = %d.digest, "blob mounted");
                return Ok(());
            }
            Mount::Upload(url) if client.blob_exists(host, repo, &d.digest).await? => {
                client.cancel_upload(host, repo, url).await;
                skipped();
                return Ok(());
            }
            Mount::Upload(url) => url,
        }
    } else if client.blob_exists(host, repo, &d.digest).await? {
        skipped();
        return Ok(());
    } else {
        client.start_upload(host, repo).await?
    };
    progress.bytes_total.fetch_add(d.size, Ordering::Relaxed);
    let resp = client.blob(src.registry(), src.repository(), &d.digest).await?;
    let size = resp.content_length().unwrap_or(d.size);
    let mismatch = Arc::new(Mutex::new(None));
    let body = verified(resp, d.clone(), mismatch.clone(), progress);
    let result = client.put_blob(host, repo, location, &d.digest, size, body).await;
    if let Some(actual) = mismatch.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(Error::DigestMismatch {
            what: format!("blob from {}", src.whole()),
            expected: d.digest.clone(),
            actual,
        });
    }
    result?;
    done();
    tracing::debug!(digest = %d.digest, size, "blob streamed");
    Ok(())
}

/// The source body as an upload body that hashes what passes and fails at the end if the digest
/// or size is wrong, so a bad blob is never committed.
fn verified(
    resp: reqwest::Response,
    d: Descriptor,
    mismatch: Arc<Mutex<Option<String>>>,
    progress: &Arc<Progress>,
) -> reqwest::Body {
    let progress = progress.clone();
    let state = (resp.bytes_stream(), Sha256::new(), 0u64, false);
    let s = stream::unfold(state, move |(mut inner, mut hasher, mut n, finished)| {
        let d = d.clone();
        let mismatch = mismatch.clone();
        let progress = progress.clone();
        async move {
            if finished {
                return None;
            }
            match inner.next().await {
                Some(Ok(chunk)) => {
                    hasher.update(&chunk);
                    n += chunk.len() as u64;
                    // With a Content-Length the client stops polling after the last byte, so
                    // the check runs when the size is reached, before that chunk is passed on.
                    if d.size > 0
                        && n >= d.size
                        && let Some(bad) = check(&hasher, n, &d)
                    {
                        *mismatch.lock().unwrap_or_else(|e| e.into_inner()) = Some(bad);
                        let err = std::io::Error::other("blob digest mismatch");
                        return Some((Err(err), (inner, hasher, n, true)));
                    }
                    progress.bytes_sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    Some((Ok(chunk), (inner, hasher, n, false)))
                }
                Some(Err(e)) => Some((Err(std::io::Error::other(e)), (inner, hasher, n, true))),
                None => match check(&hasher, n, &d) {
                    Some(bad) => {
                        *mismatch.lock().unwrap_or_else(|e| e.into_inner()) = Some(bad);
                        let err = std::io::Error::other("blob digest mismatch");
                        Some((Err(err), (inner, hasher, n, true)))
                    }
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
