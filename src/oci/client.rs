//! A small registry client for copies: manifests by tag or digest, blob existence, cross-repo
//! mounts, streamed blob reads and monolithic streamed uploads. Requests go through
//! `oci::transport`, so credentials, retries and the plain-HTTP rule are the proxy's.

use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode, header};
use url::Url;

use super::Reference;
use super::error::registry_message;
use super::manifest::{self, ACCEPT, MAX_MANIFEST_BYTES};
use super::token::repository_scope;
use super::transport::{self, Request, Transport};

/// What went wrong talking to a registry. `kind()` gives the bounded class used for exit codes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The manifest, blob or repository does not exist.
    #[error("{what} not found in {host}")]
    NotFound {
        /// What was asked for.
        what: String,
        /// The registry.
        host: String,
    },
    /// The registry refused the credentials (or needs some).
    #[error("unauthorized at {host}: {message} (check the credentials for {host})")]
    Unauthorized {
        /// The registry.
        host: String,
        /// The registry's message.
        message: String,
    },
    /// Content did not match its digest.
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The manifest or blob.
        what: String,
        /// The digest asked for.
        expected: String,
        /// The digest of what arrived.
        actual: String,
    },
    /// A manifest bob cannot copy.
    #[error("cannot copy {what}")]
    Manifest {
        /// The reference.
        what: String,
        /// Why.
        #[source]
        source: manifest::Error,
    },
    /// The manifest is larger than bob reads.
    #[error("manifest {what} is larger than {MAX_MANIFEST_BYTES} bytes")]
    ManifestTooLarge {
        /// The reference.
        what: String,
    },
    /// An index nests other indexes deeper than bob follows.
    #[error("{what} nests indexes more than {max} deep")]
    IndexTooDeep {
        /// The reference.
        what: String,
        /// The limit.
        max: usize,
    },
    /// An image names more manifests than one copy takes.
    #[error("{what} names more than {max} manifests")]
    TooManyManifests {
        /// The reference.
        what: String,
        /// The limit.
        max: usize,
    },
    /// Any other answer from the registry.
    #[error("{host} answered {status} to {method} {path}: {message}")]
    Registry {
        /// The registry.
        host: String,
        /// The method.
        method: Method,
        /// The URL path.
        path: String,
        /// The status.
        status: StatusCode,
        /// The registry's message (or code).
        message: String,
    },
    /// The connection broke while reading a body.
    #[error("reading from {host} failed")]
    Body {
        /// The registry.
        host: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// No answer, or authentication could not even be tried.
    #[error(transparent)]
    Transport(#[from] transport::Error),
}

/// The bounded classes of registry failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Something named does not exist.
    NotFound,
    /// Credentials are missing or refused.
    Unauthorized,
    /// Content did not match its digest.
    DigestMismatch,
    /// A manifest of a media type bob cannot copy.
    UnsupportedMediaType,
    /// The registry could not be reached or did not answer.
    Unreachable,
    /// The image exceeds one of bob's limits (manifest size, index depth, manifest count).
    Limit,
    /// Anything else.
    Other,
}

impl Error {
    /// The class of this failure.
    pub fn kind(&self) -> Kind {
        match self {
            Error::NotFound { .. } => Kind::NotFound,
            Error::Unauthorized { .. } => Kind::Unauthorized,
            Error::Registry { status, .. } if *status == StatusCode::FORBIDDEN => Kind::Unauthorized,
            Error::DigestMismatch { .. } => Kind::DigestMismatch,
            // The registry's own verification of what was uploaded.
            Error::Registry { message, .. } if message.starts_with("DIGEST_INVALID") => Kind::DigestMismatch,
            Error::Manifest { source: manifest::Error::UnsupportedMediaType { .. }, .. } => {
                Kind::UnsupportedMediaType
            }
            Error::Transport(transport::Error::Auth {
                source: super::token::Error::TokenRefused { .. },
                ..
            }) => Kind::Unauthorized,
            // A storage host behind the registry wanting credentials it will never get.
            Error::Transport(transport::Error::ForeignChallenge { .. }) => Kind::Unauthorized,
            Error::Transport(_) | Error::Body { .. } => Kind::Unreachable,
            Error::ManifestTooLarge { .. } | Error::IndexTooDeep { .. } | Error::TooManyManifests { .. } => {
                Kind::Limit
            }
            Error::Registry { status, .. } if status.is_server_error() => Kind::Unreachable,
            _ => Kind::Other,
        }
    }
}

