//! Manifests and indexes from a registry (`bob::oci::manifest::{media_type, parse}`). Input: the
//! first line is the `Content-Type` header (empty for none), the rest the body.
//!
//! Invariants: never panics; a manifest `Content-Type` wins; a parsed manifest names only
//! well-formed sha256 digests (they become blob paths), config first.
#![no_main]

use bob::oci::manifest::{self, Parsed, is_sha256, media_type, parse};
use libfuzzer_sys::fuzz_target;

const TYPES: [&str; 4] =
    [manifest::OCI_MANIFEST, manifest::OCI_INDEX, manifest::DOCKER_MANIFEST, manifest::DOCKER_LIST];

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(0);
    let (header, body) = (&data[..split], &data[(split + 1).min(data.len())..]);
    let header = std::str::from_utf8(header).ok().filter(|h| !h.is_empty());
    let mt = media_type(header, body);
    let bare = header.map(|h| h.split(';').next().unwrap_or("").trim());
    if let Some(h) = bare.filter(|h| TYPES.contains(h)) {
        assert_eq!(mt, h, "a manifest Content-Type must win");
    }
    // What a copy does: parse as the detected type, and as every supported type.
    for t in std::iter::once(mt.as_str()).chain(TYPES) {
        let Ok(p) = parse(t, body) else { continue };
        match &p {
            Parsed::Index { manifests } => {
                assert!(t == manifest::OCI_INDEX || t == manifest::DOCKER_LIST);
                assert!(manifests.iter().all(|d| is_sha256(&d.digest)));
                assert!(p.blobs().is_empty());
            }
            Parsed::Image { config, layers } => {
                let blobs = p.blobs();
                assert_eq!(blobs.len(), layers.len() + 1);
                assert_eq!(blobs[0], config);
                assert!(blobs.iter().all(|d| is_sha256(&d.digest)));
            }
        }
    }
});
