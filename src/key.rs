//! The build key and the refs derived from it (DESIGN.md's pinned rule). The key is a sha256 of
//! a canonical JSON encoding of `BuildInputs`; `docs/cache-key.md` documents every field. The
//! controller and `bob run` compute it before any pod, with this code only.

use std::collections::BTreeMap;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::oci::manifest::is_sha256;

/// Version of the key encoding and of the build process; bumping it rebuilds every image. 2: the
/// layer-cache scope a build reads is an input (docs/cache-key.md): images built with a cache read
/// under format 1 may hold another scope's planted steps and must not be reused.
pub const FORMAT: u32 = 2;

/// Why inputs cannot be keyed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A git revision that is not a commit SHA (branches and tags must be resolved first).
    #[error("git revision {revision:?} is not a commit SHA; resolve branches and tags first")]
    UnresolvedRevision {
        /// The revision given.
        revision: String,
    },
    /// A `FROM` digest that is not `sha256:<64 hex>`.
    #[error("FROM {image} has an invalid digest {digest:?}")]
    BadDigest {
        /// The image as written.
        image: String,
        /// The digest given.
        digest: String,
    },
}

/// Where the Dockerfile comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum DockerfileSource {
    /// The Dockerfile's bytes are in the resource.
    Inline {
        /// The Dockerfile text, exactly as given.
        dockerfile: String,
    },
    /// The Dockerfile and context are in a git repository at a commit.
    Git {
        /// The commit SHA (40 or 64 lowercase hex digits).
        commit: String,
    },
}

/// Everything that decides what a Dockerfile build produces, as far as bob can know it before
/// the build. Maps are sorted, so the encoding does not depend on input order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildInputs {
    /// The Dockerfile (inline bytes or git commit).
    pub source: DockerfileSource,
    /// Path of the Dockerfile inside the context source.
    pub dockerfile_path: String,
    /// Path of the build context inside the context source.
    pub context_path: String,
    /// Build arguments.
    pub build_args: BTreeMap<String, String>,
    /// Target stage, if not the last.
    pub target: Option<String>,
    /// Each external `FROM` image (as written, after `ARG` expansion) and its resolved digest.
    pub from_digests: BTreeMap<String, String>,
    /// Digest of a local build context's files, when bob can read them (`bob run`).
    pub context_digest: Option<String>,
    /// The layer-cache repository (one scope, `<repository>/<namespace>/<scope>-<hash>`) the build reads
    /// and writes, when it has one: a cached step stands in for running it, so whoever filled the
    /// scope decides part of the image, and an image built with one scope's cache is never handed
    /// to a build of another scope (docs/security.md, "Layer cache").
    pub layer_cache: Option<String>,
}

#[derive(Serialize)]
struct Encoded<'a> {
    format: u32,
    #[serde(flatten)]
    inputs: &'a BuildInputs,
}

impl BuildInputs {
    /// Inputs for an inline Dockerfile with default paths and nothing else.
    pub fn inline(dockerfile: impl Into<String>) -> Self {
        Self {
            source: DockerfileSource::Inline { dockerfile: dockerfile.into() },
            dockerfile_path: "Dockerfile".into(),
            context_path: ".".into(),
            build_args: BTreeMap::new(),
            target: None,
            from_digests: BTreeMap::new(),
            context_digest: None,
            layer_cache: None,
        }
    }

    /// The canonical bytes that are hashed (documented in `docs/cache-key.md`).
    pub fn canonical(&self) -> Result<Vec<u8>, Error> {
        if let DockerfileSource::Git { commit } = &self.source {
            let hex = commit.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
            if !(hex && (commit.len() == 40 || commit.len() == 64)) {
                return Err(Error::UnresolvedRevision { revision: commit.clone() });
            }
        }
        if let Some((image, digest)) = self.from_digests.iter().find(|(_, d)| !is_sha256(d)) {
            return Err(Error::BadDigest { image: image.clone(), digest: digest.clone() });
        }
        Ok(serde_json::to_vec(&Encoded { format: FORMAT, inputs: self }).expect("plain data serialises"))
    }

    /// The build key: lowercase hex sha256 of the canonical bytes (a valid image tag).
    pub fn key(&self) -> Result<String, Error> {
        Ok(hex(&self.canonical()?))
    }
}

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The base image ref of a Dockerfile build: `<repository>:<key>`.
pub fn base_ref(base_repository: &str, key: &str) -> String {
    format!("{base_repository}:{key}")
}