/// A manifest as the registry stores it: the exact bytes (a copy pushes these, never a
/// re-serialisation), their media type and digest.
#[derive(Clone, Debug)]
pub struct Manifest {
    /// The raw bytes.
    pub bytes: Bytes,
    /// The media type.
    pub media_type: String,
    /// `sha256:` of the bytes.
    pub digest: String,
}

/// What a mount request got.
pub enum Mount {
    /// The blob is now in the destination repository.
    Mounted,
    /// The registry opened a plain upload instead, at this URL.
    Upload(Url),
}

/// The registry client.
pub struct Client {
    transport: Transport,
}

impl Client {
    /// A client over `transport`.
    pub fn new(transport: Transport) -> Self {
        Self { transport }
    }

    /// A client with credentials from `creds`, plain HTTP for loopback and `insecure` hosts, and
    /// `timeout` as the longest wait for an answer (retries included) and the longest silence
    /// while a body streams; `observer` sees every answer's status (metrics).
    pub fn connect(
        creds: super::CredentialStore,
        insecure: &[String],
        timeout: std::time::Duration,
        observer: Option<transport::Observer>,
    ) -> Result<Self, transport::Error> {
        let opts = transport::TransportOptions {
            read_timeout: timeout,
            request_timeout: timeout,
            observer,
            ..Default::default()
        };
        let creds = std::sync::Arc::new(creds);
        Ok(Self::new(Transport::new(creds, super::Endpoints::new(insecure), opts)?))
    }

    fn url(&self, host: &str, path: &str) -> Url {
        let mut url = self.transport.endpoints().base_url(host);
        url.set_path(&format!("/v2/{path}"));
        url
    }

    /// A manifest read of `r` by its digest, else its tag (`latest` if none), accepting every
    /// manifest type bob copies.
    fn manifest_request(&self, method: Method, r: &Reference) -> Request {
        let host = r.registry();
        let reference = r.digest().or(r.tag()).unwrap_or("latest");
        let path = format!("{}/manifests/{reference}", r.repository());
        let mut req =
            Request::new(method, host, self.url(host, &path), vec![repository_scope(r.repository(), false)]);
        req.headers.insert(header::ACCEPT, HeaderValue::from_static(ACCEPT));
        req
    }

    /// Fetches a manifest by the reference's digest, else its tag (`latest` if none). A digest
    /// reference is verified against the bytes.
    pub async fn manifest(&self, r: &Reference) -> Result<Manifest, Error> {
        let host = r.registry();
        let req = self.manifest_request(Method::GET, r);
        let resp = check(self.transport.send(req).await?, &Method::GET, r.whole()).await?;
        let content_type =
            resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(String::from);
        let bytes = read_limited(resp, host, &r.whole()).await?;
        let digest = manifest::sha256(&bytes);
        if let Some(expected) = r.digest()
            && expected != digest
        {
            return Err(Error::DigestMismatch { what: r.whole(), expected: expected.into(), actual: digest });
        }
        let media_type = manifest::media_type(content_type.as_deref(), &bytes);
        Ok(Manifest { bytes, media_type, digest })
    }

