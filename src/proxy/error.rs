//! Every answer the proxy makes itself is a distribution-spec error envelope with a status that
//! means something: refusals are 4xx, an unreachable upstream is 502, a slow one 504.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, Method, StatusCode, header};

use crate::oci::error::{ErrorCode, RegistryError, chain};
use crate::oci::{token, transport};

/// Why the proxy answered a request itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The path is not one of the proxy's routes.
    #[error("no such route: {path}")]
    NotFound {
        /// The path asked for.
        path: String,
    },
    /// The repository is neither an alias nor a mirror route.
    #[error(
        "repository {name:?} is not served by this proxy (use base, target, cache or an allowed mirror reference)"
    )]
    NameUnknown {
        /// The repository name asked for.
        name: String,
    },
    /// The path is malformed or tries to be read differently upstream.
    #[error("invalid request path: {reason}")]
    NameInvalid {
        /// What is wrong.
        reason: String,
    },
    /// A digest in the path is malformed.
    #[error("invalid digest {digest:?}")]
    DigestInvalid {
        /// The digest as given.
        digest: String,
    },
    /// The method is not allowed on this route.
    #[error("method {method} is not allowed on this route")]
    MethodNotAllowed {
        /// The method used.
        method: Method,
    },
    /// The route exists but this access is not allowed.
    #[error("denied: {reason}")]
    Denied {
        /// Why.
        reason: String,
    },
    /// An upload URL the proxy did not issue (or that expired).
    #[error("unknown upload: only upload URLs issued by this proxy are accepted")]
    UploadUnknown,
    /// The cap on open upload sessions is reached; nothing was opened upstream.
    #[error("too many open uploads (at most {max}): finish or cancel one first")]
    TooManyUploads {
        /// The cap.
        max: usize,
    },
    /// The alias is not configured in this proxy.
    #[error("alias {alias} is not configured")]
    AliasUnset {
        /// The alias name.
        alias: &'static str,
    },
    /// The upstream could not be reached.
    #[error("upstream registry {host} is unreachable")]
    Unreachable {
        /// The upstream host.
        host: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// The upstream did not answer in time.
    #[error("upstream registry {host} timed out")]
    Timeout {
        /// The upstream host.
        host: String,
        /// The transport error, if one ended the wait.
        #[source]
        source: Option<reqwest::Error>,
    },
    /// A host behind the registry (storage) asked for credentials; none were sent.
    #[error("a storage host of upstream registry {host} asked for credentials; none are sent there")]
    ForeignChallenge {
        /// The upstream host.
        host: String,
    },
    /// The upstream registry refused the proxy's credentials.
    #[error("upstream registry {host} refused the credentials of this build")]
    Unauthorized {
        /// The upstream host.
        host: String,
    },
    /// The upstream redirected too often.
    #[error("upstream registry {host} redirected too often")]
    Redirects {
        /// The upstream host.
        host: String,
    },
    /// Authenticating to the upstream failed.
    #[error("cannot authenticate to upstream registry {host}")]
    Auth {
        /// The upstream host.
        host: String,
        /// Why.
        #[source]
        source: token::Error,
    },
    /// A mirrored manifest is larger than the proxy will inspect.
    #[error("manifest larger than {limit} bytes")]
    ManifestTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
}

impl From<transport::Error> for ProxyError {
    fn from(e: transport::Error) -> Self {
        match e {
            transport::Error::Unreachable { host, source } => ProxyError::Unreachable { host, source },
            transport::Error::Timeout { host, source } => ProxyError::Timeout { host, source },
            transport::Error::Auth { host, source } => ProxyError::Auth { host, source },
            transport::Error::ForeignChallenge { host, .. } => ProxyError::ForeignChallenge { host },
            transport::Error::TooManyRedirects { host } => ProxyError::Redirects { host },
            // Built once at start-up; a request never produces it.
            transport::Error::Client(source) => ProxyError::Unreachable { host: "client".into(), source },
        }
    }
}

impl ProxyError {
    /// The HTTP status and spec code of this error.
    pub fn status_and_code(&self) -> (StatusCode, ErrorCode) {
        use ProxyError::*;
        match self {
            NotFound { .. } => (StatusCode::NOT_FOUND, ErrorCode::NameUnknown),
            NameUnknown { .. } | AliasUnset { .. } => (StatusCode::NOT_FOUND, ErrorCode::NameUnknown),
            NameInvalid { .. } => (StatusCode::BAD_REQUEST, ErrorCode::NameInvalid),
            DigestInvalid { .. } => (StatusCode::BAD_REQUEST, ErrorCode::DigestInvalid),
            MethodNotAllowed { .. } => (StatusCode::METHOD_NOT_ALLOWED, ErrorCode::Unsupported),
            Denied { .. } => (StatusCode::FORBIDDEN, ErrorCode::Denied),
            UploadUnknown => (StatusCode::NOT_FOUND, ErrorCode::BlobUploadUnknown),
            TooManyUploads { .. } => (StatusCode::TOO_MANY_REQUESTS, ErrorCode::Toomanyrequests),
            Unreachable { .. } => (StatusCode::BAD_GATEWAY, ErrorCode::Unavailable),
            Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, ErrorCode::Unavailable),
            Auth { source: token::Error::TokenRefused { .. }, .. } => {
                (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized)
            }
            Auth { .. } => (StatusCode::BAD_GATEWAY, ErrorCode::Unavailable),
            Unauthorized { .. } => (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized),
            ForeignChallenge { .. } | Redirects { .. } => (StatusCode::BAD_GATEWAY, ErrorCode::Unavailable),
            ManifestTooLarge { .. } => (StatusCode::BAD_GATEWAY, ErrorCode::ManifestInvalid),
        }
    }

    /// A bounded label for logs and metrics.
    pub fn label(&self) -> &'static str {
        use ProxyError::*;
        match self {
            NotFound { .. } => "not_found",
            NameUnknown { .. } => "name_unknown",
            NameInvalid { .. } => "name_invalid",
            DigestInvalid { .. } => "digest_invalid",
            MethodNotAllowed { .. } => "method_not_allowed",
            Denied { .. } => "denied",
            UploadUnknown => "upload_unknown",
            TooManyUploads { .. } => "too_many_uploads",
            AliasUnset { .. } => "alias_unset",
            Unreachable { .. } => "upstream_unreachable",
            Timeout { .. } => "upstream_timeout",
            Auth { .. } => "upstream_auth",
            Unauthorized { .. } => "upstream_unauthorized",
            ForeignChallenge { .. } => "foreign_challenge",
            Redirects { .. } => "upstream_redirects",
            ManifestTooLarge { .. } => "manifest_too_large",
        }
    }
}

/// Builds an error envelope response.
pub fn envelope(status: StatusCode, code: ErrorCode, message: String) -> Response {
    let body = serde_json::to_vec(&RegistryError::new(code, message)).unwrap_or_default();
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert("docker-distribution-api-version", HeaderValue::from_static("registry/2.0"));
    resp
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        envelope(status, code, chain(&self))
    }
}
