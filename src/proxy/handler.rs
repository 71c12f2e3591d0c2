//! Serving one request: route it, map the alias or mirror path to the planned upstream
//! repository, send it on, and rewrite what the client must not see (upload URLs, repository
//! names in `Location`). One access-log line per request, without secrets.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, Method, StatusCode, header};
use sha2::{Digest, Sha256};
use url::Url;

use super::error::ProxyError;
use super::forward::{self, request_headers};
use super::mirror::MirrorPolicy;
use super::route::{Alias, ManifestRef, Repo, Route, route};
use super::uploads::Uploads;
use crate::oci::Reference;
use crate::oci::error::chain;
use crate::oci::token::repository_scope;
use crate::oci::transport::{self, Transport};

/// The mirror inspects manifests it serves; distribution itself caps manifests at 4 MiB.
const MANIFEST_LIMIT: usize = 4 << 20;

/// Where an alias points: the real registry, repository and planned reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AliasTarget {
    /// Registry host as in the reference.
    pub host: String,
    /// Repository path on that registry.
    pub repository: String,
    /// What manifest requests by tag are forced to.
    pub planned: ManifestRef,
}

impl From<&Reference> for AliasTarget {
    fn from(r: &Reference) -> Self {
        let planned = match (r.digest(), r.tag()) {
            (Some(d), _) => ManifestRef::Digest(d.to_string()),
            (None, Some(t)) => ManifestRef::Tag(t.to_string()),
            (None, None) => ManifestRef::Tag("latest".into()),
        };
        Self { host: r.registry().to_string(), repository: r.repository().to_string(), planned }
    }
}

impl ManifestRef {
    fn as_str(&self) -> &str {
        match self {
            ManifestRef::Tag(s) | ManifestRef::Digest(s) => s,
        }
    }
}

/// The proxy's state: aliases, mirror policy, upload sessions and the upstream client.
pub struct Proxy {
    pub(super) base: Option<AliasTarget>,
    pub(super) target: Option<AliasTarget>,
    /// The layer cache of this build's scope; its tags pass as they are (step keys).
    pub(super) cache: Option<AliasTarget>,
    pub(super) base_read_only: bool,
    pub(super) mirror: MirrorPolicy,
    pub(super) upstream: Transport,
    pub(super) uploads: Uploads,
}

/// The axum handler for every request.
pub async fn handle(State(proxy): State<Arc<Proxy>>, req: Request) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let (resp, error) = match proxy.serve(req).await {
        Ok(r) => (r, None),
        Err(e) => {
            if e.status_and_code().0.is_server_error() {
                tracing::warn!(%method, %path, error = %chain(&e), "upstream failure");
            }
            let label = e.label();
            (e.into_response(), Some(label))
        }
    };
    tracing::info!(
        target: "bob::access",
        %method,
        %path,
        status = resp.status().as_u16(),
        ms = started.elapsed().as_millis() as u64,
        error,
    );
    resp
}

