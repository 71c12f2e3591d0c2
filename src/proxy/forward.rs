//! The upstream side: one request to the real registry with credentials attached, retried when
//! that is safe (bodiless GET/HEAD on connection errors, 5xx and 429; one re-auth on 401), with
//! bodies streamed both ways and only the registry headers that matter passed on.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use http::{HeaderMap, HeaderName, Method, StatusCode, header};
use url::Url;

use super::error::{ProxyError, envelope};
use crate::oci::ErrorCode;
use crate::oci::token::Authenticator;
use crate::oci::{CredentialStore, Endpoints};

/// Request headers a client may send upstream. Everything else (Authorization, Cookie,
/// hop-by-hop and forwarding headers) is dropped.
const REQUEST_HEADERS: &[HeaderName] = &[
    header::ACCEPT,
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    header::CONTENT_RANGE,
    header::RANGE,
    header::USER_AGENT,
    header::IF_NONE_MATCH,
    header::IF_MATCH,
];

/// Response headers passed back to the client (`Location` is rewritten separately).
const RESPONSE_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "content-range",
    "range",
    "accept-ranges",
    "etag",
    "last-modified",
    "docker-content-digest",
    "docker-upload-uuid",
    "docker-distribution-api-version",
    "oci-subject",
    "oci-filters-applied",
    "retry-after",
];

/// Tunables of the upstream client.
#[derive(Clone, Debug)]
pub struct UpstreamOptions {
    /// Longest wait for a connection.
    pub connect_timeout: Duration,
    /// Longest silence while reading a response (also bounds a stalled upload's answer).
    pub read_timeout: Duration,
    /// Retries of idempotent requests.
    pub retries: u32,
    /// First backoff; doubles on each retry.
    pub backoff: Duration,
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(120),
            retries: 3,
            backoff: Duration::from_millis(200),
        }
    }
}

/// A request to send upstream.
pub struct Outgoing {
    /// The method.
    pub method: Method,
    /// The registry host as in the reference (credential and challenge key).
    pub host: String,
    /// The full upstream URL.
    pub url: Url,
    /// The filtered client headers.
    pub headers: HeaderMap,
    /// The client's body, streamed; `None` for bodiless requests (which may be replayed).
    pub body: Option<Body>,
    /// Token scopes the request needs.
    pub scopes: Vec<String>,
    /// Whether to attach credentials (false for URLs on another host than the registry).
    pub authorize: bool,
}

/// The client for upstream registries.
pub struct Upstream {
    http: reqwest::Client,
    auth: Authenticator,
    endpoints: Endpoints,
    opts: UpstreamOptions,
}

impl Upstream {
    /// Builds the client; credentials come from `creds`, schemes from `endpoints`.
    pub fn new(
        creds: Arc<CredentialStore>,
        endpoints: Endpoints,
        opts: UpstreamOptions,
    ) -> reqwest::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(opts.connect_timeout)
            .read_timeout(opts.read_timeout)
            // Blob GETs may be redirected to storage; reqwest drops Authorization across hosts.
            .redirect(reqwest::redirect::Policy::limited(5))
            .user_agent(concat!("bob/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let auth = Authenticator::new(http.clone(), creds, endpoints.clone());
        Ok(Self { http, auth, endpoints, opts })
    }

    /// The scheme rule in force.
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// Sends a request upstream; the response's body is not read.
    pub async fn send(&self, out: Outgoing) -> Result<reqwest::Response, ProxyError> {
        let Outgoing { method, host, url, headers, mut body, mut scopes, authorize } = out;
        let replayable = body.is_none();
        let idempotent = method == Method::GET || method == Method::HEAD;
        let mut attempt = 0u32;
        let mut reauthed = false;
        loop {
            let auth = if authorize {
                self.auth
                    .authorization(&host, &scopes)
                    .await
                    .map_err(|source| ProxyError::Auth { host: host.clone(), source })?
            } else {
                None
            };
            let mut req = self.http.request(method.clone(), url.clone()).headers(headers.clone());
            if let Some(a) = auth {
                req = req.header(header::AUTHORIZATION, a);
            }
            if let Some(b) = body.take() {
                req = req.body(reqwest::Body::wrap_stream(b.into_data_stream()));
            }
            let result = req.send().await;
            let can_retry = idempotent && replayable && attempt < self.opts.retries;
            match result {
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED => {
                    let extra = self.auth.unauthorized(&host, resp.headers().get(header::WWW_AUTHENTICATE));
                    if replayable && !reauthed {
                        reauthed = true;
                        for s in extra {
                            if !scopes.contains(&s) {
                                scopes.push(s);
                            }
                        }
                        continue;
                    }
                    return Ok(resp);
                }
                Ok(resp) if can_retry && retryable(resp.status()) => {
                    let wait = retry_after(resp.headers()).unwrap_or(self.backoff(attempt));
                    tracing::debug!(%host, status = resp.status().as_u16(), attempt, "retrying upstream request");
                    drop(resp);
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Ok(resp) => return Ok(resp),
                Err(e) if can_retry && (e.is_connect() || e.is_timeout() || e.is_request()) => {
                    tracing::debug!(%host, attempt, error = %crate::oci::error::chain(&e), "retrying upstream request");
                    tokio::time::sleep(self.backoff(attempt)).await;
                    attempt += 1;
                }
                Err(source) if source.is_timeout() => return Err(ProxyError::Timeout { host, source }),
                Err(source) => return Err(ProxyError::Unreachable { host, source }),
            }
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        (self.opts.backoff * 2u32.saturating_pow(attempt)).min(Duration::from_secs(10))
    }
}

fn retryable(status: StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 500 | 502 | 503 | 504)
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs.min(10)))
}

