//! The layer cache's shared words: how a build used its cache of build steps (`Mode`) and what
//! it reports (`Report`), the same in `bob build`'s result and in the ImageBuild's status. The
//! cache only makes builds faster: it never decides whether a build is needed (that is the build
//! key's job, docs/cache-key.md) and never fails one (docs/build.md, "Layer cache").

use serde::{Deserialize, Serialize};

/// How a build used the layer cache.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Steps were read from the cache and new ones written to it.
    ReadWrite,
    /// Steps were read from the cache; it refused writes, so nothing was written.
    ReadOnly,
    /// Nothing was read (`spec.forceRebuild`), new steps were written.
    WriteOnly,
    /// The cache was planned but not used: unreachable, or it failed during the build.
    Off,
}

impl Mode {
    /// The CamelCase name, as in the status and the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::ReadWrite => "ReadWrite",
            Mode::ReadOnly => "ReadOnly",
            Mode::WriteOnly => "WriteOnly",
            Mode::Off => "Off",
        }
    }

    /// Whether the build reads cached steps in this mode.
    pub fn reads(self) -> bool {
        matches!(self, Mode::ReadWrite | Mode::ReadOnly)
    }

    /// Whether the build writes new steps in this mode.
    pub fn writes(self) -> bool {
        matches!(self, Mode::ReadWrite | Mode::WriteOnly)
    }

    /// The mode left when the cache refuses writes.
    pub fn without_writes(self) -> Mode {
        match self {
            Mode::ReadWrite => Mode::ReadOnly,
            Mode::WriteOnly | Mode::Off => Mode::Off,
            Mode::ReadOnly => Mode::ReadOnly,
        }
    }
}

/// What a build with a planned layer cache reports (absent when no cache was planned).
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// How the build that made the image used the cache.
    pub mode: Mode,
    /// Steps the engine took from a cache instead of running them ("Using cache").
    #[schemars(with = "i32")]
    pub hits: u32,
    /// Why the cache was used less than planned, one line (it never fails a build).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The longest `note` kept: the status and the 4,096-byte result stay small.
pub const NOTE_BYTES: usize = 300;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn losing_writes_keeps_reads_only() {
        assert_eq!(Mode::ReadWrite.without_writes(), Mode::ReadOnly);
        assert_eq!(Mode::WriteOnly.without_writes(), Mode::Off);
        assert!(Mode::ReadOnly.reads() && !Mode::ReadOnly.writes());
        assert!(!Mode::WriteOnly.reads() && Mode::WriteOnly.writes());
        let r = Report { mode: Mode::ReadOnly, hits: 3, note: None };
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"{"mode":"ReadOnly","hits":3}"#);
    }
}