impl Proxy {
    async fn serve(&self, req: Request) -> Result<Response, ProxyError> {
        if req.uri().scheme().is_some() || req.uri().authority().is_some() {
            return Err(ProxyError::NameInvalid {
                reason: "absolute-form request targets are not accepted".into(),
            });
        }
        let route = route(req.method(), req.uri().path())?;
        let (parts, body) = req.into_parts();
        let method = parts.method.clone();
        let head = method == Method::HEAD;
        let query = parts.uri.query().unwrap_or("").to_string();
        let headers = request_headers(&parts.headers);
        let body = body_of(&parts.headers, body);
        let send = |host: &str, url: Url, scopes: Vec<String>, body: Option<Body>| transport::Request {
            method: method.clone(),
            host: host.to_string(),
            url,
            headers: headers.clone(),
            body: body.map(|b| reqwest::Body::wrap_stream(b.into_data_stream())),
            scopes,
        };
        match route {
            Route::Ping => Ok(ping()),
            Route::Manifest { repo: Repo::Alias(a), reference } => {
                let t = self.alias(a)?;
                let push = method == Method::PUT;
                if push {
                    self.writable(a)?;
                    if matches!(reference, ManifestRef::Tag(_)) && matches!(t.planned, ManifestRef::Digest(_))
                    {
                        return Err(ProxyError::Denied {
                            reason: format!("{} is pinned to a digest", a.name()),
                        });
                    }
                }
                // Tags are forced to the planned reference; digests pass (index children). The
                // cache's tags are step keys (the router let only those through) and pass too.
                let upstream_ref = match &reference {
                    ManifestRef::Tag(key) if a == Alias::Cache => key.as_str(),
                    ManifestRef::Tag(_) => t.planned.as_str(),
                    ManifestRef::Digest(d) => d.as_str(),
                };
                let url = self.url(&t.host, &format!("{}/manifests/{upstream_ref}", t.repository));
                let scopes = vec![repository_scope(&t.repository, push)];
                let resp = self.upstream.send(send(&t.host, url, scopes, body)).await?;
                Ok(self.alias_response(a, t, resp, head, None))
            }
            Route::Blob { repo: Repo::Alias(a), digest } => {
                let t = self.alias(a)?;
                let url = self.url(&t.host, &format!("{}/blobs/{digest}", t.repository));
                let resp = self
                    .upstream
                    .send(send(&t.host, url, vec![repository_scope(&t.repository, false)], None))
                    .await?;
                Ok(self.alias_response(a, t, resp, head, None))
            }
            Route::UploadStart(a) => {
                let t = self.alias(a)?;
                self.writable(a)?;
                let UploadQuery { pairs, mut scopes } = self.upload_query(a, t, &query)?;
                scopes.insert(0, repository_scope(&t.repository, true));
                // Beyond the cap nothing is opened upstream (429); live sessions are never evicted.
                let slot = self.uploads.reserve(a)?;
                let mut url = self.url(&t.host, &format!("{}/blobs/uploads/", t.repository));
                if !pairs.is_empty() {
                    url.query_pairs_mut().extend_pairs(pairs.iter().map(|(k, v)| (*k, v.as_str())));
                }
                let resp = self.upstream.send(send(&t.host, url, scopes, body)).await?;
                Ok(self.alias_response(a, t, resp, head, Some(slot.id())))
            }
            Route::Upload { alias: a, id } => {
                let t = self.alias(a)?;
                self.writable(a)?;
                let (mut url, _in_flight) = self.uploads.begin(a, &id).ok_or(ProxyError::UploadUnknown)?;
                if let Some(d) = query_value(&query, "digest") {
                    check_digest(&d)?;
                    url.query_pairs_mut().append_pair("digest", &d);
                }
                // The transport gives credentials only to the registry's own origin, never to a
                // storage URL it sends uploads to (such URLs carry their own signature).
                let out = send(&t.host, url, vec![repository_scope(&t.repository, true)], body);
                let resp = self.upstream.send(out).await?;
                Ok(self.alias_response(a, t, resp, head, Some(&id)))
            }
            Route::Manifest { repo: Repo::Mirror { host, repository }, reference } => {
                if !self.mirror.allows_manifest(&host, &repository, &reference) {
                    return Err(denied_mirror(&host, &repository, reference.as_str()));
                }
                let url = self.url(&host, &format!("{repository}/manifests/{}", reference.as_str()));
                let resp = self
                    .upstream
                    .send(send(&host, url, vec![repository_scope(&repository, false)], None))
                    .await?;
                if !resp.status().is_success() {
                    return Ok(forward::response(resp, head));
                }
                let own = resp
                    .headers()
                    .get("docker-content-digest")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                if head {
                    self.mirror.learn(&host, &repository, own.as_deref(), None);
                    return Ok(forward::response(resp, true));
                }
                let (out, bytes) = forward::buffered(resp, MANIFEST_LIMIT).await?;
                let own = own.unwrap_or_else(|| sha256_digest(&bytes));
                self.mirror.learn(&host, &repository, Some(&own), Some(&bytes));
                Ok(out)
            }
            Route::Blob { repo: Repo::Mirror { host, repository }, digest } => {
                if !self.mirror.allows_blob(&host, &repository, &digest) {
                    return Err(denied_mirror(&host, &repository, &digest));
                }
                let url = self.url(&host, &format!("{repository}/blobs/{digest}"));
                let resp = self
                    .upstream
                    .send(send(&host, url, vec![repository_scope(&repository, false)], None))
                    .await?;
                Ok(forward::response(resp, head))
            }
            Route::TagsList(a) => self.tags_list(a, &query).await,
        }
    }

    pub(super) fn alias(&self, a: Alias) -> Result<&AliasTarget, ProxyError> {
        match a {
            Alias::Base => self.base.as_ref(),
            Alias::Target => self.target.as_ref(),
            Alias::Cache => self.cache.as_ref(),
        }
        .ok_or(ProxyError::AliasUnset { alias: a.name() })
    }

    fn writable(&self, a: Alias) -> Result<(), ProxyError> {
        if a == Alias::Base && self.base_read_only {
            return Err(ProxyError::Denied { reason: "base is read-only for this build".into() });
        }
        Ok(())
    }

