//! One request to a registry with credentials attached, retried when that is safe (bodiless
//! GET/HEAD on connection errors, 5xx and 429; one re-auth on 401). Shared by the proxy's
//! upstream side, `bob copy`, `bob build` and the controller, so every registry client in bob
//! follows one origin rule: credentials, tokens and challenges belong to the registry's own
//! origin (scheme, host, port) and never travel to a redirect target or upload URL elsewhere.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, Method, StatusCode, header};
use url::Url;

use super::token::{self, Authenticator};
use super::{CredentialStore, Endpoints};

/// Redirects followed for one request (blob reads are redirected once, to storage).
const MAX_REDIRECTS: usize = 5;

/// Why a request got no usable answer from the registry.
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
        /// The transport error, if one ended the wait (else the request's time budget ran out).
        #[source]
        source: Option<reqwest::Error>,
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
    /// A host the registry sent the request on to (storage behind a redirect or an upload URL)
    /// asked for credentials: it gets none, and its challenge is not learned.
    #[error(
        "{origin}, where registry {host} sent the request, asked for credentials; bob sends them only to the registry"
    )]
    ForeignChallenge {
        /// The registry host.
        host: String,
        /// The origin that answered 401 (`scheme://host:port`).
        origin: String,
    },
    /// The registry redirected more often than bob follows.
    #[error("registry {host} redirected more than {MAX_REDIRECTS} times")]
    TooManyRedirects {
        /// The registry host.
        host: String,
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
    /// Longest wait for the answer to a bodiless request, retries, backoff and redirects
    /// included, so a silent upstream costs a client this long and not `retries` times more.
    pub request_timeout: Duration,
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
            .field("request_timeout", &self.request_timeout)
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
            request_timeout: Duration::from_secs(120),
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
    /// The registry host as in the reference (credential, challenge and origin key).
    pub host: String,
    /// The full URL: on the registry, or an upload URL it handed out (maybe elsewhere).
    pub url: Url,
    /// Headers to send (an `Authorization` here is dropped: credentials are added per hop).
    pub headers: HeaderMap,
    /// The body, streamed; `None` for bodiless requests (which may be replayed).
    pub body: Option<reqwest::Body>,
    /// Token scopes the request needs.
    pub scopes: Vec<String>,
}

