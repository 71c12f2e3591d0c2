//! How a build's log is kept: a `BuildLog` object per build pod (`bob.dev/v1alpha1`), owned by the
//! ImageBuilds that used the pod, holding each container's output gzip-compressed — the start of
//! it in chunks that are only ever appended, and, once that head is full, the newest part in one
//! slot that is replaced as the build goes on. So the object is bounded, shipping is incremental,
//! and what is cut is always the middle.

use std::io::{Read, Write};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use kube::CustomResource;
use serde::{Deserialize, Serialize};

/// How much of a container's output its log keeps: the head, stored (compressed and encoded)
/// bytes, and the newest part once the head is full, bytes of text. The worst case (output that
/// does not compress) of every container of a pod stays under a MiB, so a `BuildLog` always fits
/// in etcd (whose limit is 1.5 MiB per object).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Stored bytes of the head.
    pub head: usize,
    /// Bytes of text of the tail.
    pub tail: usize,
}

/// The build container's budget: 512 KiB stored head (several MiB of typical output), 192 KiB
/// of the newest text.
pub const BUILD: Budget = Budget { head: 512 << 10, tail: 192 << 10 };
/// Any other container's (the clone's): 32 KiB stored head, 16 KiB of the newest text.
pub const SMALL: Budget = Budget { head: 32 << 10, tail: 16 << 10 };
/// Most chunks of a head: one per flush, so a log is patched at most this often before its head
/// is full (then only the tail slot changes).
pub const MAX_CHUNKS: usize = 256;
/// Text a chunk holds at most (a flush of more is split), so that decoding stays bounded.
const MAX_CHUNK_TEXT: usize = 1 << 20;

/// The log of one build pod: its containers' output, in the order they ran.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[kube(
    group = "bob.dev",
    version = "v1alpha1",
    kind = "BuildLog",
    plural = "buildlogs",
    category = "bob",
    namespaced,
    printcolumn = r#"{"name":"ImageBuild","type":"string","jsonPath":".spec.imageBuild"}"#,
    printcolumn = r#"{"name":"Attempt","type":"integer","jsonPath":".spec.attempt"}"#,
    printcolumn = r#"{"name":"Complete","type":"boolean","jsonPath":".spec.complete"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BuildLogSpec {
    /// The ImageBuild that started the pod (others of the same key may own this log too).
    pub image_build: String,
    /// The build pod.
    pub pod: String,
    /// The attempt of the generation the pod ran.
    pub attempt: i32,
    /// Each container's output, in the order they ran (`clone`, then `build`).
    #[serde(default)]
    pub containers: Vec<ContainerLog>,
    /// Whether every container ended and its output is all here (or cut as recorded).
    #[serde(default)]
    pub complete: bool,
}

/// One container's output.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContainerLog {
    /// The container.
    pub name: String,
    /// The start of the output: gzip, base64, in order; only ever appended.
    #[serde(default)]
    pub head: Vec<String>,
    /// The newest output once the head is full: gzip, base64; replaced as the build goes on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<String>,
    /// Bytes of output seen.
    #[serde(default)]
    pub bytes: i64,
    /// Bytes cut between the head and the tail.
    #[serde(default)]
    pub cut: i64,
    /// Secret values replaced by `<redacted>`.
    #[serde(default)]
    pub redacted: i64,
}

