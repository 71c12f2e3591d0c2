//! Pure request routing: which of the proxy's few routes a method and path name, or why the
//! request is refused. Nothing here touches the network, so every refusal is a plain test.

use http::Method;

use super::error::ProxyError;
use crate::oci::reference::check_host;

/// The repositories a build may write to, by the names the build uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Alias {
    /// `base`: the Dockerfile phase's output (read-only for image sources).
    Base,
    /// `target`: the workspace image.
    Target,
    /// `cache`: the layer cache of this build's scope. Its tags are buildah's step keys (never
    /// forced to a planned tag); only what `--cache-from`/`--cache-to` need is allowed.
    Cache,
}

impl Alias {
    /// The path name of the alias.
    pub fn name(self) -> &'static str {
        match self {
            Alias::Base => "base",
            Alias::Target => "target",
            Alias::Cache => "cache",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "base" => Some(Alias::Base),
            "target" => Some(Alias::Target),
            "cache" => Some(Alias::Cache),
            _ => None,
        }
    }
}

/// Whether a tag is a build-step key as buildah 1.28 writes them to `--cache-to` (the hex
/// sha256 of the step's parent and instruction): the only tags of the `cache` alias.
pub fn is_cache_key(tag: &str) -> bool {
    tag.len() == 64 && tag.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The repository a request is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Repo {
    /// One of the build's own repositories.
    Alias(Alias),
    /// A `FROM` image served read-only: `host` as in the reference (`__` decoded to `:`).
    Mirror {
        /// The registry host, e.g. `docker.io` or `registry.test:5000`.
        host: String,
        /// The repository path on that registry.
        repository: String,
    },
}

/// A manifest reference from a path: a tag or a digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ManifestRef {
    /// A tag (forced to the planned reference on alias routes).
    Tag(String),
    /// A digest (passes as it is).
    Digest(String),
}

/// A request the proxy serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /v2/`, answered locally.
    Ping,
    /// `/v2/<repo>/manifests/<reference>`.
    Manifest {
        /// Which repository.
        repo: Repo,
        /// Tag or digest.
        reference: ManifestRef,
    },
    /// `/v2/<repo>/blobs/<digest>`.
    Blob {
        /// Which repository.
        repo: Repo,
        /// The blob digest.
        digest: String,
    },
    /// `POST /v2/<alias>/blobs/uploads/` (with optional `mount`/`from`/`digest`).
    UploadStart(Alias),
    /// `/v2/<alias>/blobs/uploads/<id>`: an upload session the proxy issued.
    Upload {
        /// Which alias the session belongs to.
        alias: Alias,
        /// The proxy's session id.
        id: String,
    },
    /// `GET /v2/<alias>/tags/list`, answered locally with the planned tag only.
    TagsList(Alias),
}

