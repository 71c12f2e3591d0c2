//! The read-only mirror route's policy: only the declared `FROM` references, and the digests
//! their manifests name (index children, config, layers), are served. A `RUN` step that reaches
//! the proxy can read nothing else through the build's credentials.

use std::collections::HashSet;
use std::sync::Mutex;

use serde::Deserialize;

use super::route::ManifestRef;
use crate::oci::Reference;
use crate::oci::credentials::normalize_key;

/// Errors of parsing the mirror references: one is invalid (the error names it).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct Error(#[from] crate::oci::reference::Error);

/// The references the mirror serves, and the digests learned from their manifests.
#[derive(Debug, Default)]
pub struct MirrorPolicy {
    refs: Vec<Reference>,
    learned: Mutex<HashSet<(String, String, String)>>,
}

impl MirrorPolicy {
    /// Parses a comma- or whitespace-separated list of references.
    pub fn parse(list: &str) -> Result<Self, Error> {
        let refs = list
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|s| !s.is_empty())
            .map(crate::oci::reference::parse)
            .collect::<Result<_, _>>()?;
        Ok(Self { refs, learned: Mutex::default() })
    }

    /// The declared references.
    pub fn refs(&self) -> &[Reference] {
        &self.refs
    }

    fn declared<'a>(
        &'a self,
        host: &'a str,
        repository: &'a str,
    ) -> impl Iterator<Item = &'a Reference> + 'a {
        let host = normalize_key(host);
        self.refs.iter().filter(move |r| normalize_key(r.registry()) == host && r.repository() == repository)
    }

    fn learned(&self, host: &str, repository: &str, digest: &str) -> bool {
        let key = (normalize_key(host), repository.to_string(), digest.to_string());
        self.learned.lock().unwrap_or_else(|e| e.into_inner()).contains(&key)
    }

    /// Whether a manifest request is for a declared reference (or a digest one of them names).
    pub fn allows_manifest(&self, host: &str, repository: &str, reference: &ManifestRef) -> bool {
        match reference {
            ManifestRef::Tag(t) => self.declared(host, repository).any(|r| r.tag() == Some(t.as_str())),
            ManifestRef::Digest(d) => {
                self.declared(host, repository).any(|r| r.digest() == Some(d.as_str()))
                    || self.learned(host, repository, d)
            }
        }
    }

    /// Whether a blob was named by a manifest served for a declared reference.
    pub fn allows_blob(&self, host: &str, repository: &str, digest: &str) -> bool {
        self.learned(host, repository, digest)
    }

    /// Records digests that a served manifest names (and the manifest's own digest).
    pub fn learn(&self, host: &str, repository: &str, own_digest: Option<&str>, body: Option<&[u8]>) {
        let mut digests: Vec<String> = own_digest.into_iter().map(str::to_string).collect();
        if let Some(parsed) = body.and_then(|b| serde_json::from_slice::<Named>(b).ok()) {
            digests.extend(parsed.manifests.into_iter().map(|d| d.digest));
            digests.extend(parsed.layers.into_iter().map(|d| d.digest));
            digests.extend(parsed.config.map(|d| d.digest));
        }
        let host = normalize_key(host);
        let mut learned = self.learned.lock().unwrap_or_else(|e| e.into_inner());
        for d in digests {
            learned.insert((host.clone(), repository.to_string(), d));
        }
    }
}

#[derive(Deserialize)]
struct Descriptor {
    digest: String,
}

/// The descriptors an image manifest or index names.
#[derive(Deserialize)]
struct Named {
    #[serde(default)]
    manifests: Vec<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    config: Option<Descriptor>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
    const D3: &str = "sha256:3333333333333333333333333333333333333333333333333333333333333333";

    #[test]
    fn serves_only_declared_refs_and_what_they_name() {
        let p = MirrorPolicy::parse(&format!("busybox:1.36, registry.test:5000/base@{D1}")).unwrap();
        let tag = |t: &str| ManifestRef::Tag(t.into());
        let dig = |d: &str| ManifestRef::Digest(d.into());
        assert!(p.allows_manifest("docker.io", "library/busybox", &tag("1.36")));
        assert!(p.allows_manifest("index.docker.io", "library/busybox", &tag("1.36")));
        assert!(!p.allows_manifest("docker.io", "library/busybox", &tag("latest")));
        assert!(!p.allows_manifest("docker.io", "library/alpine", &tag("1.36")));
        assert!(p.allows_manifest("registry.test:5000", "base", &dig(D1)));
        assert!(!p.allows_manifest("registry.test:5000", "base", &dig(D2)));
        assert!(!p.allows_blob("registry.test:5000", "base", D3));
        let index = format!(r#"{{"manifests":[{{"digest":"{D2}"}}]}}"#);
        p.learn("registry.test:5000", "base", Some(D1), Some(index.as_bytes()));
        assert!(p.allows_manifest("registry.test:5000", "base", &dig(D2)));
        let manifest = format!(r#"{{"config":{{"digest":"{D3}"}},"layers":[]}}"#);
        p.learn("registry.test:5000", "base", Some(D2), Some(manifest.as_bytes()));
        assert!(p.allows_blob("registry.test:5000", "base", D3));
        assert!(!p.allows_blob("registry.test:5000", "other", D3), "learned digests are per repository");
    }

    #[test]
    fn bad_references_are_errors() {
        assert!(MirrorPolicy::parse("registry.test/x@sha256:zz").is_err());
        assert!(MirrorPolicy::parse("").unwrap().refs().is_empty());
    }
}
