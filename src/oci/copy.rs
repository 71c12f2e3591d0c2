//! Registry-to-registry image copy: the manifest bytes are pushed as they are (so the digest is
//! kept), indexes are copied with every platform, blobs that exist are skipped, blobs on the same
//! registry are mounted, and the rest are streamed through with their digest verified on the way.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{StreamExt, stream};

use super::Reference;
use super::blob;
use super::client::{Client, Error, Manifest};
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

/// Deepest nesting of indexes a copy follows. The OCI image spec lets an index name other
/// indexes and sets no limit; real images use one level (a multi-platform index), nested
/// artifact indexes two or three. Eight is far above that and keeps a hostile chain from
/// exhausting the stack.
pub const MAX_INDEX_DEPTH: usize = 8;

/// Most manifests one copy takes (a multi-platform image with attestations has a few dozen).
pub const MAX_MANIFESTS: usize = 1000;

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
    walk(client, src, root.clone(), 0, &mut plan).await?;
    progress.blobs_total.store(plan.blobs.len() as u64, Ordering::Relaxed);
    // On the first failure the others are told to stop, and each ends its own upload (a
    // dropped request would leave its session open at the destination with no way to cancel
    // it: distribution refuses a cancel whose state is older than the bytes it received).
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let results: Vec<_> = stream::iter(plan.blobs.values())
        .map(|d| {
            let blob = blob::Blob { client, src, dst, descriptor: d, progress, stop: stopped.clone() };
            let stop = &stop;
            async move {
                let result = blob.copy().await;
                if result.is_err() {
                    stop.send_replace(true);
                }
                result
            }
        })
        .buffer_unordered(opts.jobs.max(1))
        .collect()
        .await;
    if let Some(e) = blob::first_failure(results) {
        return Err(e);
    }
    let (host, repo) = (dst.registry(), dst.repository());
    let count = plan.manifests.len();
    for m in &plan.manifests {
        let reference = if m.digest == root.digest { dst_reference.as_str() } else { m.digest.as_str() };
        client.put_manifest(host, repo, reference, m).await?;
    }
    Ok(report(count, false))
}

/// Collects the manifests under `m` (children first) and their blobs; `m` is `depth` indexes
/// below the root.
async fn walk(
    client: &Client,
    src: &Reference,
    m: Manifest,
    depth: usize,
    plan: &mut Plan,
) -> Result<(), Error> {
    let parsed = manifest::parse(&m.media_type, &m.bytes)
        .map_err(|source| Error::Manifest { what: format!("{} ({})", src.whole(), m.digest), source })?;
    match &parsed {
        Parsed::Index { .. } if depth >= MAX_INDEX_DEPTH => {
            return Err(Error::IndexTooDeep { what: src.whole(), max: MAX_INDEX_DEPTH });
        }
        Parsed::Index { manifests } => {
            for child in manifests {
                if plan.manifests.iter().any(|p| p.digest == child.digest) {
                    continue;
                }
                if plan.manifests.len() + 1 >= MAX_MANIFESTS {
                    return Err(Error::TooManyManifests { what: src.whole(), max: MAX_MANIFESTS });
                }
                let child_ref = Reference::with_digest(
                    src.registry().to_string(),
                    src.repository().to_string(),
                    child.digest.clone(),
                );
                let cm = client.manifest(&child_ref).await?;
                Box::pin(walk(client, src, cm, depth + 1, plan)).await?;
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

/// Copies with a progress display (a redrawn line on a TTY, else a log line every few seconds
/// while bytes move); used by `bob copy` and by phase 2 of `bob build`.
pub async fn copy_with_progress(
    client: &Client,
    src: &Reference,
    dst: &Reference,
    jobs: usize,
) -> Result<CopyReport, Error> {
    let progress = Arc::new(Progress::default());
    let ticker = tokio::spawn(show_progress(progress.clone()));
    let result = copy(client, src, dst, &CopyOptions { jobs }, &progress).await;
    ticker.abort();
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[2K");
    }
    result
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

async fn show_progress(p: Arc<Progress>) {
    let tty = std::io::stderr().is_terminal();
    let every = if tty { Duration::from_millis(200) } else { Duration::from_secs(5) };
    let mut last = u64::MAX;
    loop {
        tokio::time::sleep(every).await;
        let (done, total) = (p.blobs_done.load(Ordering::Relaxed), p.blobs_total.load(Ordering::Relaxed));
        let (sent, bytes) = (p.bytes_sent.load(Ordering::Relaxed), p.bytes_total.load(Ordering::Relaxed));
        let line = format!("{done}/{total} blobs, {:.1}/{:.1} MiB", mib(sent), mib(bytes));
        if tty {
            eprint!("\r\x1b[2Kcopying: {line}");
        } else if sent != last {
            tracing::info!("copying: {line}");
        }
        last = sent;
    }
}
