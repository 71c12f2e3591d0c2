//! The proxy's side of upstream traffic: which client headers may go upstream, and how an
//! upstream response becomes the client's (streamed, registry headers only, errors as envelopes).
//! Sending itself (credentials, retries) is `oci::transport`, shared with `bob copy`.

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderName, StatusCode, header};

use super::error::{ProxyError, envelope};
use crate::oci::ErrorCode;

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
    if status == StatusCode::UNAUTHORIZED {
        // The client has no credentials to offer, and the registry's answer may name its token
        // realm: say what happened in the proxy's own words.
        let host = resp.url().host_str().unwrap_or("upstream").to_string();
        return ProxyError::Unauthorized { host }.into_response();
    }
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
pub(super) fn code_for(status: StatusCode) -> ErrorCode {
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
}