    /// The digest of a manifest if it exists (HEAD), `None` if it does not.
    pub async fn manifest_digest(&self, r: &Reference) -> Result<Option<String>, Error> {
        let resp = self.transport.send(self.manifest_request(Method::HEAD, r)).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let resp = check(resp, &Method::HEAD, r.whole()).await?;
        let digest =
            resp.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()).map(String::from);
        match digest {
            Some(d) => Ok(Some(d)),
            // Registries should send the header; without it, read the manifest to know.
            None => Ok(Some(self.manifest(r).await?.digest)),
        }
    }

    /// Stores a manifest under `reference` (a tag or its digest) in `repository` on `host`.
    pub async fn put_manifest(
        &self,
        host: &str,
        repository: &str,
        reference: &str,
        m: &Manifest,
    ) -> Result<(), Error> {
        let mut req = Request::new(
            Method::PUT,
            host,
            self.url(host, &format!("{repository}/manifests/{reference}")),
            vec![repository_scope(repository, true)],
        );
        let ct =
            HeaderValue::from_str(&m.media_type).unwrap_or(HeaderValue::from_static(manifest::OCI_MANIFEST));
        req.headers.insert(header::CONTENT_TYPE, ct);
        req.body = Some(reqwest::Body::from(m.bytes.clone()));
        let what = format!("{host}/{repository}:{reference}");
        let resp = check(self.transport.send(req).await?, &Method::PUT, what.clone()).await?;
        let stored = resp.headers().get("docker-content-digest").and_then(|v| v.to_str().ok());
        match stored {
            Some(d) if d != m.digest => {
                Err(Error::DigestMismatch { what, expected: m.digest.clone(), actual: d.to_string() })
            }
            _ => Ok(()),
        }
    }

    /// Whether a blob exists in `repository`.
    pub async fn blob_exists(&self, host: &str, repository: &str, digest: &str) -> Result<bool, Error> {
        let req = Request::new(
            Method::HEAD,
            host,
            self.url(host, &format!("{repository}/blobs/{digest}")),
            vec![repository_scope(repository, false)],
        );
        let resp = self.transport.send(req).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(false);
        }
        check(resp, &Method::HEAD, format!("blob {digest}")).await.map(|_| true)
    }

    /// Asks the registry to mount a blob from another of its repositories.
    pub async fn mount(
        &self,
        host: &str,
        repository: &str,
        from: &str,
        digest: &str,
    ) -> Result<Mount, Error> {
        let mut url = self.url(host, &format!("{repository}/blobs/uploads/"));
        url.query_pairs_mut().append_pair("mount", digest).append_pair("from", from);
        // The token must allow pulling from the source too, or the registry refuses the mount.
        let scopes = vec![repository_scope(repository, true), repository_scope(from, false)];
        let resp = self.transport.send(Request::new(Method::POST, host, url, scopes)).await?;
        if resp.status() == StatusCode::CREATED {
            return Ok(Mount::Mounted);
        }
        let resp = check(resp, &Method::POST, format!("mount of {digest}")).await?;
        Ok(Mount::Upload(self.location(host, &resp)?))
    }

    /// Opens an upload session in `repository`.
    pub async fn start_upload(&self, host: &str, repository: &str) -> Result<Url, Error> {
        let url = self.url(host, &format!("{repository}/blobs/uploads/"));
        let req = Request::new(Method::POST, host, url, vec![repository_scope(repository, true)]);
        let resp =
            check(self.transport.send(req).await?, &Method::POST, format!("upload to {repository}")).await?;
        self.location(host, &resp)
    }

    /// Abandons an upload session and whatever bytes it holds. Best effort: a registry that
    /// refuses keeps the session until it expires it (distribution: a week).
    pub async fn cancel_upload(&self, host: &str, repository: &str, location: Url) {
        let req = self.upload_request(Method::DELETE, host, repository, location);
        match self.transport.send(req).await {
            Ok(r) if r.status().is_success() || r.status() == StatusCode::NOT_FOUND => {}
            Ok(r) => {
                tracing::warn!(status = r.status().as_u16(), %repository, "the registry refused to cancel an upload")
            }
            Err(e) => tracing::warn!(error = %super::error::chain(&e), "cannot cancel an upload"),
        }
    }

    /// Streams bytes into an upload session with one `PATCH` (chunked, so a body may end early
    /// and the session stays usable: it can still be completed or cancelled). Returns the
    /// session's next URL.
    pub async fn patch_upload(
        &self,
        host: &str,
        repository: &str,
        location: Url,
        body: reqwest::Body,
    ) -> Result<Url, Error> {
        let mut req = self.upload_request(Method::PATCH, host, repository, location);
        req.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        req.body = Some(body);
        let resp =
            check(self.transport.send(req).await?, &Method::PATCH, format!("upload to {repository}")).await?;
        self.location(host, &resp)
    }

    /// Completes an upload whose bytes are all sent: a `PUT` with the digest and no body.
    pub async fn complete_upload(
        &self,
        host: &str,
        repository: &str,
        location: Url,
        digest: &str,
    ) -> Result<(), Error> {
        let mut url = location;
        url.query_pairs_mut().append_pair("digest", digest);
        let mut req = self.upload_request(Method::PUT, host, repository, url);
        req.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
        check(self.transport.send(req).await?, &Method::PUT, format!("blob {digest}")).await.map(|_| ())
    }

    /// Starts reading a blob; the caller streams (and verifies) the body.
    pub async fn blob(&self, host: &str, repository: &str, digest: &str) -> Result<reqwest::Response, Error> {
        let req = Request::new(
            Method::GET,
            host,
            self.url(host, &format!("{repository}/blobs/{digest}")),
            vec![repository_scope(repository, false)],
        );
        check(self.transport.send(req).await?, &Method::GET, format!("blob {digest}")).await
    }

    /// A request to an upload URL; those may point at another host (storage front-ends), which
    /// the transport gives no credentials.
    fn upload_request(&self, method: Method, host: &str, repository: &str, url: Url) -> Request {
        Request::new(method, host, url, vec![repository_scope(repository, true)])
    }

    /// The `Location` of an upload answer, resolved against the URL that answered (a storage
    /// host's relative location stays on that host).
    fn location(&self, host: &str, resp: &reqwest::Response) -> Result<Url, Error> {
        let loc = resp.headers().get(header::LOCATION).and_then(|v| v.to_str().ok());
        loc.and_then(|l| resp.url().join(l).ok()).ok_or_else(|| Error::Registry {
            host: host.to_string(),
            method: Method::POST,
            path: resp.url().path().to_string(),
            status: resp.status(),
            message: "upload answer without a Location".into(),
        })
    }
}