/// Routes a request or says why it is refused.
pub fn route(method: &Method, path: &str) -> Result<Route, ProxyError> {
    check_path(path)?;
    if path == "/v2/" || path == "/v2" {
        return allow(method, &[Method::GET, Method::HEAD], Route::Ping);
    }
    let rest = path.strip_prefix("/v2/").ok_or_else(|| ProxyError::NotFound { path: path.to_string() })?;
    let segments: Vec<&str> = rest.split('/').collect();
    let n = segments.len();
    // Find the operation from the end, so that repository names may contain slashes.
    let (name, op) = if n >= 3 && segments[n - 3] == "blobs" && segments[n - 2] == "uploads" {
        let id = segments[n - 1];
        (&segments[..n - 3], if id.is_empty() { Op::UploadStart } else { Op::Upload(id) })
    } else if n >= 2 && segments[n - 2] == "blobs" && segments[n - 1] == "uploads" {
        (&segments[..n - 2], Op::UploadStart)
    } else if n >= 3 && segments[n - 2] == "tags" && segments[n - 1] == "list" {
        (&segments[..n - 2], Op::TagsList)
    } else if n >= 3 && segments[n - 2] == "manifests" {
        (&segments[..n - 2], Op::Manifest(segments[n - 1]))
    } else if n >= 3 && segments[n - 2] == "blobs" {
        (&segments[..n - 2], Op::Blob(segments[n - 1]))
    } else {
        return Err(ProxyError::NotFound { path: path.to_string() });
    };
    let repo = repo_of(name)?;
    match (op, repo) {
        (Op::Manifest(r), Repo::Alias(Alias::Cache)) => {
            // buildah reads and writes a cached step by its key only; a manifest by digest, or
            // any other tag, is nothing its cache needs.
            let reference = manifest_ref(r)?;
            match &reference {
                ManifestRef::Tag(t) if is_cache_key(t) => {}
                ManifestRef::Tag(t) => {
                    return Err(ProxyError::Denied {
                        reason: format!("cache tags are build-step keys (64 hex digits), not {t:?}"),
                    });
                }
                ManifestRef::Digest(_) => {
                    return Err(ProxyError::Denied {
                        reason: "the cache serves manifests by build-step key only".into(),
                    });
                }
            }
            let repo = Repo::Alias(Alias::Cache);
            allow(method, &[Method::GET, Method::HEAD, Method::PUT], Route::Manifest { repo, reference })
        }
        (Op::Manifest(r), repo) => {
            let reference = manifest_ref(r)?;
            let methods: &[Method] = match repo {
                Repo::Alias(_) => &[Method::GET, Method::HEAD, Method::PUT],
                Repo::Mirror { .. } => &[Method::GET, Method::HEAD],
            };
            allow(method, methods, Route::Manifest { repo, reference })
        }
        (Op::Blob(d), repo) => {
            let digest = digest(d)?;
            allow(method, &[Method::GET, Method::HEAD], Route::Blob { repo, digest })
        }
        (Op::UploadStart, Repo::Alias(a)) => allow(method, &[Method::POST], Route::UploadStart(a)),
        (Op::Upload(id), Repo::Alias(a)) => {
            if !id.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err(ProxyError::UploadUnknown);
            }
            let methods = [Method::GET, Method::PATCH, Method::PUT, Method::DELETE];
            allow(method, &methods, Route::Upload { alias: a, id: id.to_string() })
        }
        (Op::UploadStart | Op::Upload(_), Repo::Mirror { .. }) => {
            Err(ProxyError::Denied { reason: "the mirror route is read-only".into() })
        }
        // The cache's tag list would name every step cached in the scope; buildah never asks.
        (Op::TagsList, Repo::Alias(Alias::Cache)) => Err(ProxyError::NotFound { path: path.to_string() }),
        (Op::TagsList, Repo::Alias(a)) => allow(method, &[Method::GET], Route::TagsList(a)),
        // A mirror's tag list would show every tag of a repository the build may read one of.
        (Op::TagsList, Repo::Mirror { .. }) => Err(ProxyError::NotFound { path: path.to_string() }),
    }
}

