//! One request to a registry with credentials attached, retried when that is safe (bodiless
//! GET/HEAD on connection errors, 5xx and 429; one re-auth on 401). Shared by the proxy's
//! upstream side and by `bob copy`, so every registry client in bob authenticates one way.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Method, StatusCode, header};
use url::Url;

use super::token::{self, Authenticator};
use super::{CredentialStore, Endpoints};

/// Why a request got no answer from the registry.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The registry could not be reached.
    #[error("registry {host} is unreachable")]
    Unreachable {
        /// The registry host.
        host: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// The registry did not answer in time.
    #[error("registry {host} timed out")]
    Timeout {
        /// The registry host.
        host: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// Authenticating to the registry failed.
    #[error("cannot authenticate to registry {host}")]
    Auth {
        /// The registry host.
        host: String,
        /// Why.
        #[source]
        source: token::Error,
    },
    /// The HTTP client could not be built.
    #[error("cannot build the http client")]
    Client(#[source] reqwest::Error),
}

/// Called with the status of every registry answer (0 when none came), for metrics.
pub type Observer = Arc<dyn Fn(u16) + Send + Sync>;

/// Tunables of the registry client.
#[derive(Clone)]
pub struct TransportOptions {
    /// Longest wait for a connection.
    pub connect_timeout: Duration,
    /// Longest silence while reading a response (also bounds a stalled upload's answer).
    pub read_timeout: Duration,
    /// Retries of idempotent requests.
    pub retries: u32,
    /// First backoff; doubles on each retry.
    pub backoff: Duration,
    /// Sees every answer's status.
    pub observer: Option<Observer>,
}

impl std::fmt::Debug for TransportOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransportOptions")
            .field("connect_timeout", &self.connect_timeout)
            .field("read_timeout", &self.read_timeout)
            .field("retries", &self.retries)
            .field("backoff", &self.backoff)
            .field("observer", &self.observer.is_some())
            .finish()
    }
}

impl Default for TransportOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(120),
            retries: 3,
            backoff: Duration::from_millis(200),
            observer: None,
        }
    }
}

/// A request to send to a registry.
pub struct Request {
    /// The method.
    pub method: Method,
    /// The registry host as in the reference (credential and challenge key).
    pub host: String,
    /// The full URL.
    pub url: Url,
    /// Headers to send (never `Authorization`: that is added here).
    pub headers: HeaderMap,
    /// The body, streamed; `None` for bodiless requests (which may be replayed).
    pub body: Option<reqwest::Body>,
    /// Token scopes the request needs.
    pub scopes: Vec<String>,
    /// Whether to attach credentials (false for URLs on another host than the registry).
    pub authorize: bool,
}

impl Request {
    /// A bodiless, authorized request.
    pub fn new(method: Method, host: &str, url: Url, scopes: Vec<String>) -> Self {
        Self {
            method,
            host: host.to_string(),
            url,
            headers: HeaderMap::new(),
            body: None,
            scopes,
            authorize: true,
        }
    }
}

/// The registry client: credentials from a store, schemes from the one plain-HTTP rule.
pub struct Transport {
    http: reqwest::Client,
    auth: Authenticator,
    endpoints: Endpoints,
    opts: TransportOptions,
}

impl Transport {
    /// Builds the client; credentials come from `creds`, schemes from `endpoints`.
    pub fn new(
        creds: Arc<CredentialStore>,
        endpoints: Endpoints,
        opts: TransportOptions,
    ) -> Result<Self, Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(opts.connect_timeout)
            .read_timeout(opts.read_timeout)
            // Blob GETs may be redirected to storage; reqwest drops Authorization across hosts.
            .redirect(reqwest::redirect::Policy::limited(5))
            .user_agent(concat!("bob/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(Error::Client)?;
        let auth = Authenticator::new(http.clone(), creds, endpoints.clone());
        Ok(Self { http, auth, endpoints, opts })
    }

    /// The scheme rule in force.
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// Sends a request; the response's body is not read.
    pub async fn send(&self, req: Request) -> Result<reqwest::Response, Error> {
        let Request { method, host, url, headers, mut body, mut scopes, authorize } = req;
        let replayable = body.is_none();
        let idempotent = method == Method::GET || method == Method::HEAD;
        let mut attempt = 0u32;
        let mut reauthed = false;
        loop {
            let auth = if authorize {
                self.auth.authorization(&host, &scopes).await.map_err(|source| match source {
                    // Not reaching the registry is not an authentication problem.
                    token::Error::Ping { source, .. } if source.is_timeout() => {
                        Error::Timeout { host: host.clone(), source }
                    }
                    token::Error::Ping { source, .. } => Error::Unreachable { host: host.clone(), source },
                    source => Error::Auth { host: host.clone(), source },
                })?
            } else {
                None
            };
            let mut req = self.http.request(method.clone(), url.clone()).headers(headers.clone());
            if let Some(a) = auth {
                req = req.header(header::AUTHORIZATION, a);
            }
            if let Some(b) = body.take() {
                req = req.body(b);
            }
            let result = req.send().await;
            if let Some(observe) = &self.opts.observer {
                observe(result.as_ref().map_or(0, |r| r.status().as_u16()));
            }
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
                    tracing::debug!(%host, status = resp.status().as_u16(), attempt, "retrying registry request");
                    drop(resp);
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Ok(resp) => return Ok(resp),
                Err(e) if can_retry && (e.is_connect() || e.is_timeout() || e.is_request()) => {
                    tracing::debug!(%host, attempt, error = %super::error::chain(&e), "retrying registry request");
                    tokio::time::sleep(self.backoff(attempt)).await;
                    attempt += 1;
                }
                Err(source) if source.is_timeout() => return Err(Error::Timeout { host, source }),
                Err(source) => return Err(Error::Unreachable { host, source }),
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

#[cfg(test)]
mod tests {
    use super::*;

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