/// The client headers that may go upstream.
pub fn request_headers(client: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in REQUEST_HEADERS {
        for v in client.get_all(name) {
            out.append(name.clone(), v.clone());
        }
    }
    out
}

/// Turns an upstream response into the client's, streaming its body; `Location` is left out
/// for the caller to rewrite.
pub fn response(resp: reqwest::Response, head_only: bool) -> Response {
    let status = resp.status();
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"));
    if (status.is_client_error() || status.is_server_error()) && !json && !head_only {
        // A load balancer's HTML error page is not something a registry client can read.
        let host = resp.url().host_str().unwrap_or("upstream").to_string();
        let mut out =
            envelope(status, code_for(status), format!("upstream registry {host} answered {status}"));
        if let Some(v) = resp.headers().get(header::RETRY_AFTER) {
            out.headers_mut().insert(header::RETRY_AFTER, v.clone());
        }
        return out;
    }
    let mut out = response_head(&resp);
    if !head_only {
        *out.body_mut() = Body::from_stream(resp.bytes_stream());
    }
    out
}

/// The spec code that best names an upstream status without a registry error body.
fn code_for(status: StatusCode) -> ErrorCode {
    match status.as_u16() {
        401 => ErrorCode::Unauthorized,
        403 => ErrorCode::Denied,
        404 => ErrorCode::NameUnknown,
        429 => ErrorCode::Toomanyrequests,
        s if s >= 500 => ErrorCode::Unavailable,
        _ => ErrorCode::Unknown,
    }
}

/// An upstream response whose body is read (manifests the mirror must inspect), capped at
/// `limit` bytes.
pub async fn buffered(resp: reqwest::Response, limit: usize) -> Result<(Response, bytes::Bytes), ProxyError> {
    use futures::StreamExt;
    let mut head = response_head(&resp);
    let host = resp.url().host_str().unwrap_or_default().to_string();
    let mut stream = resp.bytes_stream();
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|source| ProxyError::Unreachable { host: host.clone(), source })?;
        if buf.len() + chunk.len() > limit {
            return Err(ProxyError::ManifestTooLarge { limit });
        }
        buf.extend_from_slice(&chunk);
    }
    let bytes = buf.freeze();
    *head.body_mut() = Body::from(bytes.clone());
    Ok((head, bytes))
}

/// Status and passed-on headers of an upstream response, with an empty body.
fn response_head(resp: &reqwest::Response) -> Response {
    let mut headers = HeaderMap::new();
    for name in RESPONSE_HEADERS {
        for v in resp.headers().get_all(*name) {
            headers.append(HeaderName::from_static(name), v.clone());
        }
    }
    let mut out = Response::new(Body::empty());
    *out.status_mut() = resp.status();
    *out.headers_mut() = headers;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_credentials_and_hop_by_hop_headers_never_go_upstream() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Basic eDp5".parse().unwrap());
        h.insert(header::COOKIE, "a=b".parse().unwrap());
        h.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::PROXY_AUTHORIZATION, "Basic eDp5".parse().unwrap());
        h.insert("x-forwarded-host", "evil.test".parse().unwrap());
        h.insert(header::HOST, "evil.test".parse().unwrap());
        h.insert(header::ACCEPT, "application/vnd.oci.image.index.v1+json".parse().unwrap());
        h.append(header::ACCEPT, "application/vnd.oci.image.manifest.v1+json".parse().unwrap());
        h.insert(header::CONTENT_RANGE, "0-99".parse().unwrap());
        let out = request_headers(&h);
        assert_eq!(out.len(), 3);
        assert_eq!(out.get_all(header::ACCEPT).iter().count(), 2);
        assert!(out.get(header::AUTHORIZATION).is_none() && out.get(header::HOST).is_none());
    }

    #[test]
    fn retry_policy() {
        assert!(retryable(StatusCode::SERVICE_UNAVAILABLE) && retryable(StatusCode::TOO_MANY_REQUESTS));
        assert!(!retryable(StatusCode::NOT_FOUND) && !retryable(StatusCode::UNAUTHORIZED));
        let mut h = HeaderMap::new();
        h.insert(header::RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(header::RETRY_AFTER, "3600".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(10)), "capped");
    }
}
