//! The proxy's request router (`bob::proxy::route::route`), fed what a hostile client in the
//! build pod can send. Input: the first line is the method, the rest the path.
//!
//! Invariants of an accepted route: no percent escapes, dot segments or empty segments reach an
//! upstream, alias routes name exactly `base`, `target` or `cache` (the layer cache: manifests by
//! build-step key only, no tag list), mirror hosts are hosts a checked
//! reference may name (so they make an upstream URL) and encode back to the path segment they
//! came from, and mirror repositories follow distribution's name grammar.
#![no_main]

use std::sync::OnceLock;

use bob::oci::Endpoints;
use bob::oci::reference::check_host;
use bob::proxy::route::{Alias, ManifestRef, Repo, Route, decode_host, encode_host, route};
use http::Method;
use libfuzzer_sys::fuzz_target;
use regex::Regex;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (method, path) = text.split_once('\n').unwrap_or(("GET", text));
    let Ok(method) = Method::from_bytes(method.as_bytes()) else { return };
    // Arbitrary strings into the host codec: never panics, and decode ∘ encode is the identity.
    if let Some(host) = decode_host(path) {
        assert_eq!(decode_host(&encode_host(&host)).as_deref(), Some(host.as_str()), "{path:?}");
    }
    let Ok(r) = route(&method, path) else { return };
    assert!(!path.contains('%'), "accepted a percent escape: {path:?}");
    assert!(path.is_ascii() && !path.contains('\\'), "accepted odd bytes: {path:?}");
    let segments: Vec<&str> = path.trim_start_matches('/').trim_end_matches('/').split('/').collect();
    assert!(
        segments.iter().all(|s| !matches!(*s, "" | "." | "..")) || path == "/v2/" || path == "/v2",
        "accepted an empty or dot segment: {path:?}"
    );
    assert!(path.starts_with("/v2"), "accepted a path outside /v2: {path:?}");
    match &r {
        Route::Ping => assert!(path == "/v2/" || path == "/v2"),
        Route::Manifest { repo, reference } => {
            check_repo(repo, path);
            if *repo == Repo::Alias(Alias::Cache) {
                // buildah's --cache-from/--cache-to name a cached step by its key (the hex sha256
                // of the step), never by another tag or by digest.
                let is_key = matches!(reference, ManifestRef::Tag(t)
                    if t.len() == 64 && t.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
                assert!(is_key, "cache manifest not by step key: {path:?}");
            }
            match reference {
                ManifestRef::Tag(t) => assert!(!t.is_empty() && t.len() <= 128 && !t.contains(':')),
                ManifestRef::Digest(d) => check_digest(d),
            }
        }
        Route::Blob { repo, digest } => {
            check_repo(repo, path);
            check_digest(digest);
        }
        Route::UploadStart(a) => assert!(path.starts_with(&format!("/v2/{}/blobs/uploads", a.name()))),
        Route::Upload { alias, id } => {
            assert!(!id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric()), "{path:?}");
            assert_eq!(path, format!("/v2/{}/blobs/uploads/{id}", alias.name()));
        }
        Route::TagsList(a) => {
            // The cache's tag list would name every step cached in the scope.
            assert_ne!(*a, Alias::Cache, "cache tag list served: {path:?}");
            assert!(path.trim_end_matches('/') == format!("/v2/{}/tags/list", a.name()));
        }
    }
});

fn check_repo(repo: &Repo, path: &str) {
    match repo {
        Repo::Alias(a) => {
            assert!(matches!(a.name(), "base" | "target" | "cache"), "{a:?}");
            assert!(path.starts_with(&format!("/v2/{}/", a.name())), "{path:?}");
        }
        Repo::Mirror { host, repository } => {
            let encoded = encode_host(host);
            assert!(path.starts_with(&format!("/v2/mirror/{encoded}/{repository}/")), "{path:?}");
            assert_eq!(decode_host(&encoded).as_deref(), Some(host.as_str()));
            // The handler makes the upstream URL from it (after the mirror policy's check):
            // it must be a host a checked reference may name, or `base_url` panics.
            assert!(check_host(host).is_ok(), "mirror host {host:?} from {path:?}");
            let _ = Endpoints::default().base_url(host);
            let (name, port) = host.split_once(':').unwrap_or((host, "0"));
            assert!(port.parse::<u16>().is_ok(), "mirror port {port:?} in {path:?}");
            assert!(
                !name.is_empty()
                    && name.split('.').all(|l| !l.is_empty()
                        && !l.starts_with('-')
                        && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')),
                "mirror host {host:?} from {path:?}"
            );
            assert!(!repository.contains("..") && !repository.contains('%'), "{path:?}");
            assert!(name_grammar().is_match(repository), "mirror repository {repository:?} from {path:?}");
        }
    }
}

/// distribution's repository name grammar (reference/regexp.go), as an independent oracle.
fn name_grammar() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        let component = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*";
        Regex::new(&format!("^{component}(?:/{component})*$")).expect("static regex")
    })
}

fn check_digest(d: &str) {
    let (algo, hex) = d.split_once(':').expect("digest has an algorithm");
    let want = match algo {
        "sha256" => 64,
        "sha512" => 128,
        other => panic!("digest algorithm {other:?}"),
    };
    assert!(hex.len() == want && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')), "{d:?}");
}