/// Why a stored log cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A chunk is not base64 or not gzip.
    #[error("the stored log of container {container} is damaged")]
    Damaged {
        /// The container.
        container: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Builds one container's log as output arrives: what to patch after each flush.
#[derive(Debug)]
pub struct Writer {
    log: ContainerLog,
    budget: Budget,
    head_full: bool,
    pending: String,
    tail: String,
}

impl Writer {
    /// A writer for `container` within `budget`, continuing `resumed` (what a previous
    /// controller stored).
    pub fn new(container: &str, budget: Budget, resumed: Option<ContainerLog>) -> Self {
        let log = resumed.unwrap_or_else(|| ContainerLog { name: container.into(), ..Default::default() });
        let head_full = log.tail.is_some();
        // A resumed tail is kept as it is; new output follows it.
        let tail = log.tail.as_deref().and_then(|t| decode_chunk(t).ok()).unwrap_or_default();
        Self { log, budget, head_full, pending: String::new(), tail }
    }

    /// Takes a line of output (without its newline).
    pub fn line(&mut self, text: &str) {
        self.log.bytes += text.len() as i64 + 1;
        if !self.head_full && self.pending.len() + text.len() < MAX_CHUNK_TEXT {
            self.pending.push_str(text);
            self.pending.push('\n');
            return;
        }
        self.push_tail(text);
        self.tail.push('\n');
        self.trim_tail();
    }

    fn push_tail(&mut self, text: &str) {
        if !self.pending.is_empty() {
            // The head is full, or this chunk is: what waits goes to the tail, in order.
            let pending = std::mem::take(&mut self.pending);
            self.tail.push_str(&pending);
            if !self.head_full {
                self.head_full = true;
            }
        }
        self.tail.push_str(text);
    }

    fn trim_tail(&mut self) {
        if self.tail.len() <= self.budget.tail {
            return;
        }
        let mut cut = self.tail.len() - self.budget.tail;
        while !self.tail.is_char_boundary(cut) {
            cut += 1;
        }
        // Cut at a line start, so the tail begins with a whole line.
        let at = self.tail[cut..].find('\n').map_or(cut, |i| cut + i + 1);
        self.log.cut += at as i64;
        self.tail.drain(..at);
    }

    /// Output not stored yet (bytes).
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Stores what arrived since the last flush and returns the container's log to write.
    pub fn flush(&mut self) -> &ContainerLog {
        if !self.pending.is_empty() {
            let chunk = encode_chunk(&self.pending);
            let stored: usize = self.log.head.iter().map(String::len).sum();
            if stored + chunk.len() <= self.budget.head && self.log.head.len() < MAX_CHUNKS {
                self.log.head.push(chunk);
                self.pending.clear();
            } else {
                self.push_tail("");
                self.trim_tail();
            }
        }
        if !self.tail.is_empty() {
            self.log.tail = Some(encode_chunk(&self.tail));
        }
        &self.log
    }

    /// Counts replaced secret values.
    pub fn redacted(&mut self, n: usize) {
        self.log.redacted += n as i64;
    }
}

/// The text of a stored container log: the head, then a line saying what was cut, then the
/// tail.
pub fn text(log: &ContainerLog) -> Result<String, Error> {
    let damaged = |source| Error::Damaged { container: log.name.clone(), source };
    let mut out = String::new();
    for chunk in &log.head {
        out.push_str(&decode_chunk(chunk).map_err(damaged)?);
    }
    if let Some(tail) = &log.tail {
        if log.cut > 0 {
            out.push_str(&format!(
                "[bob: {} bytes of output cut here; the log keeps its start and its end]\n",
                log.cut
            ));
        }
        out.push_str(&decode_chunk(tail).map_err(damaged)?);
    }
    Ok(out)
}

fn encode_chunk(text: &str) -> String {
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    // Writing to a Vec cannot fail.
    let _ = gz.write_all(text.as_bytes());
    STANDARD.encode(gz.finish().unwrap_or_default())
}

fn decode_chunk(chunk: &str) -> Result<String, std::io::Error> {
    let bytes = STANDARD.decode(chunk.trim()).map_err(std::io::Error::other)?;
    let mut text = String::new();
    // Bounded: a chunk holds at most MAX_CHUNK_TEXT; more is a bomb, read no further.
    GzDecoder::new(&bytes[..]).take(MAX_CHUNK_TEXT as u64 + 1).read_to_string(&mut text)?;
    Ok(text)
}

/// Replaces the values of a build's Secrets in its output by `<redacted>`: the build should never
/// print them, and if something does, they do not reach the stored log.
#[derive(Clone, Debug, Default)]
pub struct Redactor {
    secrets: Vec<String>,
}

impl Redactor {
    /// Redacts `values` (and, for docker configs, their `auth` fields decoded) that are long
    /// enough to be secrets rather than common words.
    pub fn new(values: impl IntoIterator<Item = String>) -> Self {
        let mut secrets: Vec<String> = values.into_iter().filter(|v| v.len() >= 6).collect();
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Self { secrets }
    }

    /// `line` with every secret replaced, and how many were.
    pub fn apply(&self, line: &str) -> (String, usize) {
        let mut out = line.to_string();
        let mut n = 0;
        for s in &self.secrets {
            if out.contains(s.as_str()) {
                n += out.matches(s.as_str()).count();
                out = out.replace(s.as_str(), "<redacted>");
            }
        }
        (out, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_log_is_kept_whole_in_the_head() {
        let mut w = Writer::new("build", BUILD, None);
        w.line("STEP 1/2: FROM x");
        w.line("STEP 2/2: RUN make");
        let log = w.flush().clone();
        assert_eq!(log.head.len(), 1);
        assert_eq!(text(&log).unwrap(), "STEP 1/2: FROM x\nSTEP 2/2: RUN make\n");
        assert_eq!((log.bytes, log.cut), (36, 0));
    }

    #[test]
    fn a_long_log_keeps_its_start_and_end_and_says_what_was_cut() {
        // Output that does not compress (the worst case for the stored size).
        let mut seed = 7u64;
        let mut random_line = || {
            (0..120)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    char::from(b'!' + ((seed >> 33) % 90) as u8)
                })
                .collect::<String>()
        };
        let mut w = Writer::new("build", BUILD, None);
        let mut all = String::new();
        for i in 0..40_000 {
            let line = format!("{i:08} {}", random_line());
            all.push_str(&line);
            all.push('\n');
            w.line(&line);
            if i % 700 == 0 {
                w.flush();
            }
        }
        let log = w.flush().clone();
        let t = text(&log).unwrap();
        let marker = t.lines().find(|l| l.starts_with("[bob:")).expect("a cut is marked");
        let (head, tail) = t.split_once(&format!("{marker}\n")).unwrap();
        assert!(all.starts_with(head) && all.ends_with(tail), "the start and the end are kept as they were");
        assert_eq!(
            head.len() as i64 + tail.len() as i64 + log.cut,
            log.bytes,
            "every byte is stored or counted"
        );
        assert!(tail.len() <= BUILD.tail, "{}", tail.len());
        let stored: usize =
            log.head.iter().map(String::len).sum::<usize>() + log.tail.as_ref().map_or(0, String::len);
        assert!(stored < 800 << 10, "the build's part of the object stays bounded: {stored}");
    }

    #[test]
    fn secrets_never_reach_the_log() {
        let r = Redactor::new(["hunter2-password".to_string(), "abc".to_string()]);
        assert_eq!(
            r.apply("login with hunter2-password and abc"),
            ("login with <redacted> and abc".into(), 1)
        );
    }

    #[test]
    fn a_resumed_writer_continues_the_stored_log() {
        let mut w = Writer::new("build", BUILD, None);
        w.line("one");
        let stored = w.flush().clone();
        let mut again = Writer::new("build", BUILD, Some(stored));
        again.line("two");
        assert_eq!(text(again.flush()).unwrap(), "one\ntwo\n");
    }
}
