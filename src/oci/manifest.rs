//! Just enough of the image and distribution specs to copy images: the manifest media types bob
//! accepts, the descriptors a manifest names, and sha256 digests. A copy never re-serialises a
//! manifest (that would change its digest), so this module only reads them.

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Every manifest media type bob reads, for `Accept` (registries answer 404 to an OCI index
/// request that does not accept it).
pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// Largest manifest bob reads (the distribution default limit is 4 MiB).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// Why a manifest cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The media type is not one bob copies (schema 1, or not a manifest at all).
    #[error("unsupported manifest media type {media_type:?}")]
    UnsupportedMediaType {
        /// The media type found.
        media_type: String,
    },
    /// The bytes are not a manifest.
    #[error("manifest is not valid json")]
    Invalid(#[source] serde_json::Error),
    /// A descriptor's digest is not `sha256:<64 hex>`.
    #[error("invalid digest {digest:?} in manifest")]
    BadDigest {
        /// The digest as written.
        digest: String,
    },
}

/// A content descriptor.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the target.
    #[serde(default)]
    pub media_type: String,
    /// Digest of the target.
    pub digest: String,
    /// Size of the target in bytes.
    #[serde(default)]
    pub size: u64,
    /// Platform of an index entry.
    #[serde(default)]
    pub platform: Option<Platform>,
}

/// The platform of an index entry.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Platform {
    /// Operating system.
    pub os: String,
    /// CPU architecture.
    pub architecture: String,
    /// CPU variant.
    #[serde(default)]
    pub variant: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

/// What a manifest names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// An index: its children are manifests.
    Index {
        /// The child manifests.
        manifests: Vec<Descriptor>,
    },
    /// An image manifest: its config and layers are blobs.
    Image {
        /// The config blob.
        config: Descriptor,
        /// The layer blobs.
        layers: Vec<Descriptor>,
    },
}

impl Parsed {
    /// The blobs of an image manifest (config first); none for an index.
    pub fn blobs(&self) -> Vec<&Descriptor> {
        match self {
            Parsed::Index { .. } => Vec::new(),
            Parsed::Image { config, layers } => std::iter::once(config).chain(layers).collect(),
        }
    }
}

/// The media type of a manifest: the `Content-Type` the registry sent if it names a manifest,
/// else the document's own `mediaType`.
pub fn media_type(content_type: Option<&str>, bytes: &[u8]) -> String {
    let header = content_type.map(|c| c.split(';').next().unwrap_or("").trim().to_string());
    match header {
        Some(h) if is_manifest_type(&h) => h,
        _ => serde_json::from_slice::<Raw>(bytes)
            .ok()
            .and_then(|r| r.media_type)
            .or(header)
            .unwrap_or_default(),
    }
}

fn is_manifest_type(t: &str) -> bool {
    matches!(t, OCI_MANIFEST | OCI_INDEX | DOCKER_MANIFEST | DOCKER_LIST)
}

/// Parses a manifest of one of the four supported media types.
pub fn parse(media_type: &str, bytes: &[u8]) -> Result<Parsed, Error> {
    if !is_manifest_type(media_type) {
        return Err(Error::UnsupportedMediaType { media_type: media_type.to_string() });
    }
    let raw: Raw = serde_json::from_slice(bytes).map_err(Error::Invalid)?;
    let parsed = match media_type {
        OCI_INDEX | DOCKER_LIST => Parsed::Index { manifests: raw.manifests },
        _ => {
            let config =
                raw.config.ok_or_else(|| Error::Invalid(serde::de::Error::missing_field("config")))?;
            Parsed::Image { config, layers: raw.layers }
        }
    };
    let descriptors = match &parsed {
        Parsed::Index { manifests } => manifests.iter().collect(),
        p => p.blobs(),
    };
    if let Some(bad) = descriptors.iter().find(|d| !is_sha256(&d.digest)) {
        return Err(Error::BadDigest { digest: bad.digest.clone() });
    }
    Ok(parsed)
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    hex_digest(Sha256::digest(bytes).as_slice())
}

/// Renders a finished sha256 as a digest string.
pub fn hex_digest(sum: &[u8]) -> String {
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in sum {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Whether `d` is a well-formed sha256 digest (the only algorithm bob verifies).
pub fn is_sha256(d: &str) -> bool {
    d.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    #[test]
    fn media_type_prefers_a_manifest_content_type_and_falls_back_to_the_document() {
        let doc = format!(r#"{{"mediaType":"{OCI_INDEX}","manifests":[]}}"#);
        assert_eq!(
            media_type(Some("application/vnd.oci.image.manifest.v1+json; charset=x"), b"{}"),
            OCI_MANIFEST
        );
        assert_eq!(media_type(Some("application/json"), doc.as_bytes()), OCI_INDEX);
        assert_eq!(media_type(None, b"{}"), "");
    }

    #[test]
    fn parses_images_and_indexes_and_refuses_the_rest() {
        let img = format!(
            r#"{{"config":{{"mediaType":"c","digest":"{CFG}","size":2}},"layers":[{{"digest":"{CFG}","size":3}}]}}"#
        );
        let p = parse(DOCKER_MANIFEST, img.as_bytes()).unwrap();
        assert_eq!(p.blobs().len(), 2);
        let idx = format!(
            r#"{{"manifests":[{{"digest":"{CFG}","size":9,"platform":{{"os":"linux","architecture":"arm64"}}}}]}}"#
        );
        let Parsed::Index { manifests } = parse(OCI_INDEX, idx.as_bytes()).unwrap() else { panic!("index") };
        assert_eq!(manifests[0].platform.as_ref().unwrap().architecture, "arm64");
        let schema1 = "application/vnd.docker.distribution.manifest.v1+prettyjws";
        assert!(matches!(parse(schema1, b"{}"), Err(Error::UnsupportedMediaType { .. })));
        assert!(matches!(parse(OCI_MANIFEST, b"{\"layers\":[]}"), Err(Error::Invalid(_))));
        let bad = r#"{"config":{"digest":"sha256:../../etc","size":1}}"#;
        assert!(matches!(parse(OCI_MANIFEST, bad.as_bytes()), Err(Error::BadDigest { .. })));
    }

    #[test]
    fn digests() {
        assert_eq!(sha256(b""), "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert!(is_sha256(CFG) && !is_sha256("sha256:ABC") && !is_sha256("sha512:00"));
    }
}