    pub(super) fn url(&self, host: &str, rest: &str) -> Url {
        let base = self.upstream.endpoints().base_url(host);
        // Every part of `rest` was validated by the router, so joining cannot escape `/v2/`.
        base.join(&format!("v2/{rest}")).unwrap_or(base)
    }

    /// The upstream query of an upload start: `mount`/`from` rewritten from an alias to its real
    /// repository when both live on one registry (else dropped: the client gets a plain upload),
    /// and `digest` for monolithic uploads. Returns the extra token scopes the mount needs.
    fn upload_query(&self, alias: Alias, t: &AliasTarget, query: &str) -> Result<UploadQuery, ProxyError> {
        let mut pairs = Vec::new();
        let mut scopes = Vec::new();
        if let (Some(mount), Some(from)) = (query_value(query, "mount"), query_value(query, "from")) {
            check_digest(&mount)?;
            // Nothing is mounted into the cache: its repository only ever links blobs its own
            // scope uploaded (buildah falls back to a plain upload). A step's layer the cache
            // holds may be mounted into this build's own images, so a cold build pushes it once.
            let source = match from.as_str() {
                _ if alias == Alias::Cache => None,
                "base" => self.base.as_ref(),
                "target" => self.target.as_ref(),
                "cache" => self.cache.as_ref(),
                _ => None,
            };
            match source {
                Some(src) if src.host == t.host => {
                    scopes.push(repository_scope(&src.repository, false));
                    pairs.push(("mount", mount));
                    pairs.push(("from", src.repository.clone()));
                }
                _ => {
                    tracing::debug!(%from, "cross-repository mount not possible; answering as a plain upload")
                }
            }
        }
        if let Some(d) = query_value(query, "digest") {
            check_digest(&d)?;
            pairs.push(("digest", d));
        }
        Ok(UploadQuery { pairs, scopes })
    }

    /// The client's response for an alias request: upload URLs become proxy sessions, other
    /// `Location`s name the alias instead of the real repository.
    fn alias_response(
        &self,
        alias: Alias,
        t: &AliasTarget,
        resp: reqwest::Response,
        head: bool,
        session: Option<&str>,
    ) -> Response {
        let status = resp.status();
        let location = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|l| resp.url().join(l).ok());
        let mut out = forward::response(resp, head);
        // Only a session (reserved by its POST) becomes an upload URL; other routes' `Location`s
        // are only renamed, so no answer can open a session past the cap.
        let rewritten = location.and_then(|loc| match session {
            Some(id) if status == StatusCode::ACCEPTED => {
                self.uploads.update(id, loc);
                Some(format!("/v2/{}/blobs/uploads/{id}", alias.name()))
            }
            _ => {
                let prefix = format!("/v2/{}/", t.repository);
                loc.path().strip_prefix(&prefix).map(|rest| format!("/v2/{}/{rest}", alias.name()))
            }
        });
        if let Some(id) = session
            && (status == StatusCode::CREATED || status == StatusCode::NO_CONTENT)
        {
            self.uploads.finish(id);
        }
        if let Some(v) = rewritten.and_then(|l| HeaderValue::from_str(&l).ok()) {
            out.headers_mut().insert(header::LOCATION, v);
        }
        out
    }
}

/// The upstream query pairs of an upload start and the extra scopes they need.
struct UploadQuery {
    pairs: Vec<(&'static str, String)>,
    scopes: Vec<String>,
}

fn ping() -> Response {
    let mut r = (StatusCode::OK, "{}").into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert("docker-distribution-api-version", HeaderValue::from_static("registry/2.0"));
    r
}

fn denied_mirror(host: &str, repository: &str, reference: &str) -> ProxyError {
    ProxyError::Denied {
        reason: format!("{host}/{repository} {reference} is not a declared FROM image of this build"),
    }
}

/// The body to stream upstream, or `None` when the request has none (so it may be replayed).
fn body_of(headers: &http::HeaderMap, body: Body) -> Option<Body> {
    let len = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    let chunked = headers.contains_key(header::TRANSFER_ENCODING);
    if len == Some(0) || (len.is_none() && !chunked) { None } else { Some(body) }
}

fn query_value(query: &str, key: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == key).map(|(_, v)| v.into_owned())
}

fn check_digest(d: &str) -> Result<(), ProxyError> {
    super::route::digest(d).map(drop)
}

/// `sha256:<hex>` of some bytes.
pub fn sha256_digest(bytes: &[u8]) -> String {
    let sum = Sha256::digest(bytes);
    let mut out = String::with_capacity(71);
    out.push_str("sha256:");
    for b in sum.iter() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}
