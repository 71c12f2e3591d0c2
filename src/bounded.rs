//! Bounded reads of what users hand bob. Every file (an ImageBuild, a docker config, a
//! Dockerfile) and every inline value (`BOB_AUTH`) is read against a limit, so `bob run -f
//! /dev/zero`, a FIFO or a huge file fails with one line naming the input and the limit instead
//! of filling memory. A file's size is never trusted (`/dev/zero` and FIFOs report none): a read
//! stops after the limit plus one byte.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// The largest accepted size of one kind of input, and its name for error lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    /// Largest accepted size in bytes.
    pub bytes: u64,
    /// What the input is, as an error line names it ("docker config").
    pub what: &'static str,
}

/// `bob run -f`: one ImageBuild and the few Secrets it names. The API server accepts no object
/// over about 1.5 MiB (etcd's request limit) and no Secret over 1 MiB, so 4 MiB holds any file
/// that `kubectl apply` would accept for one build.
pub const IMAGEBUILD_FILE: Limit = Limit { bytes: 4 * MIB, what: "ImageBuild file" };

/// A docker config (`--auth-file`, `BOB_AUTH_FILE`, `REGISTRY_AUTH_FILE`, the default docker
/// config, `BOB_AUTH`, a `.dockerconfigjson` Secret value). In a cluster it comes from a Secret,
/// which Kubernetes caps at 1 MiB; a config for hundreds of registries is a few KiB.
pub const DOCKER_CONFIG: Limit = Limit { bytes: MIB, what: "docker config" };

/// A Dockerfile read from disk (`BOB_DOCKERFILE_PATH`, a git source's Dockerfile). Inline
/// Dockerfiles are capped at 128 KiB (they travel in a pod annotation); 1 MiB is far beyond any
/// hand-written Dockerfile and still cheap to parse.
pub const DOCKERFILE: Limit = Limit { bytes: MIB, what: "Dockerfile" };

/// The termination message a build container leaves: kubelet keeps at most 4 KiB of it.
pub const TERMINATION_MESSAGE: Limit = Limit { bytes: 4 * KIB, what: "termination message" };

/// The digest file the engine writes after a push (`sha256:` and 64 hex digits).
pub const DIGEST_FILE: Limit = Limit { bytes: KIB, what: "digest file" };

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.bytes {
            b if b >= MIB && b % MIB == 0 => write!(f, "{} MiB", b / MIB),
            b if b >= KIB && b % KIB == 0 => write!(f, "{} KiB", b / KIB),
            b => write!(f, "{b} bytes"),
        }
    }
}

/// Why an input cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file cannot be opened or read.
    #[error("cannot read {what} {}", path.display())]
    Read {
        /// What the file is.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The input is larger than its limit.
    #[error("{} {name} exceeds the limit of {limit}", limit.what)]
    TooLarge {
        /// The file or variable.
        name: String,
        /// The limit it exceeds.
        limit: Limit,
    },
    /// The file is not UTF-8 text.
    #[error("{what} {name} is not UTF-8 text")]
    NotText {
        /// What the input is.
        what: &'static str,
        /// The file.
        name: String,
    },
}

impl Error {
    /// Whether the file does not exist (callers name a missing input differently).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// Reads at most `limit` bytes of `path`; a longer input is an error, not a truncated read.
pub fn read(path: &Path, limit: Limit) -> Result<Vec<u8>, Error> {
    let io = |source| Error::Read { what: limit.what, path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    file.take(limit.bytes.saturating_add(1)).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > limit.bytes {
        return Err(Error::TooLarge { name: path.display().to_string(), limit });
    }
    Ok(bytes)
}

/// `read` for text files.
pub fn read_to_string(path: &Path, limit: Limit) -> Result<String, Error> {
    String::from_utf8(read(path, limit)?)
        .map_err(|_| Error::NotText { what: limit.what, name: path.display().to_string() })
}

/// Checks an inline value (`name` is where it came from, e.g. `BOB_AUTH`) against `limit`.
pub fn check(name: &str, value: &str, limit: Limit) -> Result<(), Error> {
    if value.len() as u64 > limit.bytes {
        return Err(Error::TooLarge { name: name.to_string(), limit });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: Limit = Limit { bytes: 8, what: "test input" };

    #[test]
    fn inputs_at_the_limit_pass_and_one_byte_more_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "12345678").unwrap();
        assert_eq!(read_to_string(&path, TINY).unwrap(), "12345678");
        std::fs::write(&path, "123456789").unwrap();
        let e = read_to_string(&path, TINY).unwrap_err();
        assert_eq!(e.to_string(), format!("test input {} exceeds the limit of 8 bytes", path.display()));
        assert!(check("INLINE", "12345678", TINY).is_ok());
        assert_eq!(
            check("INLINE", "123456789", TINY).unwrap_err().to_string(),
            "test input INLINE exceeds the limit of 8 bytes"
        );
    }

    #[test]
    fn endless_files_stop_at_the_limit() {
        let e = read(Path::new("/dev/zero"), DOCKER_CONFIG).unwrap_err();
        assert_eq!(e.to_string(), "docker config /dev/zero exceeds the limit of 1 MiB");
        let e = read(Path::new("/nonexistent/x"), IMAGEBUILD_FILE).unwrap_err();
        assert!(e.is_not_found() && e.to_string() == "cannot read ImageBuild file /nonexistent/x");
    }

    #[test]
    fn limits_print_in_their_unit() {
        assert_eq!(IMAGEBUILD_FILE.to_string(), "4 MiB");
        assert_eq!(TERMINATION_MESSAGE.to_string(), "4 KiB");
        assert_eq!(TINY.to_string(), "8 bytes");
        let text = Limit { bytes: 8, what: "x" };
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bin"), [0xff, 0xfe]).unwrap();
        assert!(matches!(read_to_string(&dir.path().join("bin"), text), Err(Error::NotText { .. })));
    }
}
