//! The result contract of `bob build`: one JSON object, `version: 1`, at most 4,096 bytes
//! (kubelet's cap on termination messages), written to the termination-message file and as
//! the last line of stdout. When it would be too long, the log tail is cut first, then the
//! message.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::reason::Reason;

/// The largest result kubelet keeps.
pub const MAX_BYTES: usize = 4096;

/// Milliseconds spent in each phase.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Timings {
    /// Checking the proxy, the base image and resolving `FROM`s.
    pub resolve_ms: u64,
    /// The engine's build.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build_ms: Option<u64>,
    /// Pushing the base image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub push_ms: Option<u64>,
    /// Copying the base image to the workspace image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy_ms: Option<u64>,
    /// The whole run.
    pub total_ms: u64,
}

/// What `bob build` reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildResult {
    /// Format version, 1.
    pub version: u32,
    /// Digest of the base image (built, or found).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_digest: Option<String>,
    /// Whether phase 1 built the base (false: it existed, or the source is an image).
    #[serde(default)]
    pub base_built: bool,
    /// Digest of the workspace image (equal to the base digest).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_digest: Option<String>,
    /// The digest each `FROM` image was pinned to.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub from_digests: BTreeMap<String, String>,
    /// Phase timings.
    #[serde(default)]
    pub timings: Timings,
    /// How the build used its layer cache (absent when it had none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_cache: Option<crate::layer_cache::Report>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// One line that says what failed and what to fix.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The failing step (`RUN ...`), when the engine names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// The failing step's exit code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The last lines of the engine's output.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_tail: Option<String>,
}

impl BuildResult {
    /// Whether the build failed.
    pub fn failed(&self) -> bool {
        self.reason.is_some()
    }

    /// The JSON line, at most `MAX_BYTES`: the log tail keeps as many of its newest lines as
    /// fit; the message (one line) and step are bounded first so the tail has room.
    pub fn to_json(&self) -> String {
        let mut r = self.clone();
        r.version = 1;
        r.message = r.message.map(|m| shorten(&m, 1024));
        r.step = r.step.map(|s| shorten(&s, 256));
        if let Some(c) = r.layer_cache.as_mut() {
            c.note = c.note.take().map(|n| shorten(&n, crate::layer_cache::NOTE_BYTES));
        }
        let tail = r.log_tail.take();
        if json(&r).len() > MAX_BYTES {
            r.from_digests.clear();
        }
        if let Some(tail) = tail {
            // Room for the tail's characters, less the field name, quotes and the `…` marker.
            let room = MAX_BYTES.saturating_sub(json(&r).len() + r#","logTail":"…""#.len());
            let lines: Vec<&str> = tail.split_inclusive('\n').collect();
            let mut used = 0;
            let mut kept = 0;
            for line in lines.iter().rev() {
                let cost = json(&line).len() - 2;
                if used + cost > room {
                    break;
                }
                used += cost;
                kept += 1;
            }
            if kept > 0 {
                let newest = lines[lines.len() - kept..].concat();
                r.log_tail = Some(if kept < lines.len() { format!("…{newest}") } else { newest });
            }
        }
        json(&r)
    }
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("plain data serialises")
}

/// At most `max` bytes of `s` (on a char boundary), with `…` when cut.
pub fn shorten(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let end = (0..=max).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_has_digests_and_timings_and_no_failure_fields() {
        let r = BuildResult {
            base_digest: Some("sha256:aa".into()),
            target_digest: Some("sha256:aa".into()),
            base_built: true,
            ..Default::default()
        };
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["version"], 1);
        assert_eq!(v["baseDigest"], "sha256:aa");
        assert_eq!(v["timings"]["totalMs"], 0);
        assert!(v.get("reason").is_none() && v.get("logTail").is_none());
    }

    #[test]
    fn long_failures_fit_4096_bytes_cutting_the_oldest_log_lines_first() {
        let tail: String = (0..2000).map(|i| format!("line {i} \"quoted\" ünïcode\n")).collect();
        let r = BuildResult {
            reason: Some(Reason::BuildStepFailed),
            message: Some("step 3/5 RUN make failed with exit code 2".into()),
            log_tail: Some(tail),
            ..Default::default()
        };
        let s = r.to_json();
        assert!(s.len() <= MAX_BYTES, "{} bytes", s.len());
        let back: BuildResult = serde_json::from_str(&s).unwrap();
        assert_eq!(back.message, r.message, "the message survives");
        let kept = back.log_tail.unwrap();
        assert!(kept.ends_with("line 1999 \"quoted\" ünïcode\n") && !kept.contains("line 0 "));

        let huge = BuildResult {
            reason: Some(Reason::Internal),
            message: Some("x".repeat(10_000)),
            ..Default::default()
        };
        assert!(huge.to_json().len() <= MAX_BYTES);
    }
}