enum Op<'a> {
    Manifest(&'a str),
    Blob(&'a str),
    UploadStart,
    Upload(&'a str),
    TagsList,
}

fn allow(method: &Method, allowed: &[Method], route: Route) -> Result<Route, ProxyError> {
    if allowed.contains(method) {
        Ok(route)
    } else {
        Err(ProxyError::MethodNotAllowed { method: method.clone() })
    }
}

/// Rejects paths that could be read differently by the proxy and by an upstream: percent
/// escapes (encoded slashes and dots), dot segments, empty segments and control characters.
fn check_path(path: &str) -> Result<(), ProxyError> {
    let invalid = |why: &str| Err(ProxyError::NameInvalid { reason: why.to_string() });
    if !path.starts_with('/') {
        return invalid("the request target must be a path");
    }
    if path.len() > 2048 {
        return invalid("path too long");
    }
    if path.contains('%') {
        return invalid("percent-encoded characters are not allowed in registry paths");
    }
    if path.bytes().any(|b| b.is_ascii_control() || b == b'\\' || !b.is_ascii()) {
        return invalid("invalid characters in path");
    }
    let body = path.trim_start_matches('/');
    let trimmed = body.strip_suffix('/').unwrap_or(body);
    if trimmed.split('/').any(|s| s == "." || s == ".." || s.is_empty()) && !trimmed.is_empty() {
        return invalid("empty or dot segments are not allowed");
    }
    Ok(())
}

fn repo_of(name: &[&str]) -> Result<Repo, ProxyError> {
    let joined = name.join("/");
    if let [single] = name
        && let Some(alias) = Alias::from_name(single)
    {
        return Ok(Repo::Alias(alias));
    }
    if name.len() >= 3 && name[0] == "mirror" {
        let host = decode_host(name[1]).ok_or_else(|| ProxyError::NameInvalid {
            reason: format!("invalid mirror host {:?}", name[1]),
        })?;
        let repository = name[2..].join("/");
        if !name[2..].iter().all(|c| valid_component(c)) {
            return Err(ProxyError::NameInvalid {
                reason: format!("invalid repository name {repository:?}"),
            });
        }
        return Ok(Repo::Mirror { host, repository });
    }
    Err(ProxyError::NameUnknown { name: joined })
}

/// Decodes a mirror path's host: `registry.test__5000` → `registry.test:5000`. Hostnames
/// cannot contain `_`, and buildah rejects a `:` inside a mirror location's path.
pub fn decode_host(encoded: &str) -> Option<String> {
    // The port is written `__<port>` only: a literal `:` as well would be a second path for one
    // mirror, one that `encode_host` does not give back (and buildah never sends).
    if encoded.contains(':') {
        return None;
    }
    let host = match encoded.split_once("__") {
        Some((h, p)) => format!("{h}:{p}"),
        None => encoded.to_string(),
    };
    // Only a host that a checked reference may name: the upstream URL is made from it.
    check_host(&host).is_ok().then_some(host)
}

/// Encodes a registry host for a mirror path (the inverse of [`decode_host`]).
pub fn encode_host(host: &str) -> String {
    host.replace(':', "__")
}

fn valid_component(c: &str) -> bool {
    // distribution's path-component grammar: `[a-z0-9]+` runs joined by exactly one separator,
    // `.`, `_`, `__` or one or more `-` (so never `..`).
    let alnum = |x: &u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let b = c.as_bytes();
    let mut separators = b.split(alnum).filter(|s| !s.is_empty());
    b.first().is_some_and(alnum)
        && b.last().is_some_and(alnum)
        && b.iter().all(|x| alnum(x) || b"._-".contains(x))
        && separators.all(|s| matches!(s, b"." | b"_" | b"__") || s.iter().all(|&x| x == b'-'))
}

fn manifest_ref(r: &str) -> Result<ManifestRef, ProxyError> {
    if r.contains(':') {
        return digest(r).map(ManifestRef::Digest);
    }
    let b = r.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter().all(|x| x.is_ascii_alphanumeric() || b"._-".contains(x));
    if ok {
        Ok(ManifestRef::Tag(r.to_string()))
    } else {
        Err(ProxyError::NameInvalid { reason: format!("invalid tag {r:?}") })
    }
}

/// Validates a digest (`sha256:` or `sha512:` with lowercase hex of the right length).
pub(super) fn digest(d: &str) -> Result<String, ProxyError> {
    let bad = || ProxyError::DigestInvalid { digest: d.to_string() };
    let (algo, hex) = d.split_once(':').ok_or_else(bad)?;
    let len_ok = match algo {
        "sha256" => hex.len() == 64,
        "sha512" => hex.len() == 128,
        _ => false,
    };
    if len_ok && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(d.to_string())
    } else {
        Err(bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn ok(m: Method, p: &str) -> Route {
        route(&m, p).unwrap_or_else(|e| panic!("{m} {p}: {e}"))
    }

    #[test]
    fn alias_routes() {
        assert_eq!(ok(Method::GET, "/v2/"), Route::Ping);
        assert_eq!(
            ok(Method::PUT, "/v2/target/manifests/latest"),
            Route::Manifest {
                repo: Repo::Alias(Alias::Target),
                reference: ManifestRef::Tag("latest".into())
            }
        );
        assert_eq!(
            ok(Method::HEAD, &format!("/v2/base/manifests/{D}")),
            Route::Manifest { repo: Repo::Alias(Alias::Base), reference: ManifestRef::Digest(D.into()) }
        );
        assert_eq!(
            ok(Method::GET, &format!("/v2/base/blobs/{D}")),
            Route::Blob { repo: Repo::Alias(Alias::Base), digest: D.into() }
        );
        assert_eq!(ok(Method::POST, "/v2/target/blobs/uploads/"), Route::UploadStart(Alias::Target));
        assert_eq!(ok(Method::POST, "/v2/target/blobs/uploads"), Route::UploadStart(Alias::Target));
        assert_eq!(
            ok(Method::PATCH, "/v2/target/blobs/uploads/abc123"),
            Route::Upload { alias: Alias::Target, id: "abc123".into() }
        );
        assert_eq!(ok(Method::GET, "/v2/target/tags/list"), Route::TagsList(Alias::Target));
        assert_eq!(ok(Method::GET, "/v2/base/tags/list"), Route::TagsList(Alias::Base));
    }

    #[test]
    fn the_cache_alias_allows_only_what_buildahs_cache_needs() {
        // The requests buildah 1.28 makes for `--cache-from`/`--cache-to` (read from a registry's
        // access log): manifests by step key, blobs, uploads.
        let key = "5c1ef51cc026a25f7b8d97b65d7b5469923c3af99806e308ac76f0e085ad1266";
        let cache = || Repo::Alias(Alias::Cache);
        for m in [Method::GET, Method::HEAD, Method::PUT] {
            assert_eq!(
                ok(m, &format!("/v2/cache/manifests/{key}")),
                Route::Manifest { repo: cache(), reference: ManifestRef::Tag(key.into()) }
            );
        }
        for m in [Method::GET, Method::HEAD] {
            assert_eq!(
                ok(m, &format!("/v2/cache/blobs/{D}")),
                Route::Blob { repo: cache(), digest: D.into() }
            );
        }
        assert_eq!(ok(Method::POST, "/v2/cache/blobs/uploads/"), Route::UploadStart(Alias::Cache));
        for m in [Method::GET, Method::PATCH, Method::PUT, Method::DELETE] {
            assert_eq!(
                ok(m, "/v2/cache/blobs/uploads/abc123"),
                Route::Upload { alias: Alias::Cache, id: "abc123".into() }
            );
        }
        use ProxyError::*;
        type Check = fn(&ProxyError) -> bool;
        let upper = key.to_uppercase();
        let refused: Vec<(Method, String, Check)> = vec![
            (Method::GET, "/v2/cache/manifests/latest".into(), |e| matches!(e, Denied { .. })),
            (Method::PUT, "/v2/cache/manifests/latest".into(), |e| matches!(e, Denied { .. })),
            (Method::PUT, format!("/v2/cache/manifests/{upper}"), |e| matches!(e, Denied { .. })),
            (Method::PUT, format!("/v2/cache/manifests/{}", &key[1..]), |e| matches!(e, Denied { .. })),
            (Method::GET, format!("/v2/cache/manifests/{D}"), |e| matches!(e, Denied { .. })),
            (Method::PUT, format!("/v2/cache/manifests/{D}"), |e| matches!(e, Denied { .. })),
            (Method::DELETE, format!("/v2/cache/manifests/{key}"), |e| matches!(e, MethodNotAllowed { .. })),
            (Method::DELETE, format!("/v2/cache/blobs/{D}"), |e| matches!(e, MethodNotAllowed { .. })),
            (Method::PUT, format!("/v2/cache/blobs/{D}"), |e| matches!(e, MethodNotAllowed { .. })),
            (Method::GET, "/v2/cache/tags/list".into(), |e| matches!(e, NotFound { .. })),
            (Method::GET, format!("/v2/cache/other/manifests/{key}"), |e| matches!(e, NameUnknown { .. })),
            (Method::GET, format!("/v2/other/cache/manifests/{key}"), |e| matches!(e, NameUnknown { .. })),
            (Method::GET, format!("/v2/cache/../base/manifests/{key}"), |e| matches!(e, NameInvalid { .. })),
            (Method::PATCH, "/v2/cache/blobs/uploads/a-b".into(), |e| matches!(e, UploadUnknown)),
        ];
        for (m, p, check) in refused {
            let e = route(&m, &p).expect_err(&p);
            assert!(check(&e), "{m} {p}: {e:?}");
        }
    }

    #[test]
    fn mirror_routes() {
        assert_eq!(
            ok(Method::GET, "/v2/mirror/registry.test__5000/library/busybox/manifests/1.36"),
            Route::Manifest {
                repo: Repo::Mirror {
                    host: "registry.test:5000".into(),
                    repository: "library/busybox".into()
                },
                reference: ManifestRef::Tag("1.36".into()),
            }
        );
        assert_eq!(decode_host(&encode_host("127.0.0.1:5000")).as_deref(), Some("127.0.0.1:5000"));
        let refused = [
            (Method::PUT, "/v2/mirror/r.test/x/manifests/latest"),
            (Method::POST, "/v2/mirror/r.test/x/blobs/uploads/"),
            (Method::DELETE, "/v2/mirror/r.test/x/manifests/latest"),
        ];
        for (m, p) in refused {
            assert!(route(&m, p).is_err(), "{m} {p}");
        }
        assert!(matches!(
            route(&Method::GET, "/v2/mirror/bad_host/x/manifests/latest"),
            Err(ProxyError::NameInvalid { .. })
        ));
    }

    #[test]
    fn refusals_name_the_reason() {
        use ProxyError::*;
        type Check = fn(&ProxyError) -> bool;
        let cases: Vec<(Method, &str, Check)> = vec![
            (Method::GET, "/v2/other/manifests/latest", |e| matches!(e, NameUnknown { .. })),
            (Method::GET, "/v2/base/x/manifests/latest", |e| matches!(e, NameUnknown { .. })),
            (Method::GET, "/v2/base/../other/manifests/latest", |e| matches!(e, NameInvalid { .. })),
            (Method::GET, "/v2/base%2F..%2Fother/manifests/latest", |e| matches!(e, NameInvalid { .. })),
            (Method::GET, "/v2/base//manifests/latest", |e| matches!(e, NameInvalid { .. })),
            (Method::GET, "/v2/base/./manifests/latest", |e| matches!(e, NameInvalid { .. })),
            (Method::DELETE, "/v2/target/manifests/latest", |e| matches!(e, MethodNotAllowed { .. })),
            (
                Method::DELETE,
                "/v2/base/blobs/sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                |e| matches!(e, MethodNotAllowed { .. }),
            ),
            (Method::PUT, "/v2/base/tags/list", |e| matches!(e, MethodNotAllowed { .. })),
            (Method::GET, "/v2/other/tags/list", |e| matches!(e, NameUnknown { .. })),
            (Method::GET, "/v2/base/x/tags/list", |e| matches!(e, NameUnknown { .. })),
            (Method::GET, "/v2/mirror/r.test/x/tags/list", |e| matches!(e, NotFound { .. })),
            (Method::GET, "/v2/_catalog", |e| matches!(e, NotFound { .. })),
            (Method::GET, "/v2/_catalog/tags/list", |e| matches!(e, NameUnknown { .. })),
            (Method::GET, "/base/artifacts-uploads/x", |e| matches!(e, NotFound { .. })),
            (Method::GET, "/v2/base/blobs/sha256:zz", |e| matches!(e, DigestInvalid { .. })),
            (Method::GET, "/v2/base/manifests/-bad", |e| matches!(e, NameInvalid { .. })),
            (Method::PATCH, "/v2/base/blobs/uploads/a.b", |e| matches!(e, UploadUnknown)),
            (Method::POST, "/v2/", |e| matches!(e, MethodNotAllowed { .. })),
        ];
        for (m, p, check) in cases {
            let e = route(&m, p).expect_err(p);
            assert!(check(&e), "{m} {p}: {e:?}");
        }
    }
}