/// The workspace image tag: hex sha256 of `<base ref>\n<FORMAT>\n`, known before any pod.
pub fn workspace_tag(base_ref: &str) -> String {
    hex(format!("{base_ref}\n{FORMAT}\n").as_bytes())
}

/// The workspace image ref: `<repository>:<workspace_tag(base ref)>`.
pub fn workspace_ref(workspace_repository: &str, base_ref: &str) -> String {
    format!("{workspace_repository}:{}", workspace_tag(base_ref))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn sample() -> BuildInputs {
        let mut i = BuildInputs::inline("FROM busybox:1.36\nRUN echo hi\n");
        i.from_digests.insert("busybox:1.36".into(), D1.into());
        i
    }

    #[test]
    fn the_encoding_and_key_are_pinned() {
        let i = sample();
        let expected = format!(
            r#"{{"format":2,"source":{{"inline":{{"dockerfile":"FROM busybox:1.36\nRUN echo hi\n"}}}},"dockerfilePath":"Dockerfile","contextPath":".","buildArgs":{{}},"target":null,"fromDigests":{{"busybox:1.36":"{D1}"}},"contextDigest":null,"layerCache":null}}"#
        );
        assert_eq!(String::from_utf8(i.canonical().unwrap()).unwrap(), expected);
        // Same as `printf '%s' "$expected" | sha256sum`; a change here invalidates every cache.
        assert_eq!(i.key().unwrap(), "55a3bdc0187b3afd518d28e3a3a2cc0251ca96ec0ebc363cb4434a72580fee07");
    }

    #[test]
    fn every_input_changes_the_key_and_order_does_not() {
        let base = sample().key().unwrap();
        let changed = |f: &dyn Fn(&mut BuildInputs)| {
            let mut i = sample();
            f(&mut i);
            i.key().unwrap()
        };
        let variants = [
            changed(&|i| {
                i.source = DockerfileSource::Inline { dockerfile: "FROM busybox:1.36\nRUN echo ho\n".into() }
            }),
            changed(&|i| {
                i.build_args.insert("V".into(), "1".into());
            }),
            changed(&|i| i.target = Some("dev".into())),
            changed(&|i| {
                i.from_digests.insert("busybox:1.36".into(), D2.into());
            }),
            changed(&|i| i.dockerfile_path = "sub/Dockerfile".into()),
            changed(&|i| i.context_path = "sub".into()),
            changed(&|i| i.context_digest = Some(D2.into())),
            changed(&|i| i.layer_cache = Some("reg.example/cache/users/alice-0123456789abcdef".into())),
            changed(&|i| i.layer_cache = Some("reg.example/cache/users/mallory-0123456789abcdef".into())),
            changed(&|i| i.source = DockerfileSource::Git { commit: "a".repeat(40) }),
        ];
        let mut all: Vec<&String> = variants.iter().collect();
        all.push(&base);
        all.sort();
        all.dedup();
        assert_eq!(all.len(), variants.len() + 1, "every change gives a new key");

        let mut a = sample();
        a.build_args.insert("A".into(), "1".into());
        a.build_args.insert("B".into(), "2".into());
        let mut b = sample();
        b.build_args.insert("B".into(), "2".into());
        b.build_args.insert("A".into(), "1".into());
        assert_eq!(a.key(), b.key());
    }

    #[test]
    fn git_commits_must_be_resolved_and_digests_valid() {
        let mut i = sample();
        i.source = DockerfileSource::Git { commit: "main".into() };
        assert_eq!(i.key(), Err(Error::UnresolvedRevision { revision: "main".into() }));
        let mut i = sample();
        i.from_digests.insert("x".into(), "latest".into());
        assert!(matches!(i.key(), Err(Error::BadDigest { .. })));
    }

    #[test]
    fn workspace_ref_is_derived_from_the_base_ref() {
        let base = base_ref("reg.example/base", "k1");
        assert_eq!(base, "reg.example/base:k1");
        let ws = workspace_ref("reg.example/ws", &base);
        assert_eq!(
            ws,
            format!("reg.example/ws:{}", hex(format!("reg.example/base:k1\n{FORMAT}\n").as_bytes()))
        );
        assert_ne!(workspace_tag("reg.example/base:k2"), workspace_tag(&base));
    }
}