/// Turns an error status into an `Error`, reading the registry's error body.
async fn check(resp: reqwest::Response, method: &Method, what: String) -> Result<reqwest::Response, Error> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let host = resp.url().host_str().unwrap_or_default().to_string();
    let host = match resp.url().port() {
        Some(p) => format!("{host}:{p}"),
        None => host,
    };
    let path = resp.url().path().to_string();
    let body = if *method == Method::HEAD { Bytes::new() } else { resp.bytes().await.unwrap_or_default() };
    let message =
        registry_message(&body).unwrap_or_else(|| status.canonical_reason().unwrap_or("").to_string());
    Err(match status {
        StatusCode::NOT_FOUND => Error::NotFound { what, host },
        StatusCode::UNAUTHORIZED => Error::Unauthorized { host, message },
        _ => Error::Registry { host, method: method.clone(), path, status, message },
    })
}

async fn read_limited(resp: reqwest::Response, host: &str, what: &str) -> Result<Bytes, Error> {
    transport::read_capped(resp, MAX_MANIFEST_BYTES)
        .await
        .map_err(|e| Error::Body { host: host.to_string(), source: e.without_url() })?
        .ok_or_else(|| Error::ManifestTooLarge { what: what.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_counts_as_unauthorized_and_5xx_as_unreachable() {
        let reg = |status| Error::Registry {
            host: "h".into(),
            method: Method::GET,
            path: "/".into(),
            status,
            message: String::new(),
        };
        assert_eq!(reg(StatusCode::FORBIDDEN).kind(), Kind::Unauthorized);
        assert_eq!(reg(StatusCode::BAD_GATEWAY).kind(), Kind::Unreachable);
        assert_eq!(reg(StatusCode::BAD_REQUEST).kind(), Kind::Other);
    }
}