impl Request {
    /// A bodiless request.
    pub fn new(method: Method, host: &str, url: Url, scopes: Vec<String>) -> Self {
        Self { method, host: host.to_string(), url, headers: HeaderMap::new(), body: None, scopes }
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
            // Redirects are followed here, hop by hop, so that each hop's origin decides whether
            // it gets credentials; the token client shares this and follows none.
            .redirect(reqwest::redirect::Policy::none())
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

    /// Sends a request; the response's body is not read. A `401` is learned from (and retried
    /// once after re-authenticating) only when the registry's own origin sent it; from any other
    /// origin it is `Error::ForeignChallenge` and changes nothing.
    pub async fn send(&self, req: Request) -> Result<reqwest::Response, Error> {
        let Request { method, host, url, mut headers, mut body, mut scopes } = req;
        headers.remove(header::AUTHORIZATION);
        let replayable = body.is_none();
        let idempotent = method == Method::GET || method == Method::HEAD;
        // Only a bodiless request has a total budget: an upload's time depends on its size.
        let deadline = replayable.then(|| Instant::now() + self.opts.request_timeout);
        let mut attempt = 0u32;
        let mut reauthed = false;
        loop {
            let hop = Hop { method: &method, host: &host, headers: &headers, scopes: &scopes };
            let sent = match deadline {
                Some(d) => {
                    match tokio::time::timeout_at(d.into(), self.exchange(&hop, &url, body.take())).await {
                        Ok(sent) => sent?,
                        Err(_) => return Err(Error::Timeout { host, source: None }),
                    }
                }
                None => self.exchange(&hop, &url, body.take()).await?,
            };
            let can_retry = idempotent && replayable && attempt < self.opts.retries;
            let wait = match sent {
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED => {
                    if !self.endpoints.same_origin(&host, resp.url()) {
                        return Err(Error::ForeignChallenge { origin: origin(resp.url()), host });
                    }
                    let extra = self.auth.unauthorized(&host, resp.headers().get(header::WWW_AUTHENTICATE));
                    if !replayable || reauthed {
                        return Ok(resp);
                    }
                    reauthed = true;
                    for s in extra {
                        if !scopes.contains(&s) {
                            scopes.push(s);
                        }
                    }
                    continue;
                }
                Ok(resp) if can_retry && retryable(resp.status()) => {
                    tracing::debug!(%host, status = resp.status().as_u16(), attempt, "retrying registry request");
                    retry_after(resp.headers()).unwrap_or(self.backoff(attempt))
                }
                Ok(resp) => return Ok(resp),
                Err(e) if can_retry && (e.is_connect() || e.is_timeout() || e.is_request()) => {
                    tracing::debug!(%host, attempt, error = %super::error::chain(&e), "retrying registry request");
                    self.backoff(attempt)
                }
                Err(source) if source.is_timeout() => {
                    return Err(Error::Timeout { host, source: Some(source) });
                }
                Err(source) => return Err(Error::Unreachable { host, source }),
            };
            if deadline.is_some_and(|d| Instant::now() + wait >= d) {
                // Waiting would outlast the budget: the answer is that the registry timed out.
                return Err(Error::Timeout { host, source: None });
            }
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// One exchange: the request and, for bodiless GET/HEAD, the redirects that follow it. Each
    /// hop gets credentials only if it is on the registry's origin. The inner result is the
    /// transport outcome of the last hop (for the retry policy); the outer one ends the request.
    async fn exchange(
        &self,
        hop: &Hop<'_>,
        url: &Url,
        mut body: Option<reqwest::Body>,
    ) -> Result<Result<reqwest::Response, reqwest::Error>, Error> {
        let follow = body.is_none() && (*hop.method == Method::GET || *hop.method == Method::HEAD);
        let mut url = url.clone();
        for _ in 0..=MAX_REDIRECTS {
            let auth = if self.endpoints.same_origin(hop.host, &url) {
                self.authorization(hop.host, hop.scopes).await?
            } else {
                None
            };
            let mut req = self.http.request(hop.method.clone(), url.clone()).headers(hop.headers.clone());
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
            let resp = match result {
                Ok(resp) => resp,
                // Its message would carry the URL: a storage URL may hold a signature.
                Err(e) => return Ok(Err(e.without_url())),
            };
            match redirect_target(&resp).filter(|_| follow) {
                Some(next) => url = next,
                None => return Ok(Ok(resp)),
            }
        }
        Err(Error::TooManyRedirects { host: hop.host.to_string() })
    }

    async fn authorization(&self, host: &str, scopes: &[String]) -> Result<Option<http::HeaderValue>, Error> {
        self.auth.authorization(host, scopes).await.map_err(|source| match source {
            // Not reaching the registry is not an authentication problem.
            token::Error::Ping { source, .. } if source.is_timeout() => {
                Error::Timeout { host: host.to_string(), source: Some(source) }
            }
            token::Error::Ping { source, .. } => Error::Unreachable { host: host.to_string(), source },
            source => Error::Auth { host: host.to_string(), source },
        })
    }

    fn backoff(&self, attempt: u32) -> Duration {
        (self.opts.backoff * 2u32.saturating_pow(attempt)).min(Duration::from_secs(10))
    }
}

/// Reads a response body of at most `limit` bytes; `None` when it is longer (the rest is not
/// read, so a hostile upstream cannot make bob buffer without bound).
pub async fn read_capped(
    resp: reqwest::Response,
    limit: usize,
) -> Result<Option<bytes::Bytes>, reqwest::Error> {
    use futures::StreamExt;
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Ok(None);
    }
    let mut stream = resp.bytes_stream();
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if buf.len() + chunk.len() > limit {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Some(buf.freeze()))
}

/// What every hop of one request shares.
struct Hop<'a> {
    method: &'a Method,
    host: &'a str,
    headers: &'a HeaderMap,
    scopes: &'a [String],
}

/// Where a redirect answer points, resolved against the URL that answered.
fn redirect_target(resp: &reqwest::Response) -> Option<Url> {
    if !matches!(resp.status().as_u16(), 301 | 302 | 303 | 307 | 308) {
        return None;
    }
    let location = resp.headers().get(header::LOCATION)?.to_str().ok()?;
    resp.url().join(location).ok().filter(|u| matches!(u.scheme(), "http" | "https"))
}

/// `scheme://host:port` of a URL, for messages.
fn origin(url: &Url) -> String {
    url.origin().ascii_serialization()
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
